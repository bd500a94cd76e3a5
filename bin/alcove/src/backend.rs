//! The control plane's [`SandboxBackend`] over the node library: what `alcove server` runs.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use alcove_agent_client::{AgentBody, ClientError, OpenTunnel, PortClient};
use alcove_api::backend::{
    BackendError, Body, BoxFuture, CreateSandbox, ENVD_PORT, ExecOutput, ExecRequest, Keep,
    LiveSandbox, LogLevel, LogLine, NetCounters, ResourceUsage, SandboxBackend, SandboxStatus,
    StartedSandbox, TemplateInfo, WarmPool,
};
use alcove_node::{CreateOptions, Node, NodeError, SandboxState};
use http_body_util::BodyExt;

const ENVD_VERSION: &str = alcove_agent_client::alcove_envd_proto::ENVD_VERSION;
/// Bound on reaching the agent for one forwarded request (connecting, not the whole exchange:
/// uploads and command streams may run long).
const FORWARD_CONNECT: Duration = Duration::from_secs(30);
/// Bound on a server in the sandbox answering with its response head (its body may stream on
/// for as long as it likes). Generous: user servers may think before they answer.
const PORT_RESPONSE_HEAD: Duration = Duration::from_secs(300);

/// Output kept of a command the API runs in a sandbox (`exec`).
const EXEC_OUTPUT_LIMIT: usize = 1 << 20;

pub struct NodeBackend {
    node: Arc<Node>,
    /// HTTP to every port but the agent's, through agent tunnels, connections pooled per
    /// sandbox and port.
    ports: PortClient<Body>,
}

impl NodeBackend {
    /// Where the node serves guests' volume mounts from (the API's registry).
    pub fn set_volumes(&self, volumes: Arc<alcove_volume::Volumes>) {
        self.node.set_volumes(volumes);
    }

    pub fn new(node: Arc<Node>) -> NodeBackend {
        let n = Arc::clone(&node);
        let open: OpenTunnel = Arc::new(move |id: String, port: u16| {
            let node = Arc::clone(&n);
            Box::pin(async move {
                let agent = tokio::time::timeout(FORWARD_CONNECT, node.agent(&id))
                    .await
                    .map_err(|_| ClientError::Timeout("reach the sandbox agent"))?
                    .map_err(|e| ClientError::Build("reach the sandbox agent", Box::new(e)))?;
                let token = node
                    .get(&id)
                    .map_err(|e| ClientError::Build("reach the sandbox agent", Box::new(e)))?
                    .access_token;
                agent.tunnel(port, token.as_deref()).await
            })
        });
        NodeBackend {
            node,
            ports: PortClient::new(open),
        }
    }
}

fn failed(op: &'static str, e: impl std::error::Error + Send + Sync + 'static) -> BackendError {
    BackendError::Failed {
        op,
        source: Box::new(e),
    }
}

fn map_err(op: &'static str, e: NodeError) -> BackendError {
    match e {
        NodeError::NotFound(_) => BackendError::SandboxNotFound,
        NodeError::Image(alcove_image::ImageError::UnknownTemplate(_)) => {
            BackendError::TemplateNotFound
        }
        NodeError::Capacity(_) | NodeError::Busy { .. } => BackendError::NoCapacity,
        NodeError::AgentTimeout(_) => BackendError::Timeout,
        NodeError::SnapshotNotFound(_) => BackendError::SnapshotNotFound,
        NodeError::CorruptSnapshot { detail, .. } => BackendError::CorruptSnapshot { detail },
        NodeError::NotRunning { state, .. } | NodeError::NotPaused { state, .. } => {
            BackendError::WrongState { state }
        }
        NodeError::Transition { source, .. } => BackendError::WrongState {
            state: source.from.to_string(),
        },
        other => failed(op, other),
    }
}

/// The one mapping from the node's state to the API's, used by `list` and `status` alike: a
/// sandbox being created already counts as running (the API hands out its id only once the
/// create returned), a killed one as exited.
fn status_of(state: SandboxState) -> SandboxStatus {
    match state {
        SandboxState::Creating | SandboxState::Running => SandboxStatus::Running,
        SandboxState::Paused { .. } => SandboxStatus::Paused,
        SandboxState::Dead { reason } => SandboxStatus::Exited { reason },
        SandboxState::Killed => SandboxStatus::Exited {
            reason: "killed".into(),
        },
    }
}

/// A UUID-shaped build id from a template key (the SDK parses build ids as UUIDs).
fn build_id(key: &str) -> String {
    let hex: String = key.chars().chain(std::iter::repeat('0')).take(32).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// A cluster node's paused sandboxes, snapshots and templates leave and arrive through the blob store
/// (`alcove_cluster::node::Moves`); the files are the node's.
impl alcove_cluster::node::HostFiles for NodeBackend {
    fn outgoing<'a>(
        &'a self,
        kind: alcove_cluster::blobs::Kind,
        id: &'a str,
    ) -> BoxFuture<'a, Result<alcove_cluster::node::Outgoing, BackendError>> {
        use alcove_cluster::blobs::Kind;
        Box::pin(async move {
            let out = match kind {
                Kind::Paused => self.node.outgoing_paused(id).await,
                Kind::Snapshot => self.node.outgoing_snapshot(id).await,
                Kind::Template => self.node.outgoing_template(id).await,
            }
            .map_err(|e| map_err("list the files that move", e))?;
            Ok(alcove_cluster::node::Outgoing {
                files: out.files,
                scratch: out.scratch,
            })
        })
    }

    fn incoming_dir(
        &self,
        kind: alcove_cluster::blobs::Kind,
        id: &str,
    ) -> Result<Option<std::path::PathBuf>, BackendError> {
        use alcove_cluster::blobs::Kind;
        match kind {
            Kind::Paused => self.node.incoming_dir(id).map(Some),
            Kind::Snapshot => self.node.incoming_snapshot_dir(id),
            Kind::Template => self.node.incoming_template_dir(id),
        }
        .map_err(|e| map_err("take in a sandbox, snapshot or template", e))
    }

    fn adopt<'a>(
        &'a self,
        kind: alcove_cluster::blobs::Kind,
        id: &'a str,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        use alcove_cluster::blobs::Kind;
        Box::pin(async move {
            match kind {
                Kind::Paused => self.node.adopt_paused(id).await,
                Kind::Snapshot => self.node.adopt_snapshot(id).await,
                Kind::Template => self.node.adopt_template(id).await,
            }
            .map_err(|e| map_err("take in a sandbox, snapshot or template", e))
        })
    }
}

impl SandboxBackend for NodeBackend {
    fn templates(&self) -> BoxFuture<'_, Result<Vec<TemplateInfo>, BackendError>> {
        Box::pin(async move {
            Ok(
                alcove_image::build::list_templates(&self.node.config().cache_dir)
                    .into_iter()
                    .map(|t| TemplateInfo {
                        template_id: t.name.clone(),
                        aliases: vec![t.name.clone()],
                        build_id: build_id(&t.key),
                        cpu_count: t.recipe.vcpus,
                        memory_mb: t.recipe.memory_mib,
                        disk_size_mb: t.recipe.disk_mib,
                        envd_version: ENVD_VERSION.to_string(),
                        build_key: Some(t.key.clone()),
                    })
                    .collect(),
            )
        })
    }

    fn build_template(
        &self,
        spec: alcove_api::BuildSpec,
        log: alcove_api::BuildLog,
    ) -> BoxFuture<'_, Result<alcove_api::BuiltTemplate, alcove_api::BuildFailure>> {
        Box::pin(async move { self.node.build_template(spec, log).await })
    }

    fn built_templates(&self) -> BoxFuture<'_, Result<Vec<String>, BackendError>> {
        let node = self.node.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || node.built_templates())
                .await
                .map_err(|e| BackendError::Failed {
                    op: "list built templates",
                    source: Box::new(e),
                })
        })
    }

    fn delete_template<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            self.node
                .delete_template(key)
                .map_err(|e| BackendError::Failed {
                    op: "delete template",
                    source: Box::new(e),
                })
        })
    }

    fn create(&self, req: CreateSandbox) -> BoxFuture<'_, Result<StartedSandbox, BackendError>> {
        Box::pin(async move {
            let opts = CreateOptions {
                template: req.template_id.clone(),
                id: Some(req.sandbox_id.clone()),
                envs: req.env_vars.clone(),
                access_token: req.envd_access_token.clone(),
                network: req.network.clone(),
                snapshot: req.snapshot_id.clone(),
                volume_mounts: req.volume_mounts.clone(),
            };
            let (info, _) = self
                .node
                .create(opts)
                .await
                .map_err(|e| map_err("create sandbox", e))?;
            Ok(StartedSandbox {
                cpu_count: info.vcpus,
                memory_mb: info.memory_mib,
                disk_size_mb: info.disk_mib,
                envd_version: ENVD_VERSION.to_string(),
                started_at: SystemTime::now(),
            })
        })
    }

    fn kill<'a>(&'a self, sandbox_id: &'a str) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            self.node
                .kill(sandbox_id)
                .await
                .map_err(|e| map_err("kill sandbox", e))
        })
    }

    fn host_info(&self) -> Option<alcove_api::backend::HostInfo> {
        let cfg = self.node.config();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mib = |key: &str| {
            meminfo
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
                .map_or(0, |kb| kb / 1024)
        };
        Some(alcove_api::backend::HostInfo {
            accel: cfg.vmm.accel.accel.as_str().to_owned(),
            accel_reason: cfg.vmm.accel.reason.clone(),
            jailed: cfg.vmm.jail.is_some(),
            max_sandboxes: cfg.max_sandboxes,
            sandboxes: self.node.sandbox_count(),
            vcpus_used: self
                .node
                .list()
                .iter()
                .filter(|s| status_of(s.state.clone()) == SandboxStatus::Running)
                .map(|s| s.vcpus)
                .sum(),
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_mib: mib("MemTotal:"),
            memory_available_mib: mib("MemAvailable:"),
        })
    }

    fn warm_pool(&self) -> BoxFuture<'_, Result<Vec<WarmPool>, BackendError>> {
        Box::pin(async move {
            Ok(self
                .node
                .warm_pool()
                .into_iter()
                .map(|p| WarmPool {
                    template_id: p.template,
                    target: p.target,
                    min: p.min,
                    max: p.max,
                    ready: p.ready,
                    hits: p.hits,
                    misses: p.misses,
                    last_error: p.last_error,
                })
                .collect())
        })
    }

    fn network<'a>(
        &'a self,
        sandbox_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<alcove_net::NetworkConfig>, BackendError>> {
        Box::pin(async move {
            self.node
                .network(sandbox_id)
                .map(|(n, _)| Some(n))
                .map_err(|e| map_err("network rules", e))
        })
    }

    fn exec<'a>(
        &'a self,
        sandbox_id: &'a str,
        req: ExecRequest,
    ) -> BoxFuture<'a, Result<ExecOutput, BackendError>> {
        Box::pin(async move {
            let run = alcove_agent_client::RunRequest {
                cmd: req.cmd,
                args: req.args,
                user: Some(req.user),
                timeout: Some(req.timeout),
                output_limit: EXEC_OUTPUT_LIMIT,
                ..Default::default()
            };
            let out = tokio::time::timeout(req.timeout, self.node.run(sandbox_id, run))
                .await
                .map_err(|_| BackendError::Timeout)?
                .map_err(|e| map_err("exec", e))?;
            Ok(ExecOutput {
                exit_code: out.exit_code,
                stdout: out.stdout,
                stderr: out.stderr,
            })
        })
    }

    fn update_network<'a>(
        &'a self,
        sandbox_id: &'a str,
        network: alcove_net::NetworkConfig,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            self.node
                .set_network(sandbox_id, network)
                .map_err(|e| map_err("network update", e))
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<LiveSandbox>, BackendError>> {
        Box::pin(async move {
            Ok(self
                .node
                .list()
                .into_iter()
                .filter_map(|s| match status_of(s.state) {
                    SandboxStatus::Running => Some(LiveSandbox {
                        sandbox_id: s.id,
                        paused: false,
                    }),
                    SandboxStatus::Paused => Some(LiveSandbox {
                        sandbox_id: s.id,
                        paused: true,
                    }),
                    SandboxStatus::Exited { .. } | SandboxStatus::Unknown => None,
                })
                .collect())
        })
    }

    fn status<'a>(
        &'a self,
        sandbox_id: &'a str,
    ) -> BoxFuture<'a, Result<SandboxStatus, BackendError>> {
        Box::pin(async move {
            Ok(match self.node.get(sandbox_id) {
                Err(NodeError::NotFound(_)) => SandboxStatus::Unknown,
                Err(e) => return Err(map_err("sandbox status", e)),
                Ok(info) => status_of(info.state),
            })
        })
    }

    fn metrics<'a>(
        &'a self,
        sandbox_id: &'a str,
    ) -> BoxFuture<'a, Result<Option<ResourceUsage>, BackendError>> {
        Box::pin(async move {
            let info = self
                .node
                .get(sandbox_id)
                .map_err(|e| map_err("sandbox metrics", e))?;
            let agent = self
                .node
                .agent(sandbox_id)
                .await
                .map_err(|e| map_err("sandbox metrics", e))?;
            let v = match guest_metrics(&agent, info.access_token.as_deref()).await {
                Ok(Some(v)) => v,
                Ok(None) => return Ok(None),
                Err(ClientError::Timeout(_)) => return Err(BackendError::Timeout),
                Err(e) => return Err(failed("sandbox metrics", e)),
            };
            let n = |k: &str| v[k].as_u64().unwrap_or(0);
            Ok(Some(ResourceUsage {
                timestamp: SystemTime::now(),
                cpu_count: v["cpu_count"].as_u64().unwrap_or(u64::from(info.vcpus)) as u32,
                cpu_used_pct: v["cpu_used_pct"].as_f64().unwrap_or(0.0),
                mem_used: n("mem_used"),
                mem_total: n("mem_total"),
                mem_cache: n("mem_cache"),
                disk_used: n("disk_used"),
                disk_total: n("disk_total"),
            }))
        })
    }

    fn logs<'a>(
        &'a self,
        sandbox_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<LogLine>, BackendError>> {
        Box::pin(async move {
            let info = self
                .node
                .get(sandbox_id)
                .map_err(|e| map_err("sandbox logs", e))?;
            let mut lines = Vec::new();
            if let Ok(vm) = self.node.vm(sandbox_id) {
                for l in alcove_vmm::Vm::console(&vm)
                    .text()
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                {
                    lines.push(LogLine {
                        timestamp: SystemTime::now(),
                        level: LogLevel::Info,
                        message: l.to_string(),
                    });
                }
            }
            if let SandboxState::Dead { reason } = info.state {
                lines.push(LogLine {
                    timestamp: SystemTime::now(),
                    level: LogLevel::Error,
                    message: reason,
                });
            }
            Ok(lines)
        })
    }

    fn pause<'a>(
        &'a self,
        sandbox_id: &'a str,
        keep: Keep,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            match keep {
                Keep::Memory => self.node.pause(sandbox_id).await,
                Keep::DiskOnly => self.node.pause_disk_only(sandbox_id).await,
            }
            .map(|_| ())
            .map_err(|e| map_err("pause sandbox", e))
        })
    }

    fn resume<'a>(
        &'a self,
        sandbox_id: &'a str,
        from: Keep,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            self.node
                .resume_with(sandbox_id, from == Keep::DiskOnly)
                .await
                .map(|_| ())
                .map_err(|e| map_err("resume sandbox", e))
        })
    }

    fn snapshot<'a>(
        &'a self,
        sandbox_id: &'a str,
        snapshot_id: &'a str,
        keep: Keep,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            self.node
                .snapshot_with(sandbox_id, snapshot_id, keep == Keep::DiskOnly)
                .await
                .map(|_| ())
                .map_err(|e| map_err("snapshot sandbox", e))
        })
    }

    fn delete_snapshot<'a>(
        &'a self,
        snapshot_id: &'a str,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            self.node
                .delete_snapshot(snapshot_id)
                .map_err(|e| map_err("delete snapshot", e))
        })
    }

    fn stored_bytes_each<'a>(
        &'a self,
        sandbox_ids: &'a [String],
        snapshot_ids: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<u64>, BackendError>> {
        let (node, sandboxes, snapshots) = (
            self.node.clone(),
            sandbox_ids.to_vec(),
            snapshot_ids.to_vec(),
        );
        Box::pin(async move {
            // It walks directories: a blocking thread, not the runtime's workers.
            tokio::task::spawn_blocking(move || node.stored_bytes_each(&sandboxes, &snapshots))
                .await
                .map_err(|e| BackendError::Failed {
                    op: "stored bytes",
                    source: Box::new(e),
                })
        })
    }

    fn net_counters<'a>(
        &'a self,
        sandbox_ids: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Option<NetCounters>>, BackendError>> {
        Box::pin(async move {
            Ok(sandbox_ids
                .iter()
                .map(|id| {
                    let (_, stats) = self.node.network(id).ok()?;
                    stats.map(|s| (s.bytes_out, s.bytes_in))
                })
                .collect())
        })
    }

    fn forward<'a>(
        &'a self,
        sandbox_id: &'a str,
        port: u16,
        req: http::Request<Body>,
    ) -> BoxFuture<'a, Result<http::Response<Body>, BackendError>> {
        Box::pin(async move {
            let agent = tokio::time::timeout(FORWARD_CONNECT, self.node.agent(sandbox_id))
                .await
                .map_err(|_| BackendError::Timeout)?
                .map_err(|e| map_err("reach the sandbox agent", e))?;
            if port != ENVD_PORT {
                let resp = self
                    .ports
                    .send(sandbox_id, port, req, PORT_RESPONSE_HEAD)
                    .await
                    .map_err(|e| match e {
                        ClientError::PortNotOpen(_) => BackendError::PortNotOpen,
                        ClientError::Timeout(_) => BackendError::Timeout,
                        e => failed("forward to a sandbox port", e),
                    })?;
                let (parts, body) = resp.into_parts();
                return Ok(http::Response::from_parts(parts, Body::new(body)));
            }
            let (parts, body) = req.into_parts();
            let body: AgentBody = body
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
                .boxed_unsync();
            let resp = agent
                .send(http::Request::from_parts(parts, body))
                .await
                .map_err(|e| failed("forward to the sandbox agent", e))?;
            let (parts, body) = resp.into_parts();
            Ok(http::Response::from_parts(parts, Body::new(body)))
        })
    }
}

/// Largest `/metrics` answer read from a guest: the agent's is a few hundred bytes; root in the
/// guest can answer instead of it, with anything.
const METRICS_LIMIT: usize = 16 << 10;
/// Longest wait for the guest's metrics (head and body).
const METRICS_TIMEOUT: Duration = Duration::from_secs(10);

/// The guest's `/metrics` JSON, bounded in size and time (`ResponseTooLarge`, `Timeout`);
/// None when the answer is not a JSON object.
async fn guest_metrics(
    agent: &alcove_agent_client::AgentClient,
    token: Option<&str>,
) -> Result<Option<serde_json::Value>, ClientError> {
    let (_, body) = tokio::time::timeout(
        METRICS_TIMEOUT,
        agent.get_small("metrics", "/metrics", token, METRICS_LIMIT),
    )
    .await
    .map_err(|_| ClientError::Timeout("metrics"))??;
    Ok(serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .filter(|v| v.is_object()))
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use alcove_agent_client::{AgentClient, ClientError, Timeouts};
    use bytes::Bytes;
    use http_body_util::Full;

    /// An agent whose `/metrics` answers `body` (as root in a guest could).
    async fn agent_answering(body: Vec<u8>) -> AgentClient {
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |_req| {
                let body = body.clone();
                async move { Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(body)))) }
            });
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(hyper_util::rt::TokioIo::new(theirs), svc)
                .await;
        });
        AgentClient::connect(ours, Timeouts::default())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn guest_metrics_are_bounded() {
        let ok = agent_answering(br#"{"cpu_count":2,"mem_used":5}"#.to_vec()).await;
        let v = super::guest_metrics(&ok, Some("t")).await.unwrap().unwrap();
        assert_eq!(v["mem_used"], 5);
        // A guest that answers 64 MiB of JSON padding is refused, not buffered.
        let mut huge = br#"{"pad":""#.to_vec();
        huge.extend(std::iter::repeat_n(b' ', 64 << 20));
        huge.extend(br#""}"#);
        let big = agent_answering(huge).await;
        match super::guest_metrics(&big, None).await {
            Err(ClientError::ResponseTooLarge { limit, .. }) => {
                assert_eq!(limit, super::METRICS_LIMIT)
            }
            other => panic!("expected ResponseTooLarge, got {other:?}"),
        }
        let junk = agent_answering(b"[1,2]".to_vec()).await;
        assert!(super::guest_metrics(&junk, None).await.unwrap().is_none());
    }

    #[test]
    fn build_ids_are_uuid_shaped() {
        let id = super::build_id("56c1315d11e1a92a");
        assert_eq!(id, "56c1315d-11e1-a92a-0000-000000000000");
        assert_eq!(id.len(), 36);
    }
}

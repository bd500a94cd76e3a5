//! The cluster link end to end on loopback: a control plane's [`ClusterBackend`] and its
//! cluster listener, nodes serving in-memory backends over TLS and heartbeating to it. (The
//! nodes' backends are fakes: this tests the link, placement, routing and loss; real VMs behind
//! `alcove node` are tested by tests/cluster/.)

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use alcove_api::backend::{
    BackendError, Body, BoxFuture, CreateSandbox, HostInfo, LiveSandbox, SandboxBackend,
    SandboxStatus, StartedSandbox, TemplateInfo,
};
use alcove_cluster::node::Registration;
use alcove_cluster::{ClusterBackend, ClusterConfig, NodeCert, Token};
use http_body_util::BodyExt;

const TOKEN: &str = "test-cluster-token-0123456789abcdef";

/// One host's backend in memory.
struct Host {
    name: String,
    memory_available_mib: u64,
    sandboxes: Mutex<HashMap<String, bool>>,
    /// Keys of templates built here (`build_template`).
    built: Mutex<Vec<String>>,
}

impl Host {
    fn new(name: &str, mem: u64) -> Arc<Host> {
        Arc::new(Host {
            name: name.into(),
            memory_available_mib: mem,
            sandboxes: Mutex::new(HashMap::new()),
            built: Mutex::new(Vec::new()),
        })
    }
    fn ids(&self) -> Vec<String> {
        let mut v: Vec<String> = self.sandboxes.lock().unwrap().keys().cloned().collect();
        v.sort();
        v
    }
}

impl SandboxBackend for Host {
    fn templates(&self) -> BoxFuture<'_, Result<Vec<TemplateInfo>, BackendError>> {
        Box::pin(async {
            Ok(vec![TemplateInfo {
                template_id: "base".into(),
                aliases: vec![],
                build_id: "00000000-0000-0000-0000-000000000000".into(),
                cpu_count: 1,
                memory_mb: 256,
                disk_size_mb: 1024,
                envd_version: "0.2.0".into(),
                build_key: None,
            }])
        })
    }
    /// A build that logs each step and reads each `COPY` archive from `files_dir` (so the
    /// archives must have arrived); its key is the archives' contents in hex. A `RUN` of
    /// `fail` fails that step.
    fn build_template(
        &self,
        spec: alcove_build_spec::BuildSpec,
        log: alcove_build_spec::BuildLog,
    ) -> BoxFuture<'_, Result<alcove_build_spec::BuiltTemplate, alcove_build_spec::BuildFailure>>
    {
        use alcove_build_spec::{BuildFailure, BuildLogEntry, LogLevel, StepKind, StepRef};
        Box::pin(async move {
            let mut key = String::new();
            for (i, step) in spec.steps.iter().enumerate() {
                let at = StepRef::Step(i as u32 + 1);
                let message = match &step.kind {
                    StepKind::Copy { files_hash, .. } => {
                        let data = std::fs::read(spec.files_dir.join(files_hash)).map_err(|e| {
                            BuildFailure {
                                step: at,
                                message: format!("no archive {files_hash}: {e}"),
                            }
                        })?;
                        key += &hex(&data);
                        format!("copied {} bytes on {}", data.len(), self.name)
                    }
                    StepKind::Run { cmd, .. } if cmd == "fail" => {
                        return Err(BuildFailure {
                            step: at,
                            message: "exit 1".into(),
                        });
                    }
                    other => format!("{other:?}"),
                };
                log(BuildLogEntry {
                    level: LogLevel::Info,
                    step: at,
                    message,
                });
            }
            self.built.lock().unwrap().push(key.clone());
            Ok(alcove_build_spec::BuiltTemplate {
                key,
                vcpus: spec.vcpus,
                memory_mib: spec.memory_mib,
                disk_mib: 1024,
                cached_steps: 0,
                stored_bytes: 1,
            })
        })
    }
    fn built_templates(&self) -> BoxFuture<'_, Result<Vec<String>, BackendError>> {
        Box::pin(async { Ok(self.built.lock().unwrap().clone()) })
    }
    fn delete_template<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            let mut built = self.built.lock().unwrap();
            let n = built.len();
            built.retain(|k| k != key);
            if built.len() == n {
                return Err(BackendError::TemplateNotFound);
            }
            Ok(())
        })
    }
    fn create(&self, req: CreateSandbox) -> BoxFuture<'_, Result<StartedSandbox, BackendError>> {
        Box::pin(async move {
            if req.template_id != "base" && !self.built.lock().unwrap().contains(&req.template_id) {
                return Err(BackendError::TemplateNotFound);
            }
            self.sandboxes
                .lock()
                .unwrap()
                .insert(req.sandbox_id.clone(), false);
            Ok(StartedSandbox {
                cpu_count: req.cpu_count,
                memory_mb: req.memory_mb,
                disk_size_mb: 1024,
                envd_version: "0.2.0".into(),
                started_at: SystemTime::now(),
            })
        })
    }
    fn kill<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            self.sandboxes
                .lock()
                .unwrap()
                .remove(id)
                .map(|_| ())
                .ok_or(BackendError::SandboxNotFound)
        })
    }
    fn list(&self) -> BoxFuture<'_, Result<Vec<LiveSandbox>, BackendError>> {
        Box::pin(async {
            Ok(self
                .sandboxes
                .lock()
                .unwrap()
                .iter()
                .map(|(id, p)| LiveSandbox {
                    sandbox_id: id.clone(),
                    paused: *p,
                })
                .collect())
        })
    }
    fn status<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<SandboxStatus, BackendError>> {
        Box::pin(async move {
            Ok(match self.sandboxes.lock().unwrap().get(id) {
                Some(false) => SandboxStatus::Running,
                Some(true) => SandboxStatus::Paused,
                None => SandboxStatus::Unknown,
            })
        })
    }
    fn metrics<'a>(
        &'a self,
        _id: &'a str,
    ) -> BoxFuture<'a, Result<Option<alcove_api::backend::ResourceUsage>, BackendError>> {
        Box::pin(async { Ok(None) })
    }
    fn pause<'a>(
        &'a self,
        id: &'a str,
        _keep: alcove_api::backend::Keep,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            let mut s = self.sandboxes.lock().unwrap();
            match s.get_mut(id) {
                Some(p) if !*p => {
                    *p = true;
                    Ok(())
                }
                Some(_) => Err(BackendError::WrongState {
                    state: "paused".into(),
                }),
                None => Err(BackendError::SandboxNotFound),
            }
        })
    }
    fn host_info(&self) -> Option<HostInfo> {
        Some(HostInfo {
            accel: "tcg".into(),
            accel_reason: "test".into(),
            jailed: true,
            max_sandboxes: 100,
            sandboxes: self.sandboxes.lock().unwrap().len(),
            vcpus_used: 0,
            cpus: 2,
            memory_mib: 8192,
            memory_available_mib: self.memory_available_mib,
        })
    }
    /// Echoes the request (which host, sandbox, port, method, path, body); an upgrade is
    /// accepted with 101 and echoes bytes back.
    fn forward<'a>(
        &'a self,
        id: &'a str,
        port: u16,
        mut req: http::Request<Body>,
    ) -> BoxFuture<'a, Result<http::Response<Body>, BackendError>> {
        Box::pin(async move {
            if !self.sandboxes.lock().unwrap().contains_key(id) {
                return Err(BackendError::SandboxNotFound);
            }
            if port == 1 {
                return Err(BackendError::PortNotOpen);
            }
            if req.headers().contains_key(http::header::UPGRADE) {
                let on = hyper::upgrade::on(&mut req);
                tokio::spawn(async move {
                    if let Ok(up) = on.await {
                        let io = hyper_util::rt::TokioIo::new(up);
                        let (mut r, mut w) = tokio::io::split(io);
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                    }
                });
                return Ok(http::Response::builder()
                    .status(101)
                    .header("connection", "upgrade")
                    .header("upgrade", "echo")
                    .body(Body::empty())
                    .unwrap());
            }
            let (parts, body) = req.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            let key = parts
                .headers
                .contains_key(alcove_cluster::link::CONTROL_KEY_HEADER);
            let text = format!(
                "{} {id} {port} {} {} {} control-key-seen={key}",
                self.name,
                parts.method,
                parts.uri,
                String::from_utf8_lossy(&body)
            );
            Ok(http::Response::new(Body::from(text)))
        })
    }
}

struct RunningNode {
    host: Arc<Host>,
    heartbeat: tokio::task::JoinHandle<()>,
    reg: Registration,
    backend: Arc<dyn SandboxBackend>,
}

impl RunningNode {
    fn restart_heartbeats(&mut self) {
        self.heartbeat = tokio::spawn(alcove_cluster::node::heartbeats(
            Arc::clone(&self.backend),
            self.reg.clone(),
            alcove_cluster::node::heartbeat_client(&self.reg.server, None).unwrap(),
            Duration::from_millis(100),
        ));
    }
}

async fn start_node(
    name: &str,
    mem: u64,
    server: &str,
    dir: &std::path::Path,
    token: &str,
) -> RunningNode {
    let host = Host::new(name, mem);
    let backend: Arc<dyn SandboxBackend> = host.clone();
    let cert = NodeCert::load_or_create(&dir.join(name), name).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = alcove_cluster::node::router(
        Arc::clone(&backend),
        Token::new(token),
        None,
        Default::default(),
        dir.join(name).join("build-files"),
    );
    let fp = cert.fingerprint();
    tokio::spawn(async move {
        alcove_cluster::node::serve(listener, &cert, app, std::future::pending())
            .await
            .unwrap();
    });
    let reg = Registration {
        node_id: name.into(),
        url: format!("https://{addr}"),
        cert_sha256: fp,
        server: server.into(),
        token: Token::new(token),
        draining: Arc::new(AtomicBool::new(false)),
    };
    let mut n = RunningNode {
        host,
        heartbeat: tokio::spawn(async {}),
        reg,
        backend,
    };
    n.restart_heartbeats();
    n
}

async fn control_plane() -> (Arc<ClusterBackend>, String) {
    control_plane_with(None, None).await
}

async fn control_plane_with(
    secrets: Option<Arc<dyn alcove_net::secrets::SecretSource>>,
    egress: Option<tokio::sync::mpsc::Sender<alcove_net::EgressEvent>>,
) -> (Arc<ClusterBackend>, String) {
    let mut cfg = ClusterConfig::new(Token::new(TOKEN));
    cfg.secrets = secrets;
    cfg.egress = egress;
    cfg.heartbeat_interval = Duration::from_millis(100);
    cfg.lost_after = Duration::from_millis(600);
    let cluster = Arc::new(ClusterBackend::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = Arc::clone(&cluster).router();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (cluster, url)
}

fn create_req(id: &str) -> CreateSandbox {
    CreateSandbox {
        sandbox_id: id.into(),
        template_id: "base".into(),
        env_vars: Default::default(),
        metadata: Default::default(),
        envd_access_token: None,
        allow_internet_access: None,
        network: alcove_net::NetworkConfig {
            allow_internet_access: true,
            allow_out: vec![],
            deny_out: vec![],
            rules: Default::default(),
        },
        cpu_count: 1,
        memory_mb: 512,
        snapshot_id: None,
        volume_mounts: vec![],
    }
}

async fn text(resp: http::Response<Body>) -> String {
    String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_are_placed_routed_and_carried_and_a_silent_node_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, url) = control_plane().await;
    let a = start_node("node-a", 6000, &url, dir.path(), TOKEN).await;
    let mut b = start_node("node-b", 4000, &url, dir.path(), TOKEN).await;

    // Templates come from the nodes' reports.
    let t = cluster.templates().await.unwrap();
    assert_eq!(t.len(), 1);
    assert_eq!(cluster.node_list().len(), 2);

    // Spread: the first create goes to the node with more free memory; each decision debits
    // it, so creates alternate once a's lead is used up (512 MiB each).
    for i in 0..6 {
        cluster.create(create_req(&format!("sb{i}"))).await.unwrap();
    }
    assert!(
        a.host.ids().contains(&"sb0".to_owned()),
        "{:?}",
        a.host.ids()
    );
    assert!(!a.host.ids().is_empty() && !b.host.ids().is_empty());
    assert_eq!(a.host.ids().len() + b.host.ids().len(), 6);

    // Calls reach the node that has the sandbox, errors keep their meaning.
    let on_b = b.host.ids()[0].clone();
    assert_eq!(cluster.status(&on_b).await.unwrap(), SandboxStatus::Running);
    cluster
        .pause(&on_b, alcove_api::backend::Keep::Memory)
        .await
        .unwrap();
    assert!(matches!(
        cluster.pause(&on_b, alcove_api::backend::Keep::Memory).await,
        Err(BackendError::WrongState { state }) if state == "paused"
    ));
    assert_eq!(cluster.status(&on_b).await.unwrap(), SandboxStatus::Paused);
    assert_eq!(
        cluster.status("nobody").await.unwrap(),
        SandboxStatus::Unknown
    );
    let mut bad = create_req("sbx");
    bad.template_id = "nope".into();
    assert!(matches!(
        cluster.create(bad).await,
        Err(BackendError::TemplateNotFound)
    ));

    // Sandbox traffic goes over the link with its body, and the link's key stays on the link.
    let on_a = a.host.ids()[0].clone();
    let req = http::Request::post("/process.Process/Start?x=1")
        .body(Body::from("hello"))
        .unwrap();
    let resp = cluster.forward(&on_a, 49983, req).await.unwrap();
    assert_eq!(
        text(resp).await,
        format!("node-a {on_a} 49983 POST /process.Process/Start?x=1 hello control-key-seen=false")
    );
    let req = http::Request::get("/").body(Body::empty()).unwrap();
    assert!(matches!(
        cluster.forward(&on_a, 1, req).await,
        Err(BackendError::PortNotOpen)
    ));

    // A silent node: its sandboxes leave the list and report why; the other node's stay.
    b.heartbeat.abort();
    tokio::time::sleep(Duration::from_millis(900)).await;
    let listed: Vec<String> = cluster
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.sandbox_id)
        .collect();
    for id in b.host.ids() {
        assert!(!listed.contains(&id));
        match cluster.status(&id).await.unwrap() {
            SandboxStatus::Exited { reason } => {
                assert!(
                    reason.contains("node-b stopped sending heartbeats"),
                    "{reason}"
                )
            }
            s => panic!("{s:?}"),
        }
    }
    for id in a.host.ids() {
        assert!(listed.contains(&id));
    }
    // New creates go to the node that is up.
    cluster.create(create_req("after")).await.unwrap();
    assert!(a.host.ids().contains(&"after".to_owned()));

    // Back again: told to kill what was reported lost.
    b.restart_heartbeats();
    for _ in 0..50 {
        if b.host.ids().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(b.host.ids().is_empty(), "{:?}", b.host.ids());
    assert!(cluster.node_list().iter().all(|n| n.up));

    // Both silent: a create has nowhere to go, and says so (the API answers 503
    // `no_node_available`, not a 500).
    a.heartbeat.abort();
    b.heartbeat.abort();
    tokio::time::sleep(Duration::from_millis(900)).await;
    match cluster.create(create_req("nowhere")).await {
        Err(BackendError::Unavailable { reason }) => {
            assert!(reason.contains("alcove node"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

fn build_spec(
    from: &str,
    steps: Vec<alcove_build_spec::StepKind>,
    files_dir: &std::path::Path,
) -> alcove_build_spec::BuildSpec {
    alcove_build_spec::BuildSpec {
        build_id: "b1".into(),
        name: "app".into(),
        from: alcove_build_spec::BuildFrom::Template(from.into()),
        steps: steps
            .into_iter()
            .map(|kind| alcove_build_spec::Step { kind, force: false })
            .collect(),
        start_cmd: None,
        ready_cmd: None,
        vcpus: 1,
        memory_mib: 512,
        force: false,
        files_dir: files_dir.into(),
        network: create_req("x").network,
        deadline: Duration::from_secs(60),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_run_on_a_node_with_their_files_and_sandboxes_follow_the_template() {
    use alcove_build_spec::{StepKind, StepRef};
    let dir = tempfile::tempdir().unwrap();
    let (cluster, url) = control_plane().await;
    let a = start_node("node-a", 6000, &url, dir.path(), TOKEN).await;
    let b = start_node("node-b", 4000, &url, dir.path(), TOKEN).await;
    // The control plane's uploads: one archive, used by two COPY steps.
    let uploads = dir.path().join("uploads");
    std::fs::create_dir_all(&uploads).unwrap();
    std::fs::write(uploads.join("ab12"), b"archive").unwrap();
    let copy = || StepKind::Copy {
        files_hash: "ab12".into(),
        src: ".".into(),
        dest: "/app/".into(),
        owner: None,
        mode: None,
    };
    let lines = Arc::new(Mutex::new(Vec::new()));
    let log: alcove_build_spec::BuildLog = {
        let lines = Arc::clone(&lines);
        Arc::new(move |e| lines.lock().unwrap().push(e))
    };
    let spec = build_spec(
        "base",
        vec![
            copy(),
            StepKind::Run {
                cmd: "make".into(),
                user: None,
            },
            copy(),
        ],
        &uploads,
    );
    let built = cluster.build_template(spec, log).await.unwrap();
    assert_eq!(built.key, hex(b"archive").repeat(2));
    // Spread: the node with more free memory built it, with the archive beside it.
    assert_eq!(*a.host.built.lock().unwrap(), vec![built.key.clone()]);
    assert!(b.host.built.lock().unwrap().is_empty());
    // Its archives (read by the build: the key is made of them) went with the build.
    assert!(!dir.path().join("node-a/build-files/b1").exists());
    let lines = lines.lock().unwrap().clone();
    let messages: Vec<&str> = lines.iter().map(|l| l.message.as_str()).collect();
    assert_eq!(messages[0], "Building on cluster node node-a");
    assert_eq!(messages[1], "copied 7 bytes on node-a");
    assert_eq!(lines[3].step, StepRef::Step(3));
    assert_eq!(lines.len(), 4);

    // Sandboxes of the built template go to the node that has it, although b has room too.
    for i in 0..3 {
        let mut req = create_req(&format!("app{i}"));
        req.template_id = built.key.clone();
        cluster.create(req).await.unwrap();
    }
    assert_eq!(a.host.ids(), ["app0", "app1", "app2"]);
    // So does a build from it (and its node's next heartbeat also lists it).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let from_built = build_spec(&built.key, vec![], &uploads);
    let noop: alcove_build_spec::BuildLog = Arc::new(|_| {});
    cluster
        .build_template(from_built, noop.clone())
        .await
        .unwrap();
    assert_eq!(a.host.built.lock().unwrap().len(), 2);

    // A failed step comes back as that step's failure; a missing archive as its COPY's.
    let failing = build_spec(
        "base",
        vec![StepKind::Run {
            cmd: "fail".into(),
            user: None,
        }],
        &uploads,
    );
    let f = cluster
        .build_template(failing, noop.clone())
        .await
        .unwrap_err();
    assert_eq!((f.step, f.message.as_str()), (StepRef::Step(1), "exit 1"));
    let mut missing = build_spec(
        "base",
        vec![
            StepKind::Run {
                cmd: "x".into(),
                user: None,
            },
            copy(),
        ],
        &uploads,
    );
    missing.steps[1].kind = StepKind::Copy {
        files_hash: "cd34".into(),
        src: ".".into(),
        dest: "/".into(),
        owner: None,
        mode: None,
    };
    let f = cluster
        .build_template(missing, noop.clone())
        .await
        .unwrap_err();
    assert_eq!(f.step, StepRef::Step(2));
    assert!(f.message.contains("sending its files"), "{}", f.message);
    // No node has the parent.
    let f = cluster
        .build_template(build_spec("nope", vec![], &uploads), noop.clone())
        .await
        .unwrap_err();
    assert_eq!(f.step, StepRef::Base);
    assert!(f.message.contains("no cluster node"), "{}", f.message);

    // Each build reads its own archives: another build's upload under the same files hash
    // (which the uploader names, unchecked) never reaches it.
    std::fs::write(uploads.join("ab12"), b"other").unwrap();
    let mut other = build_spec("base", vec![copy()], &uploads);
    other.build_id = "b2".into();
    let (a_built, b_built) = tokio::join!(cluster.build_template(other, noop.clone()), async {
        std::fs::write(dir.path().join("u2"), b"archive").unwrap();
        let mut again = build_spec("base", vec![copy()], &dir.path().join("u2d"));
        std::fs::create_dir_all(dir.path().join("u2d")).unwrap();
        std::fs::rename(dir.path().join("u2"), dir.path().join("u2d/ab12")).unwrap();
        again.build_id = "b3".into();
        cluster.build_template(again, noop.clone()).await
    });
    assert_eq!(a_built.unwrap().key, hex(b"other"));
    assert_eq!(b_built.unwrap().key, hex(b"archive"));
    // A build id names a directory: only a UUID's characters.
    let mut bad = build_spec("base", vec![copy()], &uploads);
    bad.build_id = "../x".into();
    let f = cluster.build_template(bad, noop).await.unwrap_err();
    assert!(f.message.contains("UUID"), "{}", f.message);

    // Deleted: gone from its node, and no new sandbox is made from it.
    cluster.delete_template(&built.key).await.unwrap();
    assert!(!a.host.built.lock().unwrap().contains(&built.key));
    let mut req = create_req("app9");
    req.template_id = built.key.clone();
    assert!(matches!(
        cluster.create(req).await,
        Err(BackendError::TemplateNotFound)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_are_joined_through_the_link() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let (cluster, url) = control_plane().await;
    let _a = start_node("node-a", 6000, &url, dir.path(), TOKEN).await;
    cluster.create(create_req("ws")).await.unwrap();

    // A client connection whose request the control plane forwards, as the API's proxy does:
    // a hyper server hands the handler the request with its `OnUpgrade`.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let c = Arc::clone(&cluster);
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            let c = Arc::clone(&c);
            async move {
                let (parts, body) = req.into_parts();
                let req = http::Request::from_parts(parts, Body::new(body));
                c.forward("ws", 8080, req).await.map_err(|e| e.to_string())
            }
        });
        hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
            .with_upgrades()
            .await
            .unwrap();
    });
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        s.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(String::from_utf8_lossy(&head).starts_with("HTTP/1.1 101"));
    s.write_all(b"ping through two hops").await.unwrap();
    let mut back = [0u8; 21];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"ping through two hops");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_are_refused_on_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, url) = control_plane().await;
    // A node with another token: its heartbeats are refused, so it never joins.
    let _wrong = start_node(
        "intruder",
        6000,
        &url,
        dir.path(),
        "another-token-0123456789abcdef0123",
    )
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(cluster.node_list().is_empty());

    // A node's link refuses calls without the control plane's key.
    let a = start_node("node-a", 6000, &url, dir.path(), TOKEN).await;
    let tls = alcove_cluster::link::pinned_client_config(&a.reg.cert_sha256).unwrap();
    let http = {
        let mut h = hyper_util::client::legacy::connect::HttpConnector::new();
        h.enforce_http(false);
        h
    };
    let conn = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .wrap_connector(http);
    let client: hyper_util::client::legacy::Client<_, Body> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(conn);
    let req = http::Request::post(format!("{}/node/v1/call", a.reg.url))
        .body(Body::from(r#"{"call":"list"}"#))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 401);

    // Another certificate cannot take the name of a node that is up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut hb = alcove_cluster::wire::Heartbeat {
        node_id: "node-a".into(),
        url: "https://127.0.0.1:1".into(),
        cert_sha256: "00".repeat(32),
        host: a.host.host_info().unwrap(),
        templates: vec![],
        warm: vec![],
        draining: false,
        sandboxes: vec![],
        built: vec![],
    };
    let (status, msg) = cluster.heartbeat(hb.clone()).unwrap_err();
    assert_eq!(status, 409);
    assert!(msg.contains("--node-id"), "{msg}");
    hb.url = "http://127.0.0.1:1".into();
    assert_eq!(cluster.heartbeat(hb).unwrap_err().0, 400);
}

/// Secret `key` of every sandbox's team: `value-of-<sandbox>`; no other name exists.
struct Store;

impl alcove_net::secrets::SecretSource for Store {
    fn resolve<'a>(
        &'a self,
        sandbox_id: &'a str,
        name: &'a str,
    ) -> alcove_net::secrets::Resolving<'a> {
        Box::pin(async move {
            match name {
                "key" => Ok(zeroize::Zeroizing::new(
                    format!("value-of-{sandbox_id}").into_bytes(),
                )),
                _ => Err(alcove_net::secrets::SecretLookupError::NotFound(
                    name.into(),
                )),
            }
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_gets_secrets_and_reports_egress_only_for_its_own_sandboxes() {
    use alcove_net::secrets::{SecretLookupError, SecretSource};
    let dir = tempfile::tempdir().unwrap();
    let (egress_tx, mut egress_rx) = tokio::sync::mpsc::channel(100);
    let (cluster, url) = control_plane_with(Some(Arc::new(Store)), Some(egress_tx)).await;
    let a = start_node("node-a", 6000, &url, dir.path(), TOKEN).await;
    let b = start_node("node-b", 4000, &url, dir.path(), TOKEN).await;
    cluster.create(create_req("sb1")).await.unwrap();
    let (mine, other) = if a.host.ids().contains(&"sb1".to_owned()) {
        ("node-a", "node-b")
    } else {
        assert!(b.host.ids().contains(&"sb1".to_owned()));
        ("node-b", "node-a")
    };
    let asker = |node: &str, token: &str| {
        alcove_cluster::node::ControlPlaneSecrets::new(
            node.into(),
            Token::new(token),
            vec![(
                url.clone(),
                alcove_cluster::node::heartbeat_client(&url, None).unwrap(),
            )],
        )
    };
    let v = asker(mine, TOKEN).resolve("sb1", "key").await.unwrap();
    assert_eq!(&v[..], b"value-of-sb1");
    assert!(matches!(
        asker(mine, TOKEN).resolve("sb1", "other").await,
        Err(SecretLookupError::NotFound(_))
    ));
    // Another node, a sandbox nobody runs, another token: nothing.
    for (node, sandbox, token, says) in [
        (other, "sb1", TOKEN, "is not on node"),
        (mine, "sb-unknown", TOKEN, "is not on node"),
        (mine, "sb1", "another-token-0123456789abcdef0123", "401"),
    ] {
        match asker(node, token).resolve(sandbox, "key").await {
            Err(SecretLookupError::Unavailable(why)) => assert!(why.contains(says), "{why}"),
            r => panic!("{node} {sandbox}: {r:?}"),
        }
    }

    // Egress events: a node's of its own sandboxes reach the audit writer, no others.
    let event = |sandbox: &str| alcove_net::EgressEvent {
        sandbox_id: sandbox.into(),
        at_ms: 1,
        dst: "198.51.100.7:443".parse().unwrap(),
        name: Some("a.test".into()),
        allowed: true,
        verdict: "allowed".into(),
        bytes_out: 10,
        bytes_in: 20,
        duration_ms: 3,
    };
    for (node, token) in [
        (mine, TOKEN),
        (other, TOKEN),
        (mine, "another-token-0123456789abcdef0123"),
    ] {
        let (tx, rx) = tokio::sync::mpsc::channel(10);
        let client = alcove_cluster::node::heartbeat_client(&url, None).unwrap();
        let fwd = tokio::spawn(alcove_cluster::node::forward_egress(
            rx,
            node.into(),
            Token::new(token),
            vec![(url.clone(), client)],
        ));
        tx.send(event("sb1")).await.unwrap();
        tx.send(event("sb-unknown")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        drop(tx);
        fwd.abort();
    }
    let got = egress_rx.try_recv().unwrap();
    assert_eq!(got, event("sb1"));
    assert!(
        egress_rx.try_recv().is_err(),
        "only the node's own sandbox's event"
    );
}

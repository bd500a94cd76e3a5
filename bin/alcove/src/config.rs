//! The `alcove` binary's configuration: [`ServerOptions`] (every flag and env var of
//! `alcove server`), [`Global`] (the node commands'), and how they become library configuration.
//!
//! Defaults are written once: a limit the API enforces takes its default from
//! [`Limits::default`], the rest are constants here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use alcove_api::{ConnectionLimits, Limits};
use alcove_vmm::{Accel, AccelChoice, QemuVmm};

/// Where `alcove server` listens unless told otherwise; the client commands look there.
macro_rules! default_listen {
    () => {
        "127.0.0.1:3000"
    };
}
pub const DEFAULT_LISTEN: &str = default_listen!();
pub const DEFAULT_API_URL: &str = concat!("http://", default_listen!());
/// Sandboxes one host runs at once, at most, where the host's memory is unknown (the node
/// commands; the server derives its default from RAM, [`max_vms_for_ram`]).
pub const DEFAULT_MAX_VMS: usize = 1000;
/// Memory of a template that does not set its own (`alcove-image`'s recipe default), MiB.
pub const DEFAULT_SANDBOX_MIB: u64 = 512;
/// Per-VM cost beyond guest RAM (QEMU, page tables, the agent channel), MiB.
pub const VM_OVERHEAD_MIB: u64 = 64;
/// Host memory kept for the host (the server, page cache, the warm pool's bookkeeping), MiB.
pub const HOST_RESERVE_MIB: u64 = 1024;

/// The default `--max-vms`: as many default-sized sandboxes as fit in the host's total memory
/// once the host's reserve is set aside, every VM counted at its full RAM plus overhead:
/// `max(1, (MemTotal - 1 GiB) / (512 MiB + 64 MiB))`. Guest RAM is mapped copy-on-write from
/// the template, so idle sandboxes use less; this bounds the worst case, all of them touching
/// all of their memory.
pub fn max_vms_for_ram(mem_total_kib: u64) -> usize {
    let mib = mem_total_kib / 1024;
    (mib.saturating_sub(HOST_RESERVE_MIB) / (DEFAULT_SANDBOX_MIB + VM_OVERHEAD_MIB)).max(1) as usize
}

/// `MemTotal` of /proc/meminfo in KiB.
fn mem_total_kib(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The server's default `--max-vms` on this host ([`DEFAULT_MAX_VMS`] when /proc/meminfo
/// cannot be read).
pub fn default_max_vms() -> usize {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .as_deref()
        .and_then(mem_total_kib)
        .map(max_vms_for_ram)
        .unwrap_or(DEFAULT_MAX_VMS)
}

/// A byte count: a number with an optional K, M, G or T suffix (powers of 1024, `B`/`iB`
/// allowed after it), e.g. `50G`, `512MiB`, `1073741824`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 30),
        Some('T' | 't') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| format!("`{s}` is not a byte count (e.g. 50G, 512M, 1073741824)"))
}

/// `--paused-retention`: `None` keeps paused sandboxes until they are killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention(pub Option<Duration>);

/// A duration such as `30d`, `12h` or `90m`; `0` or `never` keeps paused sandboxes forever.
pub fn parse_retention(s: &str) -> Result<Retention, String> {
    match s.trim() {
        "0" | "never" => Ok(Retention(None)),
        t => humantime::parse_duration(t)
            .map(|d| Retention(Some(d)))
            .map_err(|e| format!("`{s}`: {e} (e.g. 30d, 12h, never)")),
    }
}
/// The warm pool's sizes per template (see docs/ARCHITECTURE.md, "Warm pool").
/// Ranges: each pool grows with recent creates and shrinks back when they stop.
pub const DEFAULT_WARM_POOL: &str = "base=2..8,code-interpreter-v1=1..4";

/// `$ALCOVE_DATA_DIR` (through clap), else `$XDG_DATA_HOME/alcove`, else `~/.local/share/alcove`.
pub fn default_data_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(d).join("alcove");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/var/lib".into());
    PathBuf::from(home).join(".local/share/alcove")
}

/// `alcove server`: the API (listener, data, limits) and the host it runs sandboxes on.
#[derive(clap::Args, Clone)]
pub struct ServerOptions {
    /// Address for the API and sandbox traffic.
    #[arg(long, env = "ALCOVE_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Domain for `<port>-<sandboxID>.<domain>` routing (default `localhost:<port>`).
    #[arg(long, env = "ALCOVE_DOMAIN")]
    pub domain: Option<String>,
    /// The store: postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE for a cluster's control
    /// planes (several replicas share one), or sqlite:PATH. Default: DATA_DIR/alcove.db.
    /// Prefer the environment variable: a password on the command line shows in `ps`.
    #[arg(long, env = "ALCOVE_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Serve HTTPS with this certificate (PEM: a wildcard for *.DOMAIN first, then its chain),
    /// so the SDKs' https:// links work; `alcove tls init` makes one. Needs --tls-key.
    #[arg(long, env = "ALCOVE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, env = "ALCOVE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Lifetime in seconds of a sandbox created without a timeout.
    #[arg(long, default_value_t = Limits::default().default_timeout.as_secs())]
    pub default_timeout: u64,
    /// Longest lifetime in seconds a sandbox may ask for.
    #[arg(long, default_value_t = Limits::default().max_timeout.as_secs())]
    pub max_timeout: u64,
    /// Sandboxes one team may run at once.
    #[arg(long, visible_alias = "team-max-running", default_value_t = Limits::default().max_concurrent_sandboxes)]
    pub max_sandboxes: usize,
    /// Paused sandboxes one team may keep.
    #[arg(long, env = "ALCOVE_TEAM_MAX_PAUSED", default_value_t = Limits::default().max_paused_sandboxes)]
    pub team_max_paused: usize,
    /// Snapshots one team may keep.
    #[arg(long, env = "ALCOVE_TEAM_MAX_SNAPSHOTS", default_value_t = Limits::default().max_snapshots)]
    pub team_max_snapshots: usize,
    /// Bytes one team's paused sandboxes and snapshots may hold on disk (e.g. 100G).
    #[arg(long, env = "ALCOVE_TEAM_MAX_STORED", value_parser = parse_bytes, default_value_t = Limits::default().max_stored_bytes)]
    pub team_max_stored: u64,
    /// Templates one team may own (built through the API).
    #[arg(long, env = "ALCOVE_TEAM_MAX_TEMPLATES", default_value_t = Limits::default().max_templates)]
    pub team_max_templates: usize,
    /// Bytes one team's built templates may hold on disk (e.g. 50G).
    #[arg(long, env = "ALCOVE_TEAM_MAX_TEMPLATE_STORAGE", value_parser = parse_bytes, default_value_t = Limits::default().max_template_bytes)]
    pub team_max_template_storage: u64,
    /// Largest template file upload (a build's `COPY` archive, e.g. 1G).
    #[arg(long, env = "ALCOVE_MAX_TEMPLATE_UPLOAD", value_parser = parse_bytes, default_value_t = Limits::default().max_upload_bytes)]
    pub max_template_upload: u64,
    /// Longest a template build may take (e.g. 30m).
    #[arg(long, env = "ALCOVE_BUILD_TIMEOUT", value_parser = humantime::parse_duration, default_value = "30m")]
    pub build_timeout: Duration,
    /// Paused sandboxes older than this are deleted with their saved state (`never`: kept).
    #[arg(long, env = "ALCOVE_PAUSED_RETENTION", value_parser = parse_retention, default_value = "30d")]
    pub paused_retention: Retention,
    /// Largest REST request body in bytes (sandbox traffic is not capped).
    #[arg(long, default_value_t = Limits::default().max_body_bytes)]
    pub max_body_bytes: usize,
    /// Connections served at once; more are answered 503 and closed.
    #[arg(long, default_value_t = ConnectionLimits::default().max_connections)]
    pub max_connections: usize,
    /// Seconds a client may take to send a request's headers (also closes idle keep-alives).
    #[arg(long, default_value_t = ConnectionLimits::default().header_read_timeout.as_secs())]
    pub header_read_timeout: u64,
    /// Proxied sandbox requests open at once, all sandboxes together; more get 429.
    #[arg(long, default_value_t = ConnectionLimits::default().max_proxied_streams)]
    pub max_proxied_streams: usize,
    /// Proxied requests open at once to one sandbox; more get 429.
    #[arg(long, default_value_t = ConnectionLimits::default().max_proxied_streams_per_sandbox)]
    pub max_proxied_streams_per_sandbox: usize,
    /// How often usage is metered and spend caps checked (e.g. 60s). State changes are
    /// metered when they happen whatever this is.
    #[arg(long, env = "ALCOVE_METER_INTERVAL", value_parser = humantime::parse_duration, default_value = "60s")]
    pub meter_interval: Duration,
    /// How often every running sandbox's CPU, memory and disk are sampled into its metrics
    /// history (GET /sandboxes/{id}/metrics?start&end); 0s: only when asked for.
    #[arg(long, env = "ALCOVE_METRICS_INTERVAL", value_parser = humantime::parse_duration, default_value = "5s")]
    pub metrics_interval: Duration,
    /// Audit records (API calls, state changes, processes, files) older than this are deleted
    /// (`never`: kept).
    #[arg(long, env = "ALCOVE_AUDIT_RETENTION", value_parser = parse_retention, default_value = "90d")]
    pub audit_retention: Retention,
    /// Do not trace sandbox traffic (processes, file operations, transfers) into the audit
    /// log; API calls, state changes and egress connections are still recorded.
    #[arg(long)]
    pub no_run_traces: bool,
    /// Export spans (API calls, processes, file operations, egress) by OTLP/HTTP protobuf to
    /// this URL (e.g. http://collector:4318/v1/traces).
    #[arg(long, env = "ALCOVE_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// TOML file of prices in USD: vcpu_second, memory_gib_second, storage_gib_hour, egress_gib
    /// (default: E2B's public list prices; see docs/metering.md).
    #[arg(long, env = "ALCOVE_PRICES")]
    pub prices: Option<PathBuf>,
    /// URL spend warnings are POSTed to, signed with --webhook-secret (X-Alcove-Signature).
    #[arg(long, env = "ALCOVE_WEBHOOK_URL", requires = "webhook_secret")]
    pub webhook_url: Option<String>,
    /// The HMAC-SHA256 key of webhook signatures.
    #[arg(long, env = "ALCOVE_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// This host's sandboxes: where they live, what they may use (also `alcove node`'s).
    #[command(flatten)]
    pub host: HostOptions,
    /// Run as a cluster's control plane (`docs/cluster.md`).
    #[command(flatten)]
    pub cluster: ClusterOptions,
}

/// `alcove server` as a cluster's control plane (`docs/cluster.md`).
#[derive(clap::Args, Clone, Debug)]
pub struct ClusterOptions {
    /// Run as a cluster's control plane, with no sandboxes on this host: `alcove node`s
    /// register on this address (signed heartbeats) and run them, e.g. 0.0.0.0:7070. Served
    /// over TLS with --tls-cert/--tls-key when given (nodes need https:// off loopback).
    #[arg(long, env = "ALCOVE_CLUSTER_LISTEN")]
    pub cluster_listen: Option<SocketAddr>,
    /// The cluster token: a file with the same secret on the control plane and every node
    /// (default `<data-dir>/cluster.token`, made on the first cluster start).
    #[arg(long, env = "ALCOVE_CLUSTER_TOKEN_FILE")]
    pub cluster_token_file: Option<PathBuf>,
    /// Among nodes that can take a sandbox: `spread` (most free memory first) or `pack`
    /// (fullest that fits first, keeping whole nodes free).
    #[arg(long, env = "ALCOVE_PLACEMENT", default_value = "spread", value_parser = ["spread", "pack"])]
    pub placement: String,
    /// Where paused sandboxes and kept snapshots are copied so that another node can resume
    /// or make sandboxes from them (a drained or lost node's): `file:///shared/dir` or
    /// `s3://bucket[/prefix]` (with the AWS_* variables: AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT for an S3-compatible store), the same for
    /// the control plane and every node.
    #[arg(long, env = "ALCOVE_BLOB_STORE")]
    pub blob_store: Option<String>,
}

/// `alcove node`: this host's sandboxes for a cluster's control plane.
#[derive(clap::Args, Clone)]
pub struct NodeOptions {
    /// The control plane's cluster listener (its --cluster-listen), e.g. https://cp:7070.
    /// Several control-plane replicas: repeat it, or separate them with commas; each gets the
    /// heartbeats. Plain http is accepted only to a loopback address. Required to run a node.
    #[arg(long, env = "ALCOVE_SERVER", value_delimiter = ',')]
    pub server: Vec<String>,
    /// The cluster token file (a copy of the control plane's `cluster.token`). Required to run
    /// a node.
    #[arg(long, env = "ALCOVE_CLUSTER_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Address of this node's link listener (TLS): the control plane's calls and sandbox
    /// traffic come in there.
    #[arg(long, env = "ALCOVE_NODE_LISTEN", default_value = "0.0.0.0:7071")]
    pub listen: SocketAddr,
    /// How the control plane reaches the link listener, e.g. https://10.0.0.5:7071 (default:
    /// https://<address of --listen>, or https://<host name>:<port> when it is 0.0.0.0).
    #[arg(long, env = "ALCOVE_NODE_ADVERTISE")]
    pub advertise: Option<String>,
    /// This node's name in the cluster, unique (default: the host name).
    #[arg(long, env = "ALCOVE_NODE_ID")]
    pub node_id: Option<String>,
    /// A PEM file of the CA that signed the control plane's https certificate (for example
    /// `alcove tls init`'s ca.pem), trusted besides the host's roots.
    #[arg(long, env = "ALCOVE_SERVER_CA")]
    pub server_ca: Option<PathBuf>,
    /// The cluster's blob store (the control plane's --blob-store): paused sandboxes and
    /// snapshots leave and arrive through it.
    #[arg(long, env = "ALCOVE_BLOB_STORE")]
    pub blob_store: Option<String>,
    #[command(flatten)]
    pub host: HostOptions,
}

/// The host's side: where sandboxes live and what they may use. `alcove server` runs them
/// itself; in a cluster each `alcove node` does.
#[derive(clap::Args, Clone)]
pub struct HostOptions {
    /// Sandboxes, snapshots and, for `alcove server`, the database and (after the first
    /// start) the admin key (`api-key`).
    #[arg(long, env = "ALCOVE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Built kernels, root file systems and templates (rebuildable).
    #[arg(long, env = "ALCOVE_CACHE")]
    pub cache_dir: Option<PathBuf>,
    /// Force the accelerator (kvm or tcg) instead of detecting it.
    #[arg(long, env = "ALCOVE_ACCEL")]
    pub accel: Option<String>,
    /// Sandboxes this host runs at once, at most (default: from the host's RAM,
    /// `(MemTotal - 1 GiB) / (512 MiB + 64 MiB)`, at least 1).
    #[arg(long, env = "ALCOVE_MAX_VMS")]
    pub max_vms: Option<usize>,
    /// Sandboxes restored at once (creates the warm pool could not serve, resumes, warm-pool
    /// fills); more wait their turn, up to 40 s, so a burst of creates finishes instead of
    /// starving every guest of CPU (default: twice the host's cores).
    #[arg(long, env = "ALCOVE_MAX_STARTING", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_starting: Option<u64>,
    /// Sandboxes restored ahead of demand, per template (`TEMPLATE=COUNT` for a fixed size,
    /// `TEMPLATE=MIN..MAX` to follow the last 30 s of creates; comma-separated; `""` for none).
    /// A create takes a warm one instead of restoring a VM while the caller waits; each costs an
    /// idle VM's memory. See docs/ARCHITECTURE.md, "Warm pool".
    #[arg(long, env = "ALCOVE_WARM_POOL", default_value = DEFAULT_WARM_POOL)]
    pub warm_pool: String,
    #[command(flatten)]
    pub egress: EgressOptions,
    /// Refuse to start unless VMs run under hardware KVM: TCG (software emulation) is not a
    /// security boundary by QEMU's own policy. For production hosts.
    #[arg(long, env = "ALCOVE_REQUIRE_KVM")]
    pub require_kvm: bool,
    #[command(flatten)]
    pub jail: JailOptions,
    /// Boxed: `Command::Server` would otherwise outgrow the other commands (clippy's
    /// `large_enum_variant`).
    #[command(flatten)]
    pub registry: Box<RegistryOptions>,
}

/// Default cap on the compressed layers of one image a `fromImage` build pulls.
pub const DEFAULT_IMAGE_MAX_DOWNLOAD: u64 = 4 << 30;

/// Where `fromImage` builds pull OCI images from (`docs/templates.md`, "OCI images").
#[derive(clap::Args, Clone, Debug)]
pub struct RegistryOptions {
    /// Registry that Docker Hub images (`python:3.12`, `library/…`) are pulled from instead of
    /// Docker Hub, e.g. `mirror.example:5000` (`http://host:port` for one without TLS).
    #[arg(long, env = "ALCOVE_REGISTRY_MIRROR")]
    pub registry_mirror: Option<String>,
    /// A registry spoken to over plain HTTP, `host:port` (repeat the flag or separate with
    /// commas). For a local or test registry only: nothing protects those pulls in transit.
    #[arg(long, env = "ALCOVE_INSECURE_REGISTRY", value_delimiter = ',')]
    pub insecure_registry: Vec<String>,
    /// Largest download (compressed layers) of one image, e.g. 2G.
    #[arg(long, env = "ALCOVE_IMAGE_MAX_DOWNLOAD", value_parser = parse_bytes, default_value_t = DEFAULT_IMAGE_MAX_DOWNLOAD)]
    pub image_max_download: u64,
}

impl RegistryOptions {
    #[allow(
        dead_code,
        reason = "the API's fromImage builds (issue 14) call it from bin/alcove/src/backend.rs"
    )]
    /// The pull settings for one `fromImage` build: the disk goes under
    /// `<cache_dir>/images/`, with `agent_bin` injected, `disk_mib` large.
    pub fn oci(
        &self,
        cache_dir: PathBuf,
        agent_bin: PathBuf,
        disk_mib: u32,
        progress: alcove_image::Progress,
    ) -> alcove_image::oci::OciOptions {
        alcove_image::oci::OciOptions {
            cache_dir,
            agent_bin,
            mirror: self
                .registry_mirror
                .clone()
                .filter(|m| !m.trim().is_empty()),
            insecure_registries: self
                .insecure_registry
                .iter()
                .map(|r| r.trim().to_string())
                .filter(|r| !r.is_empty())
                .collect(),
            max_download_bytes: self.image_max_download,
            disk_mib,
            progress,
        }
    }
}

/// How QEMU processes are confined (`docs/security.md`).
#[derive(clap::Args, Clone, Debug)]
pub struct JailOptions {
    /// Run QEMU as root, unjailed (its own seccomp filter only). Development and before/after
    /// measurements only: a guest that escapes QEMU then owns the host.
    #[arg(long, global = true, env = "ALCOVE_NO_JAIL")]
    pub no_jail: bool,
    /// First id of the range jailed VMs run as: `BASE` is the group of their read-only inputs,
    /// VMs get uid = gid = `BASE+1 ..= BASE+COUNT`. Keep the range free of real accounts.
    #[arg(long, global = true, env = "ALCOVE_JAIL_UID_BASE", default_value_t = alcove_vmm::jail::DEFAULT_UID_BASE)]
    pub jail_uid_base: u32,
    /// How many uids the jail may hand out (at most this many VMs at once).
    #[arg(long, global = true, env = "ALCOVE_JAIL_UID_COUNT", default_value_t = alcove_vmm::jail::DEFAULT_UID_COUNT)]
    pub jail_uid_count: u32,
    /// Start a VM even when its host cgroup caps (CPU, memory, tasks) cannot be applied, instead
    /// of refusing it; a guest can then use the host's CPUs and memory without limit.
    #[arg(long, global = true, env = "ALCOVE_ALLOW_UNCAPPED")]
    pub allow_uncapped: bool,
}

impl Default for JailOptions {
    fn default() -> JailOptions {
        JailOptions {
            no_jail: false,
            jail_uid_base: alcove_vmm::jail::DEFAULT_UID_BASE,
            jail_uid_count: alcove_vmm::jail::DEFAULT_UID_COUNT,
            allow_uncapped: false,
        }
    }
}

/// What `alcove info` and the server's start say about the accelerator as a security boundary.
pub const TCG_WARNING: &str = "TCG (software emulation) is not a security boundary by QEMU's own security policy: \
     a guest exploiting a TCG bug runs code in the QEMU process (jailed, but on this host). \
     Run untrusted code on hardware KVM; pass --require-kvm on production hosts";

/// Sandbox egress settings of this host (`docs/network.md`).
#[derive(clap::Args, Clone, Default)]
pub struct EgressOptions {
    /// Reserved destinations sandboxes may reach anyway (CIDRs, comma-separated). Host addresses,
    /// loopback, private, link-local (cloud metadata) and multicast ranges are refused otherwise,
    /// whatever a sandbox's own rules allow.
    #[arg(long, env = "ALCOVE_EGRESS_TRUSTED", value_delimiter = ',')]
    pub egress_trusted: Vec<String>,
    /// Destinations no sandbox may reach, whatever its rules allow or --egress-trusted says
    /// (CIDRs or addresses, IPv4 or IPv6; repeat the flag or separate with commas). For example
    /// the host's public address behind NAT, or a control-plane network.
    #[arg(long, env = "ALCOVE_EGRESS_DENY", value_delimiter = ',')]
    pub egress_deny: Vec<String>,
    /// The DNS server that sandboxes' allowed queries go to (default: the first nameserver of
    /// /etc/resolv.conf).
    #[arg(long, env = "ALCOVE_DNS_UPSTREAM")]
    pub dns_upstream: Option<std::net::SocketAddr>,
    /// Open TCP connections per sandbox, at most.
    #[arg(long, env = "ALCOVE_NET_MAX_CONNECTIONS", default_value_t = alcove_net::egress::DEFAULT_MAX_CONNECTIONS)]
    pub net_max_connections: usize,
    /// Bandwidth per sandbox and direction in Mbit/s (0: unlimited).
    #[arg(long, env = "ALCOVE_NET_BANDWIDTH_MBIT", default_value_t = 0)]
    pub net_bandwidth_mbit: u64,
    /// A PEM file of CA certificates the egress proxy also trusts (besides the host's trust
    /// store) when it verifies the real hosts it forwards requests to for network rules (for
    /// example a company CA in front of an internal API).
    #[arg(long, env = "ALCOVE_EGRESS_CA")]
    pub egress_ca: Option<PathBuf>,
}

impl EgressOptions {
    /// The same settings from the environment only (node commands run without server flags).
    pub fn from_env() -> anyhow::Result<EgressOptions> {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct P {
            #[command(flatten)]
            e: EgressOptions,
        }
        Ok(P::try_parse_from(["alcove"])?.e)
    }

    pub fn config(&self) -> anyhow::Result<std::sync::Arc<alcove_net::EgressConfig>> {
        self.config_with(None, None)
    }

    /// [`EgressOptions::config`], with each connection's record sent to `events` (the
    /// server's audit log) and secret values for network rules from `secrets` (its store).
    pub fn config_with(
        &self,
        events: Option<tokio::sync::mpsc::Sender<alcove_net::EgressEvent>>,
        secrets: Option<alcove_net::egress::Secrets>,
    ) -> anyhow::Result<std::sync::Arc<alcove_net::EgressConfig>> {
        let trusted = self
            .egress_trusted
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| alcove_net::Cidr::parse(s.trim()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("--egress-trusted: {e}"))?;
        let deny = self
            .egress_deny
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| alcove_net::policy::Net::parse(s.trim()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("--egress-deny: {e}"))?;
        let guard = alcove_net::Guard::new(&alcove_net::policy::host_addresses(), trusted)
            .with_denied(deny);
        let upstream = self
            .dns_upstream
            .unwrap_or_else(alcove_net::egress::host_resolver);
        let mut c = alcove_net::EgressConfig::new(guard, upstream);
        c.max_connections = self.net_max_connections.max(1);
        c.bandwidth =
            (self.net_bandwidth_mbit > 0).then(|| self.net_bandwidth_mbit * 1_000_000 / 8);
        c.events = events;
        c.secrets = secrets;
        if let Some(path) = &self.egress_ca {
            let pem = std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("--egress-ca {}: {e}", path.display()))?;
            c.upstream_tls = alcove_net::egress::upstream_tls(&pem)
                .map_err(|e| anyhow::anyhow!("--egress-ca {}: {e}", path.display()))?;
        }
        Ok(std::sync::Arc::new(c))
    }
}

impl HostOptions {
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(default_data_dir)
    }

    /// `--max-vms`, else the default from the host's RAM.
    pub fn max_vms(&self) -> usize {
        self.max_vms.unwrap_or_else(default_max_vms)
    }

    /// Opens the node this host runs sandboxes on, with its warm pools set; egress
    /// connections are reported to `egress_events`, and network rules' secret values come from
    /// `secrets` (the server's store; none on a cluster node).
    pub async fn node(
        &self,
        egress_events: Option<tokio::sync::mpsc::Sender<alcove_net::EgressEvent>>,
        secrets: Option<alcove_net::egress::Secrets>,
    ) -> anyhow::Result<Arc<alcove_node::Node>> {
        let data_dir = self.data_dir();
        let g = Global {
            data_dir: data_dir.clone(),
            cache_dir: self.cache_dir.clone(),
            accel: self.accel.clone(),
            agent_bin: None,
            json: false,
            jail: self.jail.clone(),
        };
        let accel = g.accel();
        if accel.accel == Accel::Tcg {
            if self.require_kvm {
                anyhow::bail!(
                    "--require-kvm is set but VMs would run under TCG ({}); run on a host with hardware KVM (/dev/kvm with kvm_intel or kvm_amd), or drop --require-kvm",
                    accel.reason
                );
            }
            tracing::warn!(reason = %accel.reason, "{TCG_WARNING}");
        }
        let pools = alcove_node::parse_warm_pool(&self.warm_pool)
            .map_err(|e| anyhow::anyhow!("--warm-pool: {e}"))?;
        let node = alcove_node::Node::open(alcove_node::NodeConfig {
            data_dir,
            cache_dir: g.cache_dir(),
            vmm: g.vmm(),
            max_sandboxes: self.max_vms(),
            max_starting: self.max_starting.map_or(0, |n| n as usize),
            admission_wait: alcove_node::ADMISSION_WAIT,
            egress: self.egress.config_with(egress_events, secrets)?,
        })
        .await?;
        let built: Vec<String> = alcove_image::build::list_templates(&g.cache_dir())
            .into_iter()
            .map(|t| t.name)
            .collect();
        for (template, (min, max)) in pools {
            if !built.contains(&template) {
                tracing::warn!(
                    template,
                    "--warm-pool names a template that is not built; no pool for it (build it with `alcove template build {template}` and restart)"
                );
                continue;
            }
            node.set_warm_pool_range(&template, min, max);
        }
        // `fromImage` builds: pulls go through the operator's registry settings; without the
        // agent binary (a broken install) they are refused with the reason.
        match g.agent_bin() {
            Ok(agent) => node.set_oci_options(self.registry.oci(
                g.cache_dir(),
                agent,
                4096,
                Arc::new(|ev| {
                    if let alcove_image::build::ProgressEvent::Line { text } = ev {
                        tracing::info!(target: "alcove::oci", "{text}");
                    }
                }),
            )),
            Err(e) => tracing::warn!(error = %e, "image builds are disabled"),
        }
        Ok(node)
    }
}

impl ServerOptions {
    pub fn data_dir(&self) -> PathBuf {
        self.host.data_dir()
    }

    /// Metering: the tick, the prices (`--prices` read and checked), the webhook.
    pub fn metering(&self) -> anyhow::Result<alcove_api::MeteringConfig> {
        let prices = match &self.prices {
            None => alcove_api::Prices::default(),
            Some(path) => {
                use anyhow::Context;
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("--prices: reading {}", path.display()))?;
                let p: alcove_api::Prices = toml::from_str(&text).with_context(|| {
                    format!(
                        "--prices: {} is not a prices file (TOML with vcpu_second, \
                         memory_gib_second, storage_gib_hour, egress_gib in USD)",
                        path.display()
                    )
                })?;
                p.check()
                    .map_err(|e| anyhow::anyhow!("--prices: {}: {e}", path.display()))?;
                p
            }
        };
        if self.meter_interval < Duration::from_secs(1) {
            anyhow::bail!("--meter-interval must be at least 1s");
        }
        let webhook = match (&self.webhook_url, &self.webhook_secret) {
            (Some(url), Some(secret)) => {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    anyhow::bail!("--webhook-url {url:?} must be an http:// or https:// URL");
                }
                if secret.len() < 16 {
                    anyhow::bail!("--webhook-secret must be at least 16 characters");
                }
                Some(alcove_api::Webhook {
                    url: url.clone(),
                    secret: secret.clone(),
                })
            }
            _ => None,
        };
        Ok(alcove_api::MeteringConfig {
            interval: self.meter_interval,
            prices,
            webhook,
            sample_interval: self.metrics_interval,
            audit_retention: self.audit_retention.0,
            run_traces: !self.no_run_traces,
            otlp_endpoint: match &self.otlp_endpoint {
                None => None,
                Some(u) if u.starts_with("http://") || u.starts_with("https://") => {
                    // A bare collector address gets the standard traces path.
                    let trimmed = u.trim_end_matches('/');
                    Some(if trimmed.ends_with("/v1/traces") {
                        trimmed.to_owned()
                    } else if trimmed.matches('/').count() <= 2 {
                        format!("{trimmed}/v1/traces")
                    } else {
                        trimmed.to_owned()
                    })
                }
                Some(u) => anyhow::bail!(
                    "--otlp-endpoint {u:?} must be an http:// or https:// URL (the collector's \
                     OTLP/HTTP port, usually 4318)"
                ),
            },
        })
    }

    /// The store `--database-url` names (checked), or the data directory's SQLite file.
    pub fn database(&self) -> anyhow::Result<alcove_store::Database> {
        alcove_store::Database::from_url(self.database_url.as_deref(), &self.data_dir())
            .map_err(|e| anyhow::anyhow!("--database-url: {e}"))
    }

    /// The API server's configuration.
    pub fn api(&self) -> alcove_api::ServerConfig {
        alcove_api::ServerConfig {
            listen: self.listen,
            data_dir: self.data_dir(),
            // Checked by `database()` before the server starts.
            database: self.database().ok(),
            domain: self.domain.clone(),
            limits: Limits {
                default_timeout: Duration::from_secs(self.default_timeout),
                max_timeout: Duration::from_secs(self.max_timeout),
                max_concurrent_sandboxes: self.max_sandboxes,
                max_body_bytes: self.max_body_bytes,
                connections: ConnectionLimits {
                    max_connections: self.max_connections,
                    header_read_timeout: Duration::from_secs(self.header_read_timeout.max(1)),
                    max_proxied_streams: self.max_proxied_streams,
                    max_proxied_streams_per_sandbox: self.max_proxied_streams_per_sandbox,
                    ..ConnectionLimits::default()
                },
                max_paused_sandboxes: self.team_max_paused,
                max_snapshots: self.team_max_snapshots,
                max_stored_bytes: self.team_max_stored,
                paused_retention: self.paused_retention.0,
                max_templates: self.team_max_templates,
                max_template_bytes: self.team_max_template_storage,
                max_upload_bytes: self.max_template_upload,
                build_timeout: self.build_timeout,
                // A cluster's nodes can go away underneath it: looked for every 2 s, so a
                // lost node's sandboxes are reported within 10 s of its last heartbeat.
                liveness_interval: if self.cluster.cluster_listen.is_some() {
                    Duration::from_secs(2)
                } else {
                    Limits::default().liveness_interval
                },
                ..Limits::default()
            },
            metering: alcove_api::MeteringConfig {
                interval: self.meter_interval,
                ..alcove_api::MeteringConfig::default()
            },
            // Read from --tls-cert/--tls-key when the server starts (they may fail to load).
            tls: None,
        }
    }
}

#[derive(clap::Args, Clone)]
pub struct Global {
    /// Sandbox records, disks and sockets (the same dir as `alcove server --data-dir`).
    #[arg(long, global = true, env = "ALCOVE_DATA_DIR", default_value_os_t = default_data_dir())]
    pub data_dir: PathBuf,
    /// Built kernels, root file systems and templates (rebuildable).
    #[arg(long, global = true, env = "ALCOVE_CACHE")]
    pub cache_dir: Option<PathBuf>,
    /// Force the accelerator (kvm or tcg) instead of detecting it.
    #[arg(long, global = true, env = "ALCOVE_ACCEL")]
    pub accel: Option<String>,
    /// The in-guest agent binary (default: `alcove-agent` next to this binary).
    #[arg(long, global = true, env = "ALCOVE_AGENT_BIN")]
    pub agent_bin: Option<PathBuf>,
    /// Machine-readable output: one JSON document (or NDJSON events) on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(flatten)]
    pub jail: JailOptions,
}

impl Global {
    pub fn cache_dir(&self) -> PathBuf {
        self.cache_dir.clone().unwrap_or_else(|| {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/root"));
            home.join(".cache/alcove")
        })
    }

    pub fn accel(&self) -> AccelChoice {
        let forced = match self.accel.as_deref() {
            Some("kvm") => Some(Accel::Kvm),
            Some("tcg") => Some(Accel::Tcg),
            _ => None,
        };
        alcove_vmm::accel::detect(forced)
    }

    pub fn vmm(&self) -> QemuVmm {
        let choice = self.accel();
        tracing::info!(accel = choice.accel.as_str(), reason = %choice.reason, "accelerator chosen");
        let mut vmm = QemuVmm::new(choice).with_jail(alcove_vmm::jail::JailConfig {
            uid_base: self.jail.jail_uid_base,
            uid_count: self.jail.jail_uid_count,
        });
        vmm.allow_uncapped = self.jail.allow_uncapped;
        if self.jail.no_jail {
            tracing::warn!(
                "--no-jail: QEMU runs as ROOT with every capability and sees the whole host; a guest that escapes QEMU owns this host. For development and measurements only, never with untrusted code"
            );
            vmm = vmm.without_jail();
        }
        vmm
    }

    pub fn agent_bin(&self) -> anyhow::Result<PathBuf> {
        if let Some(p) = &self.agent_bin {
            return Ok(p.clone());
        }
        let exe = std::env::current_exe()?;
        let p = exe.with_file_name("alcove-agent");
        if !p.exists() {
            anyhow::bail!(
                "the guest agent binary was not found at {}; build it with `cargo build --release -p alcove-agent` or pass --agent-bin",
                p.display()
            );
        }
        Ok(p)
    }

    pub async fn node(&self) -> anyhow::Result<std::sync::Arc<alcove_node::Node>> {
        Ok(alcove_node::Node::open(alcove_node::NodeConfig {
            data_dir: self.data_dir.clone(),
            cache_dir: self.cache_dir(),
            vmm: self.vmm(),
            max_sandboxes: DEFAULT_MAX_VMS,
            max_starting: 0,
            // A CLI command says at once that the host is full.
            admission_wait: std::time::Duration::ZERO,
            egress: EgressOptions::from_env()?.config()?,
        })
        .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Server {
        #[command(flatten)]
        opts: ServerOptions,
    }

    #[test]
    fn server_defaults_are_the_libraries() {
        use clap::Parser;
        let opts = Server::try_parse_from(["alcove"]).unwrap().opts;
        let (config, lib) = (opts.api(), Limits::default());
        assert_eq!(config.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(DEFAULT_API_URL, format!("http://{DEFAULT_LISTEN}"));
        assert_eq!(config.limits.default_timeout, lib.default_timeout);
        assert_eq!(config.limits.max_timeout, lib.max_timeout);
        assert_eq!(
            config.limits.max_concurrent_sandboxes,
            lib.max_concurrent_sandboxes
        );
        assert_eq!(config.limits.max_body_bytes, lib.max_body_bytes);
        assert_eq!(config.limits.request_timeout, lib.request_timeout);
        assert_eq!(config.limits.max_paused_sandboxes, lib.max_paused_sandboxes);
        assert_eq!(config.limits.max_snapshots, lib.max_snapshots);
        assert_eq!(config.limits.max_stored_bytes, lib.max_stored_bytes);
        assert_eq!(config.limits.paused_retention, lib.paused_retention);
        assert_eq!(config.limits.max_templates, lib.max_templates);
        assert_eq!(config.limits.max_template_bytes, lib.max_template_bytes);
        assert_eq!(config.limits.max_upload_bytes, lib.max_upload_bytes);
        assert_eq!(config.limits.build_timeout, lib.build_timeout);
        assert_eq!(opts.host.max_vms(), default_max_vms());
        assert_eq!(opts.host.warm_pool, DEFAULT_WARM_POOL);
    }

    #[test]
    fn max_vms_follows_the_hosts_memory() {
        // 2 GiB: 1 GiB for the host, one 576 MiB VM.
        assert_eq!(max_vms_for_ram(2 * 1024 * 1024), 1);
        // 24 GiB: (24576 - 1024) / 576 = 40.
        assert_eq!(max_vms_for_ram(24 * 1024 * 1024), 40);
        // Less than the reserve still allows one.
        assert_eq!(max_vms_for_ram(512 * 1024), 1);
        assert_eq!(
            mem_total_kib("MemFree: 1 kB\nMemTotal:       24683584 kB\n"),
            Some(24683584)
        );
        assert!(default_max_vms() < DEFAULT_MAX_VMS);
        use clap::Parser;
        let opts = Server::try_parse_from(["alcove", "--max-vms", "7"])
            .unwrap()
            .opts;
        assert_eq!(opts.host.max_vms(), 7);
    }

    #[test]
    fn quota_flags_parse_sizes_and_durations() {
        assert_eq!(parse_bytes("50G").unwrap(), 50 << 30);
        assert_eq!(parse_bytes("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1024").unwrap(), 1024);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("99999999999T").is_err());
        assert_eq!(
            parse_retention("30d").unwrap().0,
            Some(Duration::from_secs(30 * 86400))
        );
        assert_eq!(parse_retention("never").unwrap().0, None);
        use clap::Parser;
        let opts = Server::try_parse_from([
            "alcove",
            "--team-max-running",
            "3",
            "--team-max-paused",
            "2",
            "--team-max-snapshots",
            "4",
            "--team-max-stored",
            "1G",
            "--paused-retention",
            "2h",
        ])
        .unwrap()
        .opts;
        let l = opts.api().limits;
        assert_eq!(l.max_concurrent_sandboxes, 3);
        assert_eq!(l.max_paused_sandboxes, 2);
        assert_eq!(l.max_snapshots, 4);
        assert_eq!(l.max_stored_bytes, 1 << 30);
        assert_eq!(l.paused_retention, Some(Duration::from_secs(7200)));
    }

    #[test]
    fn registry_flags_become_pull_options() {
        use clap::Parser;
        let o = Server::try_parse_from(["alcove"])
            .unwrap()
            .opts
            .host
            .registry;
        let oci = o.oci("/c".into(), "/a".into(), 512, Arc::new(|_| {}));
        assert_eq!(oci.mirror, None);
        assert!(oci.insecure_registries.is_empty());
        assert_eq!(oci.max_download_bytes, DEFAULT_IMAGE_MAX_DOWNLOAD);
        let o = Server::try_parse_from([
            "alcove",
            "--registry-mirror",
            "http://10.0.0.5:5000",
            "--insecure-registry",
            "127.0.0.1:5000",
            "--insecure-registry",
            "a:1,b:2",
            "--image-max-download",
            "1G",
        ])
        .unwrap()
        .opts
        .host
        .registry;
        let oci = o.oci("/c".into(), "/a".into(), 512, Arc::new(|_| {}));
        assert_eq!(oci.mirror.as_deref(), Some("http://10.0.0.5:5000"));
        assert_eq!(oci.insecure_registries, ["127.0.0.1:5000", "a:1", "b:2"]);
        assert_eq!(oci.max_download_bytes, 1 << 30);
        assert_eq!(oci.disk_mib, 512);
    }
}

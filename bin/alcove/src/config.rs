//! The `alcove` binary's configuration: [`ServerOptions`] (every flag and env var of
//! `alcove server`), [`Global`] (the node commands'), and how they become library configuration.
//!
//! Defaults are written once: a limit the API enforces takes its default from
//! [`Limits::default`], the rest are constants here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use alcove_api::Limits;
use alcove_vmm::{Accel, AccelChoice, QemuVmm};

/// Where `alcove server` listens unless told otherwise; the client commands look there.
macro_rules! default_listen {
    () => {
        "127.0.0.1:3000"
    };
}
pub const DEFAULT_LISTEN: &str = default_listen!();
pub const DEFAULT_API_URL: &str = concat!("http://", default_listen!());
/// Sandboxes one host runs at once, at most.
pub const DEFAULT_MAX_VMS: usize = 1000;
/// The warm pool's sizes per template (see docs/ARCHITECTURE.md, "Warm pool").
pub const DEFAULT_WARM_POOL: &str = "base=2,code-interpreter-v1=1";

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
    /// Holds the database and, after the first start, the admin key (`api-key`).
    #[arg(long, env = "ALCOVE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Domain for `<port>-<sandboxID>.<domain>` routing (default `localhost:<port>`).
    #[arg(long, env = "ALCOVE_DOMAIN")]
    pub domain: Option<String>,
    /// Lifetime in seconds of a sandbox created without a timeout.
    #[arg(long, default_value_t = Limits::default().default_timeout.as_secs())]
    pub default_timeout: u64,
    /// Longest lifetime in seconds a sandbox may ask for.
    #[arg(long, default_value_t = Limits::default().max_timeout.as_secs())]
    pub max_timeout: u64,
    /// Sandboxes one team may run at once.
    #[arg(long, default_value_t = Limits::default().max_concurrent_sandboxes)]
    pub max_sandboxes: usize,
    /// Largest REST request body in bytes (sandbox traffic is not capped).
    #[arg(long, default_value_t = Limits::default().max_body_bytes)]
    pub max_body_bytes: usize,
    /// Built kernels, root file systems and templates (rebuildable).
    #[arg(long, env = "ALCOVE_CACHE")]
    pub cache_dir: Option<PathBuf>,
    /// Force the accelerator (kvm or tcg) instead of detecting it.
    #[arg(long, env = "ALCOVE_ACCEL")]
    pub accel: Option<String>,
    /// Sandboxes this host runs at once, at most.
    #[arg(long, env = "ALCOVE_MAX_VMS", default_value_t = DEFAULT_MAX_VMS)]
    pub max_vms: usize,
    /// Sandboxes restored ahead of demand, per template (`TEMPLATE=COUNT`, comma-separated; `""`
    /// for none). A create takes a warm one instead of restoring a VM while the caller waits;
    /// each costs an idle VM's memory. See docs/ARCHITECTURE.md, "Warm pool".
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
        let trusted = self
            .egress_trusted
            .iter()
            .filter(|s| !s.trim().is_empty())
            .map(|s| alcove_net::Cidr::parse(s.trim()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("--egress-trusted: {e}"))?;
        let guard = alcove_net::Guard::new(&alcove_net::policy::host_addresses(), trusted);
        let upstream = self
            .dns_upstream
            .unwrap_or_else(alcove_net::egress::host_resolver);
        let mut c = alcove_net::EgressConfig::new(guard, upstream);
        c.max_connections = self.net_max_connections.max(1);
        c.bandwidth =
            (self.net_bandwidth_mbit > 0).then(|| self.net_bandwidth_mbit * 1_000_000 / 8);
        Ok(std::sync::Arc::new(c))
    }
}

impl ServerOptions {
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(default_data_dir)
    }

    /// The API server's configuration.
    pub fn api(&self) -> alcove_api::ServerConfig {
        alcove_api::ServerConfig {
            listen: self.listen,
            data_dir: self.data_dir(),
            domain: self.domain.clone(),
            limits: Limits {
                default_timeout: Duration::from_secs(self.default_timeout),
                max_timeout: Duration::from_secs(self.max_timeout),
                max_concurrent_sandboxes: self.max_sandboxes,
                max_body_bytes: self.max_body_bytes,
                ..Limits::default()
            },
        }
    }

    /// Opens the node the server runs sandboxes on, with its warm pools set.
    pub async fn node(&self) -> anyhow::Result<Arc<alcove_node::Node>> {
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
            max_sandboxes: self.max_vms,
            egress: self.egress.config()?,
        })
        .await?;
        let built: Vec<String> = alcove_image::build::list_templates(&g.cache_dir())
            .into_iter()
            .map(|t| t.name)
            .collect();
        for (template, size) in pools {
            if !built.contains(&template) {
                tracing::warn!(
                    template,
                    "--warm-pool names a template that is not built; no pool for it (build it with `alcove template build {template}` and restart)"
                );
                continue;
            }
            node.set_warm_pool(&template, size);
        }
        Ok(node)
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
        assert_eq!(opts.max_vms, DEFAULT_MAX_VMS);
        assert_eq!(opts.warm_pool, DEFAULT_WARM_POOL);
    }
}

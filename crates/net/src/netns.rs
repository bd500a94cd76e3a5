//! One network namespace per microVM, holding only a loopback and the VM's tap.
//!
//! The namespace has no route anywhere: it is not connected to the host's namespace by any
//! device, and forwarding is off. nftables rules in it send every TCP connection the guest opens to
//! the egress proxy's listener and every DNS packet to the resolver's socket; both sockets live in
//! the namespace but belong to the host's server process, which makes the real connections from
//! the host's namespace after the policy allowed them. Anything else the guest sends (other UDP,
//! ICMP to the outside) has nowhere to go.
//!
//! Every clone uses the same addresses and MACs, so a snapshot restored in a new namespace needs no
//! guest reconfiguration. The namespace lives as long as something holds it: our fd and the QEMU
//! process in it; when both are gone the kernel removes it with the tap, so a crash leaves nothing.

use std::io::{self, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::process::{Command, Stdio};

// The guest's side of the link (its address, gateway, MAC) is fixed by the guest contract; the
// namespace is built to match it.
pub use alcove_guest_contract::net::{GATEWAY_IP, GUEST_IP, GUEST_MAC, PREFIX_LEN, TAP};
const GATEWAY_MAC: &str = "02:a1:c0:00:00:01";
/// Where redirected TCP lands inside the namespace.
pub const PROXY_PORT: u16 = 15001;

fn ip_batch() -> String {
    format!(
        "link set lo up
tuntap add dev {TAP} mode tap
link set dev {TAP} address {GATEWAY_MAC}
addr add {GATEWAY_IP}/{PREFIX_LEN} dev {TAP}
link set dev {TAP} up
"
    )
}

fn nft_rules() -> String {
    format!(
        "table inet alcove {{
  chain pre {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname \"{TAP}\" meta nfproto ipv4 udp dport 53 redirect to :53
    iifname \"{TAP}\" meta nfproto ipv4 meta l4proto tcp redirect to :{PROXY_PORT}
  }}
  chain in {{
    type filter hook input priority filter; policy drop;
    iif \"lo\" accept
    iifname \"{TAP}\" meta nfproto ipv4 tcp dport {PROXY_PORT} accept
    iifname \"{TAP}\" meta nfproto ipv4 udp dport 53 accept
  }}
  chain forward_drop {{
    type filter hook forward priority filter; policy drop;
  }}
}}
"
    )
}

/// A sandbox's network namespace, held open by this fd.
#[derive(Debug)]
pub struct Netns {
    fd: OwnedFd,
}

/// The proxy's and resolver's sockets, bound inside a sandbox's namespace.
#[derive(Debug)]
pub struct Listeners {
    pub tcp: std::net::TcpListener,
    pub udp: std::net::UdpSocket,
}

fn run_with_stdin(prog: &str, args: &[&str], input: &str) -> io::Result<()> {
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("run {prog}: {e} (scripts/setup-host.sh installs iproute2 and nftables)"),
            )
        })?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "{prog} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Runs `f` on a new thread that first enters (`Some`) or creates (`None`) a network namespace;
/// the thread ends with `f`, so no thread of ours is left in a sandbox's namespace.
fn in_netns<T: Send + 'static>(
    enter: Option<RawFd>,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    std::thread::Builder::new()
        .name("alcove-netns".into())
        .spawn(move || {
            match enter {
                Some(fd) => {
                    // SAFETY: the caller keeps `fd` open until this thread is joined.
                    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
                    nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET)
                }
                None => nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET),
            }
            .map_err(|e| {
                io::Error::other(format!("enter a network namespace: {e} (needs root)"))
            })?;
            f()
        })?
        .join()
        .map_err(|_| io::Error::other("network namespace thread panicked"))?
}

fn bind_listeners() -> io::Result<Listeners> {
    let tcp = std::net::TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, PROXY_PORT))?;
    tcp.set_nonblocking(true)?;
    let udp = std::net::UdpSocket::bind(SocketAddrV4::new(GATEWAY_IP, 53))?;
    udp.set_nonblocking(true)?;
    Ok(Listeners { tcp, udp })
}

impl Netns {
    /// A new namespace with the tap, addresses and rules; with the proxy's and resolver's sockets
    /// bound in it when `listen`.
    pub fn create(listen: bool) -> io::Result<(Netns, Option<Listeners>)> {
        in_netns(None, move || {
            run_with_stdin("ip", &["-batch", "-"], &ip_batch())?;
            run_with_stdin("nft", &["-f", "-"], &nft_rules())?;
            let fd: OwnedFd = std::fs::File::open("/proc/thread-self/ns/net")?.into();
            let l = if listen {
                Some(bind_listeners()?)
            } else {
                None
            };
            Ok((Netns { fd }, l))
        })
    }

    /// The namespace a running process (a sandbox's QEMU) is in: how a restarted server gets
    /// back to a sandbox's network.
    pub fn of_pid(pid: u32) -> io::Result<Netns> {
        let fd: OwnedFd = std::fs::File::open(format!("/proc/{pid}/ns/net"))?.into();
        Ok(Netns { fd })
    }

    /// Binds fresh proxy and resolver sockets in this namespace (after a server restart).
    pub fn listen(&self) -> io::Result<Listeners> {
        let fd = self.fd.as_raw_fd();
        // The previous holder's sockets may still be closing (a node dropped in this process).
        let mut tries = 0;
        loop {
            match in_netns(Some(fd), bind_listeners) {
                Err(e) if e.kind() == io::ErrorKind::AddrInUse && tries < 40 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                r => return r,
            }
        }
    }

    /// Moves the calling thread into this namespace. Meant for a child between fork and exec
    /// (`Command::pre_exec`): only async-signal-safe calls.
    pub fn enter(&self) -> io::Result<()> {
        nix::sched::setns(self.fd.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(io::Error::from)
    }

    pub fn try_clone(&self) -> io::Result<Netns> {
        Ok(Netns {
            fd: self.fd.try_clone()?,
        })
    }

    /// Runs `prog args` inside the namespace (tests, diagnostics).
    pub fn command(&self, prog: &str) -> Command {
        let fd = self.fd.try_clone().expect("dup a namespace fd");
        let mut c = Command::new(prog);
        // SAFETY: setns is async-signal-safe; `fd` was duplicated before fork.
        unsafe {
            use std::os::unix::process::CommandExt;
            c.pre_exec(move || {
                nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from)
            });
        }
        c
    }
}

/// The namespace's fd: what `alcove_vmm::VmSpec::netns` takes.
impl From<Netns> for OwnedFd {
    fn from(ns: Netns) -> OwnedFd {
        ns.fd
    }
}

/// The address a redirected connection was originally sent to.
pub fn original_dst(s: &impl AsFd) -> io::Result<SocketAddrV4> {
    let sin = nix::sys::socket::getsockopt(s, nix::sys::socket::sockopt::OriginalDst)?;
    let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
    Ok(SocketAddrV4::new(ip, u16::from_be(sin.sin_port)))
}

/// The namespace's gateway as a socket address (the resolver's).
pub fn resolver_addr() -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(GATEWAY_IP, 53))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_and_rules_name_the_same_addresses() {
        assert_eq!(
            alcove_guest_contract::net::kernel_cmdline(),
            "ip=10.0.2.2::10.0.2.1:255.255.255.252::eth0:off"
        );
        assert!(ip_batch().contains(GATEWAY_MAC) && ip_batch().contains("10.0.2.1/30"));
        assert!(nft_rules().contains("redirect to :15001"));
    }
}

//! The host channel: one virtio-serial port carrying a sequence of HTTP/2 (h2c) sessions.
//!
//! Session semantics (the host's snapshot/restore flow depends on them):
//! - `read()` returning 0 means no host is connected. The current session, if any, ends; the
//!   agent sleeps ~2 ms and reads again until data arrives.
//! - The first data after that starts a brand-new h2 session (the host sends a fresh preface).
//! - A write that finds the host gone (POLLHUP) ends the session; nothing ever blocks on a
//!   disconnected host.
//!
//! The port is opened once (virtio ports are exclusive-open). A reader thread owns reads and a
//! per-session writer thread owns writes, so a blocking read never stops writes. Each session is
//! bridged to tokio through a fresh Unix socket pair: hyper serves one end like any socket, the
//! threads shuttle bytes between the other end and the port. Ending a session is closing the pair.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{OFlag, open};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::stat::Mode;

/// Bytes a session begins with when the host speaks HTTP/2 with prior knowledge.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const RECONNECT_POLL: Duration = Duration::from_millis(2);

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("no virtio-serial port named {0} under /sys/class/virtio-ports")]
    PortNotFound(String),
    #[error("open the virtio-serial device {path}")]
    OpenPort {
        path: PathBuf,
        #[source]
        source: Errno,
    },
    #[error("read from the host channel")]
    Read(#[source] io::Error),
    #[error("create the session socket pair")]
    SocketPair(#[source] io::Error),
    #[error("the channel reader thread stopped")]
    ReaderGone,
}

/// The byte pipe to the host. `read` blocks until data arrives and returns Ok(0) while no host
/// is connected; `write` fails with `BrokenPipe` instead of blocking when the host is gone.
pub trait Port: Send + Sync + 'static {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize>;
    fn write(&self, buf: &[u8]) -> io::Result<usize>;
}

/// A virtio-serial port, opened O_RDWR|O_NONBLOCK; blocking is done with poll(2) so a
/// disconnected host (POLLHUP) is noticed instead of waited on.
#[derive(Debug)]
pub struct VirtioPort {
    fd: OwnedFd,
}

impl VirtioPort {
    /// Finds `/sys/class/virtio-ports/*/name == name` and opens `/dev/<port>`.
    pub fn open_named(name: &str) -> Result<Self, ChannelError> {
        let path = find_port(Path::new("/sys/class/virtio-ports"), name)
            .ok_or_else(|| ChannelError::PortNotFound(name.to_owned()))?;
        let fd = open(
            &path,
            OFlag::O_RDWR | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC | OFlag::O_NOCTTY,
            Mode::empty(),
        )
        .map_err(|source| ChannelError::OpenPort { path, source })?;
        Ok(VirtioPort { fd })
    }

    fn wait(&self, flags: PollFlags, timeout_ms: u16) -> io::Result<PollFlags> {
        let mut fds = [PollFd::new(self.fd.as_fd(), flags)];
        match poll(&mut fds, PollTimeout::from(timeout_ms)) {
            Ok(_) | Err(Errno::EINTR) => Ok(fds[0].revents().unwrap_or(PollFlags::empty())),
            Err(e) => Err(e.into()),
        }
    }
}

/// The device node of the port called `name`, from sysfs.
pub fn find_port(sys_dir: &Path, name: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir(sys_dir).ok()?;
    for entry in entries.flatten() {
        let Ok(n) = std::fs::read_to_string(entry.path().join("name")) else {
            continue;
        };
        if n.trim() == name {
            return Some(Path::new("/dev").join(entry.file_name()));
        }
    }
    None
}

impl Port for VirtioPort {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match nix::unistd::read(&self.fd, buf) {
                Ok(n) => return Ok(n),
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => {
                    self.wait(PollFlags::POLLIN, 1000)?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn write(&self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match nix::unistd::write(&self.fd, buf) {
                Ok(n) => return Ok(n),
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => {
                    let revents = self.wait(PollFlags::POLLOUT, 100)?;
                    if revents.contains(PollFlags::POLLHUP) {
                        return Err(io::ErrorKind::BrokenPipe.into());
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Serves h2 sessions over `port` forever.
pub async fn serve<P: Port>(port: Arc<P>, router: axum::Router) -> Result<(), ChannelError> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<UnixStream>(1);
    let reader_port = Arc::clone(&port);
    let reader = std::thread::Builder::new()
        .name("channel-reader".into())
        .spawn(move || reader_loop(reader_port, tx))
        .map_err(ChannelError::SocketPair)?;
    let mut session_id: u64 = 0;
    while let Some(stream) = rx.recv().await {
        session_id += 1;
        // Registering with the reactor must happen on the runtime, not in the reader thread.
        let stream = match tokio::net::UnixStream::from_std(stream) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(session_id, error = %e, "register the session socket");
                continue;
            }
        };
        tracing::info!(session_id, "host channel session started");
        let router = router.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::server::serve_h2(stream, router).await {
                tracing::debug!(session_id, error = %e, "host channel session ended with an error");
            }
            tracing::info!(session_id, "host channel session ended");
        });
    }
    match reader.join() {
        Ok(Err(e)) => Err(e),
        _ => Err(ChannelError::ReaderGone),
    }
}

/// Owns the port's read side: waits for a host, runs a session until it hangs up, repeats.
fn reader_loop<P: Port>(
    port: Arc<P>,
    sessions: tokio::sync::mpsc::Sender<UnixStream>,
) -> Result<(), ChannelError> {
    let mut buf = vec![0u8; 64 * 1024];
    // Whether the bytes now arriving belong to a session that already ended: they are dropped
    // until the host hangs up (or visibly starts over with a new preface).
    let mut stale = false;
    loop {
        let n = port.read(&mut buf).map_err(ChannelError::Read)?;
        if n == 0 {
            stale = false;
            std::thread::sleep(RECONNECT_POLL);
            continue;
        }
        if stale && !buf[..n].starts_with(H2_PREFACE) {
            continue;
        }
        let (agent_end, bridge) = UnixStream::pair().map_err(ChannelError::SocketPair)?;
        agent_end
            .set_nonblocking(true)
            .map_err(ChannelError::SocketPair)?;
        if sessions.blocking_send(agent_end).is_err() {
            return Ok(());
        }
        stale = !run_session(&port, bridge, &buf[..n], &mut buf.clone());
    }
}

/// Shuttles one session's bytes. Returns true if the host hung up (clean end), false if the
/// agent side ended first, in which case the host's further bytes are stale.
fn run_session<P: Port>(
    port: &Arc<P>,
    mut bridge: UnixStream,
    first: &[u8],
    buf: &mut [u8],
) -> bool {
    let host_gone = Arc::new(AtomicBool::new(false));
    let writer = match bridge.try_clone() {
        Ok(out) => {
            let port = Arc::clone(port);
            let host_gone = Arc::clone(&host_gone);
            std::thread::Builder::new()
                .name("channel-writer".into())
                .spawn(move || writer_loop(port, out, host_gone))
                .ok()
        }
        Err(_) => None,
    };
    let mut clean = true;
    if bridge.write_all(first).is_err() {
        clean = false;
    } else {
        loop {
            if host_gone.load(Ordering::Acquire) {
                break;
            }
            match port.read(buf) {
                Ok(0) => break,
                Ok(n) => {
                    if bridge.write_all(&buf[..n]).is_err() {
                        clean = false;
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "read from the host channel");
                    break;
                }
            }
        }
    }
    let _ = bridge.shutdown(std::net::Shutdown::Both);
    if let Some(w) = writer {
        let _ = w.join();
    }
    clean
}

/// Copies the session's output to the port until the session closes or the host goes away.
fn writer_loop<P: Port>(port: Arc<P>, mut from_agent: UnixStream, host_gone: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from_agent.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut off = 0;
        while off < n {
            match port.write(&buf[off..n]) {
                Ok(w) => off += w,
                Err(e) => {
                    tracing::info!(error = %e, "host channel write failed; ending the session");
                    host_gone.store(true, Ordering::Release);
                    let _ = from_agent.shutdown(std::net::Shutdown::Both);
                    return;
                }
            }
        }
    }
}

impl AsRawFd for VirtioPort {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

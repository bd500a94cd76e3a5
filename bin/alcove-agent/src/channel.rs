//! The host channel: one virtio-serial port carrying a sequence of HTTP/2 (h2c) sessions.
//!
//! Session semantics (the host's snapshot/restore flow depends on them):
//! - Every host connection begins with the HTTP/2 preface; a read that returns a chunk starting
//!   with the preface starts a brand-new h2 session and ends the previous one, if any.
//! - `read()` returning 0 means no host is connected *right now*; the agent sleeps (2 ms, backing
//!   off to 16 ms while nobody connects) and reads again. It does not end the session: the guest
//!   kernel handles the port-open/close notices and the data on separate paths, so a reconnecting
//!   host's first bytes can arrive *before* the old host's close notice. Sessions are therefore
//!   delimited by prefaces, not by disconnects.
//! - Bytes that are neither a preface nor part of a live session are dropped.
//! - Each session's output begins with `CHANNEL_SESSION_MARKER`; the host drops what precedes it
//!   (the previous session's last frames, written while no host was connected).
//! - A write that finds the host gone for longer than a grace period ends the session; nothing
//!   ever blocks forever on a disconnected host.
//!
//! The port is opened once (virtio ports are exclusive-open). A reader thread owns reads and a
//! per-session writer thread owns writes, so a blocking read never stops writes. Each session is
//! bridged to tokio through a fresh Unix socket pair: hyper serves one end like any socket, the
//! threads shuttle bytes between the other end and the port. Ending a session is closing the pair.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{OFlag, open};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::stat::Mode;

/// Bytes a session begins with when the host speaks HTTP/2 with prior knowledge.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const RECONNECT_POLL: Duration = Duration::from_millis(2);
/// The longest sleep between reads while no host is connected (idle guests stay cheap).
const RECONNECT_POLL_MAX: Duration = Duration::from_millis(16);
/// How long a write waits for a host that looks disconnected before the session is given up.
const WRITE_HUP_GRACE: Duration = Duration::from_millis(500);

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
        let mut hup_since: Option<std::time::Instant> = None;
        loop {
            match nix::unistd::write(&self.fd, buf) {
                Ok(n) => return Ok(n),
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => {
                    let revents = self.wait(PollFlags::POLLOUT, 100)?;
                    if revents.contains(PollFlags::POLLHUP) {
                        // A close notice can be stale (see the module doc): give the host a
                        // moment to be seen as connected again before giving up on it.
                        let since = *hup_since.get_or_insert_with(std::time::Instant::now);
                        if since.elapsed() > WRITE_HUP_GRACE {
                            return Err(io::ErrorKind::BrokenPipe.into());
                        }
                        std::thread::sleep(RECONNECT_POLL);
                    } else {
                        hup_since = None;
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

/// One live session: the reader's end of the socket pair and the thread copying replies out.
struct Session {
    bridge: UnixStream,
    writer: Option<std::thread::JoinHandle<()>>,
    host_gone: Arc<AtomicBool>,
}

impl Session {
    fn end(mut self) {
        let _ = self.bridge.shutdown(std::net::Shutdown::Both);
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// Owns the port's read side: starts a session at every preface, feeds it, ends it when the
/// next one starts or its side goes away.
fn reader_loop<P: Port>(
    port: Arc<P>,
    sessions: tokio::sync::mpsc::Sender<UnixStream>,
) -> Result<(), ChannelError> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut current: Option<Session> = None;
    let mut idle_sleep = RECONNECT_POLL;
    // The session allowed to write to the port (see `writer_loop`).
    let gate = Arc::new(Mutex::new(0u64));
    loop {
        if let Some(s) = current.take_if(|s| s.host_gone.load(Ordering::Acquire)) {
            s.end();
        }
        let n = port.read(&mut buf).map_err(ChannelError::Read)?;
        if n == 0 {
            std::thread::sleep(idle_sleep);
            idle_sleep = (idle_sleep * 2).min(RECONNECT_POLL_MAX);
            continue;
        }
        idle_sleep = RECONNECT_POLL;
        let chunk = &buf[..n];
        if chunk.starts_with(H2_PREFACE) {
            let epoch = {
                let mut g = gate.lock().unwrap_or_else(|e| e.into_inner());
                *g += 1;
                // Under the gate: no byte of an older session can follow the marker.
                if let Err(e) = write_all(&*port, alcove_envd_proto::CHANNEL_SESSION_MARKER) {
                    tracing::info!(error = %e, "could not start a session: the host is gone");
                }
                *g
            };
            if let Some(s) = current.take() {
                s.end();
            }
            let (agent_end, bridge) = UnixStream::pair().map_err(ChannelError::SocketPair)?;
            agent_end
                .set_nonblocking(true)
                .map_err(ChannelError::SocketPair)?;
            if sessions.blocking_send(agent_end).is_err() {
                return Ok(());
            }
            let session = start_session(&port, bridge, &gate, epoch);
            current = Some(session);
        }
        let Some(session) = current.as_mut() else {
            // Bytes of a session that already ended (its host left mid-request): drop them.
            continue;
        };
        if session.bridge.write_all(chunk).is_err() {
            // The agent side closed the session; what the host still sends is stale.
            if let Some(s) = current.take() {
                s.end();
            }
        }
    }
}

fn start_session<P: Port>(
    port: &Arc<P>,
    bridge: UnixStream,
    gate: &Arc<Mutex<u64>>,
    epoch: u64,
) -> Session {
    let host_gone = Arc::new(AtomicBool::new(false));
    let writer = bridge.try_clone().ok().and_then(|out| {
        let port = Arc::clone(port);
        let host_gone = Arc::clone(&host_gone);
        let gate = Arc::clone(gate);
        std::thread::Builder::new()
            .name("channel-writer".into())
            .spawn(move || writer_loop(port, out, host_gone, gate, epoch))
            .ok()
    });
    Session {
        bridge,
        writer,
        host_gone,
    }
}

/// Copies the session's output to the port until the session closes or the host goes away.
fn write_all<P: Port>(port: &P, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        let n = port.write(data)?;
        data = &data[n..];
    }
    Ok(())
}

/// Only the newest session may write: an ended session's last frames (hyper's GOAWAY as it shuts
/// down) must never reach the host that replaced it.
fn writer_loop<P: Port>(
    port: Arc<P>,
    mut from_agent: UnixStream,
    host_gone: Arc<AtomicBool>,
    gate: Arc<Mutex<u64>>,
    epoch: u64,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from_agent.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let current = gate.lock().unwrap_or_else(|e| e.into_inner());
        if *current != epoch {
            return;
        }
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

//! The process table: spawning (pipes or PTY, as the requested user), supervision, input,
//! signals, resize, and the output logs clients attach to.
//!
//! Every process runs in its own session (setsid), so a signal from SendSignal reaches its whole
//! process group and never the agent. Exited processes stay findable (bounded) so a client that
//! reconnects after the exit still gets the remaining output and the exit status.

pub mod output;
pub mod pty;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::ChildStdin;
use tokio::sync::watch;

use alcove_envd_proto::process::{ProcessConfig, ProcessInfo, process_event::EndEvent};

use crate::users::UserInfo;
pub use output::{Chunk, Item, OutputLog, Subscription};

/// How long a pump keeps reading after the process exited while nothing arrives: a background
/// grandchild holding the pipe must not keep the process "running" forever.
const DRAIN_IDLE_AFTER_EXIT: Duration = Duration::from_millis(250);
const PIPE_CHUNK: usize = 32 * 1024;
const PTY_CHUNK: usize = 16 * 1024;
/// Exited processes kept for late Connects.
const EXITED_KEPT: usize = 256;
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cwd '{0}' does not exist")]
    CwdMissing(PathBuf),
    #[error("invalid path")]
    Path(#[from] crate::paths::PathError),
    #[error("start '{cmd}'")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("open a PTY")]
    Pty(#[source] std::io::Error),
    #[error("process {0} not found; list running processes with process.Process/List")]
    NotFound(String),
    #[error("stdin is not open for this process: start it with stdin enabled, or it was closed")]
    NoStdin,
    #[error("this process has a PTY: send input as pty data (Ctrl-D for EOF), not stdin")]
    HasPty,
    #[error("this process has no PTY: send input as stdin")]
    NoPty,
    #[error("write input to process {pid}")]
    Input {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("signal process {pid}")]
    Signal {
        pid: u32,
        #[source]
        source: nix::errno::Errno,
    },
    #[error("resize the PTY of process {pid}")]
    Resize {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
}

/// Everything needed to spawn.
#[derive(Debug, Clone)]
pub struct StartSpec {
    pub config: ProcessConfig,
    pub user: UserInfo,
    pub default_env: BTreeMap<String, String>,
    pub default_workdir: Option<PathBuf>,
    pub tag: Option<String>,
    /// (cols, rows)
    pub pty: Option<(u16, u16)>,
    pub stdin: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selector<'a> {
    Pid(u32),
    Tag(&'a str),
}

impl std::fmt::Display for Selector<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::Pid(p) => write!(f, "with pid {p}"),
            Selector::Tag(t) => write!(f, "with tag '{t}'"),
        }
    }
}

#[derive(Debug)]
pub struct ProcessHandle {
    pub pid: u32,
    pub tag: Option<String>,
    pub config: ProcessConfig,
    stdin: tokio::sync::Mutex<Option<ChildStdin>>,
    pty: Option<Arc<pty::PtyMaster>>,
    pub output: Arc<OutputLog>,
    /// The last signal sent through the API (0 = none), to explain the exit.
    api_signal: AtomicI32,
}

impl ProcessHandle {
    pub fn info(&self) -> ProcessInfo {
        ProcessInfo {
            config: Some(self.config.clone()),
            pid: self.pid,
            tag: self.tag.clone(),
        }
    }

    pub fn has_pty(&self) -> bool {
        self.pty.is_some()
    }

    pub async fn write_stdin(&self, data: &[u8]) -> Result<(), ProcessError> {
        if self.pty.is_some() {
            return Err(ProcessError::HasPty);
        }
        let mut guard = self.stdin.lock().await;
        let stdin = guard.as_mut().ok_or(ProcessError::NoStdin)?;
        let r = async {
            stdin.write_all(data).await?;
            stdin.flush().await
        }
        .await;
        r.map_err(|source| ProcessError::Input {
            pid: self.pid,
            source,
        })
    }

    pub async fn write_pty(&self, data: &[u8]) -> Result<(), ProcessError> {
        let pty = self.pty.as_ref().ok_or(ProcessError::NoPty)?;
        pty.write_all(data)
            .await
            .map_err(|source| ProcessError::Input {
                pid: self.pid,
                source,
            })
    }

    pub async fn close_stdin(&self) -> Result<(), ProcessError> {
        if self.pty.is_some() {
            return Err(ProcessError::HasPty);
        }
        if let Some(mut s) = self.stdin.lock().await.take() {
            let _ = s.shutdown().await;
        }
        Ok(())
    }

    /// Signals the process's group (it leads one), or the process alone if the group is gone.
    pub fn signal(&self, sig: Signal) -> Result<(), ProcessError> {
        if self.output.is_finished() {
            return Ok(());
        }
        self.api_signal.store(sig as i32, Ordering::Relaxed);
        let pid = Pid::from_raw(self.pid as i32);
        match nix::sys::signal::killpg(pid, sig) {
            Ok(()) => Ok(()),
            Err(_) => nix::sys::signal::kill(pid, sig).map_err(|source| ProcessError::Signal {
                pid: self.pid,
                source,
            }),
        }
    }

    pub fn resize(&self, cols: u16, rows: u16) -> Result<(), ProcessError> {
        let pty = self.pty.as_ref().ok_or(ProcessError::NoPty)?;
        pty.resize(cols, rows)
            .map_err(|source| ProcessError::Resize {
                pid: self.pid,
                source,
            })
    }
}

#[derive(Debug, Default)]
struct Table {
    running: HashMap<u32, Arc<ProcessHandle>>,
    exited: VecDeque<Arc<ProcessHandle>>,
}

#[derive(Debug)]
pub struct ProcessManager {
    table: Mutex<Table>,
    output_buffer: usize,
}

impl ProcessManager {
    pub fn new(output_buffer: usize) -> Arc<ProcessManager> {
        Arc::new(ProcessManager {
            table: Mutex::new(Table::default()),
            output_buffer,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn list(&self) -> Vec<ProcessInfo> {
        let mut v: Vec<_> = self.lock().running.values().map(|h| h.info()).collect();
        v.sort_by_key(|p| p.pid);
        v
    }

    /// A running process, else a recently exited one.
    pub fn find(&self, sel: Selector<'_>) -> Result<Arc<ProcessHandle>, ProcessError> {
        let t = self.lock();
        let matches = |h: &&Arc<ProcessHandle>| match sel {
            Selector::Pid(p) => h.pid == p,
            Selector::Tag(tag) => h.tag.as_deref() == Some(tag),
        };
        let running = t.running.values().filter(matches).max_by_key(|h| h.pid);
        running
            .or_else(|| t.exited.iter().rev().find(matches))
            .cloned()
            .ok_or_else(|| ProcessError::NotFound(sel.to_string()))
    }

    /// A running process only (input, signals and resize make no sense after the exit).
    pub fn find_running(&self, sel: Selector<'_>) -> Result<Arc<ProcessHandle>, ProcessError> {
        let h = self.find(sel)?;
        if h.output.is_finished() {
            return Err(ProcessError::NotFound(sel.to_string()));
        }
        Ok(h)
    }

    /// Spawns the process; the returned subscription sees all of its output from the start.
    pub fn start(
        self: &Arc<Self>,
        spec: StartSpec,
    ) -> Result<(Arc<ProcessHandle>, Subscription), ProcessError> {
        let cwd = crate::paths::resolve(
            spec.config.cwd.as_deref().unwrap_or(""),
            &spec.user,
            spec.default_workdir.as_deref(),
        )?;
        if !cwd.is_dir() {
            return Err(ProcessError::CwdMissing(cwd));
        }
        let mut cmd = std::process::Command::new(&spec.config.cmd);
        cmd.args(&spec.config.args)
            .env_clear()
            .envs(build_env(&spec))
            .current_dir(&cwd);

        let pty_pair = match spec.pty {
            Some((cols, rows)) => Some(pty::open(cols, rows).map_err(ProcessError::Pty)?),
            None => None,
        };
        if let Some(pair) = &pty_pair {
            let dup = |fd: &std::os::fd::OwnedFd| {
                fd.try_clone().map(Stdio::from).map_err(ProcessError::Pty)
            };
            cmd.stdin(dup(&pair.slave)?)
                .stdout(dup(&pair.slave)?)
                .stderr(dup(&pair.slave)?);
        } else {
            cmd.stdin(if spec.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        }
        install_pre_exec(&mut cmd, &spec.user, pty_pair.is_some());

        let mut cmd = tokio::process::Command::from(cmd);
        let mut child = cmd.spawn().map_err(|source| ProcessError::Spawn {
            cmd: spec.config.cmd.clone(),
            source,
        })?;
        drop(cmd);
        let pid = child.id().unwrap_or(0);

        let master = match pty_pair {
            Some(pair) => {
                drop(pair.slave);
                Some(Arc::new(
                    pty::PtyMaster::new(pair.master).map_err(ProcessError::Pty)?,
                ))
            }
            None => None,
        };
        let oom_kills_at_start = oom_kill_count();
        let output = OutputLog::new(self.output_buffer);
        let sub = output.subscribe_from_start();
        let handle = Arc::new(ProcessHandle {
            pid,
            tag: spec.tag.clone(),
            config: spec.config.clone(),
            stdin: tokio::sync::Mutex::new(child.stdin.take()),
            pty: master.clone(),
            output: Arc::clone(&output),
            api_signal: AtomicI32::new(0),
        });
        self.lock().running.insert(pid, Arc::clone(&handle));
        tracing::info!(pid, cmd = %spec.config.cmd, user = %spec.user.name, "process started");

        let (exited_tx, exited_rx) = watch::channel(false);
        let mut pumps = Vec::new();
        if let Some(m) = master {
            let log = Arc::clone(&output);
            let rx = exited_rx.clone();
            pumps.push(tokio::spawn(async move { pump_pty(m, log, rx).await }));
        }
        if let Some(out) = child.stdout.take() {
            let log = Arc::clone(&output);
            let rx = exited_rx.clone();
            pumps.push(tokio::spawn(pump_pipe(out, log, rx, Chunk::Stdout)));
        }
        if let Some(err) = child.stderr.take() {
            let log = Arc::clone(&output);
            let rx = exited_rx.clone();
            pumps.push(tokio::spawn(pump_pipe(err, log, rx, Chunk::Stderr)));
        }
        let manager = Arc::clone(self);
        let h = Arc::clone(&handle);
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = exited_tx.send(true);
            for p in pumps {
                let _ = p.await;
            }
            let oom_killed = oom_kill_count() > oom_kills_at_start;
            let end = end_event(status, h.api_signal.load(Ordering::Relaxed), oom_killed);
            tracing::info!(pid = h.pid, status = %end.status, "process ended");
            h.stdin.lock().await.take();
            h.output.finish(end);
            manager.retire(h.pid);
        });
        Ok((handle, sub))
    }

    fn retire(&self, pid: u32) {
        let mut t = self.lock();
        if let Some(h) = t.running.remove(&pid) {
            t.exited.push_back(h);
            while t.exited.len() > EXITED_KEPT {
                t.exited.pop_front();
            }
        }
    }
}

fn build_env(spec: &StartSpec) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    env.insert(
        "PATH".to_owned(),
        std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.to_owned()),
    );
    env.insert(
        "HOME".to_owned(),
        spec.user.home.to_string_lossy().into_owned(),
    );
    env.insert("USER".to_owned(), spec.user.name.clone());
    env.insert("LOGNAME".to_owned(), spec.user.name.clone());
    if spec.pty.is_some() {
        env.insert("TERM".to_owned(), "xterm-256color".to_owned());
    }
    env.extend(spec.default_env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.extend(spec.config.envs.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

/// Set once the agent made itself unkillable by the OOM killer; children must not inherit that.
static OOM_PROTECTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes the agent the OOM killer's last choice (guest only: it is the sandbox's lifeline).
/// Processes it starts go back to a normal score (envd's 100) before exec.
pub fn protect_from_oom() {
    match std::fs::write("/proc/self/oom_score_adj", "-1000") {
        Ok(()) => OOM_PROTECTED.store(true, Ordering::Relaxed),
        Err(e) => tracing::warn!(error = %e, "lower the agent's oom_score_adj"),
    }
}

/// In the forked child: only open/write/close, which are async-signal-safe.
fn reset_oom_score() {
    // SAFETY: a static NUL-terminated path and a static buffer; the fd is closed before return.
    unsafe {
        let fd = libc::open(
            c"/proc/self/oom_score_adj".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        );
        if fd >= 0 {
            let _ = libc::write(fd, b"100".as_ptr().cast(), 3);
            libc::close(fd);
        }
    }
}

/// The kernel's count of OOM kills so far: `/proc/vmstat`'s `oom_kill` where the kernel keeps
/// VM event counters, else the OOM killer's "Killed process" lines in the kernel log (ours is
/// built without the counters). The log is a ring: a wrapped one can only under-count.
fn oom_kill_count() -> u64 {
    let from_vmstat = std::fs::read_to_string("/proc/vmstat").ok().and_then(|s| {
        s.lines().find_map(|l| {
            l.strip_prefix("oom_kill ")
                .and_then(|v| v.trim().parse().ok())
        })
    });
    from_vmstat.unwrap_or_else(|| count_oom_kills(&kernel_log()))
}

/// OOM-killer victims named in kernel log text.
fn count_oom_kills(log: &[u8]) -> u64 {
    log.split(|b| *b == b'\n')
        .filter(|l| l.windows(15).any(|w| w == b"Killed process "))
        .count() as u64
}

/// The kernel log buffer as it is now (empty if it cannot be read).
fn kernel_log() -> Vec<u8> {
    const SYSLOG_ACTION_READ_ALL: libc::c_int = 3;
    const SYSLOG_ACTION_SIZE_BUFFER: libc::c_int = 10;
    // SAFETY: SIZE_BUFFER takes no buffer (null, 0) and only returns a length.
    let size = unsafe { libc::klogctl(SYSLOG_ACTION_SIZE_BUFFER, std::ptr::null_mut(), 0) };
    // Bounded: the kernel's ring is at most a few MiB; refuse anything odd.
    if size <= 0 || size > 16 << 20 {
        return Vec::new();
    }
    let mut buf = vec![0u8; size as usize];
    // SAFETY: `buf` is valid for writes of `size` bytes, and the kernel writes at most that many.
    let n = unsafe { libc::klogctl(SYSLOG_ACTION_READ_ALL, buf.as_mut_ptr().cast(), size) };
    buf.truncate(n.max(0) as usize);
    buf
}

/// Child-side setup between fork and exec: own session (and controlling TTY for a PTY), then
/// drop to the user's credentials the way login does (groups, gid, uid).
fn install_pre_exec(cmd: &mut std::process::Command, user: &UserInfo, pty: bool) {
    use std::os::unix::process::CommandExt;
    let switch = user.needs_switch();
    let uid = user.uid.as_raw();
    let gid = user.gid.as_raw();
    let groups: Vec<libc::gid_t> = user.groups.iter().map(|g| g.as_raw()).collect();
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // system calls (open/write/close, setsid, ioctl, setgroups, setgid, setuid) on data prepared
    // before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if OOM_PROTECTED.load(Ordering::Relaxed) {
                reset_oom_score();
            }
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if pty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if switch
                && (libc::setgroups(groups.len(), groups.as_ptr()) < 0
                    || libc::setgid(gid) < 0
                    || libc::setuid(uid) < 0)
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

async fn pump_pipe<R: AsyncRead + Unpin>(
    mut r: R,
    log: Arc<OutputLog>,
    mut exited: watch::Receiver<bool>,
    wrap: fn(Bytes) -> Chunk,
) {
    let mut buf = vec![0u8; PIPE_CHUNK];
    loop {
        let n = match read_until_idle(&mut exited, r.read(&mut buf)).await {
            ReadOutcome::Data(Ok(n)) if n > 0 => n,
            ReadOutcome::Again => continue,
            _ => return,
        };
        log.push(wrap(Bytes::copy_from_slice(&buf[..n]))).await;
    }
}

async fn pump_pty(m: Arc<pty::PtyMaster>, log: Arc<OutputLog>, mut exited: watch::Receiver<bool>) {
    let mut buf = vec![0u8; PTY_CHUNK];
    loop {
        let n = match read_until_idle(&mut exited, m.read(&mut buf)).await {
            ReadOutcome::Data(Ok(n)) if n > 0 => n,
            ReadOutcome::Again => continue,
            _ => return,
        };
        log.push(Chunk::Pty(Bytes::copy_from_slice(&buf[..n])))
            .await;
    }
}

enum ReadOutcome {
    Data(std::io::Result<usize>),
    /// The process just exited; read again, now with the idle limit.
    Again,
    Idle,
}

async fn read_until_idle<F>(exited: &mut watch::Receiver<bool>, read: F) -> ReadOutcome
where
    F: std::future::Future<Output = std::io::Result<usize>>,
{
    if *exited.borrow() {
        return match tokio::time::timeout(DRAIN_IDLE_AFTER_EXIT, read).await {
            Ok(r) => ReadOutcome::Data(r),
            Err(_) => ReadOutcome::Idle,
        };
    }
    tokio::select! {
        r = read => ReadOutcome::Data(r),
        _ = exited.changed() => ReadOutcome::Again,
    }
}

/// Added to the end of a process the kernel's OOM killer most likely ended.
const OOM_NOTE: &str = " (likely by the kernel's OOM killer: the sandbox ran out of memory; use less memory or create the sandbox from a template with more)";

/// The end event, worded like envd (Go's os.ProcessState) so SDK users see familiar text, with
/// the cause added when the agent knows it.
fn end_event(
    status: std::io::Result<std::process::ExitStatus>,
    api_signal: i32,
    oom_killed: bool,
) -> EndEvent {
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            return EndEvent {
                exit_code: -1,
                exited: false,
                status: "unknown".into(),
                error: Some(format!("waiting for the process failed: {e}")),
            };
        }
    };
    if let Some(code) = status.code() {
        let text = format!("exit status {code}");
        // A shell whose child the OOM killer took exits 128 + SIGKILL.
        let error = match code {
            0 => None,
            137 if oom_killed => Some(format!("{text}{OOM_NOTE}")),
            _ => Some(text.clone()),
        };
        return EndEvent {
            exit_code: code,
            exited: true,
            status: text,
            error,
        };
    }
    let sig = status.signal().unwrap_or(0);
    let mut text = format!("signal: {}", signal_name(sig));
    if status.core_dumped() {
        text.push_str(" (core dumped)");
    }
    let mut error = text.clone();
    if sig == api_signal {
        error.push_str(" (sent through process.Process/SendSignal)");
    } else if sig == libc::SIGKILL && oom_killed {
        error.push_str(OOM_NOTE);
    }
    EndEvent {
        exit_code: -1,
        exited: false,
        status: text,
        error: Some(error),
    }
}

fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGHUP => "hangup",
        libc::SIGINT => "interrupt",
        libc::SIGQUIT => "quit",
        libc::SIGILL => "illegal instruction",
        libc::SIGTRAP => "trace/breakpoint trap",
        libc::SIGABRT => "aborted",
        libc::SIGBUS => "bus error",
        libc::SIGFPE => "floating point exception",
        libc::SIGKILL => "killed",
        libc::SIGUSR1 => "user defined signal 1",
        libc::SIGSEGV => "segmentation fault",
        libc::SIGUSR2 => "user defined signal 2",
        libc::SIGPIPE => "broken pipe",
        libc::SIGALRM => "alarm clock",
        libc::SIGTERM => "terminated",
        _ => return format!("signal {sig}"),
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::ExitStatus;

    #[test]
    fn oom_killer_lines_are_counted_from_the_kernel_log() {
        let log = b"<6>[ 1.0] hello\n<3>[ 9.1] Out of memory: Killed process 321 (python3) total-vm:1kB\n<3>[ 9.9] Memory cgroup out of memory: Killed process 400 (x)\n";
        assert_eq!(count_oom_kills(log), 2);
        assert_eq!(count_oom_kills(b""), 0);
    }

    #[test]
    fn an_oom_kill_is_named_for_a_killed_process_and_for_its_shell() {
        let killed = end_event(Ok(ExitStatus::from_raw(libc::SIGKILL)), 0, true);
        assert!(killed.error.unwrap().contains("out of memory"));
        let shell = end_event(Ok(ExitStatus::from_raw(137 << 8)), 0, true);
        assert!(shell.error.unwrap().contains("out of memory"));
        let plain = end_event(Ok(ExitStatus::from_raw(137 << 8)), 0, false);
        assert_eq!(plain.error.as_deref(), Some("exit status 137"));
    }
}

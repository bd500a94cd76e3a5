//! One Jupyter kernel process and the ZeroMQ connections to it.
//!
//! A kernel is started from its kernelspec (`<dir>/<name>/kernel.json`) with a connection file we
//! write, in its own process group so a kill takes its children too. One task reads the shell
//! channel and one the IOPub channel; both route each message to the execution whose `msg_id` is
//! its parent. Executions on one kernel are serialised (a kernel runs one cell at a time anyway),
//! and an execution abandoned before the kernel went idle (the client disconnected or timed out)
//! interrupts the kernel and keeps the lock until it is idle again, so the next cell starts on a
//! quiet kernel.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jupyter_protocol::{
    CommInfoRequest, ConnectionInfo, ExecuteRequest, ExecutionState, JupyterKernelspec,
    JupyterMessage, JupyterMessageContent, Transport,
};
use jupyter_zmq_client as zmq;
use tokio::sync::{OwnedMutexGuard, mpsc, watch};

/// How long a kernel may take from spawn to answering `kernel_info` (its startup file imports
/// pandas and matplotlib, which is slow under software CPU emulation).
const READY_TIMEOUT: Duration = Duration::from_secs(180);
/// How long an interrupted cell may take to give the kernel back.
const INTERRUPT_GRACE: Duration = Duration::from_secs(30);
/// Messages buffered per execution before the kernel readers wait for the HTTP client.
const ROUTE_BUFFER: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "no kernel for language {language:?} in this sandbox; available languages: {available}{hint}"
    )]
    UnknownLanguage {
        language: String,
        available: String,
        hint: &'static str,
    },
    #[error("read kernelspec {path}")]
    Kernelspec {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("parse kernelspec {path}")]
    KernelspecParse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("write the kernel connection file {path}")]
    ConnectionFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("start the {kernel} kernel")]
    Spawn {
        kernel: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connect to the {kernel} kernel")]
    Connect {
        kernel: String,
        #[source]
        source: zmq::RuntimeError,
    },
    #[error("the {kernel} kernel did not answer within {secs} s of starting")]
    NotReady { kernel: String, secs: u64 },
    #[error("the kernel exited ({status}); restart the context to get a fresh kernel")]
    Exited { status: String },
    #[error("send a message to the kernel")]
    Send(#[source] zmq::RuntimeError),
}

/// Where kernelspecs live and how to start them.
#[derive(Debug, Clone)]
pub struct KernelEnv {
    /// Directories holding `<name>/kernel.json`, searched in order.
    pub kernel_dirs: Vec<PathBuf>,
    /// The Python interpreter that replaces a kernelspec's bare `python`/`python3`.
    pub python: PathBuf,
    /// Scratch directory for connection files (and IPython's profile).
    pub runtime_dir: PathBuf,
    /// Extra environment for every kernel (IPYTHONDIR, MPLBACKEND, ...).
    pub env: Vec<(String, String)>,
}

/// Why `code-interpreter-v1` has no Java, and what to do about it.
const JAVA_HINT: &str = ". Java is not in the code-interpreter-v1 template: its Jupyter kernel \
(IJava) is only published on GitHub, which template builds do not reach. To use Java, build a \
template from code-interpreter-v1 that installs a JDK and a Jupyter kernelspec named `java`";

/// The kernelspec name and the canonical language name for what a client asked for.
pub fn kernel_for_language(language: Option<&str>) -> (&'static str, &'static str) {
    match language.map(|l| l.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("python") | Some("python3") | Some("py") => ("python3", "python"),
        Some("bash") | Some("sh") | Some("shell") => ("bash", "bash"),
        // Deno's Jupyter kernel runs both (a TypeScript cell is type-stripped, not checked).
        Some("javascript") | Some("js") | Some("node") => ("deno", "javascript"),
        Some("typescript") | Some("ts") => ("deno", "typescript"),
        Some("r") => ("ir", "r"),
        Some("java") => ("java", "java"),
        Some(_) => ("", ""),
    }
}

impl KernelEnv {
    /// Languages whose kernelspec is installed, for error messages and `/health`.
    pub fn available(&self) -> Vec<&'static str> {
        ["python", "bash", "javascript", "typescript", "r", "java"]
            .into_iter()
            .filter(|l| {
                let (spec, _) = kernel_for_language(Some(l));
                self.spec_path(spec).is_some()
            })
            .collect()
    }

    /// The error for a language with no kernel here, naming those there are.
    pub fn unknown_language(&self, language: &str) -> KernelError {
        let (spec, _) = kernel_for_language(Some(language));
        KernelError::UnknownLanguage {
            language: language.to_string(),
            available: self.available().join(", "),
            hint: if spec == "java" { JAVA_HINT } else { "" },
        }
    }

    fn spec_path(&self, name: &str) -> Option<PathBuf> {
        if name.is_empty() {
            return None;
        }
        self.kernel_dirs
            .iter()
            .map(|d| d.join(name).join("kernel.json"))
            .find(|p| p.is_file())
    }

    fn load_spec(&self, language: &str) -> Result<(String, JupyterKernelspec), KernelError> {
        let (name, _) = kernel_for_language(Some(language));
        let Some(path) = self.spec_path(name) else {
            return Err(self.unknown_language(language));
        };
        let text = std::fs::read_to_string(&path).map_err(|source| KernelError::Kernelspec {
            path: path.display().to_string(),
            source,
        })?;
        let spec = serde_json::from_str(&text).map_err(|source| KernelError::KernelspecParse {
            path: path.display().to_string(),
            source,
        })?;
        Ok((name.to_string(), spec))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Shell,
    IoPub,
}

type Routes = Arc<Mutex<HashMap<String, mpsc::Sender<(Channel, JupyterMessage)>>>>;

/// A running kernel. Dropping it kills the process group.
pub struct Kernel {
    pub kernel_name: String,
    pid: i32,
    shell: tokio::sync::Mutex<zmq::DealerSendConnection>,
    routes: Routes,
    exec: Arc<tokio::sync::Mutex<()>>,
    exited: watch::Receiver<Option<String>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    conn_file: PathBuf,
    /// The agent's reseed id this kernel last reseeded its userspace RNGs for.
    seeded_for: std::sync::Mutex<Option<String>>,
}

impl Drop for Kernel {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        kill_group(self.pid);
        let _ = std::fs::remove_file(&self.conn_file);
    }
}

fn kill_group(pid: i32) {
    use nix::sys::signal::{Signal, killpg};
    use nix::unistd::Pid;
    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
}

impl Kernel {
    /// Starts the kernel for `language` in `cwd` and waits until it answers.
    pub async fn start(
        env: &KernelEnv,
        language: &str,
        cwd: &Path,
        extra_env: &[(String, String)],
    ) -> Result<Arc<Kernel>, KernelError> {
        let (name, spec) = env.load_spec(language)?;
        let ports = zmq::peek_ports("127.0.0.1".parse().expect("ip"), 5)
            .await
            .map_err(|source| KernelError::Connect {
                kernel: name.clone(),
                source,
            })?;
        let info = ConnectionInfo {
            ip: "127.0.0.1".into(),
            transport: Transport::TCP,
            shell_port: ports[0],
            iopub_port: ports[1],
            stdin_port: ports[2],
            control_port: ports[3],
            hb_port: ports[4],
            key: uuid::Uuid::new_v4().simple().to_string(),
            signature_scheme: "hmac-sha256".into(),
            kernel_name: Some(name.clone()),
        };
        std::fs::create_dir_all(&env.runtime_dir).map_err(|source| {
            KernelError::ConnectionFile {
                path: env.runtime_dir.display().to_string(),
                source,
            }
        })?;
        let conn_file = env
            .runtime_dir
            .join(format!("kernel-{}.json", uuid::Uuid::new_v4().simple()));
        write_private(&conn_file, &serde_json::to_vec(&info).expect("serialises")).map_err(
            |source| KernelError::ConnectionFile {
                path: conn_file.display().to_string(),
                source,
            },
        )?;

        let mut argv: Vec<String> = spec
            .argv
            .iter()
            .map(|a| {
                if a == "{connection_file}" {
                    conn_file.display().to_string()
                } else {
                    a.clone()
                }
            })
            .collect();
        if argv.is_empty() {
            return Err(KernelError::Spawn {
                kernel: name,
                source: std::io::Error::other("the kernelspec has an empty argv"),
            });
        }
        if argv[0] == "python" || argv[0] == "python3" {
            argv[0] = env.python.display().to_string();
        }
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .current_dir(cwd)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::inherit())
            .stderr(std::process::Stdio::inherit())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(e) = &spec.env {
            cmd.envs(e);
        }
        cmd.envs(env.env.iter().map(|(k, v)| (k, v)));
        cmd.envs(extra_env.iter().map(|(k, v)| (k, v)));
        let mut child = cmd.spawn().map_err(|source| KernelError::Spawn {
            kernel: name.clone(),
            source,
        })?;
        let pid = child.id().unwrap_or(0) as i32;
        tracing::info!(kernel = %name, pid, cwd = %cwd.display(), "kernel started");

        let (exit_tx, exited) = watch::channel(None);
        let waiter = tokio::spawn(async move {
            let status = match child.wait().await {
                Ok(s) => describe_exit(s),
                Err(e) => format!("wait failed: {e}"),
            };
            let _ = exit_tx.send(Some(status));
        });

        let connect = async {
            wait_listening(info.shell_port, &exited).await?;
            let session = uuid::Uuid::new_v4().to_string();
            let identity = zmq::peer_identity_for_session(&session)?;
            let shell =
                zmq::create_client_shell_connection_with_identity(&info, &session, identity)
                    .await?;
            let iopub = zmq::create_client_iopub_connection(&info, "", &session).await?;
            Ok::<_, zmq::RuntimeError>((shell, iopub))
        };
        let (shell, iopub) = match tokio::time::timeout(READY_TIMEOUT, connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(source)) => {
                kill_group(pid);
                return Err(KernelError::Connect {
                    kernel: name,
                    source,
                });
            }
            Err(_) => {
                kill_group(pid);
                return Err(KernelError::NotReady {
                    kernel: name,
                    secs: READY_TIMEOUT.as_secs(),
                });
            }
        };
        let (shell_tx, shell_rx) = shell.split();
        let routes: Routes = Arc::default();
        let shell_reader = tokio::spawn(read_loop(
            shell_rx,
            Channel::Shell,
            routes.clone(),
            exited.clone(),
        ));
        let iopub_reader = tokio::spawn(read_loop(
            iopub,
            Channel::IoPub,
            routes.clone(),
            exited.clone(),
        ));
        // When the process exits, drop every route so waiting executions end.
        let r = routes.clone();
        let mut ex = exited.clone();
        let reaper = tokio::spawn(async move {
            let _ = ex.wait_for(|s| s.is_some()).await;
            r.lock().expect("routes").clear();
        });
        let kernel = Arc::new(Kernel {
            kernel_name: name.clone(),
            pid,
            shell: tokio::sync::Mutex::new(shell_tx),
            routes,
            exec: Arc::new(tokio::sync::Mutex::new(())),
            exited,
            tasks: vec![waiter, shell_reader, iopub_reader, reaper],
            conn_file,
            seeded_for: std::sync::Mutex::new(None),
        });
        match tokio::time::timeout(READY_TIMEOUT, kernel.wait_ready()).await {
            Ok(Ok(())) => Ok(kernel),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(KernelError::NotReady {
                kernel: name,
                secs: READY_TIMEOUT.as_secs(),
            }),
        }
    }

    /// Asks until both the reply (shell) and a status message (IOPub) came back: only
    /// then is the IOPub subscription known to be live, so no output of the first cell is lost.
    async fn wait_ready(&self) -> Result<(), KernelError> {
        loop {
            // comm_info rather than kernel_info: some kernels (bash_kernel) send a kernel_info
            // reply that lacks required fields and does not parse.
            let msg = JupyterMessage::new(CommInfoRequest { target_name: None }, None);
            let id = msg.header.msg_id.clone();
            let mut rx = self.register(&id);
            self.send(msg).await?;
            let (mut reply, mut iopub) = (false, false);
            let deadline = tokio::time::sleep(Duration::from_millis(1500));
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    m = rx.recv() => match m {
                        Some((Channel::Shell, _)) => reply = true,
                        Some((Channel::IoPub, _)) => iopub = true,
                        None => return Err(self.exit_error()),
                    },
                    // No answer yet (still starting), or a reply whose status messages went out
                    // before our IOPub subscription was live: ask again. Requests queued
                    // meanwhile are answered later and dropped (their routes are gone).
                    _ = &mut deadline => break,
                }
                if reply && iopub {
                    self.unregister(&id);
                    return Ok(());
                }
            }
            self.unregister(&id);
            if let Some(status) = self.exited.borrow().clone() {
                return Err(KernelError::Exited { status });
            }
        }
    }

    fn exit_status(&self) -> String {
        self.exited
            .borrow()
            .clone()
            .unwrap_or_else(|| "connection lost".into())
    }

    fn exit_error(&self) -> KernelError {
        KernelError::Exited {
            status: self.exit_status(),
        }
    }

    pub fn is_alive(&self) -> bool {
        self.exited.borrow().is_none()
    }

    fn register(&self, msg_id: &str) -> mpsc::Receiver<(Channel, JupyterMessage)> {
        let (tx, rx) = mpsc::channel(ROUTE_BUFFER);
        if self.is_alive() {
            self.routes
                .lock()
                .expect("routes")
                .insert(msg_id.to_string(), tx);
        }
        rx
    }

    fn unregister(&self, msg_id: &str) {
        self.routes.lock().expect("routes").remove(msg_id);
    }

    async fn send(&self, msg: JupyterMessage) -> Result<(), KernelError> {
        if !self.is_alive() {
            return Err(self.exit_error());
        }
        self.shell
            .lock()
            .await
            .send(msg)
            .await
            .map_err(KernelError::Send)
    }

    /// Interrupts the running cell (SIGINT, the kernelspec default `interrupt_mode`).
    pub fn interrupt(&self) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGINT);
    }

    /// True when the agent reseeded the kernel CRNG (id `id`) since this kernel last reseeded
    /// its own random state: it was warm in a snapshot, or the sandbox was resumed or forked.
    pub fn needs_reseed(&self, id: &str) -> bool {
        self.seeded_for.lock().expect("seeded_for").as_deref() != Some(id)
    }

    pub fn mark_reseeded(&self, id: String) {
        *self.seeded_for.lock().expect("seeded_for") = Some(id);
    }

    /// Runs `code` to completion without streaming its output (environment set-up cells).
    /// Returns the error the cell raised, if any.
    pub async fn run_silent(&self, code: &str) -> Result<Option<String>, KernelError> {
        let mut exec = self.execute_locked(code, true).await?;
        let mut err = None;
        while let Some(ev) = exec.next().await {
            if let Event::Error { name, value, .. } = ev {
                err = Some(format!("{name}: {value}"));
            }
        }
        Ok(err)
    }

    /// Waits for the kernel to be free, then starts `code`.
    pub async fn lock(self: &Arc<Self>) -> OwnedMutexGuard<()> {
        self.exec.clone().lock_owned().await
    }

    /// Sends an `execute_request` for `code` and registers its route; returns the message id
    /// and the receiver of everything the kernel sends back for it.
    async fn send_execute(
        &self,
        code: &str,
        silent: bool,
    ) -> Result<(String, mpsc::Receiver<(Channel, JupyterMessage)>), KernelError> {
        let mut req = ExecuteRequest::new(code.to_string());
        req.silent = silent;
        req.store_history = !silent;
        req.allow_stdin = false;
        req.stop_on_error = !silent;
        let msg = JupyterMessage::new(req, None);
        let id = msg.header.msg_id.clone();
        let rx = self.register(&id);
        if let Err(e) = self.send(msg).await {
            self.unregister(&id);
            return Err(e);
        }
        Ok((id, rx))
    }

    /// Starts `code`; the caller holds the kernel's lock (see [`Kernel::lock`]).
    async fn execute_locked(&self, code: &str, silent: bool) -> Result<Execution<'_>, KernelError> {
        let (msg_id, rx) = self.send_execute(code, silent).await?;
        Ok(Execution {
            kernel: self,
            msg_id,
            rx,
            state: ExecState::default(),
        })
    }

    /// Starts a streamed cell under the held lock. The returned execution interrupts the kernel if
    /// it is dropped before the kernel went idle.
    pub async fn execute(
        self: &Arc<Self>,
        guard: OwnedMutexGuard<()>,
        code: &str,
    ) -> Result<OwnedExecution, KernelError> {
        let (id, rx) = self.send_execute(code, false).await?;
        Ok(OwnedExecution {
            kernel: self.clone(),
            guard: Some(guard),
            msg_id: id,
            rx,
            state: ExecState::default(),
        })
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

fn describe_exit(s: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (_, Some(9)) => "killed by SIGKILL, possibly out of memory".into(),
        (_, Some(sig)) => format!("killed by signal {sig}"),
        _ => "unknown status".into(),
    }
}

/// Polls until the kernel's shell port accepts connections (ipykernel binds its sockets before it
/// runs startup files), or the process exits.
async fn wait_listening(
    port: u16,
    exited: &watch::Receiver<Option<String>>,
) -> Result<(), zmq::RuntimeError> {
    loop {
        if let Some(status) = exited.borrow().clone() {
            return Err(zmq::RuntimeError::from(std::io::Error::other(format!(
                "kernel exited before listening: {status}"
            ))));
        }
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Routes every message of one channel until the kernel is gone.
async fn read_loop<S: zeromq::SocketRecv + Send>(
    mut conn: zmq::Connection<S>,
    channel: Channel,
    routes: Routes,
    exited: watch::Receiver<Option<String>>,
) {
    loop {
        match conn.read().await {
            Ok(msg) => route(&routes, channel, msg).await,
            Err(e) => {
                if !read_failed(&exited, channel, &e).await {
                    break;
                }
            }
        }
    }
}

/// A message that fails to parse (a kernel's reply our protocol types do not know) is skipped;
/// returns false once the kernel is gone and reading should stop.
async fn read_failed(
    exited: &watch::Receiver<Option<String>>,
    channel: Channel,
    e: &zmq::RuntimeError,
) -> bool {
    if exited.borrow().is_some() {
        return false;
    }
    tracing::debug!(?channel, error = %e, "skipped a kernel message");
    // Never spin on a socket that keeps failing.
    tokio::time::sleep(Duration::from_millis(5)).await;
    true
}

async fn route(routes: &Routes, channel: Channel, msg: JupyterMessage) {
    let Some(parent) = msg.parent_header.as_ref().map(|h| h.msg_id.clone()) else {
        return;
    };
    let tx = routes.lock().expect("routes").get(&parent).cloned();
    if let Some(tx) = tx {
        let _ = tx.send((channel, msg)).await;
    }
}

/// What a cell produced, in the order the kernel published it.
#[derive(Debug, Clone)]
pub enum Event {
    ExecutionCount(usize),
    Stdout(String),
    Stderr(String),
    /// A display or the cell's value: MIME type → data.
    Result {
        main: bool,
        data: serde_json::Map<String, serde_json::Value>,
    },
    Error {
        name: String,
        value: String,
        traceback: Vec<String>,
    },
}

#[derive(Default)]
struct ExecState {
    reply_error: Option<(String, String, Vec<String>)>,
    seen_error: bool,
    done: bool,
    /// Until when output that lands after `idle` is still taken (kernels that publish late).
    late_until: Option<tokio::time::Instant>,
}

/// Deno's kernel publishes a cell's output through a task of its own and gives it a few
/// milliseconds before reporting `idle`; under load some of it (a result, a print) lands after
/// `idle`. For such kernels a cell ends once nothing more came for [`LATE_QUIET`], at most
/// [`LATE_MAX`] after `idle`.
fn publishes_late(kernel: &Kernel) -> bool {
    kernel.kernel_name == "deno"
}
const LATE_QUIET: Duration = Duration::from_millis(40);
const LATE_MAX: Duration = Duration::from_millis(500);

/// Maps one routed message to an event; sets `done` when the kernel went idle for this cell.
fn translate(state: &mut ExecState, channel: Channel, msg: JupyterMessage) -> Option<Event> {
    use JupyterMessageContent as C;
    match (channel, msg.content) {
        (Channel::Shell, C::ExecuteReply(r)) => {
            if let Some(e) = r.error {
                state.reply_error = Some((e.ename, e.evalue, e.traceback));
            }
            None
        }
        (Channel::IoPub, C::ExecuteInput(i)) => Some(Event::ExecutionCount(i.execution_count.0)),
        (Channel::IoPub, C::StreamContent(s)) => Some(match s.name {
            jupyter_protocol::Stdio::Stdout => Event::Stdout(s.text),
            jupyter_protocol::Stdio::Stderr => Event::Stderr(s.text),
        }),
        (Channel::IoPub, C::DisplayData(d)) => Some(Event::Result {
            main: false,
            data: media_map(&d.data),
        }),
        (Channel::IoPub, C::ExecuteResult(r)) => Some(Event::Result {
            main: true,
            data: media_map(&r.data),
        }),
        (Channel::IoPub, C::ErrorOutput(e)) => {
            state.seen_error = true;
            Some(Event::Error {
                name: e.ename,
                value: e.evalue,
                traceback: e.traceback,
            })
        }
        (Channel::IoPub, C::Status(s)) if s.execution_state == ExecutionState::Idle => {
            state.done = true;
            // Some kernels report a failed cell only in the reply.
            match state.reply_error.take() {
                Some((name, value, traceback)) if !state.seen_error => Some(Event::Error {
                    name,
                    value,
                    traceback,
                }),
                _ => None,
            }
        }
        _ => None,
    }
}

fn media_map(media: &jupyter_protocol::Media) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::to_value(media) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    }
}

/// A silent cell under a lock the caller already holds.
pub struct Execution<'a> {
    kernel: &'a Kernel,
    msg_id: String,
    rx: mpsc::Receiver<(Channel, JupyterMessage)>,
    state: ExecState,
}

impl Execution<'_> {
    pub async fn next(&mut self) -> Option<Event> {
        next_event(&mut self.state, &mut self.rx, self.kernel).await
    }
}

impl Drop for Execution<'_> {
    fn drop(&mut self) {
        self.kernel.unregister(&self.msg_id);
    }
}

async fn next_event(
    st: &mut ExecState,
    rx: &mut mpsc::Receiver<(Channel, JupyterMessage)>,
    kernel: &Kernel,
) -> Option<Event> {
    while !st.done {
        match rx.recv().await {
            Some((ch, msg)) => {
                if let Some(ev) = translate(st, ch, msg) {
                    return Some(ev);
                }
            }
            None => {
                st.done = true;
                st.late_until = Some(tokio::time::Instant::now());
                let status = kernel.exit_status();
                return Some(Event::Error {
                    name: "KernelDied".into(),
                    value: format!(
                        "the kernel exited while running this cell ({status}); its state is lost, the next cell starts a fresh kernel"
                    ),
                    traceback: Vec::new(),
                });
            }
        }
    }
    if !publishes_late(kernel) {
        return None;
    }
    let until = *st
        .late_until
        .get_or_insert_with(|| tokio::time::Instant::now() + LATE_MAX);
    loop {
        let wait = LATE_QUIET.min(until.saturating_duration_since(tokio::time::Instant::now()));
        if wait.is_zero() {
            return None;
        }
        match tokio::time::timeout(wait, rx.recv()).await {
            Ok(Some((ch, msg))) => {
                if let Some(ev) = translate(st, ch, msg) {
                    return Some(ev);
                }
            }
            // Quiet for LATE_QUIET, or the kernel is gone: the cell is over.
            Ok(None) | Err(_) => {
                st.late_until = Some(tokio::time::Instant::now());
                return None;
            }
        }
    }
}

/// A streamed cell holding the kernel's lock.
pub struct OwnedExecution {
    kernel: Arc<Kernel>,
    guard: Option<OwnedMutexGuard<()>>,
    msg_id: String,
    rx: mpsc::Receiver<(Channel, JupyterMessage)>,
    state: ExecState,
}

impl OwnedExecution {
    pub async fn next(&mut self) -> Option<Event> {
        next_event(&mut self.state, &mut self.rx, &self.kernel).await
    }

    pub fn kernel(&self) -> &Arc<Kernel> {
        &self.kernel
    }

    /// Runs a silent clean-up cell under this execution's lock once the main cell is done.
    pub async fn run_silent_after(&mut self, code: &str) {
        if !self.state.done {
            return;
        }
        if let Ok(mut ex) = self.kernel.execute_locked(code, true).await {
            while ex.next().await.is_some() {}
        }
    }
}

impl Drop for OwnedExecution {
    fn drop(&mut self) {
        if self.state.done {
            self.kernel.unregister(&self.msg_id);
            return;
        }
        // Abandoned mid-cell: interrupt, and keep the kernel locked until it is idle again. The
        // route stays registered so the idle status is not missed.
        let kernel = self.kernel.clone();
        let guard = self.guard.take();
        let msg_id = std::mem::take(&mut self.msg_id);
        let mut rx = std::mem::replace(&mut self.rx, mpsc::channel(1).1);
        let mut st = std::mem::take(&mut self.state);
        tracing::info!(kernel = %kernel.kernel_name, "execution abandoned by its client; interrupting the kernel");
        kernel.interrupt();
        tokio::spawn(async move {
            let drained = tokio::time::timeout(INTERRUPT_GRACE, async {
                while next_event(&mut st, &mut rx, &kernel).await.is_some() {}
            })
            .await;
            if drained.is_err() {
                tracing::warn!(kernel = %kernel.kernel_name, "kernel still busy after interrupt");
            }
            kernel.unregister(&msg_id);
            drop(guard);
        });
    }
}

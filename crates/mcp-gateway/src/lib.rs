//! Alcove's MCP gateway: runs inside a sandbox as `mcp-gateway --config '<json>'` (a link to
//! `alcove-agent`, in every template) and serves the requested stdio MCP servers as one MCP
//! Streamable HTTP endpoint on port 50005 at `/mcp`, behind a bearer token.
//!
//! This is what the E2B SDKs start after `Sandbox.create(mcp={...})`: a foreground command, as
//! root, with `GATEWAY_ACCESS_TOKEN` in its environment, that must return 0 once the gateway
//! answers (and leave it running) or fail with a message for the caller. So [`launch`]:
//! 1. checks the config ([`catalog`]: supported names and settings) and that each server is
//!    installed, and writes the token to [`TOKEN_FILE`] (root only; `get_mcp_token()` reads it);
//! 2. starts itself again in the background (`--serve`: its own process group, stdin closed,
//!    logs to [`LOG_FILE`]), which binds the port and says `listening`, then starts every server
//!    and lists their tools ([`gateway`]), and says `ready` (or `error: ...`) on its stdout;
//! 3. returns 0 once `ready` arrives, or non-zero with the error on stderr (stopping the
//!    background half); if the servers are still starting after [`READY_WAIT`], it returns 0
//!    anyway and says so: requests wait for them (see [`http`]), and a later failure reaches
//!    every request as a 503 with the reason. (Python MCP servers can take longer than the SDK's
//!    60 s command timeout to import under emulation on a busy host.)
//!
//! The served side is in [`http`]. Callers: `bin/alcove-agent` (its `mcp-gateway` subcommand).

pub mod catalog;
pub mod gateway;
pub mod http;

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio_util::sync::CancellationToken;

pub use alcove_guest_contract::MCP_GATEWAY_PORT;

/// Where the token is written (what the SDKs' `get_mcp_token()` reads, as root).
pub const TOKEN_FILE: &str = "/etc/mcp-gateway/.token";
/// The background gateway's log (its stderr, and each server's stderr).
pub const LOG_FILE: &str = "/var/log/mcp-gateway.log";
/// The environment variable the SDKs pass the token in.
pub const TOKEN_ENV: &str = "GATEWAY_ACCESS_TOKEN";
/// Longest token accepted.
const MAX_TOKEN: usize = 512;
/// Most bytes read from the background gateway's stdout (a few short lines).
const MAX_READY_OUTPUT: u64 = 16 * 1024;
/// How long the foreground command waits for the servers before returning with them still
/// starting (the SDKs run it under their 60 s command timeout).
pub const READY_WAIT: Duration = Duration::from_secs(30);

/// Everything `mcp-gateway` takes.
#[derive(Debug, Clone)]
pub struct Options {
    /// The servers, as the SDKs send them (`{"filesystem": {"paths": [...]}, ...}`).
    pub config: String,
    pub listen: SocketAddr,
    pub token_file: PathBuf,
    pub log_file: PathBuf,
    /// The token; generated when absent.
    pub token: Option<String>,
    /// How long the foreground waits for the servers ([`READY_WAIT`]; shorter in tests).
    pub ready_wait: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] catalog::ConfigError),
    #[error(
        "MCP server `{server}` is not installed in this sandbox's template ({program} is not on PATH): create the sandbox from the `mcp-gateway` template (the SDKs use it when mcp is given and no template is named)"
    )]
    NotInstalled { server: String, program: String },
    #[error("{TOKEN_ENV} must be 1 to {MAX_TOKEN} printable ASCII characters without spaces")]
    BadToken,
    #[error("writing the token to {path} (the gateway must run as root)")]
    WriteToken {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("opening the log {path}")]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the background gateway")]
    Spawn(#[source] std::io::Error),
    #[error("listening on port {port}: is a gateway already running in this sandbox?")]
    Bind {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Start(#[from] gateway::StartError),
    #[error("{0}")]
    Background(String),
    #[error("setting up the gateway")]
    Runtime(#[source] std::io::Error),
}

/// Checks the config and that every server it names is installed.
pub fn check(config: &str) -> Result<Vec<catalog::ServerSpec>, Error> {
    let specs = catalog::parse(config)?;
    for s in &specs {
        if which(&s.program).is_none() {
            return Err(Error::NotInstalled {
                server: s.name.clone(),
                program: s.program.clone(),
            });
        }
    }
    Ok(specs)
}

/// `mcp-gateway pull NAME...`: in E2B it downloads servers into a template; here the supported
/// servers are part of the `mcp-gateway` template, so it checks that each is installed.
pub fn pull(names: &[String]) -> Result<String, Error> {
    let mut out = Vec::new();
    for (name, program) in catalog::programs(names)? {
        match which(program) {
            Some(p) => out.push(format!("{name}: installed ({})", p.display())),
            None => {
                return Err(Error::NotInstalled {
                    server: name.to_string(),
                    program: program.to_string(),
                });
            }
        }
    }
    Ok(out.join("\n"))
}

fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The token from the environment, checked, or a fresh random one.
pub fn token(given: Option<String>) -> Result<String, Error> {
    match given {
        Some(t) => {
            let ok =
                !t.is_empty() && t.len() <= MAX_TOKEN && t.bytes().all(|b| b.is_ascii_graphic());
            if ok { Ok(t) } else { Err(Error::BadToken) }
        }
        None => {
            let mut b = [0u8; 16];
            let mut f = std::fs::File::open("/dev/urandom").map_err(Error::Runtime)?;
            std::io::Read::read_exact(&mut f, &mut b).map_err(Error::Runtime)?;
            Ok(b.iter().map(|x| format!("{x:02x}")).collect())
        }
    }
}

/// Writes the token readable by its owner only (root), replacing any earlier one atomically.
pub fn write_token(path: &Path, token: &str) -> Result<(), Error> {
    let err = |source| Error::WriteToken {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(token.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

/// The foreground command: checks, writes the token, starts `serve_cmd` (this same program
/// with `--serve`, prepared by the caller) in the background and waits for it to say `ready`.
/// Returns a message for stdout on success.
pub fn launch(opts: &Options, mut serve_cmd: std::process::Command) -> Result<String, Error> {
    let specs = check(&opts.config)?;
    let token = token(opts.token.clone())?;
    write_token(&opts.token_file, &token)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&opts.log_file)
        .map_err(|source| Error::Log {
            path: opts.log_file.clone(),
            source,
        })?;
    {
        use std::os::unix::process::CommandExt;
        serve_cmd
            .env(TOKEN_ENV, &token)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            // Its own process group: a signal to the foreground command's group (the SDK's
            // command ending, or being killed) does not reach the gateway.
            .process_group(0);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)?;
    let result = rt.block_on(wait_ready(serve_cmd, &opts.log_file, opts.ready_wait));
    let names = specs
        .iter()
        .map(|s| s.name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    match result {
        Ok(true) => Ok(format!(
            "MCP gateway ready on port {} at /mcp, serving: {names}",
            opts.listen.port()
        )),
        Ok(false) => Ok(format!(
            "MCP gateway listening on port {} at /mcp; still starting after {}s: {names} (requests wait for them, up to {}s; progress in {})",
            opts.listen.port(),
            opts.ready_wait.as_secs(),
            gateway::START_TIMEOUT.as_secs(),
            opts.log_file.display()
        )),
        Err(e) => {
            let _ = std::fs::remove_file(&opts.token_file);
            Err(e)
        }
    }
}

/// Starts the background half and follows what it says: `Ok(true)` once ready, `Ok(false)` if it
/// listens but its servers are still starting after `wait`, and an error (with the background
/// half stopped) if it fails first.
async fn wait_ready(cmd: std::process::Command, log: &Path, wait: Duration) -> Result<bool, Error> {
    let mut cmd = tokio::process::Command::from(cmd);
    let mut child = cmd.spawn().map_err(Error::Spawn)?;
    let out = child.stdout.take().expect("piped");
    let mut lines = tokio::io::BufReader::new(out.take(MAX_READY_OUTPUT)).lines();
    let deadline = tokio::time::Instant::now() + wait;
    let mut listening = false;
    loop {
        match tokio::time::timeout_at(deadline, lines.next_line()).await {
            Ok(Ok(Some(line))) => {
                if line == "listening" {
                    listening = true;
                } else if line == "ready" {
                    return Ok(true);
                } else if let Some(msg) = line.strip_prefix("error: ") {
                    stop(&mut child).await;
                    return Err(Error::Background(msg.to_string()));
                }
            }
            Ok(_) => {
                let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                return Err(Error::Background(format!(
                    "the gateway exited while starting; the end of {}: {}",
                    log.display(),
                    log_tail(log)
                )));
            }
            Err(_) if listening => return Ok(false),
            Err(_) => {
                stop(&mut child).await;
                return Err(Error::Background(format!(
                    "the gateway did not listen within {}s; the end of {}: {}",
                    wait.as_secs(),
                    log.display(),
                    log_tail(log)
                )));
            }
        }
    }
}

/// Stops the background half: SIGTERM (it stops its servers), then SIGKILL after 5 s.
async fn stop(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        if tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .is_ok()
        {
            return;
        }
    }
    let _ = child.kill().await;
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(1024);
    String::from_utf8_lossy(&text[start..]).trim().to_string()
}

/// The background gateway (`--serve`): binds and says `listening`, starts the servers and says
/// `ready` (or `error: ...`) on stdout, then serves until SIGTERM or SIGINT, and stops the
/// servers. A failure before it listens ends it; a failed server start after that is served to
/// every request as a 503 with the reason, until it is stopped.
pub async fn serve(opts: &Options, announce: bool) -> Result<(), Error> {
    let say = |line: &str| {
        if announce {
            let mut out = std::io::stdout();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    };
    let error_line = |e: &Error| {
        format!(
            "error: {}",
            alcove_guest_contract::error_chain(e).replace('\n', " ")
        )
    };
    let (listener, specs, token) = match bind(opts).await {
        Ok(bound) => bound,
        Err(e) => {
            say(&error_line(&e));
            return Err(e);
        }
    };
    let stop = CancellationToken::new();
    let (phase_tx, phase) = tokio::sync::watch::channel(gateway::Phase::Starting);
    let app = http::router(phase.clone(), token, stop.child_token());
    let signal_stop = stop.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        signal_stop.cancel();
    });
    let served = tokio::spawn(
        axum::serve(listener, app)
            .with_graceful_shutdown(stop.clone().cancelled_owned())
            .into_future(),
    );
    say("listening");
    tokio::select! {
        started = gateway::Gateway::start(&specs) => match started {
            Ok(g) => {
                tracing::info!(
                    addr = %opts.listen,
                    servers = ?g.servers(),
                    tools = g.tools().len(),
                    "MCP gateway ready"
                );
                let _ = phase_tx.send(gateway::Phase::Ready(Arc::new(g)));
                say("ready");
            }
            Err(e) => {
                let e = Error::Start(e);
                let reason = alcove_guest_contract::error_chain(&e).replace('\n', " ");
                tracing::error!("{reason}");
                let _ = phase_tx.send(gateway::Phase::Failed(reason.into()));
                say(&error_line(&e));
            }
        },
        // Stopped while starting: requests waiting for the start are answered now, so the
        // graceful shutdown does not wait for them.
        _ = stop.cancelled() => {
            let _ = phase_tx.send(gateway::Phase::Failed("the gateway is stopping".into()));
        }
    }
    let served = served.await;
    stop.cancel();
    let last = phase_tx.send_replace(gateway::Phase::Failed("the gateway is stopping".into()));
    drop(phase);
    if let gateway::Phase::Ready(g) = last
        && let Ok(g) = Arc::try_unwrap(g)
    {
        g.shutdown().await;
    }
    match served {
        Ok(r) => r.map_err(Error::Runtime),
        Err(e) => Err(Error::Runtime(std::io::Error::other(e))),
    }
}

/// The checks that end the background half before it listens, and the listening socket, with
/// the servers to start and the token.
async fn bind(
    opts: &Options,
) -> Result<(tokio::net::TcpListener, Vec<catalog::ServerSpec>, String), Error> {
    let specs = check(&opts.config)?;
    let token = token(opts.token.clone())?;
    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|source| Error::Bind {
            port: opts.listen.port(),
            source,
        })?;
    Ok((listener, specs, token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_or_generated() {
        assert_eq!(token(Some("abc-123".into())).unwrap(), "abc-123");
        for bad in ["", "has space", "new\nline", &"x".repeat(MAX_TOKEN + 1)] {
            assert!(
                matches!(token(Some(bad.into())), Err(Error::BadToken)),
                "{bad:?}"
            );
        }
        let a = token(None).unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(a, token(None).unwrap());
    }

    #[test]
    fn the_token_file_is_owner_only_and_replaced_whole() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("etc/mcp-gateway/.token");
        write_token(&p, "first").unwrap();
        write_token(&p, "second").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "second");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn refusals_name_the_servers_and_what_to_do() {
        let e = check(r#"{"brave": {}, "time": {}}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`brave`") && e.contains("filesystem"), "{e}");
        // A supported server missing from the template (none is installed on a build host).
        let e = check(r#"{"sequentialthinking": {}}"#)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not installed") && e.contains("`mcp-gateway` template"),
            "{e}"
        );
        let e = pull(&["exa".into()]).unwrap_err().to_string();
        assert!(e.contains("`exa`"), "{e}");
    }
}

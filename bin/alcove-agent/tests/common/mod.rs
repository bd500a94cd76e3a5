//! Test harness: runs the real agent binary with `--listen 127.0.0.1:<free port>` and connects
//! the host client to it over TCP, the way the host does over the virtio-serial channel.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use alcove_agent_client::{AgentClient, RunOutput, RunRequest, Timeouts};

pub struct Agent {
    child: Child,
    pub addr: SocketAddr,
}

impl Agent {
    pub fn start() -> Agent {
        Self::start_with(&[], &[])
    }

    /// Starts the agent with extra flags and environment; returns once it printed its ready line.
    pub fn start_with(args: &[&str], envs: &[(&str, &str)]) -> Agent {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_alcove-agent"));
        cmd.arg("--listen")
            .arg(addr.to_string())
            .args(args)
            .env(
                "ALCOVE_AGENT_LOG",
                std::env::var("ALCOVE_AGENT_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn alcove-agent");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            while let Some(Ok(line)) = lines.next() {
                if line == "ALCOVE_AGENT_READY" {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(30))
            .expect("agent printed ALCOVE_AGENT_READY");
        Agent { child, addr }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn client(&self) -> AgentClient {
        self.client_with(Timeouts::default()).await
    }

    pub async fn client_with(&self, t: Timeouts) -> AgentClient {
        let stream = tokio::net::TcpStream::connect(self.addr)
            .await
            .expect("connect to agent");
        AgentClient::connect(stream, t).await.expect("h2 handshake")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn sh(cmd: &str) -> RunRequest {
    RunRequest {
        cmd: "/bin/bash".into(),
        args: vec!["-c".into(), cmd.into()],
        user: Some("root".into()),
        timeout: Some(Duration::from_secs(60)),
        ..Default::default()
    }
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub async fn run_ok(c: &AgentClient, req: RunRequest) -> RunOutput {
    c.run(req).await.expect("run")
}

use alcove_agent_client::alcove_envd_proto::process::{
    self as pb, process_event, process_selector,
};
use alcove_agent_client::{CallOptions, RpcStream};

impl Agent {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

pub fn root() -> CallOptions {
    CallOptions {
        user: Some("root".into()),
        access_token: None,
    }
}

pub fn by_pid(pid: u32) -> Option<pb::ProcessSelector> {
    Some(pb::ProcessSelector {
        selector: Some(process_selector::Selector::Pid(pid)),
    })
}

pub fn by_tag(tag: &str) -> Option<pb::ProcessSelector> {
    Some(pb::ProcessSelector {
        selector: Some(process_selector::Selector::Tag(tag.into())),
    })
}

pub fn bash(cmd: &str) -> pb::ProcessConfig {
    pb::ProcessConfig {
        cmd: "/bin/bash".into(),
        args: vec!["-c".into(), cmd.into()],
        envs: Default::default(),
        cwd: None,
    }
}

pub async fn start(c: &AgentClient, req: pb::StartRequest) -> RpcStream<pb::StartResponse> {
    c.server_stream("Start", "/process.Process/Start", &req, &root())
        .await
        .expect("start")
}

pub async fn connect_to(
    c: &AgentClient,
    sel: Option<pb::ProcessSelector>,
) -> RpcStream<pb::ConnectResponse> {
    c.server_stream(
        "Connect",
        "/process.Process/Connect",
        &pb::ConnectRequest { process: sel },
        &root(),
    )
    .await
    .expect("connect")
}

/// One process event, whichever stream it came from.
pub fn event_of(e: Option<pb::ProcessEvent>) -> Option<process_event::Event> {
    e.and_then(|e| e.event)
}

/// Reads a Start stream to its end: (pid, stdout+pty, stderr, end).
pub async fn drain(
    s: &mut RpcStream<pb::StartResponse>,
) -> (u32, Vec<u8>, Vec<u8>, process_event::EndEvent) {
    let (mut pid, mut out, mut err) = (0, Vec::new(), Vec::new());
    while let Some(m) = s.next().await {
        match event_of(m.expect("stream message").event) {
            Some(process_event::Event::Start(st)) => pid = st.pid,
            Some(process_event::Event::Data(d)) => match d.output {
                Some(process_event::data_event::Output::Stdout(b))
                | Some(process_event::data_event::Output::Pty(b)) => out.extend_from_slice(&b),
                Some(process_event::data_event::Output::Stderr(b)) => err.extend_from_slice(&b),
                None => {}
            },
            Some(process_event::Event::End(end)) => return (pid, out, err, end),
            _ => {}
        }
    }
    panic!("stream ended without an end event");
}

pub async fn signal(c: &AgentClient, pid: u32, sig: pb::Signal) {
    let _: pb::SendSignalResponse = c
        .unary(
            "SendSignal",
            "/process.Process/SendSignal",
            &pb::SendSignalRequest {
                process: by_pid(pid),
                signal: sig as i32,
            },
            &root(),
        )
        .await
        .expect("send signal");
}

/// Peak resident memory of a process, in bytes (VmHWM).
pub fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap()
        * 1024
}

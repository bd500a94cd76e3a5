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

fn free_port() -> u16 {
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

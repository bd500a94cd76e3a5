//! `mcp-gateway` as the SDKs run it (the foreground command), with a stand-in `mcp-server-time`
//! on PATH: a small stdio MCP server in Python that starts after a delay, or fails. Checks what
//! the command returns when the servers are ready, still starting, or failed, and what requests
//! get meanwhile. No root needed: token and log go to a temporary directory.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Answers initialize, tools/list and tools/call over newline-delimited JSON-RPC on stdio.
const FAKE_SERVER: &str = r#"
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if "id" not in m:
        continue
    meth = m.get("method")
    if meth == "initialize":
        r = {"protocolVersion": m["params"]["protocolVersion"], "capabilities": {"tools": {}},
             "serverInfo": {"name": "fake-time", "version": "1"}}
    elif meth == "tools/list":
        r = {"tools": [{"name": "get_current_time", "description": "now",
                        "inputSchema": {"type": "object"}}]}
    elif meth == "tools/call":
        r = {"content": [{"type": "text", "text": "it is noon UTC"}], "isError": False}
    else:
        r = {}
    sys.stdout.write(json.dumps({"jsonrpc": "2.0", "id": m["id"], "result": r}) + "\n")
    sys.stdout.flush()
"#;

struct Gateway {
    dir: tempfile::TempDir,
    port: u16,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // The background half has the directory in its arguments.
        let _ = Command::new("pkill")
            .arg("-f")
            .arg(self.dir.path())
            .status();
    }
}

/// `mcp-server-time` that runs `prelude` (shell) and then the fake server.
fn gateway(prelude: &str) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("fake.py"), FAKE_SERVER).unwrap();
    let script = dir.path().join("mcp-server-time");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n{prelude}\nexec python3 {}\n",
            dir.path().join("fake.py").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    Gateway {
        dir,
        port: common::free_port(),
    }
}

/// Runs the foreground command; returns (exit code, stdout, stderr, seconds taken).
fn launch(g: &Gateway, ready_wait: u64) -> (i32, String, String, f64) {
    let path = format!(
        "{}:{}",
        g.dir.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_alcove-agent"))
        .args(["mcp-gateway", "--config", r#"{"time": {}}"#])
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", g.port))
        .arg("--token-file")
        .arg(g.dir.path().join("token"))
        .arg("--log-file")
        .arg(g.dir.path().join("log"))
        .arg("--ready-wait")
        .arg(ready_wait.to_string())
        .env("PATH", path)
        .env("GATEWAY_ACCESS_TOKEN", "t0ken")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        started.elapsed().as_secs_f64(),
    )
}

/// POSTs one JSON-RPC request to /mcp with the token; returns (status, body).
fn post(port: u16, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "POST /mcp HTTP/1.1\r\nHost: 50005-sbx.test\r\nAuthorization: Bearer t0ken\r\nContent-Type: application/json\r\nAccept: application/json, text/event-stream\r\nMCP-Protocol-Version: 2025-06-18\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

const INIT: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
const CALL: &str = r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"get_current_time","arguments":{}}}"#;

#[test]
fn a_quick_server_is_ready_when_the_command_returns() {
    let g = gateway("");
    let (code, out, err, _) = launch(&g, 30);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("ready on port") && out.contains("time"),
        "{out}"
    );
    let mode = std::fs::metadata(g.dir.path().join("token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let (status, body) = post(g.port, CALL);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("it is noon UTC"), "{body}");
}

#[test]
fn a_slow_server_lets_the_command_return_and_requests_wait_for_it() {
    let g = gateway("sleep 6");
    let (code, out, err, took) = launch(&g, 1);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("still starting") && out.contains("time"),
        "{out}"
    );
    assert!(took < 5.0, "the command waited {took:.1}s, not about 1 s");
    // The request is held until the server has started, then answered.
    let asked = Instant::now();
    let (status, body) = post(g.port, INIT);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("alcove-mcp-gateway"), "{body}");
    assert!(asked.elapsed() > Duration::from_secs(1), "it did not wait");
    let (status, body) = post(g.port, CALL);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("it is noon UTC"), "{body}");
}

#[test]
fn a_server_that_fails_while_the_command_waits_fails_the_command() {
    let g = gateway("echo 'no tzdata here' >&2; exit 3");
    let (code, out, err, _) = launch(&g, 30);
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("`time`") && err.contains("no tzdata here"),
        "{err}"
    );
    // The token is removed and nothing listens.
    assert!(!g.dir.path().join("token").exists());
    std::thread::sleep(Duration::from_millis(500));
    assert!(TcpStream::connect(("127.0.0.1", g.port)).is_err());
}

#[test]
fn a_server_that_fails_after_the_command_returned_is_reported_to_every_request() {
    let g = gateway("sleep 3; echo 'late failure' >&2; exit 3");
    let (code, out, err, _) = launch(&g, 1);
    assert_eq!(code, 0, "{out}{err}");
    for _ in 0..2 {
        let (status, body) = post(g.port, INIT);
        assert_eq!(status, 503, "{body}");
        assert!(
            body.contains("`time`") && body.contains("late failure"),
            "{body}"
        );
    }
    assert!(log_mentions(&g.dir.path().join("log"), "late failure"));
}

fn log_mentions(log: &Path, what: &str) -> bool {
    std::fs::read_to_string(log).is_ok_and(|t| t.contains(what))
}

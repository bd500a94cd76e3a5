//! A small QMP (QEMU Machine Protocol) client: JSON lines over a unix socket, one command in
//! flight at a time, every exchange bounded by a timeout. Events that arrive between replies are
//! kept (bounded) for callers that wait on them.
//!
//! We use a handful of commands (`stop`, `cont`, `migrate*`, `query-migrate`, `quit`), so an
//! untyped client over serde_json keeps us independent of any crate's snapshot of QEMU's schema
//! (the typed `qapi-qmp` crate deserialises into the enums of the QEMU version it was generated
//! from, while we run whatever QEMU the host's Debian ships).

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Mutex;

const MAX_EVENTS: usize = 256;
const MAX_LINE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("connecting to the QMP socket")]
    Connect(#[source] std::io::Error),
    #[error("QMP i/o")]
    Io(#[source] std::io::Error),
    #[error("QMP connection closed by QEMU")]
    Closed,
    #[error("QMP reply was not valid JSON")]
    BadJson(#[source] serde_json::Error),
    #[error("QMP line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("QMP command `{command}` failed: {class}: {desc}")]
    Command { command: String, class: String, desc: String },
    #[error("QMP command `{0}` timed out after {1:?}")]
    Timeout(String, Duration),
}

struct Conn {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

pub struct Qmp {
    conn: Mutex<Conn>,
    events: std::sync::Mutex<Vec<Value>>,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capability negotiation mode.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path).await.map_err(QmpError::Connect)?;
        let (r, w) = stream.into_split();
        let qmp = Qmp {
            conn: Mutex::new(Conn { reader: BufReader::new(r), writer: w }),
            events: std::sync::Mutex::new(Vec::new()),
        };
        {
            let mut conn = qmp.conn.lock().await;
            let greeting = tokio::time::timeout(timeout, read_line(&mut conn.reader))
                .await
                .map_err(|_| QmpError::Timeout("greeting".into(), timeout))??;
            if greeting.get("QMP").is_none() {
                return Err(QmpError::Command {
                    command: "greeting".into(),
                    class: "Protocol".into(),
                    desc: format!("unexpected greeting {greeting}"),
                });
            }
        }
        qmp.execute("qmp_capabilities", None, timeout).await?;
        Ok(qmp)
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(&self, command: &str, arguments: Option<Value>, timeout: Duration) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = serde_json::to_vec(&msg).expect("a json value serialises");
        line.push(b'\n');
        let mut conn = self.conn.lock().await;
        let exchange = async {
            conn.writer.write_all(&line).await.map_err(QmpError::Io)?;
            loop {
                let v = read_line(&mut conn.reader).await?;
                if let Some(ret) = v.get("return") {
                    return Ok(ret.clone());
                }
                if let Some(err) = v.get("error") {
                    return Err(QmpError::Command {
                        command: command.to_string(),
                        class: err["class"].as_str().unwrap_or("").to_string(),
                        desc: err["desc"].as_str().unwrap_or("").to_string(),
                    });
                }
                if v.get("event").is_some() {
                    let mut events = self.events.lock().expect("events lock");
                    if events.len() >= MAX_EVENTS {
                        events.remove(0);
                    }
                    events.push(v);
                }
            }
        };
        tokio::time::timeout(timeout, exchange).await.map_err(|_| QmpError::Timeout(command.to_string(), timeout))?
    }

    /// Events received so far (oldest first), drained.
    pub fn take_events(&self) -> Vec<Value> {
        std::mem::take(&mut *self.events.lock().expect("events lock"))
    }
}

async fn read_line(reader: &mut BufReader<OwnedReadHalf>) -> Result<Value, QmpError> {
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = (&mut *reader).take(MAX_LINE as u64 + 1).read_until(b'\n', &mut buf).await.map_err(QmpError::Io)?;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        if buf.len() > MAX_LINE {
            return Err(QmpError::LineTooLong);
        }
        if buf.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        return serde_json::from_slice(&buf).map_err(QmpError::BadJson);
    }
}

use tokio::io::AsyncReadExt as _;

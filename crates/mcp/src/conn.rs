//! Who the MCP server talks to, as whom: [`Target`] (the server's URLs), [`Conn`] (one API key's
//! clients, the sandboxes' envd tokens, background commands) and [`Conns`] (a fixed key for
//! stdio, or one `Conn` per caller key for HTTP, bounded).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use alcove_client::{ApiClient, ClientError, EnvdClient, InterpreterClient};
use bytes::Bytes;

use crate::error::ToolError;

/// Where the Alcove server is.
#[derive(Debug, Clone)]
pub struct Target {
    /// The REST API (`E2B_API_URL`).
    pub api_url: String,
    /// Where sandbox traffic goes (`E2B_SANDBOX_URL`): the same listener unless a proxy splits
    /// them.
    pub sandbox_url: String,
}

impl Target {
    pub fn new(api_url: &str, sandbox_url: Option<&str>) -> Self {
        Target {
            api_url: api_url.trim_end_matches('/').to_owned(),
            sandbox_url: sandbox_url
                .unwrap_or(api_url)
                .trim_end_matches('/')
                .to_owned(),
        }
    }
}

/// Background commands one key may hold at once; the oldest finished ones are dropped first.
const MAX_BACKGROUND: usize = 64;
/// Output kept per stream of a background command until it is read (the newest bytes).
pub const MAX_BACKGROUND_OUTPUT: usize = 1 << 20;
/// Caller keys whose clients are kept (HTTP); past it the cache starts over.
const MAX_KEYS: usize = 256;

/// One API key's view of the server.
pub struct Conn {
    pub api: ApiClient,
    pub target: Target,
    envd: Mutex<HashMap<String, Arc<SandboxClients>>>,
    background: Mutex<HashMap<(String, u32), Arc<Background>>>,
}

/// A sandbox's envd and interpreter clients, with its access token.
pub struct SandboxClients {
    /// The sandbox's `envdAccessToken`.
    pub token: Option<String>,
    pub envd: EnvdClient,
    pub interpreter: InterpreterClient,
}

impl Conn {
    pub fn new(target: Target, key: &str) -> Result<Self, ClientError> {
        Ok(Conn {
            api: ApiClient::new(&target.api_url, key)?,
            target,
            envd: Mutex::new(HashMap::new()),
            background: Mutex::new(HashMap::new()),
        })
    }

    /// The sandbox's clients; the first call per sandbox reads its envd token from the API (an
    /// unknown sandbox fails here with the API's 404).
    pub async fn sandbox(&self, id: &str) -> Result<Arc<SandboxClients>, ToolError> {
        if let Some(c) = self.envd.lock().expect("envd map").get(id) {
            return Ok(c.clone());
        }
        let info = self.api.sandbox(id).await.map_err(ToolError::api)?;
        let token = info
            .get("envdAccessToken")
            .and_then(|t| t.as_str())
            .map(str::to_owned);
        let clients = Arc::new(SandboxClients {
            envd: EnvdClient::new(&self.target.sandbox_url, id, token.clone(), None),
            interpreter: InterpreterClient::new(&self.target.sandbox_url, id, token.clone()),
            token,
        });
        let mut map = self.envd.lock().expect("envd map");
        if map.len() >= MAX_KEYS {
            map.clear();
        }
        map.insert(id.to_owned(), clients.clone());
        Ok(clients)
    }

    /// Forgets a sandbox's clients (killed, or its token may have changed).
    pub fn forget(&self, id: &str) {
        self.envd.lock().expect("envd map").remove(id);
        self.background
            .lock()
            .expect("background map")
            .retain(|(s, _), _| s != id);
    }

    /// Records a background command; refuses when `MAX_BACKGROUND` are still running.
    pub fn add_background(
        &self,
        sandbox: &str,
        pid: u32,
        bg: Arc<Background>,
    ) -> Result<(), ToolError> {
        let mut map = self.background.lock().expect("background map");
        if map.len() >= MAX_BACKGROUND {
            let done: Vec<_> = map
                .iter()
                .filter(|(_, b)| b.finished())
                .map(|(k, _)| k.clone())
                .collect();
            for k in done {
                map.remove(&k);
            }
        }
        if map.len() >= MAX_BACKGROUND {
            return Err(ToolError::TooManyBackground {
                limit: MAX_BACKGROUND,
            });
        }
        map.insert((sandbox.to_owned(), pid), bg);
        Ok(())
    }

    pub fn background(&self, sandbox: &str, pid: u32) -> Option<Arc<Background>> {
        self.background
            .lock()
            .expect("background map")
            .get(&(sandbox.to_owned(), pid))
            .cloned()
    }
}

/// A command started with `background: true`: its output as it arrives (newest
/// [`MAX_BACKGROUND_OUTPUT`] bytes per stream until read) and how it ended.
#[derive(Default)]
pub struct Background {
    state: Mutex<BgState>,
    done: tokio::sync::Notify,
}

#[derive(Default)]
struct BgState {
    stdout: Tail,
    stderr: Tail,
    /// `Some` once the process ended: exit code and envd's error text.
    exit: Option<(i32, Option<String>)>,
    /// Set when the stream to envd broke before the process ended.
    lost: Option<String>,
}

/// The newest bytes of a stream, and how many older ones were dropped.
#[derive(Default)]
pub struct Tail {
    pub bytes: Vec<u8>,
    pub dropped: u64,
}

impl Tail {
    pub fn push(&mut self, b: &[u8], cap: usize) {
        self.bytes.extend_from_slice(b);
        if self.bytes.len() > cap {
            let cut = self.bytes.len() - cap;
            self.bytes.drain(..cut);
            self.dropped += cut as u64;
        }
    }

    /// The text, with a note in front when older output was dropped.
    pub fn text(&self) -> String {
        let s = String::from_utf8_lossy(&self.bytes);
        if self.dropped > 0 {
            format!("[… {} earlier bytes dropped …]\n{s}", self.dropped)
        } else {
            s.into_owned()
        }
    }
}

/// What a read of a background command returns: output since the last read, and the end.
pub struct BgSnapshot {
    pub stdout: String,
    pub stderr: String,
    pub exit: Option<(i32, Option<String>)>,
    pub lost: Option<String>,
}

impl Background {
    pub fn stdout(&self, b: &Bytes) {
        self.state
            .lock()
            .expect("bg state")
            .stdout
            .push(b, MAX_BACKGROUND_OUTPUT);
    }

    pub fn stderr(&self, b: &Bytes) {
        self.state
            .lock()
            .expect("bg state")
            .stderr
            .push(b, MAX_BACKGROUND_OUTPUT);
    }

    pub fn end(&self, exit: Option<(i32, Option<String>)>, lost: Option<String>) {
        {
            let mut s = self.state.lock().expect("bg state");
            if s.exit.is_none() {
                s.exit = exit;
            }
            if s.exit.is_none() {
                s.lost = lost.or_else(|| Some("the output stream ended".into()));
            }
        }
        self.done.notify_waiters();
    }

    pub fn finished(&self) -> bool {
        let s = self.state.lock().expect("bg state");
        s.exit.is_some() || s.lost.is_some()
    }

    /// Waits until the command ends or `limit` passes.
    pub async fn wait(&self, limit: std::time::Duration) {
        let notified = self.done.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.finished() {
            return;
        }
        let _ = tokio::time::timeout(limit, notified).await;
    }

    /// The output since the previous take, and the end if it came.
    pub fn take(&self) -> BgSnapshot {
        let mut s = self.state.lock().expect("bg state");
        let snap = BgSnapshot {
            stdout: s.stdout.text(),
            stderr: s.stderr.text(),
            exit: s.exit.clone(),
            lost: s.lost.clone(),
        };
        s.stdout = Tail::default();
        s.stderr = Tail::default();
        snap
    }
}

/// The connections the handler uses: one fixed key (stdio), or the caller's key per request
/// (HTTP; the API's auth layer has already accepted it).
pub enum Conns {
    Fixed(Arc<Conn>),
    PerKey {
        target: Target,
        cache: Mutex<HashMap<String, Arc<Conn>>>,
    },
}

impl Conns {
    pub fn for_key(&self, key: Option<&str>) -> Result<Arc<Conn>, ToolError> {
        match self {
            Conns::Fixed(c) => Ok(c.clone()),
            Conns::PerKey { target, cache } => {
                let key = key.ok_or(ToolError::NoKey)?;
                let mut map = cache.lock().expect("conn cache");
                if let Some(c) = map.get(key) {
                    return Ok(c.clone());
                }
                if map.len() >= MAX_KEYS {
                    map.clear();
                }
                let c = Arc::new(Conn::new(target.clone(), key).map_err(ToolError::api)?);
                map.insert(key.to_owned(), c.clone());
                Ok(c)
            }
        }
    }
}

/// The API key of an HTTP request: `X-API-KEY`, else `Authorization: Bearer`.
pub fn key_of(headers: &http::HeaderMap) -> Option<String> {
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .or_else(|| {
            headers
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
        })
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tail_keeps_the_newest_bytes_and_says_how_many_went() {
        let mut t = Tail::default();
        t.push(b"hello ", 8);
        t.push(b"world", 8);
        assert_eq!(t.bytes, b"lo world");
        assert_eq!(t.dropped, 3);
        assert!(t.text().starts_with("[… 3 earlier bytes dropped …]\n"));
    }

    #[test]
    fn the_key_comes_from_either_header() {
        let mut h = http::HeaderMap::new();
        assert_eq!(key_of(&h), None);
        h.insert("authorization", "Bearer k1".parse().unwrap());
        assert_eq!(key_of(&h).as_deref(), Some("k1"));
        h.insert("x-api-key", "k2".parse().unwrap());
        assert_eq!(key_of(&h).as_deref(), Some("k2"));
    }

    #[tokio::test]
    async fn a_background_read_drains_and_a_wait_ends_at_the_exit() {
        let bg = Arc::new(Background::default());
        bg.stdout(&Bytes::from_static(b"a"));
        let s = bg.take();
        assert_eq!(s.stdout, "a");
        assert!(s.exit.is_none());
        assert_eq!(bg.take().stdout, "");
        let b2 = bg.clone();
        let waiter = tokio::spawn(async move {
            b2.wait(std::time::Duration::from_secs(30)).await;
            b2.finished()
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        bg.end(Some((3, None)), None);
        assert!(waiter.await.unwrap());
        assert_eq!(bg.take().exit, Some((3, None)));
    }
}

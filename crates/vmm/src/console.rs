//! The guest's serial console: QEMU serves it on a unix socket; we read it into a bounded ring so a
//! chatty or hostile guest cannot grow host memory, and watch it for marker lines (the agent's
//! ready line, kernel panics).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tokio::sync::watch;

/// Bytes of console output kept per VM.
pub const CONSOLE_KEEP: usize = 64 * 1024;

#[derive(Clone)]
pub struct Console {
    inner: Arc<Mutex<Ring>>,
    changed: watch::Sender<u64>,
}

struct Ring {
    buf: Vec<u8>,
    /// Total bytes ever received; lets waiters look only at new output.
    total: u64,
}

impl Default for Console {
    fn default() -> Self {
        Console { inner: Arc::new(Mutex::new(Ring { buf: Vec::new(), total: 0 })), changed: watch::channel(0).0 }
    }
}

impl Console {
    /// Connects to QEMU's console socket and pumps it into the ring until QEMU closes it.
    pub async fn attach(&self, path: &Path, timeout: Duration) -> std::io::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        };
        let this = self.clone();
        tokio::spawn(async move {
            let mut chunk = vec![0u8; 8192];
            loop {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => this.push(&chunk[..n]),
                }
            }
        });
        Ok(())
    }

    fn push(&self, data: &[u8]) {
        let total = {
            let mut ring = self.inner.lock().expect("console lock");
            ring.buf.extend_from_slice(data);
            if ring.buf.len() > CONSOLE_KEEP {
                let cut = ring.buf.len() - CONSOLE_KEEP;
                ring.buf.drain(..cut);
            }
            ring.total += data.len() as u64;
            ring.total
        };
        self.changed.send_replace(total);
    }

    /// Everything kept, lossily decoded.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.inner.lock().expect("console lock").buf).into_owned()
    }

    /// The last `n` lines, for error messages.
    pub fn tail(&self, n: usize) -> String {
        let text = self.text();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Waits until a line containing `marker` has been printed (at any time since attach).
    pub async fn wait_for(&self, marker: &str) {
        let mut rx = self.changed.subscribe();
        loop {
            if self.text().contains(marker) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

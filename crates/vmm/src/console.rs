//! The guest's serial console: QEMU serves it on a unix socket; we read it into a bounded ring so a
//! chatty or hostile guest cannot grow host memory, and watch it for marker lines (the agent's
//! ready line, kernel panics). Console text is guest-controlled: what leaves this module for logs
//! and error messages ([`Console::tail`]) has control characters, ANSI escapes and bidi
//! overrides escaped, so a guest cannot rewrite the operator's terminal or forge log lines.

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
        Console {
            inner: Arc::new(Mutex::new(Ring {
                buf: Vec::new(),
                total: 0,
            })),
            changed: watch::channel(0).0,
        }
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

    /// The last `n` lines, for logs and error messages, escaped (see [`escape_for_log`]).
    pub fn tail(&self, n: usize) -> String {
        let text = self.text();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        lines[lines.len().saturating_sub(n)..]
            .iter()
            .map(|l| escape_for_log(l))
            .collect::<Vec<_>>()
            .join("\n")
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

/// Guest text made safe to log: control characters (ESC of ANSI sequences, CR, backspace, C1
/// controls; newlines too, so one line stays one line) and Unicode bidi overrides become visible
/// `\xNN` / `\u{NNNN}` escapes; a backslash is doubled so escapes cannot be forged.
pub fn escape_for_log(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push('\t'),
            c if (c as u32) < 0x80 && c.is_control() => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if c.is_control()
                || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') =>
            {
                out.push_str(&format!("\\u{{{:04x}}}", c as u32))
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_control_and_ansi() {
        assert_eq!(
            escape_for_log("\x1b[2J\x1b[31mroot\r\x08ok\tx\\"),
            "\\x1b[2J\\x1b[31mroot\\x0d\\x08ok\tx\\\\"
        );
        assert_eq!(escape_for_log("a\u{202e}b\u{85}"), "a\\u{202e}b\\u{0085}");
        assert_eq!(escape_for_log("plain ümlaut"), "plain ümlaut");
    }

    #[test]
    fn tail_is_escaped() {
        let c = Console::default();
        c.push(b"boot\n\x1b]0;owned\x07 panic\n");
        assert_eq!(c.tail(5), "boot\n\\x1b]0;owned\\x07 panic");
    }
}

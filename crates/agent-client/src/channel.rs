//! The host end of the agent's virtio-serial channel: bytes up to the session marker that the
//! agent writes at the start of each session are stale (the previous session's last frames) and
//! are dropped before HTTP/2 sees the stream.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use alcove_envd_proto::CHANNEL_SESSION_MARKER as MARKER;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Stale bytes tolerated before the marker; more means the peer is not an Alcove agent.
const MAX_SKIP: usize = 1 << 20;

pub struct SkipToSession<IO> {
    io: IO,
    matched: usize,
    skipped: usize,
    found: bool,
    /// Bytes after the marker that arrived with it.
    pending: Vec<u8>,
}

impl<IO> SkipToSession<IO> {
    pub fn new(io: IO) -> Self {
        SkipToSession {
            io,
            matched: 0,
            skipped: 0,
            found: false,
            pending: Vec::new(),
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for SkipToSession<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.found {
                if !this.pending.is_empty() {
                    let n = this.pending.len().min(buf.remaining());
                    buf.put_slice(&this.pending[..n]);
                    this.pending.drain(..n);
                    return Poll::Ready(Ok(()));
                }
                return Pin::new(&mut this.io).poll_read(cx, buf);
            }
            let mut tmp = [0u8; 4096];
            let mut rb = ReadBuf::new(&mut tmp);
            ready!(Pin::new(&mut this.io).poll_read(cx, &mut rb))?;
            let data = rb.filled();
            if data.is_empty() {
                return Poll::Ready(Ok(()));
            }
            for (i, &b) in data.iter().enumerate() {
                if b == MARKER[this.matched] {
                    this.matched += 1;
                } else {
                    this.matched = usize::from(b == MARKER[0]);
                }
                if this.matched == MARKER.len() {
                    this.found = true;
                    this.pending.extend_from_slice(&data[i + 1..]);
                    break;
                }
            }
            if !this.found {
                this.skipped += data.len();
                if this.skipped > MAX_SKIP {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "no session marker from the agent: the channel peer is not an Alcove agent",
                    )));
                }
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for SkipToSession<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn drops_stale_bytes_up_to_the_marker_even_when_split() {
        let (mut agent, host) = tokio::io::duplex(64);
        let mut host = SkipToSession::new(host);
        tokio::spawn(async move {
            agent
                .write_all(b"stale GOAWAY bytes \0alcove-")
                .await
                .unwrap();
            agent.write_all(b"session\0hello").await.unwrap();
        });
        let mut out = [0u8; 5];
        host.read_exact(&mut out).await.unwrap();
        assert_eq!(&out, b"hello");
    }

    #[tokio::test]
    async fn a_partial_marker_match_restarts_correctly() {
        let (mut agent, host) = tokio::io::duplex(64);
        let mut host = SkipToSession::new(host);
        tokio::spawn(async move {
            agent.write_all(b"\0\0alcove-session\0ok").await.unwrap();
        });
        let mut out = [0u8; 2];
        host.read_exact(&mut out).await.unwrap();
        assert_eq!(&out, b"ok");
    }
}

//! Connect streams that end cleanly when their sandbox goes away.
//!
//! envd's streaming calls (`process.Start`, `Connect`, `WatchDir`...) answer with
//! `application/connect+json` or `+proto`: length-prefixed messages, the last one flagged
//! end-of-stream with the call's status. When the sandbox is killed mid-call, the upstream body
//! just breaks, and a client sees a transport error ("unexpected EOF during chunk size line").
//! [`ConnectEnd`] turns that into what the protocol has for it: an end-of-stream message with
//! `unavailable` and a message saying the connection to the sandbox ended. The SDKs then probe
//! the sandbox and, finding it gone, raise their own "killed or reached its end of life" error.
//! A break in the middle of a message cannot be mended (the client has half a message); that
//! one is passed on as it is.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::body::Body;
use bytes::{BufMut, Bytes, BytesMut};
use http_body::{Frame, SizeHint};

/// Whether a response is a Connect stream (what [`ConnectEnd`] applies to).
pub fn is_connect_stream(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/connect+"))
}

/// Connect's envelope flag for the end-of-stream message.
const END_STREAM: u8 = 0x02;

/// Where the stream is in its envelopes.
#[derive(Debug, Default)]
struct Envelopes {
    header: [u8; 5],
    header_len: usize,
    /// Bytes of the current message still to come.
    remaining: u64,
    /// The upstream sent its own end-of-stream message.
    ended: bool,
}

impl Envelopes {
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = (self.remaining as usize).min(data.len());
                self.remaining -= n as u64;
                data = &data[n..];
                continue;
            }
            let n = (5 - self.header_len).min(data.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&data[..n]);
            self.header_len += n;
            data = &data[n..];
            if self.header_len == 5 {
                self.header_len = 0;
                self.remaining = u64::from(u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]));
                if self.header[0] & END_STREAM != 0 {
                    self.ended = true;
                }
            }
        }
    }

    fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.remaining == 0
    }
}

/// A Connect stream's body that ends with an `unavailable` end-of-stream message, not a broken
/// body, when the upstream breaks between messages.
pub struct ConnectEnd {
    inner: Body,
    sandbox_id: String,
    seen: Envelopes,
    /// The closing message was sent: nothing more follows.
    closed: bool,
}

impl ConnectEnd {
    pub fn new(inner: Body, sandbox_id: String) -> Self {
        ConnectEnd {
            inner,
            sandbox_id,
            seen: Envelopes::default(),
            closed: false,
        }
    }

    fn closing_message(&self) -> Bytes {
        let body = serde_json::json!({
            "error": {
                "code": "unavailable",
                "message": format!(
                    "the connection to sandbox {} ended before the stream completed: the \
                     sandbox was killed, reached its end time or its agent stopped; check it \
                     with GET /sandboxes/{}",
                    self.sandbox_id, self.sandbox_id
                ),
            }
        })
        .to_string();
        let mut b = BytesMut::with_capacity(5 + body.len());
        b.put_u8(END_STREAM);
        b.put_u32(body.len() as u32);
        b.put_slice(body.as_bytes());
        b.freeze()
    }

    /// Whether a break now can be closed with a message of ours.
    fn mendable(&self) -> bool {
        !self.seen.ended && self.seen.at_boundary()
    }
}

impl http_body::Body for ConnectEnd {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.closed {
            return Poll::Ready(None);
        }
        let polled = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        match polled {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let data = data.clone();
                    self.seen.feed(&data);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) if self.mendable() => {
                tracing::info!(
                    sandbox_id = %self.sandbox_id, error = %e,
                    "a Connect stream from the sandbox broke; ending it with `unavailable`"
                );
                self.closed = true;
                Poll::Ready(Some(Ok(Frame::data(self.closing_message()))))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e))),
            // A Connect stream always ends with its own end-of-stream message.
            None if self.mendable() => {
                self.closed = true;
                Poll::Ready(Some(Ok(Frame::data(self.closing_message()))))
            }
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.closed
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn envelope(flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![flags];
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    /// A body of `chunks`, then an error if `breaks`.
    fn upstream(chunks: Vec<Vec<u8>>, breaks: bool) -> Body {
        let mut items: Vec<Result<Bytes, std::io::Error>> =
            chunks.into_iter().map(|c| Ok(Bytes::from(c))).collect();
        if breaks {
            items.push(Err(std::io::Error::other("unexpected EOF")));
        }
        Body::from_stream(futures::stream::iter(items))
    }

    async fn collect(b: ConnectEnd) -> (Vec<u8>, bool) {
        let mut b = b;
        let mut out = Vec::new();
        loop {
            match b.frame().await {
                Some(Ok(f)) => out.extend_from_slice(f.data_ref().unwrap()),
                Some(Err(_)) => return (out, true),
                None => return (out, false),
            }
        }
    }

    #[tokio::test]
    async fn a_break_between_messages_ends_with_unavailable() {
        let msg = envelope(0, b"{\"event\":{}}");
        // The message arrives in two pieces, then the connection breaks.
        let body = upstream(vec![msg[..3].to_vec(), msg[3..].to_vec()], true);
        let (out, errored) = collect(ConnectEnd::new(body, "sbx1".into())).await;
        assert!(!errored);
        assert_eq!(&out[..msg.len()], &msg[..]);
        let tail = &out[msg.len()..];
        assert_eq!(tail[0], END_STREAM);
        let len = u32::from_be_bytes([tail[1], tail[2], tail[3], tail[4]]) as usize;
        let v: serde_json::Value = serde_json::from_slice(&tail[5..5 + len]).unwrap();
        assert_eq!(v["error"]["code"], "unavailable");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("sandbox sbx1")
        );
        // An upstream that just stops without its end message gets one too.
        let (out, _) = collect(ConnectEnd::new(
            upstream(vec![msg.clone()], false),
            "s".into(),
        ))
        .await;
        assert_eq!(out[msg.len()], END_STREAM);
    }

    #[tokio::test]
    async fn complete_streams_and_breaks_inside_a_message_pass_unchanged() {
        let mut whole = envelope(0, b"{}");
        whole.extend(envelope(END_STREAM, b"{}"));
        let (out, errored) = collect(ConnectEnd::new(
            upstream(vec![whole.clone()], false),
            "s".into(),
        ))
        .await;
        assert_eq!((out, errored), (whole.clone(), false));
        // After the upstream's own end message, a break is only a break.
        let (_, errored) = collect(ConnectEnd::new(upstream(vec![whole], true), "s".into())).await;
        assert!(errored);
        // Half a message, then a break: nothing can be appended.
        let msg = envelope(0, b"{\"event\":{}}");
        let (out, errored) = collect(ConnectEnd::new(
            upstream(vec![msg[..7].to_vec()], true),
            "s".into(),
        ))
        .await;
        assert_eq!((out, errored), (msg[..7].to_vec(), true));
    }

    #[test]
    fn only_connect_streams_are_wrapped() {
        let mut h = http::HeaderMap::new();
        h.insert("content-type", "application/connect+json".parse().unwrap());
        assert!(is_connect_stream(&h));
        h.insert("content-type", "application/json".parse().unwrap());
        assert!(!is_connect_stream(&h));
    }
}

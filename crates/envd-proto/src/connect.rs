//! The Connect protocol's shared pieces (connectrpc.com/docs/protocol), codec-agnostic.
//!
//! Streaming calls carry messages in envelopes: one flags byte, a big-endian u32 length, the
//! payload. The last envelope of a server stream has [`FLAG_END_STREAM`] and a JSON
//! [`EndStream`] payload that carries the call's error, if any. Unary calls send the bare message
//! and report errors as an HTTP status plus a JSON [`ErrorBody`]. Both ends of Alcove (agent and
//! host client) use these helpers so the framing lives in one place.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// The envelope carries a compressed payload (Alcove never compresses and rejects these).
pub const FLAG_COMPRESSED: u8 = 0b01;
/// The envelope is the end-of-stream message.
pub const FLAG_END_STREAM: u8 = 0b10;
/// Header bytes in front of every envelope payload.
pub const ENVELOPE_HEADER_LEN: usize = 5;

/// Message encoding, picked by the request's content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    Proto,
    Json,
}

/// Unary or streaming framing, picked by the request's content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Unary,
    Streaming,
}

impl Codec {
    /// Parses a request content type (`application/json`, `application/connect+proto`, ...).
    pub fn from_content_type(content_type: &str) -> Option<(Codec, Framing)> {
        let base = content_type.split(';').next().unwrap_or("").trim();
        match base.to_ascii_lowercase().as_str() {
            "application/proto" => Some((Codec::Proto, Framing::Unary)),
            "application/json" => Some((Codec::Json, Framing::Unary)),
            "application/connect+proto" => Some((Codec::Proto, Framing::Streaming)),
            "application/connect+json" => Some((Codec::Json, Framing::Streaming)),
            _ => None,
        }
    }

    /// The content type a response (or request) in this codec and framing carries.
    pub fn content_type(self, framing: Framing) -> &'static str {
        match (self, framing) {
            (Codec::Proto, Framing::Unary) => "application/proto",
            (Codec::Json, Framing::Unary) => "application/json",
            (Codec::Proto, Framing::Streaming) => "application/connect+proto",
            (Codec::Json, Framing::Streaming) => "application/connect+json",
        }
    }

    pub fn encode<M: prost::Message + Serialize>(self, msg: &M) -> Bytes {
        match self {
            Codec::Proto => Bytes::from(msg.encode_to_vec()),
            // Serializing generated types to a Vec cannot fail: no maps with non-string keys.
            Codec::Json => Bytes::from(serde_json::to_vec(msg).unwrap_or_default()),
        }
    }

    pub fn decode<M: prost::Message + Default + DeserializeOwned>(
        self,
        bytes: &[u8],
    ) -> Result<M, DecodeError> {
        match self {
            Codec::Proto => M::decode(bytes).map_err(DecodeError::Proto),
            // An empty JSON body is the empty message, as connect-go accepts.
            Codec::Json if bytes.iter().all(u8::is_ascii_whitespace) => Ok(M::default()),
            Codec::Json => serde_json::from_slice(bytes).map_err(DecodeError::Json),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("invalid protobuf message")]
    Proto(#[source] prost::DecodeError),
    #[error("invalid JSON message")]
    Json(#[source] serde_json::Error),
}

/// Connect error codes, with the HTTP status a unary error response carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    Canceled,
    Unknown,
    InvalidArgument,
    DeadlineExceeded,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Aborted,
    OutOfRange,
    Unimplemented,
    Internal,
    Unavailable,
    DataLoss,
    Unauthenticated,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Canceled => "canceled",
            Code::Unknown => "unknown",
            Code::InvalidArgument => "invalid_argument",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Aborted => "aborted",
            Code::OutOfRange => "out_of_range",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::DataLoss => "data_loss",
            Code::Unauthenticated => "unauthenticated",
        }
    }

    /// The HTTP status of a unary error response (Connect protocol's table).
    pub fn http_status(self) -> u16 {
        match self {
            Code::Canceled => 499,
            Code::Unknown => 500,
            Code::InvalidArgument => 400,
            Code::DeadlineExceeded => 504,
            Code::NotFound => 404,
            Code::AlreadyExists => 409,
            Code::PermissionDenied => 403,
            Code::ResourceExhausted => 429,
            Code::FailedPrecondition => 400,
            Code::Aborted => 409,
            Code::OutOfRange => 400,
            Code::Unimplemented => 501,
            Code::Internal => 500,
            Code::Unavailable => 503,
            Code::DataLoss => 500,
            Code::Unauthenticated => 401,
        }
    }

    /// The code a client infers from a non-Connect HTTP error status.
    pub fn from_http_status(status: u16) -> Code {
        match status {
            400 => Code::InvalidArgument,
            401 => Code::Unauthenticated,
            403 => Code::PermissionDenied,
            404 => Code::NotFound,
            409 => Code::AlreadyExists,
            413 | 429 => Code::ResourceExhausted,
            499 => Code::Canceled,
            501 | 505 => Code::Unimplemented,
            502 | 503 => Code::Unavailable,
            504 => Code::DeadlineExceeded,
            _ => Code::Unknown,
        }
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Connect error as it travels: the unary error body, or `error` in [`EndStream`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: Code,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// The payload of the end-of-stream envelope.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct EndStream {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

/// Frames one envelope.
pub fn encode_envelope(flags: u8, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(ENVELOPE_HEADER_LEN + payload.len());
    b.put_u8(flags);
    b.put_u32(payload.len() as u32);
    b.put_slice(payload);
    b.freeze()
}

/// Frames a message in a codec.
pub fn encode_message<M: prost::Message + Serialize>(codec: Codec, msg: &M) -> Bytes {
    encode_envelope(0, &codec.encode(msg))
}

/// Frames the end of a stream, with the call's error if it failed.
pub fn encode_end_stream(error: Option<ErrorBody>) -> Bytes {
    let payload = serde_json::to_vec(&EndStream { error }).unwrap_or_else(|_| b"{}".to_vec());
    encode_envelope(FLAG_END_STREAM, &payload)
}

/// One received envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub flags: u8,
    pub payload: Bytes,
}

impl Envelope {
    pub fn is_end_stream(&self) -> bool {
        self.flags & FLAG_END_STREAM != 0
    }

    /// Parses an end-of-stream payload.
    pub fn end_stream(&self) -> Result<EndStream, DecodeError> {
        serde_json::from_slice(&self.payload).map_err(DecodeError::Json)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("envelope of {len} bytes exceeds the limit of {limit}")]
    TooLarge { len: usize, limit: usize },
    #[error("compressed envelopes are not supported")]
    Compressed,
}

/// Incremental envelope parser for a byte stream that arrives in arbitrary chunks.
#[derive(Debug)]
pub struct EnvelopeDecoder {
    buf: BytesMut,
    max_message: usize,
}

impl EnvelopeDecoder {
    /// `max_message` bounds a single payload, so a hostile peer cannot make us buffer without end.
    pub fn new(max_message: usize) -> Self {
        EnvelopeDecoder {
            buf: BytesMut::new(),
            max_message,
        }
    }

    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// Bytes held that do not yet form a whole envelope.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next whole envelope, if one has arrived.
    pub fn next_envelope(&mut self) -> Result<Option<Envelope>, FrameError> {
        if self.buf.len() < ENVELOPE_HEADER_LEN {
            return Ok(None);
        }
        let flags = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > self.max_message {
            return Err(FrameError::TooLarge {
                len,
                limit: self.max_message,
            });
        }
        if flags & FLAG_COMPRESSED != 0 {
            return Err(FrameError::Compressed);
        }
        if self.buf.len() < ENVELOPE_HEADER_LEN + len {
            return Ok(None);
        }
        self.buf.advance(ENVELOPE_HEADER_LEN);
        let payload = self.buf.split_to(len).freeze();
        Ok(Some(Envelope { flags, payload }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::{ProcessEvent, StartResponse, process_event};

    #[test]
    fn envelopes_split_across_chunks_reassemble() {
        let a = encode_envelope(0, b"hello");
        let b = encode_end_stream(None);
        let mut all = a.to_vec();
        all.extend_from_slice(&b);
        let mut d = EnvelopeDecoder::new(1024);
        let mut got = Vec::new();
        for byte in all {
            d.push(&[byte]);
            while let Some(e) = d.next_envelope().unwrap() {
                got.push(e);
            }
        }
        assert_eq!(got.len(), 2);
        assert_eq!(&got[0].payload[..], b"hello");
        assert!(got[1].is_end_stream());
        assert!(got[1].end_stream().unwrap().error.is_none());
    }

    #[test]
    fn oversized_envelope_is_refused() {
        let mut d = EnvelopeDecoder::new(4);
        d.push(&encode_envelope(0, b"hello"));
        assert!(matches!(
            d.next_envelope(),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn json_uses_proto3_mapping() {
        let msg = StartResponse {
            event: Some(ProcessEvent {
                event: Some(process_event::Event::Data(process_event::DataEvent {
                    output: Some(process_event::data_event::Output::Stdout(
                        Bytes::from_static(b"hi\n"),
                    )),
                })),
            }),
        };
        let json = String::from_utf8(Codec::Json.encode(&msg).to_vec()).unwrap();
        assert_eq!(json, r#"{"event":{"data":{"stdout":"aGkK"}}}"#);
        let back: StartResponse = Codec::Json.decode(json.as_bytes()).unwrap();
        assert_eq!(back, msg);
        let end = process_event::EndEvent {
            exit_code: -1,
            exited: false,
            status: "signal: killed".into(),
            error: None,
        };
        let json = serde_json::to_string(&end).unwrap();
        assert_eq!(json, r#"{"exitCode":-1,"status":"signal: killed"}"#);
    }

    #[test]
    fn error_codes_round_trip_as_snake_case() {
        let e = ErrorBody {
            code: Code::NotFound,
            message: "no such process".into(),
        };
        let s = serde_json::to_string(&e).unwrap();
        assert_eq!(s, r#"{"code":"not_found","message":"no such process"}"#);
        assert_eq!(Code::NotFound.http_status(), 404);
    }
}

//! The frames a guest's volume filesystem and the host exchange over one agent stream.
//!
//! The host opens the stream (`POST /alcove/volumes` on the agent) and sends [`Hello`] with the
//! mounts; the guest mounts them, answers [`HelloReply`], and from then on sends [`Request`]s
//! (paths relative to a mount's root) which the host answers with [`Response`]s, any number in
//! flight, matched by `id`. A new stream (after a restore, a resume, a host restart) replaces the
//! old one; the guest holds requests until one is there.
//!
//! A frame is `u32 header length | u32 data length | header (JSON) | data`, big-endian lengths.
//! Data carries file bytes (a read's answer, a write's payload); everything else is the header.
//! Both sides bound what they accept: [`MAX_REQUEST_HEADER`] and [`MAX_DATA`] from the guest,
//! [`MAX_RESPONSE_HEADER`] from the host.

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::MountSpec;
use crate::root::{Attr, SetAttr, StatFs};

/// The agent's route for the session.
pub const PATH: &str = "/alcove/volumes";
/// A request header's largest size (paths are at most 4 KiB; two of them in a rename).
pub const MAX_REQUEST_HEADER: usize = 64 << 10;
/// A response header's largest size (a directory listing of [`MAX_DIR_ENTRIES`]).
pub const MAX_RESPONSE_HEADER: usize = 64 << 20;
/// The most bytes one read or write moves.
pub const MAX_DATA: usize = 1 << 20;
/// The most entries one directory listing returns.
pub const MAX_DIR_ENTRIES: usize = 100_000;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Hello {
    pub mounts: Vec<HelloMount>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct HelloMount {
    #[serde(flatten)]
    pub spec: MountSpec,
}

/// One result per mount, in order: `None` mounted (or already was), `Some(why)` failed.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct HelloReply {
    pub mounts: Vec<Option<String>>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Request {
    pub id: u64,
    /// Index into the hello's mounts.
    pub mount: u32,
    pub op: Op,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    Lstat {
        path: String,
    },
    Readdir {
        path: String,
    },
    Read {
        path: String,
        offset: u64,
        len: u32,
    },
    /// The bytes are the frame's data.
    Write {
        path: String,
        offset: u64,
    },
    Create {
        path: String,
        mode: u32,
        uid: u32,
        gid: u32,
        exclusive: bool,
    },
    Mkdir {
        path: String,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    Symlink {
        path: String,
        target: String,
        uid: u32,
        gid: u32,
    },
    Readlink {
        path: String,
    },
    Unlink {
        path: String,
    },
    Rmdir {
        path: String,
    },
    Rename {
        from: String,
        to: String,
        flags: u32,
    },
    Setattr {
        path: String,
        set: SetAttr,
    },
    Fsync {
        path: String,
    },
    Statfs,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Response {
    pub id: u64,
    /// An errno on failure.
    pub result: Result<Reply, i32>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Attr(Attr),
    Entries(Vec<(String, Attr)>),
    /// The bytes are the frame's data.
    Data,
    Written(u64),
    Target(String),
    StatFs(StatFs),
    Done,
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("reading a volume frame")]
    Read(#[source] std::io::Error),
    #[error("a volume frame's header is {0} bytes, over the limit")]
    HeaderTooLarge(usize),
    #[error("a volume frame carries {0} bytes of data, over the limit")]
    DataTooLarge(usize),
    #[error("a volume frame's header is not valid")]
    Decode(#[source] serde_json::Error),
}

/// One frame: a serialized header and data.
pub fn encode<T: serde::Serialize>(header: &T, data: &[u8]) -> Bytes {
    let json = serde_json::to_vec(header).expect("wire types always serialize");
    let mut out = BytesMut::with_capacity(8 + json.len() + data.len());
    out.put_u32(json.len() as u32);
    out.put_u32(data.len() as u32);
    out.put_slice(&json);
    out.put_slice(data);
    out.freeze()
}

/// Reads one frame; `Ok(None)` at a clean end of stream (between frames).
pub async fn read_frame<R, T>(
    r: &mut R,
    max_header: usize,
    max_data: usize,
) -> Result<Option<(T, Bytes)>, FrameError>
where
    R: AsyncRead + Unpin,
    T: serde::de::DeserializeOwned,
{
    let mut lens = [0u8; 8];
    match r.read_exact(&mut lens).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(FrameError::Read(e)),
    }
    let header_len = u32::from_be_bytes(lens[..4].try_into().expect("4 bytes")) as usize;
    let data_len = u32::from_be_bytes(lens[4..].try_into().expect("4 bytes")) as usize;
    if header_len > max_header {
        return Err(FrameError::HeaderTooLarge(header_len));
    }
    if data_len > max_data {
        return Err(FrameError::DataTooLarge(data_len));
    }
    let mut header = vec![0u8; header_len];
    r.read_exact(&mut header).await.map_err(FrameError::Read)?;
    let mut data = vec![0u8; data_len];
    r.read_exact(&mut data).await.map_err(FrameError::Read)?;
    let header = serde_json::from_slice(&header).map_err(FrameError::Decode)?;
    Ok(Some((header, Bytes::from(data))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_are_bounded() {
        let req = Request {
            id: 7,
            mount: 0,
            op: Op::Write {
                path: "a/b".into(),
                offset: 3,
            },
        };
        let frame = encode(&req, b"hello");
        let mut r = &frame[..];
        let (got, data): (Request, Bytes) = read_frame(&mut r, MAX_REQUEST_HEADER, MAX_DATA)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, req);
        assert_eq!(&data[..], b"hello");
        let mut empty: &[u8] = &[];
        assert!(
            read_frame::<_, Request>(&mut empty, 10, 10)
                .await
                .unwrap()
                .is_none()
        );
        let mut r = &frame[..];
        assert!(matches!(
            read_frame::<_, Request>(&mut r, 4, MAX_DATA).await,
            Err(FrameError::HeaderTooLarge(_))
        ));
        let mut r = &frame[..];
        assert!(matches!(
            read_frame::<_, Request>(&mut r, MAX_REQUEST_HEADER, 2).await,
            Err(FrameError::DataTooLarge(_))
        ));
    }
}

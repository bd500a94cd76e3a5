//! The host's side of a guest's volume session: requests from the guest in, answers out.
//!
//! The guest is hostile: every frame is bounded ([`wire::MAX_REQUEST_HEADER`],
//! [`wire::MAX_DATA`]), every path goes through [`Root`]'s checks, at most
//! [`MAX_IN_FLIGHT`] requests run at once (the rest wait in the stream, so a flood only slows
//! its own sandbox), and each runs on the blocking pool.

use std::sync::Arc;

use bytes::Bytes;
use tokio::io::AsyncRead;
use tokio::sync::{Semaphore, mpsc};

use crate::root::{Owner, Root};
use crate::wire::{self, FrameError, Op, Reply, Request, Response};
use crate::{VolError, root::Kind};

/// Requests one session runs at once.
pub const MAX_IN_FLIGHT: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("the guest sent a bad volume frame")]
    Frame(#[source] FrameError),
    #[error("the guest's volume session was closed")]
    Closed,
}

/// One mount as the host serves it.
#[derive(Debug, Clone)]
pub struct Served {
    pub root: Arc<Root>,
}

/// Answers requests read from `from_guest` on `to_guest` until the guest's stream ends or the
/// receiver of `to_guest` is dropped. Requests name mounts by index into `mounts`.
pub async fn serve<R>(
    mounts: Vec<Served>,
    mut from_guest: R,
    to_guest: mpsc::Sender<Bytes>,
) -> Result<(), ServeError>
where
    R: AsyncRead + Unpin,
{
    let mounts = Arc::new(mounts);
    let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    loop {
        let frame = wire::read_frame::<_, Request>(
            &mut from_guest,
            wire::MAX_REQUEST_HEADER,
            wire::MAX_DATA,
        )
        .await
        .map_err(ServeError::Frame)?;
        let Some((req, data)) = frame else {
            return Ok(());
        };
        let permit = Arc::clone(&permits)
            .acquire_owned()
            .await
            .map_err(|_| ServeError::Closed)?;
        let mounts = Arc::clone(&mounts);
        let to_guest = to_guest.clone();
        if to_guest.is_closed() {
            return Err(ServeError::Closed);
        }
        tokio::spawn(async move {
            let id = req.id;
            let answer = tokio::task::spawn_blocking(move || handle(&mounts, req, data))
                .await
                .unwrap_or_else(|_| (Err(rustix::io::Errno::IO.raw_os_error()), Bytes::new()));
            let frame = wire::encode(
                &Response {
                    id,
                    result: answer.0,
                },
                &answer.1,
            );
            let _ = to_guest.send(frame).await;
            drop(permit);
        });
    }
}

fn handle(mounts: &[Served], req: Request, data: Bytes) -> (Result<Reply, i32>, Bytes) {
    let Some(m) = mounts.get(req.mount as usize) else {
        return (Err(rustix::io::Errno::NODEV.raw_os_error()), Bytes::new());
    };
    let root = &m.root;
    let mut out = Bytes::new();
    let result: Result<Reply, VolError> = match req.op {
        Op::Lstat { path } => root.lstat(&path).map(Reply::Attr),
        Op::Readdir { path } => root
            .readdir(&path, wire::MAX_DIR_ENTRIES)
            .map(Reply::Entries),
        Op::Read { path, offset, len } => {
            let len = (len as usize).min(wire::MAX_DATA);
            root.read(&path, offset, len).map(|bytes| {
                out = Bytes::from(bytes);
                Reply::Data
            })
        }
        Op::Write { path, offset } => root
            .write(&path, offset, &data)
            .map(|n| Reply::Written(n as u64)),
        Op::Create {
            path,
            mode,
            uid,
            gid,
            exclusive,
        } => root
            .create(&path, mode, owner(uid, gid), exclusive)
            .map(Reply::Attr),
        Op::Mkdir {
            path,
            mode,
            uid,
            gid,
        } => root.mkdir(&path, mode, owner(uid, gid)).map(Reply::Attr),
        Op::Symlink {
            path,
            target,
            uid,
            gid,
        } => root
            .symlink(&path, &target, owner(uid, gid))
            .map(Reply::Attr),
        Op::Readlink { path } => root.readlink(&path).map(Reply::Target),
        Op::Unlink { path } => root.unlink(&path).map(|()| Reply::Done),
        Op::Rmdir { path } => root.rmdir(&path).map(|()| Reply::Done),
        Op::Rename { from, to, flags } => root.rename(&from, &to, flags).map(|()| Reply::Done),
        Op::Setattr { path, set } => root.setattr(&path, &set).map(Reply::Attr),
        Op::Fsync { path } => match root.lstat(&path) {
            Ok(a) if a.kind == Kind::File => root.fsync(&path).map(|()| Reply::Done),
            Ok(_) => Ok(Reply::Done),
            Err(e) => Err(e),
        },
        Op::Statfs => root.statfs().map(Reply::StatFs),
    };
    match result {
        Ok(reply) => (Ok(reply), out),
        Err(e) => {
            if matches!(e, VolError::Io(_)) {
                tracing::debug!(error = %e, "volume: a guest request failed");
            }
            (Err(e.errno()), Bytes::new())
        }
    }
}

fn owner(uid: u32, gid: u32) -> Owner {
    Owner {
        uid: Some(uid),
        gid: Some(gid),
    }
}

//! Volumes in the guest: a FUSE filesystem per mount whose every operation is a request to the
//! host over the volume session (`POST /alcove/volumes`, frames in `alcove_volume::wire`).
//!
//! The files never live in the guest: the host holds them (its `alcove_volume::Root` checks
//! every path) and the guest keeps only an inode table (inode number ↔ path from the volume's
//! root, counted by the kernel's lookups). Attributes and names are cached by the kernel for
//! [`TTL`], and file pages are dropped at every open, so several sandboxes sharing a volume see
//! each other's changes within a second and at the next open.
//!
//! Sessions: the host opens one after `/init` and again after every restore (resume, fork,
//! re-attach); a new session replaces the old and re-sends the requests that were in flight, so
//! the mounts outlive pauses. With no session, requests wait [`SESSION_WAIT`], then fail EIO; an
//! answer that takes longer than [`ANSWER_WAIT`] fails EIO too.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use alcove_volume::MountSpec;
use alcove_volume::wire::{self, Hello, HelloReply, Op, Reply, Request, Response};
use alcove_volume::{Attr, Kind, SetAttr};
use bytes::Bytes;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request as FReq,
    TimeOrNow, WriteFlags,
};
use tokio::sync::{mpsc, oneshot, watch};

/// How long the kernel may cache names and attributes.
const TTL: Duration = Duration::from_secs(1);
/// How long a request waits for the host to (re)open a session.
const SESSION_WAIT: Duration = Duration::from_secs(30);
/// How long a request waits for its answer.
const ANSWER_WAIT: Duration = Duration::from_secs(60);
/// Frames queued to the host before requests wait.
const QUEUE: usize = 64;

type Pending = HashMap<u64, (Request, Bytes, oneshot::Sender<(Result<Reply, i32>, Bytes)>)>;

/// The current session to the host.
#[derive(Debug)]
struct Link {
    epoch: u64,
    to_host: mpsc::Sender<Bytes>,
    /// Mount index in this session's hello, by guest path.
    index: HashMap<String, u32>,
}

#[derive(Debug, Default)]
struct Shared {
    link: Mutex<Option<Link>>,
    pending: Mutex<Pending>,
    next_id: AtomicU64,
    epochs: AtomicU64,
    /// Guest paths mounted so far (they stay mounted for the guest's life).
    mounted: Mutex<HashMap<String, MountSpec>>,
}

/// The agent's volumes: shared by the session handler and every mount's filesystem.
#[derive(Debug, Clone)]
pub struct Volumes {
    shared: Arc<Shared>,
    up: watch::Sender<u64>,
}

impl Default for Volumes {
    fn default() -> Self {
        Volumes {
            shared: Arc::default(),
            up: watch::channel(0).0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("the host's volume session sent no hello")]
    NoHello,
    #[error("reading the host's volume session")]
    Frame(#[source] wire::FrameError),
}

impl Volumes {
    /// Serves one session: returns at once the stream of frames to the host (the host waits
    /// for the response before it sends its hello), then, in a task, reads the hello from
    /// `from_host`, mounts what is new, answers the hello, and reads the host's answers until
    /// `from_host` ends. A bad session ends the stream.
    pub fn session<R>(&self, from_host: R, handle: tokio::runtime::Handle) -> mpsc::Receiver<Bytes>
    where
        R: tokio::io::AsyncRead + Unpin + Send + 'static,
    {
        let (to_host, rx) = mpsc::channel(QUEUE);
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.run_session(from_host, handle, to_host).await {
                tracing::warn!(error = %e, "volume session from the host failed");
            }
        });
        rx
    }

    async fn run_session<R>(
        &self,
        mut from_host: R,
        handle: tokio::runtime::Handle,
        to_host: mpsc::Sender<Bytes>,
    ) -> Result<(), SessionError>
    where
        R: tokio::io::AsyncRead + Unpin + Send + 'static,
    {
        let hello: Hello = match tokio::time::timeout(
            SESSION_WAIT,
            wire::read_frame::<_, Hello>(&mut from_host, wire::MAX_RESPONSE_HEADER, 0),
        )
        .await
        {
            Ok(Ok(Some((h, _)))) => h,
            Ok(Ok(None)) | Err(_) => return Err(SessionError::NoHello),
            Ok(Err(e)) => return Err(SessionError::Frame(e)),
        };
        let mut results = Vec::new();
        let mut index = HashMap::new();
        for (i, m) in hello.mounts.iter().enumerate() {
            let spec = m.spec.clone();
            index.insert(spec.path.clone(), i as u32);
            let result = self.ensure_mounted(&spec, handle.clone()).await;
            if let Err(why) = &result {
                tracing::warn!(path = %spec.path, error = %why, "volume mount failed");
            }
            results.push(result.err());
        }
        let _ = to_host
            .send(wire::encode(&HelloReply { mounts: results }, &[]))
            .await;
        let epoch = self.shared.epochs.fetch_add(1, Ordering::Relaxed) + 1;
        // Install the new link and re-send what was in flight on the old one.
        let resend: Vec<Bytes> = {
            let mut link = self.shared.link.lock().unwrap_or_else(|p| p.into_inner());
            *link = Some(Link {
                epoch,
                to_host: to_host.clone(),
                index,
            });
            let pending = self
                .shared
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            pending
                .values()
                .map(|(req, data, _)| wire::encode(req, data))
                .collect()
        };
        for frame in resend {
            let _ = to_host.send(frame).await;
        }
        let _ = self.up.send(epoch);
        drop(to_host);
        let shared = &self.shared;
        let result = loop {
            match wire::read_frame::<_, Response>(
                &mut from_host,
                wire::MAX_RESPONSE_HEADER,
                wire::MAX_DATA,
            )
            .await
            {
                Ok(Some((resp, data))) => {
                    let waiter = shared
                        .pending
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&resp.id);
                    if let Some((_, _, tx)) = waiter {
                        let _ = tx.send((resp.result, data));
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(SessionError::Frame(e)),
            }
        };
        let mut link = shared.link.lock().unwrap_or_else(|p| p.into_inner());
        if link.as_ref().is_some_and(|l| l.epoch == epoch) {
            *link = None;
        }
        result
    }

    async fn ensure_mounted(
        &self,
        spec: &MountSpec,
        handle: tokio::runtime::Handle,
    ) -> Result<(), String> {
        {
            let mounted = self
                .shared
                .mounted
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(old) = mounted.get(&spec.path) {
                return if old.volume_id == spec.volume_id {
                    Ok(())
                } else {
                    Err(format!("{} already has another volume mounted", spec.path))
                };
            }
        }
        std::fs::create_dir_all(&spec.path)
            .map_err(|e| format!("cannot make the mount point {}: {e}", spec.path))?;
        let fs = VolumeFs(Arc::new(FsInner {
            volumes: self.clone(),
            path: spec.path.clone(),
            handle,
            inodes: Mutex::new(Inodes::new()),
            dirs: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        }));
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName(format!("alcove-volume:{}", spec.name)),
            fuser::MountOption::Subtype("alcove".to_owned()),
            fuser::MountOption::DefaultPermissions,
            fuser::MountOption::NoSuid,
            fuser::MountOption::NoDev,
            fuser::MountOption::RW,
        ];
        config.acl = fuser::SessionACL::All;
        config.n_threads = Some(2);
        let path = spec.path.clone();
        // Mounting waits for the kernel's INIT, which is answered on this thread.
        let session = tokio::task::spawn_blocking(move || fuser::spawn_mount(fs, &path, &config))
            .await
            .map_err(|e| format!("mount task failed: {e}"))?
            .map_err(|e| format!("cannot mount {}: {e}", spec.path))?;
        // The mount lives as long as the guest.
        std::mem::forget(session);
        self.shared
            .mounted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(spec.path.clone(), spec.clone());
        Ok(())
    }

    /// Sends one request for the mount at `mount_path` and waits for its answer.
    async fn call(&self, mount_path: &str, op: Op, data: Bytes) -> Result<(Reply, Bytes), i32> {
        let eio = libc::EIO;
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        // Wait for a session that knows this mount.
        let mut up = self.up.subscribe();
        let deadline = tokio::time::Instant::now() + SESSION_WAIT;
        let (req, to_host) = loop {
            let found = {
                let link = self.shared.link.lock().unwrap_or_else(|p| p.into_inner());
                link.as_ref().and_then(|l| {
                    l.index
                        .get(mount_path)
                        .map(|&mount| (mount, l.to_host.clone()))
                })
            };
            if let Some((mount, to_host)) = found {
                break (Request { id, mount, op }, to_host);
            }
            if tokio::time::timeout_at(deadline, up.changed())
                .await
                .is_err()
            {
                return Err(eio);
            }
        };
        let (tx, rx) = oneshot::channel();
        self.shared
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, (req.clone(), data.clone(), tx));
        let frame = wire::encode(&req, &data);
        // A closed link is fine: the next session re-sends what is pending.
        let _ = tokio::time::timeout(ANSWER_WAIT, to_host.send(frame)).await;
        let answer = tokio::time::timeout(ANSWER_WAIT, rx).await;
        self.shared
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        match answer {
            Ok(Ok((Ok(reply), data))) => Ok((reply, data)),
            Ok(Ok((Err(errno), _))) => Err(errno),
            _ => Err(eio),
        }
    }
}

/// Inode numbers ↔ paths from a volume's root ("" is the root, inode 1).
#[derive(Debug)]
struct Inodes {
    by_ino: HashMap<u64, (String, u64)>,
    by_path: HashMap<String, u64>,
    next: u64,
}

impl Inodes {
    fn new() -> Inodes {
        let mut i = Inodes {
            by_ino: HashMap::new(),
            by_path: HashMap::new(),
            next: 2,
        };
        i.by_ino.insert(1, (String::new(), 1));
        i.by_path.insert(String::new(), 1);
        i
    }

    fn path(&self, ino: u64) -> Option<String> {
        self.by_ino.get(&ino).map(|(p, _)| p.clone())
    }

    /// The inode for `path`, one more lookup counted.
    fn remember(&mut self, path: &str) -> u64 {
        if let Some(&ino) = self.by_path.get(path) {
            if let Some(e) = self.by_ino.get_mut(&ino) {
                e.1 += 1;
            }
            return ino;
        }
        let ino = self.next;
        self.next += 1;
        self.by_ino.insert(ino, (path.to_owned(), 1));
        self.by_path.insert(path.to_owned(), ino);
        ino
    }

    fn forget(&mut self, ino: u64, n: u64) {
        if ino == 1 {
            return;
        }
        if let Some(e) = self.by_ino.get_mut(&ino) {
            e.1 = e.1.saturating_sub(n);
            if e.1 == 0 {
                let (path, _) = self.by_ino.remove(&ino).expect("present");
                if self.by_path.get(&path) == Some(&ino) {
                    self.by_path.remove(&path);
                }
            }
        }
    }

    fn removed(&mut self, path: &str) {
        self.by_path.remove(path);
    }

    /// After a rename: `from` and everything beneath it now live under `to`.
    fn renamed(&mut self, from: &str, to: &str) {
        if let Some(ino) = self.by_path.remove(to) {
            // The replaced entry keeps its inode until forgotten, under no path.
            let _ = ino;
        }
        let prefix = format!("{from}/");
        let moved: Vec<(u64, String)> = self
            .by_ino
            .iter()
            .filter(|(_, (p, _))| p == from || p.starts_with(&prefix))
            .map(|(&ino, (p, _))| (ino, format!("{to}{}", &p[from.len()..])))
            .collect();
        for (ino, new) in moved {
            if let Some(e) = self.by_ino.get_mut(&ino) {
                if self.by_path.get(&e.0) == Some(&ino) {
                    self.by_path.remove(&e.0);
                }
                e.0 = new.clone();
            }
            self.by_path.insert(new, ino);
        }
    }
}

fn join(parent: &str, name: &OsStr) -> Result<String, Errno> {
    let name = name.to_str().ok_or(Errno::EINVAL)?;
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(Errno::EINVAL);
    }
    Ok(if parent.is_empty() {
        name.to_owned()
    } else {
        format!("{parent}/{name}")
    })
}

fn time((s, ns): (i64, u32)) -> SystemTime {
    if s >= 0 {
        UNIX_EPOCH + Duration::new(s as u64, ns)
    } else {
        UNIX_EPOCH
    }
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::Directory => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::File | Kind::Unknown => FileType::RegularFile,
    }
}

fn file_attr(ino: u64, a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: a.size,
        blocks: a.blocks,
        atime: time(a.atime),
        mtime: time(a.mtime),
        ctime: time(a.ctime),
        crtime: time(a.ctime),
        kind: file_type(a.kind),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink.max(1),
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn when(t: TimeOrNow) -> (i64, u32) {
    match t {
        TimeOrNow::Now => (0, u32::MAX),
        TimeOrNow::SpecificTime(t) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
            Err(_) => (0, 0),
        },
    }
}

/// A directory's listing, fetched at its first read and served from here until released.
type Listing = Vec<(String, FileType, u64)>;

struct VolumeFs(Arc<FsInner>);

impl std::ops::Deref for VolumeFs {
    type Target = FsInner;
    fn deref(&self) -> &FsInner {
        &self.0
    }
}

struct FsInner {
    volumes: Volumes,
    /// The mount point in the guest (the key of this mount in each session).
    path: String,
    handle: tokio::runtime::Handle,
    inodes: Mutex<Inodes>,
    dirs: Mutex<HashMap<u64, Listing>>,
    next_fh: AtomicU64,
}

impl std::fmt::Debug for FsInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeFs")
            .field("path", &self.path)
            .finish()
    }
}

impl FsInner {
    fn path_of(&self, ino: INodeNo) -> Result<String, Errno> {
        self.inodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .path(ino.0)
            .ok_or(Errno::ESTALE)
    }

    /// Runs `op` on the host in the background and hands the answer to `done`.
    fn run<F>(&self, op: Op, data: Bytes, done: F)
    where
        F: FnOnce(Result<(Reply, Bytes), Errno>) + Send + 'static,
    {
        let volumes = self.volumes.clone();
        let path = self.path.clone();
        self.handle.spawn(async move {
            let r = volumes.call(&path, op, data).await.map_err(Errno::from_i32);
            done(r);
        });
    }

    /// The attributes of a new entry for `path` (one more lookup counted).
    fn entry(&self, path: &str, attr: &Attr) -> FileAttr {
        let ino = self.with_inodes(|i| i.remember(path));
        file_attr(ino, attr)
    }

    fn with_inodes<T>(&self, f: impl FnOnce(&mut Inodes) -> T) -> T {
        f(&mut self.inodes.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn with_dirs<T>(&self, f: impl FnOnce(&mut HashMap<u64, Listing>) -> T) -> T {
        f(&mut self.dirs.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl VolumeFs {
    fn clone_handle(&self) -> Arc<FsInner> {
        Arc::clone(&self.0)
    }

    fn remove(&self, parent: INodeNo, name: &OsStr, dir: bool, reply: ReplyEmpty) {
        let path = match self.path_of(parent).and_then(|p| join(&p, name)) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let op = if dir {
            Op::Rmdir { path: path.clone() }
        } else {
            Op::Unlink { path: path.clone() }
        };
        let this = self.clone_handle();
        self.run(op, Bytes::new(), move |r| match r {
            Ok(_) => {
                this.with_inodes(|i| i.removed(&path));
                reply.ok()
            }
            Err(e) => reply.error(e),
        });
    }
}

impl Filesystem for VolumeFs {
    fn init(&mut self, _req: &FReq, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(wire::MAX_DATA as u32);
        let _ = config.set_max_readahead(wire::MAX_DATA as u32);
        Ok(())
    }

    fn lookup(&self, _req: &FReq, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let path = match self.path_of(parent).and_then(|p| join(&p, name)) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let this = self.clone_handle();
        self.run(
            Op::Lstat { path: path.clone() },
            Bytes::new(),
            move |r| match r {
                Ok((Reply::Attr(a), _)) => reply.entry(&TTL, &this.entry(&path, &a), Generation(0)),
                Ok(_) => reply.error(Errno::EIO),
                Err(e) => reply.error(e),
            },
        );
    }

    fn forget(&self, _req: &FReq, ino: INodeNo, nlookup: u64) {
        self.inodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &FReq, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let path = match self.path_of(ino) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        self.run(Op::Lstat { path }, Bytes::new(), move |r| match r {
            Ok((Reply::Attr(a), _)) => reply.attr(&TTL, &file_attr(ino.0, &a)),
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        });
    }

    fn setattr(
        &self,
        _req: &FReq,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let path = match self.path_of(ino) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(when),
            mtime: mtime.map(when),
        };
        self.run(Op::Setattr { path, set }, Bytes::new(), move |r| match r {
            Ok((Reply::Attr(a), _)) => reply.attr(&TTL, &file_attr(ino.0, &a)),
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        });
    }

    fn readlink(&self, _req: &FReq, ino: INodeNo, reply: ReplyData) {
        let path = match self.path_of(ino) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        self.run(Op::Readlink { path }, Bytes::new(), move |r| match r {
            Ok((Reply::Target(t), _)) => reply.data(t.as_bytes()),
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        });
    }

    fn mknod(
        &self,
        _req: &FReq,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        // Volumes hold files, directories and links only.
        reply.error(Errno::EPERM);
    }

    fn mkdir(
        &self,
        req: &FReq,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let path = match self.path_of(parent).and_then(|p| join(&p, name)) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let op = Op::Mkdir {
            path: path.clone(),
            mode: mode & !umask,
            uid: req.uid(),
            gid: req.gid(),
        };
        let this = self.clone_handle();
        self.run(op, Bytes::new(), move |r| match r {
            Ok((Reply::Attr(a), _)) => reply.entry(&TTL, &this.entry(&path, &a), Generation(0)),
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        });
    }

    fn unlink(&self, _req: &FReq, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, false, reply);
    }

    fn rmdir(&self, _req: &FReq, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(parent, name, true, reply);
    }

    fn symlink(
        &self,
        req: &FReq,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let path = match self.path_of(parent).and_then(|p| join(&p, link_name)) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let Some(target) = target.to_str() else {
            return reply.error(Errno::EINVAL);
        };
        let op = Op::Symlink {
            path: path.clone(),
            target: target.to_owned(),
            uid: req.uid(),
            gid: req.gid(),
        };
        let this = self.clone_handle();
        self.run(op, Bytes::new(), move |r| match r {
            Ok((Reply::Attr(a), _)) => reply.entry(&TTL, &this.entry(&path, &a), Generation(0)),
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        });
    }

    fn rename(
        &self,
        _req: &FReq,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let from = match self.path_of(parent).and_then(|p| join(&p, name)) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let to = match self.path_of(newparent).and_then(|p| join(&p, newname)) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let op = Op::Rename {
            from: from.clone(),
            to: to.clone(),
            flags: flags.bits(),
        };
        let this = self.clone_handle();
        self.run(op, Bytes::new(), move |r| match r {
            Ok(_) => {
                this.with_inodes(|i| i.renamed(&from, &to));
                reply.ok()
            }
            Err(e) => reply.error(e),
        });
    }

    fn link(
        &self,
        _req: &FReq,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn open(&self, _req: &FReq, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if let Err(e) = self.path_of(ino) {
            return reply.error(e);
        }
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn read(
        &self,
        _req: &FReq,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let path = match self.path_of(ino) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let len = size.min(wire::MAX_DATA as u32);
        self.run(
            Op::Read { path, offset, len },
            Bytes::new(),
            move |r| match r {
                Ok((Reply::Data, data)) => reply.data(&data),
                Ok(_) => reply.error(Errno::EIO),
                Err(e) => reply.error(e),
            },
        );
    }

    fn write(
        &self,
        _req: &FReq,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let path = match self.path_of(ino) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        if data.len() > wire::MAX_DATA {
            return reply.error(Errno::EINVAL);
        }
        let data = Bytes::copy_from_slice(data);
        self.run(Op::Write { path, offset }, data, move |r| match r {
            Ok((Reply::Written(n), _)) => reply.written(n as u32),
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        });
    }

    fn flush(
        &self,
        _req: &FReq,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Writes are synchronous with the host; nothing is buffered here.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &FReq,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let path = match self.path_of(ino) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        self.run(Op::Fsync { path }, Bytes::new(), move |r| match r {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        });
    }

    fn opendir(&self, _req: &FReq, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if let Err(e) = self.path_of(ino) {
            return reply.error(e);
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        reply.opened(FileHandle(fh), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &FReq,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let listed = self
            .dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh.0)
            .cloned();
        if let Some(listing) = listed {
            for (i, (name, kind, entry_ino)) in listing.iter().enumerate().skip(offset as usize) {
                if reply.add(INodeNo(*entry_ino), (i + 1) as u64, *kind, name) {
                    break;
                }
            }
            return reply.ok();
        }
        let path = match self.path_of(ino) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let this = self.clone_handle();
        self.run(Op::Readdir { path: path.clone() }, Bytes::new(), move |r| {
            let entries = match r {
                Ok((Reply::Entries(e), _)) => e,
                Ok(_) => return reply.error(Errno::EIO),
                Err(e) => return reply.error(e),
            };
            let mut listing: Listing = vec![
                (".".to_owned(), FileType::Directory, ino.0),
                ("..".to_owned(), FileType::Directory, 1),
            ];
            for (name, attr) in entries {
                let child = if path.is_empty() {
                    name.clone()
                } else {
                    format!("{path}/{name}")
                };
                let known = this.with_inodes(|i| i.by_path.get(&child).copied());
                // Entries not looked up yet get a number outside the table's range.
                let eino = known.unwrap_or_else(|| synthetic_ino(&child));
                listing.push((name, file_type(attr.kind), eino));
            }
            for (i, (name, kind, entry_ino)) in listing.iter().enumerate().skip(offset as usize) {
                if reply.add(INodeNo(*entry_ino), (i + 1) as u64, *kind, name) {
                    break;
                }
            }
            this.with_dirs(|d| {
                d.insert(fh.0, listing);
            });
            reply.ok();
        });
    }

    fn releasedir(
        &self,
        _req: &FReq,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &FReq, _ino: INodeNo, reply: ReplyStatfs) {
        self.run(Op::Statfs, Bytes::new(), move |r| match r {
            Ok((Reply::StatFs(s), _)) => reply.statfs(
                s.blocks,
                s.blocks_free,
                s.blocks_free,
                s.files,
                s.files_free,
                s.block_size,
                255,
                s.block_size,
            ),
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        });
    }

    // Volumes keep no extended attributes: none to list or read, and setting one is refused
    // (the agent's file metadata says so instead of failing).
    fn listxattr(&self, _req: &FReq, _ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn getxattr(
        &self,
        _req: &FReq,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        reply.error(Errno::NO_XATTR);
    }

    fn setxattr(
        &self,
        _req: &FReq,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOTSUP);
    }

    fn removexattr(&self, _req: &FReq, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::NO_XATTR);
    }

    fn access(&self, _req: &FReq, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // The kernel checks permissions itself (default_permissions).
        reply.ok();
    }

    fn create(
        &self,
        req: &FReq,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let path = match self.path_of(parent).and_then(|p| join(&p, name)) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let op = Op::Create {
            path: path.clone(),
            mode: mode & !umask,
            uid: req.uid(),
            gid: req.gid(),
            exclusive: flags & libc::O_EXCL != 0,
        };
        let this = self.clone_handle();
        self.run(op, Bytes::new(), move |r| match r {
            Ok((Reply::Attr(a), _)) => {
                let attr = this.entry(&path, &a);
                reply.created(
                    &TTL,
                    &attr,
                    Generation(0),
                    FileHandle(0),
                    FopenFlags::empty(),
                )
            }
            Ok(_) => reply.error(Errno::EIO),
            Err(e) => reply.error(e),
        });
    }
}

/// A `readdir` inode number for a name not looked up yet (above the table's counter range).
fn synthetic_ino(path: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    path.hash(&mut h);
    h.finish() | (1 << 63)
}

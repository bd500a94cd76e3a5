//! Directory watching on inotify, shaped like envd's fsnotify events: names relative to the
//! watched directory; create, write, remove, rename, chmod. Recursive watches follow new
//! subdirectories as they appear. Also the registry behind the polling watcher calls
//! (CreateWatcher / GetWatcherEvents / RemoveWatcher), whose queues are bounded.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::io::unix::AsyncFd;

use alcove_envd_proto::filesystem::{EventType, FilesystemEvent};

/// Events a polling watcher holds between GetWatcherEvents calls; older ones are dropped.
pub const MAX_QUEUED_EVENTS: usize = 10_000;
/// Polling watchers alive at once.
pub const MAX_WATCHERS: usize = 256;

struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

pub struct DirWatcher {
    fd: AsyncFd<InotifyFd>,
    root: PathBuf,
    recursive: bool,
    include_entry: bool,
    dirs: HashMap<WatchDescriptor, PathBuf>,
    pending: VecDeque<FilesystemEvent>,
}

fn mask() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_ATTRIB
}

impl DirWatcher {
    /// Starts watching `root` (a directory); `recursive` adds every subdirectory too.
    pub fn new(root: &Path, recursive: bool, include_entry: bool) -> io::Result<DirWatcher> {
        let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .map_err(io::Error::from)?;
        // SAFETY: the Inotify (and its fd) is moved into the AsyncFd and lives exactly as long.
        let fd = unsafe { AsyncFd::register(InotifyFd(ino)) }.map_err(|e| e.into_parts().1)?;
        let mut w = DirWatcher {
            fd,
            root: root.to_path_buf(),
            recursive,
            include_entry,
            dirs: HashMap::new(),
            pending: VecDeque::new(),
        };
        w.add(PathBuf::new())?;
        Ok(w)
    }

    /// Watches `rel` (relative to the root) and, if recursive, its subdirectories.
    fn add(&mut self, rel: PathBuf) -> io::Result<()> {
        let full = self.root.join(&rel);
        let wd = self
            .fd
            .get_ref()
            .0
            .add_watch(&full, mask())
            .map_err(io::Error::from)?;
        self.dirs.insert(wd, rel.clone());
        if self.recursive
            && let Ok(rd) = std::fs::read_dir(&full)
        {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    // A subdirectory vanishing meanwhile is not an error.
                    let _ = self.add(rel.join(e.file_name()));
                }
            }
        }
        Ok(())
    }

    /// The next event (waits for one).
    pub async fn next(&mut self) -> io::Result<FilesystemEvent> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Ok(e);
            }
            let mut guard = self.fd.readable().await?;
            let events =
                match guard.try_io(|fd| fd.get_ref().0.read_events().map_err(io::Error::from)) {
                    Ok(Ok(ev)) => ev,
                    Ok(Err(e)) => return Err(e),
                    Err(_would_block) => continue,
                };
            drop(guard);
            for ev in events {
                self.translate(ev);
            }
        }
    }

    fn translate(&mut self, ev: nix::sys::inotify::InotifyEvent) {
        let m = ev.mask;
        if m.contains(AddWatchFlags::IN_IGNORED) {
            self.dirs.remove(&ev.wd);
            return;
        }
        if m.contains(AddWatchFlags::IN_Q_OVERFLOW) {
            tracing::warn!(root = %self.root.display(), "inotify queue overflowed; events were lost");
            return;
        }
        let Some(dir) = self.dirs.get(&ev.wd).cloned() else {
            return;
        };
        let rel = match &ev.name {
            Some(n) => dir.join(n),
            None => dir,
        };
        if self.recursive
            && m.contains(AddWatchFlags::IN_ISDIR)
            && m.intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO)
        {
            let _ = self.add(rel.clone());
        }
        let mut types = Vec::new();
        if m.intersects(AddWatchFlags::IN_CREATE | AddWatchFlags::IN_MOVED_TO) {
            types.push(EventType::Create);
        }
        if m.intersects(AddWatchFlags::IN_MOVED_FROM | AddWatchFlags::IN_MOVE_SELF) {
            types.push(EventType::Rename);
        }
        if m.contains(AddWatchFlags::IN_ATTRIB) {
            types.push(EventType::Chmod);
        }
        if m.contains(AddWatchFlags::IN_MODIFY) {
            types.push(EventType::Write);
        }
        if m.intersects(AddWatchFlags::IN_DELETE | AddWatchFlags::IN_DELETE_SELF) {
            types.push(EventType::Remove);
        }
        let name = if rel.as_os_str().is_empty() {
            ".".to_owned()
        } else {
            rel.to_string_lossy().into_owned()
        };
        for t in types {
            let entry = if self.include_entry
                && matches!(t, EventType::Create | EventType::Write | EventType::Chmod)
            {
                super::entry_info(&self.root.join(&rel), &mut super::Names::default()).ok()
            } else {
                None
            };
            self.pending.push_back(FilesystemEvent {
                name: name.clone(),
                r#type: t as i32,
                entry,
            });
        }
    }
}

struct Polled {
    events: Arc<Mutex<VecDeque<FilesystemEvent>>>,
    task: tokio::task::JoinHandle<()>,
}

/// The polling watchers, by id.
#[derive(Default)]
pub struct Watchers {
    map: Mutex<HashMap<String, Arc<Polled>>>,
}

impl std::fmt::Debug for Watchers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watchers").finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WatchersError {
    #[error("too many watchers ({MAX_WATCHERS}); remove unused ones with RemoveWatcher")]
    TooMany,
    #[error("watcher '{0}' not found; it may have been removed")]
    NotFound(String),
}

impl Watchers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Polled>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a watcher; its events queue up until drained.
    pub fn create(&self, mut w: DirWatcher) -> Result<String, WatchersError> {
        let mut map = self.lock();
        if map.len() >= MAX_WATCHERS {
            return Err(WatchersError::TooMany);
        }
        let id = uuid::Uuid::new_v4().to_string();
        let events = Arc::new(Mutex::new(VecDeque::new()));
        let queue = Arc::clone(&events);
        let task = tokio::spawn(async move {
            while let Ok(ev) = w.next().await {
                let mut q = queue.lock().unwrap_or_else(|e| e.into_inner());
                if q.len() >= MAX_QUEUED_EVENTS {
                    q.pop_front();
                }
                q.push_back(ev);
            }
        });
        let polled = Arc::new(Polled { events, task });
        map.insert(id.clone(), polled);
        Ok(id)
    }

    pub fn drain(&self, id: &str) -> Result<Vec<FilesystemEvent>, WatchersError> {
        let p = self
            .lock()
            .get(id)
            .cloned()
            .ok_or_else(|| WatchersError::NotFound(id.to_owned()))?;
        let mut q = p.events.lock().unwrap_or_else(|e| e.into_inner());
        Ok(q.drain(..).collect())
    }

    pub fn remove(&self, id: &str) -> Result<(), WatchersError> {
        let p = self
            .lock()
            .remove(id)
            .ok_or_else(|| WatchersError::NotFound(id.to_owned()))?;
        p.task.abort();
        Ok(())
    }
}

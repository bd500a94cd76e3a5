//! `filesystem.Filesystem`: file and directory operations, each run with the calling user's
//! credentials (`fs::as_user`), so permissions and ownership are the user's own.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Path as UrlPath, Request, State};
use axum::response::Response;
use futures::{Stream, StreamExt};

use alcove_envd_proto::connect::{Code, Codec, Framing};
use alcove_envd_proto::filesystem::{self as pb, EntryInfo, watch_dir_response};

use super::{Call, RpcError, call_user, error_response, io_code, stream_response, unary_response};
use crate::fs::watch::{DirWatcher, WatchersError};
use crate::fs::{self, Names, as_user};
use crate::state::{AgentState, Counters};
use crate::users::UserInfo;

pub async fn handle(
    State(state): State<Arc<AgentState>>,
    UrlPath(method): UrlPath<String>,
    req: Request,
) -> Response {
    let mut call = match Call::from_request(req) {
        Ok(c) => c,
        Err(resp) => return *resp,
    };
    let (codec, framing) = (call.codec, call.framing);
    match method.as_str() {
        "Stat" => {
            let r = stat(&state, &mut call).await;
            respond(&state, codec, framing, r)
        }
        "MakeDir" => {
            let r = make_dir(&state, &mut call).await;
            respond(&state, codec, framing, r)
        }
        "Move" => {
            let r = move_entry(&state, &mut call).await;
            respond(&state, codec, framing, r)
        }
        "ListDir" => {
            let r = list_dir(&state, &mut call).await;
            respond(&state, codec, framing, r)
        }
        "Remove" => {
            let r = remove(&state, &mut call).await;
            respond(&state, codec, framing, r)
        }
        "WatchDir" => match watch_dir(&state, &mut call).await {
            Ok(s) => stream_response(codec, s),
            Err(e) => {
                Counters::inc(&state.counters.rpc_errors);
                error_response(codec, framing, e)
            }
        },
        "CreateWatcher" => {
            let r = create_watcher(&state, &mut call).await;
            respond(&state, codec, framing, r)
        }
        "GetWatcherEvents" => {
            let r = async {
                let req: pb::GetWatcherEventsRequest = call.message().await?;
                let events = state
                    .watchers
                    .drain(&req.watcher_id)
                    .map_err(watchers_error)?;
                Ok(pb::GetWatcherEventsResponse { events })
            }
            .await;
            respond(&state, codec, framing, r)
        }
        "RemoveWatcher" => {
            let r = async {
                let req: pb::RemoveWatcherRequest = call.message().await?;
                state
                    .watchers
                    .remove(&req.watcher_id)
                    .map_err(watchers_error)?;
                Ok(pb::RemoveWatcherResponse {})
            }
            .await;
            respond(&state, codec, framing, r)
        }
        other => error_response(
            codec,
            framing,
            RpcError::new(
                Code::Unimplemented,
                format!("filesystem.Filesystem/{other} does not exist"),
            ),
        ),
    }
}

fn respond<M: prost::Message + serde::Serialize + Send + 'static>(
    state: &AgentState,
    codec: Codec,
    framing: Framing,
    r: Result<M, RpcError>,
) -> Response {
    if r.is_err() {
        Counters::inc(&state.counters.rpc_errors);
    }
    unary_response(codec, framing, r)
}

fn watchers_error(e: WatchersError) -> RpcError {
    let code = match e {
        WatchersError::TooMany => Code::ResourceExhausted,
        WatchersError::NotFound(_) => Code::NotFound,
    };
    RpcError::from_error(code, &e)
}

/// An I/O failure on `path`, worded for the caller.
fn io_error(what: &str, path: &Path, e: io::Error) -> RpcError {
    let code = io_code(&e);
    let hint = match code {
        Code::PermissionDenied => {
            " (the operation runs as the requesting user; use a path that user may access, or user 'root')"
        }
        _ => "",
    };
    RpcError::new(code, format!("{what} '{}': {e}{hint}", path.display()))
}

fn resolve(state: &AgentState, user: &UserInfo, path: &str) -> Result<PathBuf, RpcError> {
    let workdir = state.defaults().workdir;
    crate::paths::resolve(path, user, workdir.as_deref())
        .map_err(|e| RpcError::from_error(Code::InvalidArgument, &e))
}

/// Runs `f` as `user`, mapping worker failures to `internal`.
async fn run_as<T, F>(user: &UserInfo, f: F) -> Result<T, RpcError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, RpcError> + Send + 'static,
{
    as_user(user, f)
        .await
        .map_err(|e| RpcError::from_error(Code::Internal, &e))?
}

async fn stat(state: &AgentState, call: &mut Call) -> Result<pb::StatResponse, RpcError> {
    let req: pb::StatRequest = call.message().await?;
    let user = call_user(state, call)?;
    let path = resolve(state, &user, &req.path)?;
    let entry = run_as(&user, move || {
        fs::entry_info(&path, &mut Names::default()).map_err(|e| io_error("stat", &path, e))
    })
    .await?;
    Ok(pb::StatResponse { entry: Some(entry) })
}

async fn make_dir(state: &AgentState, call: &mut Call) -> Result<pb::MakeDirResponse, RpcError> {
    let req: pb::MakeDirRequest = call.message().await?;
    let user = call_user(state, call)?;
    let path = resolve(state, &user, &req.path)?;
    let entry = run_as(&user, move || {
        match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => {
                return Err(RpcError::new(
                    Code::AlreadyExists,
                    format!("directory already exists: {}", path.display()),
                ));
            }
            Ok(_) => {
                return Err(RpcError::invalid_argument(format!(
                    "path already exists but it is not a directory: {}",
                    path.display()
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("stat", &path, e)),
        }
        fs::ensure_dirs(&path).map_err(|e| io_error("create directory", &path, e))?;
        fs::entry_info(&path, &mut Names::default()).map_err(|e| io_error("stat", &path, e))
    })
    .await?;
    Ok(pb::MakeDirResponse { entry: Some(entry) })
}

async fn move_entry(state: &AgentState, call: &mut Call) -> Result<pb::MoveResponse, RpcError> {
    let req: pb::MoveRequest = call.message().await?;
    let user = call_user(state, call)?;
    let src = resolve(state, &user, &req.source)?;
    let dst = resolve(state, &user, &req.destination)?;
    let entry = run_as(&user, move || {
        if let Some(parent) = dst.parent() {
            fs::ensure_dirs(parent).map_err(|e| io_error("create directory", parent, e))?;
        }
        std::fs::rename(&src, &dst).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound && std::fs::symlink_metadata(&src).is_err() {
                RpcError::not_found(format!("source '{}' not found", src.display()))
            } else {
                io_error("move", &src, e)
            }
        })?;
        fs::entry_info(&dst, &mut Names::default()).map_err(|e| io_error("stat", &dst, e))
    })
    .await?;
    Ok(pb::MoveResponse { entry: Some(entry) })
}

async fn list_dir(state: &AgentState, call: &mut Call) -> Result<pb::ListDirResponse, RpcError> {
    let req: pb::ListDirRequest = call.message().await?;
    let user = call_user(state, call)?;
    let requested = resolve(state, &user, &req.path)?;
    let depth = req.depth.max(1);
    let entries = run_as(&user, move || {
        let real =
            std::fs::canonicalize(&requested).map_err(|e| io_error("resolve", &requested, e))?;
        let meta = std::fs::metadata(&real).map_err(|e| io_error("stat", &real, e))?;
        if !meta.is_dir() {
            return Err(RpcError::invalid_argument(format!(
                "path is not a directory: {}",
                requested.display()
            )));
        }
        fs::walk(&real, &requested, depth, &mut Names::default())
            .map_err(|e| io_error("list", &requested, e))
    })
    .await?;
    Ok(pb::ListDirResponse { entries })
}

async fn remove(state: &AgentState, call: &mut Call) -> Result<pb::RemoveResponse, RpcError> {
    let req: pb::RemoveRequest = call.message().await?;
    let user = call_user(state, call)?;
    let path = resolve(state, &user, &req.path)?;
    run_as(&user, move || {
        // As envd (os.RemoveAll): a path that is already gone is success.
        let r = match std::fs::symlink_metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path),
            Ok(_) => std::fs::remove_file(&path),
        };
        r.map_err(|e| io_error("remove", &path, e))
    })
    .await?;
    Ok(pb::RemoveResponse {})
}

/// Checks that `user` may read the directory, then starts an inotify watch (as the agent).
async fn open_watcher(
    state: &AgentState,
    user: &UserInfo,
    path: &str,
    recursive: bool,
    include_entry: bool,
    allow_network_mounts: bool,
) -> Result<DirWatcher, RpcError> {
    let dir = resolve(state, user, path)?;
    let d = dir.clone();
    run_as(user, move || {
        let meta = std::fs::metadata(&d).map_err(|e| io_error("watch", &d, e))?;
        if !meta.is_dir() {
            return Err(RpcError::invalid_argument(format!(
                "path {} is not a directory",
                d.display()
            )));
        }
        std::fs::read_dir(&d).map_err(|e| io_error("watch", &d, e))?;
        Ok(())
    })
    .await?;
    if !allow_network_mounts && is_network_mount(&dir) {
        return Err(RpcError::invalid_argument(format!(
            "cannot watch path on network filesystem: {} (set allow_network_mounts to try anyway)",
            dir.display()
        )));
    }
    DirWatcher::new(&dir, recursive, include_entry).map_err(|e| io_error("watch", &dir, e))
}

fn is_network_mount(path: &Path) -> bool {
    const NFS: i64 = 0x6969;
    const CIFS: i64 = 0xFF53_4D42;
    const SMB: i64 = 0x517B;
    const SMB2: i64 = 0xFE53_4D42;
    const FUSE: i64 = 0x6573_5546;
    match nix::sys::statfs::statfs(path) {
        Ok(s) => matches!(s.filesystem_type().0, NFS | CIFS | SMB | SMB2 | FUSE),
        Err(_) => false,
    }
}

async fn watch_dir(
    state: &AgentState,
    call: &mut Call,
) -> Result<impl Stream<Item = Result<pb::WatchDirResponse, RpcError>> + Send + 'static, RpcError> {
    let req: pb::WatchDirRequest = call.message().await?;
    let user = call_user(state, call)?;
    let watcher = open_watcher(
        state,
        &user,
        &req.path,
        req.recursive,
        req.include_entry,
        req.allow_network_mounts,
    )
    .await?;
    let keepalive = call.keepalive();
    let start = pb::WatchDirResponse {
        event: Some(watch_dir_response::Event::Start(
            watch_dir_response::StartEvent {},
        )),
    };
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let rest = futures::stream::unfold(Some((watcher, ticker)), |st| async move {
        let (mut watcher, mut ticker) = st?;
        let item = tokio::select! {
            ev = watcher.next() => match ev {
                Ok(e) => Ok(watch_dir_response::Event::Filesystem(e)),
                Err(e) => Err(RpcError::new(Code::Internal, format!("watcher failed: {e}"))),
            },
            _ = ticker.tick() => Ok(watch_dir_response::Event::Keepalive(watch_dir_response::KeepAlive {})),
        };
        match item {
            Ok(ev) => Some((
                Ok(pb::WatchDirResponse { event: Some(ev) }),
                Some((watcher, ticker)),
            )),
            Err(e) => Some((Err(e), None)),
        }
    });
    Ok(futures::stream::once(async move { Ok(start) }).chain(rest))
}

async fn create_watcher(
    state: &AgentState,
    call: &mut Call,
) -> Result<pb::CreateWatcherResponse, RpcError> {
    let req: pb::CreateWatcherRequest = call.message().await?;
    let user = call_user(state, call)?;
    let watcher = open_watcher(
        state,
        &user,
        &req.path,
        req.recursive,
        req.include_entry,
        req.allow_network_mounts,
    )
    .await?;
    let watcher_id = state.watchers.create(watcher).map_err(watchers_error)?;
    Ok(pb::CreateWatcherResponse { watcher_id })
}

/// Used by /files: envd's upload answer lists entries as `{path, name, type}`.
pub fn entry_summary(e: &EntryInfo) -> serde_json::Value {
    serde_json::json!({ "path": e.path, "name": e.name, "type": "file" })
}

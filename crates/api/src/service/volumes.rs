//! E2B's volumes: the registry on the API key (`/volumes`), the volume content API
//! (`/volumecontent/{volumeID}/…`) and the checks of a create's `volumeMounts`.
//!
//! A volume is a row in the store (`alcove_store` `volumes.rs`: id, team, name) and a directory
//! under `<data>/volumes/<id>/`, reached only through `alcove_volume`'s [`Root`] (every path
//! resolved beneath the volume; sizes and entry counts capped per volume). The store row is
//! written first and removed first: a name or cap refusal leaves no directory, and a delete the
//! store refuses (a sandbox that is not killed mounts the volume) leaves the files alone.
//!
//! Content calls authenticate with the volume's own token ([`SecretKey::volume_token`]: derived,
//! never stored) or the team's API key, then run on the blocking pool. Uploads stream from the
//! request body into the file through a bounded channel (never buffered whole), with a deadline
//! per chunk and for the whole upload; downloads stream from the open file.
//!
//! The audit log records every create and delete with the volume's id and name.

use std::sync::Arc;
use std::time::Duration;

use alcove_store::{NewAuditRecord, StoreError, VolumeMount, VolumeRecord, now_ms};
use alcove_volume::{Entry, Kind, Owner, Root, VolError, Volumes};
use bytes::Bytes;

use super::Service;
use crate::error::ApiError;
use crate::models::{self, rfc3339, system_time_ms};
use crate::secrets::SecretKey;

/// The most volumes one team may have.
pub const MAX_VOLUMES_PER_TEAM: usize = 100;
/// A name's longest, in characters (all ASCII).
pub const MAX_VOLUME_NAME: usize = 64;
/// What starts every volume id.
pub const VOLUME_ID_PREFIX: &str = "vol_";
/// The deepest listing `GET /volumecontent/{id}/dir` gives.
pub const MAX_LIST_DEPTH: u32 = 16;
/// The most entries one listing returns; more is a 400 asking for a subdirectory.
pub const MAX_LIST_ENTRIES: usize = 10_000;
/// The most volumes one sandbox mounts.
pub const MAX_MOUNTS: usize = 8;
/// Where no volume may be mounted, at or below: the guest's system and the agent's own state.
pub const RESERVED_MOUNT_PATHS: &[&str] = &[
    "/bin",
    "/boot",
    "/dev",
    "/etc",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/proc",
    "/run",
    "/sbin",
    "/sys",
    "/usr",
    "/var/lib/alcove",
];
/// Longest pause between two chunks of an upload.
const UPLOAD_IDLE: Duration = Duration::from_secs(60);
/// Chunks of an upload in flight between the body and the file.
const UPLOAD_QUEUE: usize = 8;

/// A checked volume name: 1 to [`MAX_VOLUME_NAME`] characters of `A-Z a-z 0-9 _ -`.
pub fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_VOLUME_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::InvalidBody {
            detail: format!(
                "the volume name {name:?} is not valid; a name is 1-{MAX_VOLUME_NAME} characters \
                 of letters, digits, '_' and '-', like \"my-data\""
            ),
        })
    }
}

/// A checked mount path in the guest: absolute, without `.`, `..` or empty names (one trailing
/// `/` is dropped), not `/` and not at or below a [`RESERVED_MOUNT_PATHS`] entry.
pub fn check_mount_path(path: &str) -> Result<String, ApiError> {
    let bad = |why: String| ApiError::InvalidBody {
        detail: format!("the volume mount path {path:?} {why}"),
    };
    if !path.starts_with('/') {
        return Err(bad(
            "is not absolute; mount paths start with '/', like \"/mnt/data\"".into(),
        ));
    }
    if path.len() > 1024 || path.chars().any(char::is_control) {
        return Err(bad(
            "is longer than 1024 bytes or holds control characters".into()
        ));
    }
    let trimmed = path
        .strip_suffix('/')
        .filter(|p| !p.is_empty())
        .unwrap_or(path);
    let names: Vec<&str> = trimmed.split('/').skip(1).collect();
    if trimmed == "/" {
        return Err(bad(
            "is the guest's root; mount volumes on a directory of their own, like \"/mnt/data\""
                .into(),
        ));
    }
    if names
        .iter()
        .any(|n| n.is_empty() || *n == "." || *n == "..")
    {
        return Err(bad(
            "is not normalized; write it without '.', '..' or '//', like \"/mnt/data\"".into(),
        ));
    }
    if let Some(r) = RESERVED_MOUNT_PATHS
        .iter()
        .find(|r| trimmed == **r || trimmed.starts_with(&format!("{r}/")))
    {
        return Err(bad(format!(
            "is at or below {r}, which the guest's system needs; mount volumes elsewhere, like \
             \"/mnt/data\" or \"/home/user/data\" (not under {})",
            RESERVED_MOUNT_PATHS.join(", ")
        )));
    }
    Ok(trimmed.to_owned())
}

/// `vol_` and 32 hex digits.
fn new_volume_id() -> String {
    format!(
        "{VOLUME_ID_PREFIX}{}",
        hex::encode(rand::random::<[u8; 16]>())
    )
}

fn view(r: &VolumeRecord) -> models::Volume {
    models::Volume {
        volume_id: r.id.clone(),
        name: r.name.clone(),
    }
}

/// An entry as the content API shows it: permission bits only, RFC 3339 times.
pub fn entry_view(e: Entry) -> models::VolumeEntryStat {
    let time = |t: std::time::SystemTime| rfc3339(system_time_ms(t));
    models::VolumeEntryStat {
        name: e.name,
        kind: match e.kind {
            Kind::File => models::VolumeEntryType::File,
            Kind::Directory => models::VolumeEntryType::Directory,
            Kind::Symlink => models::VolumeEntryType::Symlink,
            Kind::Unknown => models::VolumeEntryType::Unknown,
        },
        path: e.path,
        size: e.size,
        mode: e.mode & 0o7777,
        uid: e.uid,
        gid: e.gid,
        atime: time(e.atime),
        mtime: time(e.mtime),
        ctime: time(e.ctime),
        target: e.target,
    }
}

/// What `PUT /volumecontent/{id}/file` and `POST .../dir` are asked to do besides the path.
#[derive(Debug, Clone, Copy, Default)]
pub struct CreateOptions {
    pub owner: Owner,
    pub mode: Option<u32>,
    /// `force`: absent, `false` or `true` (their meanings differ by call; see the handlers).
    pub force: Option<bool>,
}

/// Why an upload's body stopped before its end.
#[derive(Debug, Clone, Copy)]
enum Cut {
    Idle,
    Total,
    Broken,
}

/// The request body as a blocking reader, fed chunk by chunk by an async task.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    cur: Bytes,
}

impl std::io::Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if !self.cur.is_empty() {
                let n = buf.len().min(self.cur.len());
                buf[..n].copy_from_slice(&self.cur.split_to(n));
                return Ok(n);
            }
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
    }
}

impl Service {
    /// Enables the volumes API over `volumes` (the secrets key, which makes the tokens, is
    /// needed too).
    pub fn with_volumes(mut self, volumes: Arc<Volumes>) -> Self {
        self.volumes = Some(volumes);
        self
    }

    /// The registry the node shares (guest mounts see the same usage counts).
    pub fn volumes(&self) -> Option<Arc<Volumes>> {
        self.volumes.clone()
    }

    fn volume_parts(&self) -> Result<(Arc<Volumes>, Arc<SecretKey>), ApiError> {
        match (&self.volumes, &self.secrets) {
            (Some(v), Some(k)) => Ok((v.clone(), k.clone())),
            _ => Err(ApiError::NotImplemented {
                what: "volumes (this server runs without a data directory for them)",
            }),
        }
    }

    fn with_token(&self, key: &SecretKey, r: &VolumeRecord) -> models::VolumeAndToken {
        models::VolumeAndToken {
            volume_id: r.id.clone(),
            name: r.name.clone(),
            token: key.volume_token(&r.id),
            domain: None,
        }
    }

    /// Bytes in each volume of `ids` (0 for one that is gone), as counted since its first open
    /// in this process.
    pub(crate) async fn volume_bytes(&self, ids: &[String]) -> Vec<u64> {
        let Some(volumes) = self.volumes.clone() else {
            return vec![0; ids.len()];
        };
        let ids = ids.to_vec();
        blocking(move || {
            Ok(ids
                .iter()
                .map(|id| volumes.open(id).map_or(0, |r| r.used_bytes()))
                .collect())
        })
        .await
        .unwrap_or_default()
    }

    /// Measures the team's storage (paused sandboxes, snapshots, volumes) against its limit
    /// and lets its volumes grow only while it is under; returns whether they may not grow.
    /// Run for every team with volumes at each metering tick and before each content upload,
    /// so guests' writes are refused (`EDQUOT`) within one tick of the team reaching its limit.
    pub(crate) async fn apply_volume_quota(&self, team: &str) -> Result<bool, ApiError> {
        let Some(volumes) = self.volumes.clone() else {
            return Ok(false);
        };
        let limit = self.effective_limits(team).await?.max_stored_bytes;
        let used = self.team_stored_bytes(team).await?;
        let frozen = used >= limit;
        let t = team.to_owned();
        let ids: Vec<String> = self
            .db(move |s| s.volumes_of_team(&t))
            .await?
            .into_iter()
            .map(|v| v.id)
            .collect();
        let team = team.to_owned();
        let _ = blocking(move || {
            for id in &ids {
                let Ok(root) = volumes.open(id) else { continue };
                if root.frozen() != frozen {
                    tracing::info!(
                        team_id = %team, volume_id = %id, used, limit, frozen,
                        "volume growth {} by the team's storage quota",
                        if frozen { "stopped" } else { "allowed again" }
                    );
                    root.set_frozen(frozen);
                }
            }
            Ok(())
        })
        .await;
        Ok(frozen)
    }

    /// [`Service::apply_volume_quota`] for every team that has volumes.
    pub(crate) async fn apply_volume_quotas(&self) -> Result<(), ApiError> {
        if self.volumes.is_none() {
            return Ok(());
        }
        let teams = self.db(|s| s.teams_with_volumes()).await?;
        for team in teams {
            if let Err(e) = self.apply_volume_quota(&team).await {
                tracing::warn!(team_id = %team, error = %crate::error::chain(&e),
                    "could not check the team's volumes against its storage quota");
            }
        }
        Ok(())
    }

    /// `POST /volumes`: registers the volume, then makes its directory.
    pub async fn create_volume(
        &self,
        team_id: &str,
        actor: &str,
        body: models::NewVolume,
    ) -> Result<models::VolumeAndToken, ApiError> {
        let name = body.name;
        check_name(&name)?;
        let (volumes, key) = self.volume_parts()?;
        let limit = self.effective_limits(team_id).await?.max_stored_bytes;
        self.check_stored_bytes(team_id, limit).await?;
        let rec = VolumeRecord {
            id: new_volume_id(),
            team_id: team_id.to_owned(),
            name: name.clone(),
            created_at: now_ms(),
        };
        let made = self
            .db(move |s| s.insert_volume(&rec, MAX_VOLUMES_PER_TEAM))
            .await
            .map_err(|e| match e {
                StoreError::VolumeNameTaken => ApiError::VolumeNameTaken { name },
                StoreError::VolumeLimit { limit } => ApiError::VolumeLimit { limit },
                e => e.into(),
            })?;
        let id = made.id.clone();
        let dir = blocking(move || volumes.create(&id)).await;
        if let Err(e) = dir {
            // Without its directory the volume is unusable: unregister it again.
            let (team, id) = (made.team_id.clone(), made.id.clone());
            if let Err(undo) = self.db(move |s| s.delete_volume(&team, &id)).await {
                tracing::error!(
                    volume_id = %made.id,
                    error = %crate::error::chain(&undo),
                    "could not unregister a volume whose directory failed"
                );
            }
            return Err(ApiError::VolumeContent {
                volume_id: made.id,
                source: e,
            });
        }
        self.audit_volume(&made, actor, "create", serde_json::json!({}));
        Ok(self.with_token(&key, &made))
    }

    /// `GET /volumes`: the team's volumes in name order.
    pub async fn list_volumes(&self, team_id: &str) -> Result<Vec<models::Volume>, ApiError> {
        let team = team_id.to_owned();
        Ok(self
            .db(move |s| s.volumes_of_team(&team))
            .await?
            .iter()
            .map(view)
            .collect())
    }

    /// `GET /volumes/{volumeID}`: the volume and its content token.
    pub async fn get_volume(
        &self,
        team_id: &str,
        volume_id: &str,
    ) -> Result<models::VolumeAndToken, ApiError> {
        let (_, key) = self.volume_parts()?;
        let rec = self.team_volume(team_id, volume_id).await?;
        Ok(self.with_token(&key, &rec))
    }

    async fn team_volume(&self, team_id: &str, volume_id: &str) -> Result<VolumeRecord, ApiError> {
        let (team, id) = (team_id.to_owned(), volume_id.to_owned());
        self.db(move |s| s.team_volume(&team, &id))
            .await?
            .ok_or_else(|| ApiError::VolumeNotFound {
                volume: volume_id.to_owned(),
            })
    }

    /// `DELETE /volumes/{volumeID}`: unregisters the volume unless a sandbox that is not killed
    /// mounts it, then removes its files.
    pub async fn delete_volume(
        &self,
        team_id: &str,
        actor: &str,
        volume_id: &str,
    ) -> Result<(), ApiError> {
        let (volumes, _) = self.volume_parts()?;
        let (team, id) = (team_id.to_owned(), volume_id.to_owned());
        let gone = self
            .db(move |s| s.delete_volume(&team, &id))
            .await
            .map_err(|e| match e {
                StoreError::VolumeNotFound => ApiError::VolumeNotFound {
                    volume: volume_id.to_owned(),
                },
                StoreError::VolumeInUse { sandboxes } => ApiError::VolumeInUse {
                    volume_id: volume_id.to_owned(),
                    sandboxes,
                },
                e => e.into(),
            })?;
        let (id, dir) = (gone.id.clone(), volumes.dir(&gone.id));
        let removed = blocking(move || volumes.destroy(&id)).await;
        let detail = match &removed {
            Ok(()) => serde_json::json!({}),
            Err(e) => {
                // The volume is gone for every caller; only its bytes stay behind.
                tracing::error!(
                    volume_id = %gone.id,
                    dir = %dir.display(),
                    error = %crate::error::chain(e),
                    "volume unregistered but its directory could not be removed; remove it by hand"
                );
                serde_json::json!({ "filesLeft": true })
            }
        };
        self.audit_volume(&gone, actor, "delete", detail);
        Ok(())
    }

    /// A content call's volume: the token must be this volume's (or the API key its team's),
    /// and the volume must still exist. Returns the record and the audit actor.
    pub async fn volume_access(
        &self,
        volume_id: &str,
        bearer: Option<&str>,
        api_key: Option<&str>,
    ) -> Result<(VolumeRecord, String), ApiError> {
        let (_, key) = self.volume_parts()?;
        let (team, actor) = match (bearer, api_key) {
            (Some(t), _) if t.starts_with(crate::secrets::VOLUME_TOKEN_PREFIX) => {
                if !key.verify_volume_token(volume_id, t) {
                    crate::metrics::Metrics::inc(&crate::metrics::METRICS.auth_failures);
                    return Err(ApiError::InvalidVolumeToken {
                        volume_id: volume_id.to_owned(),
                    });
                }
                (None, format!("volume-token:{volume_id}"))
            }
            // An API key sent either way (the REST API takes `Authorization: Bearer <key>`).
            (Some(k), _) | (None, Some(k)) => {
                if k.len() > 256 {
                    return Err(ApiError::InvalidApiKey);
                }
                let auth = self.authenticate(k).await?;
                (Some(auth.team_id), auth.key_id)
            }
            (None, None) => {
                crate::metrics::Metrics::inc(&crate::metrics::METRICS.auth_failures);
                return Err(ApiError::MissingVolumeToken);
            }
        };
        let id = volume_id.to_owned();
        let rec = self
            .db(move |s| s.volume(&id))
            .await?
            .filter(|r| team.as_ref().is_none_or(|t| *t == r.team_id))
            .ok_or_else(|| ApiError::VolumeNotFound {
                volume: volume_id.to_owned(),
            })?;
        Ok((rec, actor))
    }

    /// Runs `f` on the volume's [`Root`] on the blocking pool.
    async fn on_root<T: Send + 'static>(
        &self,
        volume_id: &str,
        f: impl FnOnce(&Root) -> Result<T, VolError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let (volumes, _) = self.volume_parts()?;
        let id = volume_id.to_owned();
        blocking(move || f(&*volumes.open(&id)?))
            .await
            .map_err(|source| ApiError::VolumeContent {
                volume_id: volume_id.to_owned(),
                source,
            })
    }

    /// `GET /volumecontent/{id}/path`: one entry, links not followed.
    pub async fn volume_stat(
        &self,
        volume_id: &str,
        path: String,
    ) -> Result<models::VolumeEntryStat, ApiError> {
        self.on_root(volume_id, move |r| r.stat(&path))
            .await
            .map(entry_view)
    }

    /// `GET /volumecontent/{id}/dir`: a directory's entries, `depth` levels deep.
    pub async fn volume_list(
        &self,
        volume_id: &str,
        path: String,
        depth: Option<u32>,
    ) -> Result<Vec<models::VolumeEntryStat>, ApiError> {
        let depth = depth.unwrap_or(1);
        if !(1..=MAX_LIST_DEPTH).contains(&depth) {
            return Err(ApiError::InvalidQuery {
                detail: format!("depth must be between 1 and {MAX_LIST_DEPTH} (1 lists one level)"),
            });
        }
        let entries = self
            .on_root(volume_id, move |r| r.list(&path, depth, MAX_LIST_ENTRIES))
            .await?;
        Ok(entries.into_iter().map(entry_view).collect())
    }

    /// `POST /volumecontent/{id}/dir`: a new directory. `force` makes missing parents and
    /// accepts an existing directory; without it an existing path is a 409.
    pub async fn volume_make_dir(
        &self,
        volume_id: &str,
        path: String,
        o: CreateOptions,
    ) -> Result<models::VolumeEntryStat, ApiError> {
        check_mode(o.mode)?;
        let force = o.force == Some(true);
        self.on_root(volume_id, move |r| {
            r.make_dir(&path, force, o.owner, o.mode)
        })
        .await
        .map(entry_view)
    }

    /// `GET /volumecontent/{id}/file`: a regular file opened for streaming, and its size.
    pub async fn volume_open(
        &self,
        volume_id: &str,
        path: String,
    ) -> Result<(std::fs::File, u64), ApiError> {
        self.on_root(volume_id, move |r| {
            let f = r.open_read(&path)?;
            let len = f.metadata().map_err(VolError::Io)?.len();
            Ok((f, len))
        })
        .await
    }

    /// `PUT /volumecontent/{id}/file`: the body streamed into the file. `force`: absent
    /// overwrites an existing file; `false` refuses one (409); `true` overwrites and makes
    /// missing parent directories. A body declared larger than the volume can hold is refused
    /// before any of it is read.
    pub async fn volume_write(
        &self,
        volume_id: &str,
        path: String,
        o: CreateOptions,
        declared_len: Option<u64>,
        body: axum::body::Body,
    ) -> Result<models::VolumeEntryStat, ApiError> {
        use http_body_util::BodyExt;
        check_mode(o.mode)?;
        let (volumes, _) = self.volume_parts()?;
        // The team's quota, measured now: a frozen volume refuses the upload below.
        let id = volume_id.to_owned();
        if let Some(rec) = self.db(move |s| s.volume(&id)).await? {
            self.apply_volume_quota(&rec.team_id).await?;
        }
        let limit = volumes.limits().max_bytes;
        if declared_len.is_some_and(|n| n > limit) {
            return Err(ApiError::VolumeContent {
                volume_id: volume_id.to_owned(),
                source: VolError::Full { limit },
            });
        }
        let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(UPLOAD_QUEUE);
        let cut = Arc::new(std::sync::Mutex::new(None::<Cut>));
        let total = tokio::time::Instant::now() + self.limits.upload_timeout;
        let pump = {
            let cut = cut.clone();
            let mut body = body;
            tokio::spawn(async move {
                let stop = |why: Cut| {
                    *cut.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
                    Err(std::io::Error::other("the upload stopped"))
                };
                loop {
                    let until = total.min(tokio::time::Instant::now() + UPLOAD_IDLE);
                    let item = match tokio::time::timeout_at(until, body.frame()).await {
                        Err(_) if tokio::time::Instant::now() >= total => stop(Cut::Total),
                        Err(_) => stop(Cut::Idle),
                        Ok(None) => return,
                        Ok(Some(Err(_))) => stop(Cut::Broken),
                        Ok(Some(Ok(frame))) => match frame.into_data() {
                            Ok(data) if data.is_empty() => continue,
                            Ok(data) => Ok(data),
                            Err(_) => continue,
                        },
                    };
                    let last = item.is_err();
                    if tx.send(item).await.is_err() || last {
                        return;
                    }
                }
            })
        };
        let parents = o.force == Some(true);
        let refuse_existing = o.force == Some(false);
        let written = self
            .on_root(volume_id, move |r| {
                if refuse_existing {
                    match r.stat(&path) {
                        Ok(e) => return Err(VolError::Exists(e.path)),
                        Err(VolError::NotFound(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
                if !parents {
                    // A missing parent is named as the caller wrote it (the write goes through
                    // a hidden file beside the target, whose name the caller never chose).
                    let names = alcove_volume::components(&path)?;
                    if names.len() > 1 {
                        let parent = format!("/{}", names[..names.len() - 1].join("/"));
                        if r.stat(&parent)?.kind != Kind::Directory {
                            return Err(VolError::NotADirectory(parent));
                        }
                    }
                }
                let mut reader = ChannelReader {
                    rx,
                    cur: Bytes::new(),
                };
                r.write_file(&path, parents, o.owner, o.mode, &mut reader)
            })
            .await;
        pump.abort();
        let cut = *cut.lock().unwrap_or_else(|p| p.into_inner());
        match (written, cut) {
            (Ok(e), _) => Ok(entry_view(e)),
            (Err(_), Some(Cut::Idle)) => Err(ApiError::InvalidBody {
                detail: format!(
                    "the upload stalled: no data for {} s; nothing was kept, send it again",
                    UPLOAD_IDLE.as_secs()
                ),
            }),
            (Err(_), Some(Cut::Total)) => Err(ApiError::RequestTimeout),
            (Err(_), Some(Cut::Broken)) => Err(ApiError::InvalidBody {
                detail: "the upload was cut off before its end; send it again".into(),
            }),
            (Err(e), None) => Err(e),
        }
    }

    /// `PATCH /volumecontent/{id}/path`: owner and mode.
    pub async fn volume_set_meta(
        &self,
        volume_id: &str,
        path: String,
        u: models::VolumeMetadataUpdate,
    ) -> Result<models::VolumeEntryStat, ApiError> {
        check_mode(u.mode)?;
        self.on_root(volume_id, move |r| r.set_meta(&path, u.uid, u.gid, u.mode))
            .await
            .map(entry_view)
    }

    /// `DELETE /volumecontent/{id}/path`: a file, link or directory (with everything in it).
    pub async fn volume_remove(&self, volume_id: &str, path: String) -> Result<(), ApiError> {
        let is_root = alcove_volume::components(&path).is_ok_and(|c| c.is_empty());
        if is_root {
            return Err(ApiError::InvalidQuery {
                detail: format!(
                    "path {path:?} is the volume's root, which cannot be removed; remove what is \
                     in it one by one, or destroy the volume (DELETE /volumes/{volume_id})"
                ),
            });
        }
        self.on_root(volume_id, move |r| r.remove(&path)).await
    }

    /// A create's `volumeMounts`, checked: at most [`MAX_MOUNTS`], each naming a volume of the
    /// team and a valid guest path, no path twice or inside another.
    pub(crate) async fn resolve_mounts(
        &self,
        team_id: &str,
        mounts: &[models::SandboxVolumeMount],
    ) -> Result<Vec<VolumeMount>, ApiError> {
        if mounts.is_empty() {
            return Ok(Vec::new());
        }
        self.volume_parts()?;
        if mounts.len() > MAX_MOUNTS {
            return Err(ApiError::InvalidBody {
                detail: format!(
                    "volumeMounts has {} entries; a sandbox mounts at most {MAX_MOUNTS} volumes",
                    mounts.len()
                ),
            });
        }
        let mut out: Vec<VolumeMount> = Vec::with_capacity(mounts.len());
        for m in mounts {
            let path = check_mount_path(&m.path)?;
            if let Some(prev) = out.iter().find(|p| {
                p.path == path
                    || path.starts_with(&format!("{}/", p.path))
                    || p.path.starts_with(&format!("{path}/"))
            }) {
                return Err(ApiError::InvalidBody {
                    detail: format!(
                        "volumeMounts mounts {path:?} and {:?}, which are the same path or one \
                         inside the other; give each volume a path of its own",
                        prev.path
                    ),
                });
            }
            let (team, name) = (team_id.to_owned(), m.name.clone());
            let rec = self
                .db(move |s| s.volume_by_name(&team, &name))
                .await?
                .ok_or_else(|| ApiError::MountedVolumeNotFound {
                    name: m.name.clone(),
                    snapshot: None,
                })?;
            out.push(VolumeMount {
                volume_id: rec.id,
                name: rec.name,
                path,
            });
        }
        Ok(out)
    }

    /// The mounts a create from `snapshot_id` inherits (those of the sandbox it was taken from),
    /// each volume still the team's.
    pub(crate) async fn inherited_mounts(
        &self,
        team_id: &str,
        snapshot_id: &str,
        source_sandbox: &str,
    ) -> Result<Vec<VolumeMount>, ApiError> {
        let source = source_sandbox.to_owned();
        let mounts = self
            .db(move |s| s.sandbox(&source))
            .await?
            .map(|r| r.volume_mounts)
            .unwrap_or_default();
        for m in &mounts {
            let (team, id) = (team_id.to_owned(), m.volume_id.clone());
            if self.db(move |s| s.team_volume(&team, &id)).await?.is_none() {
                return Err(ApiError::MountedVolumeNotFound {
                    name: m.name.clone(),
                    snapshot: Some(snapshot_id.to_owned()),
                });
            }
        }
        Ok(mounts)
    }

    fn audit_volume(&self, r: &VolumeRecord, actor: &str, action: &str, extra: serde_json::Value) {
        tracing::info!(volume_id = %r.id, name = %r.name, action, "volume changed");
        let mut detail = serde_json::json!({ "volumeID": r.id });
        if let (Some(d), serde_json::Value::Object(more)) = (detail.as_object_mut(), extra) {
            d.extend(more);
        }
        self.audit(NewAuditRecord {
            at: now_ms(),
            team_id: Some(r.team_id.clone()),
            actor: actor.into(),
            sandbox_id: None,
            kind: "volume".into(),
            action: action.into(),
            target: Some(r.name.clone()),
            result: "ok".into(),
            detail,
        });
    }
}

/// A store mount as the backend takes it.
pub(crate) fn mount_spec(m: &VolumeMount) -> alcove_volume::MountSpec {
    alcove_volume::MountSpec {
        volume_id: m.volume_id.clone(),
        name: m.name.clone(),
        path: m.path.clone(),
    }
}

/// A store mount as the API shows it.
pub(crate) fn mount_view(m: &VolumeMount) -> models::SandboxVolumeMount {
    models::SandboxVolumeMount {
        name: m.name.clone(),
        path: m.path.clone(),
    }
}

fn check_mode(mode: Option<u32>) -> Result<(), ApiError> {
    match mode {
        Some(m) if m > 0o7777 => Err(ApiError::InvalidQuery {
            detail: format!(
                "mode {m} is not a permission mode; give 0 to 4095 (0o7777), e.g. 420 for 0o644"
            ),
        }),
        _ => Ok(()),
    }
}

/// Runs a volume call on the blocking pool; a panic there is re-raised here.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, VolError> + Send + 'static,
) -> Result<T, VolError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(join) => std::panic::resume_unwind(join.into_panic()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for ok in ["a", "my-data_1", &"x".repeat(64), "ABC"] {
            check_name(ok).unwrap();
        }
        for bad in ["", "a b", "a/b", "é", &"x".repeat(65), "a.b", "../x"] {
            let (status, code, msg) = check_name(bad).unwrap_err().parts();
            assert_eq!(
                (status.as_u16(), code),
                (400, "invalid_request_body"),
                "{bad:?}"
            );
            assert!(msg.contains("1-64 characters"), "{msg}");
        }
    }

    #[test]
    fn mount_paths_are_absolute_normalized_and_outside_the_system() {
        assert_eq!(check_mount_path("/mnt/data").unwrap(), "/mnt/data");
        assert_eq!(check_mount_path("/mnt/data/").unwrap(), "/mnt/data");
        assert_eq!(check_mount_path("/home/user/x").unwrap(), "/home/user/x");
        assert_eq!(check_mount_path("/tmp/x").unwrap(), "/tmp/x");
        assert_eq!(check_mount_path("/usrdata").unwrap(), "/usrdata");
        assert_eq!(
            check_mount_path("/var/lib/alcove2").unwrap(),
            "/var/lib/alcove2"
        );
        for (bad, why) in [
            ("mnt/data", "not absolute"),
            ("", "not absolute"),
            ("/", "root"),
            ("//", "root"),
            ("///x", "normalized"),
            ("/mnt//data", "normalized"),
            ("/mnt/./data", "normalized"),
            ("/mnt/../etc", "normalized"),
            ("/proc", "/proc"),
            ("/usr/local/data", "/usr"),
            ("/etc/", "/etc"),
            ("/var/lib/alcove/x", "/var/lib/alcove"),
            ("/mnt/a\nb", "control"),
        ] {
            match check_mount_path(bad) {
                Err(ApiError::InvalidBody { detail }) => {
                    assert!(detail.contains(why), "{bad:?}: {detail}")
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn modes_are_permission_bits() {
        check_mode(None).unwrap();
        check_mode(Some(0o7777)).unwrap();
        assert!(check_mode(Some(0o10000)).is_err());
    }

    #[test]
    fn ids_are_volume_crate_ids() {
        let id = new_volume_id();
        assert!(id.starts_with("vol_") && id.len() == 36);
        assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
    }
}

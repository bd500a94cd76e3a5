//! alcove-store: the control plane's durable state in one SQLite file.
//!
//! Owns teams, API keys (stored as SHA-256 hashes; the plaintext is returned once at creation),
//! templates and their aliases, snapshots (the checkpoint tree), secrets (ciphertext only,
//! `secrets.rs`), volumes and the sandboxes that mount them (`volumes.rs`), and sandboxes with
//! metadata, env var *names* (never values) and their state history. The database runs in WAL
//! mode; its schema is a list of numbered migrations recorded in `PRAGMA user_version`, applied
//! in order at [`Store::open`].
//!
//! Callers: `alcove-api` (the REST server, which calls in from `spawn_blocking`) and the
//! `alcove keys` commands. All methods take `&self`; one connection behind a mutex serialises
//! writers, which is what SQLite does anyway.

mod audit;
mod builds;
mod dashboard;
mod idempotency;
mod keys;
mod lifecycle;
mod limits;
mod metering;
mod metrics_history;
mod migrations;
mod sandboxes;
mod secrets;
mod snapshots;
mod templates;
mod usage;
mod volumes;

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::Connection;

pub use audit::{AuditQuery, AuditRecord, ChainBreak, GENESIS, NewAuditRecord, verify_chain};
pub use builds::{
    BuildLogRecord, BuildRecord, BuildStatus, MAX_BUILD_LOG_LINES, NameOwner, RequestedBuild,
    TagRecord,
};
pub use dashboard::{DashboardSession, SessionState};
pub use idempotency::{ABANDONED_CLAIM_MS, Claim, IDEMPOTENCY_TTL_MS};
pub use keys::{ApiKeyInfo, Authenticated, NewApiKey, Team};
pub use lifecycle::{SandboxState, UnknownState};
pub use limits::{DEFAULT_WARN_AT_PERCENT, OnCap, SpendNotice, TeamLimits};
pub use metering::{
    NetSample, Quantities, StorageSample, UsageEvent, UsageGroup, UsageKind, UsageRow, day_name,
};
pub use metrics_history::MetricSample;
pub use sandboxes::{
    ListOrder, NewSandboxRecord, Page, PageCursor, SandboxEvent, SandboxFilter, SandboxRecord,
};
pub use secrets::{KEPT_VERSIONS, SandboxSecret, SealedValue, SecretRecord};
pub use snapshots::SnapshotRecord;
pub use templates::TemplateRecord;
pub use usage::TeamUsage;
pub use volumes::{VolumeMount, VolumeRecord};

/// The database file name inside the data directory.
pub const DB_FILE: &str = "alcove.db";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening the database")]
    Open(#[source] rusqlite::Error),
    #[error("migrating the database schema to version {version}")]
    Migrate {
        version: usize,
        #[source]
        source: rusqlite::Error,
    },
    #[error("the database schema (version {found}) is newer than this build understands ({known})")]
    SchemaTooNew { found: usize, known: usize },
    #[error("making the database file owner-only")]
    Permissions(#[source] std::io::Error),
    #[error("database query")]
    Query(#[from] rusqlite::Error),
    #[error("sandbox not found")]
    SandboxNotFound,
    #[error("snapshot not found")]
    SnapshotNotFound,
    #[error("template build not found")]
    BuildNotFound,
    #[error("template build status change from {from} to {to} is not allowed")]
    BuildTransition { from: BuildStatus, to: BuildStatus },
    #[error("team not found")]
    TeamNotFound,
    #[error("secret not found")]
    SecretNotFound,
    #[error("the team already has a secret of that name")]
    SecretNameTaken,
    #[error("the team has {limit} secrets, its maximum")]
    SecretLimit { limit: usize },
    #[error("volume not found")]
    VolumeNotFound,
    #[error("the team already has a volume of that name")]
    VolumeNameTaken,
    #[error("the team has {limit} volumes, its maximum")]
    VolumeLimit { limit: usize },
    /// Sandboxes that are not killed (creating, running or paused) mount the volume.
    #[error("the volume is mounted by {} live sandboxes", sandboxes.len())]
    VolumeInUse { sandboxes: Vec<String> },
    /// A sandbox was to mount a volume (by name) the team no longer has.
    #[error("the team has no volume {name:?} to mount")]
    MountedVolumeMissing { name: String },
    #[error("sandbox state change from {from} to {to} is not allowed")]
    Transition {
        from: SandboxState,
        to: SandboxState,
    },
    #[error("a stored value is corrupt")]
    Corrupt(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Creates the database file owner-only if it is missing, and narrows it and its `-wal` and
/// `-shm` files to 0600 if they exist wider.
fn private_db_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    let mut names = vec![path.to_path_buf()];
    for suffix in ["-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        names.push(p.into());
    }
    for p in names {
        if let Ok(m) = std::fs::metadata(&p)
            && m.permissions().mode() & 0o077 != 0
        {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600))?;
        }
    }
    Ok(())
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The control plane's database. Cheap to share behind an `Arc`.
pub struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    /// Opens (creating if needed) the database at `path` and migrates it to the latest schema.
    /// The file is created 0600 before SQLite opens it (SQLite gives its `-wal` and `-shm`
    /// files the database's mode), and an existing one open to group or others is narrowed:
    /// it holds tokens and env var names.
    pub fn open(path: &Path) -> Result<Store> {
        private_db_file(path).map_err(StoreError::Permissions)?;
        let conn = Connection::open(path).map_err(StoreError::Open)?;
        Self::with_connection(conn, migrations::MIGRATIONS.len())
    }

    /// A private in-memory database, for tests.
    pub fn open_in_memory() -> Result<Store> {
        let conn = Connection::open_in_memory().map_err(StoreError::Open)?;
        Self::with_connection(conn, migrations::MIGRATIONS.len())
    }

    fn with_connection(mut conn: Connection, upto: usize) -> Result<Store> {
        // WAL: readers never block the writer and a crash loses at most the last transaction.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(StoreError::Open)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(StoreError::Open)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(StoreError::Open)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(StoreError::Open)?;
        migrations::migrate(&mut conn, upto)?;
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    /// The schema version the database is at.
    pub fn schema_version(&self) -> Result<usize> {
        let v: i64 = self
            .conn()
            .query_row("PRAGMA user_version", [], |r| r.get(0))?;
        Ok(v as usize)
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (statements are atomic), so
        // a poisoned lock is still safe to use.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Milliseconds since the Unix epoch: the one time unit stored in the database.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_survives_reopening_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        let (secret, sandbox_id) = {
            let store = Store::open(&path).unwrap();
            let team = store.create_team("admin").unwrap();
            let key = store.create_api_key(&team.id, "first").unwrap();
            store
                .upsert_template(&TemplateRecord::sample("tpl1", &["base"]))
                .unwrap();
            let rec = NewSandboxRecord::sample("sbx1", &team.id, "tpl1");
            store.insert_sandbox(&rec).unwrap();
            store
                .transition("sbx1", SandboxState::Running, "started")
                .unwrap();
            (key.secret, rec.id)
        };
        let store = Store::open(&path).unwrap();
        let auth = store.authenticate(&secret).unwrap().unwrap();
        let sbx = store.sandbox(&sandbox_id).unwrap().unwrap();
        assert_eq!(sbx.team_id, auth.team_id);
        assert_eq!(sbx.state, SandboxState::Running);
        assert_eq!(sbx.metadata.get("user").map(String::as_str), Some("alice"));
        assert_eq!(store.resolve_template("base").unwrap().unwrap().id, "tpl1");
        let events = store.sandbox_events(&sandbox_id).unwrap();
        assert_eq!(events.len(), 2);
    }

    #[test]
    fn the_database_and_its_wal_and_shm_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let store = Store::open(&path).unwrap();
        store.create_team("admin").unwrap();
        let wal = dir.path().join(format!("{DB_FILE}-wal"));
        let shm = dir.path().join(format!("{DB_FILE}-shm"));
        for p in [&path, &wal, &shm] {
            assert_eq!(mode(p), 0o600, "{}", p.display());
        }
        drop(store);
        // A database an older version left readable is narrowed when opened.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        Store::open(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
    }
}

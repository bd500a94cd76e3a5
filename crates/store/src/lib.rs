//! alcove-store: the control plane's durable state, in one SQLite file (a single host, the
//! default) or in Postgres (a cluster, shared by its control-plane replicas).
//!
//! Owns teams, API keys (stored as SHA-256 hashes; the plaintext is returned once at creation),
//! templates and their aliases, snapshots (the checkpoint tree), secrets (ciphertext only,
//! `secrets.rs`), volumes and the sandboxes that mount them (`volumes.rs`), and sandboxes with
//! metadata, env var *names* (never values) and their state history. Every query goes through
//! one layer (`db.rs`) and is written once for both databases. SQLite runs in WAL mode with its
//! schema version in `PRAGMA user_version`; Postgres gets the same tables from the same
//! numbered migrations (`migrations.rs`), its version in `schema_version`. Both are migrated at
//! [`Store::connect`].
//!
//! Callers: `alcove-api` (the REST server, which calls in from `spawn_blocking`: the Postgres
//! client blocks too) and the `alcove keys` commands. All methods take `&self`; one connection
//! per process behind a mutex serialises them, and on Postgres every transaction takes one
//! advisory lock first, so writers from all replicas run one at a time, as SQLite's do.

mod audit;
mod builds;
mod dashboard;
pub mod db;
mod idempotency;
mod keys;
mod lifecycle;
mod limits;
mod metering;
mod metrics_history;
mod migrations;
mod pg_target;
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
pub use pg_target::PgTarget;
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
    Open(#[source] db::DbError),
    #[error("migrating the database schema to version {version}")]
    Migrate {
        version: usize,
        #[source]
        source: db::DbError,
    },
    #[error("the database schema (version {found}) is newer than this build understands ({known})")]
    SchemaTooNew { found: usize, known: usize },
    #[error("making the database file owner-only")]
    Permissions(#[source] std::io::Error),
    #[error("database query")]
    Db(#[from] db::DbError),
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

/// Where the store lives: a SQLite file (single host, the default) or a Postgres database
/// (a cluster, shared by its control-plane replicas).
#[derive(Clone, PartialEq, Eq)]
pub enum Database {
    Sqlite(std::path::PathBuf),
    /// A `postgres://` (or `postgresql://`) URL, as libpq takes it.
    Postgres(String),
}

impl Database {
    /// `--database-url`: a Postgres URL, or `sqlite:PATH`; none means `<data_dir>/alcove.db`.
    pub fn from_url(url: Option<&str>, data_dir: &Path) -> std::result::Result<Database, String> {
        match url {
            None => Ok(Database::Sqlite(data_dir.join(DB_FILE))),
            Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
                PgTarget::parse(u).map_err(|e| format!("the database URL: {e}"))?;
                Ok(Database::Postgres(u.to_owned()))
            }
            Some(u) if u.starts_with("sqlite:") => {
                let path = u.trim_start_matches("sqlite:").trim_start_matches("//");
                if path.is_empty() {
                    return Err(
                        "sqlite: needs a file path, as sqlite:/var/lib/alcove/alcove.db (or use \
                         a postgres:// URL)"
                            .into(),
                    );
                }
                Ok(Database::Sqlite(path.into()))
            }
            Some(_) => Err(
                "the database URL must start with postgres:// (or postgresql://), or be sqlite:PATH"
                    .into(),
            ),
        }
    }

    /// For tests: the store of a test's data directory `dir`. Normally its SQLite file; when
    /// `ALCOVE_TEST_DATABASE_URL` is set (`scripts/with-postgres.sh`), a schema of that Postgres
    /// database named after `dir`, so a test that reopens the same directory finds its data.
    pub fn from_test_env(dir: &Path) -> Database {
        match std::env::var("ALCOVE_TEST_DATABASE_URL") {
            Ok(url) => {
                use sha2::Digest;
                let digest = sha2::Sha256::digest(dir.as_os_str().as_encoded_bytes());
                Database::postgres_schema(&url, &format!("t_{}", hex::encode(&digest[..8])))
            }
            Err(_) => Database::Sqlite(dir.join(DB_FILE)),
        }
    }

    /// The Postgres database at `url`, using (and creating if missing) the schema `schema`
    /// (letters, digits and `_`): a database per test in one server.
    pub fn postgres_schema(url: &str, schema: &str) -> Database {
        assert!(
            schema
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "schema name {schema:?}"
        );
        let target = PgTarget::parse(url).expect("a Postgres URL");
        let create = format!("CREATE SCHEMA IF NOT EXISTS {schema}");
        // On a thread of its own: the client may not run inside an async task (see PgConn).
        std::thread::spawn(move || {
            let mut admin = target.connect().expect("connect to the test database");
            admin.batch_execute(&create).expect("create a test schema");
        })
        .join()
        .expect("create a test schema");
        let sep = if url.contains('?') { '&' } else { '?' };
        Database::Postgres(format!("{url}{sep}options=-c%20search_path%3D{schema}"))
    }
}

/// Without a Postgres URL's password.
impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// Without a Postgres URL's password: `postgres://user@host:port/db`.
impl std::fmt::Display for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Database::Sqlite(p) => write!(f, "sqlite:{}", p.display()),
            Database::Postgres(url) => {
                let Ok(t) = PgTarget::parse(url) else {
                    return f.write_str("postgres://(invalid)");
                };
                let c = &t.config;
                let host = c
                    .get_hosts()
                    .first()
                    .map(|h| match h {
                        postgres::config::Host::Tcp(h) => h.clone(),
                        postgres::config::Host::Unix(p) => p.display().to_string(),
                    })
                    .unwrap_or_default();
                let port = c.get_ports().first().copied().unwrap_or(5432);
                write!(
                    f,
                    "postgres://{}@{host}:{port}/{}",
                    c.get_user().unwrap_or(""),
                    c.get_dbname().unwrap_or("")
                )
            }
        }
    }
}

/// The control plane's database. Cheap to share behind an `Arc`.
///
/// On SQLite one connection (one writer by design). On Postgres a few (`connection_limit` in
/// the URL, default [`pg_target::DEFAULT_CONNECTIONS`]): a statement takes whichever is free,
/// so a slow one (a metering roll-up, a long list) does not hold up every other request of the
/// replica. Transactions still run one at a time across all of them ([`db::WRITE_LOCK`]). The
/// first connection is the one that holds the duty lock.
pub struct Store {
    conns: Vec<Mutex<db::Conn>>,
    /// Where the next statement starts looking for a free connection.
    next: std::sync::atomic::AtomicUsize,
    /// Signalled each time a connection is given back, for statements waiting for one.
    freed: (Mutex<()>, std::sync::Condvar),
    /// The first Postgres connection's generation plus one on which this store took
    /// [`db::DUTY_LOCK`]; 0 when it does not hold it ([`Store::hold_duties`]).
    on_duty: std::sync::atomic::AtomicU64,
}

impl Store {
    /// Opens (creating if needed) the database at `path` and migrates it to the latest schema.
    /// The file is created 0600 before SQLite opens it (SQLite gives its `-wal` and `-shm`
    /// files the database's mode), and an existing one open to group or others is narrowed:
    /// it holds tokens and env var names.
    pub fn open(path: &Path) -> Result<Store> {
        private_db_file(path).map_err(StoreError::Permissions)?;
        let conn = Connection::open(path).map_err(|e| StoreError::Open(e.into()))?;
        Self::with_connection(conn, migrations::MIGRATIONS.len())
    }

    /// Opens (creating and migrating as needed) the store at `db`.
    pub fn connect(db: &Database) -> Result<Store> {
        match db {
            Database::Sqlite(path) => Self::open(path),
            Database::Postgres(url) => Self::open_postgres(url),
        }
    }

    /// A private in-memory database, for tests. The store's own unit tests run on Postgres
    /// instead when `ALCOVE_TEST_DATABASE_URL` is set (`scripts/with-postgres.sh`), each in a
    /// schema of its own.
    pub fn open_in_memory() -> Result<Store> {
        #[cfg(test)]
        if let Ok(url) = std::env::var("ALCOVE_TEST_DATABASE_URL") {
            return Self::open_test_schema(&url);
        }
        let conn = Connection::open_in_memory().map_err(|e| StoreError::Open(e.into()))?;
        Self::with_connection(conn, migrations::MIGRATIONS.len())
    }

    /// Opens the Postgres database at `url` (`postgres://user@host:port/db`) and migrates it to
    /// the latest schema. Several control-plane replicas may open the same database.
    pub fn open_postgres(url: &str) -> Result<Store> {
        let target = PgTarget::parse(url).map_err(|e| StoreError::Open(db::DbError::Url(e)))?;
        Self::with_postgres(target, migrations::MIGRATIONS.len())
    }

    fn with_postgres(target: PgTarget, upto: usize) -> Result<Store> {
        let n = target.connections;
        // The first connection migrates; the others open once the schema is there.
        let first = db::PgConn::connect(target.clone(), move |client| {
            migrations::migrate_postgres(client, upto)
        })?;
        let mut conns = vec![Mutex::new(db::Conn::Postgres(first))];
        for _ in 1..n {
            let c = db::PgConn::connect(target.clone(), |_| Ok(()))?;
            conns.push(Mutex::new(db::Conn::Postgres(c)));
        }
        Ok(Store::with_conns(conns))
    }

    fn with_conns(conns: Vec<Mutex<db::Conn>>) -> Store {
        Store {
            conns,
            next: 0.into(),
            freed: Default::default(),
            on_duty: 0.into(),
        }
    }

    /// A fresh schema of its own in the test database, for one test.
    #[cfg(test)]
    fn open_test_schema(url: &str) -> Result<Store> {
        let schema = format!("t_{}", hex::encode(rand::random::<[u8; 8]>()));
        Self::connect(&Database::postgres_schema(url, &schema))
    }

    fn with_connection(mut conn: Connection, upto: usize) -> Result<Store> {
        // WAL: readers never block the writer and a crash loses at most the last transaction.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| StoreError::Open(e.into()))?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| StoreError::Open(e.into()))?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(|e| StoreError::Open(e.into()))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(|e| StoreError::Open(e.into()))?;
        migrations::migrate(&mut conn, upto)?;
        Ok(Store::with_conns(vec![Mutex::new(db::Conn::Sqlite(conn))]))
    }

    /// Whether this process runs the background duties (reaper, liveness, metering): with
    /// several control-plane replicas on one Postgres database, one at a time does. On SQLite
    /// (one process) always true. On Postgres the first caller to take the database's duty lock
    /// keeps it for as long as its connection lives; when that replica dies, its connection
    /// closes, the lock is free and the next replica that asks takes the duties over.
    pub fn hold_duties(&self) -> Result<bool> {
        use std::sync::atomic::Ordering;
        // Always on the first connection: a session lock belongs to the connection that took
        // it.
        let conn = Conn {
            guard: Some(lock(&self.conns[0])),
            freed: &self.freed,
        };
        let held = match &*conn {
            db::Conn::Sqlite(_) => true,
            db::Conn::Postgres(pg) => {
                // The lock lives as long as the session: held on an earlier connection (before
                // a reconnect) it is gone, and another replica may have it now.
                use db::SqlExt;
                if self.on_duty.load(Ordering::Relaxed) == pg.generation() + 1 {
                    // Other statements may run on other connections, so the session may have
                    // ended (the server restarted, the connection was cut) without one
                    // noticing: a statement on this one does now (an error, or a reconnect
                    // that makes the generation another).
                    conn.query_row("SELECT 1", db::params![], |r| r.get::<i64>(0))?;
                    if self.on_duty.load(Ordering::Relaxed) == pg.generation() + 1 {
                        return Ok(true);
                    }
                }
                let held = conn.query_row(
                    &format!("SELECT pg_try_advisory_lock({})", db::DUTY_LOCK),
                    db::params![],
                    |r| r.get::<bool>(0),
                )?;
                // The generation the lock was taken on (read after: the statement may have
                // reconnected first).
                let generation = pg.generation() + 1;
                self.on_duty
                    .store(if held { generation } else { 0 }, Ordering::Relaxed);
                held
            }
        };
        Ok(held)
    }

    /// The schema version the database is at.
    pub fn schema_version(&self) -> Result<usize> {
        use db::SqlExt;
        let conn = self.conn();
        let sql = match db::Sql::dialect(&*conn) {
            db::Dialect::Sqlite => "PRAGMA user_version",
            db::Dialect::Postgres => "SELECT version FROM schema_version",
        };
        let v: i64 = conn.query_row(sql, db::params![], |r| r.get(0))?;
        Ok(v as usize)
    }

    /// A connection for a statement or a transaction: a free one, waiting for the first to
    /// be given back when all are busy.
    fn conn(&self) -> Conn<'_> {
        use std::sync::atomic::Ordering;
        let n = self.conns.len();
        let free = |start: usize| {
            (0..n).find_map(|i| match self.conns[(start + i) % n].try_lock() {
                Ok(g) => Some(g),
                Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => None,
            })
        };
        let guard = if n == 1 {
            lock(&self.conns[0])
        } else {
            let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
            match free(start) {
                Some(g) => g,
                None => {
                    let mut waiting = self.freed.0.lock().unwrap_or_else(|e| e.into_inner());
                    loop {
                        // Looked at again under the lock: a connection given back since is
                        // seen here, or its signal comes after the wait begins.
                        if let Some(g) = free(start) {
                            break g;
                        }
                        waiting = self
                            .freed
                            .1
                            .wait_timeout(waiting, std::time::Duration::from_millis(100))
                            .unwrap_or_else(|e| e.into_inner())
                            .0;
                    }
                }
            }
        };
        Conn {
            guard: Some(guard),
            freed: &self.freed,
        }
    }
}

/// A connection taken from the store ([`Store::conn`]); given back (and a waiting statement
/// told) when dropped.
struct Conn<'a> {
    guard: Option<MutexGuard<'a, db::Conn>>,
    freed: &'a (Mutex<()>, std::sync::Condvar),
}

impl std::ops::Deref for Conn<'_> {
    type Target = db::Conn;
    fn deref(&self) -> &db::Conn {
        self.guard.as_ref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut db::Conn {
        self.guard.as_mut().expect("held until dropped")
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let _l = self.freed.0.lock().unwrap_or_else(|e| e.into_inner());
        self.freed.1.notify_one();
    }
}

fn lock(conn: &Mutex<db::Conn>) -> MutexGuard<'_, db::Conn> {
    // A panic while holding the lock leaves the database consistent (statements are atomic,
    // a transaction not committed rolls back), so a poisoned lock is still safe to use.
    conn.lock().unwrap_or_else(|e| e.into_inner())
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
    fn one_store_at_a_time_holds_the_duties() {
        let a = Store::open_in_memory().unwrap();
        assert!(a.hold_duties().unwrap());
        assert!(a.hold_duties().unwrap(), "kept");
        drop(a);
        if let Ok(url) = std::env::var("ALCOVE_TEST_DATABASE_URL") {
            // Two replicas on one database: the second waits until the first is gone.
            let db = Database::postgres_schema(&url, "duties");
            let first = Store::connect(&db).unwrap();
            let second = Store::connect(&db).unwrap();
            assert!(first.hold_duties().unwrap());
            assert!(!second.hold_duties().unwrap());
            // Another schema (another test, or another Alcove) has duties of its own.
            let other = Store::connect(&Database::postgres_schema(&url, "duties_other")).unwrap();
            assert!(other.hold_duties().unwrap());
            drop(first);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !second.hold_duties().unwrap() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the lock outlived its holder"
                );
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }

    #[test]
    fn a_broken_postgres_connection_is_made_again_and_its_duty_lock_is_not_claimed() {
        use db::SqlExt;
        let Ok(url) = std::env::var("ALCOVE_TEST_DATABASE_URL") else {
            return; // SQLite has no connection to lose
        };
        let db = Database::postgres_schema(&url, "reconnect");
        let store = Store::connect(&db).unwrap();
        let other = Store::connect(&db).unwrap();
        store.create_team("kept").unwrap();
        assert!(store.hold_duties().unwrap());
        assert!(!other.hold_duties().unwrap());
        let pid: i64 = lock(&store.conns[0])
            .query_row("SELECT pg_backend_pid()", db::params![], |r| r.get(0))
            .unwrap();
        let killed: bool = other
            .conn()
            .query_row("SELECT pg_terminate_backend(?1)", db::params![pid], |r| {
                r.get(0)
            })
            .unwrap();
        assert!(killed);
        // The lock went with the old session: the other store takes it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !other.hold_duties().unwrap() {
            assert!(
                std::time::Instant::now() < deadline,
                "the lock outlived its session"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        // The statement that finds a connection broken fails; the next one reconnects.
        fn retried<T>(deadline: std::time::Instant, f: impl Fn() -> Result<T>) -> T {
            loop {
                match f() {
                    Ok(v) => return v,
                    Err(_) => {
                        assert!(std::time::Instant::now() < deadline, "never reconnected");
                        std::thread::sleep(std::time::Duration::from_millis(50));
                    }
                }
            }
        }
        // This one no longer claims it: its connection, made again, finds the lock taken.
        let held = retried(deadline, || store.hold_duties());
        assert!(!held, "a lock lost with its session is still claimed");
        // Every connection serves again.
        for _ in 0..2 * pg_target::DEFAULT_CONNECTIONS {
            assert_eq!(retried(deadline, || store.teams()).len(), 1);
        }
    }

    #[test]
    fn a_busy_postgres_connection_does_not_hold_up_the_others() {
        use db::SqlExt;
        let Ok(url) = std::env::var("ALCOVE_TEST_DATABASE_URL") else {
            return; // SQLite keeps one connection
        };
        let Database::Postgres(base) = Database::postgres_schema(&url, "pool") else {
            unreachable!()
        };
        let with = |n: usize| Database::Postgres(format!("{base}&connection_limit={n}"));
        let store = std::sync::Arc::new(Store::connect(&with(2)).unwrap());
        assert_eq!(store.conns.len(), 2);
        store.create_team("first").unwrap();
        // One connection is busy for 30 s (a slow statement, say); another request still runs.
        let busy = std::sync::Arc::clone(&store);
        let (started_tx, started) = std::sync::mpsc::channel();
        let slow = std::thread::spawn(move || {
            let c = busy.conn();
            started_tx.send(()).unwrap();
            c.query_row("SELECT 1 FROM pg_sleep(30)", db::params![], |r| {
                r.get::<i64>(0)
            })
        });
        started.recv().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let s = std::sync::Arc::clone(&store);
        std::thread::spawn(move || tx.send(s.create_team("second").and_then(|_| s.teams())));
        let teams = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("a request waited for the busy connection")
            .unwrap();
        assert_eq!(teams.len(), 2);
        // Cut the slow statement short: the test need not wait for it.
        let one = Store::connect(&with(1)).unwrap();
        assert_eq!(one.conns.len(), 1);
        one.conn()
            .query_row(
                "SELECT COUNT(pg_cancel_backend(pid)) FROM pg_stat_activity
                 WHERE query LIKE 'SELECT 1 FROM pg_sleep%' AND pid != pg_backend_pid()",
                db::params![],
                |r| r.get::<i64>(0),
            )
            .unwrap();
        assert!(
            slow.join().unwrap().is_err(),
            "the slow statement was cancelled"
        );
    }

    #[test]
    fn database_urls_are_checked_and_shown_without_their_password() {
        let dir = Path::new("/var/lib/alcove");
        assert_eq!(
            Database::from_url(None, dir).unwrap(),
            Database::Sqlite(dir.join(DB_FILE))
        );
        assert_eq!(
            Database::from_url(Some("sqlite:/tmp/x.db"), dir).unwrap(),
            Database::Sqlite("/tmp/x.db".into())
        );
        let pg = Database::from_url(
            Some("postgres://alcove:hunter2@db.internal:6432/alcove"),
            dir,
        )
        .unwrap();
        assert_eq!(pg.to_string(), "postgres://alcove@db.internal:6432/alcove");
        assert!(!format!("{pg:?}").contains("hunter2"));
        for bad in ["mysql://x", "sqlite:", "postgres://a@b:notaport/c"] {
            let e = Database::from_url(Some(bad), dir).unwrap_err();
            assert!(e.contains("postgres://"), "{bad}: {e}");
        }
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

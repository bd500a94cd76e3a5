//! One query layer over the two databases the store runs on: SQLite (`rusqlite`, the single-host
//! default, one file) and Postgres (`postgres`, the synchronous client of rust-postgres, for
//! clusters with several control-plane replicas).
//!
//! The store's queries are written once, in the SQL both understand: numbered parameters `?1`,
//! `?2`… (rewritten to `$1`, `$2`… for Postgres), `INSERT … ON CONFLICT`, `RETURNING`, `CAST`,
//! `COALESCE`. Values cross as [`Value`] (null, 64-bit integer, double, text, bytes): what SQLite
//! stores, and what the Postgres schema uses (`BIGINT`, `DOUBLE PRECISION`, `TEXT`, `BYTEA`; see
//! [`postgres_ddl`]). Rows are read whole into [`Row`]s, so a query's result outlives its
//! statement and both drivers look the same to callers.
//!
//! Writers are serialized in both: SQLite has one writer by design (and the store one connection
//! per process); on Postgres every transaction first takes a transaction-scoped advisory lock,
//! so transactions from all replicas run one at a time, as SQLite's would. The store's
//! read-check-write transactions (state transitions, name uniqueness, quotas) keep their meaning
//! across replicas without per-query locking.

use std::fmt;

/// The advisory lock every Postgres transaction takes first: one writer at a time across
/// replicas. Advisory locks belong to the whole database, so each lock is a pair: a fixed kind
/// and the schema the connection uses (`public` in production; a schema per test).
pub const WRITE_LOCK: &str = "pg_advisory_xact_lock(1634493302, hashtext(current_schema()))";

/// The advisory lock a control-plane replica holds (for its connection's life) while it runs
/// the background duties: the reaper, liveness, metering, sampling, spend notices. Taken with
/// `pg_try_advisory_lock` (session-scoped), the same pair form as [`WRITE_LOCK`].
pub const DUTY_LOCK: &str = "1634493303, hashtext(current_schema())";

/// Which database a connection talks to, for the few statements written per dialect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// A value crossing the query layer: a parameter or a column.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Int(_) => "integer",
            Value::Real(_) => "real",
            Value::Text(_) => "text",
            Value::Blob(_) => "bytes",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("sqlite")]
    Sqlite(#[from] rusqlite::Error),
    #[error("postgres")]
    Postgres(#[from] postgres::Error),
    /// `query_row` found no row (see [`OptionalExtension::optional`]).
    #[error("the query returned no row")]
    NoRows,
    /// The Postgres connection could not carry the statement: it broke during the statement's
    /// transaction, or its thread ended.
    #[error("{0}")]
    Lost(String),
    /// The database URL (or the TLS settings it names) cannot be used.
    #[error("{0}")]
    Url(String),
    /// A column's value is not what the caller reads it as.
    #[error("column {index}: {message}")]
    Conversion { index: usize, message: String },
}

impl DbError {
    /// A column holding something the caller cannot read (a bad enum name, bad JSON).
    pub fn conversion(index: usize, e: impl fmt::Display) -> DbError {
        DbError::Conversion {
            index,
            message: e.to_string(),
        }
    }
}

pub type Result<T, E = DbError> = std::result::Result<T, E>;

/// `query_row(…).optional()`: no row is `None`, as in rusqlite.
pub trait OptionalExtension<T> {
    fn optional(self) -> Result<Option<T>>;
}

impl<T> OptionalExtension<T> for Result<T> {
    fn optional(self) -> Result<Option<T>> {
        match self {
            Ok(v) => Ok(Some(v)),
            Err(DbError::NoRows) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A parameter. Implemented for the integers, `bool` (0 or 1), `f64`, strings, bytes, options
/// (`None` is null) and references to them.
pub trait ToValue {
    fn to_value(&self) -> Value;
}

impl ToValue for Value {
    fn to_value(&self) -> Value {
        self.clone()
    }
}
impl<T: ToValue + ?Sized> ToValue for &T {
    fn to_value(&self) -> Value {
        (**self).to_value()
    }
}
impl<T: ToValue> ToValue for Option<T> {
    fn to_value(&self) -> Value {
        match self {
            Some(v) => v.to_value(),
            None => Value::Null,
        }
    }
}
macro_rules! int_to_value {
    ($($t:ty),*) => {$(
        impl ToValue for $t {
            fn to_value(&self) -> Value {
                Value::Int(*self as i64)
            }
        }
    )*};
}
int_to_value!(i64, i32, i16, u32, u16, u8, usize, u64);
impl ToValue for bool {
    fn to_value(&self) -> Value {
        Value::Int(i64::from(*self))
    }
}
impl ToValue for f64 {
    fn to_value(&self) -> Value {
        Value::Real(*self)
    }
}
impl ToValue for str {
    fn to_value(&self) -> Value {
        Value::Text(self.to_owned())
    }
}
impl ToValue for String {
    fn to_value(&self) -> Value {
        Value::Text(self.clone())
    }
}
impl ToValue for [u8] {
    fn to_value(&self) -> Value {
        Value::Blob(self.to_vec())
    }
}
impl ToValue for Vec<u8> {
    fn to_value(&self) -> Value {
        Value::Blob(self.clone())
    }
}

/// A column read as a Rust type. Integers read from integers (and reals, for `f64`), `bool`
/// from 0/1, `String` from text, `Vec<u8>` from bytes; `Option` reads null as `None`.
pub trait FromValue: Sized {
    fn from_value(v: &Value) -> Result<Self, String>;
}

impl FromValue for Value {
    fn from_value(v: &Value) -> Result<Self, String> {
        Ok(v.clone())
    }
}
impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value) -> Result<Self, String> {
        match v {
            Value::Null => Ok(None),
            v => T::from_value(v).map(Some),
        }
    }
}
macro_rules! int_from_value {
    ($($t:ty),*) => {$(
        impl FromValue for $t {
            fn from_value(v: &Value) -> Result<Self, String> {
                match v {
                    Value::Int(i) => <$t>::try_from(*i)
                        .map_err(|_| format!("{i} is out of range for {}", stringify!($t))),
                    v => Err(format!("expected an integer, found {}", v.kind())),
                }
            }
        }
    )*};
}
int_from_value!(i64, i32, i16, u32, u16, u8, usize, u64);
impl FromValue for bool {
    fn from_value(v: &Value) -> Result<Self, String> {
        match v {
            Value::Int(i) => Ok(*i != 0),
            v => Err(format!("expected an integer (0 or 1), found {}", v.kind())),
        }
    }
}
impl FromValue for f64 {
    fn from_value(v: &Value) -> Result<Self, String> {
        match v {
            Value::Real(f) => Ok(*f),
            Value::Int(i) => Ok(*i as f64),
            v => Err(format!("expected a number, found {}", v.kind())),
        }
    }
}
impl FromValue for String {
    fn from_value(v: &Value) -> Result<Self, String> {
        match v {
            Value::Text(s) => Ok(s.clone()),
            v => Err(format!("expected text, found {}", v.kind())),
        }
    }
}
impl FromValue for Vec<u8> {
    fn from_value(v: &Value) -> Result<Self, String> {
        match v {
            Value::Blob(b) => Ok(b.clone()),
            v => Err(format!("expected bytes, found {}", v.kind())),
        }
    }
}

/// One result row, read whole.
#[derive(Debug, Clone)]
pub struct Row {
    values: Vec<Value>,
}

impl Row {
    /// Column `index` (from 0) as `T`.
    pub fn get<T: FromValue>(&self, index: usize) -> Result<T> {
        let v = self.values.get(index).ok_or_else(|| DbError::Conversion {
            index,
            message: format!("the row has {} columns", self.values.len()),
        })?;
        T::from_value(v).map_err(|message| DbError::Conversion { index, message })
    }
}

/// The parameters of a statement: `params![a, b, c]`.
#[macro_export]
macro_rules! params {
    () => {
        &[] as &[&dyn $crate::db::ToValue]
    };
    ($($p:expr),+ $(,)?) => {
        &[$(&$p as &dyn $crate::db::ToValue),+] as &[&dyn $crate::db::ToValue]
    };
}
pub use params;

/// What runs statements: a connection or a transaction.
pub trait Sql {
    fn dialect(&self) -> Dialect;
    /// Runs a statement; the number of rows it changed.
    fn execute(&self, sql: &str, params: &[&dyn ToValue]) -> Result<usize>;
    /// Runs a query; all its rows.
    fn query_rows(&self, sql: &str, params: &[&dyn ToValue]) -> Result<Vec<Row>>;
    /// Runs several statements with no parameters (schema changes).
    fn execute_batch(&self, sql: &str) -> Result<()>;
}

/// The row-mapping helpers every [`Sql`] has, `dyn` included.
pub trait SqlExt: Sql {
    /// The first row, mapped; [`DbError::NoRows`] if there is none.
    fn query_row<T>(
        &self,
        sql: &str,
        params: &[&dyn ToValue],
        f: impl FnOnce(&Row) -> Result<T>,
    ) -> Result<T> {
        let rows = self.query_rows(sql, params)?;
        f(rows.first().ok_or(DbError::NoRows)?)
    }

    /// Every row, mapped.
    fn query_map<T>(
        &self,
        sql: &str,
        params: &[&dyn ToValue],
        f: impl FnMut(&Row) -> Result<T>,
    ) -> Result<Vec<T>> {
        self.query_rows(sql, params)?.iter().map(f).collect()
    }
}

impl<S: Sql + ?Sized> SqlExt for S {}

/// A connection to either database.
pub enum Conn {
    Sqlite(rusqlite::Connection),
    Postgres(PgConn),
}

impl Conn {
    /// Starts a transaction. On Postgres it first takes [`WRITE_LOCK`].
    pub fn begin(&mut self) -> Result<Tx<'_>> {
        match self {
            Conn::Sqlite(c) => Ok(Tx::Sqlite(c.transaction()?)),
            Conn::Postgres(c) => {
                // BEGIN and the lock in one batch, so they are on the same connection; its
                // generation is read after (only this thread reconnects, between statements).
                c.batch(None, format!("BEGIN; SELECT {WRITE_LOCK}"))?;
                Ok(Tx::Postgres(PgTx {
                    conn: c,
                    open: std::cell::Cell::new(true),
                    generation: c.generation(),
                }))
            }
        }
    }
}

impl Sql for Conn {
    fn dialect(&self) -> Dialect {
        match self {
            Conn::Sqlite(_) => Dialect::Sqlite,
            Conn::Postgres(_) => Dialect::Postgres,
        }
    }
    fn execute(&self, sql: &str, params: &[&dyn ToValue]) -> Result<usize> {
        match self {
            Conn::Sqlite(c) => sqlite_execute(c, sql, params),
            Conn::Postgres(c) => c.execute(None, sql, params),
        }
    }
    fn query_rows(&self, sql: &str, params: &[&dyn ToValue]) -> Result<Vec<Row>> {
        match self {
            Conn::Sqlite(c) => sqlite_query(c, sql, params),
            Conn::Postgres(c) => c.query(None, sql, params),
        }
    }
    fn execute_batch(&self, sql: &str) -> Result<()> {
        match self {
            Conn::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Conn::Postgres(c) => c.batch(None, sql.to_owned()),
        }
    }
}

/// A transaction on either database. Dropped without [`Tx::commit`], it rolls back.
pub enum Tx<'a> {
    Sqlite(rusqlite::Transaction<'a>),
    Postgres(PgTx<'a>),
}

impl Tx<'_> {
    pub fn commit(self) -> Result<()> {
        match self {
            Tx::Sqlite(t) => Ok(t.commit()?),
            Tx::Postgres(t) => {
                t.open.set(false);
                t.conn.batch(Some(t.generation), "COMMIT".into())
            }
        }
    }
}

impl Sql for Tx<'_> {
    fn dialect(&self) -> Dialect {
        match self {
            Tx::Sqlite(_) => Dialect::Sqlite,
            Tx::Postgres(_) => Dialect::Postgres,
        }
    }
    fn execute(&self, sql: &str, params: &[&dyn ToValue]) -> Result<usize> {
        match self {
            Tx::Sqlite(t) => sqlite_execute(t, sql, params),
            Tx::Postgres(t) => t.conn.execute(Some(t.generation), sql, params),
        }
    }
    fn query_rows(&self, sql: &str, params: &[&dyn ToValue]) -> Result<Vec<Row>> {
        match self {
            Tx::Sqlite(t) => sqlite_query(t, sql, params),
            Tx::Postgres(t) => t.conn.query(Some(t.generation), sql, params),
        }
    }
    fn execute_batch(&self, sql: &str) -> Result<()> {
        match self {
            Tx::Sqlite(t) => Ok(t.execute_batch(sql)?),
            Tx::Postgres(t) => t.conn.batch(Some(t.generation), sql.to_owned()),
        }
    }
}

/// A Postgres transaction: `BEGIN` was sent; `COMMIT` on commit, `ROLLBACK` when dropped open.
/// Bound to the connection it began on: after a reconnect, its statements fail instead of
/// running outside it.
pub struct PgTx<'a> {
    conn: &'a PgConn,
    open: std::cell::Cell<bool>,
    generation: u64,
}

impl Drop for PgTx<'_> {
    fn drop(&mut self) {
        if self.open.get()
            && let Err(e) = self.conn.batch(Some(self.generation), "ROLLBACK".into())
        {
            tracing::warn!(error = %e, "store: rolling back a Postgres transaction failed");
        }
    }
}

type PgJob = Box<dyn FnOnce(&mut postgres::Client, u64) + Send>;

/// A Postgres connection on a thread of its own. rust-postgres' synchronous client runs a
/// small Tokio runtime inside, which may not be entered from a thread that is already running
/// one (an async task); callers of the store are on all kinds of threads, so each statement is
/// handed to this thread and its caller waits for the answer, as it waits for SQLite.
///
/// A connection that breaks (the database restarted, the network dropped it) is made again
/// before the next statement; its generation counts the connections, so a transaction (and the
/// duty lock, which lives as long as its session) knows it was lost.
pub struct PgConn {
    jobs: std::sync::mpsc::Sender<PgJob>,
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

fn lost(message: String) -> DbError {
    DbError::Lost(message)
}

impl PgConn {
    /// Connects (on the new thread) and runs `setup` (migrations) there before anything else.
    pub fn connect(
        target: crate::PgTarget,
        setup: impl FnOnce(&mut postgres::Client) -> Result<(), crate::StoreError> + Send + 'static,
    ) -> Result<PgConn, crate::StoreError> {
        use std::sync::atomic::Ordering;
        let (jobs, rx) = std::sync::mpsc::channel::<PgJob>();
        let (ready_tx, ready) = std::sync::mpsc::sync_channel(1);
        let generation = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let gen_thread = std::sync::Arc::clone(&generation);
        std::thread::Builder::new()
            .name("alcove-postgres".into())
            .spawn(move || {
                let mut client = match target.connect() {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(crate::StoreError::Open(e.into())));
                        return;
                    }
                };
                if let Err(e) = setup(&mut client) {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
                let _ = ready_tx.send(Ok(()));
                // Ends when the connection (the last sender) is dropped.
                while let Ok(job) = rx.recv() {
                    if client.is_closed() {
                        match target.connect() {
                            Ok(c) => {
                                client = c;
                                gen_thread.fetch_add(1, Ordering::SeqCst);
                                tracing::warn!(
                                    "store: the Postgres connection broke and was made again"
                                );
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "store: reconnecting to Postgres failed")
                            }
                        }
                    }
                    job(&mut client, gen_thread.load(Ordering::SeqCst));
                }
            })
            .map_err(|e| {
                crate::StoreError::Open(lost(format!(
                    "starting the Postgres connection's thread: {e}"
                )))
            })?;
        ready.recv().unwrap_or_else(|_| {
            Err(crate::StoreError::Open(lost(
                "the Postgres connection's thread ended".into(),
            )))
        })?;
        Ok(PgConn { jobs, generation })
    }

    /// How many times the connection was made again.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Runs `f` on the connection's thread and waits for its result. With `within`, only on
    /// that generation of the connection (a transaction's).
    fn run<T: Send + 'static>(
        &self,
        within: Option<u64>,
        f: impl FnOnce(&mut postgres::Client) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let job: PgJob = Box::new(move |c, generation| {
            let r = match within {
                Some(g) if g != generation => Err(lost(
                    "the connection to Postgres broke during this transaction; it was rolled \
                     back"
                        .into(),
                )),
                _ => f(c),
            };
            let _ = tx.send(r);
        });
        let gone = || lost("the Postgres connection's thread ended".into());
        self.jobs.send(job).map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())?
    }

    // `within`: as in `run` (a transaction's generation, or `None`).
    fn execute(&self, within: Option<u64>, sql: &str, params: &[&dyn ToValue]) -> Result<usize> {
        let (sql, values) = for_postgres(sql, params);
        self.run(within, move |c| {
            Ok(c.execute(&sql, &pg_params(&values))? as usize)
        })
    }

    fn query(&self, within: Option<u64>, sql: &str, params: &[&dyn ToValue]) -> Result<Vec<Row>> {
        let (sql, values) = for_postgres(sql, params);
        self.run(within, move |c| {
            pg_rows(c.query(&sql, &pg_params(&values))?)
        })
    }

    fn batch(&self, within: Option<u64>, sql: String) -> Result<()> {
        self.run(within, move |c| Ok(c.batch_execute(&sql)?))
    }
}

// --- SQLite ---

fn to_sqlite(v: Value) -> rusqlite::types::Value {
    use rusqlite::types::Value as S;
    match v {
        Value::Null => S::Null,
        Value::Int(i) => S::Integer(i),
        Value::Real(f) => S::Real(f),
        Value::Text(s) => S::Text(s),
        Value::Blob(b) => S::Blob(b),
    }
}

fn from_sqlite(v: rusqlite::types::ValueRef<'_>) -> Value {
    use rusqlite::types::ValueRef as S;
    match v {
        S::Null => Value::Null,
        S::Integer(i) => Value::Int(i),
        S::Real(f) => Value::Real(f),
        S::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        S::Blob(b) => Value::Blob(b.to_vec()),
    }
}

fn sqlite_params(params: &[&dyn ToValue]) -> Vec<rusqlite::types::Value> {
    params.iter().map(|p| to_sqlite(p.to_value())).collect()
}

fn sqlite_execute(c: &rusqlite::Connection, sql: &str, params: &[&dyn ToValue]) -> Result<usize> {
    let mut stmt = c.prepare_cached(sql)?;
    Ok(stmt.execute(rusqlite::params_from_iter(sqlite_params(params)))?)
}

fn sqlite_query(c: &rusqlite::Connection, sql: &str, params: &[&dyn ToValue]) -> Result<Vec<Row>> {
    let mut stmt = c.prepare_cached(sql)?;
    let n = stmt.column_count();
    let mut rows = stmt.query(rusqlite::params_from_iter(sqlite_params(params)))?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let mut values = Vec::with_capacity(n);
        for i in 0..n {
            values.push(from_sqlite(r.get_ref(i)?));
        }
        out.push(Row { values });
    }
    Ok(out)
}

// --- Postgres ---

/// The statement with `?N` rewritten to `$N` (outside quotes), and its parameters' values.
fn for_postgres(sql: &str, params: &[&dyn ToValue]) -> (String, Vec<Value>) {
    (
        placeholders_for_postgres(sql),
        params.iter().map(|p| p.to_value()).collect(),
    )
}

/// `?1` → `$1`, leaving quoted text and identifiers alone.
pub fn placeholders_for_postgres(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quote: Option<char> = None;
    for c in sql.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '\'' || c == '"' => quote = Some(c),
            None if c == '?' => {
                out.push('$');
                continue;
            }
            None => {}
        }
        out.push(c);
    }
    out
}

fn pg_params(values: &[Value]) -> Vec<&(dyn postgres::types::ToSql + Sync)> {
    values
        .iter()
        .map(|v| v as &(dyn postgres::types::ToSql + Sync))
        .collect()
}

fn pg_rows(rows: Vec<postgres::Row>) -> Result<Vec<Row>> {
    rows.iter()
        .map(|r| {
            let values = (0..r.len())
                .map(|i| r.try_get::<_, Value>(i))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Row { values })
        })
        .collect()
}

type BoxError = Box<dyn std::error::Error + Sync + Send>;

impl postgres::types::ToSql for Value {
    fn to_sql(
        &self,
        ty: &postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<postgres::types::IsNull, BoxError> {
        use postgres::types::Type;
        match self {
            Value::Null => Ok(postgres::types::IsNull::Yes),
            Value::Int(i) => match *ty {
                Type::INT8 => i.to_sql(ty, out),
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                Type::BOOL => (*i != 0).to_sql(ty, out),
                Type::FLOAT8 => (*i as f64).to_sql(ty, out),
                Type::TEXT | Type::VARCHAR => i.to_string().to_sql(ty, out),
                _ => Err(format!("an integer cannot be sent as {ty}").into()),
            },
            Value::Real(f) => match *ty {
                Type::FLOAT8 => f.to_sql(ty, out),
                Type::FLOAT4 => (*f as f32).to_sql(ty, out),
                _ => Err(format!("a real cannot be sent as {ty}").into()),
            },
            Value::Text(s) => s.as_str().to_sql(ty, out),
            Value::Blob(b) => b.as_slice().to_sql(ty, out),
        }
    }

    fn accepts(_: &postgres::types::Type) -> bool {
        true
    }

    postgres::types::to_sql_checked!();
}

impl<'a> postgres::types::FromSql<'a> for Value {
    fn from_sql(ty: &postgres::types::Type, raw: &'a [u8]) -> Result<Self, BoxError> {
        use postgres::types::Type;
        Ok(match *ty {
            Type::INT8 => Value::Int(i64::from_sql(ty, raw)?),
            Type::INT4 => Value::Int(i32::from_sql(ty, raw)?.into()),
            Type::INT2 => Value::Int(i16::from_sql(ty, raw)?.into()),
            Type::BOOL => Value::Int(bool::from_sql(ty, raw)?.into()),
            Type::FLOAT8 => Value::Real(f64::from_sql(ty, raw)?),
            Type::FLOAT4 => Value::Real(f32::from_sql(ty, raw)?.into()),
            Type::BYTEA => Value::Blob(raw.to_vec()),
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
                Value::Text(String::from_sql(ty, raw)?)
            }
            _ => {
                return Err(format!(
                    "a column of type {ty} (CAST it in the query to BIGINT, DOUBLE PRECISION \
                     or TEXT)"
                )
                .into());
            }
        })
    }

    fn from_sql_null(_: &postgres::types::Type) -> Result<Self, BoxError> {
        Ok(Value::Null)
    }

    fn accepts(_: &postgres::types::Type) -> bool {
        true
    }
}

/// A migration written for SQLite, as Postgres DDL: `INTEGER` columns are `BIGINT` (SQLite's
/// integers are 64-bit), `REAL` is `DOUBLE PRECISION`, `BLOB` is `BYTEA`, an
/// `INTEGER PRIMARY KEY AUTOINCREMENT` is an identity column, `TEXT` compares bytes (collation
/// "C", as SQLite), and `WITHOUT ROWID` (a SQLite storage choice) goes. Words are matched whole, outside quotes and comments' meaning is kept.
pub fn postgres_ddl(sql: &str) -> String {
    let sql = sql.replace(
        "INTEGER PRIMARY KEY AUTOINCREMENT",
        "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
    );
    let sql = sql.replace(") WITHOUT ROWID;", ");");
    let mut out = String::with_capacity(sql.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        out.push_str(match word.as_str() {
            "INTEGER" => "BIGINT",
            "REAL" => "DOUBLE PRECISION",
            "BLOB" => "BYTEA",
            // Byte order, as SQLite's BINARY collation: sorting and paging by names is the
            // same on both, whatever locale the Postgres database was created with.
            "TEXT" => "TEXT COLLATE \"C\"",
            w => w,
        });
        word.clear();
    };
    for c in sql.chars() {
        if c.is_ascii_alphanumeric() || c == '_' {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_for_postgres_outside_quotes() {
        assert_eq!(
            placeholders_for_postgres(
                "SELECT a FROM t WHERE b = ?1 AND c = '?' AND d IN (?2, ?10)"
            ),
            "SELECT a FROM t WHERE b = $1 AND c = '?' AND d IN ($2, $10)"
        );
    }

    #[test]
    fn sqlite_ddl_becomes_postgres_ddl() {
        let ddl = postgres_ddl(
            "CREATE TABLE t (seq INTEGER PRIMARY KEY AUTOINCREMENT, n INTEGER NOT NULL, \
             r REAL, b BLOB, interval_note TEXT) WITHOUT ROWID;",
        );
        assert_eq!(
            ddl,
            "CREATE TABLE t (seq BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, \
             n BIGINT NOT NULL, r DOUBLE PRECISION, b BYTEA, interval_note TEXT COLLATE \"C\");"
        );
    }

    #[test]
    fn sqlite_round_trips_values_and_reads_rows_whole() {
        let mut conn = Conn::Sqlite(rusqlite::Connection::open_in_memory().unwrap());
        conn.execute_batch("CREATE TABLE t (i INTEGER, r REAL, s TEXT, b BLOB, n INTEGER)")
            .unwrap();
        let tx = conn.begin().unwrap();
        let none: Option<i64> = None;
        tx.execute(
            "INSERT INTO t VALUES (?1, ?2, ?3, ?4, ?5)",
            params![7i64, 1.5f64, "x", vec![1u8, 2], none],
        )
        .unwrap();
        tx.commit().unwrap();
        let (i, r, s, b, n): (u32, f64, String, Vec<u8>, Option<i64>) = conn
            .query_row("SELECT i, r, s, b, n FROM t", params![], |row| {
                Ok((
                    row.get(0)?,
                    row.get(1)?,
                    row.get(2)?,
                    row.get(3)?,
                    row.get(4)?,
                ))
            })
            .unwrap();
        assert_eq!((i, r, s.as_str(), b, n), (7, 1.5, "x", vec![1, 2], None));
        let missing = conn
            .query_row("SELECT i FROM t WHERE i = ?1", params![8], |row| {
                row.get::<i64>(0)
            })
            .optional()
            .unwrap();
        assert_eq!(missing, None);
        let bad = conn.query_row("SELECT s FROM t", params![], |row| row.get::<i64>(0));
        assert!(matches!(bad, Err(DbError::Conversion { index: 0, .. })));
    }
}

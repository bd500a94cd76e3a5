//! Versioned schema migrations. Migration `i` (0-based) takes the schema from version `i` to
//! `i + 1`; the version lives in `PRAGMA user_version`. Migrations are append-only: never edit
//! one that has shipped, add the next.

use rusqlite::Connection;

use crate::db::{DbError, WRITE_LOCK, postgres_ddl};
use crate::{Result, StoreError};

pub(crate) const MIGRATIONS: &[&str] = &[
    // 1: the initial schema.
    r#"
    CREATE TABLE teams (
        id          TEXT PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        created_at  INTEGER NOT NULL
    );
    CREATE TABLE api_keys (
        id          TEXT PRIMARY KEY,
        team_id     TEXT NOT NULL REFERENCES teams(id),
        name        TEXT NOT NULL,
        prefix      TEXT NOT NULL,
        hash        TEXT NOT NULL UNIQUE,
        created_at  INTEGER NOT NULL,
        revoked_at  INTEGER
    );
    CREATE TABLE templates (
        id            TEXT PRIMARY KEY,
        team_id       TEXT REFERENCES teams(id),
        build_id      TEXT NOT NULL,
        cpu_count     INTEGER NOT NULL,
        memory_mb     INTEGER NOT NULL,
        disk_size_mb  INTEGER NOT NULL,
        envd_version  TEXT NOT NULL,
        public        INTEGER NOT NULL,
        created_at    INTEGER NOT NULL,
        updated_at    INTEGER NOT NULL
    );
    CREATE TABLE template_aliases (
        alias        TEXT PRIMARY KEY,
        template_id  TEXT NOT NULL REFERENCES templates(id) ON DELETE CASCADE
    );
    CREATE TABLE sandboxes (
        id                     TEXT PRIMARY KEY,
        team_id                TEXT NOT NULL REFERENCES teams(id),
        template_id            TEXT NOT NULL,
        alias                  TEXT,
        state                  TEXT NOT NULL,
        created_at             INTEGER NOT NULL,
        started_at             INTEGER NOT NULL,
        end_at                 INTEGER NOT NULL,
        cpu_count              INTEGER NOT NULL,
        memory_mb              INTEGER NOT NULL,
        disk_size_mb           INTEGER NOT NULL,
        envd_version           TEXT NOT NULL,
        envd_access_token      TEXT,
        auto_pause             INTEGER NOT NULL,
        allow_internet_access  INTEGER,
        end_reason             TEXT,
        ended_at               INTEGER
    );
    CREATE TABLE sandbox_metadata (
        sandbox_id  TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
        key         TEXT NOT NULL,
        value       TEXT NOT NULL,
        PRIMARY KEY (sandbox_id, key)
    );
    CREATE TABLE sandbox_env_names (
        sandbox_id  TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
        name        TEXT NOT NULL,
        PRIMARY KEY (sandbox_id, name)
    );
    CREATE TABLE sandbox_events (
        seq         INTEGER PRIMARY KEY AUTOINCREMENT,
        sandbox_id  TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
        at          INTEGER NOT NULL,
        from_state  TEXT,
        to_state    TEXT NOT NULL,
        reason      TEXT NOT NULL
    );
    CREATE INDEX sandbox_events_by_sandbox ON sandbox_events(sandbox_id, seq);
    "#,
    // 2: key usage tracking, and the index the list endpoints filter on.
    r#"
    ALTER TABLE api_keys ADD COLUMN last_used_at INTEGER;
    CREATE INDEX sandboxes_by_team_state ON sandboxes(team_id, state, started_at);
    "#,
    // 3: traffic access tokens (sandboxes created with `allowPublicTraffic: false`).
    r#"
    ALTER TABLE sandboxes ADD COLUMN traffic_access_token TEXT;
    "#,
    // 4: persistence. Pause/resume: auto-resume on traffic, the lifetime a resume restarts, when
    // the sandbox was paused. Snapshots: the checkpoint tree (each snapshot records the
    // snapshot its sandbox came from); sandboxes record the snapshot they were created from.
    r#"
    ALTER TABLE sandboxes ADD COLUMN auto_resume INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE sandboxes ADD COLUMN timeout_ms INTEGER;
    ALTER TABLE sandboxes ADD COLUMN paused_at INTEGER;
    ALTER TABLE sandboxes ADD COLUMN snapshot_id TEXT;
    CREATE TABLE snapshots (
        id           TEXT PRIMARY KEY,
        team_id      TEXT NOT NULL REFERENCES teams(id),
        sandbox_id   TEXT NOT NULL,
        parent_id    TEXT REFERENCES snapshots(id),
        name         TEXT,
        kind         TEXT NOT NULL,
        template_id  TEXT NOT NULL,
        created_at   INTEGER NOT NULL,
        deleted_at   INTEGER
    );
    CREATE INDEX snapshots_by_team ON snapshots(team_id, created_at);
    CREATE INDEX snapshots_by_name ON snapshots(team_id, name, created_at);
    "#,
    // 5: templates built through the API (issue 14). A team's template is a `templates` row
    // with `team_id` set whose `build_id` is its newest ready build; builds carry their status,
    // the request, the node's template key and their log; tags name builds; upload nonces make
    // signed upload URLs single-use.
    r#"
    ALTER TABLE templates ADD COLUMN name TEXT;
    CREATE TABLE template_builds (
        id            TEXT PRIMARY KEY,
        template_id   TEXT NOT NULL,
        team_id       TEXT NOT NULL REFERENCES teams(id),
        status        TEXT NOT NULL,
        spec          TEXT,
        tags          TEXT NOT NULL,
        image_key     TEXT,
        cpu_count     INTEGER NOT NULL,
        memory_mb     INTEGER NOT NULL,
        disk_size_mb  INTEGER NOT NULL,
        reason        TEXT,
        reason_step   TEXT,
        stored_bytes  INTEGER NOT NULL DEFAULT 0,
        created_at    INTEGER NOT NULL,
        updated_at    INTEGER NOT NULL,
        finished_at   INTEGER,
        deleted_at    INTEGER
    );
    CREATE INDEX template_builds_by_template ON template_builds(template_id, created_at);
    CREATE INDEX template_builds_by_status ON template_builds(status);
    CREATE TABLE template_build_logs (
        build_id  TEXT NOT NULL,
        seq       INTEGER NOT NULL,
        at        INTEGER NOT NULL,
        level     TEXT NOT NULL,
        step      TEXT,
        message   TEXT NOT NULL,
        PRIMARY KEY (build_id, seq)
    );
    CREATE TABLE template_tags (
        template_id  TEXT NOT NULL,
        tag          TEXT NOT NULL,
        build_id     TEXT NOT NULL,
        created_at   INTEGER NOT NULL,
        PRIMARY KEY (template_id, tag)
    );
    CREATE TABLE upload_nonces (
        nonce       TEXT PRIMARY KEY,
        expires_at  INTEGER NOT NULL
    );
    "#,
    // 6: `Idempotency-Key` on sandbox creates: a key names one create per team for 24 h. The row
    // is claimed before the create starts (`sandbox_id` NULL) and names its sandbox once made.
    r#"
    CREATE TABLE idempotency_keys (
        team_id     TEXT NOT NULL REFERENCES teams(id),
        key         TEXT NOT NULL,
        body_hash   TEXT NOT NULL,
        sandbox_id  TEXT,
        created_at  INTEGER NOT NULL,
        PRIMARY KEY (team_id, key)
    );
    CREATE INDEX idempotency_keys_created ON idempotency_keys(created_at);
    "#,
    // 7: `network.maskRequestHost`: the Host header the proxy sends to the sandbox's ports.
    r#"
    ALTER TABLE sandboxes ADD COLUMN mask_request_host TEXT;
    "#,
    // 8: metering (`metering.rs`) and team limits (`limits.rs`). `metered_at`: compute of a
    // running sandbox is metered up to here; `alive_at`: the last time the backend showed its VM
    // (a sandbox found dead is charged up to then). Sandboxes running at the upgrade start
    // their metering at it. `usage_events` are immutable once written; `key` is the idempotency
    // key billing systems dedupe on. `meter_marks`: per stored object (and per sandbox's
    // network counters) how far it is metered and what it held then. `spend_notices`: the
    // spend warnings reached, one per team, month and threshold, and the webhook outbox.
    r#"
    ALTER TABLE sandboxes ADD COLUMN metered_at INTEGER;
    ALTER TABLE sandboxes ADD COLUMN alive_at INTEGER;
    UPDATE sandboxes SET metered_at = CAST(strftime('%s', 'now') AS INTEGER) * 1000
        WHERE state = 'running';
    CREATE TABLE usage_events (
        seq                 INTEGER PRIMARY KEY AUTOINCREMENT,
        key                 TEXT NOT NULL UNIQUE,
        team_id             TEXT NOT NULL,
        sandbox_id          TEXT,
        template_id         TEXT,
        kind                TEXT NOT NULL,
        start_at            INTEGER NOT NULL,
        end_at              INTEGER NOT NULL,
        vcpu_seconds        REAL NOT NULL DEFAULT 0,
        memory_gib_seconds  REAL NOT NULL DEFAULT 0,
        storage_gib_hours   REAL NOT NULL DEFAULT 0,
        egress_bytes        INTEGER NOT NULL DEFAULT 0,
        ingress_bytes       INTEGER NOT NULL DEFAULT 0,
        created_at          INTEGER NOT NULL
    );
    CREATE INDEX usage_events_by_team ON usage_events(team_id, start_at);
    CREATE INDEX usage_events_by_start ON usage_events(start_at);
    -- Usage summed per clock hour (no event crosses one), kept by the trigger below, so a
    -- report over a month reads hours, not every event. '' stands for no sandbox or template.
    CREATE TABLE usage_hourly (
        team_id             TEXT NOT NULL,
        hour                INTEGER NOT NULL,
        sandbox_id          TEXT NOT NULL,
        template_id         TEXT NOT NULL,
        vcpu_seconds        REAL NOT NULL,
        memory_gib_seconds  REAL NOT NULL,
        storage_gib_hours   REAL NOT NULL,
        egress_bytes        INTEGER NOT NULL,
        ingress_bytes       INTEGER NOT NULL,
        PRIMARY KEY (team_id, hour, sandbox_id, template_id)
    );
    CREATE TRIGGER usage_events_roll_up AFTER INSERT ON usage_events BEGIN
        INSERT INTO usage_hourly (team_id, hour, sandbox_id, template_id, vcpu_seconds,
            memory_gib_seconds, storage_gib_hours, egress_bytes, ingress_bytes)
        VALUES (NEW.team_id, NEW.start_at / 3600000, COALESCE(NEW.sandbox_id, ''),
            COALESCE(NEW.template_id, ''), NEW.vcpu_seconds, NEW.memory_gib_seconds,
            NEW.storage_gib_hours, NEW.egress_bytes, NEW.ingress_bytes)
        ON CONFLICT (team_id, hour, sandbox_id, template_id) DO UPDATE SET
            vcpu_seconds = usage_hourly.vcpu_seconds + excluded.vcpu_seconds,
            memory_gib_seconds = usage_hourly.memory_gib_seconds + excluded.memory_gib_seconds,
            storage_gib_hours = usage_hourly.storage_gib_hours + excluded.storage_gib_hours,
            egress_bytes = usage_hourly.egress_bytes + excluded.egress_bytes,
            ingress_bytes = usage_hourly.ingress_bytes + excluded.ingress_bytes;
    END;
    CREATE TABLE meter_marks (
        object       TEXT PRIMARY KEY,
        team_id      TEXT NOT NULL,
        sandbox_id   TEXT,
        template_id  TEXT,
        at           INTEGER NOT NULL,
        bytes        INTEGER NOT NULL DEFAULT 0,
        out_bytes    INTEGER NOT NULL DEFAULT 0,
        in_bytes     INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE team_limits (
        team_id                TEXT PRIMARY KEY REFERENCES teams(id),
        max_running            INTEGER,
        max_paused             INTEGER,
        max_storage_gib        REAL,
        monthly_spend_cap_usd  REAL,
        warn_at_percent        TEXT NOT NULL,
        on_cap                 TEXT NOT NULL,
        updated_at             INTEGER NOT NULL
    );
    CREATE TABLE spend_notices (
        team_id       TEXT NOT NULL,
        month         TEXT NOT NULL,
        percent       INTEGER NOT NULL,
        at            INTEGER NOT NULL,
        spend_usd     REAL NOT NULL,
        cap_usd       REAL NOT NULL,
        attempts      INTEGER NOT NULL DEFAULT 0,
        next_try_at   INTEGER,
        delivered_at  INTEGER,
        last_error    TEXT,
        PRIMARY KEY (team_id, month, percent)
    );
    "#,
    // 9: per-sandbox resource samples (`metrics_history.rs`): `res` 0 is a raw sample (every few
    // seconds, kept an hour), 1 a minute's average (kept a day).
    r#"
    CREATE TABLE sandbox_metrics (
        sandbox_id    TEXT NOT NULL,
        res           INTEGER NOT NULL,
        at            INTEGER NOT NULL,
        cpu_count     INTEGER NOT NULL,
        cpu_used_pct  REAL NOT NULL,
        mem_used      INTEGER NOT NULL,
        mem_total     INTEGER NOT NULL,
        mem_cache     INTEGER NOT NULL,
        disk_used     INTEGER NOT NULL,
        disk_total    INTEGER NOT NULL,
        PRIMARY KEY (sandbox_id, res, at)
    ) WITHOUT ROWID;
    CREATE INDEX sandbox_metrics_by_age ON sandbox_metrics(res, at);
    "#,
    // 10: the audit log and run traces (`audit.rs`), hash-chained.
    r#"
    CREATE TABLE audit_events (
        seq         INTEGER PRIMARY KEY,
        at          INTEGER NOT NULL,
        team_id     TEXT,
        actor       TEXT NOT NULL,
        sandbox_id  TEXT,
        kind        TEXT NOT NULL,
        action      TEXT NOT NULL,
        target      TEXT,
        result      TEXT NOT NULL,
        detail      TEXT NOT NULL,
        prev_hash   TEXT NOT NULL,
        hash        TEXT NOT NULL
    );
    CREATE INDEX audit_events_by_sandbox ON audit_events(sandbox_id, seq);
    CREATE INDEX audit_events_by_team ON audit_events(team_id, seq);
    CREATE INDEX audit_events_by_time ON audit_events(at);
    "#,
    // 11: timeout pauses that keep only the disk (`autoPauseMemory: false`).
    r#"
    ALTER TABLE sandboxes ADD COLUMN auto_pause_disk_only INTEGER NOT NULL DEFAULT 0;
    "#,
    // 12: E2B's secrets (`secrets.rs`): one row per secret (its name lower-cased, unique in its
    // team) and its versions, each only a nonce and AES-256-GCM ciphertext (the API encrypts).
    r#"
    CREATE TABLE secrets (
        id               TEXT PRIMARY KEY,
        team_id          TEXT NOT NULL REFERENCES teams(id),
        name             TEXT NOT NULL,
        current_version  INTEGER NOT NULL,
        metadata         TEXT NOT NULL,
        created_at       INTEGER NOT NULL,
        updated_at       INTEGER NOT NULL,
        UNIQUE (team_id, name)
    );
    CREATE TABLE secret_versions (
        secret_id   TEXT NOT NULL REFERENCES secrets(id) ON DELETE CASCADE,
        version     INTEGER NOT NULL,
        nonce       BLOB NOT NULL,
        ciphertext  BLOB NOT NULL,
        created_at  INTEGER NOT NULL,
        PRIMARY KEY (secret_id, version)
    ) WITHOUT ROWID;
    "#,
    // 13: E2B's volumes (`volumes.rs`): one row per volume (its name unique in its team; the
    // files live under `<data>/volumes/<id>/`), and which sandboxes mount which volume where. A
    // mount row keeps the volume's id and name without a foreign key, so a killed sandbox still
    // shows what it mounted after the volume is deleted.
    r#"
    CREATE TABLE volumes (
        id          TEXT PRIMARY KEY,
        team_id     TEXT NOT NULL REFERENCES teams(id),
        name        TEXT NOT NULL,
        created_at  INTEGER NOT NULL,
        UNIQUE (team_id, name)
    );
    CREATE TABLE sandbox_volumes (
        sandbox_id  TEXT NOT NULL REFERENCES sandboxes(id) ON DELETE CASCADE,
        path        TEXT NOT NULL,
        volume_id   TEXT NOT NULL,
        name        TEXT NOT NULL,
        seq         INTEGER NOT NULL,
        PRIMARY KEY (sandbox_id, path)
    ) WITHOUT ROWID;
    CREATE INDEX sandbox_volumes_by_volume ON sandbox_volumes(volume_id);
    "#,
    // 14: dashboard sign-ins (`dashboard.rs`): the SHA-256 of the session cookie's token, the
    // key it was opened with (revoking the key ends the session), its CSRF token and expiry.
    r#"
    CREATE TABLE dashboard_sessions (
        token_hash  TEXT PRIMARY KEY,
        team_id     TEXT NOT NULL REFERENCES teams(id),
        key_id      TEXT NOT NULL REFERENCES api_keys(id),
        csrf        TEXT NOT NULL,
        created_at  INTEGER NOT NULL,
        expires_at  INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX dashboard_sessions_by_expiry ON dashboard_sessions(expires_at);
    "#,
    // 15: network in the metrics history: the sandbox's egress proxy counters (bytes out and
    // in since its VM started) at each sample, for the dashboard's network chart.
    r#"
    ALTER TABLE sandbox_metrics ADD COLUMN net_tx INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE sandbox_metrics ADD COLUMN net_rx INTEGER NOT NULL DEFAULT 0;
    "#,
];

/// Migration `index` for Postgres: the SQLite text through [`postgres_ddl`], except where
/// SQLite's own syntax has no such translation (a trigger's body, `strftime`); those parts are
/// written for Postgres here, keeping the same tables, columns and effects.
pub(crate) fn postgres_migration(index: usize) -> String {
    let sql = postgres_ddl(MIGRATIONS[index]);
    if index != 7 {
        return sql;
    }
    let sql = sql.replace(
        "CAST(strftime('%s', 'now') AS BIGINT) * 1000",
        "CAST(EXTRACT(EPOCH FROM now()) * 1000 AS BIGINT)",
    );
    let start = sql
        .find("CREATE TRIGGER usage_events_roll_up")
        .expect("migration 8 has its trigger");
    let end = start + sql[start..].find("END;").expect("the trigger ends") + "END;".len();
    let body = &sql[start..end];
    let insert = &body[body
        .find("INSERT INTO usage_hourly")
        .expect("the trigger inserts")
        ..body.rfind("END;").expect("the trigger ends")];
    let function = format!(
        "CREATE FUNCTION usage_events_roll_up() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        {insert}
        RETURN NEW;
    END $$;
    CREATE TRIGGER usage_events_roll_up AFTER INSERT ON usage_events
        FOR EACH ROW EXECUTE FUNCTION usage_events_roll_up();"
    );
    format!("{}{function}{}", &sql[..start], &sql[end..])
}

/// Brings a Postgres database to version `upto`, in one transaction under the store's write
/// lock, so replicas starting together migrate once. The version is kept in `schema_version`.
pub(crate) fn migrate_postgres(client: &mut postgres::Client, upto: usize) -> Result<()> {
    let open = |e: postgres::Error| StoreError::Open(DbError::Postgres(e));
    let mut tx = client.transaction().map_err(open)?;
    tx.execute(&format!("SELECT {WRITE_LOCK}"), &[])
        .map_err(open)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
        .map_err(open)?;
    let current: Option<i64> = tx
        .query_opt("SELECT version FROM schema_version", &[])
        .map_err(open)?
        .map(|r| r.get(0));
    if current.is_none() {
        tx.execute("INSERT INTO schema_version (version) VALUES (0)", &[])
            .map_err(open)?;
    }
    let current = current.unwrap_or(0) as usize;
    if current > MIGRATIONS.len() {
        return Err(StoreError::SchemaTooNew {
            found: current,
            known: MIGRATIONS.len(),
        });
    }
    for i in current..upto {
        let version = i + 1;
        tx.batch_execute(&postgres_migration(i))
            .and_then(|()| {
                tx.execute(
                    "UPDATE schema_version SET version = $1",
                    &[&(version as i64)],
                )
                .map(drop)
            })
            .map_err(|e| StoreError::Migrate {
                version,
                source: DbError::Postgres(e),
            })?;
        tracing::info!(version, "store: applied schema migration (postgres)");
    }
    tx.commit().map_err(open)
}

/// Applies migrations until the schema is at version `upto`, each in its own transaction.
pub(crate) fn migrate(conn: &mut Connection, upto: usize) -> Result<()> {
    let current: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| StoreError::Open(e.into()))?;
    let current = current as usize;
    if current > MIGRATIONS.len() {
        return Err(StoreError::SchemaTooNew {
            found: current,
            known: MIGRATIONS.len(),
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().take(upto).skip(current) {
        let version = i + 1;
        let step = |conn: &mut Connection| -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", version as i64)?;
            tx.commit()
        };
        step(conn).map_err(|e| StoreError::Migrate {
            version,
            source: e.into(),
        })?;
        tracing::info!(version, "store: applied schema migration");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DB_FILE, SandboxState, Store};

    /// A database written by the first schema (a team, a key, a sandbox) opens under the
    /// current one with everything intact, and the new column is there.
    #[test]
    fn an_old_database_migrates_forward() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DB_FILE);
        let secret = {
            let mut conn = Connection::open(&path).unwrap();
            migrate(&mut conn, 1).unwrap();
            let v: i64 = conn
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .unwrap();
            assert_eq!(v, 1);
            conn.execute_batch(
                "INSERT INTO teams VALUES ('t1', 'admin', 1);
                 INSERT INTO sandboxes (id, team_id, template_id, state, created_at, started_at,
                     end_at, cpu_count, memory_mb, disk_size_mb, envd_version, auto_pause)
                 VALUES ('s1', 't1', 'base', 'running', 1, 1, 2, 2, 512, 1024, '0.2.0', 0);",
            )
            .unwrap();
            let secret = "alcove_0123456789abcdef";
            conn.execute(
                "INSERT INTO api_keys (id, team_id, name, prefix, hash, created_at)
                 VALUES ('k1', 't1', 'old', 'alcove_0123', ?1, 1)",
                [crate::keys::hash_secret(secret)],
            )
            .unwrap();
            secret
        };
        let store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().unwrap(), MIGRATIONS.len());
        let auth = store
            .authenticate(secret)
            .unwrap()
            .expect("old key still valid");
        assert_eq!(auth.team_id, "t1");
        let keys = store.list_api_keys(None).unwrap();
        assert!(keys[0].last_used_at.is_some(), "new column is written");
        let s = store.sandbox("s1").unwrap().unwrap();
        assert_eq!(s.state, SandboxState::Running);
        // Migration 4: old sandboxes get the defaults (no auto-resume, no recorded lifetime,
        // not made from a snapshot), and the snapshots table exists.
        assert!(!s.auto_resume);
        assert_eq!(s.timeout_ms, None);
        assert_eq!(s.snapshot_id, None);
        assert!(store.snapshots_of_team("t1").unwrap().is_empty());
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "user_version", 999).unwrap();
        assert!(matches!(
            migrate(&mut conn, MIGRATIONS.len()),
            Err(StoreError::SchemaTooNew { .. })
        ));
    }
}

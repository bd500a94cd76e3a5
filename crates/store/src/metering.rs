//! Metering: what each team used, as immutable usage events.
//!
//! Three meters, all written as rows of `usage_events` whose `key` is deterministic (what was
//! metered and the interval's start), so writing the same interval twice (a retry, a restart in
//! the middle of a tick) inserts it once, and billing systems can dedupe on it:
//!
//! * **compute** (`c:`): vCPU-seconds and memory GiB-seconds *allocated* while a sandbox is
//!   `running`, as E2B bills. `sandboxes.metered_at` is how far a running sandbox is metered.
//!   Every state change closes the open interval in the same transaction as the change
//!   ([`on_state_change`]), and [`Store::meter_compute`] closes and reopens it on each tick, so
//!   an event covers at most one tick and no interval is lost or counted twice. A server that
//!   was down while a VM kept running charges that time at its next tick (the VM ran); a sandbox
//!   found dead is charged up to `alive_at`, the last time the backend showed its VM.
//! * **storage** (`s:`): GiB-hours of what is kept on disk: running and paused sandboxes'
//!   overlays and memory images, snapshots, a team's templates. The caller measures the bytes
//!   ([`Store::meter_storage`]); a `meter_marks` row per object holds how far it is metered and
//!   what it held then. An object that ends (a sandbox killed, a snapshot deleted) is closed at
//!   that moment at its last measured size.
//! * **network** (`n:`): egress and ingress bytes of a sandbox's egress proxy. The counters are
//!   in memory and restart from zero when its VM does (resume, server restart): a mark keeps the
//!   last values seen, and a value below it means a restart.

use crate::db::{OptionalExtension, Row, Sql, SqlExt, Value, params};

use crate::{Result, SandboxState, Store, now_ms};

const GIB: f64 = (1u64 << 30) as f64;

/// What one usage event measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UsageKind {
    Compute,
    Storage,
    Network,
}

impl UsageKind {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageKind::Compute => "compute",
            UsageKind::Storage => "storage",
            UsageKind::Network => "network",
        }
    }
}

/// One row of `usage_events`: an interval of one thing's use. Never changed once written.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageEvent {
    /// Increasing in commit order: a poller that asks for `seq > last` never misses one.
    pub seq: i64,
    /// The idempotency key: the same interval of the same thing always has the same key.
    pub key: String,
    pub team_id: String,
    pub sandbox_id: Option<String>,
    pub template_id: Option<String>,
    pub kind: String,
    pub start_at: i64,
    pub end_at: i64,
    pub quantities: Quantities,
}

/// What is billed. Sums of events, or of the parts of events inside a window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Quantities {
    pub vcpu_seconds: f64,
    pub memory_gib_seconds: f64,
    pub storage_gib_hours: f64,
    pub egress_bytes: u64,
    pub ingress_bytes: u64,
}

impl Quantities {
    pub fn add(&mut self, o: &Quantities) {
        self.vcpu_seconds += o.vcpu_seconds;
        self.memory_gib_seconds += o.memory_gib_seconds;
        self.storage_gib_hours += o.storage_gib_hours;
        self.egress_bytes += o.egress_bytes;
        self.ingress_bytes += o.ingress_bytes;
    }
}

/// How [`Store::usage`] groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageGroup {
    Sandbox,
    Template,
    /// The UTC day an interval starts in.
    Day,
    Team,
}

impl UsageGroup {
    /// The grouping expression over `usage_events`, or over `usage_hourly` (`hourly`), where
    /// '' stands for none.
    fn column(self, hourly: bool) -> &'static str {
        match (self, hourly) {
            (UsageGroup::Sandbox, false) => "COALESCE(sandbox_id, template_id, '')",
            (UsageGroup::Sandbox, true) => {
                "COALESCE(NULLIF(sandbox_id, ''), NULLIF(template_id, ''), '')"
            }
            (UsageGroup::Template, _) => "COALESCE(template_id, '')",
            // The day number; named in Rust (`day_name`), cheaper than strftime per row.
            (UsageGroup::Day, false) => "(start_at / 86400000)",
            (UsageGroup::Day, true) => "(hour / 24)",
            (UsageGroup::Team, _) => "team_id",
        }
    }
}

/// One group of [`Store::usage`].
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRow {
    pub key: String,
    /// Distinct sandboxes with use in the window.
    pub sandboxes: u64,
    pub quantities: Quantities,
}

/// An object whose bytes on disk are metered, as the caller measured it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageSample {
    /// `sandbox:ID`, `snapshot:ID`, `volume:ID` or `template:ID` (see
    /// [`Store::storage_objects`]).
    pub object: String,
    pub team_id: String,
    pub sandbox_id: Option<String>,
    pub template_id: Option<String>,
    pub bytes: u64,
    /// When the object came to exist: its first interval starts here (or, for an object
    /// first seen long after, at most `max_gap` before now; see [`Store::meter_storage`]).
    pub since: i64,
}

/// A running sandbox's egress proxy counters, as read now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetSample<'a> {
    pub sandbox_id: &'a str,
    pub bytes_out: u64,
    pub bytes_in: u64,
}

/// `YYYY-MM-DD` of a day number (days since 1970-01-01, UTC).
pub fn day_name(day: i64) -> String {
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = day + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

fn sandbox_object(id: &str) -> String {
    format!("sandbox:{id}")
}

fn snapshot_object(id: &str) -> String {
    format!("snapshot:{id}")
}

pub(crate) fn volume_object(id: &str) -> String {
    format!("volume:{id}")
}

fn net_object(id: &str) -> String {
    format!("net:{id}")
}

/// The hour (ms) boundaries an event never crosses: every interval is written as one event
/// per clock hour it touches, so the hourly roll-up (`usage_hourly`) is exact.
const HOUR_MS: i64 = 3_600_000;

/// What one event is about, and its rates over its interval.
struct Interval<'a> {
    /// `c:ID`, `s:OBJECT`, `n:ID`: the idempotency key is this plus the piece's start.
    key: &'a str,
    team_id: &'a str,
    sandbox_id: Option<&'a str>,
    template_id: Option<&'a str>,
    kind: UsageKind,
    start: i64,
    end: i64,
    vcpus: f64,
    memory_gib: f64,
    storage_gib: f64,
    /// Bytes over the whole interval, shared between pieces by their length.
    egress_bytes: i64,
    ingress_bytes: i64,
}

/// Writes `iv` as one event per clock hour it touches (nothing if it is empty). Returns how
/// many were new (a piece written before, same key, is ignored).
fn write_interval(tx: &dyn Sql, iv: &Interval<'_>) -> Result<usize> {
    if iv.end <= iv.start {
        return Ok(0);
    }
    let total = (iv.end - iv.start) as f64;
    let mut written = 0;
    let (mut out_left, mut in_left) = (iv.egress_bytes, iv.ingress_bytes);
    let mut a = iv.start;
    while a < iv.end {
        let b = ((a.div_euclid(HOUR_MS) + 1) * HOUR_MS).min(iv.end);
        let len = (b - a) as f64;
        let (out, inn) = if b == iv.end {
            (out_left, in_left)
        } else {
            let share = len / total;
            (
                (iv.egress_bytes as f64 * share).round() as i64,
                (iv.ingress_bytes as f64 * share).round() as i64,
            )
        };
        out_left -= out;
        in_left -= inn;
        let key = match iv.kind {
            // Network pieces are bounded by reads, not ticks: the end is part of the key.
            UsageKind::Network => format!("{}:{a}-{b}", iv.key),
            _ => format!("{}:{a}", iv.key),
        };
        written += tx.execute(
            "INSERT INTO usage_events (key, team_id, sandbox_id, template_id, kind,
                 start_at, end_at, vcpu_seconds, memory_gib_seconds, storage_gib_hours,
                 egress_bytes, ingress_bytes, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
             ON CONFLICT DO NOTHING",
            params![
                key,
                iv.team_id,
                iv.sandbox_id,
                iv.template_id,
                iv.kind.as_str(),
                a,
                b,
                iv.vcpus * len / 1000.0,
                iv.memory_gib * len / 1000.0,
                iv.storage_gib * len / HOUR_MS as f64,
                out,
                inn,
                now_ms()
            ],
        )?;
        a = b;
    }
    Ok(written)
}

/// Writes the compute interval `[metered_at, end]` of sandbox `id` (nothing if it is not
/// metered or the interval is empty, e.g. the clock went back) and moves `metered_at` to
/// `next` (NULL when the sandbox stops running).
fn close_compute(tx: &dyn Sql, id: &str, end: i64, next: Option<i64>) -> Result<()> {
    let row: Option<(String, String, u32, u32, Option<i64>)> = tx
        .query_row(
            "SELECT team_id, COALESCE(alias, template_id), cpu_count, memory_mb, metered_at
             FROM sandboxes WHERE id = ?1",
            params![id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .optional()?;
    if let Some((team, template, cpus, memory_mb, Some(start))) = row {
        write_interval(
            tx,
            &Interval {
                key: &format!("c:{id}"),
                team_id: &team,
                sandbox_id: Some(id),
                template_id: Some(&template),
                kind: UsageKind::Compute,
                start,
                end,
                vcpus: f64::from(cpus),
                memory_gib: f64::from(memory_mb) / 1024.0,
                storage_gib: 0.0,
                egress_bytes: 0,
                ingress_bytes: 0,
            },
        )?;
    }
    tx.execute(
        "UPDATE sandboxes SET metered_at = ?2 WHERE id = ?1",
        params![id, next],
    )?;
    Ok(())
}

/// Writes the storage interval `[mark.at, end]` of `object` at its last measured size and
/// removes its mark (the object is gone).
fn close_storage(tx: &dyn Sql, object: &str, end: i64) -> Result<()> {
    write_storage(tx, object, end, None)?;
    tx.execute("DELETE FROM meter_marks WHERE object = ?1", params![object])?;
    Ok(())
}

/// A mark: who owns the object, and how far it is metered.
struct Mark {
    team_id: String,
    sandbox_id: Option<String>,
    template_id: Option<String>,
    at: i64,
    bytes: i64,
}

fn mark(tx: &dyn Sql, object: &str) -> Result<Option<Mark>> {
    Ok(tx
        .query_row(
            "SELECT team_id, sandbox_id, template_id, at, bytes FROM meter_marks
             WHERE object = ?1",
            params![object],
            |r| {
                Ok(Mark {
                    team_id: r.get(0)?,
                    sandbox_id: r.get(1)?,
                    template_id: r.get(2)?,
                    at: r.get(3)?,
                    bytes: r.get(4)?,
                })
            },
        )
        .optional()?)
}

/// Writes `[mark.at, end]` of `object`, charged at `bytes` (the new measure) or, with `None`,
/// at the mark's own (the last measure), if the mark exists and the interval is not empty.
fn write_storage(tx: &dyn Sql, object: &str, end: i64, bytes: Option<u64>) -> Result<()> {
    let Some(m) = mark(tx, object)? else {
        return Ok(());
    };
    let bytes = bytes.map_or(m.bytes, |b| b as i64);
    write_interval(
        tx,
        &Interval {
            key: &format!("s:{object}"),
            team_id: &m.team_id,
            sandbox_id: m.sandbox_id.as_deref(),
            template_id: m.template_id.as_deref(),
            kind: UsageKind::Storage,
            start: m.at,
            end,
            vcpus: 0.0,
            memory_gib: 0.0,
            storage_gib: bytes.max(0) as f64 / GIB,
            egress_bytes: 0,
            ingress_bytes: 0,
        },
    )?;
    Ok(())
}

/// The metering side of a state change, in its transaction: leaving `running` closes the
/// compute interval (at `alive_at` for a sandbox found dead, the last time it was seen, so
/// the time it was down is not charged), entering it opens one; a sandbox that ends closes
/// its storage; a resume restarts the network counters from zero (a new egress proxy).
pub(crate) fn on_state_change(
    tx: &dyn Sql,
    id: &str,
    from: Option<SandboxState>,
    to: SandboxState,
    at: i64,
) -> Result<()> {
    if from == Some(SandboxState::Running) {
        let end = if to == SandboxState::Lost {
            let (metered, alive): (Option<i64>, Option<i64>) = tx.query_row(
                "SELECT metered_at, alive_at FROM sandboxes WHERE id = ?1",
                params![id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            match (metered, alive) {
                (Some(m), Some(a)) => a.clamp(m, at),
                (Some(m), None) => m,
                _ => at,
            }
        } else {
            at
        };
        close_compute(tx, id, end, None)?;
    }
    if to == SandboxState::Running {
        tx.execute(
            "UPDATE sandboxes SET metered_at = ?2, alive_at = ?2 WHERE id = ?1",
            params![id, at],
        )?;
        tx.execute(
            "UPDATE meter_marks SET out_bytes = 0, in_bytes = 0 WHERE object = ?1",
            params![net_object(id)],
        )?;
    }
    if to.is_terminal() {
        close_storage(tx, &sandbox_object(id), at)?;
        tx.execute(
            "DELETE FROM meter_marks WHERE object = ?1",
            params![net_object(id)],
        )?;
    }
    Ok(())
}

/// Called when a volume is deleted, in its transaction.
pub(crate) fn on_volume_deleted(tx: &dyn Sql, id: &str, at: i64) -> Result<()> {
    close_storage(tx, &volume_object(id), at)
}

/// Called when a snapshot is deleted, in its transaction.
pub(crate) fn on_snapshot_deleted(tx: &dyn Sql, id: &str, at: i64) -> Result<()> {
    close_storage(tx, &snapshot_object(id), at)
}

fn row_to_event(r: &Row) -> crate::db::Result<UsageEvent> {
    Ok(UsageEvent {
        seq: r.get(0)?,
        key: r.get(1)?,
        team_id: r.get(2)?,
        sandbox_id: r.get(3)?,
        template_id: r.get(4)?,
        kind: r.get(5)?,
        start_at: r.get(6)?,
        end_at: r.get(7)?,
        quantities: Quantities {
            vcpu_seconds: r.get(8)?,
            memory_gib_seconds: r.get(9)?,
            storage_gib_hours: r.get(10)?,
            egress_bytes: r.get::<i64>(11)?.max(0) as u64,
            ingress_bytes: r.get::<i64>(12)?.max(0) as u64,
        },
    })
}

impl Store {
    /// One compute tick: every running sandbox's open interval is written up to `now` and a
    /// new one starts there. Returns how many intervals were written.
    pub fn meter_compute(&self, now: i64) -> Result<usize> {
        let mut conn = self.conn();
        let tx = conn.begin()?;
        let ids: Vec<String> = tx.query_map(
            "SELECT id FROM sandboxes WHERE state = 'running' AND metered_at IS NOT NULL
             AND metered_at < ?1",
            params![now],
            |r| r.get(0),
        )?;
        for id in &ids {
            close_compute(&tx, id, now, Some(now))?;
        }
        tx.commit()?;
        Ok(ids.len())
    }

    /// The backend showed these sandboxes' VMs at `now`: a running one among them that is
    /// later found dead is charged up to here.
    pub fn mark_alive(&self, ids: &[String], now: i64) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.begin()?;
        for id in ids {
            tx.execute(
                "UPDATE sandboxes SET alive_at = ?2 WHERE id = ?1 AND state = 'running'",
                params![id, now],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// What [`Store::meter_storage`] should be given, without bytes (the caller measures
    /// sandboxes and snapshots on the backend, and volumes): sandboxes running or paused,
    /// snapshots not deleted, volumes, and teams' templates with the bytes their ready builds hold (from the store).
    pub fn storage_objects(&self) -> Result<Vec<StorageSample>> {
        let conn = self.conn();
        let mut out = conn.query_map(
            "SELECT id, team_id, COALESCE(alias, template_id), started_at FROM sandboxes
             WHERE state IN ('running', 'paused')",
            params![],
            |r| {
                let id: String = r.get(0)?;
                Ok(StorageSample {
                    object: sandbox_object(&id),
                    team_id: r.get(1)?,
                    sandbox_id: Some(id),
                    template_id: r.get(2)?,
                    bytes: 0,
                    since: r.get(3)?,
                })
            },
        )?;
        out.extend(conn.query_map(
            "SELECT id, team_id, sandbox_id, template_id, created_at FROM snapshots
             WHERE deleted_at IS NULL",
            params![],
            |r| {
                let id: String = r.get(0)?;
                Ok(StorageSample {
                    object: snapshot_object(&id),
                    team_id: r.get(1)?,
                    sandbox_id: r.get(2)?,
                    template_id: r.get(3)?,
                    bytes: 0,
                    since: r.get(4)?,
                })
            },
        )?);
        out.extend(conn.query_map(
            "SELECT id, team_id, created_at FROM volumes",
            params![],
            |r| {
                let id: String = r.get(0)?;
                Ok(StorageSample {
                    object: volume_object(&id),
                    team_id: r.get(1)?,
                    sandbox_id: None,
                    template_id: None,
                    bytes: 0,
                    since: r.get(2)?,
                })
            },
        )?);
        out.extend(conn.query_map(
            "SELECT template_id, team_id, CAST(SUM(stored_bytes) AS BIGINT), MIN(created_at)
             FROM template_builds
             WHERE status = 'ready' AND deleted_at IS NULL GROUP BY template_id, team_id",
            params![],
            |r| {
                let id: String = r.get(0)?;
                Ok(StorageSample {
                    object: format!("template:{id}"),
                    team_id: r.get(1)?,
                    sandbox_id: None,
                    template_id: Some(id),
                    bytes: r.get::<i64>(2)?.max(0) as u64,
                    since: r.get(3)?,
                })
            },
        )?);
        Ok(out)
    }

    /// One storage tick: for each measured object, the interval since its mark is written at
    /// the new size and the mark moves to `now`; a new object gets its first interval from
    /// when it came to exist, but never more than `max_gap_ms` back (an object first seen after
    /// a long outage is not charged for time nobody measured). Marks of objects no longer
    /// measured and not closed by their end (a template deleted) are removed uncharged.
    pub fn meter_storage(
        &self,
        now: i64,
        samples: &[StorageSample],
        max_gap_ms: i64,
    ) -> Result<usize> {
        let mut conn = self.conn();
        let tx = conn.begin()?;
        let mut written = 0;
        for s in samples {
            let at: Option<i64> = tx
                .query_row(
                    "SELECT at FROM meter_marks WHERE object = ?1",
                    params![s.object],
                    |r| r.get(0),
                )
                .optional()?;
            if at.is_none() {
                let start = s.since.clamp(now - max_gap_ms, now);
                tx.execute(
                    "INSERT INTO meter_marks (object, team_id, sandbox_id, template_id, at, bytes)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![
                        s.object,
                        s.team_id,
                        s.sandbox_id,
                        s.template_id,
                        start,
                        s.bytes as i64
                    ],
                )?;
            }
            written += write_storage(&tx, &s.object, now, Some(s.bytes)).map(|_| 1)?;
            tx.execute(
                "UPDATE meter_marks SET at = CASE WHEN at > ?2 THEN at ELSE ?2 END, bytes = ?3
                 WHERE object = ?1",
                params![s.object, now, s.bytes as i64],
            )?;
        }
        let live: std::collections::HashSet<&str> =
            samples.iter().map(|s| s.object.as_str()).collect();
        let stale: Vec<String> = tx
            .query_map(
                "SELECT object FROM meter_marks WHERE object NOT LIKE 'net:%'",
                params![],
                |r| r.get::<String>(0),
            )?
            .into_iter()
            .filter(|o| !live.contains(o.as_str()))
            .collect();
        for o in stale {
            tx.execute("DELETE FROM meter_marks WHERE object = ?1", params![o])?;
        }
        tx.commit()?;
        Ok(written)
    }

    /// One network tick for the running sandboxes whose counters were read: the bytes since
    /// the last read become an event (none if nothing moved).
    pub fn meter_network(&self, now: i64, samples: &[NetSample<'_>]) -> Result<usize> {
        let mut conn = self.conn();
        let tx = conn.begin()?;
        let mut written = 0;
        for s in samples {
            let obj = net_object(s.sandbox_id);
            let mark: Option<(i64, i64, i64)> = tx
                .query_row(
                    "SELECT at, out_bytes, in_bytes FROM meter_marks WHERE object = ?1",
                    params![obj],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .optional()?;
            let (out, inn) = (s.bytes_out as i64, s.bytes_in as i64);
            let (last_out, last_in) = match mark {
                Some((_, o, i)) => (o, i),
                None => {
                    // First read of this sandbox: everything its proxy counted is new, since
                    // the sandbox started running.
                    tx.execute(
                        "INSERT INTO meter_marks (object, team_id, sandbox_id, template_id, at)
                         SELECT CAST(?1 AS TEXT), team_id, id, COALESCE(alias, template_id),
                             COALESCE(metered_at, ?3)
                         FROM sandboxes WHERE id = ?2",
                        params![obj, s.sandbox_id, now],
                    )?;
                    (0, 0)
                }
            };
            // A counter below the last read restarted from zero (a new proxy).
            let d_out = if out >= last_out { out - last_out } else { out };
            let d_in = if inn >= last_in { inn - last_in } else { inn };
            written += write_network(&tx, &obj, now, d_out, d_in)?;
            tx.execute(
                "UPDATE meter_marks SET out_bytes = ?2, in_bytes = ?3 WHERE object = ?1",
                params![obj, out, inn],
            )?;
        }
        tx.commit()?;
        Ok(written)
    }

    /// Usage in `[start, end)` (ms), grouped; `team` `None` is every team. An event that
    /// straddles the window counts in proportion to its part inside.
    ///
    /// No event crosses a clock hour, so the whole hours inside the window are read from the
    /// hourly roll-up and only the partial hours at its edges from the events (prorated); the
    /// parts are grouped by key and sandbox and merged here, with their distinct sandboxes.
    pub fn usage(
        &self,
        team: Option<&str>,
        start: i64,
        end: i64,
        group: UsageGroup,
    ) -> Result<Vec<UsageRow>> {
        use std::collections::{BTreeMap, HashSet};
        let conn = self.conn();
        let team_filter = if team.is_some() {
            "team_id = ?3"
        } else {
            "CAST(?3 AS TEXT) IS NULL"
        };
        let first_hour = start.div_euclid(HOUR_MS) + i64::from(start.rem_euclid(HOUR_MS) != 0);
        let last_hour = end.div_euclid(HOUR_MS); // exclusive
        // (sql, window start, window end) of each part.
        let mut parts: Vec<(String, i64, i64)> = Vec::new();
        let raw = |a: i64, b: i64| {
            let col = group.column(false);
            // An event's share inside [?1, ?2) (1 for an instant), a double in both databases
            // (so the byte sums are too); events are at most an hour long, which bounds the
            // index range.
            let share = "(CASE WHEN end_at <= start_at THEN 1.0 ELSE
                 CAST((CASE WHEN end_at < ?2 THEN end_at ELSE ?2 END)
                     - (CASE WHEN start_at > ?1 THEN start_at ELSE ?1 END) AS DOUBLE PRECISION)
                 / (end_at - start_at) END)";
            (
                format!(
                    "SELECT {col} AS k, sandbox_id, SUM(vcpu_seconds * {share}),
                         SUM(memory_gib_seconds * {share}), SUM(storage_gib_hours * {share}),
                         SUM(egress_bytes * {share}), SUM(ingress_bytes * {share})
                     FROM usage_events
                     WHERE {team_filter} AND start_at >= CAST(?1 AS BIGINT) - {HOUR_MS}
                       AND start_at < ?2
                       AND (end_at > ?1 OR (end_at = start_at AND start_at >= ?1))
                     GROUP BY k, sandbox_id"
                ),
                a,
                b,
            )
        };
        if first_hour < last_hour {
            let col = group.column(true);
            parts.push((
                format!(
                    "SELECT {col} AS k, NULLIF(sandbox_id, ''), SUM(vcpu_seconds),
                         SUM(memory_gib_seconds), SUM(storage_gib_hours),
                         CAST(SUM(egress_bytes) AS BIGINT), CAST(SUM(ingress_bytes) AS BIGINT)
                     FROM usage_hourly
                     WHERE {team_filter} AND hour >= ?1 AND hour < ?2
                     GROUP BY k, sandbox_id"
                ),
                first_hour,
                last_hour,
            ));
            if start < first_hour * HOUR_MS {
                parts.push(raw(start, first_hour * HOUR_MS));
            }
            if last_hour * HOUR_MS < end {
                parts.push(raw(last_hour * HOUR_MS, end));
            }
        } else {
            parts.push(raw(start, end));
        }
        let mut groups: BTreeMap<String, (HashSet<Option<String>>, Quantities)> = BTreeMap::new();
        for (sql, a, b) in parts {
            for r in conn.query_rows(&sql, params![a, b, team])? {
                let key = match r.get::<Value>(0)? {
                    Value::Int(day) if group == UsageGroup::Day => day_name(day),
                    Value::Text(t) => t,
                    Value::Null => String::new(),
                    other => format!("{other:?}"),
                };
                let sandbox: Option<String> = r.get(1)?;
                let n = |i: usize| -> crate::db::Result<f64> {
                    Ok(r.get::<Option<f64>>(i)?.unwrap_or(0.0))
                };
                let q = Quantities {
                    vcpu_seconds: n(2)?,
                    memory_gib_seconds: n(3)?,
                    storage_gib_hours: n(4)?,
                    egress_bytes: n(5)?.round() as u64,
                    ingress_bytes: n(6)?.round() as u64,
                };
                let g = groups.entry(key).or_default();
                g.0.insert(sandbox);
                g.1.add(&q);
            }
        }
        Ok(groups
            .into_iter()
            .map(|(key, (sandboxes, quantities))| UsageRow {
                key,
                sandboxes: sandboxes.iter().filter(|s| s.is_some()).count() as u64,
                quantities,
            })
            .collect())
    }

    /// Usage events after `after` (a `seq`), oldest first, at most `limit`; `team` `None` is
    /// every team.
    pub fn usage_events_after(
        &self,
        team: Option<&str>,
        after: i64,
        limit: usize,
    ) -> Result<Vec<UsageEvent>> {
        Ok(self.conn().query_map(
            "SELECT seq, key, team_id, sandbox_id, template_id, kind, start_at, end_at,
                 vcpu_seconds, memory_gib_seconds, storage_gib_hours, egress_bytes, ingress_bytes
             FROM usage_events WHERE seq > ?1 AND (CAST(?2 AS TEXT) IS NULL OR team_id = ?2)
             ORDER BY seq LIMIT ?3",
            params![after, team, limit as i64],
            row_to_event,
        )?)
    }

    /// Where a sandbox's open compute interval starts, if one is open.
    pub fn sandbox_metered_at(&self, id: &str) -> Option<i64> {
        self.conn()
            .query_row(
                "SELECT metered_at FROM sandboxes WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )
            .ok()
            .flatten()
    }

    /// At server start: the egress proxies restart with zero counters.
    pub fn reset_net_counters(&self) -> Result<()> {
        self.conn().execute(
            "UPDATE meter_marks SET out_bytes = 0, in_bytes = 0 WHERE object LIKE 'net:%'",
            params![],
        )?;
        Ok(())
    }
}

/// Writes a network event of `out`/`inn` bytes ending at `now`, from the mark's `at`, and moves
/// the mark's `at` to `now`. Nothing is written when nothing moved.
fn write_network(tx: &dyn Sql, obj: &str, now: i64, out: i64, inn: i64) -> Result<usize> {
    if out <= 0 && inn <= 0 {
        return Ok(0);
    }
    let Some(m) = mark(tx, obj)? else {
        return Ok(0);
    };
    // Bytes counted at once (the first read right at the start) still need an interval.
    let start = m.at.min(now - 1);
    let sandbox = m.sandbox_id.clone().unwrap_or_default();
    let n = write_interval(
        tx,
        &Interval {
            key: &format!("n:{sandbox}"),
            team_id: &m.team_id,
            sandbox_id: m.sandbox_id.as_deref(),
            template_id: m.template_id.as_deref(),
            kind: UsageKind::Network,
            start,
            end: now,
            vcpus: 0.0,
            memory_gib: 0.0,
            storage_gib: 0.0,
            egress_bytes: out.max(0),
            ingress_bytes: inn.max(0),
        },
    )?;
    tx.execute(
        "UPDATE meter_marks SET at = CASE WHEN at > ?2 THEN at ELSE ?2 END WHERE object = ?1",
        params![obj, now],
    )?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{NewSandboxRecord, SnapshotRecord, TemplateRecord};

    const MIN: i64 = 60_000;

    /// A store with team `t` and a 2-vCPU, 512 MiB sandbox `s1` running since `at`.
    fn running_since(at: i64) -> (Store, String) {
        let store = Store::open_in_memory().unwrap();
        let team = store.create_team("t").unwrap().id;
        store
            .upsert_template(&TemplateRecord::sample("tpl1", &["base"]))
            .unwrap();
        store
            .insert_sandbox(&NewSandboxRecord::sample("s1", &team, "tpl1"))
            .unwrap();
        store
            .transition("s1", SandboxState::Running, "started")
            .unwrap();
        back_date(&store, "s1", at);
        (store, team)
    }

    fn back_date(store: &Store, id: &str, at: i64) {
        store
            .conn()
            .execute(
                "UPDATE sandboxes SET metered_at = ?2, alive_at = ?2 WHERE id = ?1",
                params![id, at],
            )
            .unwrap();
    }

    fn total(store: &Store, team: &str) -> Quantities {
        let mut q = Quantities::default();
        for r in store
            .usage(Some(team), 0, i64::MAX, UsageGroup::Team)
            .unwrap()
        {
            q.add(&r.quantities);
        }
        q
    }

    fn events(store: &Store) -> Vec<UsageEvent> {
        store.usage_events_after(None, 0, 1000).unwrap()
    }

    #[test]
    fn compute_is_allocated_vcpu_and_memory_time_split_at_ticks_and_closed_at_a_state_change() {
        let t0 = now_ms() - 10 * MIN;
        let (store, team) = running_since(t0);
        assert_eq!(store.meter_compute(t0 + 4 * MIN).unwrap(), 1);
        // The same tick again (a retry) and a tick in the past (the clock went back) add nothing.
        assert_eq!(store.meter_compute(t0 + 4 * MIN).unwrap(), 0);
        assert_eq!(store.meter_compute(t0 + MIN).unwrap(), 0);
        store
            .transition("s1", SandboxState::Paused, "paused")
            .unwrap();
        // Two intervals (tick, pause), each split at the clock hours it crosses.
        let ev = events(&store);
        assert!((2..=4).contains(&ev.len()), "{ev:?}");
        for w in ev.windows(2) {
            assert_eq!(w[0].end_at, w[1].start_at, "intervals are contiguous");
        }
        assert!(ev.iter().any(|e| e.end_at == t0 + 4 * MIN));
        assert_eq!(ev[0].key, format!("c:s1:{t0}"));
        let q = total(&store, &team);
        let secs = (ev.last().unwrap().end_at - t0) as f64 / 1000.0;
        assert!((q.vcpu_seconds - 2.0 * secs).abs() < 1e-6, "{q:?}");
        assert!((q.memory_gib_seconds - 0.5 * secs).abs() < 1e-6, "{q:?}");
        // Paused: nothing more accrues; resumed: it starts again.
        assert_eq!(store.meter_compute(now_ms() + MIN).unwrap(), 0);
        store.mark_resumed("s1", now_ms() + MIN, "resumed").unwrap();
        assert!(store.sandbox_metered_at("s1").is_some());
    }

    #[test]
    fn a_sandbox_found_dead_is_charged_up_to_when_it_was_last_seen_alive() {
        let t0 = now_ms() - 60 * MIN;
        let (store, team) = running_since(t0);
        store.mark_alive(&["s1".into()], t0 + 5 * MIN).unwrap();
        // The server was down for most of an hour; at its start the VM is gone.
        store
            .transition("s1", SandboxState::Lost, "lost at server restart")
            .unwrap();
        let q = total(&store, &team);
        assert!((q.vcpu_seconds - 2.0 * 300.0).abs() < 1e-6, "{q:?}");
        // A VM that kept running while the server was down is charged for all of it.
        let store2 = running_since(t0).0;
        store2.meter_compute(t0 + 60 * MIN).unwrap();
        assert!(
            (total(&store2, "x").vcpu_seconds).abs() < 1e-9,
            "other team sees nothing"
        );
        let all = store2
            .usage(None, 0, i64::MAX, UsageGroup::Sandbox)
            .unwrap();
        assert!((all[0].quantities.vcpu_seconds - 2.0 * 3600.0).abs() < 1e-6);
    }

    #[test]
    fn storage_is_charged_at_each_measure_and_closed_when_the_object_ends() {
        let t0 = now_ms() - 10 * MIN;
        let (store, team) = running_since(t0);
        store
            .insert_snapshot(&SnapshotRecord {
                id: "snap1".into(),
                team_id: team.clone(),
                sandbox_id: "s1".into(),
                parent_id: None,
                name: None,
                kind: "snapshot".into(),
                template_id: "tpl1".into(),
                created_at: t0,
                deleted_at: None,
            })
            .unwrap();
        store
            .insert_volume(
                &crate::VolumeRecord {
                    id: "vol1".into(),
                    team_id: team.clone(),
                    name: "data".into(),
                    created_at: t0,
                },
                10,
            )
            .unwrap();
        let mut objs = store.storage_objects().unwrap();
        assert_eq!(objs.len(), 3);
        assert!(objs.iter().any(|o| o.object == "volume:vol1"));
        for o in &mut objs {
            o.bytes = 1 << 30;
            o.since = t0;
        }
        let now = now_ms();
        store.meter_storage(now, &objs, 60 * MIN).unwrap();
        let q = total(&store, &team);
        let hours = (now - t0) as f64 / 3_600_000.0;
        assert!((q.storage_gib_hours - 3.0 * hours).abs() < 1e-6, "{q:?}");
        assert_eq!(store.teams_with_volumes().unwrap(), vec![team.clone()]);
        // The snapshot and the volume are deleted and the sandbox killed: all close now, at
        // 1 GiB.
        std::thread::sleep(std::time::Duration::from_millis(20));
        store.delete_snapshot("snap1").unwrap();
        store.delete_volume(&team, "vol1").unwrap();
        store
            .transition("s1", SandboxState::Killed, "killed")
            .unwrap();
        let after = total(&store, &team).storage_gib_hours;
        assert!(after > q.storage_gib_hours);
        let marks: i64 = store
            .conn()
            .query_row("SELECT COUNT(*) FROM meter_marks", params![], |r| r.get(0))
            .unwrap();
        assert_eq!(marks, 0);
        // An object first seen long after it was made is charged only `max_gap` back.
        let (store, team) = running_since(now_ms());
        let mut objs = store.storage_objects().unwrap();
        objs[0].bytes = 1 << 30;
        objs[0].since = now - 600 * MIN;
        store.meter_storage(now, &objs, MIN).unwrap();
        let q = total(&store, &team);
        assert!((q.storage_gib_hours - 1.0 / 60.0).abs() < 1e-6, "{q:?}");
    }

    #[test]
    fn network_bytes_are_deltas_of_counters_that_restart_from_zero() {
        // Inside one clock hour (the last whole one): a reading that crossed an hour would be
        // two events, whenever the test ran.
        let now = now_ms();
        let t0 = now - now % HOUR_MS - HOUR_MS + MIN;
        let (store, team) = running_since(t0);
        let read = |o, i, at| {
            store
                .meter_network(
                    at,
                    &[NetSample {
                        sandbox_id: "s1",
                        bytes_out: o,
                        bytes_in: i,
                    }],
                )
                .unwrap()
        };
        assert_eq!(read(100, 1000, t0 + MIN), 1);
        assert_eq!(read(100, 1000, t0 + 2 * MIN), 0, "nothing moved");
        assert_eq!(read(150, 1500, t0 + 3 * MIN), 1);
        // A restarted proxy (the server restarted) counts from zero again.
        store.reset_net_counters().unwrap();
        assert_eq!(read(10, 20, t0 + 4 * MIN), 1);
        let q = total(&store, &team);
        assert_eq!((q.egress_bytes, q.ingress_bytes), (160, 1520));
    }

    #[test]
    fn day_names_are_utc_dates() {
        assert_eq!(day_name(0), "1970-01-01");
        assert_eq!(day_name(20_790), "2026-12-03");
        assert_eq!(day_name(11_016), "2000-02-29");
        assert_eq!(day_name(-1), "1969-12-31");
    }

    #[test]
    fn usage_counts_the_part_of_each_event_inside_the_window_and_groups() {
        let t0 = 1_700_000_000_000 - 1_700_000_000_000 % 86_400_000; // a UTC midnight
        let (store, team) = running_since(t0 - 30 * MIN);
        store.meter_compute(t0 + 30 * MIN).unwrap();
        // Half of the one-hour interval is in the window [t0, t0 + 1 day).
        let rows = store
            .usage(Some(&team), t0, t0 + 86_400_000, UsageGroup::Day)
            .unwrap();
        assert_eq!(rows.len(), 1);
        assert!((rows[0].quantities.vcpu_seconds - 2.0 * 1800.0).abs() < 1e-6);
        assert_eq!(rows[0].sandboxes, 1);
        let by_tpl = store
            .usage(Some(&team), 0, i64::MAX, UsageGroup::Template)
            .unwrap();
        assert_eq!(by_tpl[0].key, "tpl1");
        assert!(
            store
                .usage(Some(&team), t0 + MIN * 60, i64::MAX, UsageGroup::Team)
                .unwrap()
                .is_empty()
        );
        // The interval crossed midnight: one event per hour it touched, numbered in order.
        let ev = store.usage_events_after(Some(&team), 0, 10).unwrap();
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[0].end_at, t0);
        assert!(
            store
                .usage_events_after(Some(&team), ev[1].seq, 10)
                .unwrap()
                .is_empty()
        );
    }

    /// Windows of every shape (inside one hour, whole hours from the roll-up plus partial
    /// edges, instants) report exactly the running time inside them.
    #[test]
    fn reports_from_the_hourly_roll_up_and_the_edges_are_exact() {
        let h = 3_600_000;
        let t0 = 1_700_000_000_000 - 1_700_000_000_000 % h; // an hour boundary
        let (store, team) = running_since(t0 - h / 4);
        // Ticks at odd times over ten hours, then a long interval (a server outage).
        let mut t = t0;
        while t < t0 + 10 * h {
            t += 7 * 60_000 + 13_000;
            store.meter_compute(t).unwrap();
        }
        store.meter_compute(t0 + 14 * h + 1234).unwrap();
        let end_of_run = t0 + 14 * h + 1234;
        let start_of_run = t0 - h / 4;
        for (a, b) in [
            (t0 - h, t0 + 20 * h),
            (t0 + 17 * 60_000, t0 + 5 * h + 123_456),
            (t0 + h, t0 + 3 * h),
            (t0 + 2 * h + 1, t0 + 2 * h + 60_001),
            (t0 + 11 * h + 999, t0 + 13 * h + 5),
        ] {
            let want = 2.0 * ((b.min(end_of_run) - a.max(start_of_run)) as f64 / 1000.0);
            let got: f64 = store
                .usage(Some(&team), a, b, UsageGroup::Sandbox)
                .unwrap()
                .iter()
                .map(|r| r.quantities.vcpu_seconds)
                .sum();
            assert!((got - want).abs() < 1e-6, "[{a}, {b}): {got} != {want}");
            let by_day: f64 = store
                .usage(Some(&team), a, b, UsageGroup::Day)
                .unwrap()
                .iter()
                .map(|r| r.quantities.vcpu_seconds)
                .sum();
            assert!((by_day - want).abs() < 1e-6);
        }
        // Every event lies within one clock hour.
        for e in store.usage_events_after(None, 0, 100_000).unwrap() {
            assert_eq!(e.start_at / h, (e.end_at - 1) / h, "{e:?}");
        }
    }
}

//! Per-team limits set by the admin (`team_limits`) and the spend warnings they raise
//! (`spend_notices`, which is also the webhook outbox: a notice stays undelivered, with its
//! next attempt time, until the webhook accepts it, across restarts).

use crate::db::{OptionalExtension, Row, Sql, SqlExt, params};
use crate::{Result, Store, StoreError, now_ms};

/// What to do to a team's running sandboxes when its monthly spend reaches the cap (creates
/// are refused in every case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnCap {
    #[default]
    Refuse,
    Pause,
    Kill,
}

impl OnCap {
    pub fn as_str(self) -> &'static str {
        match self {
            OnCap::Refuse => "refuse",
            OnCap::Pause => "pause",
            OnCap::Kill => "kill",
        }
    }

    pub fn parse(s: &str) -> Option<OnCap> {
        [OnCap::Refuse, OnCap::Pause, OnCap::Kill]
            .into_iter()
            .find(|o| o.as_str() == s)
    }
}

/// A team's limits; `None` is the server's default (its flags), or no cap.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TeamLimits {
    pub max_running: Option<u64>,
    pub max_paused: Option<u64>,
    pub max_storage_gib: Option<f64>,
    pub monthly_spend_cap_usd: Option<f64>,
    /// Percentages of the cap at which a warning is raised, ascending.
    pub warn_at_percent: Vec<u32>,
    pub on_cap: OnCap,
    /// When they were last set (ms), `None` if never.
    pub updated_at: Option<i64>,
}

/// A spend threshold a team reached in a month, and its webhook delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct SpendNotice {
    pub team_id: String,
    /// `YYYY-MM` (UTC).
    pub month: String,
    pub percent: u32,
    pub at: i64,
    pub spend_usd: f64,
    pub cap_usd: f64,
    pub attempts: u32,
    pub delivered_at: Option<i64>,
    pub last_error: Option<String>,
}

pub const DEFAULT_WARN_AT_PERCENT: [u32; 3] = [50, 80, 100];

fn row_to_notice(r: &Row) -> crate::db::Result<SpendNotice> {
    Ok(SpendNotice {
        team_id: r.get(0)?,
        month: r.get(1)?,
        percent: r.get(2)?,
        at: r.get(3)?,
        spend_usd: r.get(4)?,
        cap_usd: r.get(5)?,
        attempts: r.get(6)?,
        delivered_at: r.get(7)?,
        last_error: r.get(8)?,
    })
}

const NOTICE_COLUMNS: &str =
    "team_id, month, percent, at, spend_usd, cap_usd, attempts, delivered_at, last_error";

impl Store {
    /// A team's limits (defaults if never set).
    pub fn team_limits(&self, team_id: &str) -> Result<TeamLimits> {
        let conn = self.conn();
        let row = conn
            .query_row(
                "SELECT max_running, max_paused, max_storage_gib, monthly_spend_cap_usd,
                     warn_at_percent, on_cap, updated_at
                 FROM team_limits WHERE team_id = ?1",
                params![team_id],
                |r| {
                    Ok((
                        r.get::<Option<i64>>(0)?,
                        r.get::<Option<i64>>(1)?,
                        r.get::<Option<f64>>(2)?,
                        r.get::<Option<f64>>(3)?,
                        r.get::<String>(4)?,
                        r.get::<String>(5)?,
                        r.get::<i64>(6)?,
                    ))
                },
            )
            .optional()?;
        let Some((running, paused, storage, cap, warn, on_cap, updated)) = row else {
            return Ok(TeamLimits {
                warn_at_percent: DEFAULT_WARN_AT_PERCENT.to_vec(),
                ..TeamLimits::default()
            });
        };
        let warn_at_percent: Vec<u32> =
            serde_json::from_str(&warn).map_err(|e| StoreError::Corrupt(Box::new(e)))?;
        Ok(TeamLimits {
            max_running: running.map(|v| v.max(0) as u64),
            max_paused: paused.map(|v| v.max(0) as u64),
            max_storage_gib: storage,
            monthly_spend_cap_usd: cap,
            warn_at_percent,
            on_cap: OnCap::parse(&on_cap)
                .ok_or_else(|| StoreError::Corrupt(format!("on_cap {on_cap:?}").into()))?,
            updated_at: Some(updated),
        })
    }

    /// Replaces a team's limits (the caller validated them).
    pub fn set_team_limits(&self, team_id: &str, l: &TeamLimits) -> Result<TeamLimits> {
        let warn = serde_json::to_string(&l.warn_at_percent)
            .map_err(|e| StoreError::Corrupt(Box::new(e)))?;
        self.conn().execute(
            "INSERT INTO team_limits (team_id, max_running, max_paused, max_storage_gib,
                 monthly_spend_cap_usd, warn_at_percent, on_cap, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (team_id) DO UPDATE SET max_running = ?2, max_paused = ?3,
                 max_storage_gib = ?4, monthly_spend_cap_usd = ?5, warn_at_percent = ?6,
                 on_cap = ?7, updated_at = ?8",
            params![
                team_id,
                l.max_running.map(|v| v as i64),
                l.max_paused.map(|v| v as i64),
                l.max_storage_gib,
                l.monthly_spend_cap_usd,
                warn,
                l.on_cap.as_str(),
                now_ms()
            ],
        )?;
        self.team_limits(team_id)
    }

    /// Teams with a monthly spend cap, and their limits.
    pub fn capped_teams(&self) -> Result<Vec<(String, TeamLimits)>> {
        let ids: Vec<String> = {
            let conn = self.conn();
            conn.query_map(
                "SELECT team_id FROM team_limits WHERE monthly_spend_cap_usd IS NOT NULL",
                params![],
                |r| r.get(0),
            )?
        };
        ids.into_iter()
            .map(|id| {
                let l = self.team_limits(&id)?;
                Ok((id, l))
            })
            .collect()
    }

    /// Records that a team reached `percent` of its cap this month: `true` the first time
    /// (the caller raises the warning), `false` if it was already recorded.
    pub fn record_spend_notice(
        &self,
        team_id: &str,
        month: &str,
        percent: u32,
        spend_usd: f64,
        cap_usd: f64,
    ) -> Result<bool> {
        let now = now_ms();
        let n = self.conn().execute(
            "INSERT INTO spend_notices (team_id, month, percent, at, spend_usd, cap_usd,
                 next_try_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?4)
             ON CONFLICT DO NOTHING",
            params![team_id, month, percent, now, spend_usd, cap_usd],
        )?;
        Ok(n == 1)
    }

    /// Notices whose webhook is due at `now`, oldest first.
    pub fn due_spend_notices(&self, now: i64, limit: usize) -> Result<Vec<SpendNotice>> {
        let conn = self.conn();
        Ok(conn.query_map(
            &format!(
                "SELECT {NOTICE_COLUMNS} FROM spend_notices
                 WHERE delivered_at IS NULL AND next_try_at IS NOT NULL AND next_try_at <= ?1
                 ORDER BY at LIMIT ?2"
            ),
            params![now, limit as i64],
            row_to_notice,
        )?)
    }

    /// A team's notices, newest first.
    pub fn spend_notices(&self, team_id: &str) -> Result<Vec<SpendNotice>> {
        let conn = self.conn();
        Ok(conn.query_map(
            &format!(
                "SELECT {NOTICE_COLUMNS} FROM spend_notices WHERE team_id = ?1
                 ORDER BY at DESC, percent DESC"
            ),
            params![team_id],
            row_to_notice,
        )?)
    }

    /// The outcome of one delivery attempt: delivered, or failed with the next try at
    /// `next_try_at` (`None`: given up).
    pub fn spend_notice_attempt(
        &self,
        n: &SpendNotice,
        result: std::result::Result<(), (String, Option<i64>)>,
    ) -> Result<()> {
        let now = now_ms();
        let conn = self.conn();
        match result {
            Ok(()) => conn.execute(
                "UPDATE spend_notices SET attempts = attempts + 1, delivered_at = ?4,
                     last_error = NULL, next_try_at = NULL
                 WHERE team_id = ?1 AND month = ?2 AND percent = ?3",
                params![n.team_id, n.month, n.percent, now],
            )?,
            Err((error, next)) => conn.execute(
                "UPDATE spend_notices SET attempts = attempts + 1, last_error = ?4,
                     next_try_at = ?5
                 WHERE team_id = ?1 AND month = ?2 AND percent = ?3",
                params![n.team_id, n.month, n.percent, error, next],
            )?,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_round_trip_and_default_when_unset() {
        let store = Store::open_in_memory().unwrap();
        let t = store.create_team("t").unwrap().id;
        let l = store.team_limits(&t).unwrap();
        assert_eq!(l.warn_at_percent, vec![50, 80, 100]);
        assert_eq!(l.updated_at, None);
        let set = TeamLimits {
            max_running: Some(3),
            monthly_spend_cap_usd: Some(1.5),
            warn_at_percent: vec![90],
            on_cap: OnCap::Pause,
            ..TeamLimits::default()
        };
        let got = store.set_team_limits(&t, &set).unwrap();
        assert_eq!(got.max_running, Some(3));
        assert_eq!(got.on_cap, OnCap::Pause);
        assert!(got.updated_at.is_some());
        assert_eq!(store.capped_teams().unwrap().len(), 1);
    }

    #[test]
    fn a_notice_is_raised_once_per_month_and_threshold_and_retried_until_delivered() {
        let store = Store::open_in_memory().unwrap();
        let t = store.create_team("t").unwrap().id;
        assert!(
            store
                .record_spend_notice(&t, "2026-12", 50, 0.6, 1.0)
                .unwrap()
        );
        assert!(
            !store
                .record_spend_notice(&t, "2026-12", 50, 0.7, 1.0)
                .unwrap()
        );
        let due = store.due_spend_notices(now_ms(), 10).unwrap();
        assert_eq!(due.len(), 1);
        store
            .spend_notice_attempt(&due[0], Err(("refused".into(), Some(now_ms() + 60_000))))
            .unwrap();
        assert!(store.due_spend_notices(now_ms(), 10).unwrap().is_empty());
        let due = store.due_spend_notices(now_ms() + 61_000, 10).unwrap();
        assert_eq!(due[0].attempts, 1);
        store.spend_notice_attempt(&due[0], Ok(())).unwrap();
        assert!(store.due_spend_notices(i64::MAX, 10).unwrap().is_empty());
        assert!(store.spend_notices(&t).unwrap()[0].delivered_at.is_some());
    }
}

//! Per-sandbox resource samples (CPU, memory, disk) for `GET /sandboxes/{id}/metrics?start&end`:
//! raw samples (every few seconds) for an hour, then one average per minute for a day. The
//! caller samples and calls [`Store::compact_metrics`] now and then; a minute is compacted only
//! once it is whole, so its average covers all of its samples.

use crate::db::{Sql, SqlExt, params};

use crate::{Result, Store};

const MINUTE_MS: i64 = 60_000;

/// A sample of a `(sandbox, res, at)` already stored is replaced by the new one.
const REPLACE: &str = "ON CONFLICT (sandbox_id, res, at) DO UPDATE SET
    cpu_count = excluded.cpu_count, cpu_used_pct = excluded.cpu_used_pct,
    mem_used = excluded.mem_used, mem_total = excluded.mem_total,
    mem_cache = excluded.mem_cache, disk_used = excluded.disk_used,
    disk_total = excluded.disk_total, net_tx = excluded.net_tx, net_rx = excluded.net_rx";

/// One sample (or a minute's average).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MetricSample {
    /// Milliseconds since the epoch.
    pub at: i64,
    pub cpu_count: u32,
    pub cpu_used_pct: f64,
    pub mem_used: u64,
    pub mem_total: u64,
    pub mem_cache: u64,
    pub disk_used: u64,
    pub disk_total: u64,
    /// Bytes the sandbox sent and received through its egress proxy since its VM started (a
    /// resume starts again from zero); 0 where unknown.
    pub net_tx: u64,
    pub net_rx: u64,
}

impl Store {
    /// Stores raw samples (a repeated `(sandbox, at)` replaces the older one).
    pub fn insert_metric_samples(&self, samples: &[(String, MetricSample)]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.begin()?;
        let sql = format!(
            "INSERT INTO sandbox_metrics (sandbox_id, res, at, cpu_count, cpu_used_pct,
                 mem_used, mem_total, mem_cache, disk_used, disk_total, net_tx, net_rx)
             VALUES (?1, 0, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) {REPLACE}"
        );
        for (id, m) in samples {
            tx.execute(
                &sql,
                params![
                    id,
                    m.at,
                    m.cpu_count,
                    m.cpu_used_pct,
                    m.mem_used as i64,
                    m.mem_total as i64,
                    m.mem_cache as i64,
                    m.disk_used as i64,
                    m.disk_total as i64,
                    m.net_tx as i64,
                    m.net_rx as i64
                ],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// A sandbox's samples in `[start, end]`, oldest first, at most `limit`: raw samples where
    /// they are kept, minute averages before the oldest of them.
    pub fn metric_series(
        &self,
        id: &str,
        start: i64,
        end: i64,
        limit: usize,
    ) -> Result<Vec<MetricSample>> {
        Ok(self.conn().query_map(
            "SELECT at, cpu_count, cpu_used_pct, mem_used, mem_total, mem_cache, disk_used,
                 disk_total, net_tx, net_rx
             FROM sandbox_metrics
             WHERE sandbox_id = ?1 AND at >= ?2 AND at <= ?3 AND (res = 0 OR at < COALESCE(
                 (SELECT MIN(at) FROM sandbox_metrics WHERE sandbox_id = ?1 AND res = 0),
                 9223372036854775807))
             ORDER BY at LIMIT ?4",
            params![id, start, end, limit as i64],
            |r| {
                Ok(MetricSample {
                    at: r.get(0)?,
                    cpu_count: r.get(1)?,
                    cpu_used_pct: r.get(2)?,
                    mem_used: r.get::<i64>(3)?.max(0) as u64,
                    mem_total: r.get::<i64>(4)?.max(0) as u64,
                    mem_cache: r.get::<i64>(5)?.max(0) as u64,
                    disk_used: r.get::<i64>(6)?.max(0) as u64,
                    disk_total: r.get::<i64>(7)?.max(0) as u64,
                    net_tx: r.get::<i64>(8)?.max(0) as u64,
                    net_rx: r.get::<i64>(9)?.max(0) as u64,
                })
            },
        )?)
    }

    /// When the newest raw sample of a sandbox was taken.
    pub fn latest_metric_at(&self, id: &str) -> Result<Option<i64>> {
        Ok(self.conn().query_row(
            "SELECT MAX(at) FROM sandbox_metrics WHERE sandbox_id = ?1 AND res = 0",
            params![id],
            |r| r.get(0),
        )?)
    }

    /// Raw samples older than `raw_keep_ms` (whole minutes of them) become minute averages;
    /// minute averages older than `minute_keep_ms` are deleted.
    pub fn compact_metrics(&self, now: i64, raw_keep_ms: i64, minute_keep_ms: i64) -> Result<()> {
        let cutoff = (now - raw_keep_ms).div_euclid(MINUTE_MS) * MINUTE_MS;
        let mut conn = self.conn();
        let tx = conn.begin()?;
        // The averages of integers are truncated integer quotients (in both databases; an
        // AVG would be a double in SQLite and a rounded NUMERIC in Postgres).
        tx.execute(
            &format!(
                "INSERT INTO sandbox_metrics (sandbox_id, res, at, cpu_count, cpu_used_pct,
                     mem_used, mem_total, mem_cache, disk_used, disk_total, net_tx, net_rx)
                 SELECT sandbox_id, 1, (at / 60000) * 60000, MAX(cpu_count),
                     CAST(AVG(cpu_used_pct) AS DOUBLE PRECISION),
                     CAST(SUM(mem_used) AS BIGINT) / COUNT(*), MAX(mem_total),
                     CAST(SUM(mem_cache) AS BIGINT) / COUNT(*), MAX(disk_used), MAX(disk_total),
                     MAX(net_tx), MAX(net_rx)
                 FROM sandbox_metrics WHERE res = 0 AND at < ?1
                 GROUP BY sandbox_id, at / 60000 {REPLACE}"
            ),
            params![cutoff],
        )?;
        tx.execute(
            "DELETE FROM sandbox_metrics WHERE res = 0 AND at < ?1",
            params![cutoff],
        )?;
        tx.execute(
            "DELETE FROM sandbox_metrics WHERE res = 1 AND at < ?1",
            params![now - minute_keep_ms],
        )?;
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: i64, cpu: f64) -> MetricSample {
        MetricSample {
            at,
            cpu_count: 2,
            cpu_used_pct: cpu,
            mem_used: 100,
            mem_total: 512,
            mem_cache: 10,
            disk_used: 1000,
            disk_total: 2000,
            net_tx: at as u64 / 1000,
            net_rx: 0,
        }
    }

    #[test]
    fn raw_samples_for_an_hour_then_minute_averages_for_a_day() {
        let store = Store::open_in_memory().unwrap();
        let t0 = 1_800_000_000_000 - 1_800_000_000_000 % MINUTE_MS;
        // Two hours of samples every 5 s, CPU alternating 10 and 30.
        let samples: Vec<(String, MetricSample)> = (0..1440)
            .map(|i| {
                let cpu = if i % 2 == 0 { 10.0 } else { 30.0 };
                ("s1".to_owned(), sample(t0 + i * 5_000, cpu))
            })
            .collect();
        store.insert_metric_samples(&samples).unwrap();
        let now = t0 + 2 * 3_600_000;
        store.compact_metrics(now, 3_600_000, 86_400_000).unwrap();
        let all = store.metric_series("s1", 0, i64::MAX, 10_000).unwrap();
        // The first hour as 60 minute averages, the second raw (720 samples).
        assert_eq!(all.len(), 60 + 720);
        assert_eq!(all[0].at, t0);
        assert!((all[0].cpu_used_pct - 20.0).abs() < 1e-9);
        // Counters are cumulative: a minute keeps its last (largest) value.
        assert_eq!(all[0].net_tx, (t0 + 55_000) as u64 / 1000);
        assert_eq!(all[60].at, t0 + 3_600_000);
        assert!(all.windows(2).all(|w| w[0].at < w[1].at));
        // A window inside the raw hour, and the limit.
        let w = store
            .metric_series("s1", t0 + 3_600_000, t0 + 3_600_000 + 60_000, 100)
            .unwrap();
        assert_eq!(w.len(), 13);
        assert_eq!(store.metric_series("s1", 0, i64::MAX, 5).unwrap().len(), 5);
        assert_eq!(
            store.latest_metric_at("s1").unwrap(),
            Some(t0 + 1439 * 5_000)
        );
        // Compacting again changes nothing; a day later everything is gone.
        store.compact_metrics(now, 3_600_000, 86_400_000).unwrap();
        assert_eq!(
            store
                .metric_series("s1", 0, i64::MAX, 10_000)
                .unwrap()
                .len(),
            780
        );
        store
            .compact_metrics(now + 2 * 86_400_000, 3_600_000, 86_400_000)
            .unwrap();
        assert!(
            store
                .metric_series("s1", 0, i64::MAX, 10)
                .unwrap()
                .is_empty()
        );
        assert_eq!(store.latest_metric_at("s1").unwrap(), None);
    }
}

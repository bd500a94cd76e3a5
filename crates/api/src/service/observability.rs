//! What the API reports about sandboxes and the host: resource metrics, logs (lifecycle
//! events merged with the backend's lines), the warm pools, and gauges for `/metrics`.

use std::collections::BTreeMap;

use alcove_store::SandboxState as StoreState;

use super::{Service, api_error};
use crate::backend::{BackendError, BackendOp, LogLevel, NetCounters, ResourceUsage};
use crate::error::ApiError;
use crate::models::{self, rfc3339, system_time_ms};

/// Which log entries a caller wants (`GET /sandboxes/{id}/logs` and its v2).
#[derive(Debug, Clone)]
pub struct LogQuery {
    /// Unix ms: entries at or after it (at or before it going backward).
    pub cursor: Option<i64>,
    /// Newest first.
    pub backward: bool,
    /// Lowest level: debug, info, warn, error (anything else counts as error).
    pub min_level: Option<String>,
    /// A substring the message must contain.
    pub search: Option<String>,
    pub limit: usize,
}

/// Levels in order; anything unknown ranks with `error`.
fn level_rank(level: &str) -> u8 {
    match level {
        "debug" => 0,
        "info" => 1,
        "warn" => 2,
        _ => 3,
    }
}

impl Service {
    /// `GET /alcove/v1/warm-pool`.
    pub async fn warm_pool(&self) -> Result<Vec<models::WarmPoolView>, ApiError> {
        let pools = self
            .call(BackendOp::WarmPool, "", self.backend.warm_pool())
            .await
            .map_err(|e| api_error(BackendOp::WarmPool, "", e))?;
        Ok(pools
            .into_iter()
            .map(|p| models::WarmPoolView {
                template_id: p.template_id,
                target: p.target,
                min: p.min,
                max: p.max,
                ready: p.ready,
                hits: p.hits,
                misses: p.misses,
                last_error: p.last_error,
            })
            .collect())
    }

    async fn sample(&self, id: &str) -> Result<Option<alcove_store::MetricSample>, ApiError> {
        match self
            .call(BackendOp::Metrics, id, self.backend.metrics(id))
            .await
        {
            Ok(m) => {
                let ids = [id.to_owned()];
                // Network: the egress proxy's counters, when the backend has them.
                let net = self
                    .call(BackendOp::NetCounters, id, self.backend.net_counters(&ids))
                    .await
                    .ok()
                    .and_then(|v| v.into_iter().next().flatten())
                    .unwrap_or((0, 0));
                Ok(m.map(|m| usage_sample(m, net)))
            }
            Err(e @ BackendError::Timeout) => Err(api_error(BackendOp::Metrics, id, e)),
            // No sample is an answer too: the series is empty.
            Err(_) => Ok(None),
        }
    }

    /// `GET /sandboxes/{id}/metrics?start&end` (Unix seconds; default: since the sandbox
    /// started, until now): the stored series (`alcove_store::MetricSample`: raw samples for
    /// an hour, minute averages for a day). A running sandbox whose newest stored sample is
    /// older than the sampling interval gets a fresh one (stored too) when the window reaches
    /// now, so a series is never empty for a running sandbox.
    pub async fn metrics(
        &self,
        team_id: &str,
        id: &str,
        start: Option<i64>,
        end: Option<i64>,
    ) -> Result<Vec<models::SandboxMetric>, ApiError> {
        let series = self.metric_samples(team_id, id, start, end).await?;
        Ok(series.into_iter().map(sample_view).collect())
    }

    /// The stored samples behind [`Service::metrics`], network counters included (the
    /// dashboard's charts).
    pub async fn metric_samples(
        &self,
        team_id: &str,
        id: &str,
        start: Option<i64>,
        end: Option<i64>,
    ) -> Result<Vec<alcove_store::MetricSample>, ApiError> {
        let r = self.any_record(team_id, id).await?;
        let now = alcove_store::now_ms();
        let start_ms = start.map_or(r.started_at, |s| s.saturating_mul(1000));
        // `end` in whole seconds covers that whole second. Without one, everything so far, including
        // a sample the background sampler stores while this runs (stamped after `now`).
        let end_ms = end.map_or(i64::MAX, |e| e.saturating_mul(1000).saturating_add(999));
        if end_ms < start_ms {
            return Err(ApiError::InvalidQuery {
                detail: "end is before start".into(),
            });
        }
        if r.state == StoreState::Running && end_ms >= now - 1000 {
            let id2 = r.id.clone();
            let latest = self.db(move |s| s.latest_metric_at(&id2)).await?;
            let every = self.metering.sample_interval.as_millis() as i64;
            if latest.is_none_or(|at| now - at >= every.max(1000))
                && let Some(m) = self.sample(&r.id).await?
            {
                self.store_samples(vec![(r.id.clone(), m)]).await;
            }
        }
        let id2 = r.id.clone();
        Ok(self
            .db(move |s| s.metric_series(&id2, start_ms, end_ms, MAX_SERIES))
            .await?)
    }

    /// One sampling pass: every running sandbox's metrics, a few at a time, each under its
    /// deadline, stored as raw samples; then old samples are compacted.
    pub async fn sample_metrics(&self) {
        use futures::StreamExt;
        let ids: Vec<String> = match self.db(|s| s.live_sandboxes()).await {
            Ok(r) => r
                .into_iter()
                .filter(|r| r.state == StoreState::Running)
                .map(|r| r.id)
                .collect(),
            Err(e) => {
                tracing::error!(error = %crate::error::chain(&e), "metrics: listing sandboxes");
                return;
            }
        };
        let got: Vec<(String, alcove_store::MetricSample)> = futures::stream::iter(ids)
            .map(|id| async move {
                match self.sample(&id).await {
                    Ok(Some(m)) => Some((id, m)),
                    _ => None,
                }
            })
            .buffer_unordered(8)
            .filter_map(|x| async move { x })
            .collect()
            .await;
        self.store_samples(got).await;
        let now = alcove_store::now_ms();
        if let Err(e) = self
            .db(move |s| s.compact_metrics(now, 3_600_000, 86_400_000))
            .await
        {
            tracing::error!(error = %crate::error::chain(&e), "metrics: compacting samples");
        }
    }

    async fn store_samples(&self, rows: Vec<(String, alcove_store::MetricSample)>) {
        if rows.is_empty() {
            return;
        }
        if let Err(e) = self.db(move |s| s.insert_metric_samples(&rows)).await {
            tracing::error!(error = %crate::error::chain(&e), "metrics: storing samples");
        }
    }

    /// `GET /sandboxes/metrics?sandbox_ids=a,b`.
    pub async fn metrics_many(
        &self,
        team_id: &str,
        ids: &[String],
    ) -> Result<models::SandboxesWithMetrics, ApiError> {
        let mut out = BTreeMap::new();
        for id in ids {
            let Ok(r) = self.live_record(team_id, id).await else {
                continue;
            };
            if let Some(m) = self.sample(&r.id).await? {
                out.insert(r.id, sample_view(m));
            }
        }
        Ok(models::SandboxesWithMetrics { sandboxes: out })
    }

    /// Log entries of any sandbox of the team (its lifecycle events merged with the backend's
    /// own lines), chosen by `q`: oldest first, or newest first when `q.backward`.
    pub async fn logs(
        &self,
        team_id: &str,
        id: &str,
        q: &LogQuery,
    ) -> Result<Vec<models::SandboxLogEntry>, ApiError> {
        let min_level = q.min_level.as_deref().map(level_rank).unwrap_or(0);
        let mut entries: Vec<_> = self
            .all_logs(team_id, id)
            .await?
            .into_iter()
            .filter(|(at, e)| {
                let in_range = match q.cursor {
                    Some(c) if q.backward => *at <= c,
                    Some(c) => *at >= c,
                    None => true,
                };
                in_range
                    && level_rank(&e.level) >= min_level
                    && q.search.as_deref().is_none_or(|s| e.message.contains(s))
            })
            .map(|(_, e)| e)
            .collect();
        if q.backward {
            entries.reverse();
        }
        entries.truncate(q.limit);
        Ok(entries)
    }

    async fn all_logs(
        &self,
        team_id: &str,
        id: &str,
    ) -> Result<Vec<(i64, models::SandboxLogEntry)>, ApiError> {
        let r = self.any_record(team_id, id).await?;
        let id2 = r.id.clone();
        let events = self.db(move |s| s.sandbox_events(&id2)).await?;
        let mut out: Vec<(i64, models::SandboxLogEntry)> = events
            .into_iter()
            .map(|e| {
                let message = match e.from {
                    Some(from) => format!("sandbox {from} -> {}: {}", e.to, e.reason),
                    None => format!("sandbox {}: {}", e.to, e.reason),
                };
                let level = if e.to == StoreState::Lost {
                    "warn"
                } else {
                    "info"
                };
                (
                    e.at,
                    models::SandboxLogEntry {
                        timestamp: rfc3339(e.at),
                        message,
                        level: level.into(),
                        fields: BTreeMap::from([("source".to_string(), "alcove".to_string())]),
                    },
                )
            })
            .collect();
        if !r.state.is_terminal()
            && let Ok(lines) = self
                .call(BackendOp::Logs, &r.id, self.backend.logs(&r.id))
                .await
        {
            out.extend(lines.into_iter().map(|l| {
                let at = system_time_ms(l.timestamp);
                let level = match l.level {
                    LogLevel::Debug => "debug",
                    LogLevel::Info => "info",
                    LogLevel::Warn => "warn",
                    LogLevel::Error => "error",
                };
                (
                    at,
                    models::SandboxLogEntry {
                        timestamp: rfc3339(at),
                        message: l.message,
                        level: level.into(),
                        fields: BTreeMap::from([("source".to_string(), "sandbox".to_string())]),
                    },
                )
            }));
        }
        out.sort_by_key(|(at, _)| *at);
        Ok(out)
    }

    pub async fn active_sandboxes(&self) -> usize {
        self.db(|s| s.live_sandboxes())
            .await
            .map(|v| v.iter().filter(|r| r.state == StoreState::Running).count())
            .unwrap_or(0)
    }
}

/// Most samples one series answer holds (an hour raw every 5 s and a day of minutes is 2160).
const MAX_SERIES: usize = 5000;

fn sample_view(m: alcove_store::MetricSample) -> models::SandboxMetric {
    models::SandboxMetric {
        timestamp: rfc3339(m.at),
        timestamp_unix: m.at / 1000,
        cpu_count: m.cpu_count,
        cpu_used_pct: m.cpu_used_pct,
        mem_used: m.mem_used,
        mem_total: m.mem_total,
        mem_cache: m.mem_cache,
        disk_used: m.disk_used,
        disk_total: m.disk_total,
    }
}

/// A backend sample as the metrics history stores it.
fn usage_sample(m: ResourceUsage, net: NetCounters) -> alcove_store::MetricSample {
    alcove_store::MetricSample {
        at: system_time_ms(m.timestamp),
        cpu_count: m.cpu_count,
        cpu_used_pct: m.cpu_used_pct,
        mem_used: m.mem_used,
        mem_total: m.mem_total,
        mem_cache: m.mem_cache,
        disk_used: m.disk_used,
        disk_total: m.disk_total,
        net_tx: net.0,
        net_rx: net.1,
    }
}

//! Metering, usage reports, billing events, team limits and spend caps (`docs/metering.md`).
//!
//! The store writes the usage events (`alcove_store` `metering.rs`: compute intervals closed
//! with every state change, so they are exact whatever the tick); here the tick measures what
//! only the backend knows (bytes on disk, egress counters), computes each capped team's spend
//! this month, raises warnings at its thresholds (recorded once, then POSTed to the webhook by
//! [`Service::deliver_spend_notices`], retried with backoff and never in a request's path), and
//! at the cap refuses creates and resumes and pauses or kills the team's running sandboxes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use alcove_store::{
    NetSample, OnCap, Quantities, SandboxState as StoreState, SpendNotice, TeamLimits, UsageGroup,
    now_ms,
};
use time::OffsetDateTime;

use super::Service;
use crate::backend::{BackendOp, Keep};
use crate::config::{MeteringConfig, Prices};
use crate::error::{ApiError, chain};
use crate::models::{self, rfc3339};

/// Largest `limit` of one page of usage events.
pub const MAX_EVENTS_PAGE: usize = 10_000;

/// A team's standing against its cap, as of the last tick (or limits change).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Standing {
    month: String,
    spend_usd: f64,
    cap_usd: f64,
}

impl Standing {
    fn capped(&self) -> bool {
        self.spend_usd >= self.cap_usd
    }
}

/// `YYYY-MM` of `ms` (UTC) and the first millisecond of that month.
pub(crate) fn month_of(ms: i64) -> (String, i64) {
    let t = OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    let start = t
        .replace_day(1)
        .map(|t| t.replace_time(time::Time::MIDNIGHT))
        .unwrap_or(t);
    (
        format!("{:04}-{:02}", t.year(), u8::from(t.month())),
        (start.unix_timestamp_nanos() / 1_000_000) as i64,
    )
}

/// The first millisecond of the UTC month `ms` is in.
pub fn month_start(ms: i64) -> i64 {
    month_of(ms).1
}

/// The report's totals: `quantities` at `prices`.
fn totals(sandboxes: u64, q: &Quantities, prices: &Prices) -> models::UsageTotals {
    models::UsageTotals {
        sandboxes,
        vcpu_seconds: q.vcpu_seconds,
        memory_gib_seconds: q.memory_gib_seconds,
        storage_gib_hours: q.storage_gib_hours,
        egress_bytes: q.egress_bytes,
        ingress_bytes: q.ingress_bytes,
        cost_usd: prices.cost(q),
    }
}

/// A `groupBy` value.
pub fn parse_group(s: &str) -> Option<UsageGroup> {
    Some(match s {
        "sandbox" => UsageGroup::Sandbox,
        "template" => UsageGroup::Template,
        "day" => UsageGroup::Day,
        "team" => UsageGroup::Team,
        _ => return None,
    })
}

fn group_name(g: UsageGroup) -> &'static str {
    match g {
        UsageGroup::Sandbox => "sandbox",
        UsageGroup::Template => "template",
        UsageGroup::Day => "day",
        UsageGroup::Team => "team",
    }
}

/// The checks of `PUT /alcove/v1/teams/{team}/limits`.
pub fn limits_from_body(b: &models::TeamLimitsBody) -> Result<TeamLimits, ApiError> {
    let bad = |detail: String| ApiError::InvalidBody { detail };
    const MAX_COUNT: u64 = 1_000_000;
    for (name, v) in [("maxRunning", b.max_running), ("maxPaused", b.max_paused)] {
        if let Some(v) = v
            && v > MAX_COUNT
        {
            return Err(bad(format!(
                "{name} = {v} is absurd: it must be at most {MAX_COUNT} (or null for the \
                 server's default)"
            )));
        }
    }
    for (name, v, max) in [
        ("maxStorageGib", b.max_storage_gib, 1e7),
        ("monthlySpendCapUsd", b.monthly_spend_cap_usd, 1e9),
    ] {
        if let Some(v) = v
            && (!v.is_finite() || !(0.0..=max).contains(&v))
        {
            return Err(bad(format!(
                "{name} = {v} must be a number from 0 to {max} (or null for none)"
            )));
        }
    }
    let mut warn = b
        .warn_at_percent
        .clone()
        .unwrap_or_else(|| alcove_store::DEFAULT_WARN_AT_PERCENT.to_vec());
    if warn.len() > 10 || warn.iter().any(|p| !(1..=1000).contains(p)) {
        return Err(bad(format!(
            "warnAtPercent = {warn:?}: give at most 10 percentages, each from 1 to 1000"
        )));
    }
    warn.sort_unstable();
    warn.dedup();
    let on_cap = match &b.on_cap {
        None => OnCap::Refuse,
        Some(s) => OnCap::parse(s).ok_or_else(|| {
            bad(format!(
                "onCap = {s:?} is not one of \"refuse\", \"pause\", \"kill\""
            ))
        })?,
    };
    Ok(TeamLimits {
        max_running: b.max_running,
        max_paused: b.max_paused,
        max_storage_gib: b.max_storage_gib,
        monthly_spend_cap_usd: b.monthly_spend_cap_usd,
        warn_at_percent: warn,
        on_cap,
        updated_at: None,
    })
}

impl Service {
    pub fn metering(&self) -> &MeteringConfig {
        &self.metering
    }

    /// One metering tick: compute, storage and network, then the spend caps. Each part logs
    /// its own failure and the others go on.
    pub async fn meter_tick(self: &Arc<Self>) {
        let now = now_ms();
        if let Err(e) = self.db(move |s| s.meter_compute(now)).await {
            tracing::error!(error = %chain(&e), "metering: compute");
        }
        if let Err(e) = self.meter_storage(now).await {
            tracing::error!(error = %chain(&e), "metering: storage");
        }
        if let Err(e) = self.meter_network(None).await {
            tracing::error!(error = %chain(&e), "metering: network");
        }
        if let Err(e) = self.apply_volume_quotas().await {
            tracing::error!(error = %chain(&e), "metering: volume quotas");
        }
        self.check_spend_caps(None).await;
    }

    async fn meter_storage(&self, now: i64) -> Result<(), ApiError> {
        let mut objects = self.db(|s| s.storage_objects()).await?;
        let mut sandboxes = Vec::new();
        let mut snapshots = Vec::new();
        for o in &objects {
            if let Some(id) = o.object.strip_prefix("sandbox:") {
                sandboxes.push(id.to_owned());
            } else if let Some(id) = o.object.strip_prefix("snapshot:") {
                snapshots.push(id.to_owned());
            }
        }
        let sizes = self
            .call(
                BackendOp::StoredBytes,
                "",
                self.backend.stored_bytes_each(&sandboxes, &snapshots),
            )
            .await
            .map_err(|e| super::api_error(BackendOp::StoredBytes, "", e))?;
        let (sb, sn) = sizes.split_at(sandboxes.len().min(sizes.len()));
        let by_sandbox: HashMap<&str, u64> = sandboxes
            .iter()
            .map(String::as_str)
            .zip(sb.iter().copied())
            .collect();
        let by_snapshot: HashMap<&str, u64> = snapshots
            .iter()
            .map(String::as_str)
            .zip(sn.iter().copied())
            .collect();
        let volumes: Vec<String> = objects
            .iter()
            .filter_map(|o| o.object.strip_prefix("volume:").map(str::to_owned))
            .collect();
        let volume_sizes = self.volume_bytes(&volumes).await;
        let by_volume: HashMap<&str, u64> = volumes
            .iter()
            .map(String::as_str)
            .zip(volume_sizes.iter().copied())
            .collect();
        for o in &mut objects {
            if let Some(id) = o.object.strip_prefix("sandbox:") {
                o.bytes = by_sandbox.get(id).copied().unwrap_or(0);
            } else if let Some(id) = o.object.strip_prefix("snapshot:") {
                o.bytes = by_snapshot.get(id).copied().unwrap_or(0);
            } else if let Some(id) = o.object.strip_prefix("volume:") {
                o.bytes = by_volume.get(id).copied().unwrap_or(0);
            }
        }
        // An object first seen now is charged back to when it was made, but never more than
        // two ticks (a gap nobody measured is not billed).
        let gap = 2 * self.metering.interval.as_millis() as i64;
        self.db(move |s| s.meter_storage(now, &objects, gap))
            .await?;
        Ok(())
    }

    /// Reads the egress counters of `only` (or of every running sandbox) into usage events.
    async fn meter_network(&self, only: Option<&str>) -> Result<(), ApiError> {
        let ids: Vec<String> = match only {
            Some(id) => vec![id.to_owned()],
            None => self
                .db(|s| s.live_sandboxes())
                .await?
                .into_iter()
                .filter(|r| r.state == StoreState::Running)
                .map(|r| r.id)
                .collect(),
        };
        if ids.is_empty() {
            return Ok(());
        }
        let counters = self
            .call(BackendOp::NetCounters, "", self.backend.net_counters(&ids))
            .await
            .map_err(|e| super::api_error(BackendOp::NetCounters, "", e))?;
        let now = now_ms();
        let samples: Vec<(String, u64, u64)> = ids
            .into_iter()
            .zip(counters)
            .filter_map(|(id, c)| c.map(|(o, i)| (id, o, i)))
            .collect();
        self.db(move |s| {
            let v: Vec<NetSample<'_>> = samples
                .iter()
                .map(|(id, o, i)| NetSample {
                    sandbox_id: id,
                    bytes_out: *o,
                    bytes_in: *i,
                })
                .collect();
            s.meter_network(now, &v)
        })
        .await?;
        Ok(())
    }

    /// Before a VM stops (pause, kill): what its egress proxy counted since the last tick, which
    /// would be gone with it. Best effort: a failure is logged.
    pub(crate) async fn meter_network_of(&self, id: &str) {
        if let Err(e) = self.meter_network(Some(id)).await {
            tracing::warn!(sandbox_id = %id, error = %chain(&e), "metering: network before stop");
        }
    }

    /// The team `{team}` names (id or name), if the caller's team may see it: its own, or any
    /// for the admin team. `None` means the caller's own.
    pub async fn team_for(
        &self,
        caller: &str,
        team: Option<&str>,
    ) -> Result<alcove_store::Team, ApiError> {
        let want = team.unwrap_or(caller).to_owned();
        let found = {
            let w = want.clone();
            self.db(move |s| s.team(&w)).await?
        };
        let admin = self.is_admin(caller).await?;
        match found {
            Some(t) if t.id == caller || admin => Ok(t),
            // A team key learns nothing about which other teams exist.
            Some(_) => Err(ApiError::OtherTeam { team: want }),
            None if admin => Err(ApiError::TeamNotFound { team: want }),
            None => Err(ApiError::OtherTeam { team: want }),
        }
    }

    /// Which team a `team=` query parameter means for this caller: its own (absent), another
    /// (admin only, by id or name), or every team (`*`, admin only; `None`).
    pub(crate) async fn team_scope(
        &self,
        caller: &str,
        team: Option<&str>,
    ) -> Result<Option<String>, ApiError> {
        match team {
            Some("*") if self.is_admin(caller).await? => Ok(None),
            Some("*") => Err(ApiError::OtherTeam { team: "*".into() }),
            t => Ok(Some(self.team_for(caller, t).await?.id)),
        }
    }

    /// Whether `team_id` is the admin team: the first start's, named `admin` (team names are
    /// unique, a store constraint).
    pub async fn is_admin(&self, team_id: &str) -> Result<bool, ApiError> {
        let teams = self.db(|s| s.teams()).await?;
        Ok(teams
            .iter()
            .any(|t| t.name == crate::handlers::ADMIN_TEAM && t.id == team_id))
    }

    /// `GET /alcove/v1/usage`.
    pub async fn usage(
        &self,
        caller: &str,
        team: Option<&str>,
        start: i64,
        end: i64,
        group: UsageGroup,
    ) -> Result<models::UsageReport, ApiError> {
        let scope = self.team_scope(caller, team).await?;
        let s2 = scope.clone();
        let rows = self
            .db(move |s| s.usage(s2.as_deref(), start, end, group))
            .await?;
        let s3 = scope.clone();
        let all = self
            .db(move |s| s.usage(s3.as_deref(), start, end, UsageGroup::Team))
            .await?;
        let prices = self.metering.prices;
        let mut q = Quantities::default();
        for r in &all {
            q.add(&r.quantities);
        }
        let items = rows
            .into_iter()
            .map(|r| models::UsageItem {
                totals: totals(r.sandboxes, &r.quantities, &prices),
                key: r.key,
            })
            .collect();
        Ok(models::UsageReport {
            start: rfc3339(start),
            end: rfc3339(end.min(253_402_300_799_000)),
            group_by: group_name(group).into(),
            team: scope,
            items,
            total: totals(all.iter().map(|r| r.sandboxes).sum(), &q, &prices),
            prices,
        })
    }

    /// `GET /alcove/v1/usage/events`: the events after `after`, oldest first.
    pub async fn usage_events(
        &self,
        caller: &str,
        team: Option<&str>,
        after: i64,
        limit: usize,
    ) -> Result<Vec<models::UsageEventView>, ApiError> {
        let scope = self.team_scope(caller, team).await?;
        let limit = limit.clamp(1, MAX_EVENTS_PAGE);
        let events = self
            .db(move |s| s.usage_events_after(scope.as_deref(), after, limit))
            .await?;
        let prices = self.metering.prices;
        Ok(events
            .into_iter()
            .map(|e| models::UsageEventView {
                id: e.key,
                seq: e.seq,
                team_id: e.team_id,
                sandbox_id: e.sandbox_id,
                template_id: e.template_id,
                kind: e.kind,
                start: rfc3339(e.start_at),
                end: rfc3339(e.end_at),
                vcpu_seconds: e.quantities.vcpu_seconds,
                memory_gib_seconds: e.quantities.memory_gib_seconds,
                storage_gib_hours: e.quantities.storage_gib_hours,
                egress_bytes: e.quantities.egress_bytes,
                ingress_bytes: e.quantities.ingress_bytes,
                cost_usd: prices.cost(&e.quantities),
            })
            .collect())
    }

    /// A team's limits with the defaults filled in, as the quota checks apply them.
    pub(crate) async fn effective_limits(&self, team_id: &str) -> Result<crate::Limits, ApiError> {
        let t = team_id.to_owned();
        let l = self.db(move |s| s.team_limits(&t)).await?;
        let mut limits = self.limits.clone();
        if let Some(v) = l.max_running {
            limits.max_concurrent_sandboxes = v as usize;
        }
        if let Some(v) = l.max_paused {
            limits.max_paused_sandboxes = v as usize;
        }
        if let Some(v) = l.max_storage_gib {
            limits.max_stored_bytes = (v * (1u64 << 30) as f64) as u64;
        }
        Ok(limits)
    }

    /// Refuses new work for a team at its spend cap (as of the last check).
    pub(crate) fn check_spend_cap(&self, team_id: &str) -> Result<(), ApiError> {
        let standing = self.standing.lock().expect("standing lock");
        match standing.get(team_id) {
            Some(s) if s.capped() => Err(ApiError::SpendCapReached {
                spend_usd: s.spend_usd,
                cap_usd: s.cap_usd,
                month: s.month.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// This month's spend of a team.
    async fn month_spend(&self, team_id: &str, now: i64) -> Result<(String, f64), ApiError> {
        let (month, start) = month_of(now);
        let t = team_id.to_owned();
        let rows = self
            .db(move |s| s.usage(Some(&t), start, now + 1, UsageGroup::Team))
            .await?;
        let mut q = Quantities::default();
        for r in &rows {
            q.add(&r.quantities);
        }
        Ok((month, self.metering.prices.cost(&q)))
    }

    /// Checks every capped team's spend (or one team's): warnings at the thresholds passed,
    /// and at the cap the team's `onCap` on its running sandboxes.
    pub async fn check_spend_caps(self: &Arc<Self>, only: Option<&str>) {
        let teams = match self.db(|s| s.capped_teams()).await {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %chain(&e), "spend caps: listing teams");
                return;
            }
        };
        let now = now_ms();
        let mut standing = HashMap::new();
        for (team, limits) in teams {
            if only.is_some_and(|o| o != team) {
                if let Some(s) = self.standing.lock().expect("standing lock").get(&team) {
                    standing.insert(team.clone(), s.clone());
                }
                continue;
            }
            let Some(cap) = limits.monthly_spend_cap_usd else {
                continue;
            };
            let (month, spend) = match self.month_spend(&team, now).await {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!(team_id = %team, error = %chain(&e), "spend caps: usage");
                    continue;
                }
            };
            let pct = if cap > 0.0 {
                spend / cap * 100.0
            } else {
                f64::INFINITY
            };
            for p in limits.warn_at_percent.iter().copied() {
                if pct < p as f64 {
                    continue;
                }
                let (t, m) = (team.clone(), month.clone());
                match self
                    .db(move |s| s.record_spend_notice(&t, &m, p, spend, cap))
                    .await
                {
                    Ok(true) => tracing::warn!(
                        team_id = %team, percent = p, spend_usd = spend, cap_usd = cap,
                        "spend warning: the team reached {p}% of its monthly cap"
                    ),
                    Ok(false) => {}
                    Err(e) => tracing::error!(error = %chain(&e), "spend caps: notice"),
                }
            }
            let s = Standing {
                month,
                spend_usd: spend,
                cap_usd: cap,
            };
            if s.capped() && limits.on_cap != OnCap::Refuse {
                self.enforce_cap(&team, limits.on_cap, &s).await;
            }
            standing.insert(team, s);
        }
        *self.standing.lock().expect("standing lock") = standing;
    }

    /// Pauses or kills a capped team's running sandboxes, each in its own task.
    async fn enforce_cap(self: &Arc<Self>, team: &str, on_cap: OnCap, s: &Standing) {
        let t = team.to_owned();
        let running: Vec<String> = match self.db(move |st| st.live_sandboxes()).await {
            Ok(r) => r
                .into_iter()
                .filter(|r| r.team_id == t && r.state == StoreState::Running)
                .map(|r| r.id)
                .collect(),
            Err(e) => {
                tracing::error!(error = %chain(&e), "spend caps: listing sandboxes");
                return;
            }
        };
        let reason = format!(
            "spend cap: the team spent ${:.4} of its ${:.4} monthly cap in {}",
            s.spend_usd, s.cap_usd, s.month
        );
        for id in running {
            let (svc, reason) = (self.clone(), reason.clone());
            tokio::spawn(async move {
                let out = match on_cap {
                    OnCap::Pause => svc.pause_record(&id, Keep::Memory, &reason).await,
                    _ => svc.kill_record(&id, &reason).await,
                };
                match out {
                    Ok(()) => {
                        tracing::warn!(sandbox_id = %id, action = on_cap.as_str(), "{reason}")
                    }
                    Err(e) if on_cap == OnCap::Pause => {
                        // A pause the quota or backend refuses must not leave it running.
                        tracing::warn!(sandbox_id = %id, error = %chain(&e), "spend cap: pause failed, killing");
                        let _ = svc.kill_record(&id, &reason).await;
                    }
                    Err(e) => {
                        tracing::warn!(sandbox_id = %id, error = %chain(&e), "spend cap: kill failed")
                    }
                }
            });
        }
    }

    /// `GET /alcove/v1/teams/{team}/limits`.
    pub async fn team_limits_view(
        &self,
        caller: &str,
        team: &str,
    ) -> Result<models::TeamLimitsView, ApiError> {
        let t = self.team_for(caller, Some(team)).await?;
        self.limits_view(t).await
    }

    async fn limits_view(&self, t: alcove_store::Team) -> Result<models::TeamLimitsView, ApiError> {
        let id = t.id.clone();
        let (l, usage, notices) = self
            .db(move |s| {
                Ok((
                    s.team_limits(&id)?,
                    s.team_usage(&id)?,
                    s.spend_notices(&id)?,
                ))
            })
            .await?;
        let eff = self.effective_limits(&t.id).await?;
        let (month, spend) = self.month_spend(&t.id, now_ms()).await?;
        Ok(models::TeamLimitsView {
            team_id: t.id,
            team_name: t.name,
            max_running: l.max_running,
            max_paused: l.max_paused,
            max_storage_gib: l.max_storage_gib,
            monthly_spend_cap_usd: l.monthly_spend_cap_usd,
            warn_at_percent: l.warn_at_percent,
            on_cap: l.on_cap.as_str().into(),
            effective: models::EffectiveLimits {
                max_running: eff.max_concurrent_sandboxes as u64,
                max_paused: eff.max_paused_sandboxes as u64,
                max_storage_gib: eff.max_stored_bytes as f64 / (1u64 << 30) as f64,
            },
            month,
            month_spend_usd: spend,
            capped: l.monthly_spend_cap_usd.is_some_and(|c| spend >= c),
            running: usage.running as u64,
            paused: usage.paused() as u64,
            notices: notices.into_iter().map(notice_view).collect(),
            updated_at: l.updated_at.map(rfc3339),
        })
    }

    /// `PUT /alcove/v1/teams/{team}/limits` (admin only): replaces the team's limits and checks
    /// its spend against them at once (a cap set below the spend so far caps it now).
    pub async fn set_team_limits(
        self: &Arc<Self>,
        caller: &str,
        team: &str,
        body: models::TeamLimitsBody,
    ) -> Result<models::TeamLimitsView, ApiError> {
        if !self.is_admin(caller).await? {
            return Err(ApiError::OtherTeam { team: team.into() });
        }
        let limits = limits_from_body(&body)?;
        let t = self.team_for(caller, Some(team)).await?;
        let id = t.id.clone();
        self.db(move |s| s.set_team_limits(&id, &limits)).await?;
        tracing::info!(team_id = %t.id, "team limits set");
        if body.monthly_spend_cap_usd.is_none() {
            self.standing.lock().expect("standing lock").remove(&t.id);
        }
        self.check_spend_caps(Some(&t.id)).await;
        self.limits_view(t).await
    }

    /// Sends the spend notices that are due to the webhook, one at a time, each under a 10 s
    /// deadline; a failure is retried with exponential backoff (1 s doubling to 1 h, 20 tries).
    pub async fn deliver_spend_notices(&self, client: &reqwest::Client) {
        let Some(hook) = self.metering.webhook.clone() else {
            return;
        };
        let due = match self.db(|s| s.due_spend_notices(now_ms(), 50)).await {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %chain(&e), "webhook: listing notices");
                return;
            }
        };
        for n in due {
            let names = self.db(|s| s.teams()).await.unwrap_or_default();
            let team_name = names
                .iter()
                .find(|t| t.id == n.team_id)
                .map(|t| t.name.clone())
                .unwrap_or_default();
            let body = serde_json::json!({
                "type": "spend.warning",
                "teamID": n.team_id,
                "teamName": team_name,
                "month": n.month,
                "percent": n.percent,
                "spendUsd": n.spend_usd,
                "capUsd": n.cap_usd,
                "at": rfc3339(n.at),
            })
            .to_string();
            let ts = (now_ms() / 1000).to_string();
            let sig = sign(&hook.secret, &ts, &body);
            let res = client
                .post(&hook.url)
                .header("content-type", "application/json")
                .header("x-alcove-timestamp", &ts)
                .header("x-alcove-signature", format!("sha256={sig}"))
                .timeout(Duration::from_secs(10))
                .body(body)
                .send()
                .await;
            let outcome = match res {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(format!("the webhook answered {}", r.status())),
                Err(e) => Err(format!("the webhook is unreachable: {}", chain(&e))),
            };
            let result = outcome.map_err(|err| {
                let attempts = n.attempts + 1;
                let next = (attempts < 20)
                    .then(|| now_ms() + 1000 * (1i64 << attempts.min(12)).min(3600));
                tracing::warn!(team_id = %n.team_id, attempts, error = %err, "webhook: delivery failed");
                (err, next)
            });
            if result.is_ok() {
                tracing::info!(team_id = %n.team_id, percent = n.percent, "webhook: spend warning delivered");
            }
            let n2 = n.clone();
            if let Err(e) = self.db(move |s| s.spend_notice_attempt(&n2, result)).await {
                tracing::error!(error = %chain(&e), "webhook: recording the attempt");
            }
        }
    }
}

/// Teams shown one by one in `/metrics`; the rest are summed under `team="other"`, so the
/// label's cardinality stays bounded whatever the number of teams.
pub const MAX_TEAM_SERIES: usize = 100;

/// A Prometheus label value: backslash, quote and newline escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Service {
    /// Per-team gauges for `/metrics`: sandboxes running and paused, this month's usage and
    /// cost, and whether the team is at its spend cap. Teams past [`MAX_TEAM_SERIES`] (by
    /// this month's cost) are summed as `other`.
    pub async fn team_metrics_text(&self) -> String {
        use std::fmt::Write;
        let now = now_ms();
        let (_, month_start) = month_of(now);
        let got = self
            .db(move |s| {
                let teams = s.teams()?;
                let usage = s.usage(None, month_start, now + 1, UsageGroup::Team)?;
                let live = s.live_sandboxes()?;
                Ok((teams, usage, live))
            })
            .await;
        let Ok((teams, usage, live)) = got else {
            return String::new();
        };
        let prices = self.metering.prices;
        struct Row {
            running: u64,
            paused: u64,
            q: Quantities,
            cost: f64,
            capped: u64,
        }
        let capped = self.standing.lock().expect("standing lock").clone();
        let mut rows: Vec<(String, Row)> = teams
            .iter()
            .map(|t| {
                let q = usage
                    .iter()
                    .find(|u| u.key == t.id)
                    .map(|u| u.quantities)
                    .unwrap_or_default();
                let count = |st: StoreState| {
                    live.iter()
                        .filter(|r| r.team_id == t.id && r.state == st)
                        .count() as u64
                };
                (
                    t.name.clone(),
                    Row {
                        running: count(StoreState::Running) + count(StoreState::Creating),
                        paused: count(StoreState::Paused),
                        cost: prices.cost(&q),
                        q,
                        capped: u64::from(capped.get(&t.id).is_some_and(Standing::capped)),
                    },
                )
            })
            .collect();
        rows.sort_by(|a, b| b.1.cost.total_cmp(&a.1.cost).then(a.0.cmp(&b.0)));
        if rows.len() > MAX_TEAM_SERIES {
            let rest = rows.split_off(MAX_TEAM_SERIES - 1);
            let mut other = Row {
                running: 0,
                paused: 0,
                q: Quantities::default(),
                cost: 0.0,
                capped: 0,
            };
            for (_, r) in rest {
                other.running += r.running;
                other.paused += r.paused;
                other.q.add(&r.q);
                other.cost += r.cost;
                other.capped += r.capped;
            }
            rows.push(("other".into(), other));
        }
        type Gauge<'a> = (&'a str, &'a str, &'a dyn Fn(&Row) -> f64);
        let families: [Gauge<'_>; 8] = [
            (
                "alcove_team_sandboxes_running",
                "Sandboxes creating or running, per team.",
                &|r| r.running as f64,
            ),
            (
                "alcove_team_sandboxes_paused",
                "Paused sandboxes, per team.",
                &|r| r.paused as f64,
            ),
            (
                "alcove_team_month_vcpu_seconds",
                "Allocated vCPU-seconds this month (UTC), per team.",
                &|r| r.q.vcpu_seconds,
            ),
            (
                "alcove_team_month_memory_gib_seconds",
                "Allocated memory GiB-seconds this month, per team.",
                &|r| r.q.memory_gib_seconds,
            ),
            (
                "alcove_team_month_storage_gib_hours",
                "Storage GiB-hours this month, per team.",
                &|r| r.q.storage_gib_hours,
            ),
            (
                "alcove_team_month_egress_bytes",
                "Bytes sent out through the egress proxy this month, per team.",
                &|r| r.q.egress_bytes as f64,
            ),
            (
                "alcove_team_month_cost_usd",
                "Cost this month at the server's prices, per team.",
                &|r| r.cost,
            ),
            (
                "alcove_team_spend_capped",
                "1 when the team is at its monthly spend cap (teams summed under other: how many).",
                &|r| r.capped as f64,
            ),
        ];
        let mut out = String::new();
        for (name, help, value) in families {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (team, r) in &rows {
                let _ = writeln!(out, "{name}{{team=\"{}\"}} {}", label(team), value(r));
            }
        }
        out
    }
}

/// `hex(HMAC-SHA256(secret, "<timestamp>.<body>"))`: what `X-Alcove-Signature` carries after
/// `sha256=`. A receiver recomputes it and also refuses old timestamps (replays).
pub fn sign(secret: &str, timestamp: &str, body: &str) -> String {
    use hmac::{Hmac, KeyInit, Mac};
    let mut mac =
        Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

fn notice_view(n: SpendNotice) -> models::SpendNoticeView {
    models::SpendNoticeView {
        month: n.month,
        percent: n.percent,
        at: rfc3339(n.at),
        spend_usd: n.spend_usd,
        cap_usd: n.cap_usd,
        delivered_at: n.delivered_at.map(rfc3339),
        attempts: n.attempts,
        last_error: n.last_error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_start_at_utc_midnight_on_the_first() {
        // 2026-12-03T11:00:00Z
        let (m, start) = month_of(1_796_295_600_000);
        assert_eq!(m, "2026-12");
        assert_eq!(rfc3339(start), "2026-12-01T00:00:00Z");
    }

    #[test]
    fn limits_are_checked_and_defaulted() {
        let ok = limits_from_body(&models::TeamLimitsBody {
            monthly_spend_cap_usd: Some(5.0),
            warn_at_percent: Some(vec![80, 50, 80]),
            on_cap: Some("pause".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(ok.warn_at_percent, vec![50, 80]);
        assert_eq!(ok.on_cap, OnCap::Pause);
        for bad in [
            models::TeamLimitsBody {
                monthly_spend_cap_usd: Some(-1.0),
                ..Default::default()
            },
            models::TeamLimitsBody {
                max_storage_gib: Some(f64::NAN),
                ..Default::default()
            },
            models::TeamLimitsBody {
                max_running: Some(u64::MAX),
                ..Default::default()
            },
            models::TeamLimitsBody {
                warn_at_percent: Some(vec![0]),
                ..Default::default()
            },
            models::TeamLimitsBody {
                on_cap: Some("explode".into()),
                ..Default::default()
            },
        ] {
            assert!(limits_from_body(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // RFC 4231 style check against an independent computation of the same construction.
        let s = sign("key", "1700000000", "{}");
        assert_eq!(s.len(), 64);
        assert_ne!(s, sign("key", "1700000001", "{}"));
        assert_ne!(s, sign("other", "1700000000", "{}"));
    }
}

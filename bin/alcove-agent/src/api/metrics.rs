//! `GET /metrics`: envd's resource snapshot (CPU, memory, disk) as JSON, or the agent's own
//! request and failure counters in Prometheus text with `?format=prometheus`.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::state::AgentState;

#[derive(Debug, Serialize, PartialEq)]
pub struct Metrics {
    pub ts: i64,
    pub cpu_count: u32,
    pub cpu_used_pct: f32,
    pub mem_total: u64,
    pub mem_used: u64,
    pub mem_cache: u64,
    pub mem_total_mib: u64,
    pub mem_used_mib: u64,
    pub disk_used: u64,
    pub disk_total: u64,
}

#[derive(Debug, Deserialize)]
pub struct MetricsQuery {
    format: Option<String>,
}

pub async fn get_metrics(
    State(state): State<Arc<AgentState>>,
    Query(q): Query<MetricsQuery>,
) -> Response {
    if q.format.as_deref() == Some("prometheus") {
        return prometheus(&state).into_response();
    }
    axum::Json(snapshot().await).into_response()
}

fn prometheus(state: &AgentState) -> String {
    let c = &state.counters;
    let rows = [
        (
            "alcove_agent_requests_total",
            "HTTP requests received",
            c.requests.load(Ordering::Relaxed),
        ),
        (
            "alcove_agent_unauthorized_total",
            "Requests refused for a missing or wrong token",
            c.unauthorized.load(Ordering::Relaxed),
        ),
        (
            "alcove_agent_rpc_errors_total",
            "Connect calls that ended in an error",
            c.rpc_errors.load(Ordering::Relaxed),
        ),
        (
            "alcove_agent_processes_started_total",
            "Processes started",
            c.processes_started.load(Ordering::Relaxed),
        ),
        (
            "alcove_agent_spawn_failures_total",
            "Process starts that failed",
            c.spawn_failures.load(Ordering::Relaxed),
        ),
        (
            "alcove_agent_tunnels_opened_total",
            "Tunnels to guest ports connected",
            c.tunnels_opened.load(Ordering::Relaxed),
        ),
        (
            "alcove_agent_tunnels_refused_total",
            "Tunnels whose guest port was not open or did not connect in time",
            c.tunnels_refused.load(Ordering::Relaxed),
        ),
    ];
    let mut s = String::new();
    for (name, help, v) in rows {
        s.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
        ));
    }
    s.push_str(&format!(
        "# HELP alcove_agent_processes_running Processes running\n# TYPE alcove_agent_processes_running gauge\nalcove_agent_processes_running {}\n",
        state.processes.list().len()
    ));
    s
}

/// (busy, total) jiffies from the first line of /proc/stat.
fn cpu_times() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

fn meminfo() -> (u64, u64, u64) {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let get = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    let total = get("MemTotal:");
    let avail = get("MemAvailable:");
    (total, total.saturating_sub(avail), get("Cached:"))
}

pub async fn snapshot() -> Metrics {
    // CPU use over a short window, measured now (the agent keeps no sampler running).
    let a = cpu_times();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let b = cpu_times();
    let cpu_used_pct = match (a, b) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
            ((b1 - b0) as f32 / (t1 - t0) as f32 * 100.0).clamp(0.0, 100.0)
        }
        _ => 0.0,
    };
    let (mem_total, mem_used, mem_cache) = meminfo();
    let (disk_total, disk_used) = match nix::sys::statvfs::statvfs("/") {
        Ok(s) => {
            let frag = s.fragment_size();
            let total = s.blocks() * frag;
            (total, total.saturating_sub(s.blocks_free() * frag))
        }
        Err(_) => (0, 0),
    };
    Metrics {
        ts: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0),
        cpu_count: std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1),
        cpu_used_pct,
        mem_total,
        mem_used,
        mem_cache,
        mem_total_mib: mem_total >> 20,
        mem_used_mib: mem_used >> 20,
        disk_used,
        disk_total,
    }
}

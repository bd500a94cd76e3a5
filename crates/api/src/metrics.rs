//! The server's own Prometheus metrics (`GET /metrics`), in the text exposition format.
//!
//! Counters are process-wide (one server per process); every request and every failure path
//! bumps one. Label sets are small and fixed (route templates, not raw paths), so the maps stay
//! bounded.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex};

pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::default);

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    errors: Mutex<BTreeMap<&'static str, u64>>,
    /// Per backend operation: calls, errors (timeouts included), timeouts.
    backend: Mutex<BTreeMap<&'static str, [u64; 3]>>,
    pub sandboxes_created: AtomicU64,
    pub sandbox_create_failures: AtomicU64,
    pub sandboxes_killed: AtomicU64,
    pub sandboxes_timed_out: AtomicU64,
    pub sandboxes_lost: AtomicU64,
    pub sandboxes_paused: AtomicU64,
    pub sandboxes_resumed: AtomicU64,
    pub persistence_failures: AtomicU64,
    pub snapshots_created: AtomicU64,
    pub auth_failures: AtomicU64,
    pub quota_refusals: AtomicU64,
    pub spans_dropped: AtomicU64,
    pub paused_expired: AtomicU64,
    pub proxy_requests: AtomicU64,
    pub proxy_failures: AtomicU64,
    pub proxy_upgrades: AtomicU64,
    pub proxy_streams_refused: AtomicU64,
    pub connections_refused: AtomicU64,
}

impl Metrics {
    pub fn request(&self, method: &str, route: &str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry((method.to_owned(), route.to_owned(), status))
            .or_default() += 1;
    }

    pub fn error(&self, code: &'static str) {
        let mut m = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(code).or_default() += 1;
    }

    /// One backend call and its outcome: `Ok`, an error, or a timeout (the API's deadline or
    /// the backend's own).
    pub fn backend_call(&self, op: &'static str, outcome: Result<(), bool>) {
        let mut m = self.backend.lock().unwrap_or_else(|e| e.into_inner());
        let c = m.entry(op).or_default();
        c[0] += 1;
        if let Err(timeout) = outcome {
            c[1] += 1;
            if timeout {
                c[2] += 1;
            }
        }
    }

    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Renders everything, plus gauges the caller measured just now.
    pub fn render(&self, gauges: &[(&str, &str, u64)]) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP alcove_http_requests_total HTTP requests by method, route and status.\n\
             # TYPE alcove_http_requests_total counter"
        );
        for ((method, route, status), n) in self
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "alcove_http_requests_total{{method=\"{method}\",route=\"{}\",status=\"{status}\"}} {n}",
                route.replace('"', "'")
            );
        }
        let _ = writeln!(
            out,
            "# HELP alcove_api_errors_total Error responses by error code.\n\
             # TYPE alcove_api_errors_total counter"
        );
        for (code, n) in self.errors.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let _ = writeln!(out, "alcove_api_errors_total{{code=\"{code}\"}} {n}");
        }
        {
            let backend = self.backend.lock().unwrap_or_else(|e| e.into_inner());
            let families = [
                ("alcove_backend_calls_total", "Backend calls by operation."),
                (
                    "alcove_backend_errors_total",
                    "Backend calls that failed, timeouts included, by operation.",
                ),
                (
                    "alcove_backend_timeouts_total",
                    "Backend calls that did not answer within their deadline, by operation.",
                ),
            ];
            for (i, (name, help)) in families.into_iter().enumerate() {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
                for (op, c) in backend.iter() {
                    let _ = writeln!(out, "{name}{{op=\"{op}\"}} {}", c[i]);
                }
            }
        }
        let counters: [(&str, &str, &AtomicU64); 18] = [
            (
                "alcove_sandboxes_paused_total",
                "Sandboxes paused (on request or at their end time with autoPause).",
                &self.sandboxes_paused,
            ),
            (
                "alcove_sandboxes_resumed_total",
                "Paused sandboxes resumed (connect, resume, or traffic with autoResume).",
                &self.sandboxes_resumed,
            ),
            (
                "alcove_persistence_failures_total",
                "Pauses, resumes, snapshots and forks that failed.",
                &self.persistence_failures,
            ),
            (
                "alcove_snapshots_created_total",
                "Snapshots taken (create_snapshot and forks).",
                &self.snapshots_created,
            ),
            (
                "alcove_sandboxes_created_total",
                "Sandboxes started.",
                &self.sandboxes_created,
            ),
            (
                "alcove_sandbox_create_failures_total",
                "Sandbox creates that failed.",
                &self.sandbox_create_failures,
            ),
            (
                "alcove_sandboxes_killed_total",
                "Sandboxes killed on request.",
                &self.sandboxes_killed,
            ),
            (
                "alcove_sandboxes_timed_out_total",
                "Sandboxes killed by the reaper at their end time.",
                &self.sandboxes_timed_out,
            ),
            (
                "alcove_sandboxes_lost_total",
                "Sandboxes whose VM vanished.",
                &self.sandboxes_lost,
            ),
            (
                "alcove_quota_refusals_total",
                "Operations refused by a team quota.",
                &self.quota_refusals,
            ),
            (
                "alcove_otlp_spans_dropped_total",
                "Spans not exported because the OTLP queue was full.",
                &self.spans_dropped,
            ),
            (
                "alcove_paused_expired_total",
                "Paused sandboxes deleted after the retention period.",
                &self.paused_expired,
            ),
            (
                "alcove_auth_failures_total",
                "Requests with a missing or bad key.",
                &self.auth_failures,
            ),
            (
                "alcove_proxy_requests_total",
                "Requests routed to sandboxes.",
                &self.proxy_requests,
            ),
            (
                "alcove_proxy_failures_total",
                "Sandbox requests answered with an error by the proxy.",
                &self.proxy_failures,
            ),
            (
                "alcove_proxy_upgrades_total",
                "Sandbox requests switched to another protocol (WebSocket) by a 101.",
                &self.proxy_upgrades,
            ),
            (
                "alcove_proxy_streams_refused_total",
                "Sandbox requests refused (429) because a stream cap was reached.",
                &self.proxy_streams_refused,
            ),
            (
                "alcove_connections_refused_total",
                "Connections answered 503 and closed because the connection cap was reached.",
                &self.connections_refused,
            ),
        ];
        for (name, help, c) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                c.load(Ordering::Relaxed)
            );
        }
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        out
    }
}

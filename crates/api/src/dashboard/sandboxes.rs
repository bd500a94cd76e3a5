//! Sandbox pages: the list (with create and cost so far), one sandbox (info, metrics, events,
//! terminal, ports, egress rules) and its actions, each calling the API's service as the REST
//! handlers do.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use axum::Form;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Json, Redirect, Response};
use minijinja::context;
use serde::Deserialize;

use super::{CsrfForm, LIST_LIMIT, Signed, api_error_page, page};
use crate::backend::{BackendOp, ExecRequest};
use crate::error::ApiError;
use crate::handlers::AppState;
use crate::models::{self, SandboxState};

/// The name of a state as the API spells it.
pub fn state_name(s: SandboxState) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Redirects to `back` with a notice the page shows.
pub fn done(back: &str, notice: &str) -> Response {
    let q: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("done", notice)
        .finish();
    let sep = if back.contains('?') { '&' } else { '?' };
    Redirect::to(&format!("{back}{sep}{q}")).into_response()
}

/// One row of the list, as the page shows it.
#[derive(serde::Serialize)]
pub struct Row {
    pub id: String,
    pub template: String,
    pub state: String,
    pub started_at: String,
    pub end_at: String,
    pub cpu: u32,
    pub memory_mb: u32,
    pub metadata: BTreeMap<String, String>,
    pub live: bool,
    /// Cost so far in USD, from the metered usage.
    pub cost: Option<f64>,
}

/// Cost so far of each of the team's sandboxes (all metered usage, by sandbox).
async fn costs(svc: &AppState, team_id: &str) -> HashMap<String, f64> {
    let now = alcove_store::now_ms();
    match svc
        .usage(team_id, None, 0, now, alcove_store::UsageGroup::Sandbox)
        .await
    {
        Ok(r) => r
            .items
            .into_iter()
            .map(|i| (i.key, i.totals.cost_usd))
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e.parts().2, "dashboard: reading usage for the list");
            HashMap::new()
        }
    }
}

pub async fn list(
    State(svc): State<AppState>,
    signed: Signed,
    RawQuery(raw): RawQuery,
) -> Response {
    // The filter form sends every field; empty ones mean "any".
    let pairs: Vec<(String, String)> = crate::handlers::query_pairs(raw.as_deref())
        .into_iter()
        .filter(|(_, v)| !v.trim().is_empty())
        .collect();
    let value = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let state = match value("state").as_str() {
        "" => "running,paused".to_owned(),
        s => s.to_owned(),
    };
    let query: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(
            pairs
                .iter()
                .filter(|(k, _)| k == "template" || k == "metadata")
                .map(|(k, v)| (k.as_str(), v.as_str())),
        )
        .append_pair("state", &state)
        .append_pair("limit", &LIST_LIMIT.to_string())
        .finish();
    let q = match crate::handlers::sandboxes::parse_list_query(Some(&query)) {
        Ok(q) => q,
        Err(e) => return api_error_page(e, "/dashboard/sandboxes", &signed),
    };
    let (items, next) = match svc.list(&signed.team_id, q).await {
        Ok(r) => r,
        Err(e) => return api_error_page(e, "/dashboard/sandboxes", &signed),
    };
    let costs = costs(&svc, &signed.team_id).await;
    let rows: Vec<Row> = items
        .into_iter()
        .map(|s| {
            let state = state_name(s.state);
            Row {
                live: state == "running" || state == "paused",
                cost: costs.get(&s.sandbox_id).copied(),
                id: s.sandbox_id,
                template: s.alias.unwrap_or(s.template_id),
                state,
                started_at: s.started_at,
                end_at: s.end_at,
                cpu: s.cpu_count,
                memory_mb: s.memory_mb,
                metadata: s.metadata,
            }
        })
        .collect();
    let templates: Vec<String> = match svc.templates(&signed.team_id).await {
        Ok(t) => t
            .into_iter()
            .map(|t| t.aliases.into_iter().next().unwrap_or(t.template_id))
            .collect(),
        Err(_) => Vec::new(),
    };
    let states = [
        ("running,paused", "running or paused"),
        ("running", "running"),
        ("paused", "paused"),
        ("creating", "creating"),
        ("killed", "killed"),
        ("lost", "lost"),
        ("running,paused,creating,killed,lost", "any"),
    ];
    let notice = value("done");
    page(
        StatusCode::OK,
        "sandboxes.html",
        context! {
            session => signed.ctx(),
            section => "sandboxes",
            sandboxes => rows,
            more => next.is_some(),
            states => states,
            templates => templates,
            notice => (!notice.is_empty()).then_some(notice),
            filter => context! {
                state => state,
                template => value("template"),
                metadata => value("metadata"),
            },
        },
    )
}

#[derive(Deserialize)]
pub struct CreateForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    template: String,
    #[serde(default)]
    timeout: String,
    #[serde(default)]
    metadata: String,
}

/// `key=value` pairs, one per line or comma-separated.
fn parse_pairs(s: &str) -> Result<BTreeMap<String, String>, ApiError> {
    let mut out = BTreeMap::new();
    for item in s
        .split([',', '\n'])
        .map(str::trim)
        .filter(|i| !i.is_empty())
    {
        let Some((k, v)) = item.split_once('=') else {
            return Err(ApiError::InvalidBody {
                detail: format!("metadata item `{item}` is not key=value"),
            });
        };
        out.insert(k.trim().to_owned(), v.trim().to_owned());
    }
    Ok(out)
}

fn parse_secs(s: &str, what: &str) -> Result<Option<i64>, ApiError> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    s.parse::<i64>()
        .map(Some)
        .map_err(|_| ApiError::InvalidBody {
            detail: format!("{what} must be a whole number of seconds, not `{s}`"),
        })
}

pub async fn create(
    State(svc): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Form(form): Form<CreateForm>,
) -> Response {
    let back = "/dashboard/sandboxes";
    if let Some(res) = signed.refuse(&headers, &form.csrf) {
        return res;
    }
    let req = (|| {
        let timeout = parse_secs(&form.timeout, "the timeout")?;
        let metadata = parse_pairs(&form.metadata)?;
        serde_json::from_value::<models::NewSandbox>(serde_json::json!({
            "templateID": form.template.trim(),
            "timeout": timeout,
            "metadata": metadata,
        }))
        .map_err(|e| ApiError::InvalidBody {
            detail: e.to_string(),
        })
    })();
    let created = match req {
        Ok(req) => svc.create(&signed.team_id, req).await,
        Err(e) => Err(e),
    };
    match created {
        Ok(s) => done(
            &format!("/dashboard/sandboxes/{}", s.sandbox_id),
            &format!("Created {} from {}.", s.sandbox_id, form.template.trim()),
        ),
        Err(e) => api_error_page(e, back, &signed),
    }
}

/// A listening TCP port in the sandbox, with the link that reaches it.
#[derive(serde::Serialize)]
struct Port {
    port: u16,
    url: String,
}

/// The ports processes in the sandbox listen on (from `/proc/net/tcp*`, read by the agent),
/// except the platform's own. Display only: a guest that lies shows wrong numbers to its owner.
async fn listening_ports(svc: &AppState, id: &str, scheme: &str) -> Vec<Port> {
    let req = ExecRequest {
        cmd: "/bin/cat".into(),
        args: vec!["/proc/net/tcp".into(), "/proc/net/tcp6".into()],
        user: "user".into(),
        timeout: Duration::from_secs(5),
    };
    let out = tokio::time::timeout(
        Duration::from_secs(8),
        svc.call(BackendOp::Exec, id, svc.backend().exec(id, req)),
    )
    .await;
    let Ok(Ok(out)) = out else {
        return Vec::new();
    };
    let mut ports: Vec<u16> = String::from_utf8_lossy(&out.stdout[..out.stdout.len().min(1 << 20)])
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let local = f.nth(1)?;
            let state = f.nth(1)?;
            (state == "0A").then_some(())?;
            let (addr, port) = local.rsplit_once(':')?;
            // Loopback-only listeners are reachable through the proxy too (the agent dials
            // 127.0.0.1), so all count.
            let _ = addr;
            u16::from_str_radix(port, 16).ok()
        })
        .filter(|p| !crate::proxy::PLATFORM_PORTS.contains(p))
        .collect();
    ports.sort_unstable();
    ports.dedup();
    let domain = svc.domain().to_owned();
    ports
        .into_iter()
        .take(50)
        .map(|port| Port {
            port,
            url: format!("{scheme}://{port}-{id}.{domain}/"),
        })
        .collect()
}

#[derive(Deserialize)]
pub struct DetailQuery {
    #[serde(default)]
    done: Option<String>,
}

pub async fn detail(
    State(svc): State<AppState>,
    signed: Signed,
    ext: http::Extensions,
    Path(id): Path<String>,
    Query(q): Query<DetailQuery>,
) -> Response {
    let back = "/dashboard/sandboxes";
    let d = match svc.get(&signed.team_id, &id).await {
        Ok(d) => d,
        Err(e) => return api_error_page(e, back, &signed),
    };
    let state = state_name(d.state);
    let scheme = if super::over_tls(&ext) {
        "https"
    } else {
        "http"
    };
    let ports = if state == "running" {
        listening_ports(&svc, &id, scheme).await
    } else {
        Vec::new()
    };
    let logs = svc
        .logs(
            &signed.team_id,
            &id,
            &crate::service::LogQuery {
                cursor: None,
                backward: true,
                min_level: None,
                search: None,
                limit: 100,
            },
        )
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|mut l| {
            l.message = strip_ansi(&l.message);
            l
        })
        .collect::<Vec<_>>();
    let events = svc
        .sandbox_events(&signed.team_id, &id, 0, 200)
        .await
        .unwrap_or_default();
    let last_seq = events.last().map(|e| e.seq).unwrap_or(0);
    let metrics = svc
        .metrics(&signed.team_id, &id, None, None)
        .await
        .unwrap_or_default();
    let cost = costs(&svc, &signed.team_id).await.get(&id).copied();
    // A desktop's stream (noVNC on its port, started with the SDK's `stream.start()`), embedded.
    let stream = ports
        .iter()
        .find(|p| p.port == DESKTOP_STREAM_PORT)
        .map(|p| p.url.clone());
    let network_rules = match &d.network.rules {
        Some(r) => serde_json::to_string_pretty(r).unwrap_or_default(),
        None => String::new(),
    };
    let mut res = page(
        StatusCode::OK,
        "sandbox.html",
        context! {
            session => signed.ctx(),
            section => "sandboxes",
            notice => q.done.filter(|n| !n.is_empty()),
            s => minijinja::Value::from_serialize(&d),
            id => id,
            state => state,
            template => d.alias.clone().unwrap_or(d.template_id.clone()),
            cost => cost,
            ports => ports,
            logs => logs,
            events => events.iter().map(event_row).collect::<Vec<_>>(),
            last_seq => last_seq,
            latest => metrics.last().map(minijinja::Value::from_serialize),
            allow_out => d.network.allow_out.join("\n"),
            deny_out => d.network.deny_out.join("\n"),
            network_rules => network_rules,
            has_rules => d.network.rules.as_ref().is_some_and(|r| r.as_object().is_some_and(|o| !o.is_empty())),
            stream => stream.as_ref().map(|u| format!("{u}vnc.html?autoconnect=true&resize=scale")),
        },
    );
    // The page may frame the stream's origin, and only that.
    if let Some(origin) = stream.as_deref().map(|u| u.trim_end_matches('/'))
        && let Ok(v) = http::HeaderValue::from_str(&format!("{}; frame-src {origin}", super::CSP))
    {
        res.headers_mut()
            .insert(http::header::CONTENT_SECURITY_POLICY, v);
    }
    res
}

/// The port e2b_desktop's stream (noVNC) listens on.
const DESKTOP_STREAM_PORT: u16 = 6080;

/// The text of a log line without its terminal colour codes (the agent's lines have them).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // Parameters and intermediates up to the final byte (@ to ~).
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// An event as the page (and its live follow) shows it: when, what, on what, how it went.
fn event_row(e: &models::AuditEventView) -> serde_json::Value {
    let detail = match &e.detail {
        serde_json::Value::Null => String::new(),
        serde_json::Value::Object(m) if m.is_empty() => String::new(),
        v => {
            let mut s = v.to_string();
            if s.len() > 300 {
                let mut cut = 300;
                while !s.is_char_boundary(cut) {
                    cut -= 1;
                }
                s.truncate(cut);
                s.push('…');
            }
            s
        }
    };
    serde_json::json!({
        "seq": e.seq,
        "at": e.at,
        "kind": e.kind,
        "action": e.action,
        "target": e.target,
        "result": e.result,
        "actor": e.actor,
        "detail": detail,
    })
}

#[derive(Deserialize)]
pub struct AfterQuery {
    #[serde(default)]
    after: i64,
}

/// The live follow of a sandbox's run events: those after `seq`, oldest first, and whether the
/// sandbox has ended (then the page stops asking).
pub async fn events_json(
    State(svc): State<AppState>,
    signed: Signed,
    Path(id): Path<String>,
    Query(q): Query<AfterQuery>,
) -> Response {
    let events = match svc.sandbox_events(&signed.team_id, &id, q.after, 200).await {
        Ok(e) => e,
        Err(e) => return e.into_response(),
    };
    let ended = svc
        .sandbox_ended(&signed.team_id, &id)
        .await
        .unwrap_or(true);
    json(serde_json::json!({
        "events": events.iter().map(event_row).collect::<Vec<_>>(),
        "ended": ended,
    }))
}

/// The metrics history the page's charts draw: time (s), CPU %, memory used and total (MiB),
/// and network bytes per second out and in (from the egress proxy's counters; a counter that
/// goes back, after a resume, starts a new run).
pub async fn metrics_json(
    State(svc): State<AppState>,
    signed: Signed,
    Path(id): Path<String>,
) -> Response {
    let m = match svc.metric_samples(&signed.team_id, &id, None, None).await {
        Ok(m) => m,
        Err(e) => return e.into_response(),
    };
    const MIB: f64 = 1024.0 * 1024.0;
    let rate = |pick: fn(&alcove_store::MetricSample) -> u64| -> Vec<f64> {
        let mut out = Vec::with_capacity(m.len());
        for (i, x) in m.iter().enumerate() {
            let r = match i.checked_sub(1).map(|j| &m[j]) {
                Some(prev) if pick(x) >= pick(prev) && x.at > prev.at => {
                    (pick(x) - pick(prev)) as f64 * 1000.0 / (x.at - prev.at) as f64
                }
                _ => 0.0,
            };
            out.push(r);
        }
        out
    };
    json(serde_json::json!({
        "t": m.iter().map(|x| x.at / 1000).collect::<Vec<_>>(),
        "cpu": m.iter().map(|x| x.cpu_used_pct).collect::<Vec<_>>(),
        "mem": m.iter().map(|x| x.mem_used as f64 / MIB).collect::<Vec<_>>(),
        "memTotal": m.iter().map(|x| x.mem_total as f64 / MIB).collect::<Vec<_>>(),
        "netOut": rate(|x| x.net_tx),
        "netIn": rate(|x| x.net_rx),
    }))
}

/// A JSON answer for the page's scripts, with the dashboard's headers.
pub fn json(v: serde_json::Value) -> Response {
    let mut res = Json(v).into_response();
    super::secure_headers(res.headers_mut());
    res
}

#[derive(Deserialize)]
pub struct ActionForm {
    #[serde(default)]
    csrf: String,
    /// Seconds, for extend and fork.
    #[serde(default)]
    timeout: String,
    /// Snapshot name.
    #[serde(default)]
    name: String,
    /// Fork count.
    #[serde(default)]
    count: String,
    /// Where to go afterwards: the list or the sandbox's page.
    #[serde(default)]
    back: String,
}

pub async fn action(
    State(svc): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Path((id, what)): Path<(String, String)>,
    Form(form): Form<ActionForm>,
) -> Response {
    let page_of = format!("/dashboard/sandboxes/{id}");
    let back = if form.back == "list" {
        "/dashboard/sandboxes".to_owned()
    } else {
        page_of.clone()
    };
    if let Some(res) = signed.refuse(&headers, &form.csrf) {
        return res;
    }
    let team = signed.team_id.as_str();
    let result: Result<(String, String), ApiError> = async {
        match what.as_str() {
            "kill" => {
                svc.kill(team, &id, "killed from the dashboard").await?;
                Ok(("/dashboard/sandboxes".to_owned(), format!("Killed {id}.")))
            }
            "pause" => {
                svc.pause(team, &id, None).await?;
                Ok((back.clone(), format!("Paused {id}.")))
            }
            "resume" => {
                let t = parse_secs(&form.timeout, "the timeout")?;
                svc.resume(team, &id, t, None, true).await?;
                Ok((back.clone(), format!("Resumed {id}.")))
            }
            "timeout" => {
                let Some(t) = parse_secs(&form.timeout, "the timeout")? else {
                    return Err(ApiError::InvalidBody {
                        detail: "give the new timeout in seconds from now".into(),
                    });
                };
                svc.set_timeout(team, &id, t).await?;
                Ok((back.clone(), format!("{id} now ends {t} s from now.")))
            }
            "snapshot" => {
                let name = Some(form.name.trim().to_owned()).filter(|n| !n.is_empty());
                let s = svc.create_snapshot(team, &id, name, None).await?;
                Ok((back.clone(), format!("Snapshot {} taken.", s.snapshot_id)))
            }
            "fork" => {
                let t = parse_secs(&form.timeout, "the timeout")?;
                let n = parse_secs(&form.count, "the count")?;
                let r = svc.fork(team, &id, t, n).await?;
                let ids: Vec<String> = r
                    .children
                    .iter()
                    .filter_map(|c| c.sandbox.as_ref().map(|s| s.sandbox_id.clone()))
                    .collect();
                let failed = r.children.len() - ids.len();
                let mut msg = format!("Forked {id} into {}.", ids.join(", "));
                if failed > 0 {
                    msg.push_str(&format!(" {failed} fork(s) failed."));
                }
                Ok((back.clone(), msg))
            }
            other => Err(ApiError::InvalidBody {
                detail: format!("there is no sandbox action `{other}`"),
            }),
        }
    }
    .await;
    match result {
        Ok((to, msg)) => done(&to, &msg),
        Err(e) => api_error_page(e, &page_of, &signed),
    }
}

#[derive(Deserialize)]
pub struct NetworkForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    allow_out: String,
    #[serde(default)]
    deny_out: String,
    #[serde(default)]
    rules: String,
}

/// Replaces the sandbox's egress rules (`PUT /sandboxes/{id}/network`), applied at once.
pub async fn network(
    State(svc): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<NetworkForm>,
) -> Response {
    let back = format!("/dashboard/sandboxes/{id}");
    if let Some(res) = signed.refuse(&headers, &form.csrf) {
        return res;
    }
    let lines = |s: &str| -> Vec<String> {
        s.split(['\n', ','])
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let rules = match form.rules.trim() {
        "" => Ok(serde_json::json!({})),
        r => serde_json::from_str::<serde_json::Value>(r).map_err(|e| ApiError::InvalidBody {
            detail: format!("the header rules are not valid JSON: {e}"),
        }),
    };
    let result = match rules {
        Ok(rules) => {
            let body = serde_json::json!({
                "allowOut": lines(&form.allow_out),
                "denyOut": lines(&form.deny_out),
                "rules": rules,
            });
            svc.update_network(&signed.team_id, &id, body).await
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(()) => done(&back, "Egress rules updated."),
        Err(e) => api_error_page(e, &back, &signed),
    }
}

/// For the list's kill buttons, which post only a CSRF token.
pub async fn kill(
    state: State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Response {
    action(
        state,
        signed,
        headers,
        Path((id, "kill".to_owned())),
        Form(ActionForm {
            csrf: form.csrf,
            timeout: String::new(),
            name: String::new(),
            count: String::new(),
            back: "list".into(),
        }),
    )
    .await
}

//! The team's other pages: the checkpoint tree, templates and builds, usage and limits, API
//! keys, and (admin team) the host.

use axum::Form;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use minijinja::context;
use serde::Deserialize;

use super::sandboxes::{done, json};
use super::{Signed, api_error_page, page};
use crate::error::ApiError;
use crate::handlers::AppState;
use crate::models;

#[derive(Deserialize)]
pub struct Notice {
    #[serde(default)]
    done: Option<String>,
}

pub async fn tree(
    State(svc): State<AppState>,
    signed: Signed,
    Query(q): Query<Notice>,
) -> Response {
    let tree = match svc.snapshot_tree(&signed.team_id).await {
        Ok(t) => t,
        Err(e) => return api_error_page(e, "/dashboard/sandboxes", &signed),
    };
    page(
        StatusCode::OK,
        "tree.html",
        context! {
            session => signed.ctx(),
            section => "snapshots",
            notice => q.done.filter(|n| !n.is_empty()),
            roots => minijinja::Value::from_serialize(&tree.roots),
        },
    )
}

#[derive(Deserialize)]
pub struct SnapshotForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    count: String,
}

/// The node `id` and everything under it, children before parents.
fn branch<'a>(
    nodes: &'a [models::SnapshotNode],
    id: &str,
) -> Option<Vec<&'a models::SnapshotNode>> {
    fn walk<'a>(n: &'a models::SnapshotNode, out: &mut Vec<&'a models::SnapshotNode>) {
        for c in &n.children {
            walk(c, out);
        }
        out.push(n);
    }
    for n in nodes {
        if n.snapshot_id == id {
            let mut out = Vec::new();
            walk(n, &mut out);
            return Some(out);
        }
        if let Some(found) = branch(&n.children, id) {
            return Some(found);
        }
    }
    None
}

/// On a tree node: `start` sandboxes from it (`count`, default 1), or `delete` its branch.
pub async fn snapshot_action(
    State(svc): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Path((id, what)): Path<(String, String)>,
    Form(form): Form<SnapshotForm>,
) -> Response {
    let back = "/dashboard/snapshots";
    if let Some(res) = signed.refuse(&headers, &form.csrf) {
        return res;
    }
    let team = signed.team_id.as_str();
    match what.as_str() {
        "start" => {
            let count = match form.count.trim() {
                "" => 1,
                c => match c.parse::<usize>() {
                    Ok(n) if (1..=crate::service::MAX_FORK_COUNT as usize).contains(&n) => n,
                    _ => {
                        return api_error_page(
                            ApiError::InvalidBody {
                                detail: format!(
                                    "start between 1 and {} sandboxes from a node, not `{c}`",
                                    crate::service::MAX_FORK_COUNT
                                ),
                            },
                            back,
                            &signed,
                        );
                    }
                },
            };
            let mut started = Vec::new();
            for _ in 0..count {
                let req = serde_json::from_value::<models::NewSandbox>(
                    serde_json::json!({ "templateID": id }),
                )
                .expect("a template id is a valid create body");
                match svc.create(team, req).await {
                    Ok(s) => started.push(s.sandbox_id),
                    Err(e) if started.is_empty() => return api_error_page(e, back, &signed),
                    Err(e) => {
                        let msg = format!(
                            "Started {} from {id}; the next failed: {}",
                            started.join(", "),
                            e.parts().2
                        );
                        return done(back, &msg);
                    }
                }
            }
            done(back, &format!("Started {} from {id}.", started.join(", ")))
        }
        "delete" => {
            let tree = match svc.snapshot_tree(team).await {
                Ok(t) => t,
                Err(e) => return api_error_page(e, back, &signed),
            };
            let Some(nodes) = branch(&tree.roots, &id) else {
                return api_error_page(
                    ApiError::SnapshotNotFound { snapshot_id: id },
                    back,
                    &signed,
                );
            };
            let ids: Vec<String> = nodes
                .iter()
                .filter(|n| !n.deleted)
                .map(|n| n.snapshot_id.clone())
                .collect();
            for s in &ids {
                if let Err(e) = svc.delete_snapshot(team, s).await {
                    return api_error_page(e, back, &signed);
                }
            }
            done(
                back,
                &format!("Deleted {} snapshot(s): {}.", ids.len(), ids.join(", ")),
            )
        }
        other => api_error_page(
            ApiError::InvalidBody {
                detail: format!("there is no snapshot action `{other}`"),
            },
            back,
            &signed,
        ),
    }
}

pub async fn templates(
    State(svc): State<AppState>,
    signed: Signed,
    Query(q): Query<Notice>,
) -> Response {
    let list = match svc.templates(&signed.team_id).await {
        Ok(l) => l,
        Err(e) => return api_error_page(e, "/dashboard/sandboxes", &signed),
    };
    let mut rows = Vec::new();
    for t in list {
        let own = svc.template(&signed.team_id, &t.template_id).await.ok();
        let tags = svc
            .template_tags(&signed.team_id, &t.template_id)
            .await
            .unwrap_or_default();
        let builds = own.map(|w| w.builds).unwrap_or_default();
        rows.push(context! {
            t => minijinja::Value::from_serialize(&t),
            builds => minijinja::Value::from_serialize(&builds),
            tags => minijinja::Value::from_serialize(&tags),
            own => !t.public,
        });
    }
    page(
        StatusCode::OK,
        "templates.html",
        context! {
            session => signed.ctx(),
            section => "templates",
            notice => q.done.filter(|n| !n.is_empty()),
            templates => rows,
        },
    )
}

#[derive(Deserialize)]
pub struct TagForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    target: String,
    #[serde(default)]
    tags: String,
}

pub async fn tag_template(
    State(svc): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<TagForm>,
) -> Response {
    let back = "/dashboard/templates";
    if let Some(res) = signed.refuse(&headers, &form.csrf) {
        return res;
    }
    let tags: Vec<String> = form
        .tags
        .split([',', ' '])
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect();
    let target = match form.target.trim() {
        "" => id.clone(),
        t => t.to_owned(),
    };
    let req = models::AssignTemplateTagsRequest { target, tags };
    match svc.assign_template_tags(&signed.team_id, req).await {
        Ok(r) => done(
            back,
            &format!("Tagged: {}.", serde_json::to_string(&r).unwrap_or_default()),
        ),
        Err(e) => api_error_page(e, back, &signed),
    }
}

pub async fn delete_template(
    State(svc): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<super::CsrfForm>,
) -> Response {
    let back = "/dashboard/templates";
    if let Some(res) = signed.refuse(&headers, &form.csrf) {
        return res;
    }
    match svc.delete_team_template(&signed.team_id, &id).await {
        Ok(()) => done(back, &format!("Deleted template {id}.")),
        Err(e) => api_error_page(e, back, &signed),
    }
}

#[derive(Deserialize)]
pub struct BuildQuery {
    /// Log lines already shown (the live follow asks for the rest).
    #[serde(default)]
    offset: Option<i64>,
    #[serde(default)]
    json: Option<String>,
}

/// One build: status and logs; `?json=1&offset=N` is the page's live follow.
pub async fn build(
    State(svc): State<AppState>,
    signed: Signed,
    Path((tid, bid)): Path<(String, String)>,
    Query(q): Query<BuildQuery>,
) -> Response {
    let info = match svc
        .template_build_status(&signed.team_id, &tid, &bid, q.offset, Some(1000), None)
        .await
    {
        Ok(i) => i,
        Err(e) if q.json.is_some() => return e.into_response(),
        Err(e) => return api_error_page(e, "/dashboard/templates", &signed),
    };
    let lines: Vec<serde_json::Value> = info
        .log_entries
        .iter()
        .map(|l| {
            serde_json::json!({
                "at": l.timestamp, "level": l.level, "step": l.step, "message": l.message,
            })
        })
        .collect();
    let finished = matches!(info.status.as_str(), "ready" | "error" | "failed");
    if q.json.is_some() {
        return json(serde_json::json!({
            "status": info.status,
            "reason": info.reason,
            "lines": lines,
            "finished": finished,
        }));
    }
    page(
        StatusCode::OK,
        "build.html",
        context! {
            session => signed.ctx(),
            section => "templates",
            template_id => tid,
            build_id => bid,
            status => info.status,
            reason => minijinja::Value::from_serialize(&info.reason),
            lines => lines,
            finished => finished,
        },
    )
}

const DAY_MS: i64 = 86_400_000;

pub async fn usage(State(svc): State<AppState>, signed: Signed) -> Response {
    let back = "/dashboard/sandboxes";
    let now = alcove_store::now_ms();
    let start = now - 30 * DAY_MS;
    let team = signed.team_id.as_str();
    let by_day = svc
        .usage(team, None, start, now, alcove_store::UsageGroup::Day)
        .await;
    let by_template = svc
        .usage(team, None, start, now, alcove_store::UsageGroup::Template)
        .await;
    let limits = svc.team_limits_view(team, team).await;
    let (by_day, by_template, limits) = match (by_day, by_template, limits) {
        (Ok(a), Ok(b), Ok(c)) => (a, b, c),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            return api_error_page(e, back, &signed);
        }
    };
    // The chart's series: one point per day of the window, zero where nothing ran.
    let mut days = Vec::new();
    let mut cost = Vec::new();
    let mut vcpu_h = Vec::new();
    let first = start - start.rem_euclid(DAY_MS);
    for i in 0..=30 {
        let t = first + i * DAY_MS;
        let key = alcove_store::day_name(t.div_euclid(DAY_MS));
        let item = by_day.items.iter().find(|it| it.key == key);
        days.push(t / 1000);
        cost.push(item.map(|it| it.totals.cost_usd).unwrap_or(0.0));
        vcpu_h.push(
            item.map(|it| it.totals.vcpu_seconds / 3600.0)
                .unwrap_or(0.0),
        );
    }
    let chart = serde_json::json!({ "t": days, "cost": cost, "vcpuHours": vcpu_h });
    // How close the team is to each limit.
    let e = &limits.effective;
    let gauges = serde_json::json!([
        gauge(
            "Running sandboxes",
            limits.running as f64,
            Some(e.max_running as f64),
            ""
        ),
        gauge(
            "Paused sandboxes",
            limits.paused as f64,
            Some(e.max_paused as f64),
            ""
        ),
        gauge(
            "Spend this month",
            limits.month_spend_usd,
            limits.monthly_spend_cap_usd,
            "USD"
        ),
    ]);
    page(
        StatusCode::OK,
        "usage.html",
        context! {
            session => signed.ctx(),
            section => "usage",
            chart => chart,
            by_day => minijinja::Value::from_serialize(&by_day),
            by_template => minijinja::Value::from_serialize(&by_template),
            limits => minijinja::Value::from_serialize(&limits),
            gauges => gauges,
        },
    )
}

/// A limit and the use of it; `pct` past 80 is a warning on the page.
fn gauge(name: &str, used: f64, max: Option<f64>, unit: &str) -> serde_json::Value {
    let max = max.filter(|m| *m > 0.0 && *m < 1e12);
    let pct = max.map(|m| (used / m * 100.0).min(999.0));
    serde_json::json!({
        "name": name, "used": used, "max": max, "unit": unit, "pct": pct,
        "warn": pct.is_some_and(|p| p >= 80.0),
    })
}

/// The team's keys; after a create, the new secret, shown this once.
async fn keys_page(
    svc: &AppState,
    signed: &Signed,
    secret: Option<(String, String)>,
    notice: Option<String>,
) -> Response {
    let team = signed.team_id.clone();
    let keys = match svc.db(move |s| s.list_api_keys(Some(&team))).await {
        Ok(k) => k,
        Err(e) => return api_error_page(e.into(), "/dashboard/sandboxes", signed),
    };
    let rows: Vec<serde_json::Value> = keys
        .iter()
        .map(|k| {
            serde_json::json!({
                "id": k.id, "name": k.name, "prefix": k.prefix,
                "created": ms_text(Some(k.created_at)),
                "last_used": ms_text(k.last_used_at),
                "revoked": ms_text(k.revoked_at),
                "live": k.revoked_at.is_none(),
                "this_session": k.id == signed.key_id,
            })
        })
        .collect();
    page(
        StatusCode::OK,
        "keys.html",
        context! {
            session => signed.ctx(),
            section => "keys",
            notice => notice,
            keys => rows,
            new_secret => secret.map(|(name, s)| context! { name, secret => s }),
        },
    )
}

fn ms_text(ms: Option<i64>) -> Option<String> {
    ms.map(crate::models::rfc3339)
}

pub async fn keys(
    State(svc): State<AppState>,
    signed: Signed,
    Query(q): Query<Notice>,
) -> Response {
    keys_page(&svc, &signed, None, q.done.filter(|n| !n.is_empty())).await
}

#[derive(Deserialize)]
pub struct KeyForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
}

pub async fn create_key(
    State(svc): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Form(form): Form<KeyForm>,
) -> Response {
    if let Some(res) = signed.refuse(&headers, &form.csrf) {
        return res;
    }
    let name = form.name.trim().to_owned();
    if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
        return api_error_page(
            ApiError::InvalidBody {
                detail: "name the key (1 to 64 characters), for example the agent or machine \
                         that will use it"
                    .into(),
            },
            "/dashboard/keys",
            &signed,
        );
    }
    let team = signed.team_id.clone();
    let n = name.clone();
    match svc.db(move |s| s.create_api_key(&team, &n)).await {
        Ok(k) => keys_page(&svc, &signed, Some((name, k.secret)), None).await,
        Err(e) => api_error_page(e.into(), "/dashboard/keys", &signed),
    }
}

pub async fn revoke_key(
    State(svc): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Path(key_id): Path<String>,
    Form(form): Form<super::CsrfForm>,
) -> Response {
    let back = "/dashboard/keys";
    if let Some(res) = signed.refuse(&headers, &form.csrf) {
        return res;
    }
    // Only the team's own keys: another team's id is "not found" like a wrong one.
    let team = signed.team_id.clone();
    let id = key_id.clone();
    let revoked = svc
        .db(move |s| {
            let own = s
                .list_api_keys(Some(&team))?
                .into_iter()
                .any(|k| k.id == id && k.revoked_at.is_none());
            if own {
                s.revoke_api_key(&id)
            } else {
                Ok(false)
            }
        })
        .await;
    match revoked {
        Ok(true) => done(
            back,
            &format!("Revoked key {key_id}; its sessions have ended."),
        ),
        Ok(false) => api_error_page(
            ApiError::InvalidBody {
                detail: format!("this team has no live key {key_id}"),
            },
            back,
            &signed,
        ),
        Err(e) => api_error_page(e.into(), back, &signed),
    }
}

/// The host (admin team only): accelerator and why, capacity, warm pools.
pub async fn host(State(svc): State<AppState>, signed: Signed) -> Response {
    let back = "/dashboard/sandboxes";
    match svc.is_admin(&signed.team_id).await {
        Ok(true) => {}
        Ok(false) => {
            return api_error_page(
                ApiError::InvalidBody {
                    detail: "the host page is for the admin team; sign in with one of its keys"
                        .into(),
                },
                back,
                &signed,
            );
        }
        Err(e) => return api_error_page(e, back, &signed),
    }
    let pools = svc.warm_pool().await.unwrap_or_default();
    let host = svc.backend().host_info();
    let running = svc.active_sandboxes().await;
    page(
        StatusCode::OK,
        "host.html",
        context! {
            session => signed.ctx(),
            section => "host",
            pools => minijinja::Value::from_serialize(&pools),
            host => minijinja::Value::from_serialize(&host),
            running => running,
        },
    )
}

//! The web dashboard at `/dashboard`, served by the API's own listener.
//!
//! Stack: server-rendered HTML (minijinja templates embedded in the binary, HTML-escaped by
//! default) over the same [`Service`] calls the REST API makes, so a page shows exactly what the
//! API would answer and a team sees only its own things. List pages and actions are plain links
//! and forms: they work without JavaScript and by keyboard.
//!
//! Sign-in takes an API key and opens a session (`alcove_store::DashboardSession`): the cookie
//! holds a random token (`HttpOnly`, `SameSite=Strict`, `Secure` over TLS, path `/dashboard`),
//! the store keeps its hash. Every state-changing form carries the session's CSRF token, and a
//! request whose `Origin` is another site is refused before anything else. A session ends when
//! it expires, when its key is revoked (the next page says which), or on sign-out.

use std::sync::LazyLock;

use alcove_store::SessionState;
use axum::Form;
use axum::Router;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use minijinja::{Environment, context};
use serde::Deserialize;

use crate::error::ApiError;
use crate::handlers::AppState;

mod assets;
mod envd;
mod files;
mod pages;
mod sandboxes;
mod terminal;

/// The session cookie's name.
const COOKIE: &str = "alcove_session";
/// How long a sign-in lasts.
const SESSION_TTL_MS: i64 = 12 * 3600 * 1000;
/// Sandboxes shown on one list page.
pub(super) const LIST_LIMIT: usize = 1000;

static TEMPLATES: LazyLock<Environment<'static>> = LazyLock::new(|| {
    let mut env = Environment::new();
    for (name, src) in [
        ("base.html", include_str!("templates/base.html")),
        ("signin.html", include_str!("templates/signin.html")),
        ("error.html", include_str!("templates/error.html")),
        ("sandboxes.html", include_str!("templates/sandboxes.html")),
        ("sandbox.html", include_str!("templates/sandbox.html")),
        ("files.html", include_str!("templates/files.html")),
        ("tree.html", include_str!("templates/tree.html")),
        ("templates.html", include_str!("templates/templates.html")),
        ("build.html", include_str!("templates/build.html")),
        ("usage.html", include_str!("templates/usage.html")),
        ("keys.html", include_str!("templates/keys.html")),
        ("host.html", include_str!("templates/host.html")),
    ] {
        env.add_template(name, src)
            .expect("dashboard template parses");
    }
    env
});

/// The dashboard's routes, merged into the API's router.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/dashboard",
            get(|| async { Redirect::to("/dashboard/sandboxes") }),
        )
        .route(
            "/dashboard/",
            get(|| async { Redirect::to("/dashboard/sandboxes") }),
        )
        .route("/dashboard/assets/{name}", get(assets::asset))
        .route("/dashboard/signin", get(signin_page).post(signin))
        .route("/dashboard/signout", post(signout))
        .route(
            "/dashboard/sandboxes",
            get(sandboxes::list).post(sandboxes::create),
        )
        .route("/dashboard/sandboxes/{sandboxID}", get(sandboxes::detail))
        .route(
            "/dashboard/sandboxes/{sandboxID}/kill",
            post(sandboxes::kill),
        )
        .route(
            "/dashboard/sandboxes/{sandboxID}/do/{action}",
            post(sandboxes::action),
        )
        .route(
            "/dashboard/sandboxes/{sandboxID}/network",
            post(sandboxes::network),
        )
        .route(
            "/dashboard/sandboxes/{sandboxID}/events.json",
            get(sandboxes::events_json),
        )
        .route(
            "/dashboard/sandboxes/{sandboxID}/metrics.json",
            get(sandboxes::metrics_json),
        )
        .route(
            "/dashboard/sandboxes/{sandboxID}/terminal",
            get(terminal::terminal),
        )
        .route(
            "/dashboard/sandboxes/{sandboxID}/files",
            get(files::list).post(files::upload),
        )
        .route(
            "/dashboard/sandboxes/{sandboxID}/download",
            get(files::download),
        )
        .route("/dashboard/snapshots", get(pages::tree))
        .route(
            "/dashboard/snapshots/{snapshotID}/do/{action}",
            post(pages::snapshot_action),
        )
        .route("/dashboard/templates", get(pages::templates))
        .route(
            "/dashboard/templates/{templateID}/delete",
            post(pages::delete_template),
        )
        .route(
            "/dashboard/templates/{templateID}/tags",
            post(pages::tag_template),
        )
        .route(
            "/dashboard/templates/{templateID}/builds/{buildID}",
            get(pages::build),
        )
        .route("/dashboard/usage", get(pages::usage))
        .route("/dashboard/keys", get(pages::keys).post(pages::create_key))
        .route("/dashboard/keys/{keyID}/revoke", post(pages::revoke_key))
        .route("/dashboard/host", get(pages::host))
        .layer(axum::middleware::map_request(host_from_authority))
}

/// HTTP/2 carries the host in the `:authority` pseudo-header, not `Host`; the Origin check
/// compares with `Host`, so it is filled in from the request's authority when absent.
async fn host_from_authority(mut req: axum::extract::Request) -> axum::extract::Request {
    if !req.headers().contains_key(header::HOST)
        && let Some(v) = req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        req.headers_mut().insert(header::HOST, v);
    }
    req
}

/// A page: HTML with the headers every dashboard answer carries (no framing, no sniffing, no
/// caching, scripts and styles from this server only).
pub(super) fn page(status: StatusCode, name: &str, ctx: minijinja::Value) -> Response {
    match TEMPLATES.get_template(name).and_then(|t| t.render(ctx)) {
        Ok(html) => {
            let mut res = (status, html).into_response();
            let h = res.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            secure_headers(h);
            res
        }
        Err(e) => ApiError::internal(e).into_response(),
    }
}

/// Scripts, connections and images from this server only. Styles may also be set inline:
/// xterm.js writes `<style>` elements for its cell grid (scripts stay strict).
pub(super) const CSP: &str = "default-src 'self'; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; \
                   form-action 'self'; base-uri 'none'";

pub(super) fn secure_headers(h: &mut HeaderMap) {
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

/// The session cookie's value, if the request has one.
pub(super) fn session_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
        .filter(|v| !v.is_empty() && v.len() <= 128)
}

/// Whether the request came over the listener's TLS (the cookie is then `Secure`).
pub(super) fn over_tls(parts_ext: &http::Extensions) -> bool {
    parts_ext.get::<crate::proxy::OverTls>().is_some()
}

fn set_cookie(token: &str, secure: bool, max_age: i64) -> HeaderValue {
    let v = format!(
        "{COOKIE}={token}; Path=/dashboard; HttpOnly; SameSite=Strict; Max-Age={max_age}{}",
        if secure { "; Secure" } else { "" }
    );
    HeaderValue::from_str(&v).expect("cookie is ASCII")
}

/// A request from another site (its `Origin` names another host) is refused: with
/// `SameSite=Strict` it carries no session anyway, and sign-in must not be forced either.
pub(super) fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        // Browsers send Origin on every cross-site POST; without it, it is not one.
        return true;
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin_host = origin
        .split_once("://")
        .map(|(_, rest)| rest.trim_end_matches('/'));
    matches!((origin_host, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
}

/// The signed-in team, from the session cookie. Without a valid session the request is sent
/// to the sign-in page; an ended one says why there.
pub struct Signed {
    pub(super) team_id: String,
    pub(super) key_id: String,
    csrf: String,
    admin: bool,
}

impl FromRequestParts<AppState> for Signed {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, svc: &AppState) -> Result<Self, Response> {
        let Some(token) = session_token(&parts.headers) else {
            return Err(Redirect::to("/dashboard/signin").into_response());
        };
        let state = svc
            .db(move |s| s.dashboard_session(&token))
            .await
            .map_err(|e| ApiError::from(e).into_response())?;
        let why = match state {
            SessionState::Open(s) => {
                let admin = svc.is_admin(&s.team_id).await.unwrap_or(false);
                return Ok(Signed {
                    admin,
                    key_id: s.key_id,
                    team_id: s.team_id,
                    csrf: s.csrf,
                });
            }
            SessionState::Unknown => return Err(Redirect::to("/dashboard/signin").into_response()),
            SessionState::Expired => {
                "Your session expired (sessions last 12 hours). Sign in again with your API key."
            }
            SessionState::KeyRevoked => {
                "Your session ended: the API key it was opened with has been revoked. Sign in \
                 with a key that is still valid (`alcove keys list` shows them)."
            }
        };
        let mut res = page(
            StatusCode::UNAUTHORIZED,
            "signin.html",
            context! { error => why },
        );
        res.headers_mut().insert(
            header::SET_COOKIE,
            set_cookie("", over_tls(&parts.extensions), 0),
        );
        Err(res)
    }
}

impl Signed {
    pub(super) fn ctx(&self) -> minijinja::Value {
        context! { team => self.team_id, csrf => self.csrf, admin => self.admin }
    }

    /// The refusal of a form that does not carry this session's CSRF token, or comes from
    /// another site; `None` lets it through.
    pub(super) fn refuse(&self, headers: &HeaderMap, form_csrf: &str) -> Option<Response> {
        let ok = same_origin(headers)
            && form_csrf.len() == self.csrf.len()
            && form_csrf
                .bytes()
                .zip(self.csrf.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if ok {
            return None;
        }
        Some(error_page(
            StatusCode::FORBIDDEN,
            "Request refused",
            "This form was not sent from this dashboard's own page (its CSRF token is missing or \
             stale, or it came from another site), so nothing was done. Reload the page and \
             try again.",
            "/dashboard/sandboxes",
            Some(self),
        ))
    }
}

pub(super) fn error_page(
    status: StatusCode,
    heading: &str,
    message: &str,
    back: &str,
    signed: Option<&Signed>,
) -> Response {
    page(
        status,
        "error.html",
        context! {
            heading, message, back,
            session => signed.map(Signed::ctx),
        },
    )
}

/// An API error as a page: its status and its message (what to do), never internals.
pub(super) fn api_error_page(e: ApiError, back: &str, signed: &Signed) -> Response {
    let (status, code, message) = e.parts();
    error_page(status, code, &message, back, Some(signed))
}

#[derive(Deserialize)]
pub(super) struct CsrfForm {
    #[serde(default)]
    pub(super) csrf: String,
}

#[derive(Deserialize)]
struct SigninForm {
    #[serde(default)]
    api_key: String,
}

async fn signin_page(headers: HeaderMap, State(svc): State<AppState>) -> Response {
    // Already signed in: straight to the list.
    if let Some(token) = session_token(&headers)
        && let Ok(SessionState::Open(_)) = svc.db(move |s| s.dashboard_session(&token)).await
    {
        return Redirect::to("/dashboard/sandboxes").into_response();
    }
    page(StatusCode::OK, "signin.html", context! {})
}

async fn signin(
    State(svc): State<AppState>,
    headers: HeaderMap,
    ext: http::Extensions,
    Form(form): Form<SigninForm>,
) -> Response {
    if !same_origin(&headers) {
        return error_page(
            StatusCode::FORBIDDEN,
            "Request refused",
            "A sign-in from another site was refused. Sign in from this dashboard's own page.",
            "/dashboard/signin",
            None,
        );
    }
    let key = form.api_key.trim().to_owned();
    let auth = if key.is_empty() || key.len() > 256 {
        Err(ApiError::InvalidApiKey)
    } else {
        svc.authenticate(&key).await
    };
    let auth = match auth {
        Ok(a) => a,
        Err(ApiError::InvalidApiKey) => {
            return page(
                StatusCode::UNAUTHORIZED,
                "signin.html",
                context! { error => "That API key is not valid: it was mistyped or revoked. \
                The server's first key is in <data-dir>/api-key; `alcove keys create` makes \
                more." },
            );
        }
        Err(e) => return e.into_response(),
    };
    let opened = svc
        .db(move |s| s.open_dashboard_session(&auth.team_id, &auth.key_id, SESSION_TTL_MS))
        .await;
    match opened {
        Ok((token, _)) => {
            let mut res = Redirect::to("/dashboard/sandboxes").into_response();
            res.headers_mut().insert(
                header::SET_COOKIE,
                set_cookie(&token, over_tls(&ext), SESSION_TTL_MS / 1000),
            );
            res
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

async fn signout(
    State(svc): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    ext: http::Extensions,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Some(res) = signed.refuse(&headers, &form.csrf) {
        return res;
    }
    if let Some(token) = session_token(&headers)
        && let Err(e) = svc.db(move |s| s.close_dashboard_session(&token)).await
    {
        return ApiError::from(e).into_response();
    }
    let mut res = Redirect::to("/dashboard/signin").into_response();
    res.headers_mut()
        .insert(header::SET_COOKIE, set_cookie("", over_tls(&ext), 0));
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_parse_and_escape_what_callers_wrote() {
        let rows = vec![sandboxes::Row {
            id: "s1".into(),
            template: "<b>t</b>".into(),
            state: "running".into(),
            started_at: "x".into(),
            end_at: "y".into(),
            cpu: 1,
            memory_mb: 2,
            metadata: [("k".to_owned(), "<script>alert(1)</script>".to_owned())].into(),
            live: true,
            cost: Some(0.5),
        }];
        let html = TEMPLATES
            .get_template("sandboxes.html")
            .unwrap()
            .render(context! {
                session => context! { team => "t", csrf => "c" },
                sandboxes => rows, states => [("running", "running")], templates => ["base"],
                filter => context! { state => "running", template => "\"><script>", metadata => "" },
            })
            .unwrap();
        assert!(!html.contains("<script>"), "{html}");
        assert!(
            html.contains("&lt;script&gt;alert(1)&lt;&#x2f;script&gt;"),
            "{html}"
        );
        assert!(html.contains("&lt;b&gt;t&lt;&#x2f;b&gt;"), "{html}");
    }

    #[test]
    fn only_this_sites_origin_passes() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:3000"));
        assert!(same_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:3000"),
        );
        assert!(same_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(!same_origin(&h));
        h.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(!same_origin(&h));
    }

    #[test]
    fn the_cookie_is_scoped_and_not_readable_by_scripts() {
        let c = set_cookie("abc", true, 60);
        let c = c.to_str().unwrap();
        for part in [
            "alcove_session=abc",
            "Path=/dashboard",
            "HttpOnly",
            "SameSite=Strict",
            "Secure",
            "Max-Age=60",
        ] {
            assert!(c.contains(part), "{c}");
        }
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; alcove_session=tok; b=2"),
        );
        assert_eq!(session_token(&h).as_deref(), Some("tok"));
    }
}

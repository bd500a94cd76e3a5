//! Sandbox traffic on the API's own listener.
//!
//! A request is for a sandbox when it carries `E2b-Sandbox-Id` (and `E2b-Sandbox-Port`, default
//! the agent's 49983) — what the SDKs send when `E2B_SANDBOX_URL` is set — or when its host is
//! `<port>-<sandboxID>.<domain>`. Everything else is the REST API. Sandbox requests are streamed
//! through [`SandboxBackend::forward`](crate::backend::SandboxBackend::forward) untouched apart
//! from the routing, credential and hop-by-hop headers.
//!
//! Access, decided before anything else happens (before an autoResume sandbox is woken):
//! - The platform's ports ([`PLATFORM_PORTS`]: envd, the code interpreter) need the sandbox's
//!   envd access token in `X-Access-Token` when the sandbox has one. Exceptions, each because an
//!   official SDK sends no token there: `GET /health`; on envd a valid v1 URL signature
//!   (`/files?signature=...`, the SDKs' upload and download URLs); on the code interpreter its
//!   context management (`/contexts...`, which runs no code). A token that is sent must be right.
//! - Other ports are open to whoever knows the sandbox id, as in E2B, unless the sandbox was
//!   created with `network.allowPublicTraffic: false`: then they (and the code interpreter) need
//!   its traffic access token in `e2b-traffic-access-token` (403 otherwise).
//!
//! Credentials of the control plane never reach the guest: `X-API-KEY` and a Bearer
//! `Authorization` are removed (a Basic `Authorization` is envd's way of naming the user and is
//! kept), as are the traffic token and, on user ports, `X-Access-Token`. The one exception is the
//! MCP gateway's port ([`MCP_GATEWAY_PORT`]): there the Bearer is the gateway's own token (the
//! SDK's `get_mcp_token()`), which the gateway checks, so it goes through. That port is otherwise
//! a user port: open as the others are, the gateway enforcing its token.
//!
//! Every proxied request holds a stream permit until its response body ends
//! ([`crate::config::ConnectionLimits`]: per sandbox and in total); past the cap it gets 429.
//!
//! Upgrades (WebSocket): the `Upgrade`/`Connection: upgrade` pair survives the hop-by-hop strip
//! on the request and on a 101 answer; the backend joins both upgraded connections.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use http::{HeaderName, Method, Uri};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};

use alcove_store::SandboxState;

use crate::backend::{BackendOp, CODE_INTERPRETER_PORT, ENVD_PORT};
use crate::error::ApiError;
use crate::handlers::{AppState, query_pairs};
use crate::metrics::{METRICS, Metrics};
use crate::service::ProxyTarget;
use crate::service::api_error;
pub use alcove_guest_contract::MCP_GATEWAY_PORT;

const SANDBOX_ID_HEADER: &str = "e2b-sandbox-id";
const SANDBOX_PORT_HEADER: &str = "e2b-sandbox-port";
const ACCESS_TOKEN_HEADER: &str = "x-access-token";
/// E2B's header for sandboxes created with `network.allowPublicTraffic: false`.
const TRAFFIC_TOKEN_HEADER: &str = "e2b-traffic-access-token";
const API_KEY_HEADER: &str = "x-api-key";
const FORWARDED_PROTO_HEADER: &str = "x-forwarded-proto";

/// A request extension: the request came over the listener's TLS.
#[derive(Clone, Copy, Debug)]
pub struct OverTls;

/// The ports the platform itself serves in a guest. Each needs the sandbox's envd access token
/// (see the module docs for the few requests the SDKs send without it); other ports are the
/// user's. A new platform service (desktop stream, MCP) adds its port here.
pub const PLATFORM_PORTS: &[u16] = &[ENVD_PORT, CODE_INTERPRETER_PORT];

/// Where a request should go, if it is sandbox traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub sandbox_id: String,
    pub port: u16,
}

/// Decides whether a request is sandbox traffic. `domain` is the configured sandbox domain.
pub fn route_of(req: &http::request::Parts, domain: &str) -> Result<Option<Route>, ApiError> {
    if let Some(id) = req.headers.get(SANDBOX_ID_HEADER) {
        let id = id
            .to_str()
            .ok()
            .filter(|s| valid_id(s))
            .ok_or_else(|| ApiError::BadRouting {
                detail: "E2b-Sandbox-Id must be a sandbox id (letters and digits)".into(),
            })?;
        let port = match req.headers.get(SANDBOX_PORT_HEADER) {
            None => ENVD_PORT,
            Some(p) => p
                .to_str()
                .ok()
                .and_then(|p| p.trim().parse::<u16>().ok())
                .filter(|p| *p != 0)
                .ok_or_else(|| ApiError::BadRouting {
                    detail: "E2b-Sandbox-Port must be a port number (1-65535)".into(),
                })?,
        };
        return Ok(Some(Route {
            sandbox_id: id.to_owned(),
            port,
        }));
    }
    let host = req.uri.authority().map(|a| a.as_str()).or_else(|| {
        req.headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
    });
    Ok(host.and_then(|h| route_from_host(h, domain)))
}

/// `<port>-<sandboxID>.<domain>`, with or without the listener's port on either side.
pub fn route_from_host(host: &str, domain: &str) -> Option<Route> {
    let host = host.to_ascii_lowercase();
    let domain = domain.to_ascii_lowercase();
    let strip_port = |s: &str| {
        s.rsplit_once(':')
            .map_or(s.to_owned(), |(h, _)| h.to_owned())
    };
    let label = host
        .strip_suffix(&format!(".{domain}"))
        .map(str::to_owned)
        .or_else(|| {
            strip_port(&host)
                .strip_suffix(&format!(".{}", strip_port(&domain)))
                .map(str::to_owned)
        })?;
    if label.contains('.') {
        return None;
    }
    let (port, id) = label.split_once('-')?;
    let port = port.parse::<u16>().ok().filter(|p| *p != 0)?;
    valid_id(id).then(|| Route {
        sandbox_id: id.to_owned(),
        port,
    })
}

fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// What the proxy middleware needs: the service and the stream caps.
#[derive(Clone)]
pub struct ProxyState {
    pub svc: AppState,
    pub streams: Arc<Streams>,
}

impl ProxyState {
    pub fn new(svc: AppState) -> Self {
        let c = &svc.limits().connections;
        let streams = Arc::new(Streams::new(
            c.max_proxied_streams,
            c.max_proxied_streams_per_sandbox,
        ));
        ProxyState { svc, streams }
    }
}

/// Outermost middleware: sandbox traffic goes to the proxy, the rest to the REST router.
pub async fn dispatch(State(st): State<ProxyState>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    match route_of(&parts, st.svc.domain()) {
        Ok(None) => next.run(Request::from_parts(parts, body)).await,
        Ok(Some(route)) => {
            Metrics::inc(&METRICS.proxy_requests);
            let result = match admit(&st, &route, &parts).await {
                Ok(admitted) => proxy(&st, route, admitted, parts, body).await,
                Err(e) => {
                    drain_refused(body).await;
                    Err(e)
                }
            };
            match result {
                Ok(resp) => resp,
                Err(e) => {
                    Metrics::inc(&METRICS.proxy_failures);
                    e.into_response()
                }
            }
        }
        Err(e) => {
            Metrics::inc(&METRICS.proxy_failures);
            drain_refused(body).await;
            e.into_response()
        }
    }
}

/// The most of a refused request's body read before answering.
const DRAIN_LIMIT: usize = 1 << 20;
/// How long a refused request's body is read before answering.
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// Reads (and drops) the body of a request refused before it was forwarded, bounded in size
/// and time. Answering while a streaming client is still writing closes a connection with
/// unread bytes, and the client sees a broken pipe instead of the error it was sent.
async fn drain_refused(body: Body) {
    let _ = tokio::time::timeout(DRAIN_TIME, axum::body::to_bytes(body, DRAIN_LIMIT)).await;
}

/// Whether `req` may reach `port` of a sandbox with these tokens. Checked before the sandbox
/// is woken or reached in any way.
fn check_access(
    req: &http::request::Parts,
    sandbox_id: &str,
    port: u16,
    t: &ProxyTarget,
) -> Result<(), ApiError> {
    // The agent's volume session is the host's own: no caller may open (and so take over) it.
    if port == ENVD_PORT && req.uri.path().starts_with(alcove_volume::wire::PATH) {
        return Err(ApiError::RouteNotFound);
    }
    if PLATFORM_PORTS.contains(&port)
        && let Some(token) = &t.envd_access_token
        && !platform_request_authorized(req, port, token)
    {
        return Err(ApiError::AccessTokenRejected {
            sandbox_id: sandbox_id.to_owned(),
        });
    }
    if port != ENVD_PORT
        && let Some(token) = &t.traffic_access_token
        && !req
            .headers
            .get(TRAFFIC_TOKEN_HEADER)
            .is_some_and(|v| constant_time_eq(v.as_bytes(), token.as_bytes()))
    {
        return Err(ApiError::TrafficTokenRejected {
            sandbox_id: sandbox_id.to_owned(),
            port,
        });
    }
    Ok(())
}

/// A request the proxy admitted: its sandbox's target (running) and its stream permit.
struct Admitted {
    target: ProxyTarget,
    permit: StreamPermit,
}

/// Everything checked before a request is forwarded: the sandbox is there (and resumed if it
/// auto-resumes), the caller may reach the port, and the stream caps have room.
async fn admit(
    st: &ProxyState,
    route: &Route,
    req: &http::request::Parts,
) -> Result<Admitted, ApiError> {
    let svc = &st.svc;
    let Route { sandbox_id, port } = route.clone();
    let Some(target) = svc.proxy_target(&sandbox_id).await? else {
        return Err(ApiError::SandboxGone { sandbox_id });
    };
    if !matches!(
        target.state,
        SandboxState::Running | SandboxState::Paused | SandboxState::Creating
    ) {
        return Err(ApiError::SandboxGone { sandbox_id });
    }
    check_access(req, &sandbox_id, port, &target)?;
    let mut target = target;
    // A paused sandbox created with autoResume comes back for its (authorized) traffic.
    if target.state == SandboxState::Paused && svc.resume_for_traffic(&sandbox_id).await? {
        target = svc
            .proxy_target(&sandbox_id)
            .await?
            .ok_or_else(|| ApiError::SandboxGone {
                sandbox_id: sandbox_id.clone(),
            })?;
    }
    match target.state {
        SandboxState::Running => {}
        SandboxState::Creating => return Err(ApiError::PortNotOpen { sandbox_id, port }),
        _ => return Err(ApiError::SandboxGone { sandbox_id }),
    }
    let permit = st.streams.acquire(&sandbox_id)?;
    Ok(Admitted { target, permit })
}

async fn proxy(
    st: &ProxyState,
    route: Route,
    admitted: Admitted,
    mut parts: http::request::Parts,
    body: Body,
) -> Result<Response, ApiError> {
    let svc = &st.svc;
    let Route { sandbox_id, port } = route;
    let Admitted { target, permit } = admitted;
    strip_credentials(&mut parts.headers, port);
    // An upgrade (WebSocket) keeps its Upgrade/Connection pair: the backend needs them to ask
    // the server in the sandbox for the switch, and hyper's `OnUpgrade` stays in the extensions.
    let upgrade = upgrade_of(&parts.headers);
    strip_hop_by_hop(&mut parts.headers);
    restore_upgrade(&mut parts.headers, upgrade);
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    parts.uri = path.parse::<Uri>().map_err(|_| ApiError::BadRouting {
        detail: "the request path is not valid".into(),
    })?;
    if !PLATFORM_PORTS.contains(&port) {
        // The scheme the client used, for servers in the sandbox that build links back to
        // themselves (the desktop's DevTools front): set here, never taken from the client.
        let proto = if parts.extensions.get::<OverTls>().is_some() {
            "https"
        } else {
            "http"
        };
        parts.headers.insert(
            FORWARDED_PROTO_HEADER,
            http::HeaderValue::from_static(proto),
        );
        // `network.maskRequestHost`: the server in the sandbox sees the Host its owner chose.
        if let Some(mask) = &target.mask_request_host
            && let Ok(v) = http::HeaderValue::from_str(&masked_host(mask, port))
        {
            parts.headers.insert(http::header::HOST, v);
        }
    }
    let req = http::Request::from_parts(parts, body);
    // Run traces: processes, file operations and transfers on the agent's port. Process starts
    // are read even without traces, to refuse secret placeholders in them.
    let record = svc.metering().run_traces;
    let (req, traced) =
        if port == ENVD_PORT && (record || req.uri().path() == crate::trace::START_PATH) {
            crate::trace::observe(
                svc,
                &target.team_id,
                &sandbox_id,
                target.capture_output,
                record,
                req,
            )
            .await?
        } else {
            (req, None)
        };
    tracing::debug!(sandbox_id = %sandbox_id, port, "proxying");
    let op = BackendOp::Forward { port };
    match svc
        .call(
            op,
            &sandbox_id,
            svc.backend().forward(&sandbox_id, port, req),
        )
        .await
    {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            let upgrade = (parts.status == http::StatusCode::SWITCHING_PROTOCOLS)
                .then(|| upgrade_of(&parts.headers))
                .flatten();
            if upgrade.is_some() {
                Metrics::inc(&METRICS.proxy_upgrades);
            }
            strip_hop_by_hop(&mut parts.headers);
            restore_upgrade(&mut parts.headers, upgrade);
            // A Connect stream (envd's streaming calls) whose sandbox goes away mid-call ends
            // with `unavailable`, as the protocol says, not with a broken body.
            let body = if crate::connect_end::is_connect_stream(&parts.headers) {
                Body::new(crate::connect_end::ConnectEnd::new(
                    body,
                    sandbox_id.clone(),
                ))
            } else {
                body
            };
            let body = match traced {
                Some(t) => t.response(parts.status, body),
                None => body,
            };
            // The permit lives as long as the response body: a stream counts until it ends.
            let body = Body::new(body.map_frame(move |f| {
                let _held = &permit;
                f
            }));
            Ok(Response::from_parts(parts, body))
        }
        Err(e) => Err(api_error(op, &sandbox_id, e)),
    }
}

/// The Host header a sandbox's `maskRequestHost` gives a request to `port` (`${PORT}` is the
/// port).
pub fn masked_host(mask: &str, port: u16) -> String {
    mask.replace("${PORT}", &port.to_string())
}

/// Removes what the control plane uses to authenticate (and our routing headers) from a request
/// bound for a guest. envd names the user with `Authorization: Basic`, so only Bearer goes.
fn strip_credentials(h: &mut http::HeaderMap, port: u16) {
    for name in [
        SANDBOX_ID_HEADER,
        SANDBOX_PORT_HEADER,
        TRAFFIC_TOKEN_HEADER,
        API_KEY_HEADER,
    ] {
        h.remove(name);
    }
    if !PLATFORM_PORTS.contains(&port) {
        h.remove(ACCESS_TOKEN_HEADER);
    }
    let bearer = h.get_all(http::header::AUTHORIZATION).iter().any(|v| {
        v.as_bytes()
            .get(..7)
            .is_some_and(|p| p.eq_ignore_ascii_case(b"bearer "))
    });
    // On the MCP gateway's port a Bearer is the gateway's token, meant for the guest.
    if bearer && port != MCP_GATEWAY_PORT {
        h.remove(http::header::AUTHORIZATION);
    }
}

/// Open proxied requests, in total and per sandbox. Taking a permit never waits: past a cap the
/// request is refused (429), so a flood cannot queue up unbounded work.
pub struct Streams {
    max_total: usize,
    max_per_sandbox: usize,
    open: Mutex<(usize, HashMap<String, usize>)>,
}

impl Streams {
    pub fn new(max_total: usize, max_per_sandbox: usize) -> Self {
        Streams {
            max_total,
            max_per_sandbox,
            open: Mutex::new((0, HashMap::new())),
        }
    }

    fn acquire(self: &Arc<Self>, sandbox_id: &str) -> Result<StreamPermit, ApiError> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.0 >= self.max_total {
            Metrics::inc(&METRICS.proxy_streams_refused);
            return Err(ApiError::TooManyStreams {
                sandbox_id: None,
                limit: self.max_total,
            });
        }
        let n = open.1.entry(sandbox_id.to_owned()).or_insert(0);
        if *n >= self.max_per_sandbox {
            Metrics::inc(&METRICS.proxy_streams_refused);
            return Err(ApiError::TooManyStreams {
                sandbox_id: Some(sandbox_id.to_owned()),
                limit: self.max_per_sandbox,
            });
        }
        *n += 1;
        open.0 += 1;
        Ok(StreamPermit {
            streams: self.clone(),
            sandbox_id: sandbox_id.to_owned(),
        })
    }

    /// Proxied requests open now (all sandboxes).
    pub fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).0
    }
}

struct StreamPermit {
    streams: Arc<Streams>,
    sandbox_id: String,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut open = self.streams.open.lock().unwrap_or_else(|p| p.into_inner());
        open.0 = open.0.saturating_sub(1);
        if let Some(n) = open.1.get_mut(&self.sandbox_id) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.sandbox_id);
            }
        }
    }
}

/// The `Upgrade` value of a request or 101 response that asks for one (`Connection: upgrade`).
fn upgrade_of(h: &http::HeaderMap) -> Option<http::HeaderValue> {
    let asks = h
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    asks.then(|| h.get(http::header::UPGRADE).cloned())
        .flatten()
}

fn restore_upgrade(h: &mut http::HeaderMap, upgrade: Option<http::HeaderValue>) {
    if let Some(u) = upgrade {
        h.insert(http::header::UPGRADE, u);
        h.insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("upgrade"),
        );
    }
}

fn strip_hop_by_hop(h: &mut http::HeaderMap) {
    const HOP: [&str; 8] = [
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ];
    // Headers named by Connection are hop-by-hop too.
    let named: Vec<HeaderName> = h
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in HOP {
        h.remove(n);
    }
}

/// The platform ports' access rule: the token header; without it only the requests the SDKs send
/// tokenless (health, signed `/files` URLs on envd, context management on the interpreter).
fn platform_request_authorized(req: &http::request::Parts, port: u16, token: &str) -> bool {
    if let Some(v) = req.headers.get(ACCESS_TOKEN_HEADER) {
        return constant_time_eq(v.as_bytes(), token.as_bytes());
    }
    let path = req.uri.path();
    if path == "/health" && req.method == Method::GET {
        return true;
    }
    if port == CODE_INTERPRETER_PORT {
        // The official SDKs send no token to manage contexts; these run no code.
        return path == "/contexts" || path.starts_with("/contexts/");
    }
    if port == ENVD_PORT && path == "/files" {
        let op = match req.method {
            Method::GET => "read",
            Method::POST => "write",
            _ => return false,
        };
        return signature_valid(req.uri.query(), op, token, unix_now());
    }
    false
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The SDKs' v1 file URL signature: `v1_` + unpadded base64 of
/// SHA-256(`path:operation:user:token[:expiration]`).
fn signature_valid(query: Option<&str>, op: &str, token: &str, now: i64) -> bool {
    let pairs = query_pairs(query);
    // A parameter the signature covers must appear once: with two, the agent might read the
    // one that was not checked.
    for name in ["signature", "path", "username", "signature_expiration"] {
        if pairs.iter().filter(|(k, _)| k == name).count() > 1 {
            return false;
        }
    }
    let get = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let Some(sig) = get("signature") else {
        return false;
    };
    let path = get("path").unwrap_or("");
    let user = get("username").unwrap_or("");
    let raw = match get("signature_expiration") {
        Some(exp) => {
            let Ok(exp_n) = exp.parse::<i64>() else {
                return false;
            };
            if exp_n < now {
                return false;
            }
            format!("{path}:{op}:{user}:{token}:{exp}")
        }
        None => format!("{path}:{op}:{user}:{token}"),
    };
    let expected = format!(
        "v1_{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(Sha256::digest(raw.as_bytes()))
    );
    constant_time_eq(sig.as_bytes(), expected.as_bytes())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn routing_headers_win_and_default_to_the_agent_port() {
        let p = parts("/files", &[("E2b-Sandbox-Id", "abc123")]);
        assert_eq!(
            route_of(&p, "localhost:3000").unwrap(),
            Some(Route {
                sandbox_id: "abc123".into(),
                port: ENVD_PORT
            })
        );
        let p = parts(
            "/",
            &[("E2b-Sandbox-Id", "abc"), ("E2b-Sandbox-Port", "49999")],
        );
        assert_eq!(route_of(&p, "x").unwrap().unwrap().port, 49999);
        for bad in [
            vec![("E2b-Sandbox-Id", "../etc")],
            vec![("E2b-Sandbox-Id", "abc"), ("E2b-Sandbox-Port", "99999")],
            vec![("E2b-Sandbox-Id", "abc"), ("E2b-Sandbox-Port", "0")],
        ] {
            assert!(route_of(&parts("/", &bad), "x").is_err(), "{bad:?}");
        }
        assert_eq!(
            route_of(
                &parts("/sandboxes", &[("host", "localhost:3000")]),
                "localhost:3000"
            )
            .unwrap(),
            None
        );
    }

    #[test]
    fn host_names_route_with_and_without_ports() {
        let want = Some(Route {
            sandbox_id: "abc123".into(),
            port: 8080,
        });
        assert_eq!(
            route_from_host("8080-abc123.localhost:3000", "localhost:3000"),
            want
        );
        assert_eq!(
            route_from_host("8080-abc123.localhost", "localhost:3000"),
            want
        );
        assert_eq!(
            route_from_host("8080-ABC123.Sbx.Example.com", "sbx.example.com"),
            want
        );
        for bad in [
            "localhost:3000",
            "abc123.localhost",
            "x-abc123.localhost",
            "8080-a.b.localhost",
            "8080-.localhost",
            "8080-abc.evil.com",
        ] {
            assert_eq!(route_from_host(bad, "localhost"), None, "{bad}");
        }
    }

    #[test]
    fn file_url_signatures_match_the_sdk() {
        // Computed with the SDK's e2b.sandbox.signature.get_signature("/home/user/a.txt",
        // "read", "user", "tok", None) logic: sha256("/home/user/a.txt:read:user:tok").
        let raw = "/home/user/a.txt:read:user:tok";
        let sig = format!(
            "v1_{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(Sha256::digest(raw.as_bytes()))
        );
        let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let q = format!(
            "path=%2Fhome%2Fuser%2Fa.txt&username=user&signature={}",
            enc(&sig)
        );
        assert!(signature_valid(Some(&q), "read", "tok", 0));
        assert!(!signature_valid(Some(&q), "write", "tok", 0));
        assert!(!signature_valid(Some(&q), "read", "other", 0));
        assert!(!signature_valid(Some("path=/a"), "read", "tok", 0));

        let raw = "/a:write::tok:100";
        let sig = format!(
            "v1_{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(Sha256::digest(raw.as_bytes()))
        );
        let q = format!("path=/a&signature={}&signature_expiration=100", enc(&sig));
        assert!(signature_valid(Some(&q), "write", "tok", 99));
        assert!(!signature_valid(Some(&q), "write", "tok", 101), "expired");
    }

    fn signed(path: &str, op: &str, user: &str, exp: Option<i64>) -> String {
        let raw = match exp {
            Some(e) => format!("{path}:{op}:{user}:tok:{e}"),
            None => format!("{path}:{op}:{user}:tok"),
        };
        let sig = format!(
            "v1_{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(Sha256::digest(raw.as_bytes()))
        );
        let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let mut q = format!(
            "path={}&username={}&signature={}",
            enc(path),
            enc(user),
            enc(&sig)
        );
        if let Some(e) = exp {
            q.push_str(&format!("&signature_expiration={e}"));
        }
        q
    }

    #[test]
    fn tampered_or_expired_file_urls_are_refused() {
        let q = signed("/home/user/a.txt", "read", "user", Some(1000));
        assert!(signature_valid(Some(&q), "read", "tok", 999));
        // Method (operation), path, user and expiry are all covered by the signature.
        assert!(!signature_valid(Some(&q), "write", "tok", 999));
        for (from, to) in [
            ("a.txt", "b.txt"),
            ("username=user", "username=root"),
            ("signature_expiration=1000", "signature_expiration=9999"),
        ] {
            let t = q.replace(from, to);
            assert_ne!(t, q);
            assert!(!signature_valid(Some(&t), "read", "tok", 999), "{t}");
        }
        let no_exp = q.replace("&signature_expiration=1000", "");
        assert!(!signature_valid(Some(&no_exp), "read", "tok", 999));
        assert!(!signature_valid(Some(&q), "read", "tok", 1001), "expired");
        // A second copy of a covered parameter could be the one the agent reads.
        for dup in [
            "&path=/etc/shadow",
            "&username=root",
            "&signature_expiration=9999",
        ] {
            let t = format!("{q}{dup}");
            assert!(!signature_valid(Some(&t), "read", "tok", 999), "{t}");
        }
        // Without expiry (the SDKs' default) a signature stays valid, as in E2B.
        let forever = signed("/a", "write", "", None);
        assert!(signature_valid(Some(&forever), "write", "tok", i64::MAX));
    }

    #[test]
    fn bearer_credentials_are_stripped_basic_user_names_kept() {
        let mut h = http::HeaderMap::new();
        h.insert("x-api-key", "k".parse().unwrap());
        h.insert("authorization", "BEARER k".parse().unwrap());
        h.insert("x-access-token", "t".parse().unwrap());
        strip_credentials(&mut h, ENVD_PORT);
        assert!(!h.contains_key("x-api-key"));
        assert!(!h.contains_key("authorization"));
        assert!(h.contains_key("x-access-token"));
        h.insert("authorization", "Basic dXNlcjo=".parse().unwrap());
        strip_credentials(&mut h, 8080);
        assert!(h.contains_key("authorization"));
        assert!(!h.contains_key("x-access-token"));
        // The MCP gateway's token is a Bearer meant for the guest; the API key still goes.
        let mut h = http::HeaderMap::new();
        h.insert("x-api-key", "k".parse().unwrap());
        h.insert("authorization", "Bearer gateway-token".parse().unwrap());
        strip_credentials(&mut h, MCP_GATEWAY_PORT);
        assert_eq!(h["authorization"], "Bearer gateway-token");
        assert!(!h.contains_key("x-api-key"));
        strip_credentials(&mut h, 8080);
        assert!(!h.contains_key("authorization"));
    }
}

//! Sandbox traffic on the API's own listener.
//!
//! A request is for a sandbox when it carries `E2b-Sandbox-Id` (and `E2b-Sandbox-Port`, default
//! the agent's 49983) — what the SDKs send when `E2B_SANDBOX_URL` is set — or when its host is
//! `<port>-<sandboxID>.<domain>`. Everything else is the REST API. Sandbox requests are streamed
//! through [`SandboxBackend::forward`](crate::backend::SandboxBackend::forward) untouched apart
//! from the routing and hop-by-hop headers.
//!
//! Access: requests to the agent port must carry the sandbox's envd access token in
//! `X-Access-Token`, or a valid v1 URL signature (`/files?signature=...`, as the SDKs' upload and
//! download URLs do); `GET /health` is open, as in envd. Other ports are open to whoever knows the
//! sandbox id, as in E2B, unless the sandbox was created with `network.allowPublicTraffic: false`:
//! then they need its traffic access token in `e2b-traffic-access-token` (403 otherwise). That
//! header is stripped before forwarding.
//!
//! Upgrades (WebSocket): the `Upgrade`/`Connection: upgrade` pair survives the hop-by-hop strip
//! on the request and on a 101 answer; the backend joins both upgraded connections.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use http::{HeaderName, Method, Uri};
use sha2::{Digest, Sha256};

use alcove_store::SandboxState;

use crate::backend::{BackendOp, ENVD_PORT};
use crate::error::ApiError;
use crate::handlers::{AppState, query_pairs};
use crate::metrics::{METRICS, Metrics};
use crate::service::api_error;

const SANDBOX_ID_HEADER: &str = "e2b-sandbox-id";
const SANDBOX_PORT_HEADER: &str = "e2b-sandbox-port";
const ACCESS_TOKEN_HEADER: &str = "x-access-token";
/// E2B's header for sandboxes created with `network.allowPublicTraffic: false`.
const TRAFFIC_TOKEN_HEADER: &str = "e2b-traffic-access-token";

/// Where a request should go, if it is sandbox traffic.
#[derive(Debug, PartialEq, Eq)]
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

/// Outermost middleware: sandbox traffic goes to the proxy, the rest to the REST router.
pub async fn dispatch(State(svc): State<AppState>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    match route_of(&parts, svc.domain()) {
        Ok(None) => next.run(Request::from_parts(parts, body)).await,
        Ok(Some(route)) => {
            Metrics::inc(&METRICS.proxy_requests);
            match proxy(&svc, route, Request::from_parts(parts, body)).await {
                Ok(resp) => resp,
                Err(e) => {
                    Metrics::inc(&METRICS.proxy_failures);
                    e.into_response()
                }
            }
        }
        Err(e) => {
            Metrics::inc(&METRICS.proxy_failures);
            e.into_response()
        }
    }
}

async fn proxy(svc: &AppState, route: Route, req: Request) -> Result<Response, ApiError> {
    let Route { sandbox_id, port } = route;
    let mut target = svc.proxy_target(&sandbox_id).await?;
    // A paused sandbox created with autoResume comes back for its traffic.
    if target
        .as_ref()
        .is_some_and(|t| t.state == SandboxState::Paused)
        && svc.resume_for_traffic(&sandbox_id).await?
    {
        target = svc.proxy_target(&sandbox_id).await?;
    }
    let target = match target {
        Some(t) if t.state == SandboxState::Running => t,
        Some(t) if t.state == SandboxState::Creating => {
            return Err(ApiError::PortNotOpen { sandbox_id, port });
        }
        _ => return Err(ApiError::SandboxGone { sandbox_id }),
    };
    if port == ENVD_PORT
        && let Some(token) = &target.envd_access_token
        && !envd_request_authorized(&req, token)
    {
        return Err(ApiError::AccessTokenRejected { sandbox_id });
    }
    if port != ENVD_PORT
        && let Some(token) = &target.traffic_access_token
        && !req
            .headers()
            .get(TRAFFIC_TOKEN_HEADER)
            .is_some_and(|v| constant_time_eq(v.as_bytes(), token.as_bytes()))
    {
        return Err(ApiError::TrafficTokenRejected { sandbox_id, port });
    }

    let (mut parts, body) = req.into_parts();
    for name in [SANDBOX_ID_HEADER, SANDBOX_PORT_HEADER, TRAFFIC_TOKEN_HEADER] {
        parts.headers.remove(name);
    }
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
    let req = http::Request::from_parts(parts, body);
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
            Ok(Response::from_parts(parts, body))
        }
        Err(e) => Err(api_error(op, &sandbox_id, e)),
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

/// The envd access rule: token header, or a signed `/files` URL, or the open health check.
fn envd_request_authorized(req: &Request, token: &str) -> bool {
    if let Some(v) = req.headers().get(ACCESS_TOKEN_HEADER) {
        return constant_time_eq(v.as_bytes(), token.as_bytes());
    }
    let path = req.uri().path();
    if path == "/health" && req.method() == Method::GET {
        return true;
    }
    if path == "/files" {
        let op = match *req.method() {
            Method::GET => "read",
            Method::POST => "write",
            _ => return false,
        };
        return signature_valid(req.uri().query(), op, token, unix_now());
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
}

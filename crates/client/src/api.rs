//! [`ApiClient`]: one method per REST operation the CLI uses, over hyper's pooled client.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Bound on one REST call; a create restores a VM, which can take a while on a busy host.
const CALL_TIMEOUT: Duration = Duration::from_secs(180);
/// Page size when listing sandboxes (the server's largest).
const PAGE: u32 = 100;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid API URL {0}")]
    Url(String),
    #[error("could not reach {url}")]
    Connect {
        url: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("the request timed out")]
    Timeout,
    #[error("reading the response")]
    Read(#[source] hyper::Error),
    #[error("the server answered {status}: {message}")]
    Api { status: u16, message: String },
    #[error("the server answered with something that is not JSON")]
    NotJson(#[source] serde_json::Error),
}

/// The part of the API's error body (`{"code", "message", "error_code"}`) a caller is shown.
#[derive(Deserialize)]
struct ErrorBody {
    message: String,
}

/// A response: its JSON body (`Null` when empty) and headers.
pub struct Reply {
    pub json: Value,
    pub headers: http::HeaderMap,
}

/// `POST /v2/sandboxes`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NewSandbox {
    /// Template id or alias.
    #[serde(rename = "templateID")]
    pub template: String,
    /// Lifetime in seconds (the server's default when `None`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<u64>,
    pub metadata: BTreeMap<String, String>,
    #[serde(rename = "envVars")]
    pub env_vars: BTreeMap<String, String>,
}

/// Which sandboxes `GET /v2/sandboxes` returns.
#[derive(Debug, Clone, Default)]
pub struct SandboxFilter {
    /// Comma-separated states; the server's default (running and paused) when `None`.
    pub state: Option<String>,
    /// Metadata pairs that must all match.
    pub metadata: Vec<(String, String)>,
}

pub struct ApiClient {
    base: String,
    key: String,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl ApiClient {
    /// A client for the server at `base` (`http://host:port`), authenticating with `key`.
    pub fn new(base: &str, key: &str) -> Result<Self, ClientError> {
        let base = base.trim_end_matches('/').to_owned();
        if !base.starts_with("http://") {
            return Err(ClientError::Url(base));
        }
        Ok(ApiClient {
            base,
            key: key.to_owned(),
            http: Client::builder(TokioExecutor::new()).build_http(),
        })
    }

    /// The server's base URL, without a trailing slash.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// `GET /sandboxes/{id}`: a live sandbox, with its `envdAccessToken`.
    pub async fn sandbox(&self, id: &str) -> Result<Value, ClientError> {
        self.json("GET", &format!("/sandboxes/{}", enc(id)), None)
            .await
    }

    /// `POST /v2/sandboxes`: the new sandbox.
    pub async fn create_sandbox(&self, req: &NewSandbox) -> Result<Value, ClientError> {
        let body = serde_json::to_value(req).map_err(ClientError::NotJson)?;
        self.json("POST", "/v2/sandboxes", Some(&body)).await
    }

    /// `GET /v2/sandboxes`, every page: the matching sandboxes, in the server's order.
    pub async fn list_sandboxes(&self, filter: &SandboxFilter) -> Result<Vec<Value>, ClientError> {
        let mut items = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut q = vec![format!("limit={PAGE}")];
            if let Some(s) = &filter.state {
                q.push(format!("state={}", enc(s)));
            }
            if !filter.metadata.is_empty() {
                // The SDKs encode each key and value, then the whole `k=v&k=v` string.
                let m: Vec<String> = filter
                    .metadata
                    .iter()
                    .map(|(k, v)| format!("{}={}", enc(&enc(k)), enc(&enc(v))))
                    .collect();
                q.push(format!("metadata={}", enc(&m.join("&"))));
            }
            if let Some(t) = &token {
                q.push(format!("nextToken={}", enc(t)));
            }
            let r = self
                .call("GET", &format!("/v2/sandboxes?{}", q.join("&")), None)
                .await?;
            items.extend(r.json.as_array().cloned().unwrap_or_default());
            token = r
                .headers
                .get("x-next-token")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            if token.is_none() {
                return Ok(items);
            }
        }
    }

    /// `GET /alcove/v1/sandboxes/{id}`: the full record and state history, live or not.
    pub async fn sandbox_record(&self, id: &str) -> Result<Value, ClientError> {
        self.json("GET", &format!("/alcove/v1/sandboxes/{}", enc(id)), None)
            .await
    }

    /// `DELETE /sandboxes/{id}`.
    pub async fn kill_sandbox(&self, id: &str) -> Result<(), ClientError> {
        self.call("DELETE", &format!("/sandboxes/{}", enc(id)), None)
            .await
            .map(drop)
    }

    /// `GET /v2/sandboxes/{id}/logs`.
    pub async fn sandbox_logs(&self, id: &str) -> Result<Value, ClientError> {
        self.json("GET", &format!("/v2/sandboxes/{}/logs", enc(id)), None)
            .await
    }

    /// `GET /templates`.
    pub async fn templates(&self) -> Result<Value, ClientError> {
        self.json("GET", "/templates", None).await
    }

    /// `GET /alcove/v1/nodes`: a cluster's nodes (admin key).
    pub async fn nodes(&self) -> Result<Value, ClientError> {
        self.json("GET", "/alcove/v1/nodes", None).await
    }

    /// `POST /alcove/v1/nodes/{id}/drain` (admin key).
    pub async fn drain_node(&self, node: &str) -> Result<Value, ClientError> {
        self.json(
            "POST",
            &format!("/alcove/v1/nodes/{}/drain", enc(node)),
            None,
        )
        .await
    }

    /// `GET /alcove/v1/snapshots/tree`: the checkpoint tree.
    pub async fn snapshot_tree(&self) -> Result<Value, ClientError> {
        self.json("GET", "/alcove/v1/snapshots/tree", None).await
    }

    /// `GET /alcove/v1/usage` with these query pairs (start, end, groupBy, team).
    pub async fn usage(&self, query: &[(&str, &str)]) -> Result<Value, ClientError> {
        let q: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(query)
            .finish();
        self.json("GET", &format!("/alcove/v1/usage?{q}"), None)
            .await
    }

    /// `GET /alcove/v1/teams/{team}/limits`.
    pub async fn team_limits(&self, team: &str) -> Result<Value, ClientError> {
        self.json(
            "GET",
            &format!("/alcove/v1/teams/{}/limits", enc(team)),
            None,
        )
        .await
    }

    /// `PUT /alcove/v1/teams/{team}/limits` (admin key).
    pub async fn set_team_limits(&self, team: &str, body: &Value) -> Result<Value, ClientError> {
        self.json(
            "PUT",
            &format!("/alcove/v1/teams/{}/limits", enc(team)),
            Some(body),
        )
        .await
    }

    /// `GET /snapshots`: restorable snapshots, newest first.
    pub async fn snapshots(&self) -> Result<Value, ClientError> {
        self.json("GET", "/snapshots?limit=1000", None).await
    }

    /// `POST /sandboxes/{id}/snapshots`: the new snapshot.
    pub async fn create_snapshot(
        &self,
        sandbox: &str,
        name: Option<&str>,
    ) -> Result<Value, ClientError> {
        let body = json!({ "name": name });
        self.json(
            "POST",
            &format!("/sandboxes/{}/snapshots", enc(sandbox)),
            Some(&body),
        )
        .await
    }

    /// `POST /alcove/v1/sandboxes/{id}/fork`: one entry per child, a sandbox or an error.
    pub async fn fork(&self, sandbox: &str, count: u32) -> Result<Value, ClientError> {
        let body = json!({ "count": count });
        self.json(
            "POST",
            &format!("/alcove/v1/sandboxes/{}/fork", enc(sandbox)),
            Some(&body),
        )
        .await
    }

    /// `POST /alcove/v1/sandboxes/{id}/recordings`: starts a screen recording; `body` holds
    /// `path`, `fps`, `maxSeconds`, `display` (each optional).
    pub async fn start_recording(&self, sandbox: &str, body: &Value) -> Result<Value, ClientError> {
        self.json(
            "POST",
            &format!("/alcove/v1/sandboxes/{}/recordings", enc(sandbox)),
            Some(body),
        )
        .await
    }

    /// `POST /alcove/v1/sandboxes/{id}/recordings/{rid}/stop`: the ended recording.
    pub async fn stop_recording(&self, sandbox: &str, rid: &str) -> Result<Value, ClientError> {
        self.json(
            "POST",
            &format!(
                "/alcove/v1/sandboxes/{}/recordings/{}/stop",
                enc(sandbox),
                enc(rid)
            ),
            Some(&json!({})),
        )
        .await
    }

    /// `GET /alcove/v1/sandboxes/{id}/recordings`.
    pub async fn recordings(&self, sandbox: &str) -> Result<Value, ClientError> {
        self.json(
            "GET",
            &format!("/alcove/v1/sandboxes/{}/recordings", enc(sandbox)),
            None,
        )
        .await
    }

    /// `DELETE /templates/{snapshot}`.
    pub async fn delete_snapshot(&self, snapshot: &str) -> Result<(), ClientError> {
        self.call("DELETE", &format!("/templates/{}", enc(snapshot)), None)
            .await
            .map(drop)
    }

    /// The HTTP client, for calls that do not go through [`ApiClient::call`] (signed uploads).
    pub(crate) fn http(&self) -> &Client<HttpConnector, Full<Bytes>> {
        &self.http
    }

    pub(crate) async fn json_of(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        self.json(method, path, body).await
    }

    async fn json(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, ClientError> {
        Ok(self.call(method, path, body).await?.json)
    }

    /// Any call: `path` is appended to the base URL as is (already encoded).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Reply, ClientError> {
        let (bytes, headers) = self.raw(method, path, body).await?;
        let json = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).map_err(ClientError::NotJson)?
        };
        Ok(Reply { json, headers })
    }

    /// A call whose answer is not one JSON document (NDJSON feeds): its bytes and headers.
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(Bytes, http::HeaderMap), ClientError> {
        let url = format!("{}{}", self.base, path);
        let req = http::Request::builder()
            .method(method)
            .uri(&url)
            .header("X-API-KEY", &self.key)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                body.map(|b| b.to_string()).unwrap_or_default(),
            )))
            .map_err(|_| ClientError::Url(url.clone()))?;
        let resp = tokio::time::timeout(CALL_TIMEOUT, self.http.request(req))
            .await
            .map_err(|_| ClientError::Timeout)?
            .map_err(|source| ClientError::Connect {
                url: self.base.clone(),
                source,
            })?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = tokio::time::timeout(CALL_TIMEOUT, resp.into_body().collect())
            .await
            .map_err(|_| ClientError::Timeout)?
            .map_err(ClientError::Read)?
            .to_bytes();
        if !status.is_success() {
            return Err(api_error(status, &bytes));
        }
        Ok((bytes, headers))
    }
}

/// A non-2xx answer as [`ClientError::Api`], with the API's `message` when the body has one.
pub(crate) fn api_error(status: http::StatusCode, body: &[u8]) -> ClientError {
    let message = serde_json::from_slice::<ErrorBody>(body)
        .map(|e| e.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned());
    ClientError::Api {
        status: status.as_u16(),
        message,
    }
}

/// Percent-encodes one path segment or query value.
pub(crate) fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_body_is_what_the_api_reads() {
        let req = NewSandbox {
            template: "base".into(),
            timeout: None,
            metadata: [("owner".to_string(), "me".to_string())].into(),
            env_vars: BTreeMap::new(),
        };
        assert_eq!(
            serde_json::to_value(&req).unwrap(),
            json!({"templateID": "base", "metadata": {"owner": "me"}, "envVars": {}})
        );
        let req = NewSandbox {
            timeout: Some(60),
            ..req
        };
        assert_eq!(serde_json::to_value(&req).unwrap()["timeout"], 60);
    }

    #[test]
    fn only_plain_http_urls() {
        assert!(ApiClient::new("https://example.com", "k").is_err());
        let c = ApiClient::new("http://127.0.0.1:3000/", "k").unwrap();
        assert_eq!(c.base_url(), "http://127.0.0.1:3000");
    }
}

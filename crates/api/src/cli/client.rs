//! A minimal JSON client for the REST API (plain HTTP: the server listens on loopback or
//! behind a TLS-terminating proxy).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::error::ErrorBody;

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

pub struct ApiClient {
    base: String,
    key: String,
    http: Client<HttpConnector, Full<Bytes>>,
}

/// A response: its JSON body (Null when empty) and headers.
pub struct Reply {
    pub json: Value,
    pub headers: http::HeaderMap,
}

impl ApiClient {
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

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Reply, ClientError> {
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
        let resp = tokio::time::timeout(Duration::from_secs(180), self.http.request(req))
            .await
            .map_err(|_| ClientError::Timeout)?
            .map_err(|source| ClientError::Connect {
                url: self.base.clone(),
                source,
            })?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(ClientError::Read)?
            .to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|e| e.message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ClientError::Api {
                status: status.as_u16(),
                message,
            });
        }
        let json = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).map_err(ClientError::NotJson)?
        };
        Ok(Reply { json, headers })
    }
}

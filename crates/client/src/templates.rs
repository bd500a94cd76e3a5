//! E2B's template build API on [`ApiClient`]: the calls the SDKs' `Template.build` makes, with
//! the wire JSON of `e2b==2.63.0` (`template_sync/build_api.py` and the generated models).
//!
//! Order of a build: [`ApiClient::request_build`] (`POST /v3/templates`), for each `COPY` step
//! [`ApiClient::file_upload_link`] and, when not `present`, [`ApiClient::upload_files`] to the
//! signed URL, then [`ApiClient::start_build`] and [`ApiClient::build_status`] until `ready` or
//! `error`.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::api::{ApiClient, ClientError, enc};

/// Bound on one archive upload (the SDKs allow an hour; a CLI context is usually small).
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(1800);

/// `POST /v3/templates` (`TemplateBuildRequestV3`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct BuildRequest {
    /// `name` or `name:tag`.
    pub name: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(rename = "cpuCount", skip_serializing_if = "Option::is_none")]
    pub cpu_count: Option<u32>,
    #[serde(rename = "memoryMB", skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u32>,
}

/// Its 202 answer (`TemplateRequestResponseV3`).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct BuildRequested {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "buildID")]
    pub build_id: String,
    #[serde(default)]
    pub public: bool,
    #[serde(default)]
    pub names: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub aliases: Vec<String>,
}

/// `GET /templates/{templateID}/files/{hash}` (`TemplateBuildFileUpload`).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct FileUpload {
    pub present: bool,
    #[serde(default)]
    pub url: Option<String>,
    /// Headers the upload must carry, as the server asks (Content-Length stays ours).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// One step (`TemplateStep`): `type` is `RUN`, `COPY`, `ENV`, `WORKDIR` or `USER`; `args` as
/// the SDK sends them (RUN `[cmd]` or `[cmd, user]`, COPY `[src, dest, owner, mode]`, ENV
/// `[k1, v1, k2, v2…]`, WORKDIR `[path]`, USER `[user]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildStep {
    #[serde(rename = "type")]
    pub kind: String,
    pub args: Vec<String>,
    pub force: bool,
    #[serde(rename = "filesHash", skip_serializing_if = "Option::is_none")]
    pub files_hash: Option<String>,
}

/// `POST /v2/templates/{templateID}/builds/{buildID}` (`TemplateBuildStartV2`). Exactly one of
/// `from_image` and `from_template` is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BuildStart {
    #[serde(rename = "fromImage", skip_serializing_if = "Option::is_none")]
    pub from_image: Option<String>,
    #[serde(rename = "fromTemplate", skip_serializing_if = "Option::is_none")]
    pub from_template: Option<String>,
    pub steps: Vec<BuildStep>,
    #[serde(rename = "startCmd", skip_serializing_if = "Option::is_none")]
    pub start_cmd: Option<String>,
    #[serde(rename = "readyCmd", skip_serializing_if = "Option::is_none")]
    pub ready_cmd: Option<String>,
    pub force: bool,
}

/// `GET .../builds/{buildID}/status` (`TemplateBuildInfo`).
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct BuildStatus {
    #[serde(rename = "templateID")]
    pub template_id: String,
    #[serde(rename = "buildID")]
    pub build_id: String,
    /// `waiting`, `building`, `ready` or `error`.
    pub status: String,
    #[serde(rename = "logEntries", default)]
    pub log_entries: Vec<LogEntry>,
    #[serde(default)]
    pub logs: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<BuildReason>,
}

impl BuildStatus {
    /// `ready` or `error`: nothing more will happen.
    pub fn finished(&self) -> bool {
        matches!(self.status.as_str(), "ready" | "error")
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct LogEntry {
    pub timestamp: String,
    pub level: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct BuildReason {
    pub message: String,
    /// `base`, a 1-based step index, or `finalize`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
}

impl ApiClient {
    /// `POST /v3/templates`: a template id (reused for an existing name) and a new build id.
    pub async fn request_build(&self, req: &BuildRequest) -> Result<BuildRequested, ClientError> {
        let body = serde_json::to_value(req).map_err(ClientError::NotJson)?;
        let v = self.json_of("POST", "/v3/templates", Some(&body)).await?;
        serde_json::from_value(v).map_err(ClientError::NotJson)
    }

    /// `GET /templates/{templateID}/files/{hash}`: whether the archive is already on the server,
    /// else where to upload it.
    pub async fn file_upload_link(
        &self,
        template_id: &str,
        files_hash: &str,
    ) -> Result<FileUpload, ClientError> {
        let path = format!("/templates/{}/files/{}", enc(template_id), enc(files_hash));
        let v = self.json_of("GET", &path, None).await?;
        serde_json::from_value(v).map_err(ClientError::NotJson)
    }

    /// `PUT` an archive to the signed URL of [`FileUpload`] (absolute, or a path on this server).
    /// No API key goes with it: the URL authenticates itself.
    pub async fn upload_files(&self, link: &FileUpload, archive: Bytes) -> Result<(), ClientError> {
        let url = link
            .url
            .as_deref()
            .ok_or_else(|| ClientError::Url("the server gave no upload URL".into()))?;
        let url = if url.starts_with('/') {
            format!("{}{url}", self.base_url())
        } else {
            url.to_owned()
        };
        let mut req = http::Request::builder().method("PUT").uri(&url);
        for (k, v) in &link.headers {
            if !k.eq_ignore_ascii_case("content-length") {
                req = req.header(k, v);
            }
        }
        let req = req
            .header("content-length", archive.len())
            .header("content-type", "application/octet-stream")
            .body(Full::new(archive))
            .map_err(|_| ClientError::Url(url.clone()))?;
        let resp = tokio::time::timeout(UPLOAD_TIMEOUT, self.http().request(req))
            .await
            .map_err(|_| ClientError::Timeout)?
            .map_err(|source| ClientError::Connect {
                url: url.clone(),
                source,
            })?;
        let status = resp.status();
        let bytes = tokio::time::timeout(UPLOAD_TIMEOUT, resp.into_body().collect())
            .await
            .map_err(|_| ClientError::Timeout)?
            .map_err(ClientError::Read)?
            .to_bytes();
        if !status.is_success() {
            return Err(crate::api::api_error(status, &bytes));
        }
        Ok(())
    }

    /// `POST /v2/templates/{templateID}/builds/{buildID}`: starts the build (202).
    pub async fn start_build(
        &self,
        template_id: &str,
        build_id: &str,
        start: &BuildStart,
    ) -> Result<(), ClientError> {
        let body = serde_json::to_value(start).map_err(ClientError::NotJson)?;
        let path = format!(
            "/v2/templates/{}/builds/{}",
            enc(template_id),
            enc(build_id)
        );
        self.call("POST", &path, Some(&body)).await.map(drop)
    }

    /// `GET /templates/{templateID}/builds/{buildID}/status?logsOffset=N&limit=M`: the state and
    /// the log entries from `logs_offset` on (at most `limit`, the server's default when `None`).
    pub async fn build_status(
        &self,
        template_id: &str,
        build_id: &str,
        logs_offset: u64,
        limit: Option<u32>,
    ) -> Result<BuildStatus, ClientError> {
        let mut path = format!(
            "/templates/{}/builds/{}/status?logsOffset={logs_offset}",
            enc(template_id),
            enc(build_id)
        );
        if let Some(l) = limit {
            path.push_str(&format!("&limit={l}"));
        }
        let v = self.json_of("GET", &path, None).await?;
        serde_json::from_value(v).map_err(ClientError::NotJson)
    }

    /// `GET /templates/aliases/{alias}`: `Some` (the server's JSON) when a template has that name
    /// and the caller may see it (or it exists but belongs to another team: 403), `None` on 404.
    pub async fn template_alias(&self, alias: &str) -> Result<Option<Value>, ClientError> {
        match self
            .json_of("GET", &format!("/templates/aliases/{}", enc(alias)), None)
            .await
        {
            Ok(v) => Ok(Some(v)),
            Err(ClientError::Api { status: 404, .. }) => Ok(None),
            Err(ClientError::Api { status: 403, .. }) => Ok(Some(Value::Null)),
            Err(e) => Err(e),
        }
    }

    /// `DELETE /templates/{templateID}` (an id or a name).
    pub async fn delete_template(&self, template: &str) -> Result<(), ClientError> {
        self.call("DELETE", &format!("/templates/{}", enc(template)), None)
            .await
            .map(drop)
    }

    /// `POST /templates/tags`: points `tags` at the build `target` (`name:tag`) names.
    pub async fn assign_tags(&self, target: &str, tags: &[String]) -> Result<Value, ClientError> {
        let body = json!({ "target": target, "tags": tags });
        self.json_of("POST", "/templates/tags", Some(&body)).await
    }

    /// `DELETE /templates/tags`: removes `tags` from the template `name`.
    pub async fn remove_tags(&self, name: &str, tags: &[String]) -> Result<(), ClientError> {
        let body = json!({ "name": name, "tags": tags });
        self.call("DELETE", "/templates/tags", Some(&body))
            .await
            .map(drop)
    }

    /// `GET /templates/{templateID}/tags`.
    pub async fn template_tags(&self, template_id: &str) -> Result<Value, ClientError> {
        self.json_of(
            "GET",
            &format!("/templates/{}/tags", enc(template_id)),
            None,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_request_is_the_sdks_json() {
        let r = BuildRequest {
            name: "app".into(),
            ..Default::default()
        };
        assert_eq!(serde_json::to_value(&r).unwrap(), json!({"name": "app"}));
        let r = BuildRequest {
            name: "app:v1".into(),
            tags: vec!["latest".into()],
            cpu_count: Some(2),
            memory_mb: Some(1024),
        };
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"name": "app:v1", "tags": ["latest"], "cpuCount": 2, "memoryMB": 1024})
        );
    }

    #[test]
    fn build_start_is_the_sdks_json() {
        let s = BuildStart {
            from_template: Some("base".into()),
            steps: vec![
                BuildStep {
                    kind: "COPY".into(),
                    args: vec!["a.txt".into(), "/app/".into(), "".into(), "".into()],
                    force: false,
                    files_hash: Some("ab".into()),
                },
                BuildStep {
                    kind: "RUN".into(),
                    args: vec!["echo hi".into()],
                    force: false,
                    files_hash: None,
                },
            ],
            start_cmd: Some("python3 -m http.server".into()),
            ready_cmd: Some("sleep 20".into()),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&s).unwrap(),
            json!({
                "fromTemplate": "base",
                "steps": [
                    {"type": "COPY", "args": ["a.txt", "/app/", "", ""], "force": false, "filesHash": "ab"},
                    {"type": "RUN", "args": ["echo hi"], "force": false},
                ],
                "startCmd": "python3 -m http.server",
                "readyCmd": "sleep 20",
                "force": false,
            })
        );
    }

    #[test]
    fn status_reads_the_servers_json() {
        let s: BuildStatus = serde_json::from_value(json!({
            "templateID": "t", "buildID": "b", "status": "error",
            "logEntries": [{"timestamp": "2026-01-01T00:00:00Z", "level": "error", "message": "boom", "step": "2"}],
            "logs": ["boom"],
            "reason": {"message": "step 2 failed", "step": "2"}
        }))
        .unwrap();
        assert!(s.finished());
        assert_eq!(s.log_entries[0].step.as_deref(), Some("2"));
        assert_eq!(s.reason.unwrap().step.as_deref(), Some("2"));
        let s: BuildStatus = serde_json::from_value(
            json!({"templateID": "t", "buildID": "b", "status": "building", "logEntries": [], "logs": []}),
        )
        .unwrap();
        assert!(!s.finished());
    }

    #[test]
    fn upload_link_without_url_when_present() {
        let l: FileUpload = serde_json::from_value(json!({"present": true})).unwrap();
        assert!(l.present && l.url.is_none());
    }
}

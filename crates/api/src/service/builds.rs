//! Template builds through E2B's `Template` API: request a build (`POST /v3/templates`), upload
//! `COPY` files (`GET /templates/{id}/files/{hash}` hands out a signed, expiring, single-use URL),
//! start it (`POST /v2/templates/{id}/builds/{build}`), follow it (`.../status`), tag builds,
//! delete templates.
//!
//! The API owns the records (store: templates, builds, logs, tags), the uploads
//! (`<data>/template-files/<team>/<hash>`) and the queue: one build per template at a time (a
//! second build of a name waits as `waiting`), each in its own task under the build deadline. The
//! steps themselves run in the backend's builder microVMs ([`SandboxBackend::build_template`]).
//! Builds whose files no one can reach any more (superseded and untagged, or of a deleted
//! template) are handed back to the backend, which keeps them while sandboxes use them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use alcove_store::{BuildRecord, BuildStatus, NameOwner, TemplateRecord, now_ms};
use hmac::{KeyInit, Mac};
use tracing::Instrument;

use super::quota::Quota;
use super::{Service, api_error};
use crate::backend::{
    BackendOp, BuildFrom, BuildLog, BuildLogEntry, BuildSpec, ImageRegistry, Step, StepKind,
    StepRef,
};
use crate::error::{ApiError, chain};
use crate::models::{self, rfc3339};

/// How long an upload URL stays valid.
const UPLOAD_URL_TTL: Duration = Duration::from_secs(3600);
/// The most steps one build may have.
const MAX_STEPS: usize = 256;
/// Log lines the status endpoint returns at most per call (E2B's page size).
const MAX_LOG_PAGE: i64 = 100;
/// Lines of the failed step a failure's `reason` carries.
const REASON_LINES: usize = 20;
/// A log line is cut at this many bytes.
const MAX_LOG_LINE: usize = 4096;

/// Where uploads live and the key that signs their URLs.
pub struct TemplateFiles {
    pub dir: PathBuf,
    key: Vec<u8>,
}

impl TemplateFiles {
    /// Uploads under `dir`, URLs signed with the key in `key_file` (made, owner-only, on first
    /// use, so URLs handed out before a restart still work after it).
    pub fn open(dir: PathBuf, key_file: &Path) -> std::io::Result<TemplateFiles> {
        let key = match std::fs::read(key_file) {
            Ok(k) if k.len() >= 32 => k,
            _ => {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let k: [u8; 32] = rand::random();
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(key_file)?;
                f.write_all(&k)?;
                f.sync_all()?;
                k.to_vec()
            }
        };
        Ok(TemplateFiles { dir, key })
    }

    fn team_dir(&self, team_id: &str) -> PathBuf {
        self.dir.join(team_id)
    }

    fn sign(&self, payload: &str) -> String {
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.key).expect("any key size");
        mac.update(payload.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// The token of an upload URL: `team.hash.expires.nonce.signature`.
    fn token(&self, team_id: &str, hash: &str, expires_ms: i64) -> String {
        let nonce = hex::encode(rand::random::<[u8; 12]>());
        let payload = format!("{team_id}.{hash}.{expires_ms}.{nonce}");
        let sig = self.sign(&payload);
        format!("{payload}.{sig}")
    }

    /// Checks a token's signature and expiry; answers (team, hash, expires, nonce).
    fn check(&self, token: &str) -> Result<(String, String, i64, String), ApiError> {
        let bad = ApiError::UploadRejected {
            reason: "its signature does not match (it was changed or is not from this server)",
        };
        let (payload, sig) = token.rsplit_once('.').ok_or_else(|| bad_clone(&bad))?;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.key).expect("any key size");
        mac.update(payload.as_bytes());
        let sig = hex::decode(sig).map_err(|_| bad_clone(&bad))?;
        mac.verify_slice(&sig).map_err(|_| bad_clone(&bad))?;
        let parts: Vec<&str> = payload.split('.').collect();
        let [team, hash, expires, nonce] = parts[..] else {
            return Err(bad);
        };
        let expires: i64 = expires.parse().map_err(|_| bad_clone(&bad))?;
        if expires < now_ms() {
            return Err(ApiError::UploadRejected {
                reason: "it has expired",
            });
        }
        Ok((team.into(), hash.into(), expires, nonce.into()))
    }
}

fn bad_clone(e: &ApiError) -> ApiError {
    match e {
        ApiError::UploadRejected { reason } => ApiError::UploadRejected { reason },
        _ => ApiError::UploadRejected {
            reason: "it is not valid",
        },
    }
}

/// A template or tag name: what `Sandbox.create("name:tag")` can spell.
fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(ApiError::InvalidBody {
            detail: format!(
                "{what} '{name}' must be 1-64 characters of a-z, 0-9, '-', '_' and '.', starting \
                 with a letter or digit"
            ),
        })
    }
}

fn check_files_hash(hash: &str) -> Result<(), ApiError> {
    if hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(ApiError::InvalidBody {
            detail: format!("files hash '{hash}' must be 64 hex digits (a SHA-256)"),
        })
    }
}

/// Splits `name:tag`.
pub(super) fn split_tag(name: &str) -> (&str, Option<&str>) {
    match name.split_once(':') {
        Some((n, t)) => (n, Some(t)),
        None => (name, None),
    }
}

impl Service {
    fn files(&self) -> Result<&TemplateFiles, ApiError> {
        self.template_files
            .as_ref()
            .ok_or(ApiError::NotImplemented {
                what: "template builds (this server runs without a data directory)",
            })
    }

    fn build_lock(&self, template_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.build_locks
            .lock()
            .expect("build locks")
            .entry(template_id.to_owned())
            .or_default()
            .clone()
    }

    /// A team's own template by id or name; another team's is 403, none 404.
    async fn own_template(&self, team_id: &str, id: &str) -> Result<TemplateRecord, ApiError> {
        let n = id.to_owned();
        let t = self
            .db(move |s| s.resolve_template(&n))
            .await?
            .ok_or_else(|| ApiError::TemplateNotFound {
                template: id.to_owned(),
            })?;
        match t.team_id.as_deref() {
            Some(owner) if owner == team_id => Ok(t),
            Some(_) => Err(ApiError::TemplateNotOwned {
                template: id.to_owned(),
            }),
            None => Err(ApiError::TemplateNameTaken {
                name: id.to_owned(),
                by_host: true,
            }),
        }
    }

    /// [`Service::own_template`] for a change other than a build: a host template's refusal names
    /// `action` instead of speaking of rebuilding.
    async fn own_template_to(
        &self,
        team_id: &str,
        id: &str,
        action: &'static str,
    ) -> Result<TemplateRecord, ApiError> {
        match self.own_template(team_id, id).await {
            Err(ApiError::TemplateNameTaken {
                name,
                by_host: true,
            }) => Err(ApiError::HostTemplateReadOnly { name, action }),
            other => other,
        }
    }

    async fn own_build(
        &self,
        team_id: &str,
        template_id: &str,
        build_id: &str,
    ) -> Result<(TemplateRecord, BuildRecord), ApiError> {
        let t = self.own_template(team_id, template_id).await?;
        let b = build_id.to_owned();
        let build = self
            .db(move |s| s.build(&b))
            .await?
            .filter(|b| b.template_id == t.id)
            .ok_or_else(|| ApiError::BuildNotFound {
                template_id: template_id.to_owned(),
                build_id: build_id.to_owned(),
            })?;
        Ok((t, build))
    }

    /// `POST /v3/templates`.
    pub async fn request_template_build(
        &self,
        team_id: &str,
        req: models::TemplateBuildRequestV3,
    ) -> Result<models::TemplateRequestResponseV3, ApiError> {
        self.files()?;
        let name = req
            .name
            .or(req.alias)
            .ok_or_else(|| ApiError::InvalidBody {
                detail: "`name` is required: the template's name".into(),
            })?;
        // `name:tag` in the name is how the SDKs spell a tag too.
        let (name, tag) = split_tag(&name);
        let name = name.to_owned();
        check_name("template name", &name)?;
        let mut tags = req.tags.unwrap_or_default();
        if let Some(t) = tag {
            tags.push(t.to_owned());
        }
        if tags.is_empty() {
            tags.push("default".into());
        }
        for t in &tags {
            check_name("tag", t)?;
        }
        tags.sort();
        tags.dedup();
        if let Some(c) = req.cpu_count
            && !(1..=16).contains(&c)
        {
            return Err(ApiError::InvalidBody {
                detail: format!("cpuCount {c} is out of range 1..=16"),
            });
        }
        if let Some(m) = req.memory_mb
            && !(128..=65536).contains(&m)
        {
            return Err(ApiError::InvalidBody {
                detail: format!("memoryMB {m} is out of range 128..=65536"),
            });
        }
        let (t, n) = (team_id.to_owned(), name.clone());
        match self.db(move |s| s.name_taken(&t, &n)).await? {
            Some(NameOwner::Host) => {
                return Err(ApiError::TemplateNameTaken {
                    name,
                    by_host: true,
                });
            }
            Some(NameOwner::OtherTeam) => {
                return Err(ApiError::TemplateNameTaken {
                    name,
                    by_host: false,
                });
            }
            None => {}
        }
        let (t, n) = (team_id.to_owned(), name.clone());
        let exists = self
            .db(move |s| Ok(s.name_taken(&t, &n)?.is_none() && s.resolve_template(&n)?.is_some()))
            .await?;
        if !exists {
            let t = team_id.to_owned();
            let (count, _) = self.db(move |s| s.team_template_usage(&t)).await?;
            let limit = self.limits.max_templates as u64;
            if count >= limit {
                return Err(ApiError::QuotaExceeded {
                    quota: Quota::Templates,
                    used: count,
                    limit,
                });
            }
        }
        let build = BuildRecord::waiting(
            &uuid::Uuid::new_v4().to_string(),
            tags.clone(),
            (req.cpu_count.unwrap_or(0), req.memory_mb.unwrap_or(0), 0),
        );
        let template_id = new_template_id();
        let t = team_id.to_owned();
        let made = self
            .db(move |s| s.request_build(&t, &name, &template_id, &build))
            .await?;
        tracing::info!(
            template_id = %made.template.id, build_id = %made.build.id, team_id,
            new_template = made.new_template, "template build requested"
        );
        Ok(models::TemplateRequestResponseV3 {
            template_id: made.template.id.clone(),
            build_id: made.build.id.clone(),
            public: made.template.public,
            names: made.template.aliases.clone(),
            tags,
            aliases: made.template.aliases,
        })
    }

    /// `GET /templates/{id}/files/{hash}`: whether the team has these files, and where to upload
    /// them if not. `base_url` is how the caller reached this server.
    pub async fn template_file_link(
        &self,
        team_id: &str,
        template_id: &str,
        hash: &str,
        base_url: &str,
    ) -> Result<models::TemplateBuildFileUpload, ApiError> {
        let files = self.files()?;
        self.own_template(team_id, template_id).await?;
        check_files_hash(hash)?;
        let hash = hash.to_ascii_lowercase();
        let present = files.team_dir(team_id).join(&hash).is_file();
        let token = files.token(team_id, &hash, now_ms() + UPLOAD_URL_TTL.as_millis() as i64);
        Ok(models::TemplateBuildFileUpload {
            present,
            url: Some(format!(
                "{}/alcove/v1/template-files/{token}",
                base_url.trim_end_matches('/')
            )),
        })
    }

    /// `PUT /alcove/v1/template-files/{token}`: stores an upload, streamed to disk under its own
    /// cap and deadline. The URL is the credential: it must be this server's, unexpired and
    /// unused.
    pub async fn upload_template_file(
        &self,
        token: &str,
        declared_len: Option<u64>,
        body: axum::body::Body,
    ) -> Result<(), ApiError> {
        use http_body_util::BodyExt;
        use tokio::io::AsyncWriteExt;
        let files = self.files()?;
        let (team, hash, expires, nonce) = files.check(token)?;
        // A declared size over the cap is refused before any of it is read (and before the URL
        // is used up, so a smaller retry with the same URL works).
        let limit = self.limits.max_upload_bytes;
        if declared_len.is_some_and(|n| n > limit) {
            return Err(ApiError::UploadTooLarge { limit });
        }
        let fresh = self
            .db(move |s| s.use_upload_nonce(&nonce, expires))
            .await?;
        if !fresh {
            return Err(ApiError::UploadRejected {
                reason: "it was already used (upload URLs are single-use)",
            });
        }
        let dir = files.team_dir(&team);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(ApiError::internal)?;
        let tmp = dir.join(format!(
            ".{hash}.{}",
            hex::encode(rand::random::<[u8; 6]>())
        ));
        let limit = self.limits.max_upload_bytes;
        let total_deadline = tokio::time::Instant::now() + self.limits.upload_timeout;
        let gap = self.limits.upload_timeout / 10;
        let result = async {
            let mut f = tokio::fs::File::create(&tmp)
                .await
                .map_err(ApiError::internal)?;
            let mut body = body;
            let mut written: u64 = 0;
            loop {
                let next = tokio::time::timeout_at(
                    total_deadline.min(tokio::time::Instant::now() + gap),
                    body.frame(),
                )
                .await
                .map_err(|_| ApiError::RequestTimeout)?;
                let Some(frame) = next else { break };
                let frame = frame.map_err(|e| ApiError::InvalidBody {
                    detail: format!("the upload was cut off ({e})"),
                })?;
                if let Ok(data) = frame.into_data() {
                    written += data.len() as u64;
                    if written > limit {
                        return Err(ApiError::UploadTooLarge { limit });
                    }
                    f.write_all(&data).await.map_err(ApiError::internal)?;
                }
            }
            f.sync_all().await.map_err(ApiError::internal)?;
            Ok(written)
        }
        .await;
        match result {
            Ok(n) => {
                tokio::fs::rename(&tmp, dir.join(&hash))
                    .await
                    .map_err(ApiError::internal)?;
                tracing::info!(team_id = %team, hash = %hash, bytes = n, "template files uploaded");
                Ok(())
            }
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                Err(e)
            }
        }
    }

    /// `POST /v2/templates/{id}/builds/{build}`: validates the request into a [`BuildSpec`] and
    /// queues the build.
    pub async fn start_template_build(
        self: &Arc<Self>,
        team_id: &str,
        template_id: &str,
        build_id: &str,
        req: models::TemplateBuildStartV2,
    ) -> Result<(), ApiError> {
        let files = self.files()?;
        let (template, build) = self.own_build(team_id, template_id, build_id).await?;
        if build.status != BuildStatus::Waiting || build.spec.is_some() {
            return Err(ApiError::BuildAlreadyStarted {
                build_id: build.id,
                status: build.status.to_string(),
            });
        }
        let (from, parent) = self.build_source(team_id, &req).await?;
        let steps = parse_steps(req.steps.as_deref().unwrap_or(&[]))?;
        let team_files = files.team_dir(team_id);
        for (i, s) in steps.iter().enumerate() {
            if let StepKind::Copy { files_hash, .. } = &s.kind
                && !team_files.join(files_hash).is_file()
            {
                return Err(ApiError::InvalidBody {
                    detail: format!(
                        "step {} (COPY) names files {files_hash} that were never uploaded: get \
                         an upload URL with GET /templates/{}/files/{files_hash} and PUT the tar \
                         archive there first",
                        i + 1,
                        template.id
                    ),
                });
            }
        }
        let t = team_id.to_owned();
        let (_, bytes) = self.db(move |s| s.team_template_usage(&t)).await?;
        if bytes >= self.limits.max_template_bytes {
            return Err(ApiError::QuotaExceeded {
                quota: Quota::TemplateBytes,
                used: bytes,
                limit: self.limits.max_template_bytes,
            });
        }
        let cpu = match build.cpu_count {
            0 => parent.cpu_count,
            c => c,
        };
        let mem = match build.memory_mb {
            0 => parent.memory_mb,
            m => m,
        };
        let spec = BuildSpec {
            build_id: build.id.clone(),
            name: template
                .aliases
                .first()
                .cloned()
                .unwrap_or(template.id.clone()),
            from,
            steps,
            start_cmd: req.start_cmd.clone().filter(|c| !c.trim().is_empty()),
            ready_cmd: req.ready_cmd.clone().filter(|c| !c.trim().is_empty()),
            vcpus: cpu,
            memory_mib: mem,
            force: req.force == Some(true),
            files_dir: team_files,
            network: alcove_net::NetworkConfig::default(),
            deadline: self.limits.build_timeout,
        };
        let record = serde_json::json!({
            "from": match &spec.from {
                BuildFrom::Template(t) => serde_json::json!({"template": t}),
                BuildFrom::Image { reference, .. } => serde_json::json!({"image": reference}),
            },
            "steps": spec.steps,
            "startCmd": spec.start_cmd,
            "readyCmd": spec.ready_cmd,
            "force": spec.force,
        })
        .to_string();
        let b = build.id.clone();
        if !self.db(move |s| s.set_build_spec(&b, &record)).await? {
            return Err(ApiError::BuildAlreadyStarted {
                build_id: build.id,
                status: "started".into(),
            });
        }
        tracing::info!(
            template_id = %template.id, build_id = %build.id, steps = spec.steps.len(),
            "template build queued"
        );
        let this = self.clone();
        let span =
            tracing::info_span!("template_build", template_id = %template.id, build_id = %build.id);
        tokio::spawn(
            async move { this.run_build(template.id, build.id, spec).await }.instrument(span),
        );
        Ok(())
    }

    /// The parent of a build: a template the team may use (host, own, or public), or an image.
    async fn build_source(
        &self,
        team_id: &str,
        req: &models::TemplateBuildStartV2,
    ) -> Result<(BuildFrom, TemplateRecord), ApiError> {
        match (&req.from_template, &req.from_image) {
            (Some(_), Some(_)) => Err(ApiError::InvalidBody {
                detail: "give one of `fromTemplate` and `fromImage`, not both".into(),
            }),
            (None, None) => Err(ApiError::InvalidBody {
                detail: "a build needs a parent: `fromTemplate` (e.g. \"base\") or `fromImage`"
                    .into(),
            }),
            (Some(parent), None) => {
                if req.from_image_registry.is_some() {
                    return Err(ApiError::InvalidBody {
                        detail: "`fromImageRegistry` goes with `fromImage`, not `fromTemplate`"
                            .into(),
                    });
                }
                let (t, key) = self.resolve_for_create(team_id, parent).await?;
                Ok((BuildFrom::Template(key), t))
            }
            (None, Some(image)) => {
                if image.trim().is_empty() || image.len() > 512 {
                    return Err(ApiError::InvalidBody {
                        detail: "`fromImage` must be an image reference such as \
                                 registry.example.com/team/app:1"
                            .into(),
                    });
                }
                let registry = match &req.from_image_registry {
                    None => None,
                    Some(r) if r.kind == "registry" => Some(ImageRegistry {
                        username: r.username.clone().unwrap_or_default(),
                        password: r.password.clone().unwrap_or_default(),
                    }),
                    Some(r) => {
                        return Err(ApiError::InvalidBody {
                            detail: format!(
                                "`fromImageRegistry.type` '{}' is not supported: use \
                                 \"registry\" with a user name and password (for ECR or GCR, \
                                 pass a token as the password)",
                                r.kind
                            ),
                        });
                    }
                };
                let base = self.resolve_template("base").await.ok();
                let parent = base.unwrap_or(TemplateRecord {
                    id: "base".into(),
                    team_id: None,
                    build_id: String::new(),
                    cpu_count: 2,
                    memory_mb: 512,
                    disk_size_mb: 4096,
                    envd_version: String::new(),
                    public: true,
                    aliases: vec![],
                    created_at: 0,
                    updated_at: 0,
                });
                Ok((
                    BuildFrom::Image {
                        reference: image.trim().to_owned(),
                        registry,
                    },
                    parent,
                ))
            }
        }
    }

    /// The build task: waits for the template's earlier build, runs this one in the backend
    /// under the build deadline, and records the outcome. Log lines reach the store in batches.
    async fn run_build(self: Arc<Self>, template_id: String, build_id: String, spec: BuildSpec) {
        let lock = self.build_lock(&template_id);
        let _turn = lock.lock().await;
        let b = build_id.clone();
        if let Err(e) = self
            .db(move |s| s.set_build_status(&b, BuildStatus::Building, None))
            .await
        {
            // Interrupted or deleted meanwhile.
            tracing::warn!(error = %chain(&e), "template build not started");
            return;
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<(i64, BuildLogEntry)>();
        let writer = tokio::spawn(write_logs(self.clone(), build_id.clone(), rx));
        let log: BuildLog = {
            let tx = tx.clone();
            Arc::new(move |e: BuildLogEntry| {
                let _ = tx.send((now_ms(), e));
            })
        };
        let say = |level, step, message: String| {
            let _ = tx.send((
                now_ms(),
                BuildLogEntry {
                    level,
                    step,
                    message,
                },
            ));
        };
        use alcove_build_spec::LogLevel as L;
        say(
            L::Info,
            StepRef::Base,
            format!("Building template {}", spec.name),
        );
        let deadline = spec.deadline;
        let started = std::time::Instant::now();
        let outcome = tokio::time::timeout(
            deadline + Duration::from_secs(60),
            self.backend.build_template(spec, log),
        )
        .await;
        let secs = started.elapsed().as_secs_f64();
        let t = template_id.clone();
        let template_exists = self
            .db(move |s| Ok(s.resolve_template(&t)?.is_some()))
            .await
            .unwrap_or(true);
        let b = build_id.clone();
        let result = match outcome {
            Ok(Ok(built)) if template_exists => {
                say(
                    L::Info,
                    StepRef::Finalize,
                    format!(
                        "Template ready in {secs:.1} s ({} of its steps from the cache)",
                        built.cached_steps
                    ),
                );
                let res = (built.vcpus, built.memory_mib, built.disk_mib);
                let key = built.key.clone();
                let bytes = built.stored_bytes;
                drop(tx);
                let _ = writer.await;
                self.db(move |s| s.finish_build(&b, &key, res, bytes).map(|_| ()))
                    .await
            }
            Ok(Ok(built)) => {
                say(
                    L::Error,
                    StepRef::Finalize,
                    "The template was deleted while it was being built".into(),
                );
                drop(tx);
                let _ = writer.await;
                let _ = self.backend.delete_template(&built.key).await;
                self.db(move |s| {
                    s.set_build_status(
                        &b,
                        BuildStatus::Error,
                        Some((
                            "the template was deleted while it was being built",
                            Some("finalize"),
                        )),
                    )
                })
                .await
            }
            Ok(Err(failure)) => {
                say(L::Error, failure.step, failure.message.clone());
                drop(tx);
                let _ = writer.await;
                let step = failure.step.to_string();
                self.db(move |s| {
                    s.set_build_status(
                        &b,
                        BuildStatus::Error,
                        Some((&failure.message, Some(&step))),
                    )
                })
                .await
            }
            Err(_) => {
                let msg = format!(
                    "the build did not finish within {} s (the server's --build-timeout); make \
                     its steps faster or ask the operator for a longer timeout",
                    deadline.as_secs()
                );
                say(L::Error, StepRef::Finalize, msg.clone());
                drop(tx);
                let _ = writer.await;
                self.db(move |s| s.set_build_status(&b, BuildStatus::Error, Some((&msg, None))))
                    .await
            }
        };
        match result {
            Ok(()) => tracing::info!(secs, "template build finished"),
            Err(e) => tracing::error!(error = %chain(&e), "recording the template build failed"),
        }
        self.collect_builds().await;
    }

    /// `GET /templates/{id}/builds/{build}/status`.
    pub async fn template_build_status(
        &self,
        team_id: &str,
        template_id: &str,
        build_id: &str,
        offset: Option<i64>,
        limit: Option<i64>,
        level: Option<&str>,
    ) -> Result<models::TemplateBuildInfo, ApiError> {
        let (t, build) = self.own_build(team_id, template_id, build_id).await?;
        let levels: Option<Vec<&'static str>> = match level {
            None => None,
            Some(l) => {
                let all = ["debug", "info", "warn", "error"];
                let i = all
                    .iter()
                    .position(|x| *x == l)
                    .ok_or_else(|| ApiError::InvalidQuery {
                        detail: format!("level '{l}' is not one of debug, info, warn, error"),
                    })?;
                Some(all[i..].to_vec())
            }
        };
        let offset = offset.unwrap_or(0).max(0);
        let limit = limit.unwrap_or(MAX_LOG_PAGE).clamp(0, MAX_LOG_PAGE);
        let b = build.id.clone();
        let lines = self
            .db(move |s| s.build_logs(&b, offset, limit, levels.as_deref()))
            .await?;
        let entries: Vec<models::BuildLogEntry> = lines.iter().map(log_view).collect();
        let reason = match (build.status, &build.reason) {
            (BuildStatus::Error, Some(message)) => {
                let b = build.id.clone();
                let step = build.reason_step.clone();
                let tail = self
                    .db(move |s| {
                        let all = s.build_logs(&b, 0, alcove_store::MAX_BUILD_LOG_LINES, None)?;
                        let of_step: Vec<_> = all
                            .into_iter()
                            .filter(|l| step.is_none() || l.step == step)
                            .collect();
                        let from = of_step.len().saturating_sub(REASON_LINES);
                        Ok(of_step[from..].to_vec())
                    })
                    .await?;
                Some(models::BuildStatusReason {
                    message: message.clone(),
                    step: build.reason_step.clone(),
                    log_entries: tail.iter().map(log_view).collect(),
                })
            }
            _ => None,
        };
        Ok(models::TemplateBuildInfo {
            logs: entries.iter().map(|e| e.message.clone()).collect(),
            log_entries: entries,
            template_id: t.id,
            build_id: build.id,
            status: build.status.to_string(),
            reason,
        })
    }

    /// `POST /templates/tags`: points tags at the build `target` (`name:tag`, or `name` for its
    /// newest build) names.
    pub async fn assign_template_tags(
        &self,
        team_id: &str,
        req: models::AssignTemplateTagsRequest,
    ) -> Result<models::AssignedTemplateTags, ApiError> {
        for t in &req.tags {
            check_name("tag", t)?;
        }
        if req.tags.is_empty() {
            return Err(ApiError::InvalidBody {
                detail: "`tags` is empty: name at least one tag to assign".into(),
            });
        }
        let (name, tag) = split_tag(&req.target);
        let t = self.own_template_to(team_id, name, "tag").await?;
        let build_id = self.build_of(&t, tag).await?;
        let (tid, bid, tags) = (t.id.clone(), build_id.clone(), req.tags.clone());
        self.db(move |s| s.assign_tags(&tid, &bid, &tags)).await?;
        self.collect_builds().await;
        Ok(models::AssignedTemplateTags {
            tags: req.tags,
            build_id,
        })
    }

    /// `DELETE /templates/tags`.
    pub async fn remove_template_tags(
        &self,
        team_id: &str,
        req: models::DeleteTemplateTagsRequest,
    ) -> Result<(), ApiError> {
        let (name, _) = split_tag(&req.name);
        let t = self.own_template_to(team_id, name, "untag").await?;
        let (tid, tags) = (t.id.clone(), req.tags.clone());
        let missing = self.db(move |s| s.remove_tags(&tid, &tags)).await?;
        if let Some(tag) = missing.into_iter().next() {
            return Err(ApiError::TagNotFound {
                template: name.to_owned(),
                tag,
            });
        }
        self.collect_builds().await;
        Ok(())
    }

    /// `GET /templates/{id}/tags`.
    pub async fn template_tags(
        &self,
        team_id: &str,
        id: &str,
    ) -> Result<Vec<models::TemplateTag>, ApiError> {
        let t = self.own_template(team_id, id).await?;
        let tags = self.db(move |s| s.tags(&t.id)).await?;
        Ok(tags
            .into_iter()
            .map(|g| models::TemplateTag {
                tag: g.tag,
                build_id: g.build_id,
                created_at: rfc3339(g.created_at),
            })
            .collect())
    }

    /// `PATCH /templates/{id}`: public or private.
    pub async fn update_template(
        &self,
        team_id: &str,
        id: &str,
        req: models::TemplateUpdateRequest,
    ) -> Result<models::TemplateUpdateResponse, ApiError> {
        let t = self.own_template_to(team_id, id, "change").await?;
        if let Some(public) = req.public {
            let tid = t.id.clone();
            self.db(move |s| s.set_template_public(&tid, public))
                .await?;
            tracing::info!(template_id = %t.id, public, "template visibility changed");
        }
        Ok(models::TemplateUpdateResponse { names: t.aliases })
    }

    /// `DELETE /templates/{id}` of a team's template: gone from listings and creates at once;
    /// sandboxes made from it keep running, and its files go once none needs them.
    pub async fn delete_team_template(&self, team_id: &str, id: &str) -> Result<(), ApiError> {
        let t = self.own_template(team_id, id).await?;
        let tid = t.id.clone();
        self.db(move |s| s.delete_team_template(&tid)).await?;
        tracing::info!(template_id = %t.id, team_id, "template deleted");
        self.collect_builds().await;
        Ok(())
    }

    /// The build a template's `tag` names (or its newest ready build).
    async fn build_of(&self, t: &TemplateRecord, tag: Option<&str>) -> Result<String, ApiError> {
        let name = t.aliases.first().cloned().unwrap_or(t.id.clone());
        match tag {
            Some(tag) => {
                let (tid, tg) = (t.id.clone(), tag.to_owned());
                self.db(move |s| s.tagged_build(&tid, &tg))
                    .await?
                    .ok_or_else(|| ApiError::TagNotFound {
                        template: name,
                        tag: tag.to_owned(),
                    })
            }
            None if t.build_id.is_empty() => Err(ApiError::TemplateNotReady { template: name }),
            None => Ok(t.build_id.clone()),
        }
    }

    /// What a create (or a build's `fromTemplate`) names: `id`, `alias` or `name:tag`, visible to
    /// the team (the host's, its own, or public). Answers the record (with the build's
    /// resources) and the backend's id for it (a host template's id, a built template's key).
    pub(super) async fn resolve_for_create(
        &self,
        team_id: &str,
        name: &str,
    ) -> Result<(TemplateRecord, String), ApiError> {
        let (base, tag) = split_tag(name);
        let mut t = self.resolve_template(base).await?;
        match t.team_id.as_deref() {
            None => {
                if tag.is_some_and(|g| !matches!(g, "default" | "latest")) {
                    return Err(ApiError::TagNotFound {
                        template: base.to_owned(),
                        tag: tag.unwrap_or_default().to_owned(),
                    });
                }
                let id = t.id.clone();
                Ok((t, id))
            }
            Some(owner) if owner != team_id && !t.public => Err(ApiError::TemplateNotFound {
                template: name.to_owned(),
            }),
            Some(_) => {
                let build_id = self.build_of(&t, tag).await?;
                let b = build_id.clone();
                let build = self
                    .db(move |s| s.build(&b))
                    .await?
                    .filter(|b| b.status == BuildStatus::Ready)
                    .ok_or_else(|| ApiError::TemplateNotReady {
                        template: name.to_owned(),
                    })?;
                let key = build.image_key.ok_or_else(|| ApiError::TemplateNotReady {
                    template: name.to_owned(),
                })?;
                t.build_id = build.id;
                t.cpu_count = build.cpu_count;
                t.memory_mb = build.memory_mb;
                t.disk_size_mb = build.disk_size_mb;
                Ok((t, key))
            }
        }
    }

    /// Hands back the files of builds no one can reach (superseded and untagged, or of a
    /// deleted template) to the backend, which keeps them while sandboxes need them.
    pub async fn collect_builds(&self) {
        let gone = match self.db(|s| s.unreachable_builds()).await {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(error = %chain(&e), "listing unused template builds failed");
                return;
            }
        };
        for b in gone {
            let id = b.id.clone();
            let shared = match self.db(move |s| s.mark_build_deleted(&id)).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(build_id = %b.id, error = %chain(&e), "marking a build collected failed");
                    continue;
                }
            };
            let Some(key) = b.image_key.filter(|_| !shared) else {
                continue;
            };
            match self
                .call(
                    BackendOp::DeleteTemplate,
                    &key,
                    self.backend.delete_template(&key),
                )
                .await
            {
                Ok(()) => tracing::info!(build_id = %b.id, key, "unused template build collected"),
                Err(e) => {
                    let e = api_error(BackendOp::DeleteTemplate, &key, e);
                    tracing::warn!(build_id = %b.id, error = %chain(&e), "collecting a template build failed")
                }
            }
        }
    }

    /// At startup: builds the previous process was running or had queued can't finish. On a
    /// cluster, whose control-plane replicas share the store, another replica may be running
    /// them: only builds too old to be alive anywhere (past the build deadline, with a margin)
    /// are interrupted, at startup and by the replica on duty from then on
    /// ([`Service::interrupt_stale_builds`]).
    pub async fn interrupt_builds(&self) -> Result<usize, ApiError> {
        let shared = self.backend.nodes().is_some();
        self.interrupt_builds_older(shared).await
    }

    /// On a cluster: builds a replica that died was running or had queued, once they are past
    /// any deadline. Called by the reaper on the replica on duty.
    pub async fn interrupt_stale_builds(&self) {
        if self.backend.nodes().is_none() {
            return;
        }
        if let Err(e) = self.interrupt_builds_older(true).await {
            tracing::warn!(error = %chain(&e), "interrupting stale template builds failed");
        }
    }

    async fn interrupt_builds_older(&self, only_stale: bool) -> Result<usize, ApiError> {
        // A build task gives up a minute after the build's deadline; five is beyond any doubt.
        let stale_before =
            now_ms() - (self.limits.build_timeout + Duration::from_secs(300)).as_millis() as i64;
        let n = self
            .db(move |s| {
                let mut n = 0;
                for status in [BuildStatus::Building, BuildStatus::Waiting] {
                    for b in s.builds_in(status)? {
                        // Never triggered (no spec yet): nothing runs it anywhere, and its
                        // caller may still start it.
                        if only_stale && (b.updated_at > stale_before || b.spec.is_none()) {
                            continue;
                        }
                        let why = if only_stale {
                            "interrupted: the control-plane replica running the build stopped; \
                             start the build again"
                        } else {
                            "interrupted: the server restarted during the build; start the \
                             build again"
                        };
                        s.set_build_status(&b.id, BuildStatus::Error, Some((why, None)))?;
                        n += 1;
                    }
                }
                Ok(n)
            })
            .await?;
        if n > 0 {
            tracing::warn!(builds = n, "template builds interrupted by the restart");
        }
        Ok(n)
    }
}

/// Batches a build's log lines into the store (every 200 ms or 200 lines), cutting long lines.
async fn write_logs(
    svc: Arc<Service>,
    build_id: String,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<(i64, BuildLogEntry)>,
) {
    let mut batch: Vec<(i64, BuildLogEntry)> = Vec::new();
    let mut full = false;
    loop {
        let got = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await;
        let closed = matches!(got, Ok(None));
        if let Ok(Some(line)) = got {
            batch.push(line);
            while batch.len() < 200 {
                match rx.try_recv() {
                    Ok(l) => batch.push(l),
                    Err(_) => break,
                }
            }
        }
        if !batch.is_empty() && !full {
            let lines: Vec<(i64, String, Option<String>, String)> = batch
                .drain(..)
                .map(|(at, e)| {
                    let mut m = e.message;
                    if m.len() > MAX_LOG_LINE {
                        let mut cut = MAX_LOG_LINE;
                        while !m.is_char_boundary(cut) {
                            cut -= 1;
                        }
                        m.truncate(cut);
                        m.push_str(" […]");
                    }
                    let level = match e.level {
                        alcove_build_spec::LogLevel::Debug => "debug",
                        alcove_build_spec::LogLevel::Info => "info",
                        alcove_build_spec::LogLevel::Warn => "warn",
                        alcove_build_spec::LogLevel::Error => "error",
                    };
                    (at, level.to_string(), Some(e.step.to_string()), m)
                })
                .collect();
            let n = lines.len();
            let b = build_id.clone();
            match svc
                .db(move |s| {
                    let refs: Vec<(i64, &str, Option<&str>, &str)> = lines
                        .iter()
                        .map(|(a, l, s, m)| (*a, l.as_str(), s.as_deref(), m.as_str()))
                        .collect();
                    s.append_build_logs(&b, &refs)
                })
                .await
            {
                Ok(kept) if kept < n => full = true,
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %chain(&e), "storing build log lines failed"),
            }
        }
        batch.clear();
        if closed {
            return;
        }
    }
}

fn log_view(l: &alcove_store::BuildLogRecord) -> models::BuildLogEntry {
    models::BuildLogEntry {
        timestamp: rfc3339(l.at),
        message: l.message.clone(),
        level: l.level.clone(),
        step: l.step.clone(),
    }
}

/// A new template id: 20 lowercase letters and digits, as E2B's.
fn new_template_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    rand::random::<[u8; 20]>()
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

/// E2B's steps as [`Step`]s: each type's arguments checked, anything else refused by index.
fn parse_steps(steps: &[models::TemplateStep]) -> Result<Vec<Step>, ApiError> {
    if steps.len() > MAX_STEPS {
        return Err(ApiError::InvalidBody {
            detail: format!(
                "{} steps; a build may have at most {MAX_STEPS}",
                steps.len()
            ),
        });
    }
    let mut out = Vec::with_capacity(steps.len());
    for (i, s) in steps.iter().enumerate() {
        let n = i + 1;
        let args = s.args.clone().unwrap_or_default();
        let bad = |what: String| ApiError::InvalidBody {
            detail: format!("step {n} ({}): {what}", s.kind),
        };
        let arg = |j: usize| args.get(j).map(|a| a.as_str()).filter(|a| !a.is_empty());
        let kind = match s.kind.as_str() {
            "RUN" => {
                let cmd =
                    arg(0).ok_or_else(|| bad("needs a command as its first argument".into()))?;
                StepKind::Run {
                    cmd: cmd.to_owned(),
                    user: arg(1).map(str::to_owned),
                }
            }
            "COPY" => {
                let src = arg(0).ok_or_else(|| bad("needs [src, dest, owner, mode]".into()))?;
                let dest = arg(1).ok_or_else(|| bad("needs a destination path".into()))?;
                let files_hash = s.files_hash.clone().ok_or_else(|| {
                    bad("needs `filesHash`, the hash the files were uploaded under".into())
                })?;
                check_files_hash(&files_hash)
                    .map_err(|_| bad(format!("`filesHash` '{files_hash}' is not 64 hex digits")))?;
                let mode = match arg(3) {
                    None => None,
                    Some(m) => Some(
                        u32::from_str_radix(m, 8)
                            .ok()
                            .filter(|m| *m <= 0o7777)
                            .ok_or_else(|| bad(format!("mode '{m}' is not an octal file mode")))?,
                    ),
                };
                StepKind::Copy {
                    files_hash: files_hash.to_ascii_lowercase(),
                    src: src.to_owned(),
                    dest: dest.to_owned(),
                    owner: arg(2).map(str::to_owned),
                    mode,
                }
            }
            "ENV" => {
                if args.is_empty() || args.len() % 2 != 0 {
                    return Err(bad("needs name/value pairs: [NAME, value, ...]".into()));
                }
                let mut vars = Vec::new();
                for pair in args.chunks(2) {
                    let ok = !pair[0].is_empty()
                        && pair[0]
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
                        && !pair[0].as_bytes()[0].is_ascii_digit();
                    if !ok {
                        return Err(bad(format!(
                            "'{}' is not an environment variable name",
                            pair[0]
                        )));
                    }
                    vars.push((pair[0].clone(), pair[1].clone()));
                }
                StepKind::Env { vars }
            }
            "WORKDIR" => StepKind::Workdir {
                path: arg(0).ok_or_else(|| bad("needs a path".into()))?.to_owned(),
            },
            "USER" => {
                let user = arg(0).ok_or_else(|| bad("needs a user name".into()))?;
                let ok = user.len() <= 32
                    && user
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
                if !ok {
                    return Err(bad(format!("'{user}' is not a user name")));
                }
                StepKind::User {
                    user: user.to_owned(),
                }
            }
            other => {
                return Err(ApiError::InvalidBody {
                    detail: format!(
                        "step {n} has type '{other}', which is not supported; steps are RUN, \
                         COPY, ENV, WORKDIR and USER"
                    ),
                });
            }
        };
        out.push(Step {
            kind,
            force: s.force == Some(true),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(kind: &str, args: &[&str], hash: Option<&str>) -> models::TemplateStep {
        models::TemplateStep {
            kind: kind.into(),
            args: Some(args.iter().map(|a| a.to_string()).collect()),
            files_hash: hash.map(str::to_owned),
            force: None,
            force_upload: None,
        }
    }

    #[test]
    fn steps_parse_and_bad_ones_name_their_index() {
        let h = "a".repeat(64);
        let steps = parse_steps(&[
            step("RUN", &["echo hi", "root"], None),
            step("COPY", &["app", "/app/", "user", "0755"], Some(&h)),
            step("ENV", &["A", "1", "B", "two"], None),
            step("WORKDIR", &["/app"], None),
            step("USER", &["user"], None),
        ])
        .unwrap();
        assert_eq!(
            steps[1].kind,
            StepKind::Copy {
                files_hash: h.clone(),
                src: "app".into(),
                dest: "/app/".into(),
                owner: Some("user".into()),
                mode: Some(0o755)
            }
        );
        let e = parse_steps(&[step("RUN", &["x"], None), step("HEALTHCHECK", &["x"], None)])
            .unwrap_err();
        assert!(
            format!("{:?}", e).contains("step 2 has type 'HEALTHCHECK'"),
            "{e:?}"
        );
        let e = parse_steps(&[step("COPY", &["a", "/b"], None)]).unwrap_err();
        assert!(format!("{e:?}").contains("filesHash"), "{e:?}");
        let e = parse_steps(&[step("ENV", &["1X", "v"], None)]).unwrap_err();
        assert!(format!("{e:?}").contains("not an environment variable name"));
        let e = parse_steps(&[step("COPY", &["a", "/b", "", "999"], Some(&h))]).unwrap_err();
        assert!(format!("{e:?}").contains("octal"));
    }

    #[test]
    fn upload_tokens_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let f = TemplateFiles::open(dir.path().join("f"), &dir.path().join("k")).unwrap();
        let h = "b".repeat(64);
        let tok = f.token("team", &h, now_ms() + 60_000);
        let (team, hash, _, _) = f.check(&tok).unwrap();
        assert_eq!((team.as_str(), hash.as_str()), ("team", h.as_str()));
        // Another team in the payload: the signature no longer matches.
        let forged = tok.replacen("team", "evil", 1);
        assert!(f.check(&forged).is_err());
        let old = f.token("team", &h, now_ms() - 1);
        assert!(matches!(
            f.check(&old),
            Err(ApiError::UploadRejected { reason }) if reason.contains("expired")
        ));
        // The key persists: a reopened server accepts its earlier URLs.
        let f2 = TemplateFiles::open(dir.path().join("f"), &dir.path().join("k")).unwrap();
        assert!(f2.check(&tok).is_ok());
    }

    #[test]
    fn names_and_tags() {
        assert_eq!(split_tag("app:v1"), ("app", Some("v1")));
        assert_eq!(split_tag("app"), ("app", None));
        assert!(check_name("n", "my-app.v2").is_ok());
        assert!(check_name("n", "My").is_err());
        assert!(check_name("n", "-x").is_err());
        assert!(check_name("n", "").is_err());
    }
}

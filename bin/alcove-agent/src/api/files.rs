//! `GET /files` (download) and `POST /files` (upload: multipart with one or many `file` parts,
//! or a raw `application/octet-stream` body, optionally gzip-encoded), as envd.
//!
//! Bodies are streamed chunk by chunk between the HTTP stream and the file: nothing is held
//! whole in memory, whatever the file size. Files are opened with the requesting user's
//! credentials (`fs::as_user`), so the kernel decides access (traversal into other users'
//! files fails) and new files and directories belong to that user.
//!
//! Auth: with an access token set, the call carries it in `X-Access-Token`, or is a signed URL
//! (`signature=v1_<base64(sha256(path:op:user:token[:expiration]))>`, `signature_expiration`).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Query, Request, State};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use futures::StreamExt;
use http::{HeaderMap, StatusCode, header};
use serde::Deserialize;
use sha2::Digest;
use tokio::io::AsyncWriteExt;

use super::{ACCESS_TOKEN_HEADER, ApiError};
use crate::fs::{self, as_user};
use crate::state::{AgentState, Counters, constant_time_eq};
use crate::users::UserInfo;

const METADATA_HEADER_PREFIX: &str = "x-metadata-";
const READ_CHUNK: usize = 64 * 1024;

#[derive(Debug, Default, Deserialize)]
pub struct FilesQuery {
    pub path: Option<String>,
    pub username: Option<String>,
    pub signature: Option<String>,
    pub signature_expiration: Option<i64>,
}

#[derive(Debug, Clone, Copy)]
enum Operation {
    Read,
    Write,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Operation::Read => "read",
            Operation::Write => "write",
        }
    }
}

/// envd's URL signature for a path, operation and user.
pub fn signature(path: &str, op: &str, user: &str, token: &str, expiration: Option<i64>) -> String {
    let raw = match expiration {
        Some(exp) => format!("{path}:{op}:{user}:{token}:{exp}"),
        None => format!("{path}:{op}:{user}:{token}"),
    };
    let digest = sha2::Sha256::digest(raw.as_bytes());
    format!(
        "v1_{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    )
}

fn authorize(
    state: &AgentState,
    headers: &HeaderMap,
    q: &FilesQuery,
    op: Operation,
) -> Result<(), ApiError> {
    let Some(token) = state.token() else {
        return Ok(());
    };
    let fail = || {
        Counters::inc(&state.counters.unauthorized);
        Err(ApiError::Unauthorized)
    };
    if let Some(h) = headers
        .get(ACCESS_TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        return if constant_time_eq(h.as_bytes(), token.as_bytes()) {
            Ok(())
        } else {
            fail()
        };
    }
    let Some(sig) = &q.signature else {
        return fail();
    };
    let expected = signature(
        q.path.as_deref().unwrap_or(""),
        op.as_str(),
        q.username.as_deref().unwrap_or(""),
        &token,
        q.signature_expiration,
    );
    if !constant_time_eq(expected.as_bytes(), sig.as_bytes()) {
        return fail();
    }
    if let Some(exp) = q.signature_expiration {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        if exp < now {
            Counters::inc(&state.counters.unauthorized);
            return Err(ApiError::Forbidden(
                "the signed URL has expired; sign a new one".into(),
            ));
        }
    }
    Ok(())
}

fn user_for(state: &AgentState, q: &FilesQuery) -> Result<UserInfo, ApiError> {
    state
        .resolve_user(q.username.as_deref().filter(|u| !u.is_empty()))
        .map_err(|e| ApiError::BadRequest(crate::rpc::error_chain(&e)))
}

fn resolve(state: &AgentState, user: &UserInfo, path: &str) -> Result<PathBuf, ApiError> {
    let workdir = state.defaults().workdir;
    crate::paths::resolve(path, user, workdir.as_deref())
        .map_err(|e| ApiError::BadRequest(e.to_string()))
}

/// An I/O failure on `path` as an HTTP error envd's clients map (404, 403, 507, ...).
fn io_error(what: &str, path: &Path, e: io::Error) -> ApiError {
    use io::ErrorKind as K;
    let msg = format!("{what} '{}': {e}", path.display());
    match e.kind() {
        K::NotFound => ApiError::NotFound(msg),
        K::PermissionDenied => ApiError::Forbidden(format!(
            "{msg} (file access runs as the requesting user; pick a path that user may access, or user 'root')"
        )),
        K::StorageFull | K::QuotaExceeded | K::FileTooLarge => ApiError::NoSpace(msg),
        K::IsADirectory | K::NotADirectory | K::InvalidInput => ApiError::BadRequest(msg),
        K::Unsupported => ApiError::BadRequest(format!(
            "{msg} (this filesystem keeps no file metadata, as mounted volumes don't; write the file without metadata)"
        )),
        _ => ApiError::Internal(msg),
    }
}

async fn run_as<T, F>(user: &UserInfo, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
{
    as_user(user, f)
        .await
        .map_err(|e| ApiError::Internal(crate::rpc::error_chain(&e)))?
}

pub async fn download(
    State(state): State<Arc<AgentState>>,
    Query(q): Query<FilesQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, &q, Operation::Read)?;
    let user = user_for(&state, &q)?;
    let path = resolve(&state, &user, q.path.as_deref().unwrap_or(""))?;
    let p = path.clone();
    let (file, len) = run_as(&user, move || {
        let file = std::fs::File::open(&p).map_err(|e| io_error("open", &p, e))?;
        let meta = file.metadata().map_err(|e| io_error("stat", &p, e))?;
        if meta.is_dir() {
            return Err(ApiError::BadRequest(format!(
                "path '{}' is a directory; list it with filesystem.Filesystem/ListDir",
                p.display()
            )));
        }
        Ok((file, meta.len()))
    })
    .await?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().replace('"', "_"))
        .unwrap_or_default();
    let stream =
        tokio_util::io::ReaderStream::with_capacity(tokio::fs::File::from_std(file), READ_CHUNK);
    Ok((
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, len.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("inline; filename=\"{name}\""),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

pub async fn upload(
    State(state): State<Arc<AgentState>>,
    Query(q): Query<FilesQuery>,
    req: Request,
) -> Result<Response, ApiError> {
    let checked =
        authorize(&state, req.headers(), &q, Operation::Write).and_then(|()| user_for(&state, &q));
    let user = match checked {
        Ok(user) => user,
        Err(e) => {
            super::drain_refused(req.into_body()).await;
            return Err(e);
        }
    };
    let metadata = metadata_headers(req.headers());
    let ct = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let mut written: Vec<serde_json::Value> = Vec::new();
    if ct.starts_with("multipart/form-data") {
        let mut mp = Multipart::from_request(req, &())
            .await
            .map_err(|e| ApiError::BadRequest(format!("multipart body: {e}")))?;
        let mut seen: Vec<PathBuf> = Vec::new();
        loop {
            let field = match mp.next_field().await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Err(ApiError::BadRequest(format!("multipart body: {e}"))),
            };
            if field.name() != Some("file") {
                continue;
            }
            let target = match (&q.path, field.file_name()) {
                (Some(p), _) => p.clone(),
                (None, Some(f)) => f.to_owned(),
                (None, None) => {
                    return Err(ApiError::BadRequest(
                        "each file part needs a filename, or pass ?path= for a single file".into(),
                    ));
                }
            };
            let path = resolve(&state, &user, &target)?;
            if seen.contains(&path) {
                return Err(ApiError::BadRequest(format!(
                    "you cannot upload multiple files to the same path '{}' in one upload request",
                    path.display()
                )));
            }
            let mut file = open_for_write(&user, &path).await?;
            let mut field = field;
            loop {
                match field.chunk().await {
                    Ok(Some(chunk)) => file
                        .write_all(&chunk)
                        .await
                        .map_err(|e| io_error("write", &path, e))?,
                    Ok(None) => break,
                    Err(e) => return Err(ApiError::BadRequest(format!("multipart body: {e}"))),
                }
            }
            file.flush()
                .await
                .map_err(|e| io_error("write", &path, e))?;
            drop(file);
            written.push(finish(&user, &path, metadata.clone()).await?);
            seen.push(path);
        }
        if written.is_empty() {
            return Err(ApiError::BadRequest(
                "no 'file' part in the multipart body".into(),
            ));
        }
    } else if ct.starts_with("application/octet-stream") || ct.is_empty() {
        let Some(target) = &q.path else {
            return Err(ApiError::BadRequest(
                "path query parameter is required for raw body upload".into(),
            ));
        };
        let path = resolve(&state, &user, target)?;
        let gzip = req
            .headers()
            .get(header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("gzip"));
        let file = open_for_write(&user, &path).await?;
        let body = req.into_body().into_data_stream();
        if gzip {
            write_gzip(body, file, &path).await?;
        } else {
            let mut file = file;
            let mut body = body;
            while let Some(chunk) = body.next().await {
                let chunk = chunk
                    .map_err(|e| ApiError::BadRequest(format!("request body broke off: {e}")))?;
                file.write_all(&chunk)
                    .await
                    .map_err(|e| io_error("write", &path, e))?;
            }
            file.flush()
                .await
                .map_err(|e| io_error("write", &path, e))?;
        }
        written.push(finish(&user, &path, metadata).await?);
    } else {
        return Err(ApiError::BadRequest(format!(
            "unsupported content type: {ct}, expected multipart/form-data or application/octet-stream"
        )));
    }
    Ok((StatusCode::OK, axum::Json(written)).into_response())
}

/// Creates missing parent directories and opens `path` for writing, all as `user`.
async fn open_for_write(user: &UserInfo, path: &Path) -> Result<tokio::fs::File, ApiError> {
    let p = path.to_path_buf();
    let (uid, gid) = (user.uid, user.gid);
    let f = run_as(user, move || {
        if let Some(parent) = p.parent() {
            fs::ensure_dirs(parent).map_err(|e| io_error("create directory", parent, e))?;
        }
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o666)
            .open(&p)
            .map_err(|e| io_error("open for writing", &p, e))?;
        // envd chowns the file to the user here, between create and write, and file watchers
        // see that as a CHMOD event: the SDKs' users count on create, chmod, write. The file
        // is already the user's when created as the user; one owned by someone else (and
        // writable) stays theirs: the user cannot give it away, and the write goes on.
        let _ = nix::unistd::fchown(&f, Some(uid), Some(gid));
        Ok(f)
    })
    .await?;
    Ok(tokio::fs::File::from_std(f))
}

/// Decompresses a gzip body into the file on a blocking thread, fed chunk by chunk.
async fn write_gzip(
    body: axum::body::BodyDataStream,
    file: tokio::fs::File,
    path: &Path,
) -> Result<(), ApiError> {
    let reader = tokio_util::io::StreamReader::new(body.map(|r| r.map_err(io::Error::other)));
    let bridge = tokio_util::io::SyncIoBridge::new(reader);
    let mut std_file = file.into_std().await;
    let p = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut dec = flate2::read::GzDecoder::new(bridge);
        io::copy(&mut dec, &mut std_file).map_err(|e| {
            if e.kind() == io::ErrorKind::InvalidData || e.kind() == io::ErrorKind::InvalidInput {
                ApiError::BadRequest(format!("gzip body of '{}' is invalid: {e}", p.display()))
            } else {
                io_error("write", &p, e)
            }
        })
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    Ok(())
}

/// Stores metadata (as the user) and describes the written file.
async fn finish(
    user: &UserInfo,
    path: &Path,
    metadata: HashMap<String, String>,
) -> Result<serde_json::Value, ApiError> {
    let p = path.to_path_buf();
    run_as(user, move || {
        fs::write_metadata(&p, &metadata).map_err(|e| io_error("store metadata on", &p, e))?;
        let mut v = serde_json::json!({
            "path": p.to_string_lossy(),
            "name": p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            "type": "file",
        });
        // The file's metadata is now exactly what was given: no need to read it back.
        if !metadata.is_empty() {
            v["metadata"] = serde_json::json!(metadata);
        }
        Ok(v)
    })
    .await
}

fn metadata_headers(h: &HeaderMap) -> HashMap<String, String> {
    h.iter()
        .filter_map(|(k, v)| {
            let key = k.as_str().strip_prefix(METADATA_HEADER_PREFIX)?;
            Some((key.to_ascii_lowercase(), v.to_str().ok()?.to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_sdk() {
        // The SDK: base64(sha256("path:op:user:token")) without padding, prefixed v1_.
        let s = signature("/home/user/a.txt", "read", "user", "tok", None);
        assert!(s.starts_with("v1_"));
        assert!(!s.ends_with('='));
        assert_ne!(
            s,
            signature("/home/user/a.txt", "write", "user", "tok", None)
        );
        assert_ne!(
            s,
            signature("/home/user/a.txt", "read", "user", "tok", Some(1))
        );
    }
}

//! The sandbox's file browser: directory listings (envd's `ListDir`), downloads and uploads
//! (envd's `/files`), as the default user.
//!
//! A download is always served as an attachment of type `application/octet-stream`, sandboxed by
//! its CSP: a file the sandbox wrote never renders as a page on the dashboard's origin.

use alcove_envd_proto::filesystem::{EntryInfo, FileType, ListDirRequest, ListDirResponse};
use axum::body::Body;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use minijinja::context;
use serde::Deserialize;

use super::envd::Guest;
use super::sandboxes::done;
use super::{Signed, api_error_page, page};
use crate::error::ApiError;
use crate::handlers::AppState;

#[derive(Deserialize)]
pub struct PathQuery {
    #[serde(default)]
    path: String,
    #[serde(default)]
    done: Option<String>,
}

/// The directory shown when none is asked for.
const HOME: &str = "/home/user";
/// Entries shown in one listing.
const MAX_ENTRIES: usize = 2000;

fn parent(path: &str) -> Option<String> {
    let p = path.trim_end_matches('/');
    if p.is_empty() {
        return None;
    }
    Some(match p.rsplit_once('/') {
        Some(("", _)) | None => "/".to_owned(),
        Some((dir, _)) => dir.to_owned(),
    })
}

fn encode(path: &str) -> String {
    form_urlencoded::byte_serialize(path.as_bytes()).collect()
}

#[derive(serde::Serialize)]
struct Entry {
    name: String,
    path: String,
    dir: bool,
    size: i64,
    permissions: String,
    link: Option<String>,
}

fn entry(e: EntryInfo) -> Entry {
    Entry {
        dir: e.r#type == FileType::Directory as i32,
        name: e.name,
        path: e.path,
        size: e.size,
        permissions: e.permissions,
        link: e.symlink_target,
    }
}

pub async fn list(
    State(svc): State<AppState>,
    signed: Signed,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> Response {
    let back = format!("/dashboard/sandboxes/{id}");
    let path = match q.path.trim() {
        "" => HOME.to_owned(),
        p => p.to_owned(),
    };
    let guest = match Guest::open(&svc, &signed.team_id, &id).await {
        Ok(g) => g,
        Err(e) => return api_error_page(e, &back, &signed),
    };
    let listed = guest
        .unary::<_, ListDirResponse>(
            "/filesystem.Filesystem/ListDir",
            &ListDirRequest {
                path: path.clone(),
                depth: 1,
            },
        )
        .await;
    let (entries, error) = match listed {
        Ok(r) => {
            let mut v: Vec<Entry> = r.entries.into_iter().map(entry).collect();
            v.sort_by(|a, b| b.dir.cmp(&a.dir).then_with(|| a.name.cmp(&b.name)));
            v.truncate(MAX_ENTRIES);
            (v, None)
        }
        Err(e) => (Vec::new(), Some(e.parts().2)),
    };
    page(
        StatusCode::OK,
        "files.html",
        context! {
            session => signed.ctx(),
            section => "sandboxes",
            notice => q.done.filter(|n| !n.is_empty()),
            id => id,
            path => path,
            path_q => encode(&path),
            parent => parent(&path),
            entries => entries,
            error => error,
            max_upload_mib => svc.limits().max_body_bytes >> 20,
        },
    )
}

pub async fn download(
    State(svc): State<AppState>,
    signed: Signed,
    Path(id): Path<String>,
    Query(q): Query<PathQuery>,
) -> Response {
    let back = format!("/dashboard/sandboxes/{id}/files");
    let guest = match Guest::open(&svc, &signed.team_id, &id).await {
        Ok(g) => g,
        Err(e) => return api_error_page(e, &back, &signed),
    };
    let res = guest
        .send(
            Method::GET,
            &format!("/files?path={}&username=user", encode(&q.path)),
            None,
            Body::empty(),
        )
        .await;
    let res = match res {
        Ok(r) => r,
        Err(e) => return api_error_page(e, &back, &signed),
    };
    let name = q
        .path
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty())
        .unwrap_or("download");
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let len = res.headers().get(header::CONTENT_LENGTH).cloned();
    let mut out = Response::new(res.into_body());
    let h = out.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!(
        "attachment; filename=\"{ascii}\"; filename*=UTF-8''{}",
        encode(name).replace('+', "%20")
    )) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    if let Some(len) = len {
        h.insert(header::CONTENT_LENGTH, len);
    }
    super::secure_headers(h);
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox; default-src 'none'"),
    );
    out
}

pub async fn upload(
    State(svc): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Path(id): Path<String>,
    mut form: Multipart,
) -> Response {
    let back = format!("/dashboard/sandboxes/{id}/files");
    let (mut csrf, mut dir, mut file) = (String::new(), String::new(), None);
    loop {
        match form.next_field().await {
            Ok(Some(f)) => match f.name().unwrap_or("") {
                "csrf" => csrf = f.text().await.unwrap_or_default(),
                "dir" => dir = f.text().await.unwrap_or_default(),
                "file" => {
                    let name = f.file_name().unwrap_or("").to_owned();
                    match f.bytes().await {
                        Ok(b) => file = Some((name, b)),
                        Err(e) => {
                            return api_error_page(
                                ApiError::InvalidBody {
                                    detail: format!(
                                        "the upload could not be read ({e}); files up to {} MiB \
                                         go through the dashboard, larger ones through the \
                                         SDK's files.write",
                                        svc.limits().max_body_bytes >> 20
                                    ),
                                },
                                &back,
                                &signed,
                            );
                        }
                    }
                }
                _ => {}
            },
            Ok(None) => break,
            Err(e) => {
                return api_error_page(
                    ApiError::InvalidBody {
                        detail: format!("the upload form could not be read: {e}"),
                    },
                    &back,
                    &signed,
                );
            }
        }
    }
    if let Some(res) = signed.refuse(&headers, &csrf) {
        return res;
    }
    let Some((name, bytes)) = file.filter(|(n, _)| !n.is_empty()) else {
        return api_error_page(
            ApiError::InvalidBody {
                detail: "choose a file to upload".into(),
            },
            &back,
            &signed,
        );
    };
    if name.contains('/') || name == ".." || name == "." {
        return api_error_page(
            ApiError::InvalidBody {
                detail: format!("`{name}` is not a file name"),
            },
            &back,
            &signed,
        );
    }
    let dir = match dir.trim() {
        "" => HOME.to_owned(),
        d => d.trim_end_matches('/').to_owned(),
    };
    let dest = format!("{dir}/{name}");
    let guest = match Guest::open(&svc, &signed.team_id, &id).await {
        Ok(g) => g,
        Err(e) => return api_error_page(e, &back, &signed),
    };
    let n = bytes.len();
    let sent = tokio::time::timeout(
        svc.limits().upload_timeout,
        guest.send(
            Method::POST,
            &format!("/files?path={}&username=user", encode(&dest)),
            Some("application/octet-stream"),
            Body::from(bytes),
        ),
    )
    .await;
    let listing = format!("{back}?path={}", encode(&dir));
    match sent {
        Ok(Ok(_)) => done(&listing, &format!("Uploaded {dest} ({n} bytes).")),
        Ok(Err(e)) => api_error_page(e, &listing, &signed),
        Err(_) => api_error_page(
            ApiError::SandboxTimeout { sandbox_id: id },
            &listing,
            &signed,
        ),
    }
}

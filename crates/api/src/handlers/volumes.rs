//! E2B's volumes: the registry on the API key (`/volumes`: create, list, get with the content
//! token, destroy) and the volume content API (`/volumecontent/{volumeID}/{path,dir,file}`: stat,
//! list, make directories, read and write files, change owner and mode, remove), which the SDKs
//! call with `Authorization: Bearer <volume token>` (the team's API key in X-API-KEY works too).
//!
//! Query parameters are exactly the SDKs': `path` everywhere, `depth` on listings, `uid`, `gid`,
//! `mode` and `force` on creates. File bodies stream both ways; a write is exempt from the REST
//! body limit and deadline, with the volume's size cap and the upload deadlines instead.

use axum::Json;
use axum::body::Body;
use axum::extract::{FromRequest, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::{Actor, ApiJson, AppState, Team, query_pairs, secrets::key_id};
use crate::error::{ApiError, ErrorBody};
use crate::models::{NewVolume, Volume, VolumeAndToken, VolumeEntryStat, VolumeMetadataUpdate};
use crate::service::VolumeCreateOptions;

#[utoipa::path(post, path = "/volumes", tag = "volumes", request_body = NewVolume,
    responses(
        (status = 201, description = "Created, empty; `token` opens its content API", body = VolumeAndToken),
        (status = 400, description = "A name that is not 1-64 characters of A-Z a-z 0-9 _ -", body = ErrorBody),
        (status = 403, description = "The team already has 100 volumes", body = ErrorBody),
        (status = 409, description = "The team already has a volume of that name", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn create(
    State(svc): State<AppState>,
    Team(team): Team,
    actor: Option<axum::Extension<Actor>>,
    ApiJson(body): ApiJson<NewVolume>,
) -> Result<(StatusCode, Json<VolumeAndToken>), ApiError> {
    let v = svc.create_volume(&team, &key_id(actor), body).await?;
    Ok((StatusCode::CREATED, Json(v)))
}

#[utoipa::path(get, path = "/volumes", tag = "volumes",
    responses((status = 200, description = "The team's volumes in name order", body = [Volume])),
    security(("ApiKeyAuth" = [])))]
pub async fn list(
    State(svc): State<AppState>,
    Team(team): Team,
) -> Result<Json<Vec<Volume>>, ApiError> {
    Ok(Json(svc.list_volumes(&team).await?))
}

#[utoipa::path(get, path = "/volumes/{volumeID}", tag = "volumes",
    params(("volumeID" = String, Path, description = "The volume's id (vol_…)")),
    responses(
        (status = 200, description = "The volume and its content token", body = VolumeAndToken),
        (status = 404, description = "This team has no such volume", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn get(
    State(svc): State<AppState>,
    Team(team): Team,
    Path(id): Path<String>,
) -> Result<Json<VolumeAndToken>, ApiError> {
    Ok(Json(svc.get_volume(&team, &id).await?))
}

#[utoipa::path(delete, path = "/volumes/{volumeID}", tag = "volumes",
    params(("volumeID" = String, Path, description = "The volume's id (vol_…)")),
    responses(
        (status = 204, description = "Destroyed with all its files"),
        (status = 404, description = "This team has no such volume", body = ErrorBody),
        (status = 409, description = "Sandboxes that are not killed (running or paused) mount it; the message names them", body = ErrorBody)),
    security(("ApiKeyAuth" = [])))]
pub async fn delete(
    State(svc): State<AppState>,
    Team(team): Team,
    actor: Option<axum::Extension<Actor>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    svc.delete_volume(&team, &key_id(actor), &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A content call's query: `path` (required) and the creates' options.
struct ContentQuery(Vec<(String, String)>);

impl ContentQuery {
    fn parse(raw: Option<&str>) -> Self {
        ContentQuery(query_pairs(raw))
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
    }

    fn path(&self) -> Result<String, ApiError> {
        self.get("path")
            .map(str::to_owned)
            .ok_or_else(|| ApiError::InvalidQuery {
                detail: "path is required: the entry's path from the volume's root, like \
                         path=/dir/file.txt (path=/ for the root)"
                    .into(),
            })
    }

    fn number(&self, k: &str) -> Result<Option<u32>, ApiError> {
        self.get(k)
            .map(|v| {
                v.parse::<u32>().map_err(|_| ApiError::InvalidQuery {
                    detail: format!("{k} must be a non-negative integer, not {v:?}"),
                })
            })
            .transpose()
    }

    fn force(&self) -> Result<Option<bool>, ApiError> {
        match self.get("force") {
            None => Ok(None),
            Some("true" | "True" | "1") => Ok(Some(true)),
            Some("false" | "False" | "0") => Ok(Some(false)),
            Some(v) => Err(ApiError::InvalidQuery {
                detail: format!("force must be true or false, not {v:?}"),
            }),
        }
    }

    fn create_options(&self) -> Result<VolumeCreateOptions, ApiError> {
        Ok(VolumeCreateOptions {
            owner: alcove_volume::Owner {
                uid: self.number("uid")?,
                gid: self.number("gid")?,
            },
            mode: self.number("mode")?,
            force: self.force()?,
        })
    }
}

/// Authenticates a content call for `volume_id` and records who made it for the audit log.
async fn access(
    svc: &AppState,
    volume_id: &str,
    headers: &HeaderMap,
    actor: Option<axum::Extension<Actor>>,
) -> Result<(), ApiError> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let api_key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let (rec, who) = svc.volume_access(volume_id, bearer, api_key).await?;
    if let Some(slot) = actor {
        *slot.0.0.lock().unwrap_or_else(|p| p.into_inner()) = Some((rec.team_id, who));
    }
    Ok(())
}

#[utoipa::path(get, path = "/volumecontent/{volumeID}/path", tag = "volumes",
    params(
        ("volumeID" = String, Path),
        ("path" = String, Query, description = "From the volume's root, e.g. /dir/file.txt")),
    responses(
        (status = 200, description = "The entry (a link is described, not followed)", body = VolumeEntryStat),
        (status = 400, description = "A path with '..' or a NUL byte", body = ErrorBody),
        (status = 401, description = "No token, or not this volume's", body = ErrorBody),
        (status = 404, description = "No such path (or volume)", body = ErrorBody)),
    security(("VolumeTokenAuth" = []), ("ApiKeyAuth" = [])))]
pub async fn stat(
    State(svc): State<AppState>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    actor: Option<axum::Extension<Actor>>,
) -> Result<Json<VolumeEntryStat>, ApiError> {
    access(&svc, &id, &headers, actor).await?;
    let q = ContentQuery::parse(raw.as_deref());
    Ok(Json(svc.volume_stat(&id, q.path()?).await?))
}

#[utoipa::path(get, path = "/volumecontent/{volumeID}/dir", tag = "volumes",
    params(
        ("volumeID" = String, Path),
        ("path" = String, Query, description = "The directory, e.g. / or /dir"),
        ("depth" = Option<u32>, Query, description = "Levels to list, 1-16 (default 1)")),
    responses(
        (status = 200, description = "The entries below the directory, parents before children", body = [VolumeEntryStat]),
        (status = 400, description = "A bad path or depth, a path that is not a directory, or more than 10 000 entries (list a subdirectory)", body = ErrorBody),
        (status = 401, description = "No token, or not this volume's", body = ErrorBody),
        (status = 404, description = "No such directory (or volume)", body = ErrorBody)),
    security(("VolumeTokenAuth" = []), ("ApiKeyAuth" = [])))]
pub async fn list_dir(
    State(svc): State<AppState>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    actor: Option<axum::Extension<Actor>>,
) -> Result<Json<Vec<VolumeEntryStat>>, ApiError> {
    access(&svc, &id, &headers, actor).await?;
    let q = ContentQuery::parse(raw.as_deref());
    let depth = q.number("depth")?;
    Ok(Json(svc.volume_list(&id, q.path()?, depth).await?))
}

#[utoipa::path(post, path = "/volumecontent/{volumeID}/dir", tag = "volumes",
    params(
        ("volumeID" = String, Path),
        ("path" = String, Query),
        ("uid" = Option<u32>, Query, description = "Owner (default 1000)"),
        ("gid" = Option<u32>, Query, description = "Group (default 1000)"),
        ("mode" = Option<u32>, Query, description = "Permission bits, e.g. 493 for 0o755"),
        ("force" = Option<bool>, Query, description = "Make missing parents, and accept an existing directory")),
    responses(
        (status = 201, description = "Made (or, with force, already there)", body = VolumeEntryStat),
        (status = 400, description = "A bad path or mode, or a parent that is not a directory", body = ErrorBody),
        (status = 401, description = "No token, or not this volume's", body = ErrorBody),
        (status = 404, description = "A missing parent (without force)", body = ErrorBody),
        (status = 409, description = "The path exists (without force, or as a file)", body = ErrorBody),
        (status = 507, description = "The volume holds its maximum number of entries", body = ErrorBody)),
    security(("VolumeTokenAuth" = []), ("ApiKeyAuth" = [])))]
pub async fn make_dir(
    State(svc): State<AppState>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    actor: Option<axum::Extension<Actor>>,
) -> Result<(StatusCode, Json<VolumeEntryStat>), ApiError> {
    access(&svc, &id, &headers, actor).await?;
    let q = ContentQuery::parse(raw.as_deref());
    let e = svc
        .volume_make_dir(&id, q.path()?, q.create_options()?)
        .await?;
    Ok((StatusCode::CREATED, Json(e)))
}

#[utoipa::path(get, path = "/volumecontent/{volumeID}/file", tag = "volumes",
    params(("volumeID" = String, Path), ("path" = String, Query)),
    responses(
        (status = 200, description = "The file's bytes, streamed", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 400, description = "A bad path, or not a regular file", body = ErrorBody),
        (status = 401, description = "No token, or not this volume's", body = ErrorBody),
        (status = 404, description = "No such file (or volume)", body = ErrorBody)),
    security(("VolumeTokenAuth" = []), ("ApiKeyAuth" = [])))]
pub async fn read_file(
    State(svc): State<AppState>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    actor: Option<axum::Extension<Actor>>,
) -> Result<Response, ApiError> {
    access(&svc, &id, &headers, actor).await?;
    let q = ContentQuery::parse(raw.as_deref());
    let (file, len) = svc.volume_open(&id, q.path()?).await?;
    let stream = tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(file));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

#[utoipa::path(put, path = "/volumecontent/{volumeID}/file", tag = "volumes",
    params(
        ("volumeID" = String, Path),
        ("path" = String, Query),
        ("uid" = Option<u32>, Query, description = "Owner of a new file (default 1000)"),
        ("gid" = Option<u32>, Query, description = "Group of a new file (default 1000)"),
        ("mode" = Option<u32>, Query, description = "Permission bits, e.g. 420 for 0o644"),
        ("force" = Option<bool>, Query, description = "Absent: overwrite an existing file. false: refuse one (409). true: overwrite, and make missing parent directories")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The file's bytes, streamed; not subject to the REST body limit"),
    responses(
        (status = 201, description = "Written", body = VolumeEntryStat),
        (status = 400, description = "A bad path or mode, a directory in the way, or an upload cut off or stalled", body = ErrorBody),
        (status = 401, description = "No token, or not this volume's", body = ErrorBody),
        (status = 404, description = "A missing parent directory (without force=true)", body = ErrorBody),
        (status = 409, description = "The file exists and force=false", body = ErrorBody),
        (status = 507, description = "The volume is full (its size cap); nothing of this upload is kept", body = ErrorBody)),
    security(("VolumeTokenAuth" = []), ("ApiKeyAuth" = [])))]
pub async fn write_file(
    State(svc): State<AppState>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    actor: Option<axum::Extension<Actor>>,
    req: Request,
) -> Result<(StatusCode, Json<VolumeEntryStat>), ApiError> {
    let (parts, body) = req.into_parts();
    access(&svc, &id, &parts.headers, actor).await?;
    let q = ContentQuery::parse(raw.as_deref());
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let e = svc
        .volume_write(&id, q.path()?, q.create_options()?, declared, body)
        .await?;
    Ok((StatusCode::CREATED, Json(e)))
}

#[utoipa::path(patch, path = "/volumecontent/{volumeID}/path", tag = "volumes",
    params(("volumeID" = String, Path), ("path" = String, Query)),
    request_body = VolumeMetadataUpdate,
    responses(
        (status = 200, description = "Changed", body = VolumeEntryStat),
        (status = 400, description = "A bad path, mode or body", body = ErrorBody),
        (status = 401, description = "No token, or not this volume's", body = ErrorBody),
        (status = 404, description = "No such path (or volume)", body = ErrorBody)),
    security(("VolumeTokenAuth" = []), ("ApiKeyAuth" = [])))]
pub async fn set_meta(
    State(svc): State<AppState>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    actor: Option<axum::Extension<Actor>>,
    req: Request,
) -> Result<Json<VolumeEntryStat>, ApiError> {
    // The token is checked before the body is read: a caller without one learns nothing else.
    access(&svc, &id, req.headers(), actor).await?;
    let ApiJson(body) = ApiJson::<VolumeMetadataUpdate>::from_request(req, &svc).await?;
    let q = ContentQuery::parse(raw.as_deref());
    Ok(Json(svc.volume_set_meta(&id, q.path()?, body).await?))
}

#[utoipa::path(delete, path = "/volumecontent/{volumeID}/path", tag = "volumes",
    params(("volumeID" = String, Path), ("path" = String, Query)),
    responses(
        (status = 204, description = "Removed (a directory with everything in it)"),
        (status = 400, description = "A bad path, or the volume's root", body = ErrorBody),
        (status = 401, description = "No token, or not this volume's", body = ErrorBody),
        (status = 404, description = "No such path (or volume)", body = ErrorBody)),
    security(("VolumeTokenAuth" = []), ("ApiKeyAuth" = [])))]
pub async fn remove(
    State(svc): State<AppState>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    actor: Option<axum::Extension<Actor>>,
) -> Result<StatusCode, ApiError> {
    access(&svc, &id, &headers, actor).await?;
    let q = ContentQuery::parse(raw.as_deref());
    svc.volume_remove(&id, q.path()?).await?;
    Ok(StatusCode::NO_CONTENT)
}

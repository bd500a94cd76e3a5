//! `POST /init`: envd's per-sandbox setup, called by the host right after every boot or
//! snapshot restore, before any SDK traffic. It must stay fast: no process spawns.
//!
//! The body is the guest contract's [`InitRequest`] (the host's client sends the same type).
//! envd fields: `envVars`, `accessToken`, `timestamp`, `defaultUser`, `defaultWorkdir`.
//! Alcove extensions: `hostname`, `entropy` (base64, at least 32 bytes, mixed into and credited
//! to the kernel pool, then the CRNG is reseeded, so clones of one snapshot diverge), `sandboxId`.

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use base64::Engine;
use bytes::Bytes;
use http::StatusCode;
use serde::Deserialize;

pub use alcove_guest_contract::InitRequest;

use super::{ACCESS_TOKEN_HEADER, ApiError};
use crate::state::{AgentState, Counters};

/// Minimum entropy accepted, in bytes (256 bits).
pub const MIN_ENTROPY: usize = 32;
/// envd's tolerances: the clock is only set when it is off by more than this.
const MAX_BEHIND_NS: i128 = 50_000_000;
const MAX_AHEAD_NS: i128 = 5_000_000_000;

pub async fn post_init(
    State(state): State<Arc<AgentState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, [(&'static str, &'static str); 1]), ApiError> {
    let req: InitRequest = if body.iter().all(u8::is_ascii_whitespace) {
        InitRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::BadRequest(format!("/init body: {e}")))?
    };
    // Checked here, with the body, so a bad timestamp is refused as a bad body was before.
    if let Some(t) = &req.timestamp {
        parse_timestamp(t).map_err(|e| ApiError::BadRequest(format!("/init body: {e}")))?;
    }
    // Changing anything once a token is set takes that token (header or body).
    if state.token_is_set() {
        let header = headers
            .get(ACCESS_TOKEN_HEADER)
            .and_then(|v| v.to_str().ok());
        let body_token = req.access_token.as_deref().filter(|t| !t.is_empty());
        let header_ok = header.is_some() && state.token_matches(header);
        let body_ok = body_token.is_some() && state.token_matches(body_token);
        if !header_ok && !body_ok {
            Counters::inc(&state.counters.unauthorized);
            return Err(ApiError::Unauthorized);
        }
    }
    apply(&state, req)?;
    Ok((StatusCode::NO_CONTENT, [("cache-control", "no-store")]))
}

/// Validates everything first, then applies; a rejected request changes nothing.
pub fn apply(state: &AgentState, req: InitRequest) -> Result<(), ApiError> {
    let entropy = match &req.entropy {
        Some(b64) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|_| ApiError::BadRequest("entropy must be base64".into()))?;
            if bytes.len() < MIN_ENTROPY {
                return Err(ApiError::BadRequest(format!(
                    "entropy must be at least {MIN_ENTROPY} bytes, got {}",
                    bytes.len()
                )));
            }
            Some(bytes)
        }
        None => None,
    };
    if let Some(h) = &req.hostname {
        crate::system::validate_hostname(h).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    }
    if let Some(pem) = &req.egress_ca
        && (pem.len() > MAX_CA_PEM
            || !pem.trim_start().starts_with("-----BEGIN CERTIFICATE-----")
            || pem.contains(alcove_guest_contract::EGRESS_CA_END))
    {
        return Err(ApiError::BadRequest(format!(
            "egressCa must be one PEM certificate of at most {MAX_CA_PEM} bytes"
        )));
    }
    let ts_ns = match &req.timestamp {
        Some(t) => {
            let t = parse_timestamp(t).map_err(|e| ApiError::BadRequest(e.to_string()))?;
            Some(t.seconds as i128 * 1_000_000_000 + t.nanos as i128)
        }
        None => None,
    };

    let touch = state.config.touch_system;
    if let (Some(bytes), true) = (entropy, touch) {
        crate::system::add_entropy(&bytes).map_err(|e| {
            ApiError::Internal(format!("credit entropy: {}", crate::rpc::error_chain(&e)))
        })?;
        // After the CRNG reseed: userspace RNGs that reseed from os.urandom now diverge.
        write_reseed_id(std::path::Path::new(crate::RESEED_FILE));
    }
    // Stale or replayed timestamps never move the clock (or defaults) backwards.
    let fresh = {
        let mut last = state
            .last_init_timestamp
            .write()
            .unwrap_or_else(|e| e.into_inner());
        match (ts_ns, *last) {
            (Some(ts), Some(prev)) if ts <= prev => false,
            (Some(ts), _) => {
                *last = Some(ts);
                true
            }
            (None, _) => true,
        }
    };
    if !fresh {
        return Ok(());
    }
    if let (Some(ts), true) = (ts_ns, touch) {
        let now = crate::system::realtime_ns();
        let off = now < ts - MAX_BEHIND_NS || now > ts + MAX_AHEAD_NS;
        if let (true, Err(e)) = (off, crate::system::set_realtime_ns(ts)) {
            tracing::warn!(error = %e, "set the clock from /init");
        }
    }
    if let (Some(h), true) = (&req.hostname, touch) {
        crate::system::set_hostname(h).map_err(|e| {
            ApiError::Internal(format!("set hostname: {}", crate::rpc::error_chain(&e)))
        })?;
    }
    let mut req = req;
    if let Some(pem) = &req.egress_ca {
        if touch {
            install_egress_ca(
                pem,
                std::path::Path::new(alcove_guest_contract::EGRESS_CA_FILE),
                std::path::Path::new(alcove_guest_contract::SYSTEM_CA_BUNDLE),
            );
        }
        // Python's requests, Node and OpenSSL builds that look elsewhere trust it too, unless the
        // sandbox says otherwise.
        let have = state
            .defaults
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .env_vars
            .clone();
        let env = req.env_vars.get_or_insert_with(Default::default);
        for (k, v) in [
            ("SSL_CERT_FILE", alcove_guest_contract::SYSTEM_CA_BUNDLE),
            (
                "REQUESTS_CA_BUNDLE",
                alcove_guest_contract::SYSTEM_CA_BUNDLE,
            ),
            ("NODE_EXTRA_CA_CERTS", alcove_guest_contract::EGRESS_CA_FILE),
        ] {
            if !have.contains_key(k) && !env.contains_key(k) {
                env.insert(k.to_string(), v.to_string());
            }
        }
    }
    {
        let mut d = state.defaults.write().unwrap_or_else(|e| e.into_inner());
        if let Some(env) = req.env_vars {
            // As envd: the given variables are added to (and override) the ones the guest has,
            // so a sandbox restored from a snapshot keeps the snapshot's variables without the
            // host ever storing their values.
            let mut merged = std::mem::take(&mut d.env_vars);
            merged.extend(env);
            let env = merged;
            if touch {
                let owner = state
                    .template_user
                    .get()
                    .cloned()
                    .or_else(|| state.resolve_user(None).ok());
                write_env_file(std::path::Path::new(crate::SANDBOX_ENV_FILE), &env, owner);
            }
            d.env_vars = env;
        }
        if let Some(u) = req.default_user.filter(|u| !u.is_empty()) {
            d.user = Some(u);
        }
        if let Some(w) = req.default_workdir.filter(|w| !w.is_empty()) {
            d.workdir = Some(PathBuf::from(w));
        }
        if let Some(id) = req.sandbox_id.filter(|s| !s.is_empty()) {
            d.sandbox_id = Some(id);
        }
    }
    // As envd: a present token replaces the current one; an absent one clears it.
    state.set_token(req.access_token.filter(|t| !t.is_empty()));
    Ok(())
}

/// An RFC 3339 timestamp, read as envd reads `timestamp` (the protobuf JSON mapping).
fn parse_timestamp(s: &str) -> Result<pbjson_types::Timestamp, serde::de::value::Error> {
    pbjson_types::Timestamp::deserialize(
        serde::de::value::StrDeserializer::<serde::de::value::Error>::new(s),
    )
}

/// Publishes the sandbox's environment variables for in-guest servers that start processes of
/// their own (the code interpreter's kernels); processes the agent starts get them directly.
/// The values can be secrets: the file is 0600 and owned by the user the template's server runs
/// as (root can read it anyway), never readable by other users of the sandbox.
fn write_env_file(
    path: &std::path::Path,
    env: &std::collections::BTreeMap<String, String>,
    owner: Option<crate::users::UserInfo>,
) {
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("json.tmp");
        let _ = std::fs::remove_file(&tmp);
        // Created 0600 (not chmod-ed later), so the values are never readable by others.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        if let Some(u) = owner.filter(|u| u.needs_switch()) {
            nix::unistd::fchown(&f, Some(u.uid), Some(u.gid)).map_err(std::io::Error::from)?;
        }
        f.write_all(&serde_json::to_vec(env).unwrap_or_default())?;
        drop(f);
        std::fs::rename(&tmp, path)
    };
    if let Err(e) = write() {
        tracing::warn!(error = %e, path = %path.display(), "write the sandbox environment file");
    }
}

/// At boot: the environment variables a filesystem-only pause left on the disk
/// ([`alcove_guest_contract::PERSISTED_ENV_FILE`]) become the sandbox's again, and the file
/// goes. The host's `/init` after the boot adds to them, as after a restore.
pub fn restore_persisted_env(state: &crate::state::AgentState, path: &std::path::Path) {
    use std::io::Read;
    let Ok(f) = std::fs::File::open(path) else {
        return;
    };
    let mut text = Vec::new();
    let read = f.take(ENV_FILE_MAX + 1).read_to_end(&mut text);
    let _ = std::fs::remove_file(path);
    let env: std::collections::BTreeMap<String, String> = match read {
        Ok(n) if n as u64 <= ENV_FILE_MAX => match serde_json::from_slice(&text) {
            Ok(env) => env,
            Err(e) => {
                tracing::warn!(error = %e, path = %path.display(), "the saved environment does not parse; ignored");
                return;
            }
        },
        _ => {
            tracing::warn!(path = %path.display(), "the saved environment is unreadable or too large; ignored");
            return;
        }
    };
    tracing::info!(
        vars = env.len(),
        "environment restored from before a filesystem-only pause"
    );
    if state.config.touch_system {
        write_env_file(std::path::Path::new(crate::SANDBOX_ENV_FILE), &env, None);
    }
    let mut d = state.defaults.write().unwrap_or_else(|e| e.into_inner());
    d.env_vars.extend(env);
}

/// Largest egress CA certificate accepted.
const MAX_CA_PEM: usize = 16 * 1024;

/// Makes the system trust the sandbox's egress CA: its own file (which `update-ca-certificates`
/// keeps) and a marked block at the end of the system bundle, replacing the block an earlier
/// `/init` wrote (a sandbox made from a snapshot inherits its parent's). No process is spawned.
pub fn install_egress_ca(pem: &str, file: &std::path::Path, bundle: &std::path::Path) {
    use alcove_guest_contract::{EGRESS_CA_BEGIN, EGRESS_CA_END};
    let write = || -> std::io::Result<()> {
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(file, pem)?;
        let old = std::fs::read_to_string(bundle).unwrap_or_default();
        let mut kept = match (old.find(EGRESS_CA_BEGIN), old.find(EGRESS_CA_END)) {
            (Some(a), Some(b)) if b > a => {
                let end = old[b..].find('\n').map_or(old.len(), |i| b + i + 1);
                format!("{}{}", &old[..a], &old[end..])
            }
            _ => old,
        };
        if !kept.is_empty() && !kept.ends_with('\n') {
            kept.push('\n');
        }
        kept.push_str(&format!(
            "{EGRESS_CA_BEGIN}\n{}\n{EGRESS_CA_END}\n",
            pem.trim()
        ));
        let tmp = bundle.with_extension("crt.alcove-tmp");
        std::fs::write(&tmp, kept)?;
        std::fs::rename(&tmp, bundle)
    };
    if let Err(e) = write() {
        tracing::warn!(error = %e, "install the sandbox's egress CA");
    }
}

/// Largest saved environment read back at boot.
const ENV_FILE_MAX: u64 = 1 << 20;

/// A fresh random id in `path` (world-readable: it is no secret, only a change signal).
fn write_reseed_id(path: &std::path::Path) {
    let write = || -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, uuid::Uuid::new_v4().simple().to_string())?;
        std::fs::rename(&tmp, path)
    };
    if let Err(e) = write() {
        tracing::warn!(error = %e, path = %path.display(), "write the reseed id");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_egress_ca_replaces_the_one_an_earlier_init_installed() {
        let d = tempfile::tempdir().unwrap();
        let (file, bundle) = (d.path().join("ca/alcove.crt"), d.path().join("bundle.crt"));
        std::fs::write(&bundle, "SYSTEM ROOTS\n").unwrap();
        let ca = |n: u8| format!("-----BEGIN CERTIFICATE-----\nCA{n}\n-----END CERTIFICATE-----\n");
        install_egress_ca(&ca(1), &file, &bundle);
        install_egress_ca(&ca(2), &file, &bundle);
        let text = std::fs::read_to_string(&bundle).unwrap();
        assert!(text.starts_with("SYSTEM ROOTS\n"), "{text}");
        assert!(text.contains("CA2") && !text.contains("CA1"), "{text}");
        assert_eq!(
            text.matches(alcove_guest_contract::EGRESS_CA_BEGIN).count(),
            1
        );
        assert_eq!(std::fs::read_to_string(&file).unwrap(), ca(2));
    }

    #[test]
    fn a_saved_environment_comes_back_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("envs.json");
        std::fs::write(&path, r#"{"A":"1","B":"two"}"#).unwrap();
        let state = crate::state::AgentState::new(crate::state::StateConfig {
            touch_system: false,
            output_buffer: 1 << 16,
        });
        state
            .defaults
            .write()
            .unwrap()
            .env_vars
            .insert("B".into(), "template".into());
        restore_persisted_env(&state, &path);
        let env = state.defaults().env_vars;
        assert_eq!(env["A"], "1");
        assert_eq!(env["B"], "two");
        assert!(!path.exists(), "the saved file is removed");
        // A file that does not parse is dropped without touching the environment.
        std::fs::write(&path, "not json").unwrap();
        restore_persisted_env(&state, &path);
        assert!(!path.exists());
        assert_eq!(state.defaults().env_vars.len(), 2);
    }

    #[test]
    fn env_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run").join("envs.json");
        let env = std::collections::BTreeMap::from([("K".to_string(), "secret".to_string())]);
        write_env_file(&path, &env, None);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let back: std::collections::BTreeMap<String, String> =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back, env);
    }

    #[test]
    fn reseed_id_changes_every_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("reseed-id");
        write_reseed_id(&path);
        let a = std::fs::read_to_string(&path).unwrap();
        write_reseed_id(&path);
        let b = std::fs::read_to_string(&path).unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }

    #[test]
    fn timestamps_are_rfc3339() {
        let t = parse_timestamp("2026-11-22T18:23:00.123456789Z").unwrap();
        assert_eq!((t.seconds, t.nanos), (1_795_371_780, 123_456_789));
        let t = parse_timestamp("2026-11-22T20:23:00+02:00").unwrap();
        assert_eq!((t.seconds, t.nanos), (1_795_371_780, 0));
        assert!(parse_timestamp("yesterday").is_err());
    }
}

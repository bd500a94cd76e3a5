//! The OpenAPI document, generated from the handlers' annotations and committed as
//! `openapi/alcove.json`. The drift test below fails when the code and the file disagree; run
//! `ALCOVE_UPDATE_OPENAPI=1 cargo test -p alcove-api openapi` to rewrite the file.

use utoipa::openapi::security::{ApiKey, ApiKeyValue, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::handlers::{
    audit, extensions, observability, persistence, sandboxes, secrets, system, templates, usage,
    volumes,
};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Alcove API",
        description = "E2B-compatible control API of Alcove (sandboxes, templates), plus Alcove \
                       extensions under /alcove/v1. Sandbox traffic (the envd agent, the code \
                       interpreter, any port) shares this listener: send E2b-Sandbox-Id and \
                       E2b-Sandbox-Port headers, or use host <port>-<sandboxID>.<domain>."
    ),
    paths(
        sandboxes::create_v2,
        sandboxes::create_v1,
        sandboxes::list_v2,
        sandboxes::list_v1,
        sandboxes::get,
        sandboxes::kill,
        sandboxes::set_timeout,
        sandboxes::refresh,
        persistence::connect,
        persistence::connect_v1,
        observability::metrics,
        observability::metrics_many,
        observability::logs_v1,
        observability::logs_v2,
        persistence::pause,
        sandboxes::update_network,
        persistence::resume,
        persistence::create_snapshot,
        persistence::fork,
        persistence::list_snapshots,
        secrets::create,
        secrets::list,
        secrets::get,
        secrets::update,
        secrets::delete,
        volumes::create,
        volumes::list,
        volumes::get,
        volumes::delete,
        volumes::stat,
        volumes::list_dir,
        volumes::make_dir,
        volumes::read_file,
        volumes::write_file,
        volumes::set_meta,
        volumes::remove,
        templates::list,
        templates::defaults,
        templates::get,
        templates::alias,
        templates::delete,
        templates::request_build,
        templates::file_link,
        templates::upload,
        templates::start_build,
        templates::build_status,
        templates::assign_tags,
        templates::remove_tags,
        templates::tags,
        templates::update,
        templates::update_v1,
        extensions::sandbox_record,
        extensions::fork,
        extensions::start_recording,
        extensions::stop_recording,
        extensions::recordings,
        extensions::snapshot_tree,
        extensions::warm_pool,
        extensions::nodes,
        extensions::drain_node,
        usage::usage,
        usage::usage_events,
        usage::get_limits,
        usage::put_limits,
        audit::sandbox_events,
        audit::audit_export,
        system::health,
        system::prometheus,
        system::openapi,
    ),
    modifiers(&ApiKeyAuth),
    tags(
        (name = "sandboxes", description = "E2B-compatible sandbox lifecycle"),
        (name = "templates", description = "E2B-compatible templates: listing, builds (the SDKs' `Template`), uploads"),
        (name = "tags", description = "E2B-compatible template tags"),
        (name = "secrets", description = "E2B-compatible secrets: write-only values, encrypted at rest"),
        (name = "volumes", description = "E2B-compatible volumes: persistent directories mounted into sandboxes, and their content API (volume token)"),
        (name = "alcove", description = "Alcove extensions"),
        (name = "system", description = "Health, metrics, this document"),
    )
)]
pub struct ApiDoc;

struct ApiKeyAuth;

impl Modify for ApiKeyAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "ApiKeyAuth",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-KEY"))),
        );
        components.add_security_scheme(
            "VolumeTokenAuth",
            SecurityScheme::Http(utoipa::openapi::security::Http::new(
                utoipa::openapi::security::HttpAuthScheme::Bearer,
            )),
        );
    }
}

/// The document as pretty JSON with a trailing newline (the committed file's exact bytes).
pub fn document() -> String {
    let mut doc = ApiDoc::openapi();
    // The crate version would make every release rewrite the file; the API has its own.
    doc.info.version = "2026.11".into();
    let mut s = doc.to_pretty_json().unwrap_or_else(|_| "{}".into());
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    #[test]
    fn openapi_document_matches_the_committed_file() {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../openapi/alcove.json");
        let generated = super::document();
        if std::env::var_os("ALCOVE_UPDATE_OPENAPI").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &generated).unwrap();
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == generated,
            "openapi/alcove.json is out of date with the code; regenerate it with \
             ALCOVE_UPDATE_OPENAPI=1 cargo test -p alcove-api openapi and commit the result"
        );
    }
}

//! E2B's secrets API through the REST API over the fake backend and real SQLite: create, get by
//! id and by name, list paging, versions, delete, teams kept apart, structured refusals; values
//! never in a response, an error or the audit log, and only ciphertext in the database file; the
//! key file owner-only and reused across a restart; the egress proxy's source resolving values.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use alcove_net::secrets::{SecretLookupError, SecretSource};
use common::{Api, FakeBackend, TestServer, assert_error, fast_limits};
use serde_json::json;

const VALUE: &str = "sk-live-0123456789-very-secret-value";

async fn start(dir: &std::path::Path) -> TestServer {
    TestServer::start(dir, Arc::new(FakeBackend::new()), fast_limits()).await
}

fn assert_no_value(r: &common::Reply, value: &str) {
    let body = r.json.to_string();
    assert!(
        !body.contains(value),
        "a response carries the value: {body}"
    );
    for (_, v) in r.headers.iter() {
        assert!(!String::from_utf8_lossy(v.as_bytes()).contains(value));
    }
}

async fn create(api: &Api, name: &str, value: &str) -> serde_json::Value {
    let r = api
        .post("/secrets", json!({"name": name, "value": value}))
        .await;
    assert_eq!(r.status, 201, "{:?}", r.json);
    assert_no_value(&r, value);
    r.json
}

#[tokio::test]
async fn secrets_are_created_read_updated_and_deleted_by_id_or_name() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let api = s.client();

    let r = api
        .post(
            "/secrets",
            json!({"name": "OpenAI-Key", "value": VALUE, "metadata": {"env": "prod"}}),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.json);
    assert_no_value(&r, VALUE);
    let made = r.json.clone();
    let id = made["secretID"].as_str().unwrap().to_owned();
    assert!(id.starts_with("sec_") && id[4..].bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(made["name"], "openai-key", "lower-cased");
    assert_eq!(made["currentVersion"], 1);
    assert_eq!(made["metadata"], json!({"env": "prod"}));
    assert!(made["createdAt"].as_str().unwrap().ends_with('Z'));
    assert_eq!(made["createdAt"], made["updatedAt"]);
    let keys: Vec<_> = made.as_object().unwrap().keys().cloned().collect();
    assert_eq!(
        keys,
        [
            "createdAt",
            "currentVersion",
            "metadata",
            "name",
            "secretID",
            "updatedAt"
        ]
    );

    // By id, by name, by the name as first written (names compare lower-cased).
    for path in [
        format!("/secrets/{id}"),
        "/secrets/openai-key".into(),
        "/secrets/OpenAI-Key".into(),
    ] {
        let r = api.get(&path).await;
        assert_eq!(r.status, 200, "{path}: {:?}", r.json);
        assert_eq!(r.json, made);
        assert_no_value(&r, VALUE);
    }

    // An update stores a new version; metadata is kept unless given, replaced when given.
    let v2 = "second-value-abcdef";
    let r = api.post("/secrets/openai-key", json!({"value": v2})).await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert_eq!(r.json["currentVersion"], 2);
    assert_eq!(r.json["metadata"], json!({"env": "prod"}));
    assert_no_value(&r, v2);
    let r = api
        .post(
            &format!("/secrets/{id}"),
            json!({"value": "third-value", "metadata": {"owner": "ci"}}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert_eq!(r.json["currentVersion"], 3);
    assert_eq!(r.json["metadata"], json!({"owner": "ci"}));
    assert_eq!(r.json["createdAt"], made["createdAt"]);
    assert_eq!(
        api.get(&format!("/secrets/{id}")).await.json["currentVersion"],
        3
    );

    // Duplicate names conflict, whatever their case.
    let r = api
        .post("/secrets", json!({"name": "OPENAI-KEY", "value": "x"}))
        .await;
    assert_error(&r, 409, "secret_name_taken");
    assert!(r.json["message"].as_str().unwrap().contains("openai-key"));
    assert_no_value(&r, "x\"");

    // Delete: 204, then gone by id and name; a second delete is a 404.
    let r = api.delete("/secrets/OpenAI-Key").await;
    assert_eq!(r.status, 204, "{:?}", r.json);
    assert_error(
        &api.get(&format!("/secrets/{id}")).await,
        404,
        "secret_not_found",
    );
    assert_error(
        &api.get("/secrets/openai-key").await,
        404,
        "secret_not_found",
    );
    assert_error(
        &api.delete(&format!("/secrets/{id}")).await,
        404,
        "secret_not_found",
    );
    assert_error(
        &api.post(&format!("/secrets/{id}"), json!({"value": "v"}))
            .await,
        404,
        "secret_not_found",
    );
    // The name is free again.
    create(&api, "openai-key", VALUE).await;
    s.stop().await;
}

#[tokio::test]
async fn lists_page_with_the_next_token_header() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let api = s.client();
    for n in ["delta", "alpha", "echo", "charlie", "bravo"] {
        create(&api, n, &format!("{n}-{VALUE}")).await;
    }
    let mut names = Vec::new();
    let mut token: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &token {
            Some(t) => format!("/secrets?limit=2&nextToken={t}"),
            None => "/secrets?limit=2".into(),
        };
        let r = api.get(&path).await;
        assert_eq!(r.status, 200, "{:?}", r.json);
        assert!(!r.json.to_string().contains(VALUE));
        pages += 1;
        let items = r.json.as_array().unwrap();
        assert!(items.len() <= 2);
        names.extend(items.iter().map(|i| i["name"].as_str().unwrap().to_owned()));
        token = r
            .headers
            .get("x-next-token")
            .map(|v| v.to_str().unwrap().to_owned());
        if token.is_none() {
            break;
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(names, ["alpha", "bravo", "charlie", "delta", "echo"]);
    let all = api.get("/secrets").await;
    assert_eq!(all.json.as_array().unwrap().len(), 5);
    assert!(all.headers.get("x-next-token").is_none());
    assert_error(&api.get("/secrets?limit=0").await, 400, "invalid_query");
    assert_error(&api.get("/secrets?limit=1001").await, 400, "invalid_query");
    assert_error(
        &api.get("/secrets?nextToken=%25%25").await,
        400,
        "invalid_query",
    );
    s.stop().await;
}

#[tokio::test]
async fn teams_see_only_their_own_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let api = s.client();
    let mine = create(&api, "shared-name", VALUE).await;
    let id = mine["secretID"].as_str().unwrap();
    let (_, other_key) = common::tenant(dir.path(), "tenant");
    let other = Api {
        key: Some(other_key),
        ..s.client()
    };
    for path in [format!("/secrets/{id}"), "/secrets/shared-name".into()] {
        assert_error(&other.get(&path).await, 404, "secret_not_found");
        assert_error(
            &other.post(&path, json!({"value": "stolen"})).await,
            404,
            "secret_not_found",
        );
        assert_error(&other.delete(&path).await, 404, "secret_not_found");
    }
    let r = other.get("/secrets").await;
    assert_eq!(r.json, json!([]));
    // The same name in another team is that team's own secret.
    let theirs = create(&other, "shared-name", "their-value").await;
    assert_ne!(theirs["secretID"], mine["secretID"]);
    assert_eq!(api.get("/secrets/shared-name").await.json, mine);
    // Without a key: the structured 401.
    let anon = Api {
        key: None,
        ..s.client()
    };
    assert_error(&anon.get("/secrets").await, 401, "unauthenticated");
    s.stop().await;
}

#[tokio::test]
async fn bad_input_gets_a_structured_400_that_never_echoes_the_value() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let api = s.client();
    let long_name = "n".repeat(129);
    let cases = [
        (json!({"name": "", "value": VALUE}), "is empty"),
        (json!({"name": "a{b}", "value": VALUE}), "'{', '}'"),
        (json!({"name": "a\nb", "value": VALUE}), "control"),
        (json!({"name": "sec_abc", "value": VALUE}), "sec_"),
        (json!({"name": long_name, "value": VALUE}), "129 bytes"),
        (json!({"name": "ok", "value": ""}), "value is empty"),
        (
            json!({"name": "ok", "value": "v".repeat(64 * 1024 + 1)}),
            "at most 65536 bytes",
        ),
        (
            json!({"name": "ok", "value": VALUE, "metadata": {"k": "v".repeat(1025)}}),
            "1024",
        ),
        (
            json!({"name": "ok", "value": VALUE,
                   "metadata": (0..33).map(|i| (i.to_string(), json!("v"))).collect::<serde_json::Map<_, _>>()}),
            "33 entries",
        ),
        (
            json!({"name": "ok", "value": VALUE,
                   "metadata": (0..9).map(|i| (i.to_string(), json!("v".repeat(1000)))).collect::<serde_json::Map<_, _>>()}),
            "8192",
        ),
        (json!({"name": "ok"}), "missing field `value`"),
        (
            json!({"name": "ok", "value": VALUE, "extra": 1}),
            "unknown field",
        ),
        (json!({"name": "ok", "value": 123456789}), "must be strings"),
        (json!({"name": "ok", "value": [VALUE]}), "must be strings"),
    ];
    for (body, says) in cases {
        let r = api.post("/secrets", body.clone()).await;
        assert_error(&r, 400, "invalid_request_body");
        let msg = r.json["message"].as_str().unwrap();
        assert!(msg.contains(says), "{body}: {msg}");
        assert!(!msg.contains(VALUE) && !msg.contains("123456789"), "{msg}");
    }
    // An update is checked the same way, and a bad one stores nothing.
    create(&api, "ok", VALUE).await;
    for body in [
        json!({"value": ""}),
        json!({"value": VALUE, "metadata": {"k": "v".repeat(1025)}}),
        json!({"name": "renamed", "value": VALUE}),
    ] {
        let r = api.post("/secrets/ok", body).await;
        assert_error(&r, 400, "invalid_request_body");
    }
    assert_eq!(api.get("/secrets/ok").await.json["currentVersion"], 1);
    let r = api.get("/secrets").await;
    assert_eq!(r.json.as_array().unwrap().len(), 1, "nothing else was made");
    s.stop().await;
}

#[tokio::test]
async fn a_team_is_capped_at_a_thousand_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let api = s.client();
    // Fill the store directly (a thousand HTTP creates would be slow), then ask over HTTP.
    {
        let store =
            alcove_store::Store::connect(&alcove_store::Database::from_test_env(dir.path()))
                .unwrap();
        let team = store.teams().unwrap()[0].id.clone();
        let sealed = alcove_store::SealedValue {
            nonce: vec![0; 12],
            ciphertext: vec![0; 16],
        };
        for i in 0..alcove_api::service::MAX_SECRETS_PER_TEAM {
            let rec = alcove_store::SecretRecord {
                id: format!("sec_{i:032x}"),
                team_id: team.clone(),
                name: format!("s{i}"),
                current_version: 1,
                metadata: Default::default(),
                created_at: 1,
                updated_at: 1,
            };
            store.insert_secret(&rec, &sealed, usize::MAX).unwrap();
        }
    }
    let r = api
        .post("/secrets", json!({"name": "one-more", "value": VALUE}))
        .await;
    assert_error(&r, 403, "secret_limit_reached");
    assert!(r.json["message"].as_str().unwrap().contains("1000"));
    assert_eq!(
        r.headers.get("should-retry").and_then(|v| v.to_str().ok()),
        Some("false")
    );
    assert_eq!(api.delete("/secrets/s0").await.status, 204);
    create(&api, "one-more", VALUE).await;
    s.stop().await;
}

/// Values are only ciphertext in the database (and its WAL), the key file is owner-only and
/// survives a restart, and the egress proxy's source decrypts a sandbox's team's secrets after
/// it. Changes are in the audit log by name and version, never with the value.
#[tokio::test]
async fn values_are_encrypted_at_rest_and_resolve_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FakeBackend::new());
    let s = TestServer::start(dir.path(), backend.clone(), fast_limits()).await;
    let api = s.client();
    create(&api, "DB-Password", VALUE).await;
    let sbx = api
        .post(
            "/v2/sandboxes",
            json!({"templateID": "base", "timeout": 600}),
        )
        .await;
    assert_eq!(sbx.status, 201, "{:?}", sbx.json);
    let sbx = sbx.json["sandboxID"].as_str().unwrap().to_owned();

    let key_file = dir.path().join(alcove_api::secrets::KEY_FILE);
    let meta = std::fs::metadata(&key_file).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.len(), 32);
    let key_bytes = std::fs::read(&key_file).unwrap();

    // Resolved through the running server's store and key.
    let live = alcove_api::StoreSecrets::open(dir.path(), &store_in(dir.path())).unwrap();
    let v = live.resolve(&sbx, "db-password").await.unwrap();
    assert_eq!(&v[..], VALUE.as_bytes());

    // The audit log names the change, never the value.
    let mut found = false;
    for _ in 0..50 {
        let r = api.get("/alcove/v1/audit?limit=10000").await;
        let text = r.json.as_str().unwrap_or("").to_owned();
        assert!(!text.contains(VALUE));
        if text.contains("\"kind\":\"secret\"") && text.contains("db-password") {
            found = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(found, "the create is in the audit log");
    drop(api);
    s.stop().await;

    for name in [
        alcove_store::DB_FILE.to_string(),
        format!("{}-wal", alcove_store::DB_FILE),
    ] {
        if let Ok(bytes) = std::fs::read(dir.path().join(&name)) {
            assert!(
                !bytes.windows(VALUE.len()).any(|w| w == VALUE.as_bytes()),
                "{name} holds the plaintext"
            );
        }
    }

    // After a restart: the same key, and the value decrypts.
    let s = TestServer::start(dir.path(), backend, fast_limits()).await;
    assert_eq!(std::fs::read(&key_file).unwrap(), key_bytes, "key reused");
    let r = s.client().get("/secrets/db-password").await;
    assert_eq!(r.json["currentVersion"], 1);
    let src = s_source(dir.path());
    assert_eq!(
        &src.resolve(&sbx, "DB-PASSWORD").await.unwrap()[..],
        VALUE.as_bytes()
    );
    assert_eq!(
        src.resolve(&sbx, "nope").await.unwrap_err(),
        SecretLookupError::NotFound("nope".into())
    );
    assert_eq!(
        src.resolve("no-such-sandbox", "db-password")
            .await
            .unwrap_err(),
        SecretLookupError::NotFound("db-password".into())
    );
    // Another team's sandbox cannot reach this team's secret.
    let (_, other_key) = common::tenant(dir.path(), "tenant");
    let other = Api {
        key: Some(other_key),
        ..s.client()
    };
    let theirs = other
        .post("/v2/sandboxes", json!({"templateID": "base"}))
        .await;
    assert_eq!(theirs.status, 201, "{:?}", theirs.json);
    let theirs = theirs.json["sandboxID"].as_str().unwrap();
    assert!(matches!(
        src.resolve(theirs, "db-password").await,
        Err(SecretLookupError::NotFound(_))
    ));
    // An update is what the proxy gets next.
    let r = s
        .client()
        .post("/secrets/db-password", json!({"value": "rotated"}))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        &src.resolve(&sbx, "db-password").await.unwrap()[..],
        b"rotated"
    );
    s.stop().await;

    // A key file of the wrong size stops the server with a clear error.
    std::fs::write(&key_file, [0u8; 31]).unwrap();
    let err = alcove_api::StoreSecrets::open(dir.path(), &store_in(dir.path())).unwrap_err();
    assert!(err.to_string().contains("31 bytes, not 32"), "{err}");
    let mut config = alcove_api::ServerConfig::new("127.0.0.1:0".parse().unwrap(), dir.path());
    config.limits = fast_limits();
    let err = alcove_api::Server::bind(config, Arc::new(FakeBackend::new()))
        .await
        .err()
        .expect("refused");
    assert!(
        alcove_api::error::chain(&err).contains("not 32"),
        "{}",
        alcove_api::error::chain(&err)
    );
}

fn s_source(dir: &std::path::Path) -> alcove_api::StoreSecrets {
    alcove_api::StoreSecrets::open(dir, &store_in(dir)).unwrap()
}

/// The server's store in `dir` (Postgres when the suite runs on it).
fn store_in(dir: &std::path::Path) -> alcove_store::Database {
    alcove_store::Database::from_test_env(dir)
}

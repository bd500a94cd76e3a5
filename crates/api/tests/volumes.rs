//! E2B's volumes through the REST API over the fake backend, real SQLite and a real directory:
//! the registry (create, list, get with its token, destroy; names, the per-team cap, teams kept
//! apart, the audit log), the content API behind the volume's token (every endpoint, listings
//! by depth, a streamed 5 MiB file, the size cap, paths and links that try to leave the
//! volume), and `volumeMounts` on sandbox creates (checks, views, inheritance from a snapshot,
//! and destroys refused while a sandbox that is not killed mounts the volume).

mod common;

use std::convert::Infallible;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use common::{Api, FakeBackend, Reply, TestServer, assert_error, fast_limits, tenant};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

async fn start(dir: &std::path::Path) -> TestServer {
    TestServer::start(dir, Arc::new(FakeBackend::new()), fast_limits()).await
}

async fn create(api: &Api, name: &str) -> Value {
    let r = api.post("/volumes", json!({ "name": name })).await;
    assert_eq!(r.status, 201, "{:?}", r.json);
    r.json
}

/// A client that sends no API key: content calls carry only what each test gives.
fn anonymous(s: &TestServer) -> Api {
    Api {
        key: None,
        ..s.client()
    }
}

fn query(pairs: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
}

/// A volume's content API, as the SDK calls it: `Authorization: Bearer <token>`.
struct Content<'a> {
    api: Api,
    id: String,
    token: &'a str,
}

impl Content<'_> {
    async fn call(
        &self,
        method: &str,
        what: &str,
        q: &[(&str, &str)],
        content_type: &str,
        body: Vec<u8>,
    ) -> Reply {
        let auth = format!("Bearer {}", self.token);
        self.api
            .send(
                method,
                &format!("/volumecontent/{}/{what}?{}", self.id, query(q)),
                &[("authorization", &auth), ("content-type", content_type)],
                body,
            )
            .await
    }

    async fn stat(&self, path: &str) -> Reply {
        self.call("GET", "path", &[("path", path)], "application/json", vec![])
            .await
    }

    async fn list(&self, path: &str, depth: Option<&str>) -> Reply {
        let mut q = vec![("path", path)];
        if let Some(d) = depth {
            q.push(("depth", d));
        }
        self.call("GET", "dir", &q, "application/json", vec![])
            .await
    }

    async fn mkdir(&self, q: &[(&str, &str)]) -> Reply {
        self.call("POST", "dir", q, "application/json", vec![])
            .await
    }

    async fn write(&self, q: &[(&str, &str)], body: &[u8]) -> Reply {
        self.call("PUT", "file", q, "application/octet-stream", body.to_vec())
            .await
    }

    async fn read(&self, path: &str) -> Reply {
        self.call("GET", "file", &[("path", path)], "application/json", vec![])
            .await
    }

    async fn patch(&self, path: &str, body: Value) -> Reply {
        self.call(
            "PATCH",
            "path",
            &[("path", path)],
            "application/json",
            body.to_string().into_bytes(),
        )
        .await
    }

    async fn remove(&self, path: &str) -> Reply {
        self.call(
            "DELETE",
            "path",
            &[("path", path)],
            "application/json",
            vec![],
        )
        .await
    }

    /// Entry paths of a listing.
    async fn paths(&self, path: &str, depth: Option<&str>) -> Vec<String> {
        let r = self.list(path, depth).await;
        assert_eq!(r.status, 200, "{:?}", r.json);
        r.json
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["path"].as_str().unwrap().to_owned())
            .collect()
    }
}

fn content<'a>(s: &TestServer, vol: &Value, token: &'a str) -> Content<'a> {
    Content {
        api: anonymous(s),
        id: vol["volumeID"].as_str().unwrap().to_owned(),
        token,
    }
}

/// Whether the tests run as root (only root may give files away, so owners are asserted then).
fn as_root() -> bool {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().metadata().unwrap().uid() == 0
}

#[tokio::test]
async fn volumes_are_created_listed_read_and_destroyed_with_their_files() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let api = s.client();

    let made = create(&api, "my-data_1").await;
    let keys: Vec<_> = made.as_object().unwrap().keys().cloned().collect();
    assert_eq!(
        keys,
        ["name", "token", "volumeID"],
        "no domain: the SDK's own URL is used"
    );
    let id = made["volumeID"].as_str().unwrap().to_owned();
    assert!(id.starts_with("vol_") && id.len() == 36, "{id}");
    let token = made["token"].as_str().unwrap().to_owned();
    assert!(token.starts_with("vtok_") && token.len() == 69, "{token}");
    let vdir = dir.path().join("volumes").join(&id);
    assert!(std::fs::metadata(&vdir).unwrap().is_dir());
    let meta = std::fs::metadata(dir.path().join("volumes")).unwrap();
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o700,
        "only the server reaches the volumes"
    );

    let other = create(&api, "alpha").await;
    let r = api.get("/volumes").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.json,
        json!([
            {"volumeID": other["volumeID"], "name": "alpha"},
            {"volumeID": id, "name": "my-data_1"},
        ])
    );
    // The token is the same every time it is asked for.
    let r = api.get(&format!("/volumes/{id}")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json, made);

    // Names: unique in the team, 1-64 of [A-Za-z0-9_-].
    let r = api.post("/volumes", json!({"name": "my-data_1"})).await;
    assert_error(&r, 409, "volume_name_taken");
    assert!(
        r.json["message"]
            .as_str()
            .unwrap()
            .contains("Connect to it")
    );
    for bad in [
        json!({"name": ""}),
        json!({"name": "a b"}),
        json!({"name": "a/b"}),
        json!({"name": "x".repeat(65)}),
        json!({"name": "../x"}),
    ] {
        let r = api.post("/volumes", bad.clone()).await;
        assert_error(&r, 400, "invalid_request_body");
        assert!(
            r.json["message"].as_str().unwrap().contains("1-64"),
            "{bad}: {:?}",
            r.json
        );
    }
    create(&api, &"x".repeat(64)).await;
    let r = api.post("/volumes", json!({"name": "a", "size": 1})).await;
    assert_error(&r, 400, "invalid_request_body");
    let r = api.post("/volumes", json!({})).await;
    assert_error(&r, 400, "invalid_request_body");

    // Files go with the volume.
    let c = content(&s, &made, &token);
    assert_eq!(c.write(&[("path", "/a.txt")], b"hi").await.status, 201);
    assert!(vdir.join("a.txt").exists());
    let r = api.delete(&format!("/volumes/{id}")).await;
    assert_eq!(r.status, 204, "{:?}", r.json);
    assert!(!vdir.exists(), "the directory is removed");
    assert_error(
        &api.get(&format!("/volumes/{id}")).await,
        404,
        "volume_not_found",
    );
    assert_error(
        &api.delete(&format!("/volumes/{id}")).await,
        404,
        "volume_not_found",
    );
    // Its token now finds nothing; the name is free again.
    assert_error(&c.stat("/").await, 404, "volume_not_found");
    let again = create(&api, "my-data_1").await;
    assert_ne!(again["volumeID"], made["volumeID"]);
    assert_ne!(again["token"], made["token"]);

    // Creates and destroys are in the audit log.
    let mut seen = (false, false);
    for _ in 0..50 {
        let r = api.get("/alcove/v1/audit?limit=10000").await;
        let text = r.json.as_str().unwrap_or("").to_owned();
        let ours = |action: &str| {
            text.lines().any(|l| {
                l.contains("\"kind\":\"volume\"")
                    && l.contains(&format!("\"action\":\"{action}\""))
                    && l.contains(&id)
            })
        };
        seen = (ours("create"), ours("delete"));
        if seen == (true, true) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(seen, (true, true), "create and delete audited");
    drop(api);
    s.stop().await;
}

#[tokio::test]
async fn teams_see_only_their_own_volumes_and_are_capped() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let api = s.client();
    let made = create(&api, "data").await;
    let id = made["volumeID"].as_str().unwrap();
    let (_, other_key) = tenant(dir.path(), "other");
    let other = Api {
        key: Some(other_key.clone()),
        ..s.client()
    };
    assert_error(
        &other.get(&format!("/volumes/{id}")).await,
        404,
        "volume_not_found",
    );
    assert_error(
        &other.delete(&format!("/volumes/{id}")).await,
        404,
        "volume_not_found",
    );
    assert_eq!(other.get("/volumes").await.json, json!([]));
    // The same name is another team's own volume.
    let theirs = create(&other, "data").await;
    assert_ne!(theirs["volumeID"], made["volumeID"]);
    // Content: the team's API key opens its volumes, never another team's.
    let r = other
        .send(
            "GET",
            &format!("/volumecontent/{id}/path?path=/"),
            &[],
            vec![],
        )
        .await;
    assert_error(&r, 404, "volume_not_found");
    let r = api
        .send(
            "GET",
            &format!("/volumecontent/{id}/path?path=/"),
            &[],
            vec![],
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert_eq!(r.json["type"], "directory");

    // At most 100 volumes per team.
    for i in 1..100 {
        create(&api, &format!("v{i}")).await;
    }
    let r = api.post("/volumes", json!({"name": "one-more"})).await;
    assert_error(&r, 403, "volume_limit_reached");
    assert!(r.json["message"].as_str().unwrap().contains("100 volumes"));
    assert_eq!(r.headers.get("should-retry").unwrap(), "false");
    assert_eq!(
        api.get("/volumes").await.json.as_array().unwrap().len(),
        100
    );
    // The other team is not affected, and a destroy frees a slot.
    create(&other, "more").await;
    let r = api.delete(&format!("/volumes/{id}")).await;
    assert_eq!(r.status, 204);
    create(&api, "one-more").await;
    drop((api, other));
    s.stop().await;
}

#[tokio::test]
async fn content_calls_need_this_volumes_token() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let api = s.client();
    let a = create(&api, "a").await;
    let b = create(&api, "b").await;
    let a_id = a["volumeID"].as_str().unwrap();
    let anon = anonymous(&s);
    let r = anon
        .get(&format!("/volumecontent/{a_id}/path?path=/"))
        .await;
    assert_error(&r, 401, "unauthenticated");
    assert!(r.json["message"].as_str().unwrap().contains("Bearer"));
    // The token is checked before a body is read.
    let r = anon
        .send(
            "PATCH",
            &format!("/volumecontent/{a_id}/path?path=/"),
            &[],
            b"not json".to_vec(),
        )
        .await;
    assert_error(&r, 401, "unauthenticated");
    let b_token = b["token"].as_str().unwrap();
    for token in [
        b_token.to_owned(),
        "vtok_00".into(),
        // This volume's token with its last digit changed.
        {
            let t = a["token"].as_str().unwrap();
            let last = if t.ends_with('0') { '1' } else { '0' };
            format!("{}{last}", &t[..68])
        },
    ] {
        let c = content(&s, &a, &token);
        let r = c.stat("/").await;
        assert_error(&r, 401, "invalid_volume_token");
        assert!(r.json["message"].as_str().unwrap().contains(a_id));
    }
    // Not a volume token and not a key.
    let r = content(&s, &a, "nonsense").stat("/").await;
    assert_error(&r, 401, "unauthenticated");
    // A token for a volume id that never existed: refused as a bad token, not a 404.
    let mut ghost = a.clone();
    ghost["volumeID"] = json!("vol_00000000000000000000000000000000");
    let r = content(&s, &ghost, a["token"].as_str().unwrap())
        .stat("/")
        .await;
    assert_error(&r, 401, "invalid_volume_token");
    // The right token works, and so does the team's key in X-API-KEY.
    let c = content(&s, &a, a["token"].as_str().unwrap());
    assert_eq!(c.stat("/").await.status, 200);
    drop(api);
    s.stop().await;
}

#[tokio::test]
async fn every_content_endpoint_works_as_the_sdk_calls_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let api = s.client();
    let vol = create(&api, "files").await;
    let token = vol["token"].as_str().unwrap().to_owned();
    let c = content(&s, &vol, &token);
    let root = as_root();

    // The root.
    let r = c.stat("/").await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert_eq!(
        (&r.json["type"], &r.json["path"]),
        (&json!("directory"), &json!("/"))
    );
    assert_eq!(c.paths("/", None).await, Vec::<String>::new());

    // Directories: exists without force is 409, with force it is accepted; force makes parents.
    let r = c.mkdir(&[("path", "/dir")]).await;
    assert_eq!(r.status, 201, "{:?}", r.json);
    assert_eq!(
        (&r.json["name"], &r.json["type"], &r.json["path"]),
        (&json!("dir"), &json!("directory"), &json!("/dir"))
    );
    assert_eq!(r.json["mode"], 0o755);
    assert_error(
        &c.mkdir(&[("path", "/dir")]).await,
        409,
        "volume_path_exists",
    );
    assert_eq!(
        c.mkdir(&[("path", "/dir"), ("force", "true")]).await.status,
        201
    );
    let r = c.mkdir(&[("path", "/x/y/z")]).await;
    assert_error(&r, 404, "volume_path_not_found");
    let r = c
        .mkdir(&[
            ("path", "/x/y/z"),
            ("force", "true"),
            ("mode", "448"),
            ("uid", "1001"),
            ("gid", "1002"),
        ])
        .await;
    assert_eq!(r.status, 201, "{:?}", r.json);
    assert_eq!(r.json["mode"], 0o700);
    if root {
        assert_eq!(
            (&r.json["uid"], &r.json["gid"]),
            (&json!(1001), &json!(1002))
        );
    }
    assert_error(&c.mkdir(&[("path", "/")]).await, 409, "volume_path_exists");
    assert_error(
        &c.mkdir(&[("path", "/d"), ("mode", "99999")]).await,
        400,
        "invalid_query",
    );
    assert_error(
        &c.mkdir(&[("path", "/d"), ("force", "maybe")]).await,
        400,
        "invalid_query",
    );
    assert_error(&c.mkdir(&[]).await, 400, "invalid_query");

    // Files: write, stat, read.
    let r = c.write(&[("path", "/dir/hello.txt")], b"hello world").await;
    assert_eq!(r.status, 201, "{:?}", r.json);
    assert_eq!(
        (
            &r.json["name"],
            &r.json["type"],
            &r.json["size"],
            &r.json["mode"]
        ),
        (
            &json!("hello.txt"),
            &json!("file"),
            &json!(11),
            &json!(0o644)
        )
    );
    if root {
        assert_eq!(
            (&r.json["uid"], &r.json["gid"]),
            (&json!(1000), &json!(1000))
        );
    }
    for t in ["atime", "mtime", "ctime"] {
        let v = r.json[t].as_str().unwrap();
        assert!(alcove_api::models::parse_rfc3339(v).is_some(), "{t}: {v}");
    }
    assert!(r.json.get("target").is_none());
    let stat = c.stat("dir/hello.txt").await;
    assert_eq!(stat.status, 200);
    assert_eq!(
        stat.json["path"], "/dir/hello.txt",
        "paths without '/' are from the root"
    );
    let r = c.read("/dir/hello.txt").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.headers["content-type"], "application/octet-stream");
    assert_eq!(r.headers["content-length"], "11");
    assert_eq!(r.json, json!("hello world"));
    // An empty file.
    assert_eq!(c.write(&[("path", "/empty")], b"").await.status, 201);
    let r = c.read("/empty").await;
    assert_eq!((r.status, r.json.clone()), (200, json!("")));

    // Overwrites: absent force overwrites, false refuses, true overwrites and makes parents.
    assert_eq!(
        c.write(&[("path", "/dir/hello.txt")], b"v2").await.status,
        201
    );
    assert_eq!(c.read("/dir/hello.txt").await.json, json!("v2"));
    let r = c
        .write(&[("path", "/dir/hello.txt"), ("force", "false")], b"v3")
        .await;
    assert_error(&r, 409, "volume_path_exists");
    assert_eq!(c.read("/dir/hello.txt").await.json, json!("v2"));
    let r = c
        .write(
            &[
                ("path", "/dir/hello.txt"),
                ("force", "true"),
                ("mode", "384"),
            ],
            b"v4",
        )
        .await;
    assert_eq!((r.status, &r.json["mode"]), (201, &json!(0o600)));
    assert_eq!(c.read("/dir/hello.txt").await.json, json!("v4"));
    let r = c.write(&[("path", "/new/deep/f.txt")], b"x").await;
    assert_error(&r, 404, "volume_path_not_found");
    assert!(
        r.json["message"].as_str().unwrap().contains("/new/deep "),
        "the missing parent, as the caller named it: {:?}",
        r.json
    );
    let r = c
        .write(&[("path", "/new/deep/f.txt"), ("force", "true")], b"x")
        .await;
    assert_eq!(r.status, 201, "{:?}", r.json);
    assert_error(
        &c.write(&[("path", "/dir")], b"x").await,
        400,
        "volume_is_a_directory",
    );
    assert_error(
        &c.write(&[("path", "/dir/hello.txt/x")], b"x").await,
        400,
        "volume_not_a_directory",
    );
    assert_error(&c.read("/dir").await, 400, "volume_is_a_directory");
    let r = c.read("/nope.txt").await;
    assert_error(&r, 404, "volume_path_not_found");
    assert!(r.json["message"].as_str().unwrap().contains("/nope.txt"));

    // Listings: one level by default, deeper with depth, parents before children.
    assert_eq!(c.paths("/", None).await, ["/dir", "/empty", "/new", "/x"]);
    assert_eq!(
        c.paths("/", Some("2")).await,
        [
            "/dir",
            "/dir/hello.txt",
            "/empty",
            "/new",
            "/new/deep",
            "/x",
            "/x/y"
        ]
    );
    assert_eq!(c.paths("/x", Some("16")).await, ["/x/y", "/x/y/z"]);
    let r = c.list("/", Some("1")).await;
    let dir_entry = r.json.as_array().unwrap()[0].clone();
    assert_eq!(
        (&dir_entry["name"], &dir_entry["type"]),
        (&json!("dir"), &json!("directory"))
    );
    for bad in ["0", "17", "-1", "x"] {
        assert_error(&c.list("/", Some(bad)).await, 400, "invalid_query");
    }
    assert_error(&c.list("/nope", None).await, 404, "volume_path_not_found");
    assert_error(
        &c.list("/dir/hello.txt", None).await,
        400,
        "volume_not_a_directory",
    );

    // Owner and mode.
    let r = c.patch("/dir/hello.txt", json!({"mode": 0o640})).await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert_eq!(r.json["mode"], 0o640);
    if root {
        let r = c
            .patch("/dir/hello.txt", json!({"uid": 1234, "gid": 4321}))
            .await;
        assert_eq!(
            (&r.json["uid"], &r.json["gid"]),
            (&json!(1234), &json!(4321))
        );
        assert_eq!(r.json["mode"], 0o640, "mode kept");
    }
    assert_error(
        &c.patch("/nope", json!({"mode": 0o600})).await,
        404,
        "volume_path_not_found",
    );
    assert_error(
        &c.patch("/dir", json!({"mode": 0o600, "owner": "x"})).await,
        400,
        "invalid_request_body",
    );
    assert_error(
        &c.patch("/dir", json!({"mode": 70000})).await,
        400,
        "invalid_query",
    );

    // Removal: files, directories with everything in them, never the root.
    assert_eq!(c.remove("/empty").await.status, 204);
    assert_error(&c.stat("/empty").await, 404, "volume_path_not_found");
    assert_eq!(c.remove("/x").await.status, 204);
    assert_error(&c.stat("/x/y/z").await, 404, "volume_path_not_found");
    assert_error(&c.remove("/x").await, 404, "volume_path_not_found");
    let r = c.remove("/").await;
    assert_error(&r, 400, "invalid_query");
    assert!(
        r.json["message"]
            .as_str()
            .unwrap()
            .contains("DELETE /volumes/")
    );
    assert_eq!(c.paths("/", None).await, ["/dir", "/new"]);

    // Methods the content API does not have.
    let r = c
        .call(
            "POST",
            "file",
            &[("path", "/a")],
            "application/json",
            vec![],
        )
        .await;
    assert_error(&r, 405, "method_not_allowed");
    drop(api);
    s.stop().await;
}

#[tokio::test]
async fn paths_and_links_never_leave_the_volume() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.txt"), "TOP-SECRET-CONTENT").unwrap();
    let s = start(dir.path()).await;
    let api = s.client();
    let vol = create(&api, "jail").await;
    let token = vol["token"].as_str().unwrap().to_owned();
    let c = content(&s, &vol, &token);
    let vdir = dir
        .path()
        .join("volumes")
        .join(vol["volumeID"].as_str().unwrap());

    for bad in ["../x", "/../../etc/passwd", "/a/../../b", "a\0b"] {
        let r = c.stat(bad).await;
        assert_error(&r, 400, "volume_path_invalid");
        assert_error(&c.read(bad).await, 400, "volume_path_invalid");
        assert_error(
            &c.write(&[("path", bad)], b"x").await,
            400,
            "volume_path_invalid",
        );
        assert_error(&c.mkdir(&[("path", bad)]).await, 400, "volume_path_invalid");
        assert_error(&c.remove(bad).await, 400, "volume_path_invalid");
    }

    // Links a guest could leave in the volume: to a file and a directory outside it, absolute
    // and relative, and a loop.
    std::os::unix::fs::symlink(outside.path().join("secret.txt"), vdir.join("file-link")).unwrap();
    std::os::unix::fs::symlink(outside.path(), vdir.join("dir-link")).unwrap();
    std::os::unix::fs::symlink("../../../../../../../etc", vdir.join("rel-link")).unwrap();
    std::os::unix::fs::symlink("loop", vdir.join("loop")).unwrap();

    // Described, never followed.
    let r = c.stat("/file-link").await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    assert_eq!(r.json["type"], "symlink");
    assert_eq!(
        r.json["target"],
        json!(outside.path().join("secret.txt").to_str().unwrap())
    );
    let listed = c.list("/", None).await;
    assert_eq!(listed.status, 200);
    assert!(listed.json.to_string().contains("\"symlink\""));
    assert!(
        !listed
            .json
            .to_string()
            .contains("secret.txt\",\"type\":\"file")
    );

    // Reads through links fail; nothing of the outside file comes back.
    for p in [
        "/file-link",
        "/dir-link/secret.txt",
        "/rel-link/passwd",
        "/loop",
    ] {
        let r = c.read(p).await;
        assert!(
            matches!(r.status, 400 | 404),
            "{p}: {} {:?}",
            r.status,
            r.json
        );
        assert!(!r.json.to_string().contains("TOP-SECRET-CONTENT"), "{p}");
    }
    for p in ["/dir-link", "/rel-link"] {
        let r = c.list(p, None).await;
        assert!(matches!(r.status, 400 | 404), "{p}: {:?}", r.json);
        assert!(!r.json.to_string().contains("secret.txt"));
    }
    // Writes through a directory link fail; a write at a link replaces the link itself.
    let r = c.write(&[("path", "/dir-link/new.txt")], b"x").await;
    assert!(matches!(r.status, 400 | 404), "{:?}", r.json);
    let r = c
        .mkdir(&[("path", "/dir-link/sub"), ("force", "true")])
        .await;
    assert!(matches!(r.status, 400 | 404 | 409), "{:?}", r.json);
    let r = c.write(&[("path", "/file-link")], b"replaced").await;
    assert_eq!(r.status, 201, "{:?}", r.json);
    assert_eq!(r.json["type"], "file");
    // Changing a link's mode or removing a directory link leaves the outside alone.
    let _ = c.patch("/dir-link", json!({"mode": 0o777})).await;
    assert_eq!(c.remove("/dir-link").await.status, 204);
    let names: Vec<_> = std::fs::read_dir(outside.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        names,
        ["secret.txt"],
        "nothing was written outside the volume"
    );
    assert_eq!(
        std::fs::read_to_string(outside.path().join("secret.txt")).unwrap(),
        "TOP-SECRET-CONTENT"
    );
    assert_ne!(
        std::fs::metadata(outside.path())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o777
    );
    drop(api);
    s.stop().await;
}

type Chunks = Pin<Box<dyn futures::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send>>;

/// `PUT` of `total` bytes in 64 KiB chunks, as a stream without a declared length (chunked).
async fn put_streamed(s: &TestServer, vol: &Value, path: &str, total: usize) -> (u16, Value) {
    let client = Client::builder(TokioExecutor::new()).build_http::<StreamBody<Chunks>>();
    let chunks: Chunks = Box::pin(futures::stream::unfold(0usize, move |sent| async move {
        if sent >= total {
            return None;
        }
        let n = (64 << 10).min(total - sent);
        let data: Vec<u8> = (sent..sent + n).map(|i| (i % 251) as u8).collect();
        tokio::task::yield_now().await;
        Some((Ok(Frame::data(Bytes::from(data))), sent + n))
    }));
    let req = http::Request::builder()
        .method("PUT")
        .uri(format!(
            "http://{}/volumecontent/{}/file?{}",
            s.addr,
            vol["volumeID"].as_str().unwrap(),
            query(&[("path", path)])
        ))
        .header(
            "authorization",
            format!("Bearer {}", vol["token"].as_str().unwrap()),
        )
        .header("content-type", "application/octet-stream")
        .body(StreamBody::new(chunks))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn large_files_stream_both_ways_and_the_size_cap_holds() {
    let dir = tempfile::tempdir().unwrap();
    let mut limits = fast_limits();
    limits.volumes.max_bytes = 8 << 20;
    let s = TestServer::start(dir.path(), Arc::new(FakeBackend::new()), limits).await;
    let api = s.client();
    let vol = create(&api, "big").await;
    let token = vol["token"].as_str().unwrap().to_owned();
    let c = content(&s, &vol, &token);

    // 5 MiB up in chunks, well over the REST body limit (1 MiB), and back.
    let total = 5 << 20;
    let (status, entry) = put_streamed(&s, &vol, "/big.bin", total).await;
    assert_eq!(status, 201, "{entry:?}");
    assert_eq!(entry["size"], total);
    let resp = Client::builder(TokioExecutor::new())
        .build_http::<http_body_util::Full<Bytes>>()
        .request(
            http::Request::get(format!(
                "http://{}/volumecontent/{}/file?path=/big.bin",
                s.addr,
                vol["volumeID"].as_str().unwrap()
            ))
            .header("authorization", format!("Bearer {token}"))
            .body(http_body_util::Full::new(Bytes::new()))
            .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-length"], total.to_string());
    let mut body = resp.into_body();
    let (mut got, mut frames) = (Vec::with_capacity(total), 0);
    while let Some(f) = body.frame().await {
        if let Ok(d) = f.unwrap().into_data() {
            got.extend_from_slice(&d);
            frames += 1;
        }
    }
    assert!(frames > 1, "the download is streamed, not one buffer");
    assert_eq!(got.len(), total);
    assert!(got.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));

    // Past the volume's 8 MiB: refused with 507, nothing of the upload kept, the old file
    // intact.
    let (status, err) = put_streamed(&s, &vol, "/more.bin", 4 << 20).await;
    assert_eq!(status, 507, "{err:?}");
    assert_eq!(err["error_code"], "volume_full");
    assert!(err["message"].as_str().unwrap().contains("8388608 bytes"));
    assert_error(&c.stat("/more.bin").await, 404, "volume_path_not_found");
    assert_eq!(
        c.paths("/", None).await,
        ["/big.bin"],
        "no upload leftovers"
    );
    // A declared length over the cap is refused before any of it is read.
    let r = c
        .call(
            "PUT",
            "file",
            &[("path", "/huge.bin")],
            "application/octet-stream",
            vec![0u8; (8 << 20) + 1],
        )
        .await;
    assert_error(&r, 507, "volume_full");
    // Space comes back when files go.
    assert_eq!(c.remove("/big.bin").await.status, 204);
    let (status, _) = put_streamed(&s, &vol, "/more.bin", 4 << 20).await;
    assert_eq!(status, 201);
    drop(api);
    s.stop().await;
}

#[tokio::test]
async fn sandboxes_mount_volumes_which_cannot_be_destroyed_under_them() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let api = s.client();
    let data = create(&api, "data").await;
    let logs = create(&api, "logs").await;
    let data_id = data["volumeID"].as_str().unwrap().to_owned();

    let r = api
        .post(
            "/v2/sandboxes",
            json!({"templateID": "base", "volumeMounts": [
                {"name": "data", "path": "/mnt/data"},
                {"name": "logs", "path": "/home/user/logs/"},
            ]}),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.json);
    let id = r.json["sandboxID"].as_str().unwrap().to_owned();
    let want = json!([
        {"name": "data", "path": "/mnt/data"},
        {"name": "logs", "path": "/home/user/logs"},
    ]);
    // The backend is told which volumes, by id, where.
    let mounts = s.backend.vms.lock().unwrap()[&id].volume_mounts.clone();
    assert_eq!(
        mounts,
        [
            alcove_volume::MountSpec {
                volume_id: data_id.clone(),
                name: "data".into(),
                path: "/mnt/data".into()
            },
            alcove_volume::MountSpec {
                volume_id: logs["volumeID"].as_str().unwrap().into(),
                name: "logs".into(),
                path: "/home/user/logs".into()
            },
        ]
    );
    let r = api.get(&format!("/sandboxes/{id}")).await;
    assert_eq!(r.json["volumeMounts"], want);
    let r = api.get("/v2/sandboxes").await;
    let listed = r.json.as_array().unwrap();
    assert_eq!(listed[0]["volumeMounts"], want);
    let plain = api
        .post("/v2/sandboxes", json!({"templateID": "base"}))
        .await;
    let plain_id = plain.json["sandboxID"].as_str().unwrap().to_owned();
    assert_eq!(
        api.get(&format!("/sandboxes/{plain_id}")).await.json["volumeMounts"],
        json!([])
    );

    // Destroying a mounted volume is refused, naming the sandbox, while it runs or is paused.
    let r = api.delete(&format!("/volumes/{data_id}")).await;
    assert_error(&r, 409, "volume_in_use");
    let msg = r.json["message"].as_str().unwrap();
    assert!(msg.contains(&id) && msg.contains("Kill"), "{msg}");
    assert!(!msg.contains(&plain_id));
    assert_eq!(
        api.post(&format!("/sandboxes/{id}/pause"), json!({}))
            .await
            .status,
        204
    );
    assert_error(
        &api.delete(&format!("/volumes/{data_id}")).await,
        409,
        "volume_in_use",
    );

    // A snapshot's sandboxes mount what the sandbox it was taken from mounted.
    let r = api
        .post(
            &format!("/v2/sandboxes/{id}/connect"),
            json!({"timeout": 60}),
        )
        .await;
    assert!(r.status == 200 || r.status == 201, "{:?}", r.json);
    let snap = api
        .post(&format!("/sandboxes/{id}/snapshots"), json!({}))
        .await;
    assert_eq!(snap.status, 201, "{:?}", snap.json);
    let child = api
        .post(
            "/v2/sandboxes",
            json!({"templateID": snap.json["snapshotID"], "timeout": 60}),
        )
        .await;
    assert_eq!(child.status, 201, "{:?}", child.json);
    let child_id = child.json["sandboxID"].as_str().unwrap().to_owned();
    assert_eq!(
        api.get(&format!("/sandboxes/{child_id}")).await.json["volumeMounts"],
        want
    );
    assert_eq!(
        s.backend.vms.lock().unwrap()[&child_id].volume_mounts.len(),
        2
    );
    // A fork's children mount what the parent mounts.
    let f = api
        .post(&format!("/sandboxes/{id}/fork"), json!({"count": 1}))
        .await;
    assert_eq!(f.status, 201, "{:?}", f.json);
    let kid = f.json[0]["sandbox"]["sandboxID"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        api.get(&format!("/sandboxes/{kid}")).await.json["volumeMounts"],
        want
    );
    assert_eq!(api.delete(&format!("/sandboxes/{kid}")).await.status, 204);
    // Given mounts replace the snapshot's.
    let child2 = api
        .post(
            "/v2/sandboxes",
            json!({"templateID": snap.json["snapshotID"], "volumeMounts": [
                {"name": "logs", "path": "/logs"}]}),
        )
        .await;
    assert_eq!(child2.status, 201, "{:?}", child2.json);
    let child2_id = child2.json["sandboxID"].as_str().unwrap().to_owned();
    assert_eq!(
        api.get(&format!("/sandboxes/{child2_id}")).await.json["volumeMounts"],
        json!([{"name": "logs", "path": "/logs"}])
    );

    // Once every sandbox mounting it is killed, it goes.
    for sbx in [&id, &child_id] {
        assert_eq!(api.delete(&format!("/sandboxes/{sbx}")).await.status, 204);
    }
    let r = api.delete(&format!("/volumes/{data_id}")).await;
    assert_eq!(r.status, 204, "{:?}", r.json);
    // A snapshot whose volume is gone cannot make sandboxes that mount it.
    let r = api
        .post(
            "/v2/sandboxes",
            json!({"templateID": snap.json["snapshotID"]}),
        )
        .await;
    assert_error(&r, 400, "mounted_volume_not_found");
    let msg = r.json["message"].as_str().unwrap();
    assert!(
        msg.contains("was taken from a sandbox that mounted the volume \"data\"")
            && msg.contains("Volume.create"),
        "{msg}"
    );
    drop(api);
    s.stop().await;
}

#[tokio::test]
async fn bad_volume_mounts_are_refused_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path()).await;
    let api = s.client();
    create(&api, "data").await;
    let (_, other_key) = tenant(dir.path(), "other");
    let other = Api {
        key: Some(other_key),
        ..s.client()
    };
    create(&other, "theirs").await;
    let m = |name: &str, path: &str| json!({"name": name, "path": path});
    let cases = [
        (
            json!([m("nope", "/mnt")]),
            "mounted_volume_not_found",
            "Volume.create",
        ),
        (
            json!([m("theirs", "/mnt")]),
            "mounted_volume_not_found",
            "theirs",
        ),
        (
            json!([m("data", "mnt/data")]),
            "invalid_request_body",
            "not absolute",
        ),
        (
            json!([m("data", "/")]),
            "invalid_request_body",
            "guest's root",
        ),
        (
            json!([m("data", "/proc/x")]),
            "invalid_request_body",
            "/proc",
        ),
        (json!([m("data", "/etc")]), "invalid_request_body", "/etc"),
        (
            json!([m("data", "/usr/local/x")]),
            "invalid_request_body",
            "/usr",
        ),
        (
            json!([m("data", "/a/../etc")]),
            "invalid_request_body",
            "normalized",
        ),
        (
            json!([m("data", "/mnt/a"), m("data", "/mnt/a/")]),
            "invalid_request_body",
            "same path",
        ),
        (
            json!([m("data", "/mnt"), m("data", "/mnt/inner")]),
            "invalid_request_body",
            "one inside the other",
        ),
        (
            json!(
                (0..9)
                    .map(|i| m("data", &format!("/m{i}")))
                    .collect::<Vec<_>>()
            ),
            "invalid_request_body",
            "at most 8",
        ),
        (
            json!([{"name": "data", "path": "/mnt", "readOnly": true}]),
            "invalid_request_body",
            "unknown field",
        ),
        (json!([{"name": "data"}]), "invalid_request_body", "path"),
        (json!({"name": "data"}), "invalid_request_body", "sequence"),
    ];
    for (mounts, code, says) in cases {
        let r = api
            .post(
                "/v2/sandboxes",
                json!({"templateID": "base", "volumeMounts": mounts}),
            )
            .await;
        assert_error(&r, 400, code);
        let msg = r.json["message"].as_str().unwrap();
        assert!(msg.contains(says), "{mounts}: {msg}");
    }
    assert!(
        s.backend.vms.lock().unwrap().is_empty(),
        "nothing was started"
    );
    // Eight is fine, and so is an empty list.
    let eight: Vec<_> = (0..8).map(|i| m("data", &format!("/m{i}"))).collect();
    let r = api
        .post(
            "/v2/sandboxes",
            json!({"templateID": "base", "volumeMounts": eight}),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.json);
    let r = api
        .post(
            "/sandboxes",
            json!({"templateID": "base", "volumeMounts": []}),
        )
        .await;
    assert_eq!(r.status, 201, "{:?}", r.json);
    drop((api, other));
    s.stop().await;
}

#[tokio::test]
async fn volumes_count_against_the_teams_storage_quota_and_are_metered() {
    let dir = tempfile::tempdir().unwrap();
    let metering = alcove_api::MeteringConfig {
        interval: std::time::Duration::from_millis(200),
        ..Default::default()
    };
    let s = TestServer::start_metered(
        dir.path(),
        Arc::new(FakeBackend::new()),
        fast_limits(),
        metering,
        |s| s,
    )
    .await;
    let admin = s.client();
    let (_, key) = tenant(dir.path(), "tenant");
    let api = Api {
        key: Some(key),
        ..s.client()
    };
    // About 1 MiB for the team.
    let r = admin
        .put(
            "/alcove/v1/teams/tenant/limits",
            json!({"maxStorageGib": 1.0 / 1024.0}),
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.json);
    let vol = create(&api, "data").await;
    let token = vol["token"].as_str().unwrap().to_owned();
    let c = content(&s, &vol, &token);

    // Under the limit an upload is taken whole, even one that crosses it.
    let (status, e) = put_streamed(&s, &vol, "/a.bin", 700 << 10).await;
    assert_eq!(status, 201, "{e:?}");
    let (status, e) = put_streamed(&s, &vol, "/b.bin", 700 << 10).await;
    assert_eq!(status, 201, "{e:?}");
    // Over it, the volume may not grow, and no new volume may be made, each naming the quota.
    let (status, e) = put_streamed(&s, &vol, "/c.bin", 10).await;
    assert_eq!(status, 429, "{e:?}");
    assert_eq!(e["error_code"], "storage_quota_exceeded");
    assert!(e["message"].as_str().unwrap().contains("volumes"), "{e}");
    assert_error(&c.stat("/c.bin").await, 404, "volume_path_not_found");
    let r = api.post("/volumes", json!({"name": "more"})).await;
    assert_error(&r, 429, "storage_quota_exceeded");
    assert!(
        r.json["message"].as_str().unwrap().contains("1048576"),
        "{:?}",
        r.json
    );
    // Another team is not held back by this one.
    let other = create(&admin, "admins").await;
    let (status, _) = put_streamed(&s, &other, "/x.bin", 10).await;
    assert_eq!(status, 201);
    // Freeing space lets the volume grow again.
    assert_eq!(c.remove("/a.bin").await.status, 204);
    let (status, e) = put_streamed(&s, &vol, "/c.bin", 10).await;
    assert_eq!(status, 201, "{e:?}");

    // The metering tick charges the volume's bytes as the team's storage.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let r = api.get("/alcove/v1/usage?groupBy=team").await;
        assert_eq!(r.status, 200, "{:?}", r.json);
        let hours = r.json["items"][0]["storageGibHours"]
            .as_f64()
            .unwrap_or(0.0);
        if hours > 0.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no storage charged: {:?}",
            r.json
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    drop((api, admin));
    s.stop().await;
}

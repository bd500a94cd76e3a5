//! The dashboard over the fake backend and real SQLite, as a browser speaks to it (forms and
//! cookies, no API key header): sign-in and its refusals, the session cookie's flags, a team's
//! own sandboxes only, what callers wrote rendered as text, the CSRF token and the Origin check
//! on every action, a revoked key ending the session with a page that says so, sign-out.

mod common;

use std::sync::Arc;

use common::{Api, FakeBackend, Reply, TestServer, fast_limits, tenant};
use serde_json::json;

const XSS: &str = "<script>alert(1)</script>";

fn browser(server: &TestServer) -> Api {
    let mut api = server.client();
    api.key = None;
    api
}

fn form(pairs: &[(&str, &str)]) -> Vec<u8> {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs)
        .finish()
        .into_bytes()
}

async fn post_form(
    api: &Api,
    path: &str,
    headers: &[(&str, &str)],
    pairs: &[(&str, &str)],
) -> Reply {
    let mut h = vec![("content-type", "application/x-www-form-urlencoded")];
    h.extend_from_slice(headers);
    api.send("POST", path, &h, form(pairs)).await
}

fn text(r: &Reply) -> String {
    r.json
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| r.json.to_string())
}

fn header<'a>(r: &'a Reply, name: &str) -> &'a str {
    r.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

/// Signs in with `key`; answers the `Cookie` header value to send.
async fn sign_in(api: &Api, key: &str) -> String {
    let r = post_form(api, "/dashboard/signin", &[], &[("api_key", key)]).await;
    assert_eq!(r.status, 303, "{}", text(&r));
    assert_eq!(header(&r, "location"), "/dashboard/sandboxes");
    let cookie = header(&r, "set-cookie");
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/dashboard"] {
        assert!(cookie.contains(flag), "{cookie}");
    }
    cookie.split(';').next().unwrap().to_owned()
}

fn csrf_of(page: &str) -> String {
    let at = page
        .find("name=\"csrf\" value=\"")
        .expect("a form with the CSRF token")
        + 19;
    page[at..].split('"').next().unwrap().to_owned()
}

#[tokio::test]
async fn a_browser_signs_in_sees_its_sandboxes_and_kills_one_with_the_forms_token() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), Arc::new(FakeBackend::new()), fast_limits()).await;
    let api = server.client();
    let (_, other_key) = tenant(dir.path(), "other");
    let mine = api
        .post(
            "/sandboxes",
            json!({"templateID": "base", "metadata": {"note": XSS}}),
        )
        .await;
    assert_eq!(mine.status, 201, "{:?}", mine.json);
    let mine = mine.json["sandboxID"].as_str().unwrap().to_owned();
    let mut other_api = server.client();
    other_api.key = Some(other_key);
    let theirs = other_api
        .post("/sandboxes", json!({"templateID": "base"}))
        .await;
    let theirs = theirs.json["sandboxID"].as_str().unwrap().to_owned();

    let web = browser(&server);
    // Not signed in: to the sign-in page, which works without a session.
    let r = web.get("/dashboard/sandboxes").await;
    assert_eq!(
        (r.status, header(&r, "location")),
        (303, "/dashboard/signin")
    );
    let r = web.get("/dashboard/signin").await;
    assert_eq!(r.status, 200);
    assert!(text(&r).contains("<label for=\"api_key\">API key</label>"));
    // A wrong key, and a sign-in posted from another site.
    let r = post_form(&web, "/dashboard/signin", &[], &[("api_key", "e2b_nope")]).await;
    assert_eq!(r.status, 401);
    assert!(text(&r).contains("not valid"), "{}", text(&r));
    assert!(header(&r, "set-cookie").is_empty());
    let r = post_form(
        &web,
        "/dashboard/signin",
        &[("origin", "https://evil.example")],
        &[("api_key", &server.key)],
    )
    .await;
    assert_eq!(r.status, 403, "{}", text(&r));
    assert!(header(&r, "set-cookie").is_empty());

    let cookie = sign_in(&web, &server.key).await;
    let r = get_page(&web, &cookie, "/dashboard/sandboxes").await;
    assert_eq!(r.status, 200);
    let page = text(&r);
    assert!(page.contains(&mine), "{page}");
    assert!(!page.contains(&theirs), "another team's sandbox is listed");
    // What the caller wrote is text, never markup.
    assert!(!page.contains(XSS), "{page}");
    assert!(
        page.contains("&lt;script&gt;alert(1)&lt;&#x2f;script&gt;"),
        "{page}"
    );
    assert!(header(&r, "content-security-policy").contains("default-src 'self'"));
    assert_eq!(header(&r, "x-frame-options"), "DENY");
    let csrf = csrf_of(&page);

    // Actions without the token, with another session's token, or from another site: refused,
    // and the sandbox still runs.
    let kill = format!("/dashboard/sandboxes/{mine}/kill");
    for (headers, pairs) in [
        (vec![("cookie", cookie.as_str())], vec![]),
        (
            vec![("cookie", cookie.as_str())],
            vec![("csrf", "0".repeat(64))],
        ),
        (
            vec![
                ("cookie", cookie.as_str()),
                ("origin", "https://evil.example"),
            ],
            vec![("csrf", csrf.clone())],
        ),
    ] {
        let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = post_form(&web, &kill, &headers, &pairs).await;
        assert_eq!(r.status, 403, "{}", text(&r));
        assert!(text(&r).contains("nothing was done"), "{}", text(&r));
    }
    assert_eq!(api.get(&format!("/sandboxes/{mine}")).await.status, 200);
    // Another team's sandbox cannot be killed from this session.
    let r = post_form(
        &web,
        &format!("/dashboard/sandboxes/{theirs}/kill"),
        &[("cookie", &cookie)],
        &[("csrf", &csrf)],
    )
    .await;
    assert_eq!(r.status, 404, "{}", text(&r));
    assert_eq!(
        other_api.get(&format!("/sandboxes/{theirs}")).await.status,
        200
    );

    let r = post_form(
        &web,
        &kill,
        &[
            ("cookie", &cookie),
            ("origin", &format!("http://{}", server.addr)),
        ],
        &[("csrf", &csrf)],
    )
    .await;
    assert_eq!(r.status, 303, "{}", text(&r));
    assert_eq!(api.get(&format!("/sandboxes/{mine}")).await.status, 404);
    let r = get_page(
        &web,
        &cookie,
        "/dashboard/sandboxes?state=killed&template=&metadata=",
    )
    .await;
    assert!(text(&r).contains(&mine), "the killed filter shows it");
    let r = get_page(&web, &cookie, "/dashboard/sandboxes").await;
    assert!(
        !text(&r).contains(&mine),
        "the default list is running and paused only"
    );

    // Sign-out ends the session.
    let r = post_form(
        &web,
        "/dashboard/signout",
        &[("cookie", &cookie)],
        &[("csrf", &csrf)],
    )
    .await;
    assert_eq!(r.status, 303);
    assert!(header(&r, "set-cookie").contains("Max-Age=0"));
    let r = get_page(&web, &cookie, "/dashboard/sandboxes").await;
    assert_eq!(
        (r.status, header(&r, "location")),
        (303, "/dashboard/signin")
    );
    server.stop().await;
}

#[tokio::test]
async fn revoking_the_key_ends_its_sessions_with_a_page_that_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), Arc::new(FakeBackend::new()), fast_limits()).await;
    let (team, key) = tenant(dir.path(), "revoked");
    let web = browser(&server);
    let cookie = sign_in(&web, &key).await;
    let r = get_page(&web, &cookie, "/dashboard/sandboxes").await;
    assert_eq!(r.status, 200);
    assert!(text(&r).contains(&team));
    let store =
        alcove_store::Store::connect(&alcove_store::Database::from_test_env(dir.path())).unwrap();
    let id = store
        .list_api_keys(Some(&team))
        .unwrap()
        .into_iter()
        .next()
        .unwrap()
        .id;
    assert!(store.revoke_api_key(&id).unwrap());
    let r = get_page(&web, &cookie, "/dashboard/sandboxes").await;
    assert_eq!(r.status, 401);
    assert!(text(&r).contains("revoked"), "{}", text(&r));
    assert!(header(&r, "set-cookie").contains("Max-Age=0"));
    // And the key no longer signs in.
    let r = post_form(&web, "/dashboard/signin", &[], &[("api_key", &key)]).await;
    assert_eq!(r.status, 401);
    server.stop().await;
}

async fn get_page(web: &Api, cookie: &str, path: &str) -> Reply {
    web.send("GET", path, &[("cookie", cookie)], vec![]).await
}

#[tokio::test]
async fn a_sandboxs_page_its_actions_the_tree_keys_usage_templates_and_host() {
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(FakeBackend::new());
    backend
        .network_updates
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let server = TestServer::start(dir.path(), backend, fast_limits()).await;
    let api = server.client();
    let (_, other_key) = tenant(dir.path(), "other");
    let mut other_api = server.client();
    other_api.key = Some(other_key.clone());
    let theirs = other_api
        .post("/sandboxes", json!({"templateID": "base"}))
        .await
        .json["sandboxID"]
        .as_str()
        .unwrap()
        .to_owned();
    let web = browser(&server);
    let cookie = sign_in(&web, &server.key).await;
    let list = text(&get_page(&web, &cookie, "/dashboard/sandboxes").await);
    let csrf = csrf_of(&list);
    let origin = format!("http://{}", server.addr);
    let post = |path: String, pairs: Vec<(&'static str, String)>| {
        let (web, cookie, origin) = (&web, cookie.clone(), origin.clone());
        async move {
            let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
            post_form(
                web,
                &path,
                &[("cookie", &cookie), ("origin", &origin)],
                &pairs,
            )
            .await
        }
    };

    // Create from the list's form: to the new sandbox's page, with its metadata as text.
    let r = post(
        "/dashboard/sandboxes".into(),
        vec![
            ("csrf", csrf.clone()),
            ("template", "base".into()),
            ("timeout", "600".into()),
            ("metadata", format!("note={XSS}")),
        ],
    )
    .await;
    assert_eq!(r.status, 303, "{}", text(&r));
    let loc = header(&r, "location").to_owned();
    let id = loc
        .trim_start_matches("/dashboard/sandboxes/")
        .split('?')
        .next()
        .unwrap()
        .to_owned();
    let got = api.get(&format!("/sandboxes/{id}")).await;
    assert_eq!(got.json["metadata"]["note"], XSS);
    let r = get_page(&web, &cookie, &loc).await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let html = text(&r);
    assert!(html.contains(&format!("Created {id} from base.")), "{html}");
    assert!(
        !html.contains(XSS) && html.contains("&lt;script&gt;"),
        "{html}"
    );
    for part in [
        "id=\"metrics\"",
        "id=\"terminal-open\"",
        "id=\"events\"",
        "Egress rules",
    ] {
        assert!(html.contains(part), "{part} missing: {html}");
    }
    // Bad create input: a page that says what is wrong.
    let r = post(
        "/dashboard/sandboxes".into(),
        vec![
            ("csrf", csrf.clone()),
            ("template", "base".into()),
            ("timeout", "soon".into()),
        ],
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(text(&r).contains("whole number of seconds"), "{}", text(&r));

    // Another team's sandbox: not found on every page and JSON feed.
    for path in [
        format!("/dashboard/sandboxes/{theirs}"),
        format!("/dashboard/sandboxes/{theirs}/events.json"),
        format!("/dashboard/sandboxes/{theirs}/metrics.json"),
        format!("/dashboard/sandboxes/{theirs}/files"),
    ] {
        assert_eq!(get_page(&web, &cookie, &path).await.status, 404, "{path}");
    }
    let r = post(
        format!("/dashboard/sandboxes/{theirs}/do/timeout"),
        vec![("csrf", csrf.clone()), ("timeout", "30".into())],
    )
    .await;
    assert_eq!(r.status, 404);
    // The JSON feeds of the page's scripts.
    let m = get_page(
        &web,
        &cookie,
        &format!("/dashboard/sandboxes/{id}/metrics.json"),
    )
    .await;
    assert_eq!(m.status, 200);
    assert!(
        m.json["t"].is_array() && m.json["cpu"].is_array(),
        "{:?}",
        m.json
    );
    let e = get_page(
        &web,
        &cookie,
        &format!("/dashboard/sandboxes/{id}/events.json?after=0"),
    )
    .await;
    assert_eq!(e.status, 200);
    assert_eq!(e.json["ended"], false);

    // Actions: each needs the token; with it, done and said.
    let r = post(
        format!("/dashboard/sandboxes/{id}/do/timeout"),
        vec![("timeout", "900".into())],
    )
    .await;
    assert_eq!(r.status, 403);
    let r = post(
        format!("/dashboard/sandboxes/{id}/do/timeout"),
        vec![("csrf", csrf.clone()), ("timeout", "900".into())],
    )
    .await;
    assert_eq!(r.status, 303, "{}", text(&r));
    assert!(
        header(&r, "location").contains("now+ends+900+s"),
        "{}",
        header(&r, "location")
    );
    let r = post(
        format!("/dashboard/sandboxes/{id}/network"),
        vec![
            ("csrf", csrf.clone()),
            ("allow_out", "example.com\n10.1.2.3".into()),
            ("deny_out", "0.0.0.0/0".into()),
            ("rules", String::new()),
        ],
    )
    .await;
    assert_eq!(r.status, 303, "{}", text(&r));
    let net = api.get(&format!("/sandboxes/{id}")).await.json["network"].clone();
    assert_eq!(net["allowOut"], json!(["example.com", "10.1.2.3"]), "{net}");
    let r = post(
        format!("/dashboard/sandboxes/{id}/network"),
        vec![("csrf", csrf.clone()), ("rules", "{not json".into())],
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(text(&r).contains("not valid JSON"), "{}", text(&r));

    // A snapshot, then the tree: the node, a sandbox started from it shown live on it, then
    // the branch deleted.
    let r = post(
        format!("/dashboard/sandboxes/{id}/do/snapshot"),
        vec![("csrf", csrf.clone()), ("name", "<b>cp</b>".into())],
    )
    .await;
    assert_eq!(r.status, 303, "{}", text(&r));
    let snaps = api.get("/alcove/v1/snapshots/tree").await;
    let snap = snaps.json["roots"][0]["snapshotID"]
        .as_str()
        .unwrap()
        .to_owned();
    let tree = text(&get_page(&web, &cookie, "/dashboard/snapshots").await);
    assert!(
        tree.contains(&snap) && tree.contains("&lt;b&gt;cp&lt;&#x2f;b&gt;"),
        "{tree}"
    );
    let r = post(
        format!("/dashboard/snapshots/{snap}/do/start"),
        vec![("csrf", csrf.clone()), ("count", "2".into())],
    )
    .await;
    assert_eq!(r.status, 303, "{}", text(&r));
    let tree = text(&get_page(&web, &cookie, "/dashboard/snapshots").await);
    let live = tree
        .split("Live:")
        .nth(1)
        .expect("live sandboxes on the node");
    // The two started from it, and the sandbox it was taken from (it goes on from there).
    assert_eq!(live.matches("class=\"child\"").count(), 3, "{tree}");
    assert!(live.contains(&id), "{tree}");
    let r = post(
        format!("/dashboard/snapshots/{snap}/do/start"),
        vec![("csrf", csrf.clone()), ("count", "0".into())],
    )
    .await;
    assert_eq!(r.status, 400);
    let r = post(
        format!("/dashboard/snapshots/{snap}/do/delete"),
        vec![("csrf", csrf.clone())],
    )
    .await;
    assert_eq!(r.status, 303, "{}", text(&r));
    assert!(
        header(&r, "location").contains("Deleted"),
        "{}",
        header(&r, "location")
    );

    // Keys: the secret shown once, usable; the name as text; revoked by the team only.
    let r = post(
        "/dashboard/keys".into(),
        vec![("csrf", csrf.clone()), ("name", XSS.into())],
    )
    .await;
    assert_eq!(r.status, 200, "{}", text(&r));
    let html = text(&r);
    assert!(!html.contains(XSS), "{html}");
    let needle = "id=\"secret\" readonly size=\"60\" value=\"";
    let at = html.find(needle).unwrap() + needle.len();
    let secret = html[at..].split('"').next().unwrap().to_owned();
    let mut new_api = server.client();
    new_api.key = Some(secret.clone());
    assert_eq!(new_api.get("/sandboxes").await.status, 200);
    let keys = text(&get_page(&web, &cookie, "/dashboard/keys").await);
    assert!(!keys.contains(&secret), "the secret is shown once only");
    let store =
        alcove_store::Store::connect(&alcove_store::Database::from_test_env(dir.path())).unwrap();
    let all = store.list_api_keys(None).unwrap();
    let new_id = all.iter().find(|k| k.name == XSS).unwrap().id.clone();
    let theirs_key = all
        .iter()
        .find(|k| k.team_id != all.iter().find(|x| x.id == new_id).unwrap().team_id)
        .unwrap()
        .id
        .clone();
    let r = post(
        format!("/dashboard/keys/{theirs_key}/revoke"),
        vec![("csrf", csrf.clone())],
    )
    .await;
    assert_eq!(r.status, 400, "{}", text(&r));
    let mut theirs_api = server.client();
    theirs_api.key = Some(other_key);
    assert_eq!(theirs_api.get("/sandboxes").await.status, 200);
    let r = post(format!("/dashboard/keys/{new_id}/revoke"), vec![]).await;
    assert_eq!(r.status, 403);
    let r = post(
        format!("/dashboard/keys/{new_id}/revoke"),
        vec![("csrf", csrf.clone())],
    )
    .await;
    assert_eq!(r.status, 303, "{}", text(&r));
    assert_eq!(new_api.get("/sandboxes").await.status, 401);

    // Usage, templates and the host page render.
    let r = get_page(&web, &cookie, "/dashboard/usage").await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert!(text(&r).contains("Running sandboxes") && text(&r).contains("usage-data"));
    let r = get_page(&web, &cookie, "/dashboard/templates").await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert!(text(&r).contains("base"));
    let r = get_page(&web, &cookie, "/dashboard/host").await;
    assert_eq!(r.status, 200, "{}", text(&r));
    assert!(text(&r).contains("Warm pools"));
    // Assets come from the binary.
    for (a, ct) in [
        ("xterm.js", "text/javascript"),
        ("uplot.js", "text/javascript"),
        ("app.js", "text/javascript"),
        ("xterm.css", "text/css"),
    ] {
        let r = web.get(&format!("/dashboard/assets/{a}")).await;
        assert_eq!(r.status, 200, "{a}");
        assert!(header(&r, "content-type").starts_with(ct), "{a}");
    }
    assert_eq!(web.get("/dashboard/assets/nope.js").await.status, 404);

    // Kill from the page.
    let r = post(
        format!("/dashboard/sandboxes/{id}/do/kill"),
        vec![("csrf", csrf.clone())],
    )
    .await;
    assert_eq!(r.status, 303);
    assert_eq!(api.get(&format!("/sandboxes/{id}")).await.status, 404);
    server.stop().await;
}

/// The list with 1,000 sandboxes: all listed in one page, and how long the server takes to
/// render it (printed, not asserted: timings on shared machines are noise; the number is in
/// docs/benchmarks.md).
#[tokio::test]
async fn a_list_of_a_thousand_sandboxes() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path(), Arc::new(FakeBackend::new()), fast_limits()).await;
    let store =
        alcove_store::Store::connect(&alcove_store::Database::from_test_env(dir.path())).unwrap();
    let team = store.authenticate(&server.key).unwrap().unwrap().team_id;
    let now = alcove_store::now_ms();
    for i in 0..1000 {
        let mut r = alcove_store::NewSandboxRecord {
            id: format!("seeded{i:05}"),
            team_id: team.clone(),
            template_id: "base".into(),
            alias: Some("base".into()),
            started_at: now,
            end_at: now + 3_600_000,
            cpu_count: 2,
            memory_mb: 512,
            disk_size_mb: 4096,
            envd_version: "0.6.4".into(),
            envd_access_token: None,
            auto_pause: false,
            auto_pause_disk_only: false,
            allow_internet_access: None,
            traffic_access_token: None,
            metadata: [
                ("row".to_owned(), format!("{i}")),
                ("note".to_owned(), XSS.to_owned()),
            ]
            .into(),
            env_names: vec![],
            auto_resume: false,
            timeout_ms: 3_600_000,
            snapshot_id: None,
            mask_request_host: None,
        };
        r.metadata.insert("batch".into(), "seed".into());
        store.insert_sandbox(&r).unwrap();
        store
            .transition(&r.id, alcove_store::SandboxState::Killed, "seeded")
            .unwrap();
    }
    let web = browser(&server);
    let cookie = sign_in(&web, &server.key).await;
    let path = "/dashboard/sandboxes?state=killed&template=&metadata=batch%3Dseed";
    let mut ms = Vec::new();
    let mut bytes = 0;
    for _ in 0..7 {
        let t = std::time::Instant::now();
        let r = get_page(&web, &cookie, path).await;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(r.status, 200);
        let html = text(&r);
        assert_eq!(
            html.matches("<tr>").count(),
            1000 + 1,
            "a header row and 1,000 rows"
        );
        assert!(html.contains("seeded00999") && !html.contains(XSS));
        bytes = html.len();
    }
    ms.sort_by(f64::total_cmp);
    println!(
        "dashboard list of 1,000 sandboxes: median {:.1} ms, max {:.1} ms (n=7, {} bytes)",
        ms[3], ms[6], bytes
    );
    server.stop().await;
}

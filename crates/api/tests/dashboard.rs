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
    let r = web
        .send(
            "GET",
            "/dashboard/sandboxes",
            &[("cookie", &cookie)],
            vec![],
        )
        .await;
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
    let r = web
        .send(
            "GET",
            "/dashboard/sandboxes?state=killed&template=&metadata=",
            &[("cookie", &cookie)],
            vec![],
        )
        .await;
    assert!(text(&r).contains(&mine), "the killed filter shows it");
    let r = web
        .send(
            "GET",
            "/dashboard/sandboxes",
            &[("cookie", &cookie)],
            vec![],
        )
        .await;
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
    let r = web
        .send(
            "GET",
            "/dashboard/sandboxes",
            &[("cookie", &cookie)],
            vec![],
        )
        .await;
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
    let r = web
        .send(
            "GET",
            "/dashboard/sandboxes",
            &[("cookie", &cookie)],
            vec![],
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(text(&r).contains(&team));
    let store = alcove_store::Store::open(&dir.path().join(alcove_store::DB_FILE)).unwrap();
    let id = store
        .list_api_keys(Some(&team))
        .unwrap()
        .into_iter()
        .next()
        .unwrap()
        .id;
    assert!(store.revoke_api_key(&id).unwrap());
    let r = web
        .send(
            "GET",
            "/dashboard/sandboxes",
            &[("cookie", &cookie)],
            vec![],
        )
        .await;
    assert_eq!(r.status, 401);
    assert!(text(&r).contains("revoked"), "{}", text(&r));
    assert!(header(&r, "set-cookie").contains("Max-Age=0"));
    // And the key no longer signs in.
    let r = post_form(&web, "/dashboard/signin", &[], &[("api_key", &key)]).await;
    assert_eq!(r.status, 401);
    server.stop().await;
}

//! Issue 3's file checks: 100 MB up and down with matching checksums and bounded agent memory,
//! multipart uploads, the filesystem service, traversal and bad tokens refused, watcher events.

mod common;

use std::time::Duration;

use alcove_agent_client::alcove_envd_proto::connect::Code;
use alcove_agent_client::alcove_envd_proto::filesystem::{
    self as fpb, EventType, FileType, watch_dir_response,
};
use alcove_agent_client::{AgentBody, AgentClient, CallOptions, ClientError};
use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};

const MB: usize = 1 << 20;

fn body_from_stream<S>(s: S) -> AgentBody
where
    S: futures::Stream<Item = Bytes> + Send + Sync + 'static,
{
    use futures::StreamExt;
    BodyExt::boxed_unsync(http_body_util::StreamBody::new(
        s.map(|b| Ok::<_, alcove_agent_client::BoxError>(http_body::Frame::data(b))),
    ))
}

fn full(b: impl Into<Bytes>) -> AgentBody {
    http_body_util::Full::new(b.into())
        .map_err(|e| match e {})
        .boxed_unsync()
}

/// Deterministic pseudo-random content (xorshift), one MiB per index.
fn chunk(i: usize) -> Bytes {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (i as u64 + 1);
    let mut out = Vec::with_capacity(MB);
    while out.len() < MB {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    Bytes::from(out)
}

async fn get(
    c: &AgentClient,
    path_and_query: &str,
    headers: &[(&str, &str)],
) -> http::Response<hyper::body::Incoming> {
    let mut b = http::Request::get(path_and_query);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    c.send(b.body(full(Bytes::new())).unwrap()).await.unwrap()
}

async fn body_text(r: http::Response<hyper::body::Incoming>) -> String {
    text(&r.into_body().collect().await.unwrap().to_bytes())
}

fn q(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'/' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: the agent runs the test's commands as root; run by scripts/test.sh"]
async fn hundred_megabytes_round_trip_with_bounded_memory() {
    const N: usize = 100;
    let agent = Agent::start();
    let c = agent.client().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.bin");

    let mut want = Sha256::new();
    for i in 0..N {
        want.update(chunk(i));
    }
    let want = hex::encode(want.finalize());

    let upload = http::Request::post(format!(
        "/files?path={}&username=root",
        q(path.to_str().unwrap())
    ))
    .header("content-type", "application/octet-stream")
    .body(body_from_stream(futures::stream::iter(0..N).map_chunks()))
    .unwrap();
    let resp = c.send(upload).await.unwrap();
    let status = resp.status();
    let b = body_text(resp).await;
    assert_eq!(status, 200, "{b}");
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v[0]["path"], path.to_str().unwrap());
    assert_eq!(v[0]["type"], "file");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), (N * MB) as u64);

    let resp = get(
        &c,
        &format!("/files?path={}", q(path.to_str().unwrap())),
        &[("authorization", "Basic cm9vdDo=")],
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-length"], (N * MB).to_string());
    let mut body = resp.into_body();
    let mut got = Sha256::new();
    let mut len = 0;
    while let Some(f) = body.frame().await {
        if let Ok(d) = f.unwrap().into_data() {
            len += d.len();
            got.update(&d);
        }
    }
    assert_eq!(len, N * MB);
    assert_eq!(hex::encode(got.finalize()), want);

    let peak = peak_rss(agent.pid());
    eprintln!("agent peak RSS after 2 x 100 MB: {} MiB", peak >> 20);
    assert!(
        peak < 48 * MB as u64,
        "agent peak RSS {} MiB: file bodies are being buffered",
        peak >> 20
    );
}

trait MapChunks {
    fn map_chunks(self) -> futures::stream::Map<Self, fn(usize) -> Bytes>
    where
        Self: Sized;
}

impl<S: futures::Stream<Item = usize>> MapChunks for S {
    fn map_chunks(self) -> futures::stream::Map<Self, fn(usize) -> Bytes> {
        use futures::StreamExt;
        self.map(chunk as fn(usize) -> Bytes)
    }
}

#[tokio::test]
#[ignore = "needs root: the agent runs the test's commands as root; run by scripts/test.sh"]
async fn multipart_uploads_many_files_and_paths_resolve_against_home() {
    let agent = Agent::start();
    let c = agent.client().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let boundary = "XalcoveX";
    let mut body = Vec::new();
    for (name, content) in [
        (format!("{d}/a.txt"), "alpha"),
        (format!("{d}/sub/dir/b.txt"), "beta"),
    ] {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n{content}\r\n").as_bytes(),
        );
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    let req = http::Request::post("/files?username=root")
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .header("x-metadata-origin", "test")
        .body(full(body))
        .unwrap();
    let resp = c.send(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let v: serde_json::Value = serde_json::from_str(&body_text(resp).await).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("a.txt")).unwrap(),
        "alpha"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("sub/dir/b.txt")).unwrap(),
        "beta"
    );

    // Relative paths are relative to the user's home; `~` too. Download a missing file: 404.
    let resp = get(&c, "/files?path=no-such-file-alcove&username=root", &[]).await;
    assert_eq!(resp.status(), 404);
    let resp = get(&c, &format!("/files?path={}&username=root", q(d)), &[]).await;
    assert_eq!(resp.status(), 400, "a directory is not downloadable");
}

#[tokio::test]
#[ignore = "needs root: the agent runs the test's commands as root; run by scripts/test.sh"]
async fn filesystem_service_operations() {
    let agent = Agent::start();
    let c = agent.client().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap().to_owned();
    let o = root();

    let made: fpb::MakeDirResponse = c
        .unary(
            "MakeDir",
            "/filesystem.Filesystem/MakeDir",
            &fpb::MakeDirRequest {
                path: format!("{d}/x/y"),
            },
            &o,
        )
        .await
        .unwrap();
    let e = made.entry.unwrap();
    assert_eq!(e.r#type, FileType::Directory as i32);
    assert_eq!(e.name, "y");
    assert_eq!(e.permissions, "drwxr-xr-x");
    assert_eq!(e.owner, "root");
    let again: Result<fpb::MakeDirResponse, _> = c
        .unary(
            "MakeDir",
            "/filesystem.Filesystem/MakeDir",
            &fpb::MakeDirRequest {
                path: format!("{d}/x/y"),
            },
            &o,
        )
        .await;
    assert!(matches!(
        again,
        Err(ClientError::Rpc {
            code: Code::AlreadyExists,
            ..
        })
    ));

    std::fs::write(format!("{d}/x/f.txt"), "12345").unwrap();
    std::os::unix::fs::symlink(format!("{d}/x/f.txt"), format!("{d}/x/link")).unwrap();
    let st: fpb::StatResponse = c
        .unary(
            "Stat",
            "/filesystem.Filesystem/Stat",
            &fpb::StatRequest {
                path: format!("{d}/x/f.txt"),
            },
            &o,
        )
        .await
        .unwrap();
    let e = st.entry.unwrap();
    assert_eq!(
        (e.size, e.r#type, e.permissions.as_str()),
        (5, FileType::File as i32, "-rw-r--r--")
    );
    assert!(e.modified_time.is_some());
    let st: fpb::StatResponse = c
        .unary(
            "Stat",
            "/filesystem.Filesystem/Stat",
            &fpb::StatRequest {
                path: format!("{d}/x/link"),
            },
            &o,
        )
        .await
        .unwrap();
    let e = st.entry.unwrap();
    assert!(e.is_symlink);
    assert_eq!(
        e.symlink_target.as_deref(),
        Some(format!("{d}/x/f.txt").as_str())
    );

    let ls: fpb::ListDirResponse = c
        .unary(
            "ListDir",
            "/filesystem.Filesystem/ListDir",
            &fpb::ListDirRequest {
                path: d.clone(),
                depth: 1,
            },
            &o,
        )
        .await
        .unwrap();
    assert_eq!(
        ls.entries
            .iter()
            .map(|e| e.name.as_str())
            .collect::<Vec<_>>(),
        ["x"]
    );
    let ls: fpb::ListDirResponse = c
        .unary(
            "ListDir",
            "/filesystem.Filesystem/ListDir",
            &fpb::ListDirRequest {
                path: d.clone(),
                depth: 3,
            },
            &o,
        )
        .await
        .unwrap();
    let paths: Vec<_> = ls
        .entries
        .iter()
        .map(|e| e.path.trim_start_matches(&d).to_owned())
        .collect();
    assert_eq!(paths, ["/x", "/x/f.txt", "/x/link", "/x/y"]);

    let mv: fpb::MoveResponse = c
        .unary(
            "Move",
            "/filesystem.Filesystem/Move",
            &fpb::MoveRequest {
                source: format!("{d}/x/f.txt"),
                destination: format!("{d}/new/place/g.txt"),
            },
            &o,
        )
        .await
        .unwrap();
    assert_eq!(mv.entry.unwrap().path, format!("{d}/new/place/g.txt"));
    let missing: Result<fpb::MoveResponse, _> = c
        .unary(
            "Move",
            "/filesystem.Filesystem/Move",
            &fpb::MoveRequest {
                source: format!("{d}/nope"),
                destination: format!("{d}/nope2"),
            },
            &o,
        )
        .await;
    assert!(matches!(
        missing,
        Err(ClientError::Rpc {
            code: Code::NotFound,
            ..
        })
    ));

    let _: fpb::RemoveResponse = c
        .unary(
            "Remove",
            "/filesystem.Filesystem/Remove",
            &fpb::RemoveRequest {
                path: format!("{d}/x"),
            },
            &o,
        )
        .await
        .unwrap();
    assert!(!dir.path().join("x").exists());
    let st: Result<fpb::StatResponse, _> = c
        .unary(
            "Stat",
            "/filesystem.Filesystem/Stat",
            &fpb::StatRequest {
                path: format!("{d}/x"),
            },
            &o,
        )
        .await;
    assert!(matches!(
        st,
        Err(ClientError::Rpc {
            code: Code::NotFound,
            ..
        })
    ));
}

#[tokio::test]
#[ignore = "needs root: the agent acts as another user; run by scripts/test.sh"]
async fn traversal_and_bad_tokens_get_errors_not_access() {
    let agent = Agent::start();
    let c = agent.client().await;
    // A root-only directory with a secret in it.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let secret = dir.path().join("secret.txt");
    std::fs::write(&secret, "top secret").unwrap();
    let nobody = CallOptions {
        user: Some("nobody".into()),
        access_token: None,
    };
    let home = nix::unistd::User::from_name("nobody").unwrap().unwrap().dir;
    let up = "../".repeat(home.components().count() + 2);
    let traversal = format!("{up}{}", secret.to_str().unwrap().trim_start_matches('/'));

    for p in [secret.to_str().unwrap().to_owned(), traversal.clone()] {
        let resp = get(&c, &format!("/files?path={}&username=nobody", q(&p)), &[]).await;
        assert_eq!(resp.status(), 403, "download of {p} as nobody");
        let body = body_text(resp).await;
        assert!(!body.contains("top secret"));
        let st: Result<fpb::StatResponse, _> = c
            .unary(
                "Stat",
                "/filesystem.Filesystem/Stat",
                &fpb::StatRequest { path: p.clone() },
                &nobody,
            )
            .await;
        assert!(
            matches!(
                st,
                Err(ClientError::Rpc {
                    code: Code::PermissionDenied,
                    ..
                })
            ),
            "{st:?}"
        );
        let up = http::Request::post(format!("/files?path={}&username=nobody", q(&p)))
            .header("content-type", "application/octet-stream")
            .body(full("overwritten"))
            .unwrap();
        assert_eq!(c.send(up).await.unwrap().status(), 403);
        let rm: Result<fpb::RemoveResponse, _> = c
            .unary(
                "Remove",
                "/filesystem.Filesystem/Remove",
                &fpb::RemoveRequest { path: p.clone() },
                &nobody,
            )
            .await;
        assert!(rm.is_err());
    }
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "top secret");
    let ls: Result<fpb::ListDirResponse, _> = c
        .unary(
            "ListDir",
            "/filesystem.Filesystem/ListDir",
            &fpb::ListDirRequest {
                path: dir.path().to_str().unwrap().into(),
                depth: 1,
            },
            &nobody,
        )
        .await;
    assert!(matches!(
        ls,
        Err(ClientError::Rpc {
            code: Code::PermissionDenied,
            ..
        })
    ));

    // Files a user creates belong to that user.
    let shared = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        shared.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let mine = shared.path().join("deep/mine.txt");
    let up = http::Request::post(format!(
        "/files?path={}&username=nobody",
        q(mine.to_str().unwrap())
    ))
    .header("content-type", "application/octet-stream")
    .body(full("hi"))
    .unwrap();
    assert_eq!(c.send(up).await.unwrap().status(), 200);
    let uid = nix::unistd::User::from_name("nobody")
        .unwrap()
        .unwrap()
        .uid
        .as_raw();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&mine).unwrap().uid(), uid);
    assert_eq!(
        std::fs::metadata(mine.parent().unwrap()).unwrap().uid(),
        uid
    );

    // Tokens: once set, every call needs it; a wrong one is refused.
    c.init(
        &alcove_agent_client::InitRequest {
            access_token: Some("tok-123".into()),
            ..Default::default()
        },
        None,
    )
    .await
    .unwrap();
    let f = secret.to_str().unwrap();
    assert_eq!(
        get(&c, &format!("/files?path={}&username=root", q(f)), &[])
            .await
            .status(),
        401
    );
    assert_eq!(
        get(
            &c,
            &format!("/files?path={}&username=root", q(f)),
            &[("x-access-token", "wrong")]
        )
        .await
        .status(),
        401
    );
    assert_eq!(
        get(&c, "/envs", &[("x-access-token", "wrong")])
            .await
            .status(),
        401
    );
    assert_eq!(get(&c, "/metrics", &[]).await.status(), 401);
    let st: Result<fpb::StatResponse, _> = c
        .unary(
            "Stat",
            "/filesystem.Filesystem/Stat",
            &fpb::StatRequest { path: "/".into() },
            &root(),
        )
        .await;
    assert!(matches!(
        st,
        Err(ClientError::Rpc {
            code: Code::Unauthenticated,
            ..
        })
    ));
    let ok = get(
        &c,
        &format!("/files?path={}&username=root", q(f)),
        &[("x-access-token", "tok-123")],
    )
    .await;
    assert_eq!(ok.status(), 200);
    assert_eq!(body_text(ok).await, "top secret");
    // A signed URL works without the header; a forged one does not.
    let sig = alcove_agent::api::files::signature(f, "read", "root", "tok-123", None);
    let signed = get(
        &c,
        &format!("/files?path={}&username=root&signature={}", q(f), q(&sig)),
        &[],
    )
    .await;
    assert_eq!(signed.status(), 200);
    let forged = alcove_agent::api::files::signature(f, "read", "root", "guess", None);
    let bad = get(
        &c,
        &format!(
            "/files?path={}&username=root&signature={}",
            q(f),
            q(&forged)
        ),
        &[],
    )
    .await;
    assert_eq!(bad.status(), 401);
    assert_eq!(get(&c, "/health", &[]).await.status(), 204);

    // A refused request whose body is still being written gets its 401, not a reset: the
    // agent reads the body (bounded) before answering. Both a Connect call and an upload.
    for (path, ct) in [
        ("/process.Process/Start", "application/connect+json"),
        (
            "/files?path=/tmp/x&username=root",
            "application/octet-stream",
        ),
    ] {
        let status = refused_while_writing(agent.addr, path, ct).await;
        assert_eq!(status, 401, "{path}");
    }
}

/// Sends a wrong token with a chunked body in two parts, 300 ms apart (a streaming client's
/// way), then reads the status line.
async fn refused_while_writing(addr: std::net::SocketAddr, path: &str, ct: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = vec![b'x'; 256 * 1024];
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: agent\r\nx-access-token: wrong\r\n\
         content-type: {ct}\r\ntransfer-encoding: chunked\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(b"400\r\n").await.unwrap();
    s.write_all(&body[..1024]).await.unwrap();
    s.write_all(b"\r\n").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    s.write_all(format!("{:x}\r\n", body.len() - 1024).as_bytes())
        .await
        .expect("the agent kept reading the refused body");
    s.write_all(&body[1024..])
        .await
        .expect("the agent kept reading the refused body");
    s.write_all(b"\r\n0\r\n\r\n")
        .await
        .expect("the agent kept reading the refused body");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("an answer within 10 s")
            .expect("an answer, not a reset");
        assert!(n > 0, "connection closed before an answer");
        got.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&got);
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test]
#[ignore = "needs root: the agent runs the test's commands as root; run by scripts/test.sh"]
async fn watchers_see_create_write_and_remove() {
    let agent = Agent::start();
    let c = agent.client().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap().to_owned();
    std::fs::create_dir(dir.path().join("sub")).unwrap();

    let mut stream = c
        .server_stream::<_, fpb::WatchDirResponse>(
            "WatchDir",
            "/filesystem.Filesystem/WatchDir",
            &fpb::WatchDirRequest {
                path: d.clone(),
                recursive: true,
                include_entry: true,
                allow_network_mounts: false,
            },
            &root(),
        )
        .await
        .unwrap();
    match stream.next().await.unwrap().unwrap().event {
        Some(watch_dir_response::Event::Start(_)) => {}
        other => panic!("expected start, got {other:?}"),
    }
    let polled: fpb::CreateWatcherResponse = c
        .unary(
            "CreateWatcher",
            "/filesystem.Filesystem/CreateWatcher",
            &fpb::CreateWatcherRequest {
                path: d.clone(),
                recursive: false,
                include_entry: false,
                allow_network_mounts: false,
            },
            &root(),
        )
        .await
        .unwrap();

    std::fs::write(dir.path().join("f.txt"), "a").unwrap();
    std::fs::write(dir.path().join("sub/g.txt"), "b").unwrap();
    std::fs::remove_file(dir.path().join("f.txt")).unwrap();

    let mut seen = Vec::new();
    let wanted = [
        ("f.txt".to_owned(), EventType::Create),
        ("f.txt".to_owned(), EventType::Write),
        ("sub/g.txt".to_owned(), EventType::Create),
        ("f.txt".to_owned(), EventType::Remove),
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !wanted.iter().all(|w| seen.contains(w)) {
        let m = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("events in time");
        if let Some(watch_dir_response::Event::Filesystem(e)) = m.unwrap().unwrap().event {
            if e.name == "sub/g.txt" && e.r#type == EventType::Create as i32 {
                // g.txt stays, so its entry can be read (f.txt may be gone already).
                let entry = e.entry.as_ref().expect("include_entry gives the entry");
                assert_eq!(entry.name, "g.txt");
            }
            seen.push((e.name, EventType::try_from(e.r#type).unwrap()));
        }
    }

    tokio::time::sleep(Duration::from_millis(200)).await;
    let got: fpb::GetWatcherEventsResponse = c
        .unary(
            "GetWatcherEvents",
            "/filesystem.Filesystem/GetWatcherEvents",
            &fpb::GetWatcherEventsRequest {
                watcher_id: polled.watcher_id.clone(),
            },
            &root(),
        )
        .await
        .unwrap();
    let names: Vec<_> = got
        .events
        .iter()
        .map(|e| (e.name.as_str(), e.r#type))
        .collect();
    assert!(
        names.contains(&("f.txt", EventType::Create as i32)),
        "{names:?}"
    );
    assert!(
        names.contains(&("f.txt", EventType::Remove as i32)),
        "{names:?}"
    );
    assert!(
        !names.iter().any(|(n, _)| n.starts_with("sub/")),
        "not recursive: {names:?}"
    );
    let _: fpb::RemoveWatcherResponse = c
        .unary(
            "RemoveWatcher",
            "/filesystem.Filesystem/RemoveWatcher",
            &fpb::RemoveWatcherRequest {
                watcher_id: polled.watcher_id.clone(),
            },
            &root(),
        )
        .await
        .unwrap();
    let gone: Result<fpb::GetWatcherEventsResponse, _> = c
        .unary(
            "GetWatcherEvents",
            "/filesystem.Filesystem/GetWatcherEvents",
            &fpb::GetWatcherEventsRequest {
                watcher_id: polled.watcher_id,
            },
            &root(),
        )
        .await;
    assert!(matches!(
        gone,
        Err(ClientError::Rpc {
            code: Code::NotFound,
            ..
        })
    ));
}

#[tokio::test]
async fn metrics_and_envs() {
    let agent = Agent::start();
    let c = agent.client().await;
    let m = get(&c, "/metrics", &[]).await;
    assert_eq!(m.status(), 200);
    let v: serde_json::Value = serde_json::from_str(&body_text(m).await).unwrap();
    for k in [
        "ts",
        "cpu_count",
        "cpu_used_pct",
        "mem_total",
        "mem_used",
        "disk_used",
        "disk_total",
    ] {
        assert!(v.get(k).is_some(), "missing {k} in {v}");
    }
    assert!(v["mem_total"].as_u64().unwrap() > 0);
    let p = body_text(get(&c, "/metrics?format=prometheus", &[]).await).await;
    assert!(p.contains("alcove_agent_requests_total"));
    c.init(
        &alcove_agent_client::InitRequest {
            env_vars: Some([("A".to_owned(), "1".to_owned())].into()),
            ..Default::default()
        },
        None,
    )
    .await
    .unwrap();
    let e: serde_json::Value =
        serde_json::from_str(&body_text(get(&c, "/envs", &[]).await).await).unwrap();
    assert_eq!(e["A"], "1");
}

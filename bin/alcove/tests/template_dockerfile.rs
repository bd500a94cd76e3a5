//! `alcove template build NAME --dockerfile` as the binary, against a stand-in for the template
//! build API that records what the CLI sends: the wire JSON of each call, that uploads go to
//! the signed URL without the API key, that files the server has are not sent again, that log
//! pages are all read, and that a failed build exits non-zero naming the step and its line.
//! (The real API and builder are exercised by tests/sdk/python/test_cli_templates.py.)

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post, put};
use serde_json::{Value, json};

#[derive(Default)]
struct Fake {
    addr: String,
    requests: Vec<Value>,
    starts: Vec<Value>,
    /// filesHash → the archive's entry names.
    uploads: BTreeMap<String, Vec<String>>,
    upload_had_key: bool,
    status_calls: u32,
    fail: bool,
}

type S = State<Arc<Mutex<Fake>>>;

async fn request(State(f): S, Json(body): Json<Value>) -> (StatusCode, Json<Value>) {
    let name = body["name"].as_str().unwrap_or_default().to_owned();
    f.lock().unwrap().requests.push(body);
    (
        StatusCode::ACCEPTED,
        Json(
            json!({"templateID": "tpl1", "buildID": "b1", "public": false,
                    "names": [name], "tags": ["default"], "aliases": [name]}),
        ),
    )
}

async fn alias(Path(a): Path<String>) -> Result<Json<Value>, StatusCode> {
    match a.as_str() {
        "base" => Ok(Json(json!({"templateID": "base", "public": true}))),
        "mine" => Ok(Json(json!({"templateID": "tpl1", "public": false}))),
        _ => Err(StatusCode::NOT_FOUND),
    }
}

async fn files(State(f): S, Path((_t, hash)): Path<(String, String)>) -> (StatusCode, Json<Value>) {
    let f = f.lock().unwrap();
    let v = if f.uploads.contains_key(&hash) {
        json!({"present": true})
    } else {
        json!({"present": false, "url": format!("http://{}/upload/{hash}?sig=x", f.addr)})
    };
    (StatusCode::CREATED, Json(v))
}

async fn upload(
    State(f): S,
    Path(hash): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let mut names = Vec::new();
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(&body[..]));
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let mut s = String::new();
        let _ = e.read_to_string(&mut s);
        names.push(e.path().unwrap().to_string_lossy().into_owned());
    }
    let mut f = f.lock().unwrap();
    f.upload_had_key |= headers.contains_key("x-api-key");
    f.uploads.insert(hash, names);
    StatusCode::CREATED
}

async fn start(State(f): S, Json(body): Json<Value>) -> StatusCode {
    f.lock().unwrap().starts.push(body);
    StatusCode::ACCEPTED
}

async fn status(State(f): S, Query(q): Query<HashMap<String, String>>) -> Json<Value> {
    let mut f = f.lock().unwrap();
    f.status_calls += 1;
    let log: Vec<Value> = (1..=5)
        .map(|i| {
            json!({"timestamp": "2026-12-02T00:00:00Z", "level": "info",
                        "message": format!("line {i}"), "step": (i % 3 + 1).to_string()})
        })
        .collect();
    let offset: usize = q
        .get("logsOffset")
        .and_then(|o| o.parse().ok())
        .unwrap_or(0);
    // Pages of two: the CLI must keep reading after the build ended.
    let page: Vec<Value> = log.iter().skip(offset).take(2).cloned().collect();
    let done = f.status_calls > 2;
    let status = match (done, f.fail) {
        (false, _) => "building",
        (true, false) => "ready",
        (true, true) => "error",
    };
    let mut v = json!({"templateID": "tpl1", "buildID": "b1", "status": status,
                       "logEntries": page, "logs": []});
    if status == "error" {
        v["reason"] = json!({"message": "command exited with code 7", "step": "3"});
    }
    Json(v)
}

async fn serve() -> Arc<Mutex<Fake>> {
    let state = Arc::new(Mutex::new(Fake::default()));
    let app = Router::new()
        .route("/v3/templates", post(request))
        .route("/templates", get(|| async { Json(json!([])) }))
        .route("/templates/aliases/{alias}", get(alias))
        .route("/templates/{id}/files/{hash}", get(files))
        .route("/upload/{hash}", put(upload))
        .route("/v2/templates/{id}/builds/{bid}", post(start))
        .route("/templates/{id}/builds/{bid}/status", get(status))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    state.lock().unwrap().addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    state
}

async fn alcove(url: &str, args: &[&str]) -> (i32, String, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_alcove"))
        .arg("template")
        .args(args)
        .env("E2B_API_URL", url)
        .env("E2B_API_KEY", "e2b_test")
        .env_remove("ALCOVE_LOG")
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn events(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not JSON: {l}")))
        .collect()
}

#[tokio::test]
async fn dockerfile_build_speaks_the_sdks_wire_format() {
    let fake = serve().await;
    let url = format!("http://{}", fake.lock().unwrap().addr);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("Dockerfile"),
        "FROM base\nARG V=1\nENV A=$V\nWORKDIR /app\nCOPY app /app/\nCOPY one.txt ./\nUSER user\nRUN [\"echo\", \"x y\"]\nCMD [\"python3\", \"-m\", \"http.server\"]\n",
    )
    .unwrap();
    std::fs::create_dir(d.join("app")).unwrap();
    std::fs::write(d.join("app/main.py"), "print(1)").unwrap();
    std::fs::write(d.join("app/skip.pyc"), "x").unwrap();
    std::fs::write(d.join("one.txt"), "1").unwrap();
    std::fs::write(d.join(".dockerignore"), "*.pyc\n**/*.pyc\n").unwrap();
    let df = d.join("Dockerfile");
    let args = [
        "--json",
        "build",
        "mine:v2",
        "--dockerfile",
        df.to_str().unwrap(),
        "--tag",
        "latest",
        "--build-arg",
        "V=2",
        "--cpu",
        "2",
        "--memory-mb",
        "768",
    ];
    let (code, out, err) = alcove(&url, &args).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let evs = events(&out);
    assert_eq!(evs.last().unwrap()["event"], "done", "{out}");
    assert_eq!(
        evs.iter().filter(|e| e["event"] == "log").count(),
        5,
        "every page read: {out}"
    );

    {
        let f = fake.lock().unwrap();
        assert_eq!(
            f.requests[0],
            json!({"name": "mine:v2", "tags": ["latest"], "cpuCount": 2, "memoryMB": 768})
        );
        let start = &f.starts[0];
        assert_eq!(start["fromTemplate"], "base");
        assert!(start.get("fromImage").is_none());
        assert_eq!(start["startCmd"], "python3 -m http.server");
        assert_eq!(start["readyCmd"], "sleep 20");
        assert_eq!(start["force"], false);
        let steps: Vec<(String, Value)> = start["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["type"].as_str().unwrap().to_owned(), s["args"].clone()))
            .collect();
        assert_eq!(
            steps,
            vec![
                ("USER".into(), json!(["root"])),
                ("WORKDIR".into(), json!(["/"])),
                ("ENV".into(), json!(["A", "2"])),
                ("WORKDIR".into(), json!(["/app"])),
                ("COPY".into(), json!(["app", "/app/", "", ""])),
                ("COPY".into(), json!(["one.txt", "/app/", "", ""])),
                ("USER".into(), json!(["user"])),
                ("RUN".into(), json!(["export V=2\necho 'x y'"])),
            ]
        );
        let hashes: Vec<String> = start["steps"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| s["filesHash"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(hashes.len(), 2);
        assert_eq!(f.uploads[&hashes[0]], ["app", "app/main.py"]);
        assert_eq!(f.uploads[&hashes[1]], ["one.txt"]);
        assert!(
            !f.upload_had_key,
            "the signed URL is used without the API key"
        );
    }

    // Unchanged: the server has both archives, nothing is sent again, the hashes are the same.
    fake.lock().unwrap().status_calls = 0;
    let (code, out, err) = alcove(&url, &args).await;
    assert_eq!(code, 0, "{out}\n{err}");
    let ups: Vec<Value> = events(&out)
        .into_iter()
        .filter(|e| e["event"] == "upload")
        .collect();
    assert_eq!(ups.len(), 2);
    assert!(ups.iter().all(|u| u["present"] == true), "{ups:?}");
    let f = fake.lock().unwrap();
    assert_eq!(f.starts[1]["steps"], f.starts[0]["steps"]);
}

#[tokio::test]
async fn a_failed_build_exits_non_zero_naming_step_and_line() {
    let fake = serve().await;
    fake.lock().unwrap().fail = true;
    let url = format!("http://{}", fake.lock().unwrap().addr);
    let dir = tempfile::tempdir().unwrap();
    let df = dir.path().join("Dockerfile");
    std::fs::write(&df, "FROM python:3.12-slim\nRUN exit 7\n").unwrap();
    let (code, out, err) = alcove(
        &url,
        &["build", "app", "--dockerfile", df.to_str().unwrap()],
    )
    .await;
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        err.contains("step 3 (Dockerfile line 2: RUN exit 7)")
            && err.contains("command exited with code 7"),
        "{err}"
    );
    // Not a template the server knows: an image.
    assert_eq!(
        fake.lock().unwrap().starts[0]["fromImage"],
        "python:3.12-slim"
    );

    fake.lock().unwrap().status_calls = 0;
    let (code, out, _) = alcove(
        &url,
        &[
            "--json",
            "build",
            "app",
            "--dockerfile",
            df.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(code, 1);
    let evs = events(&out);
    let e = evs
        .iter()
        .find(|e| e["event"] == "error")
        .expect("an error event");
    assert_eq!(e["step"], "3");
    assert!(
        evs.last().unwrap()["error"]
            .as_str()
            .unwrap()
            .contains("line 2")
    );
}

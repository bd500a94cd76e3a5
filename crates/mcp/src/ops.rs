//! One function per tool: parse and validate the arguments, make the calls, shape the result.
//! Results carry a short text for the LLM and the same facts as `structuredContent`.

use std::sync::Arc;
use std::time::Duration;

use alcove_client::envd::process as pb;
use alcove_client::{EnvdClient, EnvdError, Output, SandboxFilter};
use base64::Engine;
use bytes::Bytes;
use rmcp::model::{CallToolResult, ContentBlock, JsonObject, ResourceContents};
use serde_json::{Value, json};

use crate::conn::{Background, Conn, SandboxClients, Tail};
use crate::error::ToolError;
use crate::tools::{self, parse};

/// Output kept per stream of a foreground command (the newest bytes).
const MAX_OUTPUT: usize = 1 << 20;
/// Largest file `read_file` returns.
pub const MAX_READ_BYTES: usize = 1 << 20;
/// Largest file a resource read returns.
pub const MAX_RESOURCE_BYTES: usize = 4 << 20;
/// How long a background command may take to report its pid.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the tool `name`.
pub async fn call(
    conn: &Conn,
    name: &str,
    args: Option<JsonObject>,
) -> Result<CallToolResult, ToolError> {
    match name {
        "create_sandbox" => create(conn, parse(name, args)?).await,
        "list_sandboxes" => list(conn, parse(name, args)?).await,
        "kill_sandbox" => kill(conn, parse(name, args)?).await,
        "run_command" => run_command(conn, parse(name, args)?).await,
        "command_status" => command_status(conn, parse(name, args)?).await,
        "run_code" => run_code(conn, parse(name, args)?).await,
        "read_file" => read_file(conn, parse(name, args)?).await,
        "write_file" => write_file(conn, parse(name, args)?).await,
        "list_files" => list_files(conn, parse(name, args)?).await,
        "get_url" => get_url(conn, parse(name, args)?).await,
        "pause_sandbox" => pause(conn, parse(name, args)?).await,
        "resume_sandbox" => resume(conn, parse(name, args)?).await,
        "snapshot_sandbox" => snapshot(conn, parse(name, args)?).await,
        "fork_sandbox" => fork(conn, parse(name, args)?).await,
        other => Err(ToolError::UnknownTool(other.chars().take(100).collect())),
    }
}

/// A successful result: `text` for the LLM, `facts` as structured content.
fn ok(text: String, facts: Value) -> CallToolResult {
    let mut r = CallToolResult::success(vec![ContentBlock::text(text)]);
    r.structured_content = Some(facts);
    r
}

fn str_field<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or_default()
}

/// The facts of a sandbox the API returned, in the tools' camelCase.
fn sandbox_facts(v: &Value) -> Value {
    json!({
        "sandboxId": v.get("sandboxID"),
        "templateId": v.get("templateID"),
        "alias": v.get("alias"),
        "state": v.get("state"),
        "metadata": v.get("metadata"),
        "startedAt": v.get("startedAt"),
        "endAt": v.get("endAt"),
    })
}

async fn create(conn: &Conn, a: tools::CreateArgs) -> Result<CallToolResult, ToolError> {
    a.validate()?;
    let body = a.body();
    let v = conn
        .api
        .call("POST", "/v2/sandboxes", Some(&body))
        .await
        .map_err(ToolError::api)?
        .json;
    let id = str_field(&v, "sandboxID");
    let template = body["templateID"].as_str().unwrap_or_default();
    let mut facts = sandbox_facts(&v);
    facts["templateId"] = json!(template);
    let hint = if template == tools::DEFAULT_TEMPLATE {
        " run_code and run_command work on it."
    } else {
        " run_command works on it."
    };
    Ok(ok(
        format!("Created sandbox {id} from template {template}.{hint}"),
        facts,
    ))
}

async fn list(conn: &Conn, a: tools::ListArgs) -> Result<CallToolResult, ToolError> {
    let filter = SandboxFilter {
        state: None,
        metadata: a.metadata.into_iter().collect(),
    };
    let items = conn
        .api
        .list_sandboxes(&filter)
        .await
        .map_err(ToolError::api)?;
    let facts: Vec<Value> = items.iter().map(sandbox_facts).collect();
    let text = if facts.is_empty() {
        "No running or paused sandboxes. Create one with create_sandbox.".to_owned()
    } else {
        let lines: Vec<String> = items
            .iter()
            .map(|v| {
                format!(
                    "{}  {}  {}  ends {}",
                    str_field(v, "sandboxID"),
                    str_field(v, "state"),
                    v.get("alias")
                        .and_then(Value::as_str)
                        .unwrap_or(str_field(v, "templateID")),
                    str_field(v, "endAt"),
                )
            })
            .collect();
        format!("{} sandbox(es):\n{}", facts.len(), lines.join("\n"))
    };
    Ok(ok(text, json!({ "sandboxes": facts })))
}

async fn kill(conn: &Conn, a: tools::SandboxArgs) -> Result<CallToolResult, ToolError> {
    a.validate("kill_sandbox")?;
    conn.api
        .kill_sandbox(&a.sandbox_id)
        .await
        .map_err(ToolError::api)?;
    conn.forget(&a.sandbox_id);
    Ok(ok(
        format!("Killed sandbox {}.", a.sandbox_id),
        json!({ "sandboxId": a.sandbox_id, "killed": true }),
    ))
}

/// An envd client for `user` (the clients' own for the default user).
fn envd_as(clients: &SandboxClients, conn: &Conn, id: &str, user: Option<&str>) -> EnvdClient {
    EnvdClient::new(
        &conn.target.sandbox_url,
        id,
        clients.token.clone(),
        user.map(str::to_owned),
    )
}

fn start_request(a: &tools::CommandArgs) -> pb::StartRequest {
    pb::StartRequest {
        process: Some(pb::ProcessConfig {
            cmd: "/bin/bash".into(),
            args: vec!["-l".into(), "-c".into(), a.command.clone()],
            envs: a.envs.clone().into_iter().collect(),
            cwd: a.cwd.clone(),
        }),
        pty: None,
        tag: None,
        stdin: Some(false),
    }
}

/// How a command's run is reported.
fn command_result(
    pid: Option<u32>,
    exit: Option<(i32, Option<String>)>,
    stdout: &str,
    stderr: &str,
    note: Option<String>,
) -> CallToolResult {
    let code = exit.as_ref().map(|e| e.0);
    let mut text = match (&note, code) {
        (Some(n), _) => format!("{n}\n"),
        (None, Some(0)) => "exit code: 0\n".to_owned(),
        (None, Some(c)) => format!(
            "The command exited with code {c} (a failure). Read stderr below to see why.\nexit code: {c}\n"
        ),
        (None, None) => String::new(),
    };
    if let Some((_, Some(e))) = &exit
        && !e.is_empty()
    {
        text.push_str(&format!("error: {e}\n"));
    }
    text.push_str(&format!("--- stdout ---\n{stdout}"));
    if !stdout.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&format!("--- stderr ---\n{stderr}"));
    let failed = note.is_some() || code != Some(0);
    let mut r = if failed {
        CallToolResult::error(vec![ContentBlock::text(text)])
    } else {
        CallToolResult::success(vec![ContentBlock::text(text)])
    };
    r.structured_content = Some(json!({
        "pid": pid,
        "exitCode": code,
        "stdout": stdout,
        "stderr": stderr,
    }));
    r
}

async fn run_command(conn: &Conn, a: tools::CommandArgs) -> Result<CallToolResult, ToolError> {
    a.validate()?;
    let clients = conn.sandbox(&a.sandbox_id).await?;
    let custom;
    let envd = match a.user.as_deref() {
        None => &clients.envd,
        Some(u) => {
            custom = envd_as(&clients, conn, &a.sandbox_id, Some(u));
            &custom
        }
    };
    if a.background {
        return start_background(conn, &clients, &a).await;
    }
    let secs = a.timeout_seconds.unwrap_or(tools::DEFAULT_COMMAND_SECS);
    let (mut stdout, mut stderr) = (Tail::default(), Tail::default());
    let mut pid = None;
    let mut exit = None;
    let started = tokio::time::timeout(
        Duration::from_secs(secs),
        envd.start(start_request(&a), |o| match o {
            Output::Started(p) => pid = Some(p),
            Output::Stdout(b) => stdout.push(&b, MAX_OUTPUT),
            Output::Stderr(b) | Output::Pty(b) => stderr.push(&b, MAX_OUTPUT),
            Output::Ended { exit_code, error } => exit = Some((exit_code, error)),
        }),
    )
    .await;
    match started {
        Ok(Ok(())) => Ok(command_result(
            pid,
            exit,
            &stdout.text(),
            &stderr.text(),
            None,
        )),
        Ok(Err(e)) => {
            if matches!(e, EnvdError::Status { status: 502, .. }) {
                conn.forget(&a.sandbox_id);
            }
            Err(ToolError::envd("running the command", e))
        }
        Err(_) => {
            let killed = match pid {
                Some(p) => envd.signal(p, true).await.is_ok(),
                None => false,
            };
            let note = format!(
                "The command did not finish within {secs} s{}. Raise timeoutSeconds, or run it \
                 with background: true and follow it with command_status. Output so far:",
                if killed { " and was killed" } else { "" }
            );
            Ok(command_result(
                pid,
                None,
                &stdout.text(),
                &stderr.text(),
                Some(note),
            ))
        }
    }
}

async fn start_background(
    conn: &Conn,
    clients: &SandboxClients,
    a: &tools::CommandArgs,
) -> Result<CallToolResult, ToolError> {
    let envd = envd_as(clients, conn, &a.sandbox_id, a.user.as_deref());
    let bg = Arc::new(Background::default());
    let (tx, rx) = tokio::sync::oneshot::channel::<Result<u32, EnvdError>>();
    let start = start_request(a);
    let task_bg = bg.clone();
    tokio::spawn(async move {
        let mut tx = Some(tx);
        let mut exit = None;
        let result = envd
            .start(start, |o| match o {
                Output::Started(p) => {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(Ok(p));
                    }
                }
                Output::Stdout(b) => task_bg.stdout(&b),
                Output::Stderr(b) | Output::Pty(b) => task_bg.stderr(&b),
                Output::Ended { exit_code, error } => exit = Some((exit_code, error)),
            })
            .await;
        match result {
            Err(e) => match tx.take() {
                Some(tx) => {
                    let _ = tx.send(Err(e));
                }
                None => task_bg.end(exit, Some(e.to_string())),
            },
            Ok(()) => task_bg.end(exit, None),
        }
    });
    let pid = match tokio::time::timeout(START_TIMEOUT, rx).await {
        Ok(Ok(Ok(pid))) => pid,
        Ok(Ok(Err(e))) => return Err(ToolError::envd("starting the command", e)),
        Ok(Err(_)) | Err(_) => {
            return Err(ToolError::envd(
                "starting the command",
                EnvdError::Timeout {
                    op: "process.Start",
                },
            ));
        }
    };
    conn.add_background(&a.sandbox_id, pid, bg)?;
    Ok(ok(
        format!(
            "Started in the background with pid {pid}. Use command_status with sandboxId {} and \
             pid {pid} to read its output, wait for it or kill it.",
            a.sandbox_id
        ),
        json!({ "pid": pid, "sandboxId": a.sandbox_id }),
    ))
}

async fn command_status(conn: &Conn, a: tools::StatusArgs) -> Result<CallToolResult, ToolError> {
    a.validate()?;
    let bg = conn
        .background(&a.sandbox_id, a.pid)
        .ok_or_else(|| ToolError::NoSuchCommand {
            sandbox: a.sandbox_id.clone(),
            pid: a.pid,
        })?;
    match a.action {
        tools::StatusAction::Read => {}
        tools::StatusAction::Wait => {
            let secs = a.timeout_seconds.unwrap_or(tools::DEFAULT_COMMAND_SECS);
            bg.wait(Duration::from_secs(secs)).await;
        }
        tools::StatusAction::Kill => {
            if !bg.finished() {
                let clients = conn.sandbox(&a.sandbox_id).await?;
                clients
                    .envd
                    .signal(a.pid, true)
                    .await
                    .map_err(|e| ToolError::envd(format!("killing process {}", a.pid), e))?;
                bg.wait(Duration::from_secs(10)).await;
            }
        }
    }
    let s = bg.take();
    let note = match (&s.exit, &s.lost) {
        (Some(_), _) => None,
        (None, Some(l)) => Some(format!(
            "The connection to the command was lost ({l}); it may still run. Check with \
             run_command (e.g. `ps -p {}`).",
            a.pid
        )),
        (None, None) => {
            return Ok(ok(
                format!(
                    "Still running (pid {}). Output since the last read:\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    a.pid, s.stdout, s.stderr
                ),
                json!({"pid": a.pid, "running": true, "exitCode": null, "stdout": s.stdout, "stderr": s.stderr}),
            ));
        }
    };
    Ok(command_result(
        Some(a.pid),
        s.exit,
        &s.stdout,
        &s.stderr,
        note,
    ))
}

async fn run_code(conn: &Conn, a: tools::CodeArgs) -> Result<CallToolResult, ToolError> {
    a.validate()?;
    let clients = conn.sandbox(&a.sandbox_id).await?;
    let secs = a.timeout_seconds.unwrap_or(tools::DEFAULT_CODE_SECS);
    let exec = clients
        .interpreter
        .execute(&a.code, a.language.as_deref(), Duration::from_secs(secs))
        .await
        .map_err(ToolError::Interpreter)?;
    let mut text = String::new();
    let mut images = Vec::new();
    let mut results = Vec::new();
    for r in &exec.results {
        if let Some(png) = r.get("png").and_then(Value::as_str) {
            images.push(ContentBlock::image(png, "image/png"));
        }
        if let Some(t) = r.get("text").and_then(Value::as_str) {
            results.push(t.to_owned());
        }
    }
    if !results.is_empty() {
        text.push_str(&format!("--- result ---\n{}\n", results.join("\n")));
    }
    if !exec.stdout.is_empty() {
        text.push_str(&format!("--- stdout ---\n{}", exec.stdout));
        if !exec.stdout.ends_with('\n') {
            text.push('\n');
        }
    }
    if !exec.stderr.is_empty() {
        text.push_str(&format!("--- stderr ---\n{}", exec.stderr));
    }
    if !images.is_empty() {
        text.push_str(&format!(
            "({} chart image(s) attached as PNG)\n",
            images.len()
        ));
    }
    let error = exec.error.as_ref().map(|e| {
        json!({
            "name": e.get("name"),
            "value": e.get("value"),
            "traceback": e.get("traceback"),
        })
    });
    if let Some(e) = &exec.error {
        text = format!(
            "The code raised {}: {}\n--- traceback ---\n{}\n{text}Fix the code and run it again \
             (variables defined before the error are kept).",
            str_field(e, "name"),
            str_field(e, "value"),
            str_field(e, "traceback"),
        );
    } else if !exec.finished {
        text.push_str(
            "The interpreter's stream ended before the cell did; the kernel may have died. Run \
             the cell again.\n",
        );
    }
    if text.is_empty() {
        text = "The cell ran and produced no output.".into();
    }
    let mut content = vec![ContentBlock::text(text)];
    content.extend(images);
    let failed = exec.error.is_some() || !exec.finished;
    let mut r = if failed {
        CallToolResult::error(content)
    } else {
        CallToolResult::success(content)
    };
    r.structured_content = Some(json!({
        "stdout": exec.stdout,
        "stderr": exec.stderr,
        "results": results,
        "error": error,
    }));
    Ok(r)
}

/// A file's bytes from a sandbox, at most `limit`.
pub async fn fetch_file(
    conn: &Conn,
    id: &str,
    path: &str,
    user: Option<&str>,
    limit: usize,
) -> Result<Bytes, ToolError> {
    let clients = conn.sandbox(id).await?;
    let custom;
    let envd = match user {
        None => &clients.envd,
        Some(u) => {
            custom = envd_as(&clients, conn, id, Some(u));
            &custom
        }
    };
    match envd.read_file(path, limit).await {
        Ok(b) => Ok(b),
        Err(EnvdError::TooLarge { .. }) => Err(ToolError::FileTooLarge {
            path: path.to_owned(),
            limit,
        }),
        Err(e) => Err(ToolError::envd(format!("reading {path}"), e)),
    }
}

/// File bytes as resource contents: text when UTF-8, else a base64 blob.
pub fn file_contents(uri: &str, data: &[u8]) -> ResourceContents {
    match std::str::from_utf8(data) {
        Ok(t) => ResourceContents::text(t, uri).with_mime_type("text/plain"),
        Err(_) => {
            ResourceContents::blob(base64::engine::general_purpose::STANDARD.encode(data), uri)
                .with_mime_type("application/octet-stream")
        }
    }
}

async fn read_file(conn: &Conn, a: tools::ReadArgs) -> Result<CallToolResult, ToolError> {
    a.validate()?;
    let data = fetch_file(
        conn,
        &a.sandbox_id,
        &a.path,
        a.user.as_deref(),
        MAX_READ_BYTES,
    )
    .await?;
    let uri = format!(
        "{}{}/{}",
        crate::handler::RESOURCE_SCHEME,
        a.sandbox_id,
        a.path.trim_start_matches('/')
    );
    let r = match std::str::from_utf8(&data) {
        Ok(t) => ok(
            t.to_owned(),
            json!({"path": a.path, "size": data.len(), "encoding": "utf8"}),
        ),
        Err(_) => {
            let mut r = CallToolResult::success(vec![
                ContentBlock::text(format!(
                    "{} is binary ({} bytes); its content is attached base64-encoded.",
                    a.path,
                    data.len()
                )),
                ContentBlock::resource(file_contents(&uri, &data)),
            ]);
            r.structured_content =
                Some(json!({"path": a.path, "size": data.len(), "encoding": "base64"}));
            r
        }
    };
    Ok(r)
}

async fn write_file(conn: &Conn, a: tools::WriteArgs) -> Result<CallToolResult, ToolError> {
    let data = a.bytes()?;
    let len = data.len();
    let clients = conn.sandbox(&a.sandbox_id).await?;
    let custom;
    let envd = match a.user.as_deref() {
        None => &clients.envd,
        Some(u) => {
            custom = envd_as(&clients, conn, &a.sandbox_id, Some(u));
            &custom
        }
    };
    envd.write_file(&a.path, Bytes::from(data))
        .await
        .map_err(|e| ToolError::envd(format!("writing {}", a.path), e))?;
    Ok(ok(
        format!("Wrote {len} bytes to {}.", a.path),
        json!({"path": a.path, "size": len}),
    ))
}

async fn list_files(conn: &Conn, a: tools::ListFilesArgs) -> Result<CallToolResult, ToolError> {
    a.validate()?;
    let clients = conn.sandbox(&a.sandbox_id).await?;
    let path = a.path.clone().unwrap_or_default();
    let entries = clients
        .envd
        .list_dir(&path, a.depth.unwrap_or(1))
        .await
        .map_err(|e| {
            ToolError::envd(
                format!(
                    "listing {}",
                    if path.is_empty() {
                        "the home directory"
                    } else {
                        path.as_str()
                    }
                ),
                e,
            )
        })?;
    use alcove_client::envd::filesystem::FileType;
    let kind = |t: i32| match FileType::try_from(t) {
        Ok(FileType::Directory) => "dir",
        Ok(FileType::Symlink) => "symlink",
        _ => "file",
    };
    let facts: Vec<Value> = entries
        .iter()
        .map(|e| json!({"name": e.name, "path": e.path, "type": kind(e.r#type), "size": e.size}))
        .collect();
    let lines: Vec<String> = entries
        .iter()
        .map(|e| format!("{:<7} {:>10}  {}", kind(e.r#type), e.size, e.path))
        .collect();
    let text = if lines.is_empty() {
        "The directory is empty.".to_owned()
    } else {
        lines.join("\n")
    };
    Ok(ok(text, json!({ "entries": facts })))
}

async fn get_url(conn: &Conn, a: tools::UrlArgs) -> Result<CallToolResult, ToolError> {
    a.validate()?;
    let v = conn
        .api
        .sandbox(&a.sandbox_id)
        .await
        .map_err(ToolError::api)?;
    // As the SDKs' get_host: `<port>-<sandboxID>.<domain>`.
    let domain = v
        .get("domain")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| {
            conn.target
                .sandbox_url
                .trim_start_matches("http://")
                .to_owned()
        });
    let host = format!("{}-{}.{domain}", a.port, a.sandbox_id);
    let url = format!("http://{host}");
    let traffic_token = v.get("trafficAccessToken").and_then(Value::as_str);
    let mut text = format!(
        "{url}\nA client that cannot resolve that name can send its requests to {} with the \
         headers E2b-Sandbox-Id: {} and E2b-Sandbox-Port: {}.",
        conn.target.sandbox_url, a.sandbox_id, a.port
    );
    if let Some(t) = traffic_token {
        text.push_str(&format!(
            " This sandbox's traffic is private: send the header e2b-traffic-access-token: {t}."
        ));
    }
    Ok(ok(
        text,
        json!({"url": url, "host": host, "port": a.port, "sandboxId": a.sandbox_id}),
    ))
}

async fn pause(conn: &Conn, a: tools::SandboxArgs) -> Result<CallToolResult, ToolError> {
    a.validate("pause_sandbox")?;
    let path = format!("/sandboxes/{}/pause", enc(&a.sandbox_id));
    conn.api
        .call("POST", &path, None)
        .await
        .map_err(ToolError::api)?;
    conn.forget(&a.sandbox_id);
    Ok(ok(
        format!(
            "Paused sandbox {}. Resume it with resume_sandbox.",
            a.sandbox_id
        ),
        json!({"sandboxId": a.sandbox_id, "state": "paused"}),
    ))
}

async fn resume(conn: &Conn, a: tools::ResumeArgs) -> Result<CallToolResult, ToolError> {
    tools::check_sandbox_id("resume_sandbox", &a.sandbox_id)?;
    if a.timeout_seconds == Some(0) {
        return Err(ToolError::invalid(
            "resume_sandbox",
            "timeoutSeconds must be at least 1",
        ));
    }
    let v = post_to_sandbox(conn, &a.sandbox_id, "resume", json!({}), a.timeout_seconds).await?;
    conn.forget(&a.sandbox_id);
    let mut facts = sandbox_facts(&v);
    facts["state"] = json!("running");
    Ok(ok(format!("Resumed sandbox {}.", a.sandbox_id), facts))
}

async fn snapshot(conn: &Conn, a: tools::SnapshotArgs) -> Result<CallToolResult, ToolError> {
    tools::check_sandbox_id("snapshot_sandbox", &a.sandbox_id)?;
    if let Some(n) = &a.name
        && (n.trim().is_empty() || n.len() > 128)
    {
        return Err(ToolError::invalid(
            "snapshot_sandbox",
            "name must be 1 to 128 characters (or left out)",
        ));
    }
    let v = conn
        .api
        .create_snapshot(&a.sandbox_id, a.name.as_deref())
        .await
        .map_err(ToolError::api)?;
    let sid = v
        .get("snapshotID")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    Ok(ok(
        format!(
            "Saved sandbox {} as snapshot {sid}. create_sandbox with template '{}' starts a new \
             sandbox from it.",
            a.sandbox_id,
            a.name.as_deref().unwrap_or(&sid)
        ),
        json!({"snapshotId": sid, "name": a.name, "sandboxId": a.sandbox_id}),
    ))
}

async fn fork(conn: &Conn, a: tools::ForkArgs) -> Result<CallToolResult, ToolError> {
    a.validate()?;
    let body = json!({"count": a.count.unwrap_or(1)});
    let v = post_to_sandbox(conn, &a.sandbox_id, "fork", body, a.timeout_seconds).await?;
    let mut ids = Vec::new();
    let mut errors = Vec::new();
    for child in v.as_array().cloned().unwrap_or_default() {
        if let Some(s) = child.get("sandbox") {
            ids.push(str_field(s, "sandboxID").to_owned());
        } else if let Some(e) = child.get("error") {
            errors.push(str_field(e, "message").to_owned());
        }
    }
    let mut text = format!(
        "Forked sandbox {} into {}: {}.",
        a.sandbox_id,
        ids.len(),
        ids.join(", ")
    );
    if !errors.is_empty() {
        text.push_str(&format!(
            " {} child(ren) failed: {}",
            errors.len(),
            errors.join("; ")
        ));
    }
    let facts = json!({"sandboxIds": ids, "errors": errors, "parentId": a.sandbox_id});
    if ids.is_empty() {
        let mut r = CallToolResult::error(vec![ContentBlock::text(text)]);
        r.structured_content = Some(facts);
        return Ok(r);
    }
    Ok(ok(text, facts))
}

/// `POST /sandboxes/{id}/{action}` with `body`, plus `timeout` (seconds) when given; the answer's
/// JSON.
async fn post_to_sandbox(
    conn: &Conn,
    sandbox_id: &str,
    action: &str,
    mut body: Value,
    timeout_seconds: Option<u64>,
) -> Result<Value, ToolError> {
    if let Some(t) = timeout_seconds {
        body["timeout"] = json!(t);
    }
    let path = format!("/sandboxes/{}/{action}", enc(sandbox_id));
    Ok(conn
        .api
        .call("POST", &path, Some(&body))
        .await
        .map_err(ToolError::api)?
        .json)
}

fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_zero_exit_is_an_error_result_with_the_output() {
        let r = command_result(Some(7), Some((2, None)), "out\n", "boom\n", None);
        assert_eq!(r.is_error, Some(true));
        let t = &r.content[0].as_text().unwrap().text;
        assert!(
            t.contains("exited with code 2") && t.contains("boom"),
            "{t}"
        );
        assert_eq!(r.structured_content.as_ref().unwrap()["exitCode"], 2);
        let r = command_result(Some(7), Some((0, None)), "ok\n", "", None);
        assert_eq!(r.is_error, Some(false));
    }

    #[test]
    fn a_timeout_note_makes_an_error_result() {
        let r = command_result(Some(7), None, "", "", Some("did not finish".into()));
        assert_eq!(r.is_error, Some(true));
        assert!(r.structured_content.unwrap()["exitCode"].is_null());
    }

    #[test]
    fn binary_files_become_blobs() {
        assert!(matches!(
            file_contents("sandbox://s/a", b"hi"),
            ResourceContents::TextResourceContents { .. }
        ));
        assert!(matches!(
            file_contents("sandbox://s/a", &[0xff, 0xfe]),
            ResourceContents::BlobResourceContents { .. }
        ));
    }
}

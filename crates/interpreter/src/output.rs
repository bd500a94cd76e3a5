//! The NDJSON lines of `/execute`, as the e2b-code-interpreter SDKs parse them, and the small
//! per-language cells that apply environment variables around a user's cell.

use std::collections::BTreeMap;

use axum::body::Body;
use axum::response::Response;
use serde_json::{Map, Value, json};

use crate::kernel::{Event, OwnedExecution};

/// MIME types our Python helper attaches to figures and data frames.
pub const CHART_MIME: &str = "application/vnd.alcove.chart+json";
pub const DATA_MIME: &str = "application/vnd.alcove.data+json";

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// What `input()` says in a cell: Jupyter's own message talks about a "frontend".
const NO_STDIN: &str = "input() is not supported: cells run without a terminal, so nothing can \
answer it. Put the value in the code, in a file (sandbox.files.write) or in an environment \
variable (run_code(..., envs={...})) instead";

/// One event as the SDK's `parse_output` expects it; `language` is the context's.
pub fn event_json(language: &str, ev: Event) -> Value {
    match ev {
        Event::ExecutionCount(n) => json!({"type": "number_of_executions", "execution_count": n}),
        Event::Stdout(text) => json!({"type": "stdout", "text": text, "timestamp": now_ns()}),
        Event::Stderr(text) => json!({"type": "stderr", "text": text, "timestamp": now_ns()}),
        Event::Error {
            name,
            value,
            traceback,
        } => json!({
            "type": "error",
            "value": if name == "StdinNotImplementedError" { NO_STDIN.to_string() } else { value },
            "name": name,
            "traceback": traceback.join("\n"),
        }),
        Event::Result { main, data } => result_json(language, main, data),
    }
}

/// A string value's text without the quotes of its repr, as E2B gives it: Python's `'…'`, and
/// for JavaScript and TypeScript (Deno's inspect) `"…"` with JSON escapes or `'…'`.
fn unquote(language: &str, s: &str) -> Option<String> {
    if s.len() < 2 {
        return None;
    }
    let js = matches!(language, "javascript" | "typescript");
    if s.starts_with('\'') && s.ends_with('\'') {
        return Some(s[1..s.len() - 1].to_string());
    }
    if js && s.starts_with('"') && s.ends_with('"') {
        return serde_json::from_str::<String>(s).ok();
    }
    None
}

/// Jupyter's MIME bundle → the SDK's `Result` fields; unknown types go to `extra`.
fn result_json(language: &str, main: bool, mut data: Map<String, Value>) -> Value {
    let mut out = Map::new();
    out.insert("type".into(), json!("result"));
    out.insert("is_main_result".into(), json!(main));
    let fields = [
        ("text/plain", "text"),
        ("text/html", "html"),
        ("text/markdown", "markdown"),
        ("image/svg+xml", "svg"),
        ("image/png", "png"),
        ("image/jpeg", "jpeg"),
        ("application/pdf", "pdf"),
        ("text/latex", "latex"),
        ("application/json", "json"),
        ("application/javascript", "javascript"),
        (CHART_MIME, "chart"),
        (DATA_MIME, "data"),
    ];
    for (mime, field) in fields {
        if let Some(mut v) = data.remove(mime) {
            if field == "text"
                && let Value::String(s) = &v
                && let Some(plain) = unquote(language, s)
            {
                // A string's repr: give the string itself, as E2B does.
                v = Value::String(plain);
            }
            if matches!(field, "png" | "jpeg")
                && let Value::String(s) = &v
            {
                v = Value::String(s.replace('\n', ""));
            }
            out.insert(field.into(), v);
        }
    }
    if !data.is_empty() {
        out.insert("extra".into(), Value::Object(data));
    }
    Value::Object(out)
}

fn line(v: &Value) -> bytes::Bytes {
    let mut b = serde_json::to_vec(v).expect("serialises");
    b.push(b'\n');
    b.into()
}

enum Stage {
    Running(Box<OwnedExecution>, Option<String>),
    Finished,
}

/// Streams the cell's events, then `end_of_execution`. Dropping the body (client gone) drops the
/// execution, which interrupts the kernel.
pub fn ndjson_response(
    language: String,
    exec: OwnedExecution,
    teardown: Option<String>,
) -> Response {
    let stream = futures::stream::unfold(Stage::Running(Box::new(exec), teardown), move |stage| {
        let language = language.clone();
        async move {
            match stage {
                Stage::Finished => None,
                Stage::Running(mut exec, teardown) => match exec.next().await {
                    Some(ev) => Some((
                        Ok::<_, std::convert::Infallible>(line(&event_json(&language, ev))),
                        Stage::Running(exec, teardown),
                    )),
                    None => {
                        if let Some(code) = &teardown {
                            exec.run_silent_after(code).await;
                        }
                        drop(exec);
                        Some((
                            Ok(line(&json!({"type": "end_of_execution"}))),
                            Stage::Finished,
                        ))
                    }
                },
            }
        }
    });
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(stream))
        .expect("valid response")
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Cells run silently before and after the user's cell: the sandbox's variables are set for good,
/// the call's own only for that cell. Names were validated by the caller.
pub fn env_code(
    language: &str,
    sandbox: &BTreeMap<String, String>,
    per_call: &BTreeMap<String, String>,
) -> (Option<String>, Option<String>) {
    if sandbox.is_empty() && per_call.is_empty() {
        return (None, None);
    }
    // A JSON string is also a valid R and JavaScript string literal.
    let q = |v: &str| serde_json::to_string(v).expect("serialises");
    match language {
        "python" => {
            let setup = format!(
                "__import__('_alcove_kernel').env_apply({}, {})",
                serde_json::to_string(sandbox).expect("serialises"),
                serde_json::to_string(per_call).expect("serialises"),
            );
            let teardown =
                (!per_call.is_empty()).then(|| "__import__('_alcove_kernel').env_restore()".into());
            (Some(setup), teardown)
        }
        "bash" => env_cells(
            sandbox,
            per_call,
            |k, v| format!("export {k}={}\n", sh_quote(v)),
            |k| format!("unset {k}\n"),
        ),
        "r" => env_cells(
            sandbox,
            per_call,
            |k, v| format!("Sys.setenv(`{k}` = {})\n", q(v)),
            |k| format!("Sys.unsetenv({})\n", q(k)),
        ),
        "javascript" | "typescript" => env_cells(
            sandbox,
            per_call,
            |k, v| format!("process.env[{}] = {};\n", q(k), q(v)),
            |k| format!("delete process.env[{}];\n", q(k)),
        ),
        _ => (None, None),
    }
}

/// Set-up sets every variable (the call's over the sandbox's); the teardown puts back the
/// sandbox's value of each variable the call set, or removes it.
fn env_cells(
    sandbox: &BTreeMap<String, String>,
    per_call: &BTreeMap<String, String>,
    set: impl Fn(&str, &str) -> String,
    unset: impl Fn(&str) -> String,
) -> (Option<String>, Option<String>) {
    let setup: String = sandbox
        .iter()
        .chain(per_call.iter())
        .map(|(k, v)| set(k, v))
        .collect();
    let teardown: String = per_call
        .keys()
        .map(|k| match sandbox.get(k) {
            Some(v) => set(k, v),
            None => unset(k),
        })
        .collect();
    (Some(setup), (!teardown.is_empty()).then_some(teardown))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_map_to_sdk_fields() {
        let mut data = Map::new();
        data.insert("text/plain".into(), json!("'hi'"));
        data.insert("image/png".into(), json!("iVBO\nRw=="));
        data.insert(CHART_MIME.into(), json!({"type": "line"}));
        data.insert("application/vnd.plotly.v1+json".into(), json!({}));
        let v = result_json("python", true, data);
        assert_eq!(v["text"], "hi");
        assert_eq!(v["png"], "iVBORw==");
        assert_eq!(v["chart"]["type"], "line");
        assert_eq!(v["is_main_result"], true);
        assert!(v["extra"]["application/vnd.plotly.v1+json"].is_object());
    }

    #[test]
    fn bash_env_is_quoted_and_restored() {
        let sandbox = BTreeMap::from([("A".to_string(), "x".to_string())]);
        let call = BTreeMap::from([
            ("A".to_string(), "it's".to_string()),
            ("B".to_string(), "$(no)".to_string()),
        ]);
        let (setup, teardown) = env_code("bash", &sandbox, &call);
        let setup = setup.unwrap();
        assert!(setup.contains("export A='it'\\''s'"));
        assert!(setup.contains("export B='$(no)'"));
        let teardown = teardown.unwrap();
        assert!(teardown.contains("export A='x'"));
        assert!(teardown.contains("unset B"));
    }

    #[test]
    fn r_and_js_env_are_quoted_and_restored() {
        let sandbox = BTreeMap::from([("A".to_string(), "x".to_string())]);
        let call = BTreeMap::from([
            ("A".to_string(), "say \"hi\"\\n".to_string()),
            ("B".to_string(), "b".to_string()),
        ]);
        let (setup, teardown) = env_code("r", &sandbox, &call);
        assert_eq!(
            setup.unwrap(),
            "Sys.setenv(`A` = \"x\")\nSys.setenv(`A` = \"say \\\"hi\\\"\\\\n\")\nSys.setenv(`B` = \"b\")\n"
        );
        assert_eq!(
            teardown.unwrap(),
            "Sys.setenv(`A` = \"x\")\nSys.unsetenv(\"B\")\n"
        );
        let (setup, teardown) = env_code("typescript", &sandbox, &call);
        assert!(setup.unwrap().contains("process.env[\"B\"] = \"b\";"));
        assert!(teardown.unwrap().contains("delete process.env[\"B\"];"));
    }

    #[test]
    fn strings_lose_their_repr_quotes() {
        assert_eq!(unquote("python", "'hi'").as_deref(), Some("hi"));
        assert_eq!(unquote("python", "\"hi\""), None);
        assert_eq!(unquote("javascript", "\"a\\\"b\""), Some("a\"b".into()));
        assert_eq!(unquote("typescript", "'x'").as_deref(), Some("x"));
        assert_eq!(unquote("javascript", "42"), None);
        assert_eq!(unquote("r", "[1] \"x\""), None);
    }

    #[test]
    fn input_gets_a_clear_error() {
        let v = event_json(
            "python",
            Event::Error {
                name: "StdinNotImplementedError".into(),
                value: "raw_input was called, but this frontend does not support input requests."
                    .into(),
                traceback: vec![],
            },
        );
        assert_eq!(v["name"], "StdinNotImplementedError");
        assert!(v["value"].as_str().unwrap().contains("files.write"), "{v}");
    }

    #[test]
    fn no_env_no_cells() {
        assert_eq!(
            env_code("python", &BTreeMap::new(), &BTreeMap::new()),
            (None, None)
        );
    }
}

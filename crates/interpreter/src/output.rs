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

/// One event as the SDK's `parse_output` expects it.
pub fn event_json(ev: Event) -> Value {
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
            "name": name,
            "value": value,
            "traceback": traceback.join("\n"),
        }),
        Event::Result { main, data } => result_json(main, data),
    }
}

/// Jupyter's MIME bundle → the SDK's `Result` fields; unknown types go to `extra`.
fn result_json(main: bool, mut data: Map<String, Value>) -> Value {
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
                && s.len() >= 2
                && s.starts_with('\'')
                && s.ends_with('\'')
            {
                // A Python string's repr: give the string itself, as E2B does.
                v = Value::String(s[1..s.len() - 1].to_string());
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
pub fn ndjson_response(exec: OwnedExecution, teardown: Option<String>) -> Response {
    let stream = futures::stream::unfold(
        Stage::Running(Box::new(exec), teardown),
        |stage| async move {
            match stage {
                Stage::Finished => None,
                Stage::Running(mut exec, teardown) => match exec.next().await {
                    Some(ev) => Some((
                        Ok::<_, std::convert::Infallible>(line(&event_json(ev))),
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
        },
    );
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
        "bash" => {
            let mut setup = String::new();
            for (k, v) in sandbox.iter().chain(per_call.iter()) {
                setup.push_str(&format!("export {k}={}\n", sh_quote(v)));
            }
            let mut teardown = String::new();
            for k in per_call.keys() {
                match sandbox.get(k) {
                    Some(v) => teardown.push_str(&format!("export {k}={}\n", sh_quote(v))),
                    None => teardown.push_str(&format!("unset {k}\n")),
                }
            }
            (Some(setup), (!teardown.is_empty()).then_some(teardown))
        }
        _ => (None, None),
    }
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
        let v = result_json(true, data);
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
    fn no_env_no_cells() {
        assert_eq!(
            env_code("python", &BTreeMap::new(), &BTreeMap::new()),
            (None, None)
        );
    }
}

//! OpenTelemetry: every audit event (API call, process, file operation, egress connection,
//! state change) is also exported as a span by OTLP/HTTP (protobuf) to `--otlp-endpoint`. A
//! W3C `traceparent` the caller sent (on an API call, or on a process start, where it also
//! reaches the process as `TRACEPARENT`) makes the span a child of the caller's, so an agent's
//! trace shows what the sandbox did under its own spans.
//!
//! Telemetry is best effort, unlike the audit log: spans wait in a bounded queue (dropped,
//! and counted in the log, when it is full or the collector is down) and go out in batches from
//! one task, each POST under a 10 s deadline.

use std::time::Duration;

use alcove_store::NewAuditRecord;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span, Status, span, status,
};
use prost::Message;
use serde_json::Value;
use tokio::sync::mpsc;

use super::Service;
use crate::error::chain;

/// Spans waiting for export; more are dropped.
const QUEUE: usize = 8192;
/// Most spans in one export.
const BATCH: usize = 512;

/// The queue's two ends (the exporter takes the receiver).
pub(crate) struct SpanQueue {
    pub tx: mpsc::Sender<Span>,
    pub rx: std::sync::Mutex<Option<mpsc::Receiver<Span>>>,
}

impl SpanQueue {
    pub fn new() -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        SpanQueue {
            tx,
            rx: std::sync::Mutex::new(Some(rx)),
        }
    }
}

/// `(trace id, parent span id)` of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`).
fn parse_traceparent(v: &str) -> Option<(Vec<u8>, Vec<u8>)> {
    let parts: Vec<&str> = v.trim().split('-').collect();
    if parts.len() != 4 || parts[1].len() != 32 || parts[2].len() != 16 {
        return None;
    }
    let trace = hex::decode(parts[1]).ok()?;
    let parent = hex::decode(parts[2]).ok()?;
    (trace.iter().any(|b| *b != 0) && parent.iter().any(|b| *b != 0)).then_some((trace, parent))
}

fn attr(key: &str, v: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(v) }),
        ..KeyValue::default()
    }
}

fn str_attr(key: &str, v: &str) -> KeyValue {
    attr(key, any_value::Value::StringValue(v.to_owned()))
}

/// The span an audit record stands for.
pub(crate) fn span_of(r: &NewAuditRecord) -> Span {
    let ms = |k: &str| r.detail.get(k).and_then(Value::as_u64).unwrap_or(0) as i64;
    // Egress records carry when the connection opened; the others when the call ended.
    let (start, end) = if r.kind == "egress" {
        (r.at, r.at + ms("durationMs"))
    } else {
        let took = ms("durationMs").max(ms("latencyMs"));
        (r.at - took, r.at)
    };
    let (trace_id, parent) = r
        .detail
        .get("traceparent")
        .and_then(Value::as_str)
        .and_then(parse_traceparent)
        .unwrap_or_else(|| (rand::random::<[u8; 16]>().to_vec(), Vec::new()));
    let mut attributes = vec![
        str_attr("alcove.kind", &r.kind),
        str_attr("alcove.result", &r.result),
        str_attr("alcove.actor", &r.actor),
    ];
    for (k, v) in [
        ("alcove.sandbox_id", &r.sandbox_id),
        ("alcove.team_id", &r.team_id),
        ("alcove.target", &r.target),
    ] {
        if let Some(v) = v {
            attributes.push(str_attr(k, v));
        }
    }
    if let Some(obj) = r.detail.as_object() {
        for (k, v) in obj {
            let key = format!("alcove.{k}");
            let value = match v {
                Value::Null => continue,
                Value::Bool(b) => any_value::Value::BoolValue(*b),
                Value::Number(n) => match n.as_i64() {
                    Some(i) => any_value::Value::IntValue(i),
                    None => any_value::Value::DoubleValue(n.as_f64().unwrap_or(0.0)),
                },
                Value::String(s) => any_value::Value::StringValue(s.clone()),
                other => any_value::Value::StringValue(other.to_string()),
            };
            attributes.push(attr(&key, value));
        }
    }
    let failed = (r.kind == "api" && r.result.starts_with('5'))
        || r.result.starts_with("error")
        || r.result.starts_with("http 5");
    let nanos = |ms: i64| (ms.max(0) as u64).saturating_mul(1_000_000);
    Span {
        trace_id,
        span_id: rand::random::<[u8; 8]>().to_vec(),
        parent_span_id: parent,
        name: format!("{} {}", r.kind, r.action),
        kind: match r.kind.as_str() {
            "api" => span::SpanKind::Server,
            "egress" => span::SpanKind::Client,
            _ => span::SpanKind::Internal,
        } as i32,
        start_time_unix_nano: nanos(start),
        end_time_unix_nano: nanos(end.max(start)),
        attributes,
        status: Some(Status {
            message: if failed {
                r.result.clone()
            } else {
                String::new()
            },
            code: if failed {
                status::StatusCode::Error
            } else {
                status::StatusCode::Unset
            } as i32,
        }),
        ..Span::default()
    }
}

impl Service {
    /// Queues the span of an audit record, if OTLP export is on. Never waits.
    pub(crate) fn export_span(&self, r: &NewAuditRecord) {
        if self.metering.otlp_endpoint.is_none() {
            return;
        }
        if self.spans.tx.try_send(span_of(r)).is_err() {
            crate::metrics::Metrics::inc(&crate::metrics::METRICS.spans_dropped);
        }
    }

    /// The exporter: batches of spans POSTed to the OTLP endpoint until the queue closes.
    pub async fn export_spans(&self, client: &reqwest::Client) {
        let Some(endpoint) = self.metering.otlp_endpoint.clone() else {
            return;
        };
        let Some(mut rx) = self.spans.rx.lock().expect("spans rx").take() else {
            return;
        };
        let resource = Resource {
            attributes: vec![
                str_attr("service.name", "alcove"),
                str_attr("service.version", env!("CARGO_PKG_VERSION")),
            ],
            ..Resource::default()
        };
        let mut batch = Vec::with_capacity(BATCH);
        let mut failures = 0u64;
        while rx.recv_many(&mut batch, BATCH).await > 0 {
            // A short wait lets a burst fill the batch.
            tokio::time::sleep(Duration::from_millis(200)).await;
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(s) => batch.push(s),
                    Err(_) => break,
                }
            }
            let n = batch.len();
            let req = ExportTraceServiceRequest {
                resource_spans: vec![ResourceSpans {
                    resource: Some(resource.clone()),
                    scope_spans: vec![ScopeSpans {
                        scope: Some(InstrumentationScope {
                            name: "alcove".into(),
                            version: env!("CARGO_PKG_VERSION").into(),
                            ..InstrumentationScope::default()
                        }),
                        spans: std::mem::take(&mut batch),
                        ..ScopeSpans::default()
                    }],
                    ..ResourceSpans::default()
                }],
            };
            let res = client
                .post(&endpoint)
                .header("content-type", "application/x-protobuf")
                .timeout(Duration::from_secs(10))
                .body(req.encode_to_vec())
                .send()
                .await;
            let err = match res {
                Ok(r) if r.status().is_success() => None,
                Ok(r) => Some(format!("the collector answered {}", r.status())),
                Err(e) => Some(chain(&e).to_string()),
            };
            if let Some(e) = err {
                failures += 1;
                // One line per 100 failures: a collector that is down must not flood the log.
                if failures % 100 == 1 {
                    tracing::warn!(endpoint = %endpoint, spans = n, failures, error = %e, "otlp: export failed; spans dropped");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(kind: &str, detail: Value) -> NewAuditRecord {
        NewAuditRecord {
            at: 1_800_000_000_000,
            team_id: Some("t".into()),
            actor: "k".into(),
            sandbox_id: Some("s".into()),
            kind: kind.into(),
            action: "start".into(),
            target: Some("/bin/true".into()),
            result: "exit 0".into(),
            detail,
        }
    }

    #[test]
    fn a_traceparent_makes_the_span_a_child_of_the_callers() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let s = span_of(&rec(
            "process",
            serde_json::json!({"traceparent": tp, "durationMs": 250, "pid": 7}),
        ));
        assert_eq!(hex::encode(&s.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex::encode(&s.parent_span_id), "00f067aa0ba902b7");
        assert_eq!(s.span_id.len(), 8);
        assert_eq!(s.name, "process start");
        assert_eq!(
            s.end_time_unix_nano - s.start_time_unix_nano,
            250 * 1_000_000
        );
        assert!(s.attributes.iter().any(|a| a.key == "alcove.pid"));
        // Without one: a trace of its own, no parent.
        let s = span_of(&rec("process", serde_json::json!({})));
        assert_eq!(s.trace_id.len(), 16);
        assert!(s.parent_span_id.is_empty());
        for bad in ["00-0000-00f067aa0ba902b7-01", "garbage"] {
            assert!(parse_traceparent(bad).is_none());
        }
    }
}

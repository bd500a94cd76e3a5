//! The sandbox page's terminal: xterm.js in the browser, a WebSocket to the server, and on the
//! server a shell in a PTY started through envd's process API (`Start` with a `pty`, then
//! `SendInput` and `Update` for keystrokes and resizes), exactly what the SDKs' `pty` uses.
//!
//! The socket is same-origin only (its `Origin` must be this site) and needs the session; the
//! browser never sees the sandbox's access token. Frames: binary from the browser is input,
//! text is a resize (`{"cols":80,"rows":24}`); binary to the browser is the PTY's output, text
//! is the end (`{"exit":"..."}` or `{"error":"..."}`). Closing the page kills the shell.

use std::time::Duration;

use alcove_envd_proto::connect::{Codec, encode_message};
use alcove_envd_proto::process::{
    self as pp, ProcessConfig, ProcessInput, ProcessSelector, Pty, SendInputRequest,
    SendInputResponse, SendSignalRequest, SendSignalResponse, StartRequest, StartResponse,
    UpdateRequest, UpdateResponse,
};
use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use serde::Deserialize;

use super::envd::{Guest, Stream};
use super::{Signed, api_error_page, error_page, same_origin};
use crate::handlers::AppState;

/// The largest frame the browser may send (a paste).
const MAX_FRAME: usize = 64 << 10;
/// How long the shell may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Deserialize, Clone, Copy)]
pub struct Size {
    #[serde(default = "cols")]
    cols: u32,
    #[serde(default = "rows")]
    rows: u32,
}

fn cols() -> u32 {
    80
}
fn rows() -> u32 {
    24
}

impl Size {
    fn pty(self) -> Pty {
        Pty {
            size: Some(pp::pty::Size {
                cols: self.cols.clamp(10, 500),
                rows: self.rows.clamp(4, 200),
            }),
        }
    }
}

pub async fn terminal(
    State(svc): State<AppState>,
    signed: Signed,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(size): Query<Size>,
    ws: WebSocketUpgrade,
) -> Response {
    let back = format!("/dashboard/sandboxes/{id}");
    if !same_origin(&headers) {
        return error_page(
            StatusCode::FORBIDDEN,
            "Request refused",
            "A terminal can only be opened from this dashboard's own page.",
            &back,
            Some(&signed),
        );
    }
    let guest = match Guest::open(&svc, &signed.team_id, &id).await {
        Ok(g) => g,
        Err(e) => return api_error_page(e, &back, &signed),
    };
    ws.max_message_size(MAX_FRAME)
        .max_frame_size(MAX_FRAME)
        .on_upgrade(move |socket| run(guest, socket, size))
}

fn pid_selector(pid: u32) -> Option<ProcessSelector> {
    Some(ProcessSelector {
        selector: Some(pp::process_selector::Selector::Pid(pid)),
    })
}

async fn say(socket: &mut WebSocket, key: &str, text: &str) {
    let msg = serde_json::json!({ key: text }).to_string();
    let _ = socket.send(Message::Text(msg.into())).await;
}

async fn run(guest: Guest, mut socket: WebSocket, size: Size) {
    let start = StartRequest {
        process: Some(ProcessConfig {
            cmd: "/bin/bash".into(),
            args: vec!["-l".into()],
            envs: [("TERM".to_owned(), "xterm-256color".to_owned())].into(),
            cwd: None,
        }),
        pty: Some(size.pty()),
        tag: None,
        stdin: None,
    };
    let opened = tokio::time::timeout(
        START_TIMEOUT,
        guest.send(
            Method::POST,
            "/process.Process/Start",
            Some(Codec::Proto.content_type(alcove_envd_proto::connect::Framing::Streaming)),
            Body::from(encode_message(Codec::Proto, &start)),
        ),
    )
    .await;
    let res = match opened {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return say(&mut socket, "error", &e.parts().2).await,
        Err(_) => return say(&mut socket, "error", "the shell did not start in time").await,
    };
    let mut stream = Stream::new(res.into_body());
    let mut pid = None;
    loop {
        tokio::select! {
            msg = stream.next::<StartResponse>() => {
                use pp::process_event::{Event, data_event::Output};
                match msg {
                    Ok(Some(r)) => match r.event.and_then(|e| e.event) {
                        Some(Event::Start(s)) => pid = Some(s.pid),
                        Some(Event::Data(d)) => {
                            if let Some(Output::Pty(b) | Output::Stdout(b) | Output::Stderr(b)) = d.output
                                && socket.send(Message::Binary(b)).await.is_err()
                            {
                                break;
                            }
                        }
                        Some(Event::End(e)) => {
                            let why = e.error.filter(|s| !s.is_empty()).unwrap_or(e.status);
                            return say(&mut socket, "exit", &why).await;
                        }
                        Some(Event::Keepalive(_)) | None => {}
                    },
                    Ok(None) => return say(&mut socket, "exit", "the shell's stream ended").await,
                    Err(e) => return say(&mut socket, "error", &e).await,
                }
            }
            msg = socket.recv() => {
                let Some(pid) = pid else {
                    // Nothing typed before the shell exists is lost: the browser waits for output.
                    if matches!(msg, None | Some(Err(_)) | Some(Ok(Message::Close(_)))) { break; }
                    continue;
                };
                let sent = match msg {
                    Some(Ok(Message::Binary(b))) => guest
                        .unary::<_, SendInputResponse>(
                            "/process.Process/SendInput",
                            &SendInputRequest {
                                process: pid_selector(pid),
                                input: Some(ProcessInput {
                                    input: Some(pp::process_input::Input::Pty(b)),
                                }),
                            },
                        )
                        .await
                        .map(drop),
                    Some(Ok(Message::Text(t))) => match serde_json::from_str::<Size>(&t) {
                        Ok(size) => guest
                            .unary::<_, UpdateResponse>(
                                "/process.Process/Update",
                                &UpdateRequest { process: pid_selector(pid), pty: Some(size.pty()) },
                            )
                            .await
                            .map(drop),
                        Err(_) => Ok(()),
                    },
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => Ok(()),
                };
                if let Err(e) = sent {
                    say(&mut socket, "error", &e.parts().2).await;
                    break;
                }
            }
        }
    }
    // The page went away: the shell goes too.
    if let Some(pid) = pid {
        let _ = guest
            .unary::<_, SendSignalResponse>(
                "/process.Process/SendSignal",
                &SendSignalRequest {
                    process: pid_selector(pid),
                    signal: pp::Signal::Sigkill as i32,
                },
            )
            .await;
    }
}

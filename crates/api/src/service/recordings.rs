//! Screen recordings (`/alcove/v1/sandboxes/{id}/recordings`): the API's side of the desktop
//! template's `alcove-record`, which the backend runs in the sandbox (`exec`). The recorder
//! (ffmpeg `x11grab` into a fragmented MP4) lives and keeps its records in the guest; the API
//! checks the request, runs the command under a deadline and turns its one-line JSON answer into
//! a [`RecordingView`] or a structured error. What the guest says is bounded and parsed, never
//! trusted further than as text for its own owner.

use std::time::Duration;

use axum::http::StatusCode;

use super::{Service, api_error};
use crate::backend::{BackendOp, ExecRequest};
use crate::error::ApiError;
use crate::models::{RecordingList, RecordingStart, RecordingView};
use alcove_store::SandboxState as StoreState;

/// The recorder's command in the guest (`templates/desktop.toml`).
const RECORDER: &str = "alcove-record";
/// How long `stop` lets ffmpeg finish its file before it is killed (the fragments written so far
/// stay playable).
const STOP_WAIT_SECS: u32 = 30;
/// The deadline of one recorder command: its start waits up to a minute for ffmpeg's first bytes
/// (slow under emulation), its stop up to [`STOP_WAIT_SECS`].
const RUN_TIMEOUT: Duration = Duration::from_secs(90);
/// Characters of the guest's own message passed on.
const MAX_MESSAGE: usize = 1000;
/// Exit code of `sh` for a command it cannot find.
const NOT_FOUND_EXIT: i32 = 127;

/// Checks what a start asks for before it reaches the sandbox, so a bad body is a 400 with the
/// field's name even when the recorder would say the same.
fn check_start(body: &RecordingStart) -> Result<(), ApiError> {
    let bad = |detail: String| ApiError::InvalidBody { detail };
    if let Some(fps) = body.fps
        && !(1..=30).contains(&fps)
    {
        return Err(bad(format!("fps must be 1-30, not {fps}")));
    }
    if let Some(s) = body.max_seconds
        && !(1..=86_400).contains(&s)
    {
        return Err(bad(format!("maxSeconds must be 1-86400, not {s}")));
    }
    if let Some(d) = &body.display {
        let ok = d.len() <= 8
            && d.strip_prefix(':').is_some_and(|rest| {
                let (n, screen) = rest.split_once('.').unwrap_or((rest, "0"));
                !n.is_empty()
                    && n.len() <= 3
                    && n.bytes().all(|b| b.is_ascii_digit())
                    && screen.len() == 1
                    && screen.bytes().all(|b| b.is_ascii_digit())
            });
        if !ok {
            return Err(bad(format!(
                "display must name a local X display such as \":0\", not {d:?}"
            )));
        }
    }
    if let Some(p) = &body.path
        && (p.is_empty() || p.len() > 1024 || !p.ends_with(".mp4") || p.contains('\0'))
    {
        return Err(bad(format!(
            "path must be 1-1024 bytes and end in .mp4 (e.g. \"/home/user/run.mp4\"), not {p:?}"
        )));
    }
    Ok(())
}

/// A recording id as the recorder makes them (`rec-` and 12 hex digits): anything else names no
/// recording, and never reaches the guest's command line.
fn valid_id(rid: &str) -> bool {
    rid.len() == 16
        && rid.starts_with("rec-")
        && rid[4..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The recorder's refusal codes, as the API's (status, code).
fn refusal(code: &str) -> (StatusCode, &'static str) {
    match code {
        "invalid" => (StatusCode::BAD_REQUEST, "invalid_recording"),
        "not_found" => (StatusCode::NOT_FOUND, "recording_not_found"),
        "exists" => (StatusCode::CONFLICT, "recording_path_exists"),
        "display_not_running" => (StatusCode::CONFLICT, "display_not_running"),
        "too_many" => (StatusCode::TOO_MANY_REQUESTS, "too_many_recordings"),
        _ => (StatusCode::BAD_GATEWAY, "recording_failed"),
    }
}

fn clip(s: &str) -> String {
    let s = s.trim();
    match s.char_indices().nth(MAX_MESSAGE) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

/// What the recorder printed (one JSON object), as `T` or its refusal.
fn parse<T: serde::de::DeserializeOwned>(
    sandbox_id: &str,
    out: crate::backend::ExecOutput,
) -> Result<T, ApiError> {
    if out.exit_code == NOT_FOUND_EXIT {
        return Err(ApiError::RecordingUnavailable {
            sandbox_id: sandbox_id.to_owned(),
        });
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    if out.exit_code == 0 {
        if let Ok(v) = serde_json::from_str::<T>(line) {
            return Ok(v);
        }
    } else if let Ok(r) = serde_json::from_str::<Refusal>(line) {
        let (status, code) = refusal(&r.code);
        let message = if code == "recording_failed" {
            format!(
                "The screen recorder in sandbox {sandbox_id} failed: {}",
                clip(&r.message)
            )
        } else {
            clip(&r.message)
        };
        return Err(ApiError::Recording {
            status,
            code,
            message,
        });
    }
    let said = clip(&String::from_utf8_lossy(&out.stderr));
    Err(ApiError::Recording {
        status: StatusCode::BAD_GATEWAY,
        code: "recording_failed",
        message: format!(
            "The screen recorder in sandbox {sandbox_id} gave no answer the API can read (exit \
             code {}){}. Check that /usr/local/bin/alcove-record is the desktop template's.",
            out.exit_code,
            if said.is_empty() {
                String::new()
            } else {
                format!(": {said}")
            }
        ),
    })
}

#[derive(serde::Deserialize)]
struct Refusal {
    code: String,
    message: String,
}

impl Service {
    /// Runs `alcove-record <args>` in a running sandbox of this team, as `user`.
    async fn recorder<T: serde::de::DeserializeOwned>(
        &self,
        team_id: &str,
        id: &str,
        args: Vec<String>,
    ) -> Result<T, ApiError> {
        let r = self.live_record(team_id, id).await?;
        if r.state == StoreState::Paused {
            return Err(ApiError::SandboxPaused { sandbox_id: r.id });
        }
        // `sh` says 127 when the template has no recorder, rather than the start failing.
        let mut argv = vec![
            "-c".to_owned(),
            format!(
                "command -v {RECORDER} >/dev/null 2>&1 || exit {NOT_FOUND_EXIT}; exec {RECORDER} \"$@\""
            ),
            RECORDER.to_owned(),
        ];
        argv.extend(args);
        let req = ExecRequest {
            cmd: "/bin/sh".into(),
            args: argv,
            user: "user".into(),
            timeout: RUN_TIMEOUT,
        };
        let out = self
            .call(BackendOp::Exec, &r.id, self.backend.exec(&r.id, req))
            .await
            .map_err(|e| api_error(BackendOp::Exec, &r.id, e))?;
        parse(&r.id, out)
    }

    /// `POST /alcove/v1/sandboxes/{id}/recordings`: starts recording a display to an MP4 in
    /// the sandbox; answers once ffmpeg writes the file.
    pub async fn start_recording(
        &self,
        team_id: &str,
        id: &str,
        body: RecordingStart,
    ) -> Result<RecordingView, ApiError> {
        check_start(&body)?;
        let mut args = vec!["start".to_owned()];
        let opts = [
            ("--path", body.path),
            ("--fps", body.fps.map(|v| v.to_string())),
            ("--max-seconds", body.max_seconds.map(|v| v.to_string())),
            ("--display", body.display),
        ];
        for (flag, v) in opts {
            if let Some(v) = v {
                args.extend([flag.to_owned(), v]);
            }
        }
        self.recorder(team_id, id, args).await
    }

    /// `POST /alcove/v1/sandboxes/{id}/recordings/{rid}/stop`: ends a recording and answers
    /// with its file's size and length; stopping one that ended already answers as it is.
    pub async fn stop_recording(
        &self,
        team_id: &str,
        id: &str,
        rid: &str,
    ) -> Result<RecordingView, ApiError> {
        if !valid_id(rid) {
            return Err(ApiError::Recording {
                status: StatusCode::NOT_FOUND,
                code: "recording_not_found",
                message: format!(
                    "{rid:?} is not a recording id (they look like rec-0123456789ab): list \
                     them with GET /alcove/v1/sandboxes/{id}/recordings"
                ),
            });
        }
        let args = vec![
            "stop".to_owned(),
            rid.to_owned(),
            "--wait".to_owned(),
            STOP_WAIT_SECS.to_string(),
        ];
        self.recorder(team_id, id, args).await
    }

    /// `GET /alcove/v1/sandboxes/{id}/recordings`.
    pub async fn recordings(&self, team_id: &str, id: &str) -> Result<RecordingList, ApiError> {
        self.recorder(team_id, id, vec!["list".to_owned()]).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::ExecOutput;

    fn out(code: i32, stdout: &str) -> ExecOutput {
        ExecOutput {
            exit_code: code,
            stdout: stdout.as_bytes().to_vec(),
            stderr: b"boom".to_vec(),
        }
    }

    #[test]
    fn start_bodies_are_checked_before_the_guest() {
        let ok = RecordingStart {
            path: Some("/home/user/a.mp4".into()),
            fps: Some(30),
            max_seconds: Some(60),
            display: Some(":0".into()),
        };
        assert!(check_start(&ok).is_ok());
        for bad in [
            RecordingStart {
                fps: Some(0),
                ..Default::default()
            },
            RecordingStart {
                fps: Some(31),
                ..Default::default()
            },
            RecordingStart {
                max_seconds: Some(86_401),
                ..Default::default()
            },
            RecordingStart {
                display: Some("host:0".into()),
                ..Default::default()
            },
            RecordingStart {
                display: Some(":0; reboot".into()),
                ..Default::default()
            },
            RecordingStart {
                path: Some("/home/user/a.avi".into()),
                ..Default::default()
            },
        ] {
            let e = check_start(&bad).unwrap_err();
            assert_eq!(e.parts().0, StatusCode::BAD_REQUEST, "{bad:?}");
        }
    }

    #[test]
    fn recording_ids_are_checked_before_the_guest() {
        assert!(valid_id("rec-0123456789ab"));
        for bad in [
            "rec-0123456789AB",
            "rec-123",
            "../etc/passwd",
            "rec-0123456789a;",
        ] {
            assert!(!valid_id(bad), "{bad}");
        }
    }

    #[test]
    fn the_recorders_answers_become_views_or_structured_errors() {
        let v: RecordingView = parse(
            "s1",
            out(
                0,
                r#"{"recordingId":"rec-0123456789ab","state":"recording","path":"/home/user/recordings/rec-0123456789ab.mp4","display":":0","fps":5,"maxSeconds":3600,"startedAt":"2026-12-04T12:00:00Z","sizeBytes":48,"durationSeconds":0.4,"exitCode":null}"#,
            ),
        )
        .unwrap();
        assert_eq!(v.recording_id, "rec-0123456789ab");
        assert_eq!(v.size_bytes, 48);

        let e = parse::<RecordingView>("s1", out(2, r#"{"code":"exists","message":"taken"}"#))
            .unwrap_err();
        let (status, code, msg) = e.parts();
        assert_eq!(
            (status, code, msg.as_str()),
            (StatusCode::CONFLICT, "recording_path_exists", "taken")
        );

        let e = parse::<RecordingView>("s1", out(127, "")).unwrap_err();
        assert_eq!(e.parts().1, "recording_unavailable");

        let long = "x".repeat(10_000);
        let e = parse::<RecordingView>(
            "s1",
            out(
                2,
                &format!(r#"{{"code":"recorder_failed","message":"{long}"}}"#),
            ),
        )
        .unwrap_err();
        let (status, code, msg) = e.parts();
        assert_eq!(
            (status, code),
            (StatusCode::BAD_GATEWAY, "recording_failed")
        );
        assert!(msg.len() < 1200, "{}", msg.len());

        let e = parse::<RecordingView>("s1", out(0, "not json")).unwrap_err();
        let (_, code, msg) = e.parts();
        assert_eq!(code, "recording_failed");
        assert!(msg.contains("boom"), "{msg}");
    }
}

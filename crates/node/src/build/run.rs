//! The step runner: `RUN` and `COPY` inside the builder VM, through its agent, never on the
//! host. Each command runs as the step's user with the build's `ENV` and `WORKDIR`; its output
//! lines go to the build log as they come. `COPY` archives are uploaded into the guest in pieces
//! through the agent's `/files` and unpacked there by `tar`, as root; the host only reads and
//! hashes them.
//!
//! Every call into the guest is bounded by the build's deadline.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use alcove_agent_client::alcove_envd_proto::process::{self as pb, process_event};
use alcove_agent_client::{AgentBody, AgentClient, CallOptions, RpcStream};
use alcove_vmm::Vmm;
use bytes::Bytes;
use http_body_util::BodyExt;

use super::spec::{BuildFailure, BuildLog, BuildLogEntry, LogLevel, StepRef};
use super::state::StepState;
use crate::node::{Node, error_chain};

/// Longest log line kept; longer ones are cut (a progress bar without newlines, a minified file).
pub const MAX_LINE: usize = 4096;
/// Lines one step may put in the build log; past it lines are counted, not logged (the tail of
/// a failure still has the last ones).
pub const MAX_STEP_LINES: usize = 10_000;
/// Lines of a failed command's output repeated in its failure message.
const TAIL_LINES: usize = 15;
/// Biggest `COPY` archive accepted (the upload cap of the API is below it).
pub const MAX_COPY_BYTES: u64 = 2 << 30;
/// Each upload request carries at most this much (the agent client's request timeout bounds it).
const UPLOAD_PIECE: usize = 4 << 20;

/// The builder VM of one build: a node sandbox, and where its log goes.
pub(crate) struct Builder<V: Vmm> {
    pub node: Arc<Node<V>>,
    pub id: String,
    pub log: BuildLog,
    pub deadline: Instant,
}

/// A failed command: its exit code and its last output lines.
pub(crate) struct Exit {
    pub code: i32,
    pub tail: Vec<String>,
}

pub(crate) fn failure(step: StepRef, message: impl Into<String>) -> BuildFailure {
    BuildFailure {
        step,
        message: message.into(),
    }
}

impl<V: Vmm> Builder<V> {
    pub fn say(&self, step: StepRef, level: LogLevel, message: impl Into<String>) {
        (self.log)(BuildLogEntry {
            level,
            step,
            message: message.into(),
        });
    }

    pub fn remaining(&self, step: StepRef) -> Result<std::time::Duration, BuildFailure> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(failure(
                step,
                "the build ran past its deadline; make the steps faster or split the template",
            ));
        }
        Ok(left)
    }

    async fn agent(&self, step: StepRef) -> Result<AgentClient, BuildFailure> {
        let left = self.remaining(step)?;
        match tokio::time::timeout(left, self.node.agent(&self.id)).await {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(e)) => Err(failure(
                step,
                format!("the builder VM's agent is unreachable: {}", error_chain(&e)),
            )),
            Err(_) => Err(failure(
                step,
                "the build ran past its deadline waiting for the builder VM's agent",
            )),
        }
    }

    /// Runs `/bin/sh -c script` as `user` and streams its output lines to the log. `Ok(None)`:
    /// it exited 0.
    pub async fn exec(
        &self,
        step: StepRef,
        script: &str,
        user: &str,
        cwd: Option<&str>,
        env: &BTreeMap<String, String>,
        extra_env: &[(&str, String)],
    ) -> Result<Option<Exit>, BuildFailure> {
        let agent = self.agent(step).await?;
        let mut envs: HashMap<String, String> = env.clone().into_iter().collect();
        for (k, v) in extra_env {
            envs.insert((*k).to_string(), v.clone());
        }
        let start = pb::StartRequest {
            process: Some(pb::ProcessConfig {
                cmd: "/bin/sh".into(),
                args: vec!["-c".into(), script.into()],
                envs,
                cwd: cwd.map(str::to_string),
            }),
            pty: None,
            tag: None,
            stdin: Some(false),
        };
        let opts = CallOptions {
            user: Some(user.to_string()),
            access_token: None,
        };
        let left = self.remaining(step)?;
        let run = async {
            let mut stream: RpcStream<pb::StartResponse> = agent
                .server_stream("process.Start", "/process.Process/Start", &start, &opts)
                .await?;
            let mut lines = Lines::default();
            let mut logged = 0usize;
            loop {
                let Some(msg) = stream.next().await else {
                    return Err(alcove_agent_client::ClientError::StreamEnded(
                        "process.Start",
                    ));
                };
                let Some(event) = msg?.event.and_then(|e| e.event) else {
                    continue;
                };
                match event {
                    process_event::Event::Data(d) => {
                        let (err, bytes) = match d.output {
                            Some(process_event::data_event::Output::Stdout(b)) => (false, b),
                            Some(process_event::data_event::Output::Stderr(b)) => (true, b),
                            Some(process_event::data_event::Output::Pty(b)) => (false, b),
                            None => continue,
                        };
                        for line in lines.push(err, &bytes) {
                            logged += 1;
                            if logged <= MAX_STEP_LINES {
                                self.say(step, LogLevel::Info, line);
                            }
                        }
                    }
                    process_event::Event::End(end) => {
                        for line in lines.finish() {
                            logged += 1;
                            if logged <= MAX_STEP_LINES {
                                self.say(step, LogLevel::Info, line);
                            }
                        }
                        if logged > MAX_STEP_LINES {
                            self.say(
                                step,
                                LogLevel::Warn,
                                format!(
                                    "{} more output lines were not logged",
                                    logged - MAX_STEP_LINES
                                ),
                            );
                        }
                        let code = if end.exited { end.exit_code } else { -1 };
                        return Ok((code, end.status, lines.tail));
                    }
                    process_event::Event::Start(_) | process_event::Event::Keepalive(_) => {}
                }
            }
        };
        let (code, status, tail) = match tokio::time::timeout(left, run).await {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                return Err(failure(
                    step,
                    format!(
                        "running the step in the builder VM failed: {}",
                        error_chain(&e)
                    ),
                ));
            }
            Err(_) => {
                return Err(failure(
                    step,
                    "the step ran past the build's deadline; make it faster or raise the build timeout",
                ));
            }
        };
        if code == 0 {
            return Ok(None);
        }
        let code = if code == -1 && !status.is_empty() {
            tracing::debug!(status, "step ended by a signal");
            -1
        } else {
            code
        };
        Ok(Some(Exit {
            code,
            tail: tail.into_iter().collect(),
        }))
    }

    /// Runs `script` (no `ENV` but `extra_env`) and turns a non-zero exit into the step's failure.
    pub async fn exec_ok(
        &self,
        step: StepRef,
        what: &str,
        script: &str,
        user: &str,
        cwd: Option<&str>,
        extra_env: &[(&str, String)],
    ) -> Result<(), BuildFailure> {
        let env = BTreeMap::new();
        match self.exec(step, script, user, cwd, &env, extra_env).await? {
            None => Ok(()),
            Some(exit) => Err(failure(
                step,
                format!(
                    "{what} exited with {}; last lines:\n{}",
                    exit.code,
                    exit.tail.join("\n")
                ),
            )),
        }
    }

    /// Writes `bytes` to `path` in the guest, as root.
    pub async fn upload(
        &self,
        step: StepRef,
        path: &str,
        bytes: Bytes,
    ) -> Result<(), BuildFailure> {
        let agent = self.agent(step).await?;
        let uri = format!("/files?path={}&username=root", percent(path));
        let body: AgentBody = http_body_util::Full::new(bytes)
            .map_err(|never| match never {})
            .boxed_unsync();
        let req = http::Request::post(uri)
            .header("content-type", "application/octet-stream")
            .body(body)
            .map_err(|e| failure(step, format!("building an upload request: {e}")))?;
        let left = self.remaining(step)?;
        let sent = async {
            let resp = agent.send(req).await?;
            let status = resp.status();
            let body = http_body_util::Limited::new(resp.into_body(), 64 << 10)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            Ok::<_, alcove_agent_client::ClientError>((status, body))
        };
        match tokio::time::timeout(left, sent).await {
            Ok(Ok((status, _))) if status.is_success() => Ok(()),
            Ok(Ok((status, body))) => Err(failure(
                step,
                format!(
                    "the builder VM refused an upload to {path} ({status}): {}",
                    String::from_utf8_lossy(&body).trim()
                ),
            )),
            Ok(Err(e)) => Err(failure(
                step,
                format!(
                    "uploading to {path} in the builder VM failed: {}",
                    error_chain(&e)
                ),
            )),
            Err(_) => Err(failure(step, "an upload ran past the build's deadline")),
        }
    }

    /// Copies the host file `src` to `dest` in the guest (as root, mode 0600), in pieces.
    pub async fn put_file(
        &self,
        step: StepRef,
        src: &Path,
        dest: &str,
    ) -> Result<(), BuildFailure> {
        use tokio::io::AsyncReadExt;
        let mut f = tokio::fs::File::open(src)
            .await
            .map_err(|e| failure(step, format!("reading {}: {e}", src.display())))?;
        let mut parts = Vec::new();
        loop {
            let mut buf = Vec::with_capacity(UPLOAD_PIECE);
            let n = (&mut f)
                .take(UPLOAD_PIECE as u64)
                .read_to_end(&mut buf)
                .await
                .map_err(|e| failure(step, format!("reading {}: {e}", src.display())))?;
            if n == 0 && !parts.is_empty() {
                break;
            }
            let part = format!("{dest}.part{}", parts.len());
            self.upload(step, &part, Bytes::from(buf)).await?;
            parts.push(part);
            if n < UPLOAD_PIECE {
                break;
            }
        }
        let mut extra: Vec<(&str, String)> = vec![("ALCOVE_DEST", dest.to_string())];
        extra.push(("ALCOVE_PARTS", parts.len().to_string()));
        self.exec_ok(
            step,
            "joining the uploaded pieces",
            r#"set -e; umask 077; : > "$ALCOVE_DEST"; i=0; while [ "$i" -lt "$ALCOVE_PARTS" ]; do cat "$ALCOVE_DEST.part$i" >> "$ALCOVE_DEST"; rm -f "$ALCOVE_DEST.part$i"; i=$((i+1)); done"#,
            "root",
            Some("/"),
            &extra,
        )
        .await
    }

    /// `COPY`: the archive `<files_dir>/<files_hash>` unpacked in the guest, the entries matching
    /// `src` placed at `dest` (Docker's rules: a directory's contents go into `dest`; a file goes
    /// into `dest` when it ends in `/`, else becomes `dest`), owned by `owner` with `mode`.
    #[allow(clippy::too_many_arguments)]
    pub async fn copy(
        &self,
        step: StepRef,
        archive: &Path,
        src: &str,
        dest: &str,
        owner: Option<&str>,
        mode: Option<u32>,
        state: &StepState,
    ) -> Result<(), BuildFailure> {
        let tmp = format!(
            "/tmp/.alcove-copy-{}",
            hex::encode(crate::node::random_bytes::<8>())
        );
        self.put_file(step, archive, &tmp).await?;
        let dest = match (&state.workdir, dest.starts_with('/')) {
            (_, true) => dest.to_string(),
            (Some(w), false) => format!("{}/{dest}", w.trim_end_matches('/')),
            (None, false) => dest.to_string(),
        };
        let owner = owner.unwrap_or(&state.user).to_string();
        let extra = vec![
            ("ALCOVE_ARCHIVE", tmp),
            ("ALCOVE_SRC", src.to_string()),
            ("ALCOVE_DEST", dest),
            ("ALCOVE_OWNER", owner),
            (
                "ALCOVE_MODE",
                mode.map(|m| format!("{m:o}")).unwrap_or_default(),
            ),
        ];
        self.exec_ok(step, "COPY", COPY_SCRIPT, "root", Some("/"), &extra)
            .await
    }
}

/// Runs as root in the guest. Inputs in the environment, never in the script's text.
const COPY_SCRIPT: &str = r#"set -e
T=$(mktemp -d /tmp/.alcove-copy-XXXXXX)
trap 'rm -rf "$T" "$ALCOVE_ARCHIVE"' EXIT
tar -xf "$ALCOVE_ARCHIVE" -C "$T" --no-same-owner --no-same-permissions
rm -f "$ALCOVE_ARCHIVE"
U=${ALCOVE_OWNER%%:*}
G=${ALCOVE_OWNER#*:}
[ "$G" != "$ALCOVE_OWNER" ] || G=$(id -gn "$U")
id -u "$U" >/dev/null || { echo "COPY: no user $U in the template" >&2; exit 1; }
# A relative destination without a WORKDIR is relative to the owner's home.
case "$ALCOVE_DEST" in /*) ;; *) ALCOVE_DEST="$(getent passwd "$U" | cut -d: -f6)/$ALCOVE_DEST" ;; esac
case "$ALCOVE_SRC" in ""|.|./) ALCOVE_SRC=. ;; esac
n=0
for m in "$T"/$ALCOVE_SRC; do
  [ -e "$m" ] || [ -L "$m" ] || continue
  n=$((n+1))
done
[ "$n" -gt 0 ] || { echo "COPY: nothing in the uploaded files matches '$ALCOVE_SRC'" >&2; exit 1; }
for m in "$T"/$ALCOVE_SRC; do
  [ -e "$m" ] || [ -L "$m" ] || continue
  if [ -d "$m" ] && [ ! -L "$m" ]; then
    mkdir -p "$ALCOVE_DEST"
    tar -C "$m" -cf - --owner="$U" --group="$G" ${ALCOVE_MODE:+--mode=$ALCOVE_MODE} . | tar -xpf - --same-owner -C "$ALCOVE_DEST"
  else
    case "$ALCOVE_DEST" in
      */) dir=$ALCOVE_DEST; name=$(basename "$m") ;;
      *) if [ "$n" -gt 1 ] || [ -d "$ALCOVE_DEST" ]; then dir=$ALCOVE_DEST; name=$(basename "$m"); else dir=$(dirname "$ALCOVE_DEST"); name=$(basename "$ALCOVE_DEST"); fi ;;
    esac
    mkdir -p "$dir"
    cp -P "$m" "$dir/$name"
    chown -h "$U:$G" "$dir/$name"
    [ -z "$ALCOVE_MODE" ] || [ -L "$dir/$name" ] || chmod "$ALCOVE_MODE" "$dir/$name"
  fi
done
"#;

/// Minimal percent-encoding for a query value.
fn percent(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Splits a process's output into lines (stdout and stderr apart), each at most [`MAX_LINE`]
/// bytes, and keeps the last few for a failure message.
#[derive(Default)]
pub(crate) struct Lines {
    out: Vec<u8>,
    err: Vec<u8>,
    pub tail: VecDeque<String>,
}

impl Lines {
    pub fn push(&mut self, stderr: bool, bytes: &[u8]) -> Vec<String> {
        let buf = if stderr { &mut self.err } else { &mut self.out };
        buf.extend_from_slice(bytes);
        let mut lines = Vec::new();
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            lines.push(cut(&line[..line.len() - 1]));
        }
        if buf.len() > MAX_LINE {
            let line: Vec<u8> = std::mem::take(buf);
            lines.push(cut(&line));
        }
        for l in &lines {
            self.keep(l.clone());
        }
        lines
    }

    pub fn finish(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        for buf in [&mut self.out, &mut self.err] {
            if !buf.is_empty() {
                lines.push(cut(&std::mem::take(buf)));
            }
        }
        for l in &lines {
            self.keep(l.clone());
        }
        lines
    }

    fn keep(&mut self, line: String) {
        self.tail.push_back(line);
        if self.tail.len() > TAIL_LINES {
            self.tail.pop_front();
        }
    }
}

fn cut(line: &[u8]) -> String {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.len() <= MAX_LINE {
        return String::from_utf8_lossy(line).into_owned();
    }
    let mut s = String::from_utf8_lossy(&line[..MAX_LINE]).into_owned();
    s.push_str(" …(cut)");
    s
}

/// The uploaded archive of a `COPY`: `<files_dir>/<files_hash>`, checked to be a plain file
/// under the cap. The hash names a file, so it must look like one.
pub(crate) fn archive_path(
    files_dir: &Path,
    files_hash: &str,
    step: StepRef,
) -> Result<PathBuf, BuildFailure> {
    if files_hash.is_empty()
        || files_hash.len() > 128
        || !files_hash
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(failure(
            step,
            format!(
                "COPY names files `{files_hash}`, which is not a files hash; upload the files with GET /templates/{{templateID}}/files/{{hash}} first"
            ),
        ));
    }
    let path = files_dir.join(files_hash);
    let meta = std::fs::symlink_metadata(&path).map_err(|_| {
        failure(
            step,
            format!("the files of COPY (hash {files_hash}) were never uploaded; upload them to the URL GET /templates/{{templateID}}/files/{files_hash} gives, then build again"),
        )
    })?;
    if !meta.is_file() {
        return Err(failure(
            step,
            format!("the upload {files_hash} is not a plain file"),
        ));
    }
    if meta.len() > MAX_COPY_BYTES {
        return Err(failure(
            step,
            format!(
                "the files of COPY (hash {files_hash}) are {} bytes, over the {} byte cap; copy less or fetch big files in a RUN step",
                meta.len(),
                MAX_COPY_BYTES
            ),
        ));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_per_stream_cut_and_kept_for_the_tail() {
        let mut l = Lines::default();
        assert_eq!(l.push(false, b"a\nb"), ["a"]);
        assert_eq!(l.push(true, b"e1\r\n"), ["e1"]);
        assert_eq!(l.push(false, b"c\n"), ["bc"]);
        let long = vec![b'x'; MAX_LINE + 10];
        let got = l.push(false, &long);
        assert_eq!(got.len(), 1);
        assert!(got[0].ends_with("…(cut)"));
        assert_eq!(l.push(false, b"tail"), Vec::<String>::new());
        assert_eq!(l.finish(), ["tail"]);
        for i in 0..40 {
            l.push(false, format!("{i}\n").as_bytes());
        }
        assert_eq!(l.tail.len(), TAIL_LINES);
        assert_eq!(l.tail.back().map(String::as_str), Some("39"));
    }

    #[test]
    fn archives_must_be_uploaded_plain_files_named_by_a_hash() {
        let dir = tempfile::tempdir().unwrap();
        let s = StepRef::Step(2);
        let e = archive_path(dir.path(), "../etc/passwd", s).unwrap_err();
        assert_eq!(e.step, s);
        assert!(e.message.contains("not a files hash"));
        let e = archive_path(dir.path(), "abc", s).unwrap_err();
        assert!(e.message.contains("abc") && e.message.contains("never uploaded"));
        std::fs::write(dir.path().join("abc"), b"x").unwrap();
        assert_eq!(
            archive_path(dir.path(), "abc", s).unwrap(),
            dir.path().join("abc")
        );
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("lnk")).unwrap();
        assert!(archive_path(dir.path(), "lnk", s).is_err());
        assert_eq!(percent("/tmp/a b"), "/tmp/a%20b");
    }
}

//! The state a build carries from step to step (`USER`, `WORKDIR`, `ENV`), and the layer-cache
//! keys that follow from it. Pure: no VM, no files; the step runner and the cache use it.
//!
//! Keys chain: a step's key hashes the key before it, the step as JSON, the state the step runs
//! in and, for `COPY`, the SHA-256 of the uploaded archive. So a changed step, state or file
//! changes its own key and every later one, and an unchanged prefix keeps its keys.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::spec::{Step, StepKind};

/// Bumped when the meaning of a cached layer changes (how steps run, what finalize writes).
const KEY_VERSION: &str = "alcove-build-v1";

/// What the next step runs with, and what the template's processes get by default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepState {
    pub user: String,
    /// `None`: the user's home.
    pub workdir: Option<String>,
    pub env: BTreeMap<String, String>,
}

impl Default for StepState {
    fn default() -> Self {
        StepState {
            user: "user".into(),
            workdir: None,
            env: BTreeMap::new(),
        }
    }
}

impl StepState {
    /// The state after `step`: `ENV`, `WORKDIR` and `USER` change it, `RUN` and `COPY` do not.
    pub fn after(&self, step: &StepKind) -> StepState {
        let mut next = self.clone();
        match step {
            StepKind::Env { vars } => {
                for (k, v) in vars {
                    next.env.insert(k.clone(), v.clone());
                }
            }
            StepKind::Workdir { path } => {
                next.workdir = Some(resolve_workdir(self.workdir.as_deref(), path));
            }
            StepKind::User { user } => next.user = user.clone(),
            StepKind::Run { .. } | StepKind::Copy { .. } => {}
        }
        next
    }
}

/// A `WORKDIR` relative to the current one (as Docker): `/a` + `b` is `/a/b`.
fn resolve_workdir(current: Option<&str>, path: &str) -> String {
    if path.starts_with('/') {
        return path.to_string();
    }
    let base = current.unwrap_or("/");
    format!("{}/{}", base.trim_end_matches('/'), path)
}

/// Whether a step changes the disk (and so ends in a cached layer).
pub fn makes_layer(step: &StepKind) -> bool {
    matches!(step, StepKind::Run { .. } | StepKind::Copy { .. })
}

/// The key of the state a build starts from: its parent template's key (or an image's).
pub fn base_key(parent: &str) -> String {
    let mut h = Sha256::new();
    h.update(KEY_VERSION);
    h.update(b"\0parent\0");
    h.update(parent);
    hex::encode(h.finalize())
}

/// The key of the layer after `step`, run in `state` on the layer `prev`. `file_sha256` is the
/// SHA-256 of a `COPY`'s archive.
pub fn step_key(prev: &str, step: &Step, state: &StepState, file_sha256: Option<&str>) -> String {
    let mut h = Sha256::new();
    h.update(KEY_VERSION);
    h.update(b"\0step\0");
    h.update(prev);
    // `force` says how to run a step, not what it makes.
    h.update(serde_json::to_vec(&step.kind).expect("serialises"));
    h.update(serde_json::to_vec(state).expect("serialises"));
    h.update(file_sha256.unwrap_or(""));
    hex::encode(h.finalize())
}

/// The key of the finalized layer: the last step's plus what finalize writes into the guest.
pub fn finalize_key(prev: &str, template_json: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(KEY_VERSION);
    h.update(b"\0finalize\0");
    h.update(prev);
    h.update(template_json);
    hex::encode(h.finalize())
}

/// The template's key: the finalized layer and the machine its VMs get. 32 hex characters, so
/// it never collides with a recipe build's 16.
pub fn template_key(finalized: &str, vcpus: u32, memory_mib: u32, nonce: Option<&str>) -> String {
    let mut h = Sha256::new();
    h.update(KEY_VERSION);
    h.update(b"\0template\0");
    h.update(finalized);
    h.update(vcpus.to_le_bytes());
    h.update(memory_mib.to_le_bytes());
    h.update(nonce.unwrap_or(""));
    hex::encode(&h.finalize()[..16])
}

/// `/etc/alcove/template.json` for the final state (the agent's format, see
/// `bin/alcove-agent/src/template.rs`).
pub fn template_json(
    state: &StepState,
    start_cmd: Option<&str>,
    ready_cmd: Option<&str>,
) -> Vec<u8> {
    let cfg = serde_json::json!({
        "start_cmd": start_cmd,
        "ready_cmd": ready_cmd,
        "envs": state.env,
        "user": state.user,
        "workdir": state.workdir,
    });
    serde_json::to_vec_pretty(&cfg).expect("serialises")
}

/// Quotes `words` for `/bin/sh` (an image's `ENTRYPOINT` + `CMD` as one start command).
pub fn shell_join(words: &[String]) -> String {
    words
        .iter()
        .map(|w| format!("'{}'", w.replace('\'', "'\\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(cmd: &str) -> Step {
        Step {
            kind: StepKind::Run {
                cmd: cmd.into(),
                user: None,
            },
            force: false,
        }
    }

    fn copy(hash: &str) -> Step {
        Step {
            kind: StepKind::Copy {
                files_hash: hash.into(),
                src: "a".into(),
                dest: "/a".into(),
                owner: None,
                mode: None,
            },
            force: false,
        }
    }

    /// Keys of every step of `steps`, with `files` giving each COPY's archive hash.
    fn keys(steps: &[Step], files: &dyn Fn(&str) -> String) -> Vec<String> {
        let mut k = base_key("parent");
        let mut state = StepState::default();
        let mut out = Vec::new();
        for s in steps {
            let f = match &s.kind {
                StepKind::Copy { files_hash, .. } => Some(files(files_hash)),
                _ => None,
            };
            k = step_key(&k, s, &state, f.as_deref());
            state = state.after(&s.kind);
            out.push(k.clone());
        }
        out
    }

    #[test]
    fn a_changed_step_changes_its_key_and_every_later_one_only() {
        let env = Step {
            kind: StepKind::Env {
                vars: vec![("A".into(), "1".into())],
            },
            force: false,
        };
        let a = [run("one"), copy("h"), env.clone(), run("three")];
        let same = |h: &str| format!("sha-of-{h}");
        let base = keys(&a, &same);
        assert_eq!(base, keys(&a, &same), "keys are deterministic");
        // Every key differs from every other.
        let set: std::collections::HashSet<_> = base.iter().collect();
        assert_eq!(set.len(), base.len());

        let mut b = a.clone();
        b[1] = copy("h2");
        let changed = keys(&b, &same);
        assert_eq!(changed[0], base[0]);
        for i in 1..4 {
            assert_ne!(changed[i], base[i], "step {i}");
        }

        // The same step, another archive content: changed from there on.
        let other_bytes = |h: &str| format!("other-sha-of-{h}");
        let changed = keys(&a, &other_bytes);
        assert_eq!(changed[0], base[0]);
        assert!((1..4).all(|i| changed[i] != base[i]));

        // The last step edited: only its key changes.
        let mut c = a.clone();
        c[3] = run("three!");
        let changed = keys(&c, &same);
        assert_eq!(changed[..3], base[..3]);
        assert_ne!(changed[3], base[3]);

        // An ENV before a RUN changes the RUN's key (it runs in another state).
        let mut d = a.clone();
        d[2] = Step {
            kind: StepKind::Env {
                vars: vec![("A".into(), "2".into())],
            },
            force: false,
        };
        let changed = keys(&d, &same);
        assert_eq!(changed[..2], base[..2]);
        assert_ne!(changed[3], base[3]);

        // `force` is not part of the key.
        let mut e = a.clone();
        e[0].force = true;
        assert_eq!(keys(&e, &same), base);

        // Another parent: every key differs.
        assert_ne!(base_key("p1"), base_key("p2"));
    }

    #[test]
    fn finalize_and_template_keys_follow_their_inputs() {
        let f = finalize_key("k", b"{}");
        assert_ne!(f, finalize_key("k", b"{\"start_cmd\":\"x\"}"));
        assert_ne!(f, finalize_key("k2", b"{}"));
        let t = template_key(&f, 2, 512, None);
        assert_eq!(t.len(), 32);
        assert_eq!(t, template_key(&f, 2, 512, None));
        assert_ne!(t, template_key(&f, 1, 512, None));
        assert_ne!(t, template_key(&f, 2, 1024, None));
        assert_ne!(t, template_key(&f, 2, 512, Some("build-1")));
    }

    #[test]
    fn the_state_machine_follows_env_workdir_and_user() {
        let s = StepState::default();
        assert_eq!(s.user, "user");
        assert_eq!(s.workdir, None);
        let s = s.after(&StepKind::Env {
            vars: vec![("A".into(), "1".into()), ("B".into(), "2".into())],
        });
        let s = s.after(&StepKind::Env {
            vars: vec![("A".into(), "3".into())],
        });
        assert_eq!(s.env["A"], "3");
        assert_eq!(s.env["B"], "2");
        let s = s.after(&StepKind::Workdir { path: "app".into() });
        assert_eq!(s.workdir.as_deref(), Some("/app"));
        let s = s.after(&StepKind::Workdir { path: "src".into() });
        assert_eq!(s.workdir.as_deref(), Some("/app/src"));
        let s = s.after(&StepKind::Workdir {
            path: "/srv/".into(),
        });
        assert_eq!(s.workdir.as_deref(), Some("/srv/"));
        let s2 = s.after(&StepKind::Workdir { path: "x".into() });
        assert_eq!(s2.workdir.as_deref(), Some("/srv/x"));
        let s = s.after(&StepKind::User {
            user: "root".into(),
        });
        assert_eq!(s.user, "root");
        // RUN and COPY leave it alone.
        assert_eq!(s.after(&run("x").kind), s);
        assert_eq!(s.after(&copy("h").kind), s);
        assert!(makes_layer(&run("x").kind) && makes_layer(&copy("h").kind));
        assert!(!makes_layer(&StepKind::User { user: "u".into() }));
    }

    #[test]
    fn template_json_is_what_the_agent_reads() {
        let mut s = StepState::default();
        s.env.insert("A".into(), "1".into());
        s.workdir = Some("/app".into());
        let v: serde_json::Value =
            serde_json::from_slice(&template_json(&s, Some("serve"), None)).unwrap();
        assert_eq!(v["start_cmd"], "serve");
        assert!(v["ready_cmd"].is_null());
        assert_eq!(v["envs"]["A"], "1");
        assert_eq!(v["user"], "user");
        assert_eq!(v["workdir"], "/app");
        assert_eq!(
            shell_join(&["a b".into(), "it's".into()]),
            "'a b' 'it'\\''s'"
        );
    }
}

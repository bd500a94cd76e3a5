//! The warm pool: sandboxes of a template restored ahead of demand, so a create hands one over
//! instead of restoring a VM while the caller waits.
//!
//! A warm VM is restored from the template's snapshot exactly as a create would restore it, in
//! its own network namespace and cgroup, and then runs a fixed warm-up through its agent: the
//! `/init` a claim sends (with the VM's own id and no token), a login shell as `user`,
//! `/bin/echo` as root and as `user`, a temp file written, read and removed. Under TCG that warm-up is most of a create's cost (translating the guest's
//! code in a new QEMU process); under KVM it is cheap and the pool still saves the restore.
//!
//! Warm VMs run at the lowest CPU weight, and refills start once creates pause (1.5 s without
//! one, or 5 s short of the target under a steady stream), so refilling does not slow the
//! sandboxes in use, the new ones' first commands above all; a claim restores the weight.
//!
//! When a create claims a warm VM, the VM gets the sandbox's identity through `/init` (id,
//! hostname, env vars, access token, another 64 bytes of entropy, the clock) and its egress
//! rules start being served. No user input reaches a warm VM before that: its network
//! namespace has no route, and its proxy sockets are not served until the claim.
//!
//! Warm VMs are not sandboxes: they are not listed, not counted against the node's sandbox
//! limit, and never survive their process. Their records say `pooled` and name the owning
//! process; [`crate::Node::open`] kills and removes those whose owner is gone (it died without
//! draining its pool) and leaves a live server's pool alone (a CLI command on the same data dir).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use alcove_agent_client::{AgentClient, RunRequest};
use alcove_vmm::{Vm, Vmm};

use crate::host::EgressSockets;
use serde::Serialize;

use crate::NodeError;
use crate::node::Node;

/// CPU weight of warm VMs until claimed (100 is a sandbox's): filling the pool takes only what
/// sandboxes in use leave of the host's cores.
pub(crate) const WARM_CPU_WEIGHT: u32 = 1;
/// How long after a create the pool waits before it warms a VM...
const REFILL_DELAY: Duration = Duration::from_millis(1500);
/// ...unless it has been short of its target this long.
const MAX_REFILL_WAIT: Duration = Duration::from_secs(5);
/// How long a failed fill waits before the pool tries that template again.
const RETRY_AFTER: Duration = Duration::from_secs(10);
/// Bound on one warm-up command.
const WARM_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// A restored, warmed VM waiting to become a sandbox.
pub(crate) struct WarmVm<M> {
    pub dir: PathBuf,
    pub vm: M,
    pub agent: AgentClient,
    pub listeners: EgressSockets,
    pub template_key: String,
}

/// One template's pool, as [`Node::warm_pool`] reports it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct WarmPoolStatus {
    pub template: String,
    /// VMs the pool keeps ready.
    pub target: usize,
    /// VMs ready now.
    pub ready: usize,
    /// Creates served from the pool since this process started.
    pub hits: u64,
    /// Creates of this template that found the pool empty and restored a VM themselves.
    pub misses: u64,
    /// Why the last fill failed, while fills keep failing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

struct Entry<M> {
    target: usize,
    ready: VecDeque<WarmVm<M>>,
    hits: u64,
    misses: u64,
    last_error: Option<String>,
    retry_at: Option<Instant>,
    /// Since when the pool has had fewer VMs than its target.
    short_since: Option<Instant>,
}

impl<M> Default for Entry<M> {
    fn default() -> Self {
        Entry {
            target: 0,
            ready: VecDeque::new(),
            hits: 0,
            misses: 0,
            last_error: None,
            retry_at: None,
            short_since: None,
        }
    }
}

pub(crate) struct Pool<M> {
    entries: Mutex<BTreeMap<String, Entry<M>>>,
    /// When a create last took from (or missed) a pool.
    last_take: Mutex<Option<Instant>>,
    wake: Arc<tokio::sync::Notify>,
    filler: Mutex<Option<tokio::task::AbortHandle>>,
}

impl<M> Default for Pool<M> {
    fn default() -> Self {
        Pool {
            entries: Mutex::default(),
            last_take: Mutex::default(),
            wake: Arc::default(),
            filler: Mutex::default(),
        }
    }
}

impl<M: Vm> Pool<M> {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Entry<M>>> {
        self.entries.lock().expect("pool lock")
    }

    pub(crate) fn stop_filling(&self) {
        if let Some(h) = self.filler.lock().expect("filler lock").take() {
            h.abort();
        }
    }

    /// SIGKILLs every warm VM at once, without waiting (the node is being dropped). Their dirs
    /// stay; the next [`Node::open`] of the data dir removes them and their cgroups.
    pub(crate) fn kill_now(&self) {
        for e in self.lock().values_mut() {
            for w in e.ready.drain(..) {
                let pid = nix::unistd::Pid::from_raw(w.vm.pid() as i32);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
        }
    }

    /// A warm VM of `template` whose build is `key`, if one is ready; stale ones (another build,
    /// or a VM that died while waiting) are handed back for killing.
    #[allow(clippy::type_complexity)]
    pub(crate) fn take(&self, template: &str, key: &str) -> (Option<WarmVm<M>>, Vec<WarmVm<M>>) {
        let mut stale = Vec::new();
        *self.last_take.lock().expect("last take lock") = Some(Instant::now());
        let mut pools = self.lock();
        let Some(e) = pools.get_mut(template) else {
            return (None, stale);
        };
        while let Some(w) = e.ready.pop_front() {
            if w.template_key == key && w.vm.exit_reason().is_none() && !w.agent.is_closed() {
                e.hits += 1;
                drop(pools);
                self.wake.notify_one();
                return (Some(w), stale);
            }
            stale.push(w);
        }
        if e.target > 0 {
            e.misses += 1;
        }
        drop(pools);
        self.wake.notify_one();
        (None, stale)
    }
}

impl<V: Vmm> Node<V> {
    /// Keeps `size` warm VMs of `template` ready (0 empties its pool). Filling happens in the
    /// background, one VM at a time; creates of that template take from the pool when it has one.
    pub fn set_warm_pool(self: &Arc<Self>, template: &str, size: usize) {
        let surplus: Vec<WarmVm<V::Vm>> = {
            let mut pools = self.pool.lock();
            let e = pools.entry(template.to_string()).or_default();
            e.target = size;
            e.retry_at = None;
            let keep = e.ready.len().min(size);
            e.ready.drain(keep..).collect()
        };
        discard(surplus);
        let mut filler = self.pool.filler.lock().expect("filler lock");
        if filler.as_ref().is_none_or(|h| h.is_finished()) {
            let weak = Arc::downgrade(self);
            let wake = self.pool.wake.clone();
            *filler = Some(tokio::spawn(fill(weak, wake)).abort_handle());
        }
        self.pool.wake.notify_one();
    }

    /// Every template with a pool: target, ready VMs, hits and misses.
    pub fn warm_pool(&self) -> Vec<WarmPoolStatus> {
        self.pool
            .lock()
            .iter()
            .map(|(t, e)| WarmPoolStatus {
                template: t.clone(),
                target: e.target,
                ready: e.ready.len(),
                hits: e.hits,
                misses: e.misses,
                last_error: e.last_error.clone(),
            })
            .collect()
    }

    /// Waits until every pool holds its target, or `limit` passes; true when full.
    pub async fn wait_warm_pool(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.warm_pool().iter().all(|p| p.ready >= p.target) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops filling and kills every warm VM (on shutdown).
    pub async fn drain_warm_pool(&self) {
        self.pool.stop_filling();
        let all: Vec<WarmVm<V::Vm>> = {
            let mut pools = self.pool.lock();
            pools
                .values_mut()
                .flat_map(|e| {
                    e.target = 0;
                    e.ready.drain(..).collect::<Vec<_>>()
                })
                .collect()
        };
        for w in all {
            kill_warm(w).await;
        }
        // A VM the stopped filler was warming has a dir and maybe a process, and no entry.
        for dir in self.pooled_dirs(std::process::id()) {
            self.remove_pooled_dir(&dir).await;
        }
    }

    /// Restores one VM of `template` and warms it up.
    async fn warm_one(self: &Arc<Self>, template: &str) -> Result<WarmVm<V::Vm>, NodeError> {
        let t = self.template(template)?;
        let check = t.clone();
        crate::node::blocking(move || check.verify_state()).await?;
        let vm_id = crate::node::new_sandbox_id();
        let dir = self.config().data_dir.join("sandboxes").join(&vm_id);
        crate::private::create_dir(&dir)
            .map_err(|e| NodeError::Io(dir.display().to_string(), e))?;
        let mut started: Option<V::Vm> = None;
        let result = async {
            let (vm, agent, listeners) = self.restore_pooled(&t, &vm_id, &dir).await?;
            started = Some(vm.clone());
            crate::create::within_vm(&vm, &vm_id, WARM_COMMAND_TIMEOUT, warm_up(&agent)).await?;
            Ok::<_, NodeError>(WarmVm {
                dir: dir.clone(),
                vm,
                agent,
                listeners,
                template_key: t.key.clone(),
            })
        }
        .await;
        if result.is_err() {
            if let Some(vm) = started {
                vm.kill().await;
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
        result
    }
}

/// What a warm VM runs before anyone claims it: the paths a first create and command take.
async fn warm_up(agent: &AgentClient) -> Result<(), NodeError> {
    let run = |cmd: &str, args: &[&str], user: &str| RunRequest {
        cmd: cmd.to_string(),
        args: args.iter().map(|s| s.to_string()).collect(),
        user: Some(user.to_string()),
        timeout: Some(WARM_COMMAND_TIMEOUT),
        ..Default::default()
    };
    let steps = [
        run("/bin/bash", &["-l", "-c", "true"], "user"),
        run("/bin/echo", &["ok"], "root"),
        run("/bin/echo", &["ok"], "user"),
        run(
            "/bin/sh",
            &[
                "-c",
                "f=$(mktemp) && echo warm > \"$f\" && cat \"$f\" >/dev/null && rm \"$f\"",
            ],
            "user",
        ),
    ];
    for step in steps {
        let what = format!("{} {}", step.cmd, step.args.join(" "));
        let out = agent.run(step).await?;
        if out.exit_code != 0 {
            return Err(NodeError::Io(
                "warm-up".into(),
                std::io::Error::other(format!(
                    "`{what}` exited with {}: {}",
                    out.exit_code,
                    String::from_utf8_lossy(&out.stderr).trim()
                )),
            ));
        }
    }
    Ok(())
}

/// The pool's background task: keeps every pool at its target, one VM at a time.
async fn fill<V: Vmm>(node: Weak<Node<V>>, wake: Arc<tokio::sync::Notify>) {
    loop {
        let wanted = {
            let Some(node) = node.upgrade() else { return };
            let now = Instant::now();
            let mut pools = node.pool.lock();
            for e in pools.values_mut() {
                if e.ready.len() >= e.target {
                    e.short_since = None;
                } else if e.short_since.is_none() {
                    e.short_since = Some(now);
                }
            }
            let last_take = *node.pool.last_take.lock().expect("last take lock");
            pools
                .iter()
                .find(|(_, e)| e.ready.len() < e.target && e.retry_at.is_none_or(|t| t <= now))
                .map(|(t, e)| (t.clone(), e.short_since.unwrap_or(now), last_take))
        };
        let Some((template, short_since, last_take)) = wanted else {
            // Woken by a take, a new target, or the next retry time.
            let _ = tokio::time::timeout(RETRY_AFTER, wake.notified()).await;
            continue;
        };
        // New sandboxes' first commands come right after their creates: let them have the cores
        // until creates pause, but under a steady stream of creates refill anyway.
        let quiet = last_take.and_then(|t| REFILL_DELAY.checked_sub(t.elapsed()));
        let overdue = MAX_REFILL_WAIT.checked_sub(short_since.elapsed());
        if let (Some(quiet), Some(overdue)) = (quiet, overdue) {
            tokio::time::sleep(quiet.min(overdue)).await;
            continue;
        }
        let Some(n) = node.upgrade() else { return };
        let t0 = Instant::now();
        let result = n.warm_one(&template).await;
        let mut pools = n.pool.lock();
        let e = pools.entry(template.clone()).or_default();
        match result {
            Ok(w) if e.ready.len() < e.target => {
                tracing::info!(
                    template,
                    ms = t0.elapsed().as_millis() as u64,
                    "warm VM ready"
                );
                e.last_error = None;
                e.ready.push_back(w);
            }
            Ok(w) => {
                // The target shrank meanwhile.
                drop(pools);
                discard(vec![w]);
            }
            Err(err) => {
                let text = crate::node::error_chain(&err);
                tracing::warn!(template, error = %text, "could not warm a VM; trying again in {RETRY_AFTER:?}");
                e.last_error = Some(text);
                e.retry_at = Some(Instant::now() + RETRY_AFTER);
            }
        }
    }
}

/// Kills warm VMs nobody will claim, in the background.
pub(crate) fn discard<M: Vm>(vms: Vec<WarmVm<M>>) {
    if vms.is_empty() {
        return;
    }
    tokio::spawn(async move {
        for w in vms {
            kill_warm(w).await;
        }
    });
}

async fn kill_warm<M: Vm>(w: WarmVm<M>) {
    w.vm.kill().await;
    drop(w.listeners);
    let _ = std::fs::remove_dir_all(&w.dir);
}

/// Parses `--warm-pool` values: `TEMPLATE=N`, comma-separated.
pub fn parse_warm_pool(spec: &str) -> Result<HashMap<String, usize>, String> {
    let mut out = HashMap::new();
    for part in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, n) = part
            .split_once('=')
            .ok_or_else(|| format!("`{part}`: expected TEMPLATE=COUNT, e.g. base=2"))?;
        let n: usize = n
            .trim()
            .parse()
            .map_err(|_| format!("`{part}`: the count must be a whole number"))?;
        if n > 200 {
            return Err(format!("`{part}`: at most 200 warm VMs per template"));
        }
        out.insert(name.trim().to_string(), n);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_pool_specs_parse() {
        let p = parse_warm_pool("base=2, code-interpreter-v1=1").unwrap();
        assert_eq!(p["base"], 2);
        assert_eq!(p["code-interpreter-v1"], 1);
        assert!(parse_warm_pool("").unwrap().is_empty());
        assert!(
            parse_warm_pool("base")
                .unwrap_err()
                .contains("TEMPLATE=COUNT")
        );
        assert!(
            parse_warm_pool("base=x")
                .unwrap_err()
                .contains("whole number")
        );
        assert!(parse_warm_pool("base=201").unwrap_err().contains("at most"));
    }
}

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
//! one), or while creates keep coming if the host's CPUs have room (at most 70 % busy over the
//! last quarter second; 5 s short of the target refills anyway), so refilling does not slow the
//! sandboxes in use, the new ones' first commands above all; a claim restores the weight.
//!
//! Each pool's size follows demand between the operator's minimum and maximum: it holds about
//! five seconds' worth of the creates of the last 30 s, and falls back to the minimum (the
//! surplus killed) once 30 s pass without a create. Two fillers make warm VMs, one each at a
//! time.
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
/// How far back a pool counts creates to size itself; this long without one, it shrinks back
/// to its minimum.
const DEMAND_WINDOW: Duration = Duration::from_secs(30);
/// Seconds of recent demand a pool keeps ready (3 creates a second: 15 VMs, up to its maximum).
const DEMAND_HORIZON_SECS: f64 = 5.0;
/// While creates keep coming, a refill starts only if the host's CPUs were at most this busy
/// over [`CPU_SAMPLE`] (a burst of creates keeps them busy; a sequential client leaves room).
const FILL_CPU_BUDGET: f64 = 0.7;
const CPU_SAMPLE: Duration = Duration::from_millis(250);
/// Warm VMs being made at once, at most (each filler makes one at a time).
const FILLERS: usize = 2;

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
    /// VMs the pool keeps ready now, between `min` and `max` as demand goes.
    pub target: usize,
    /// The operator's floor and ceiling of `target`.
    pub min: usize,
    pub max: usize,
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
    min: usize,
    max: usize,
    /// Creates of this template (hits and misses) within the last [`DEMAND_WINDOW`].
    takes: VecDeque<Instant>,
    ready: VecDeque<WarmVm<M>>,
    hits: u64,
    misses: u64,
    last_error: Option<String>,
    retry_at: Option<Instant>,
    /// Since when the pool has had fewer VMs than its target.
    short_since: Option<Instant>,
    /// Warm VMs being made now.
    filling: usize,
}

impl<M> Entry<M> {
    /// The target for the demand seen up to `now`: the creates of the last [`DEMAND_WINDOW`]
    /// as a rate (over at least a second), times [`DEMAND_HORIZON_SECS`], within `min..=max`.
    fn sized(&mut self, now: Instant) -> usize {
        while self
            .takes
            .front()
            .is_some_and(|t| now.duration_since(*t) > DEMAND_WINDOW)
        {
            self.takes.pop_front();
        }
        let want = match self.takes.front() {
            None => 0,
            Some(first) => {
                let span = now.duration_since(*first).as_secs_f64().max(1.0);
                (self.takes.len() as f64 / span * DEMAND_HORIZON_SECS).ceil() as usize
            }
        };
        want.clamp(self.min, self.max.max(self.min))
    }
}

impl<M> Default for Entry<M> {
    fn default() -> Self {
        Entry {
            target: 0,
            min: 0,
            max: 0,
            takes: VecDeque::new(),
            ready: VecDeque::new(),
            hits: 0,
            misses: 0,
            last_error: None,
            retry_at: None,
            short_since: None,
            filling: 0,
        }
    }
}

pub(crate) struct Pool<M> {
    entries: Mutex<BTreeMap<String, Entry<M>>>,
    /// When a create last took from (or missed) a pool.
    last_take: Mutex<Option<Instant>>,
    wake: Arc<tokio::sync::Notify>,
    filler: Mutex<Vec<tokio::task::AbortHandle>>,
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
        for h in self.filler.lock().expect("filler lock").drain(..) {
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
        let now = Instant::now();
        *self.last_take.lock().expect("last take lock") = Some(now);
        let mut pools = self.lock();
        let Some(e) = pools.get_mut(template) else {
            return (None, stale);
        };
        e.takes.push_back(now);
        if e.takes.len() > 10_000 {
            e.takes.pop_front();
        }
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
        self.set_warm_pool_range(template, size, size);
    }

    /// Keeps between `min` and `max` warm VMs of `template` ready, as many as recent creates
    /// call for (see the module's documentation).
    pub fn set_warm_pool_range(self: &Arc<Self>, template: &str, min: usize, max: usize) {
        let surplus: Vec<WarmVm<V::Vm>> = {
            let mut pools = self.pool.lock();
            let e = pools.entry(template.to_string()).or_default();
            e.min = min;
            e.max = max.max(min);
            e.target = e.sized(Instant::now());
            e.retry_at = None;
            let keep = e.ready.len().min(e.target);
            e.ready.drain(keep..).collect()
        };
        discard(surplus);
        let mut filler = self.pool.filler.lock().expect("filler lock");
        filler.retain(|h| !h.is_finished());
        while filler.len() < FILLERS {
            let weak = Arc::downgrade(self);
            let wake = self.pool.wake.clone();
            filler.push(tokio::spawn(fill(weak, wake)).abort_handle());
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
                min: e.min,
                max: e.max,
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
                    (e.target, e.min, e.max) = (0, 0, 0);
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

    /// Restores one VM of `template` and warms it up, in the restore `_turn` it was given.
    async fn warm_one(
        self: &Arc<Self>,
        template: &str,
        _turn: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<WarmVm<V::Vm>, NodeError> {
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
            let mut surplus = Vec::new();
            for (t, e) in pools.iter_mut() {
                let target = e.sized(now);
                if target != e.target {
                    tracing::info!(template = %t, from = e.target, to = target, "warm pool resized for demand");
                    e.target = target;
                }
                while e.ready.len() > e.target {
                    surplus.extend(e.ready.pop_back());
                }
                if e.ready.len() >= e.target {
                    e.short_since = None;
                } else if e.short_since.is_none() {
                    e.short_since = Some(now);
                }
            }
            drop(pools);
            discard(surplus);
            let pools = node.pool.lock();
            let last_take = *node.pool.last_take.lock().expect("last take lock");
            pools
                .iter()
                .find(|(_, e)| {
                    e.ready.len() + e.filling < e.target && e.retry_at.is_none_or(|t| t <= now)
                })
                .map(|(t, e)| (t.clone(), e.short_since.unwrap_or(now), last_take))
        };
        let Some((template, short_since, last_take)) = wanted else {
            // Woken by a take, a new target, or the next retry time; the pools are resized
            // at least that often, so an idle one shrinks.
            let _ = tokio::time::timeout(RETRY_AFTER, wake.notified()).await;
            continue;
        };
        // New sandboxes' first commands come right after their creates: let them have the cores
        // until creates pause, unless the host has room to spare (a client creating one sandbox
        // after another); under a steady stream of creates refill anyway.
        let quiet = last_take.and_then(|t| REFILL_DELAY.checked_sub(t.elapsed()));
        let overdue = MAX_REFILL_WAIT.checked_sub(short_since.elapsed());
        if let (Some(quiet), Some(overdue)) = (quiet, overdue)
            && !cpu_has_room().await
        {
            tokio::time::sleep(quiet.min(overdue).min(CPU_SAMPLE)).await;
            continue;
        }
        let Some(n) = node.upgrade() else { return };
        // Creates and resumes waiting to restore go first: a fill only takes a free turn.
        let Ok(turn) = n.starting_turns.clone().try_acquire_owned() else {
            drop(n);
            tokio::time::sleep(CPU_SAMPLE).await;
            continue;
        };
        {
            // The other filler may have taken this slot meanwhile.
            let mut pools = n.pool.lock();
            let Some(e) = pools.get_mut(&template) else {
                continue;
            };
            if e.ready.len() + e.filling >= e.target {
                continue;
            }
            e.filling += 1;
        }
        let t0 = Instant::now();
        let result = n.warm_one(&template, turn).await;
        let mut pools = n.pool.lock();
        let e = pools.entry(template.clone()).or_default();
        e.filling = e.filling.saturating_sub(1);
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

/// True when the host's CPUs were at most [`FILL_CPU_BUDGET`] busy over the next
/// [`CPU_SAMPLE`] (false when `/proc/stat` cannot be read).
async fn cpu_has_room() -> bool {
    let Some(a) = cpu_times() else { return false };
    tokio::time::sleep(CPU_SAMPLE).await;
    let Some(b) = cpu_times() else { return false };
    busy_fraction(a, b).is_some_and(|f| f <= FILL_CPU_BUDGET)
}

/// (busy, total) jiffies of all CPUs, from the first line of `/proc/stat`.
fn cpu_times() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    parse_cpu_line(text.lines().next()?)
}

fn parse_cpu_line(line: &str) -> Option<(u64, u64)> {
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest time is inside user already).
    let v: Vec<u64> = fields
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    if v.len() < 5 {
        return None;
    }
    let total: u64 = v.iter().sum();
    let idle = v[3] + v[4];
    Some((total - idle, total))
}

fn busy_fraction(a: (u64, u64), b: (u64, u64)) -> Option<f64> {
    let total = b.1.checked_sub(a.1)?;
    (total > 0).then(|| b.0.saturating_sub(a.0) as f64 / total as f64)
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

/// Parses `--warm-pool` values, comma-separated: `TEMPLATE=N` keeps N warm VMs ready,
/// `TEMPLATE=MIN..MAX` between MIN and MAX as demand goes. Gives (min, max) per template.
pub fn parse_warm_pool(spec: &str) -> Result<HashMap<String, (usize, usize)>, String> {
    let mut out = HashMap::new();
    for part in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (name, n) = part.split_once('=').ok_or_else(|| {
            format!("`{part}`: expected TEMPLATE=COUNT or TEMPLATE=MIN..MAX, e.g. base=2..8")
        })?;
        let count = |n: &str| {
            n.trim()
                .parse::<usize>()
                .map_err(|_| format!("`{part}`: counts must be whole numbers"))
        };
        let (min, max) = match n.split_once("..") {
            Some((lo, hi)) => (count(lo)?, count(hi)?),
            None => (count(n)?, count(n)?),
        };
        if min > max {
            return Err(format!("`{part}`: the minimum is above the maximum"));
        }
        if max > 200 {
            return Err(format!("`{part}`: at most 200 warm VMs per template"));
        }
        out.insert(name.trim().to_string(), (min, max));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_pool_specs_parse() {
        let p = parse_warm_pool("base=2, code-interpreter-v1=1..4").unwrap();
        assert_eq!(p["base"], (2, 2));
        assert_eq!(p["code-interpreter-v1"], (1, 4));
        assert!(parse_warm_pool("").unwrap().is_empty());
        assert!(
            parse_warm_pool("base")
                .unwrap_err()
                .contains("TEMPLATE=COUNT")
        );
        assert!(
            parse_warm_pool("base=x")
                .unwrap_err()
                .contains("whole numbers")
        );
        assert!(parse_warm_pool("base=201").unwrap_err().contains("at most"));
        assert!(
            parse_warm_pool("base=0..201")
                .unwrap_err()
                .contains("at most")
        );
        assert!(parse_warm_pool("base=4..2").unwrap_err().contains("above"));
    }

    #[test]
    fn the_target_follows_demand_within_bounds() {
        let mut e: Entry<()> = Entry {
            min: 2,
            max: 8,
            ..Entry::default()
        };
        let t0 = Instant::now();
        assert_eq!(e.sized(t0), 2, "no demand: the minimum");
        // One create every 400 ms for 2 s: 2.5 a second, 13 VMs' worth, capped at 8.
        for i in 0..5 {
            e.takes.push_back(t0 + Duration::from_millis(400 * i));
        }
        assert_eq!(e.sized(t0 + Duration::from_secs(2)), 8);
        // One create in 20 s: about a second's demand is under the minimum.
        e.takes.clear();
        e.takes.push_back(t0);
        assert_eq!(e.sized(t0 + Duration::from_secs(20)), 2);
        // A lone create just now counts as one a second: 5 VMs.
        let mut e: Entry<()> = Entry {
            min: 0,
            max: 8,
            ..Entry::default()
        };
        e.takes.push_back(t0);
        assert_eq!(e.sized(t0), 5);
        // Idle past the window: back to the minimum, and the old creates are forgotten.
        assert_eq!(e.sized(t0 + DEMAND_WINDOW + Duration::from_secs(1)), 0);
        assert!(e.takes.is_empty());
    }

    #[test]
    fn cpu_busy_fraction_from_proc_stat() {
        let a = parse_cpu_line("cpu  100 0 50 800 50 0 0 0 0 0").unwrap();
        assert_eq!(a, (150, 1000));
        let b = parse_cpu_line("cpu  300 0 100 1300 100 0 0 0 0 0").unwrap();
        assert_eq!(busy_fraction(a, b), Some(250.0 / 800.0));
        assert_eq!(busy_fraction(a, a), None);
        assert_eq!(parse_cpu_line("cpu0 1 2 3 4 5"), None);
        assert!(cpu_times().is_some(), "this host has /proc/stat");
    }
}

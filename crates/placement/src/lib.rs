//! Where a new sandbox runs in a cluster (issue 19): one decision, from the nodes' last reported
//! capacity, in memory, without a round trip. The control plane keeps a [`Cluster`] of node
//! states (refreshed by heartbeats, debited at once by its own decisions so racing creates do
//! not pile onto one node) and asks [`Cluster::place`] for each create, resume or fork.
//!
//! A node qualifies when it is up, not draining, and has the memory and vCPUs the sandbox asks
//! for (vCPUs may be overcommitted by the node's factor). Among those, in order:
//! 1. the node a fork's parent runs on (its memory image and disk layers are there);
//! 2. a node with a ready warm VM of the template (a create is then a hand-over);
//! 3. a node that already holds the template's (or snapshot's) files (no download);
//! 4. by policy: **spread** (most free memory, then fewest sandboxes) or **pack** (least free
//!    memory that still fits, so whole nodes stay free for large sandboxes and can be drained).
//!
//! A decision is one pass over the nodes: linear in their number, no allocation.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

/// How sandboxes are spread over nodes that are equal otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Most free memory first: load is even, one node's loss takes few sandboxes.
    #[default]
    Spread,
    /// Fullest node that fits first: free nodes stay whole.
    Pack,
}

/// What a node last reported, minus what this control plane placed on it since.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeState {
    pub id: String,
    pub up: bool,
    pub draining: bool,
    pub memory_mb: u64,
    pub memory_free_mb: u64,
    pub vcpus: u32,
    /// vCPUs given to sandboxes now.
    pub vcpus_used: u32,
    /// How many times its vCPUs may be handed out (CPU is shared; memory is not).
    pub vcpu_overcommit: u32,
    pub sandboxes: u32,
    /// Templates with a ready warm VM on the node.
    pub warm: HashSet<String>,
    /// Templates and snapshots whose files the node holds.
    pub cached: HashSet<String>,
}

impl NodeState {
    fn fits(&self, r: &Request) -> bool {
        self.up
            && !self.draining
            && self.memory_free_mb >= r.memory_mb
            && u64::from(self.vcpus_used) + u64::from(r.vcpus)
                <= u64::from(self.vcpus) * u64::from(self.vcpu_overcommit.max(1))
    }
}

/// A sandbox to place.
#[derive(Debug, Clone)]
pub struct Request {
    /// The template id, or the snapshot it starts from.
    pub template: String,
    pub memory_mb: u64,
    pub vcpus: u32,
    /// A fork's parent's node: preferred while it has room.
    pub near: Option<String>,
}

/// Why nothing could be placed, for the API's error (what to do: wait, or smaller).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoPlace {
    #[error("no node is up and taking sandboxes")]
    NoNodes,
    #[error(
        "no node has {memory_mb} MiB and {vcpus} vCPUs free (the most free memory on a node is \
         {largest_free_mb} MiB); retry later or ask for less"
    )]
    Full {
        memory_mb: u64,
        vcpus: u32,
        largest_free_mb: u64,
    },
}

/// The control plane's view of its nodes.
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    pub nodes: Vec<NodeState>,
    pub policy: Policy,
}

impl Cluster {
    /// The node for `r` (an index into `nodes`), without changing anything.
    pub fn choose(&self, r: &Request) -> Result<usize, NoPlace> {
        let mut best: Option<(usize, (u8, u8, u8, i128))> = None;
        let mut any_up = false;
        let mut largest_free = 0;
        for (i, n) in self.nodes.iter().enumerate() {
            if n.up && !n.draining {
                any_up = true;
                largest_free = largest_free.max(n.memory_free_mb);
            }
            if !n.fits(r) {
                continue;
            }
            let near = r.near.as_deref() == Some(n.id.as_str());
            // Ties on capacity go to the node with fewer sandboxes (spread) or more (pack).
            let room = i128::from(n.memory_free_mb) * 1_000_000 - i128::from(n.sandboxes);
            let key = (
                u8::from(near),
                u8::from(n.warm.contains(&r.template)),
                u8::from(n.cached.contains(&r.template)),
                match self.policy {
                    Policy::Spread => room,
                    Policy::Pack => -room,
                },
            );
            if best.as_ref().is_none_or(|(_, b)| key > *b) {
                best = Some((i, key));
            }
        }
        match best {
            Some((i, _)) => Ok(i),
            None if !any_up => Err(NoPlace::NoNodes),
            None => Err(NoPlace::Full {
                memory_mb: r.memory_mb,
                vcpus: r.vcpus,
                largest_free_mb: largest_free,
            }),
        }
    }

    /// Chooses a node for `r` and debits it at once (memory, vCPUs, a sandbox; a warm VM of
    /// the template is taken), so the next decision sees it before the node's next heartbeat.
    pub fn place(&mut self, r: &Request) -> Result<usize, NoPlace> {
        let i = self.choose(r)?;
        let n = &mut self.nodes[i];
        n.memory_free_mb -= r.memory_mb;
        n.vcpus_used += r.vcpus;
        n.sandboxes += 1;
        n.warm.remove(&r.template);
        n.cached.insert(r.template.clone());
        Ok(i)
    }

    /// A sandbox of that size left node `i` (killed, paused, moved).
    pub fn release(&mut self, i: usize, memory_mb: u64, vcpus: u32) {
        let n = &mut self.nodes[i];
        n.memory_free_mb = (n.memory_free_mb + memory_mb).min(n.memory_mb);
        n.vcpus_used = n.vcpus_used.saturating_sub(vcpus);
        n.sandboxes = n.sandboxes.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, free: u64) -> NodeState {
        NodeState {
            id: id.into(),
            up: true,
            draining: false,
            memory_mb: 16_384,
            memory_free_mb: free,
            vcpus: 8,
            vcpus_used: 0,
            vcpu_overcommit: 2,
            sandboxes: 0,
            warm: HashSet::new(),
            cached: HashSet::new(),
        }
    }

    fn req(t: &str, mem: u64) -> Request {
        Request {
            template: t.into(),
            memory_mb: mem,
            vcpus: 2,
            near: None,
        }
    }

    #[test]
    fn spread_takes_the_emptiest_and_pack_the_fullest_that_fits() {
        let mut c = Cluster {
            nodes: vec![node("a", 4096), node("b", 12_000), node("c", 600)],
            policy: Policy::Spread,
        };
        assert_eq!(c.choose(&req("base", 512)), Ok(1));
        c.policy = Policy::Pack;
        assert_eq!(c.choose(&req("base", 512)), Ok(2));
        assert_eq!(c.choose(&req("base", 1024)), Ok(0), "c is too small");
    }

    #[test]
    fn a_forks_parent_then_a_warm_vm_then_cached_files_come_first() {
        let mut c = Cluster {
            nodes: vec![node("a", 8000), node("b", 4000), node("c", 2000)],
            policy: Policy::Spread,
        };
        c.nodes[2].cached.insert("base".into());
        assert_eq!(c.choose(&req("base", 512)), Ok(2));
        c.nodes[1].warm.insert("base".into());
        assert_eq!(c.choose(&req("base", 512)), Ok(1));
        let mut fork = req("base", 512);
        fork.near = Some("c".into());
        assert_eq!(c.choose(&fork), Ok(2));
        // A parent's node without room: elsewhere.
        fork.memory_mb = 3000;
        assert_eq!(c.choose(&fork), Ok(1));
    }

    #[test]
    fn down_draining_and_full_nodes_are_skipped_with_a_reason() {
        let mut c = Cluster {
            nodes: vec![node("a", 8000), node("b", 8000)],
            policy: Policy::Spread,
        };
        c.nodes[0].up = false;
        c.nodes[1].draining = true;
        assert_eq!(c.choose(&req("base", 512)), Err(NoPlace::NoNodes));
        c.nodes[1].draining = false;
        let e = c.choose(&req("base", 9000)).unwrap_err();
        assert_eq!(
            e,
            NoPlace::Full {
                memory_mb: 9000,
                vcpus: 2,
                largest_free_mb: 8000
            }
        );
        assert!(e.to_string().contains("retry later or ask for less"));
        // vCPUs: 8 × 2 overcommit = 16, eight 2-vCPU sandboxes fill it.
        for _ in 0..8 {
            c.place(&req("base", 100)).unwrap();
        }
        assert!(matches!(
            c.choose(&req("base", 100)),
            Err(NoPlace::Full { .. })
        ));
        c.release(1, 100, 2);
        assert_eq!(c.choose(&req("base", 100)), Ok(1));
    }
}

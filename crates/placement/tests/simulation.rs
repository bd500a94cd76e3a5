//! Issue 19's placement simulation: 1,000 nodes, 100,000 sandboxes created (and some killed) in
//! one sequence. No node goes over its capacity; every decision is timed (printed, not
//! asserted: timings on shared machines are noise; the result is in docs/benchmarks.md).

use std::collections::HashSet;
use std::time::Instant;

use alcove_placement::{Cluster, NodeState, Policy, Request};
use rand::{RngExt, SeedableRng, rngs::StdRng};

fn cluster(policy: Policy) -> Cluster {
    let mut rng = StdRng::seed_from_u64(19);
    let nodes = (0..1000)
        .map(|i| {
            let memory_mb = [65_536, 131_072, 262_144][rng.random_range(0..3)];
            let mut cached = HashSet::new();
            if i % 3 == 0 {
                cached.insert("base".to_owned());
            }
            let mut warm = HashSet::new();
            if i % 10 == 0 {
                warm.insert("code-interpreter-v1".to_owned());
            }
            NodeState {
                id: format!("node-{i}"),
                up: i % 97 != 0,
                draining: i % 101 == 0,
                memory_mb,
                memory_free_mb: memory_mb,
                vcpus: [32, 64, 96][rng.random_range(0..3)],
                vcpus_used: 0,
                vcpu_overcommit: 4,
                sandboxes: 0,
                warm,
                cached,
            }
        })
        .collect();
    Cluster { nodes, policy }
}

fn run(policy: Policy) {
    let mut c = cluster(policy);
    let mut rng = StdRng::seed_from_u64(7);
    let templates = ["base", "code-interpreter-v1", "desktop", "snap-1", "snap-2"];
    let mut live: Vec<(usize, u64, u32)> = Vec::new();
    let mut times = Vec::with_capacity(100_000);
    let mut refused = 0;
    for _ in 0..100_000 {
        // One in five creates is followed by a kill of a random live sandbox.
        if rng.random_range(0..5) == 0 && !live.is_empty() {
            let (i, m, v) = live.swap_remove(rng.random_range(0..live.len()));
            c.release(i, m, v);
        }
        let memory_mb = [512, 1024, 2048, 4096][rng.random_range(0..4)];
        let vcpus = [1, 2, 4][rng.random_range(0..3)];
        let near = (rng.random_range(0..10) == 0 && !live.is_empty())
            .then(|| c.nodes[live[rng.random_range(0..live.len())].0].id.clone());
        let r = Request {
            template: templates[rng.random_range(0..templates.len())].into(),
            memory_mb,
            vcpus,
            near,
        };
        let t = Instant::now();
        let placed = c.place(&r);
        times.push(t.elapsed().as_secs_f64() * 1e6);
        match placed {
            Ok(i) => {
                let n = &c.nodes[i];
                assert!(n.up && !n.draining, "placed on a node that takes none");
                live.push((i, memory_mb, vcpus));
            }
            Err(_) => {
                // Refused only when no node that takes sandboxes has the room.
                let room = c.nodes.iter().any(|n| {
                    n.up && !n.draining
                        && n.memory_free_mb >= r.memory_mb
                        && u64::from(n.vcpus_used) + u64::from(r.vcpus) <= u64::from(n.vcpus) * 4
                });
                assert!(!room, "refused while a node had room");
                refused += 1;
            }
        }
    }
    // Nothing over capacity: recount from the live sandboxes.
    let mut mem = vec![0u64; c.nodes.len()];
    let mut cpu = vec![0u64; c.nodes.len()];
    for (i, m, v) in &live {
        mem[*i] += m;
        cpu[*i] += u64::from(*v);
    }
    for (i, n) in c.nodes.iter().enumerate() {
        assert!(mem[i] <= n.memory_mb, "{} over its memory", n.id);
        assert!(cpu[i] <= u64::from(n.vcpus) * 4, "{} over its vCPUs", n.id);
        assert_eq!(n.memory_free_mb, n.memory_mb - mem[i]);
    }
    times.sort_by(f64::total_cmp);
    let pct = |p: f64| times[((times.len() as f64 - 1.0) * p) as usize];
    println!(
        "placement ({policy:?}): 1,000 nodes, 100,000 decisions ({} live, {refused} refused): \
         p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
        live.len(),
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
}

#[test]
fn a_thousand_nodes_and_a_hundred_thousand_sandboxes_spread() {
    run(Policy::Spread);
}

#[test]
fn a_thousand_nodes_and_a_hundred_thousand_sandboxes_packed() {
    run(Policy::Pack);
}

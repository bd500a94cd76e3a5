//! How a control-plane replica's store holds up under concurrent requests on Postgres, for each
//! `connection_limit`: every thread plays API requests (authenticate a key, then read a
//! sandbox), and one more lists every sandbox of a large team now and then (as the dashboard or
//! a roll-up would). Prints each setting's request latency (median and percentiles) and
//! throughput, and how long the long list took.
//!
//!   scripts/with-postgres.sh cargo run --release -p alcove-store --example store_bench -- \
//!       [--threads 8] [--requests 2000] [--limits 1,4] [--sandboxes 20000]
//!
//! The database is `ALCOVE_TEST_DATABASE_URL`, in a schema of its own per run.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use std::collections::BTreeMap;

use alcove_store::{Database, NewSandboxRecord, SandboxFilter, Store, TemplateRecord, now_ms};

fn sandbox(id: String, team_id: &str) -> NewSandboxRecord {
    NewSandboxRecord {
        id,
        team_id: team_id.into(),
        template_id: "tpl_bench".into(),
        alias: Some("base".into()),
        started_at: now_ms(),
        end_at: now_ms() + 3_600_000,
        cpu_count: 2,
        memory_mb: 512,
        disk_size_mb: 1024,
        envd_version: "0.2.0".into(),
        envd_access_token: Some("token".into()),
        auto_pause: false,
        auto_pause_disk_only: false,
        allow_internet_access: None,
        traffic_access_token: None,
        metadata: BTreeMap::from([("run".to_string(), "bench".to_string())]),
        env_names: vec![],
        auto_resume: false,
        timeout_ms: 3_600_000,
        snapshot_id: None,
        mask_request_host: None,
    }
}

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_owned())
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads: usize = arg(&args, "--threads", "8").parse().expect("--threads N");
    let requests: usize = arg(&args, "--requests", "2000")
        .parse()
        .expect("--requests N");
    let sandboxes: usize = arg(&args, "--sandboxes", "20000")
        .parse()
        .expect("--sandboxes N");
    let limits: Vec<usize> = arg(&args, "--limits", "1,4")
        .split(',')
        .map(|n| n.parse().expect("--limits N,M"))
        .collect();
    let url = std::env::var("ALCOVE_TEST_DATABASE_URL").unwrap_or_else(|_| {
        eprintln!(
            "store_bench: set ALCOVE_TEST_DATABASE_URL (run it under scripts/with-postgres.sh)"
        );
        std::process::exit(2)
    });
    let schema = format!("bench_{}", std::process::id());
    let Database::Postgres(base) = Database::postgres_schema(&url, &schema) else {
        unreachable!("postgres_schema gives a Postgres database")
    };
    // The data, once: a team with many sandboxes (the long list) and a key for the requests.
    let (key, big_team) = {
        let store = Store::connect(&Database::Postgres(base.clone())).expect("open the store");
        let team = store.create_team("bench").expect("a team");
        let key = store
            .create_api_key(&team.id, "bench")
            .expect("a key")
            .secret;
        store
            .upsert_template(&TemplateRecord {
                id: "tpl_bench".into(),
                team_id: None,
                build_id: "b".into(),
                cpu_count: 2,
                memory_mb: 512,
                disk_size_mb: 1024,
                envd_version: "0.2.0".into(),
                public: true,
                aliases: vec!["base".into()],
                created_at: now_ms(),
                updated_at: now_ms(),
            })
            .expect("a template");
        let big = store.create_team("big").expect("a team");
        eprintln!("store_bench: inserting {sandboxes} sandboxes");
        for i in 0..sandboxes {
            store
                .insert_sandbox(&sandbox(format!("sbx_{i:08}"), &big.id))
                .expect("a sandbox");
        }
        (key, big.id)
    };
    println!(
        "{threads} threads x {} requests (authenticate + read a sandbox), beside one thread \
         listing all {sandboxes} sandboxes of a team every 50 ms",
        requests / threads
    );
    println!(
        "| connection_limit | requests/s | p50 ms | p95 ms | p99 ms | max ms | long list p50 ms |"
    );
    println!("|---|---|---|---|---|---|---|");
    for limit in limits {
        let db = Database::Postgres(format!("{base}&connection_limit={limit}"));
        let store = Arc::new(Store::connect(&db).expect("open the store"));
        let stop = Arc::new(AtomicBool::new(false));
        let slow = {
            let (store, stop, team) = (Arc::clone(&store), Arc::clone(&stop), big_team.clone());
            std::thread::spawn(move || {
                let mut took = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let page = store
                        .list_sandboxes(&SandboxFilter {
                            team_id: Some(team.clone()),
                            ..SandboxFilter::default()
                        })
                        .expect("the long list");
                    assert_eq!(page.items.len(), sandboxes);
                    took.push(t.elapsed());
                    std::thread::sleep(Duration::from_millis(50));
                }
                took.sort();
                took
            })
        };
        let t0 = Instant::now();
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let (store, key) = (Arc::clone(&store), key.clone());
                std::thread::spawn(move || {
                    let mut took = Vec::with_capacity(requests / threads);
                    for _ in 0..requests / threads {
                        let t = Instant::now();
                        store
                            .authenticate(&key)
                            .expect("authenticate")
                            .expect("known");
                        store.sandbox("sbx_none").expect("read");
                        took.push(t.elapsed());
                    }
                    took
                })
            })
            .collect();
        let mut all: Vec<Duration> = workers
            .into_iter()
            .flat_map(|w| w.join().expect("a worker"))
            .collect();
        let wall = t0.elapsed();
        stop.store(true, Ordering::Relaxed);
        let lists = slow.join().expect("the slow thread");
        all.sort();
        println!(
            "| {limit} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
            all.len() as f64 / wall.as_secs_f64(),
            pct(&all, 0.50),
            pct(&all, 0.95),
            pct(&all, 0.99),
            pct(&all, 1.0),
            if lists.is_empty() {
                "-".to_owned()
            } else {
                format!("{:.0}", pct(&lists, 0.5))
            },
        );
    }
}

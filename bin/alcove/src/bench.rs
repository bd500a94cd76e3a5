//! `alcove bench`: create → first command latency (sequential and concurrent), QEMU spawn →
//! resume, and memory (PSS) per idle sandbox. Prints medians and percentiles; asserts nothing.

use std::time::{Duration, Instant};

use alcove_node::CreateOptions;
use serde_json::json;

use crate::config::Global;

#[derive(clap::Args)]
pub struct BenchArgs {
    #[arg(long, default_value = "base")]
    template: String,
    /// Sequential create → first command rounds.
    #[arg(long, default_value_t = 30)]
    sequential: usize,
    /// Sandboxes created at once, per concurrent round.
    #[arg(long, default_value_t = 10)]
    concurrent: usize,
    /// Concurrent rounds.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Idle sandboxes kept alive together for the memory measurement.
    #[arg(long, default_value_t = 50)]
    idle: usize,
}

#[derive(Default)]
struct Series(Vec<f64>);

impl Series {
    fn push(&mut self, d: Duration) {
        self.0.push(d.as_secs_f64() * 1e3);
    }
    fn pct(&self, p: f64) -> f64 {
        let mut v = self.0.clone();
        v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
        if v.is_empty() {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * (v.len() as f64 - 1.0)).round() as usize;
        v[rank.min(v.len() - 1)]
    }
    fn summary(&self) -> serde_json::Value {
        json!({ "n": self.0.len(), "p50": self.pct(50.0), "p95": self.pct(95.0), "p99": self.pct(99.0), "max": self.pct(100.0) })
    }
    fn line(&self, name: &str, unit: &str) -> String {
        format!(
            "{name:<44} n={:<3} p50={:>8.1} p95={:>8.1} p99={:>8.1} max={:>8.1} {unit}",
            self.0.len(),
            self.pct(50.0),
            self.pct(95.0),
            self.pct(99.0),
            self.pct(100.0)
        )
    }
}

/// Proportional set size of a process, in MiB.
fn pss_mib(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let kb: f64 = text
        .lines()
        .find(|l| l.starts_with("Pss:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

fn echo_request() -> alcove_agent_client::RunRequest {
    alcove_agent_client::RunRequest {
        cmd: "/bin/echo".into(),
        args: vec!["ok".into()],
        ..Default::default()
    }
}

pub async fn run(g: &Global, a: BenchArgs) -> anyhow::Result<u8> {
    let node = g.node().await?;
    let accel = g.accel();
    let opts = CreateOptions {
        template: a.template.clone(),
        ..Default::default()
    };
    let say = |s: String| {
        if !g.json {
            println!("{s}");
        }
    };
    say(format!(
        "# alcove bench: template {}, accelerator {} ({})",
        a.template,
        accel.accel.as_str(),
        accel.reason
    ));

    // Warm-up: the first restore after a build pays page-cache misses on the template files.
    let (w, _) = node.create(opts.clone()).await?;
    node.run(&w.id, echo_request()).await?;
    node.kill(&w.id).await?;

    let (mut seq, mut spawn_resume, mut ready, mut shell) = (
        Series::default(),
        Series::default(),
        Series::default(),
        Series::default(),
    );
    for _ in 0..a.sequential {
        let t0 = Instant::now();
        let (info, t) = node.create(opts.clone()).await?;
        let out = node.run(&info.id, echo_request()).await?;
        seq.push(t0.elapsed());
        anyhow::ensure!(
            out.stdout == b"ok\n",
            "unexpected output {:?}",
            String::from_utf8_lossy(&out.stdout)
        );
        spawn_resume.push(t.restore.resumed);
        ready.push(t.ready);
        let t1 = Instant::now();
        node.run(
            &info.id,
            crate::sandbox::run_request(&["echo ok".to_string()], "user", None),
        )
        .await?;
        shell.push(t1.elapsed());
        node.kill(&info.id).await?;
    }
    say(seq.line("create -> first command result (sequential)", "ms"));
    say(spawn_resume.line("qemu spawn -> vCPUs resumed", "ms"));
    say(ready.line("create -> agent initialised", "ms"));
    say(shell.line("then `bash -l -c 'echo ok'` as user", "ms"));

    let mut conc = Series::default();
    let mut failures = 0usize;
    for _ in 0..a.rounds {
        let mut tasks = Vec::new();
        for _ in 0..a.concurrent {
            let node = node.clone();
            let opts = opts.clone();
            tasks.push(tokio::spawn(async move {
                let t0 = Instant::now();
                let (info, _) = node.create(opts).await?;
                let out = node.run(&info.id, echo_request()).await;
                let elapsed = t0.elapsed();
                node.kill(&info.id).await?;
                anyhow::ensure!(out?.stdout == b"ok\n", "unexpected output");
                Ok::<_, anyhow::Error>(elapsed)
            }));
        }
        for t in tasks {
            match t.await? {
                Ok(d) => conc.push(d),
                Err(e) => {
                    failures += 1;
                    eprintln!("concurrent create failed: {e:#}");
                }
            }
        }
    }
    say(conc.line(
        &format!("create -> first command, {} at once", a.concurrent),
        "ms",
    ));

    let mut ids = Vec::new();
    let mut idle_failures = 0usize;
    for _ in 0..a.idle {
        match node.create(opts.clone()).await {
            Ok((info, _)) => ids.push(info.id),
            Err(e) => {
                idle_failures += 1;
                eprintln!("idle create failed: {e:#}");
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut pss = Series::default();
    let mut answered = 0usize;
    for id in &ids {
        if let Some(p) = node
            .vm(id)
            .ok()
            .and_then(|vm| pss_mib(alcove_vmm::Vm::pid(&vm)))
        {
            pss.0.push(p);
        }
        if node
            .run(id, echo_request())
            .await
            .map(|o| o.stdout == b"ok\n")
            .unwrap_or(false)
        {
            answered += 1;
        }
    }
    say(pss.line(
        &format!("PSS per idle sandbox ({} alive)", ids.len()),
        "MiB",
    ));
    say(format!(
        "{answered}/{} idle sandboxes answered a command after all were created",
        a.idle
    ));
    for id in &ids {
        node.kill(id).await?;
    }
    if g.json {
        println!(
            "{}",
            json!({
                "template": a.template, "accel": accel.accel.as_str(),
                "sequential_create_to_first_result_ms": seq.summary(),
                "spawn_to_resumed_ms": spawn_resume.summary(),
                "create_to_agent_ready_ms": ready.summary(),
                "bash_login_echo_ms": shell.summary(),
                "concurrent": { "at_once": a.concurrent, "rounds": a.rounds, "failures": failures, "create_to_first_result_ms": conc.summary() },
                "idle": { "alive": ids.len(), "create_failures": idle_failures, "answered": answered, "pss_mib": pss.summary() },
            })
        );
    }
    Ok(if failures + idle_failures == 0 && answered == ids.len() {
        0
    } else {
        1
    })
}

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
    /// Keep this many warm VMs of the template ready (0: every create restores a VM). With a
    /// pool, each sequential create and each concurrent round starts once the pool is full
    /// again, and a back-to-back series shows what happens when creates outrun the refill.
    #[arg(long, default_value_t = 0)]
    warm_pool: usize,
    /// Only measure the port tunnel instead: proxied HTTP request latency and a download
    /// through the agent channel from a server in one sandbox.
    #[arg(long)]
    ports: bool,
    /// Requests for the port tunnel latency series.
    #[arg(long, default_value_t = 50)]
    port_requests: usize,
    /// MiB downloaded through the port tunnel (and, for comparison, envd's /files).
    #[arg(long, default_value_t = 100)]
    port_download_mib: usize,
    /// Only measure persistence instead: pause of an idle sandbox, resume → first command,
    /// snapshot + fork into --fork-children, and the disk those forks use.
    #[arg(long)]
    persistence: bool,
    /// Pause/resume rounds for --persistence.
    #[arg(long, default_value_t = 10)]
    pause_rounds: usize,
    /// Children per fork for --persistence.
    #[arg(long, default_value_t = 10)]
    fork_children: usize,
    /// MiB the parent writes before it is forked (--persistence).
    #[arg(long, default_value_t = 100)]
    fork_write_mib: usize,
    /// Only measure metering instead: usage reports over --usage-events events in a real
    /// SQLite file, per groupBy (no VMs).
    #[arg(long)]
    usage: bool,
    /// Usage events written before the --usage queries.
    #[arg(long, default_value_t = 100_000)]
    usage_events: usize,
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

/// The accelerator, and a printer that is quiet under `--json`, after the mode's header line.
fn start<'a>(
    g: &'a Global,
    template: &str,
    mode: &str,
) -> (alcove_vmm::AccelChoice, impl Fn(String) + 'a) {
    let accel = g.accel();
    let say = move |s: String| {
        if !g.json {
            println!("{s}");
        }
    };
    say(format!(
        "# alcove bench{mode}: template {template}, accelerator {} ({})",
        accel.accel.as_str(),
        accel.reason
    ));
    (accel, say)
}

fn echo_request() -> alcove_agent_client::RunRequest {
    alcove_agent_client::RunRequest {
        cmd: "/bin/echo".into(),
        args: vec!["ok".into()],
        ..Default::default()
    }
}

pub async fn run(g: &Global, a: BenchArgs) -> anyhow::Result<u8> {
    if a.ports {
        return ports(g, &a).await;
    }
    if a.persistence {
        return persistence(g, &a).await;
    }
    if a.usage {
        return usage(g, &a);
    }
    let node = g.node().await?;
    let opts = CreateOptions {
        template: a.template.clone(),
        ..Default::default()
    };
    let (accel, say) = start(g, &a.template, "");

    // Warm-up: the first restore after a build pays page-cache misses on the template files.
    let (w, _) = node.create(opts.clone()).await?;
    node.run(&w.id, echo_request()).await?;
    node.kill(&w.id).await?;
    let pooled = a.warm_pool > 0;
    // Before a measured create: a full pool, so every series measures the same situation.
    let refill = || async {
        if pooled && !node.wait_warm_pool(Duration::from_secs(900)).await {
            anyhow::bail!(
                "the warm pool did not fill within 900 s: {:?}",
                node.warm_pool()
            );
        }
        Ok(())
    };
    if pooled {
        let t0 = Instant::now();
        node.set_warm_pool(&a.template, a.warm_pool);
        refill().await?;
        say(format!(
            "warm pool of {} filled in {:.1} s",
            a.warm_pool,
            t0.elapsed().as_secs_f64()
        ));
    }

    let (mut seq, mut spawn_resume, mut ready, mut shell) = (
        Series::default(),
        Series::default(),
        Series::default(),
        Series::default(),
    );
    let mut warm_hits = 0usize;
    for _ in 0..a.sequential {
        refill().await?;
        let t0 = Instant::now();
        let (info, t) = node.create(opts.clone()).await?;
        warm_hits += usize::from(t.warm);
        let out = node.run(&info.id, echo_request()).await?;
        seq.push(t0.elapsed());
        anyhow::ensure!(
            out.stdout == b"ok\n",
            "unexpected output {:?}",
            String::from_utf8_lossy(&out.stdout)
        );
        if !t.warm {
            spawn_resume.push(t.restore.resumed);
        }
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
    if pooled {
        say(format!(
            "  {warm_hits}/{} of those creates were served by the warm pool",
            a.sequential
        ));
    }
    let mut back_to_back = Series::default();
    let mut b2b_hits = 0usize;
    if pooled {
        refill().await?;
        for _ in 0..a.sequential {
            let t0 = Instant::now();
            let (info, t) = node.create(opts.clone()).await?;
            let out = node.run(&info.id, echo_request()).await?;
            back_to_back.push(t0.elapsed());
            anyhow::ensure!(out.stdout == b"ok\n", "unexpected output");
            b2b_hits += usize::from(t.warm);
            if !t.warm {
                spawn_resume.push(t.restore.resumed);
            }
            node.kill(&info.id).await?;
        }
        say(back_to_back.line("  back to back, no wait for the refill", "ms"));
        say(format!(
            "  {b2b_hits}/{} of those were served by the pool",
            a.sequential
        ));
    }
    say(spawn_resume.line("qemu spawn -> vCPUs resumed (cold creates)", "ms"));
    say(ready.line("create -> agent initialised", "ms"));
    say(shell.line("then `bash -l -c 'echo ok'` as user", "ms"));

    let mut conc = Series::default();
    let mut failures = 0usize;
    let mut conc_hits = 0usize;
    let mut conc_create = Series::default();
    for _ in 0..a.rounds {
        refill().await?;
        let mut tasks = Vec::new();
        for _ in 0..a.concurrent {
            let node = node.clone();
            let opts = opts.clone();
            tasks.push(tokio::spawn(async move {
                let t0 = Instant::now();
                let (info, t) = node.create(opts).await?;
                let created = t0.elapsed();
                let out = node.run(&info.id, echo_request()).await;
                let elapsed = t0.elapsed();
                // Kill only once every sandbox of the round has answered.
                Ok::<_, anyhow::Error>((info.id, out, created, elapsed, t.warm))
            }));
        }
        for t in tasks {
            match t.await? {
                Ok((id, out, created, d, warm)) => {
                    node.kill(&id).await?;
                    match out {
                        Ok(o) if o.stdout == b"ok\n" => {}
                        Ok(o) => anyhow::bail!("unexpected output {:?}", o.stdout),
                        Err(e) => anyhow::bail!("the first command failed: {e}"),
                    }
                    conc.push(d);
                    conc_create.push(created);
                    conc_hits += usize::from(warm);
                }
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
    say(conc_create.line("  of which create", "ms"));
    if pooled {
        say(format!(
            "  {conc_hits}/{} of those were served by the pool",
            a.concurrent * a.rounds
        ));
    }

    let mut ids = Vec::new();
    let mut warm_ids = Vec::new();
    let mut idle_failures = 0usize;
    for _ in 0..a.idle {
        match node.create(opts.clone()).await {
            Ok((info, t)) => {
                if t.warm {
                    warm_ids.push(info.id.clone());
                }
                ids.push(info.id)
            }
            Err(e) => {
                idle_failures += 1;
                eprintln!("idle create failed: {e:#}");
            }
        }
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (mut pss, mut pss_warm) = (Series::default(), Series::default());
    let mut answered = 0usize;
    for id in &ids {
        if let Some(p) = node
            .vm(id)
            .ok()
            .and_then(|vm| pss_mib(alcove_vmm::Vm::pid(&vm)))
        {
            pss.0.push(p);
            if warm_ids.contains(id) {
                pss_warm.0.push(p);
            }
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
    if pooled {
        say(pss_warm.line("  of those, ones that came from the warm pool", "MiB"));
    }
    say(format!(
        "{answered}/{} idle sandboxes answered a command after all were created",
        a.idle
    ));
    for id in &ids {
        node.kill(id).await?;
    }
    node.drain_warm_pool().await;
    if g.json {
        println!(
            "{}",
            json!({
                "template": a.template, "accel": accel.accel.as_str(),
                "warm_pool": a.warm_pool,
                "sequential_create_to_first_result_ms": seq.summary(),
                "sequential_warm_hits": warm_hits,
                "back_to_back_create_to_first_result_ms": back_to_back.summary(),
                "back_to_back_warm_hits": b2b_hits,
                "spawn_to_resumed_ms": spawn_resume.summary(),
                "create_to_agent_ready_ms": ready.summary(),
                "bash_login_echo_ms": shell.summary(),
                "concurrent": { "at_once": a.concurrent, "rounds": a.rounds, "failures": failures, "warm_hits": conc_hits, "create_to_first_result_ms": conc.summary() },
                "idle": { "alive": ids.len(), "create_failures": idle_failures, "answered": answered, "pss_mib": pss.summary(), "pss_mib_warm": pss_warm.summary() },
            })
        );
    }
    Ok(if failures + idle_failures == 0 && answered == ids.len() {
        0
    } else {
        1
    })
}

/// Pause/resume and snapshot/fork timings and the disk forks use, on the node directly.
async fn persistence(g: &Global, a: &BenchArgs) -> anyhow::Result<u8> {
    use alcove_node::snapshots::allocated_bytes;
    let node = g.node().await?;
    let (accel, say) = start(g, &a.template, " --persistence");
    let opts = CreateOptions {
        template: a.template.clone(),
        ..Default::default()
    };
    let echo = |node: &std::sync::Arc<alcove_node::Node>, id: String| {
        let node = node.clone();
        async move {
            let out = node.run(&id, echo_request()).await?;
            anyhow::ensure!(out.stdout == b"ok\n", "unexpected output");
            Ok::<_, anyhow::Error>(())
        }
    };

    // Pause of an idle sandbox; resume → first command result.
    let (info, _) = node.create(opts.clone()).await?;
    echo(&node, info.id.clone()).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (mut pause, mut resume, mut bytes) =
        (Series::default(), Series::default(), Series::default());
    for _ in 0..a.pause_rounds {
        let p = node.pause(&info.id).await?;
        pause.push(p.total);
        bytes.0.push(p.state_bytes as f64 / (1 << 20) as f64);
        let t0 = Instant::now();
        node.resume(&info.id).await?;
        echo(&node, info.id.clone()).await?;
        resume.push(t0.elapsed());
    }
    node.kill(&info.id).await?;
    say(pause.line("pause (idle sandbox, state written + VM gone)", "ms"));
    say(bytes.line("pause image size", "MiB"));
    say(resume.line("resume -> first command result", "ms"));

    // Fork of a template-fresh sandbox into one child.
    let (fresh, _) = node.create(opts.clone()).await?;
    let t0 = Instant::now();
    let snap = alcove_node::new_sandbox_id();
    node.snapshot(&fresh.id, &snap).await?;
    let fresh_snapshotted = t0.elapsed();
    let (child, _) = node
        .create(CreateOptions {
            snapshot: Some(snap.clone()),
            ..Default::default()
        })
        .await?;
    echo(&node, child.id.clone()).await?;
    let fresh_fork = t0.elapsed();
    node.kill(&child.id).await?;
    node.kill(&fresh.id).await?;
    node.delete_snapshot(&snap)?;
    say(format!(
        "{:<44} snapshot {:.0} ms, child answers at {:.0} ms",
        "fork of a template-fresh sandbox into 1",
        fresh_snapshotted.as_secs_f64() * 1e3,
        fresh_fork.as_secs_f64() * 1e3
    ));

    // A parent that wrote N MiB, forked into K children: time until all answer, and disk.
    let (parent, _) = node.create(opts.clone()).await?;
    let write = crate::sandbox::run_request(
        &[format!(
            "head -c {}M /dev/urandom > /home/user/big && sync",
            a.fork_write_mib
        )],
        "user",
        None,
    );
    node.run(&parent.id, write).await?;
    let before = allocated_bytes(&node.snapshots_dir())
        + allocated_bytes(&node.config().data_dir.join("sandboxes"));
    let t0 = Instant::now();
    let snap = alcove_node::new_sandbox_id();
    node.snapshot(&parent.id, &snap).await?;
    let snapshotted = t0.elapsed();
    let mut tasks = Vec::new();
    for _ in 0..a.fork_children {
        let node = node.clone();
        let snap = snap.clone();
        tasks.push(tokio::spawn(async move {
            let (c, _) = node
                .create(CreateOptions {
                    snapshot: Some(snap),
                    ..Default::default()
                })
                .await?;
            let out = node.run(&c.id, echo_request()).await?;
            anyhow::ensure!(out.stdout == b"ok\n", "unexpected output");
            Ok::<_, anyhow::Error>(c.id)
        }));
    }
    let mut children = Vec::new();
    let mut failures = 0usize;
    for t in tasks {
        match t.await? {
            Ok(id) => children.push(id),
            Err(e) => {
                failures += 1;
                eprintln!("fork child failed: {e:#}");
            }
        }
    }
    let all_answered = t0.elapsed();
    let snap_dir = node.snapshots_dir().join(&snap);
    let layer = allocated_bytes(&snap_dir.join("disk.qcow2"));
    // The full image, or once re-homed, the shared RAM file and its device state.
    let memory = allocated_bytes(&snap_dir).saturating_sub(layer);
    let overlays: u64 = children
        .iter()
        .map(|id| {
            allocated_bytes(
                &node
                    .config()
                    .data_dir
                    .join("sandboxes")
                    .join(id)
                    .join("disk.qcow2"),
            )
        })
        .sum();
    let after = allocated_bytes(&node.snapshots_dir())
        + allocated_bytes(&node.config().data_dir.join("sandboxes"));
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    say(format!(
        "{:<44} snapshot {:.0} ms, all {} answered at {:.0} ms ({} failed)",
        format!("fork after writing {} MiB", a.fork_write_mib),
        snapshotted.as_secs_f64() * 1e3,
        children.len(),
        all_answered.as_secs_f64() * 1e3,
        failures
    ));
    say(format!(
        "{:<44} frozen layer {:.1} MiB, {} child overlays {:.1} MiB together, memory image {:.1} MiB; disk growth {:.1} MiB for {} MiB written",
        "disk of that fork",
        mib(layer),
        children.len(),
        mib(overlays),
        mib(memory),
        mib(after.saturating_sub(before)),
        a.fork_write_mib
    ));
    for id in &children {
        node.kill(id).await?;
    }
    node.kill(&parent.id).await?;
    node.delete_snapshot(&snap)?;
    if g.json {
        println!(
            "{}",
            json!({
                "template": a.template, "accel": accel.accel.as_str(),
                "pause_ms": pause.summary(), "pause_image_mib": bytes.summary(),
                "resume_to_first_result_ms": resume.summary(),
                "fresh_fork": { "snapshot_ms": fresh_snapshotted.as_secs_f64() * 1e3, "child_answers_ms": fresh_fork.as_secs_f64() * 1e3 },
                "fork": { "children": a.fork_children, "failures": failures, "written_mib": a.fork_write_mib,
                          "snapshot_ms": snapshotted.as_secs_f64() * 1e3, "all_answered_ms": all_answered.as_secs_f64() * 1e3,
                          "layer_mib": mib(layer), "overlays_mib": mib(overlays), "memory_image_mib": mib(memory) },
            })
        );
    }
    Ok(if failures == 0 { 0 } else { 1 })
}

/// Proxied HTTP through the port tunnel, as `NodeBackend::forward` does it for ports other than
/// the agent's: latency of small GETs (to the end of the body) and throughput of one download,
/// beside the same download through envd's `/files` on the agent's own h2 connection.
async fn ports(g: &Global, a: &BenchArgs) -> anyhow::Result<u8> {
    use http_body_util::BodyExt;
    const PORT: u16 = 8000;
    const BIG_PORT: u16 = 8001;
    // No backslashes: it travels through `printf %b` in a shell command.
    const SMALL_SERVER: &str = "import asyncio, sys
CRLF = bytes([13, 10])
RESP = b'HTTP/1.1 200 OK' + CRLF + b'Content-Length: 3' + CRLF + CRLF + b'ok' + bytes([10])
async def serve(r, w):
    try:
        while True:
            await r.readuntil(CRLF + CRLF)
            w.write(RESP)
            await w.drain()
    except Exception:
        w.close()
async def main():
    s = await asyncio.start_server(serve, '0.0.0.0', int(sys.argv[1]))
    await s.serve_forever()
asyncio.run(main())
";
    let node = g.node().await?;
    let (accel, say) = start(g, &a.template, " --ports");
    let (info, _) = node
        .create(CreateOptions {
            template: a.template.clone(),
            ..Default::default()
        })
        .await?;
    let id = info.id.clone();
    let result = async {
        let mib = a.port_download_mib;
        // Small responses come from a keep-alive server that writes each response in one
        // send (Python's http.server writes head and body separately, and Nagle plus delayed
        // ACKs then add ~40 ms per keep-alive request); the download from http.server.
        let setup = format!(
            "mkdir -p /tmp/www && head -c {mib}M /dev/urandom > /tmp/www/big && \
             printf '%b' {SMALL_SERVER:?} > /tmp/small_server.py || exit 1
             setsid python3 /tmp/small_server.py {PORT} >/dev/null 2>&1 < /dev/null &
             setsid python3 -m http.server {BIG_PORT} --directory /tmp/www \
             >/dev/null 2>&1 < /dev/null &"
        );
        let out = node
            .run(&id, crate::sandbox::run_request(&[setup], "root", None))
            .await?;
        anyhow::ensure!(
            out.exit_code == 0,
            "setup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let agent = node.agent(&id).await?;
        let token = node.get(&id)?.access_token;
        let get = |port: u16, path: &'static str| {
            let agent = agent.clone();
            let token = token.clone();
            async move {
                let req = http::Request::get(path)
                    .header("host", format!("{port}-bench.localhost"))
                    .body(http_body_util::Empty::<bytes::Bytes>::new())?;
                let resp = agent
                    .forward_http(port, token.as_deref(), req, Duration::from_secs(60))
                    .await?;
                anyhow::ensure!(resp.status() == 200, "status {}", resp.status());
                let mut body = resp.into_body();
                let mut n = 0usize;
                while let Some(f) = body.frame().await {
                    if let Ok(d) = f?.into_data() {
                        n += d.len();
                    }
                }
                Ok::<usize, anyhow::Error>(n)
            }
        };
        // Wait for both servers, then warm up (TCG translates the server's paths on first use).
        let t0 = Instant::now();
        loop {
            match tokio::try_join!(get(PORT, "/small"), get(BIG_PORT, "/")) {
                Ok(_) => break,
                Err(_) if t0.elapsed() < Duration::from_secs(60) => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(e) => return Err(e.context("the server in the sandbox never answered")),
            }
        }
        for _ in 0..5 {
            get(PORT, "/small").await?;
        }
        let mut lat = Series::default();
        for _ in 0..a.port_requests {
            let t = Instant::now();
            get(PORT, "/small").await?;
            lat.push(t.elapsed());
        }
        say(lat.line("GET through a new tunnel each (3-byte body)", "ms"));

        // The proxy's way: connections pooled per sandbox and port (keep-alive server).
        let open_agent = agent.clone();
        let open_token = token.clone();
        let open: alcove_agent_client::OpenTunnel = std::sync::Arc::new(move |_id, port| {
            let (agent, token) = (open_agent.clone(), open_token.clone());
            Box::pin(async move { agent.tunnel(port, token.as_deref()).await })
        });
        let pool: alcove_agent_client::PortClient<http_body_util::Empty<bytes::Bytes>> =
            alcove_agent_client::PortClient::new(open);
        let mut pooled = Series::default();
        for i in 0..a.port_requests + 5 {
            let t = Instant::now();
            let req = http::Request::get("/small")
                .header("host", format!("{PORT}-bench.localhost"))
                .body(http_body_util::Empty::new())?;
            let resp = pool.send(&id, PORT, req, Duration::from_secs(60)).await?;
            anyhow::ensure!(resp.status() == 200, "status {}", resp.status());
            resp.into_body().collect().await?;
            if i >= 5 {
                pooled.push(t.elapsed());
            }
        }
        say(pooled.line("GET over a pooled tunnel (keep-alive)", "ms"));

        let t = Instant::now();
        let n = get(BIG_PORT, "/big").await?;
        let secs = t.elapsed().as_secs_f64();
        anyhow::ensure!(n == mib << 20, "downloaded {n} bytes, wanted {}", mib << 20);
        let tunnel_mbs = n as f64 / secs / 1e6;
        say(format!(
            "download {mib} MiB through the tunnel: {secs:.2} s, {tunnel_mbs:.1} MB/s"
        ));

        let mut req = http::Request::get("/files?path=/tmp/www/big&username=root");
        if let Some(t) = &token {
            req = req.header("x-access-token", t);
        }
        let t = Instant::now();
        let resp = agent
            .send(
                req.body(
                    http_body_util::Empty::new()
                        .map_err(|never| match never {})
                        .boxed_unsync(),
                )?,
            )
            .await?;
        anyhow::ensure!(resp.status() == 200, "/files status {}", resp.status());
        let mut body = resp.into_body();
        let mut m = 0usize;
        while let Some(f) = body.frame().await {
            if let Ok(d) = f?.into_data() {
                m += d.len();
            }
        }
        let secs2 = t.elapsed().as_secs_f64();
        let files_mbs = m as f64 / secs2 / 1e6;
        say(format!(
            "download {mib} MiB through envd /files:   {secs2:.2} s, {files_mbs:.1} MB/s"
        ));
        if g.json {
            println!(
                "{}",
                json!({
                    "template": a.template, "accel": accel.accel.as_str(),
                    "tunnel_get_ms": lat.summary(),
                    "pooled_get_ms": pooled.summary(),
                    "tunnel_download": { "bytes": n, "secs": secs, "mb_per_s": tunnel_mbs },
                    "files_download": { "bytes": m, "secs": secs2, "mb_per_s": files_mbs },
                })
            );
        }
        Ok(())
    }
    .await;
    node.kill(&id).await?;
    result.map(|()| 0)
}

/// `--usage`: a team's usage report over `usage_events` compute events (100 sandboxes, one
/// event per sandbox per minute, as a 60 s meter writes them) in a real SQLite file, for each
/// grouping. The report is what `GET /alcove/v1/usage` and every spend-cap check run.
fn usage(g: &Global, a: &BenchArgs) -> anyhow::Result<u8> {
    use alcove_store::{NewSandboxRecord, SandboxState, Store, UsageGroup, now_ms};
    let say = |s: String| {
        if !g.json {
            println!("{s}");
        }
    };
    say(format!(
        "# alcove bench --usage: {} usage events in SQLite",
        a.usage_events
    ));
    let dir = std::env::temp_dir().join(format!("alcove-bench-usage-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _remove = Remove(dir.clone());
    let store = Store::open(&dir.join(alcove_store::DB_FILE))?;
    let team = store.create_team("bench")?.id;
    let sandboxes = 100.min(a.usage_events.max(1));
    let t0 = now_ms();
    for i in 0..sandboxes {
        let id = format!("bench{i:04}");
        store.insert_sandbox(&NewSandboxRecord {
            id: id.clone(),
            team_id: team.clone(),
            template_id: format!("tpl{}", i % 5),
            alias: None,
            started_at: t0,
            end_at: t0 + 86_400_000,
            cpu_count: 2,
            memory_mb: 512,
            disk_size_mb: 1024,
            envd_version: "bench".into(),
            envd_access_token: None,
            auto_pause: false,
            auto_pause_disk_only: false,
            allow_internet_access: None,
            traffic_access_token: None,
            metadata: Default::default(),
            env_names: Vec::new(),
            auto_resume: false,
            timeout_ms: 86_400_000,
            snapshot_id: None,
            mask_request_host: None,
        })?;
        store.transition(&id, SandboxState::Running, "bench")?;
    }
    let ticks = a.usage_events.div_ceil(sandboxes);
    let fill = Instant::now();
    for k in 1..=ticks {
        store.meter_compute(t0 + k as i64 * 60_000)?;
    }
    say(format!(
        "wrote {} events in {:.1} s",
        ticks * sandboxes,
        fill.elapsed().as_secs_f64()
    ));
    let end = t0 + (ticks as i64 + 1) * 60_000;
    let mut out = serde_json::Map::new();
    for (name, group) in [
        ("sandbox", UsageGroup::Sandbox),
        ("template", UsageGroup::Template),
        ("day", UsageGroup::Day),
        ("team", UsageGroup::Team),
    ] {
        let mut s = Series::default();
        for _ in 0..20 {
            let t = Instant::now();
            let rows = store.usage(Some(&team), t0, end, group)?;
            s.push(t.elapsed());
            anyhow::ensure!(!rows.is_empty(), "no usage rows");
        }
        say(s.line(&format!("usage report groupBy={name}"), "ms"));
        out.insert(name.into(), s.summary());
    }
    if g.json {
        println!(
            "{}",
            json!({ "events": ticks * sandboxes, "usage_ms": out })
        );
    }
    Ok(0)
}

//! Templates on a server, over E2B's template build API: `alcove template build NAME
//! --dockerfile`, `alcove template ls` (with a server), `alcove template rm`, `alcove template
//! logs`.
//!
//! A Dockerfile build: convert (`alcove_client::dockerfile`), resolve `FROM` (a template the
//! server knows → `fromTemplate`, anything else → `fromImage`), hash each `COPY` source in the
//! context, `POST /v3/templates`, upload the archives the server does not have yet, start the
//! build, then follow its status: a progress bar and the log lines on a terminal, NDJSON events
//! with `--json` (`requested`, `upload`, `log`, `done`; an `error` event, and exit code 1, when
//! the build fails).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use alcove_client::context::Context;
use alcove_client::dockerfile::{self, Plan, Step};
use alcove_client::{ApiClient, BuildRequest, BuildStart, BuildStatus, BuildStep, ClientError};
use anyhow::Context as _;
use serde_json::{Value, json};

/// How often a build's status is polled (the SDKs poll every 200 ms).
const POLL: Duration = Duration::from_millis(500);
/// Status calls that may fail in a row (a server restarting) before the CLI gives up.
const POLL_RETRIES: u32 = 10;

/// What `alcove template build NAME --dockerfile PATH` was asked.
pub struct DockerfileBuild {
    /// `name` or `name:tag`.
    pub name: String,
    pub dockerfile: PathBuf,
    /// Default: the Dockerfile's directory.
    pub context: Option<PathBuf>,
    pub tags: Vec<String>,
    pub build_args: BTreeMap<String, String>,
    pub cpu_count: Option<u32>,
    pub memory_mb: Option<u32>,
    pub no_cache: bool,
    /// Overrides the ready command that goes with CMD/ENTRYPOINT.
    pub ready_cmd: Option<String>,
}

/// Runs a Dockerfile build on the server; `Ok(0)` when the template is ready.
pub async fn build_dockerfile(
    api: &ApiClient,
    req: DockerfileBuild,
    json: bool,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<u8> {
    let text = std::fs::read_to_string(&req.dockerfile)
        .with_context(|| format!("reading the Dockerfile {}", req.dockerfile.display()))?;
    let mut plan = dockerfile::convert(&text, &req.build_args)?;
    if let Some(r) = &req.ready_cmd {
        plan.ready_cmd = Some(r.clone());
    }
    for note in &plan.notes {
        if json {
            writeln!(out, "{}", json!({"event": "note", "message": note}))?;
        } else {
            eprintln!("note: {note}");
        }
    }
    let context_dir = match &req.context {
        Some(c) => c.clone(),
        None => req
            .dockerfile
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(".")),
    };
    let ctx = Context::open(&context_dir)?;
    let mut start = start_request(api, &plan, &ctx).await?;
    start.force = req.no_cache;

    let requested = api
        .request_build(&BuildRequest {
            name: req.name.clone(),
            tags: req.tags.clone(),
            cpu_count: req.cpu_count,
            memory_mb: req.memory_mb,
        })
        .await
        .context("requesting the build (POST /v3/templates)")?;
    let (template_id, build_id) = (requested.template_id.clone(), requested.build_id.clone());
    if json {
        writeln!(
            out,
            "{}",
            json!({"event": "requested", "templateID": template_id, "buildID": build_id,
                   "from": start.from_template.as_ref().or(start.from_image.as_ref()),
                   "fromTemplate": start.from_template.is_some(),
                   "names": requested.names, "tags": requested.tags})
        )?;
    } else {
        let from = match (&start.from_template, &start.from_image) {
            (Some(t), _) => format!("template {t}"),
            (_, Some(i)) => format!("image {i}"),
            _ => String::new(),
        };
        writeln!(
            out,
            "building {} from {from}: template {template_id}, build {build_id}",
            req.name
        )?;
    }

    upload_context(api, &template_id, &plan, &start, &ctx, json, out).await?;
    api.start_build(&template_id, &build_id, &start)
        .await
        .context("starting the build (POST /v2/templates/{id}/builds/{buildID})")?;
    let status = follow(api, &template_id, &build_id, Some(&plan), json, out).await?;
    finish(&status, Some(&plan), &req.name, json, out)
}

/// The build body: steps with their `filesHash`, and `FROM` resolved.
async fn start_request(api: &ApiClient, plan: &Plan, ctx: &Context) -> anyhow::Result<BuildStart> {
    let mut steps = Vec::with_capacity(plan.steps.len());
    for s in &plan.steps {
        let files_hash = match &s.step {
            Step::Copy { src, dest, .. } => Some(
                ctx.files_hash(src, dest)
                    .with_context(|| format!("Dockerfile line {}", s.line))?,
            ),
            _ => None,
        };
        steps.push(BuildStep {
            kind: s.step.kind().to_owned(),
            args: s.step.args(),
            force: false,
            files_hash,
        });
    }
    let is_template = is_server_template(api, &plan.from).await?;
    Ok(BuildStart {
        from_template: is_template.then(|| plan.from.clone()),
        from_image: (!is_template).then(|| plan.from.clone()),
        steps,
        start_cmd: plan.start_cmd.clone(),
        ready_cmd: plan.ready_cmd.clone(),
        force: false,
    })
}

/// Whether `FROM reference` names a template on the server (its alias, `name:tag`, or its id)
/// rather than an OCI image: the SDK's `from_dockerfile` always says `fromImage`, but our hosts
/// reach no public registry and the stock templates are what a Dockerfile starts from here.
async fn is_server_template(api: &ApiClient, reference: &str) -> anyhow::Result<bool> {
    // `registry/repo`, `repo@sha256:…` and `host:port/…` are images.
    if reference.contains('/') || reference.contains('@') {
        return Ok(false);
    }
    let name = reference.split(':').next().unwrap_or(reference);
    if api
        .template_alias(name)
        .await
        .context("looking up FROM as a template (GET /templates/aliases/{name})")?
        .is_some()
    {
        return Ok(true);
    }
    let list = api
        .templates()
        .await
        .context("listing templates (GET /templates)")?;
    Ok(list.as_array().into_iter().flatten().any(|t| {
        t["templateID"].as_str() == Some(name)
            || ["aliases", "names"].iter().any(|k| {
                t[*k].as_array().into_iter().flatten().any(|a| {
                    a.as_str()
                        .is_some_and(|a| a == name || a.split(':').next() == Some(name))
                })
            })
    }))
}

/// Uploads the archive of every `COPY` step the server does not have yet.
async fn upload_context(
    api: &ApiClient,
    template_id: &str,
    plan: &Plan,
    start: &BuildStart,
    ctx: &Context,
    json: bool,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let mut done = std::collections::HashSet::new();
    for (i, (step, planned)) in start.steps.iter().zip(&plan.steps).enumerate() {
        let (Some(hash), Step::Copy { src, .. }) = (&step.files_hash, &planned.step) else {
            continue;
        };
        if !done.insert(hash.clone()) {
            continue;
        }
        let link = api
            .file_upload_link(template_id, hash)
            .await
            .with_context(|| {
                format!("asking where to upload COPY {src} (GET /templates/{{id}}/files/{{hash}})")
            })?;
        let mut bytes = None;
        if !link.present {
            let archive = ctx
                .archive(src)
                .with_context(|| format!("Dockerfile line {}", planned.line))?;
            bytes = Some(archive.len());
            api.upload_files(&link, archive.into())
                .await
                .with_context(|| format!("uploading the files of COPY {src}"))?;
        }
        if json {
            writeln!(
                out,
                "{}",
                json!({"event": "upload", "step": i + 1, "src": src, "filesHash": hash,
                       "present": link.present, "bytes": bytes})
            )?;
        } else if link.present {
            writeln!(out, "COPY {src}: already on the server")?;
        } else {
            writeln!(out, "COPY {src}: uploaded {} bytes", bytes.unwrap_or(0))?;
        }
    }
    Ok(())
}

/// Polls the build's status until it is `ready` or `error` (or, with `until_done` false in
/// [`logs`], until the log is read), printing each log entry once.
async fn follow(
    api: &ApiClient,
    template_id: &str,
    build_id: &str,
    plan: Option<&Plan>,
    json: bool,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<BuildStatus> {
    let bar = (!json).then(|| {
        let pb = indicatif::ProgressBar::new(plan.map_or(0, |p| p.steps.len() as u64));
        pb.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{pos}/{len}] {msg} ({elapsed})")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        pb.enable_steady_tick(Duration::from_millis(200));
        pb
    });
    let mut offset = 0u64;
    let mut failures = 0;
    loop {
        let status = match api.build_status(template_id, build_id, offset, None).await {
            Ok(s) => {
                failures = 0;
                s
            }
            Err(e @ ClientError::Api { status: 404, .. }) => {
                return Err(anyhow::Error::new(e).context(format!(
                    "build {build_id} of template {template_id} is unknown to the server"
                )));
            }
            Err(e) if failures < POLL_RETRIES => {
                failures += 1;
                tracing::warn!(error = %e, "polling the build status; retrying");
                tokio::time::sleep(POLL * 2).await;
                continue;
            }
            Err(e) => return Err(e).context("polling the build status"),
        };
        offset += status.log_entries.len() as u64;
        for entry in &status.log_entries {
            if json {
                let mut v = serde_json::to_value(entry)?;
                v["event"] = json!("log");
                writeln!(out, "{v}")?;
                continue;
            }
            let line = format!("{} {}", entry.level.to_uppercase(), entry.message);
            match &bar {
                Some(pb) => {
                    if let Some(step) = entry.step.as_deref().and_then(|s| s.parse::<u64>().ok()) {
                        pb.set_position(step.saturating_sub(1));
                        if let Some(p) = plan.and_then(|p| p.steps.get(step as usize - 1)) {
                            pb.set_message(p.step.describe());
                        }
                    }
                    if pb.is_hidden() {
                        writeln!(out, "{line}")?;
                    } else {
                        pb.println(line);
                    }
                }
                None => writeln!(out, "{line}")?,
            }
        }
        // The status call answers a page of entries: drain them before stopping.
        if status.finished() && status.log_entries.is_empty() {
            if let Some(pb) = bar {
                if status.status == "ready" {
                    pb.set_position(pb.length().unwrap_or(0));
                }
                pb.finish_and_clear();
            }
            return Ok(status);
        }
        if !status.finished() {
            tokio::time::sleep(POLL).await;
        }
    }
}

/// Reports a finished build: `Ok(0)` when ready, an error naming the step otherwise.
fn finish(
    status: &BuildStatus,
    plan: Option<&Plan>,
    name: &str,
    json: bool,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<u8> {
    if status.status == "ready" {
        if json {
            writeln!(
                out,
                "{}",
                json!({"event": "done", "status": "ready", "name": name,
                       "templateID": status.template_id, "buildID": status.build_id})
            )?;
        } else {
            writeln!(
                out,
                "template {name} ready (template {}, build {}): Sandbox.create(\"{name}\")",
                status.template_id, status.build_id
            )?;
        }
        return Ok(0);
    }
    let reason = status.reason.clone();
    let message = reason
        .as_ref()
        .map_or("the build failed without a reason", |r| r.message.as_str());
    let step = reason.as_ref().and_then(|r| r.step.clone());
    let at = step.as_deref().map(|s| describe_step(s, plan));
    if json {
        writeln!(
            out,
            "{}",
            json!({"event": "error", "status": status.status, "templateID": status.template_id,
                   "buildID": status.build_id, "step": step, "at": at, "message": message})
        )?;
    }
    anyhow::bail!(
        "build {} of {name} failed{}: {message} (the whole log: alcove template logs {} {})",
        status.build_id,
        at.map(|a| format!(" at {a}")).unwrap_or_default(),
        status.template_id,
        status.build_id
    )
}

/// `reason.step` for a person: `base`, `finalize`, or the step with its Dockerfile line.
fn describe_step(step: &str, plan: Option<&Plan>) -> String {
    match step.parse::<usize>() {
        Ok(i) => match plan.and_then(|p| p.steps.get(i.wrapping_sub(1))) {
            Some(s) if s.line > 0 => format!(
                "step {i} (Dockerfile line {}: {})",
                s.line,
                s.step.describe()
            ),
            Some(s) => format!("step {i} ({})", s.step.describe()),
            None => format!("step {i}"),
        },
        Err(_) => match step {
            "base" => "the base (FROM)".to_owned(),
            "finalize" => "finalize (start and ready commands, snapshot)".to_owned(),
            other => format!("step {other}"),
        },
    }
}

/// `alcove template logs TEMPLATE BUILD_ID [--follow]`: the log so far, or until the build ends.
pub async fn logs(
    api: &ApiClient,
    template: &str,
    build_id: &str,
    follow_it: bool,
    json: bool,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<u8> {
    let template_id = resolve_id(api, template).await?;
    if follow_it {
        let status = follow(api, &template_id, build_id, None, json, out).await?;
        // The log was shown: a failed build is this command's answer (exit code 1, the reason on
        // stderr or as the `error` event), not a failure of the command itself.
        return finish(&status, None, template, json, out).or_else(|e| {
            if !json {
                eprintln!("{e:#}");
            }
            Ok(1)
        });
    }
    let mut offset = 0u64;
    let last = loop {
        let s = api
            .build_status(&template_id, build_id, offset, None)
            .await?;
        offset += s.log_entries.len() as u64;
        for e in &s.log_entries {
            if json {
                let mut v = serde_json::to_value(e)?;
                v["event"] = json!("log");
                writeln!(out, "{v}")?;
            } else {
                writeln!(
                    out,
                    "{} {} {}",
                    e.timestamp,
                    e.level.to_uppercase(),
                    e.message
                )?;
            }
        }
        if s.log_entries.is_empty() {
            break s;
        }
    };
    if json {
        writeln!(
            out,
            "{}",
            json!({"event": "status", "status": last.status, "reason": last.reason})
        )?;
    } else {
        let reason = last
            .reason
            .map(|r| {
                format!(
                    ": {}{}",
                    r.message,
                    r.step.map(|s| format!(" (step {s})")).unwrap_or_default()
                )
            })
            .unwrap_or_default();
        writeln!(out, "status: {}{reason}", last.status)?;
    }
    Ok(0)
}

/// `alcove template rm NAME|ID`.
pub async fn remove(
    api: &ApiClient,
    template: &str,
    json: bool,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<u8> {
    let id = resolve_id(api, template).await?;
    api.delete_template(&id)
        .await
        .with_context(|| format!("deleting template {template}"))?;
    if json {
        writeln!(out, "{}", json!({"deleted": id, "name": template}))?;
    } else {
        writeln!(out, "deleted template {template} ({id})")?;
    }
    Ok(0)
}

/// A template's id from its name (`GET /templates/aliases/{name}`), or the argument as it is.
async fn resolve_id(api: &ApiClient, template: &str) -> anyhow::Result<String> {
    let name = template.split(':').next().unwrap_or(template);
    Ok(match api.template_alias(name).await {
        Ok(Some(v)) => v["templateID"].as_str().unwrap_or(template).to_owned(),
        _ => template.to_owned(),
    })
}

/// `alcove template ls` against a server: the team's templates.
pub async fn list(api: &ApiClient, json: bool, out: &mut (dyn Write + Send)) -> anyhow::Result<u8> {
    let r = api.templates().await?;
    if json {
        writeln!(out, "{r}")?;
        return Ok(0);
    }
    let strs = |v: &Value| {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default()
    };
    let rows = r
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| {
            let names = match strs(&t["names"]) {
                n if n.is_empty() => strs(&t["aliases"]),
                n => n,
            };
            vec![
                super::str_of(&t["templateID"]),
                names,
                t.get("buildStatus").map(super::str_of).unwrap_or_default(),
                t["cpuCount"].to_string(),
                t["memoryMB"].to_string(),
                t.get("public").map(|p| p.to_string()).unwrap_or_default(),
            ]
        })
        .collect();
    super::table(
        out,
        &["ID", "NAMES", "STATUS", "CPUS", "MEMORY_MB", "PUBLIC"],
        rows,
    )?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_steps_are_named_with_their_dockerfile_line() {
        let plan = dockerfile::convert("FROM base\nRUN false\n", &BTreeMap::new()).unwrap();
        // USER root, WORKDIR /, then the RUN: step 3.
        assert_eq!(
            describe_step("3", Some(&plan)),
            "step 3 (Dockerfile line 2: RUN false)"
        );
        assert_eq!(describe_step("1", Some(&plan)), "step 1 (USER root)");
        assert_eq!(describe_step("base", Some(&plan)), "the base (FROM)");
        assert_eq!(describe_step("9", None), "step 9");
    }
}

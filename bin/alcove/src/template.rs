//! `alcove template build|ls|rm|logs|verify`.
//!
//! Two places hold templates: this host's cache (`~/.cache/alcove/templates`, built from trusted
//! recipes by `build NAME [--file]`, what `alcove server` serves as the stock templates) and a
//! server's API (built from a Dockerfile by `build NAME --dockerfile`, inside builder microVMs).
//! `ls` lists the server's when one is named (`--api-url` or `E2B_API_URL`), else the cache;
//! `rm` and `logs` always talk to a server (`client/build.rs`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use alcove_image::build::ProgressEvent;
use alcove_image::{BuildOptions, Recipe};

use crate::client::build::DockerfileBuild;
use crate::config::{DEFAULT_API_URL, Global};

/// The server the REST template commands talk to.
#[derive(clap::Args, Debug, Clone)]
pub struct Remote {
    /// Base URL of the Alcove API (default: http://127.0.0.1:3000 for rm/logs/--dockerfile; `ls`
    /// lists the local cache unless this or E2B_API_URL is set).
    #[arg(long, env = "E2B_API_URL")]
    pub api_url: Option<String>,
    /// API key (default: the `api-key` file in the data directory).
    #[arg(long, env = "E2B_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

impl Remote {
    fn client(&self, g: &Global) -> anyhow::Result<alcove_client::ApiClient> {
        crate::client::api_client(
            self.api_url.as_deref().unwrap_or(DEFAULT_API_URL),
            self.api_key.as_deref(),
            &g.data_dir,
        )
    }
}

#[derive(clap::Subcommand)]
pub enum TemplateCmd {
    /// Build a template: from a Dockerfile on a server (--dockerfile), or from a trusted recipe
    /// on this host (idempotent: an unchanged recipe is a cache hit).
    Build {
        /// A built-in recipe name (`base`), the recipe's name when --file is given, or the new
        /// template's name (`name` or `name:tag`) with --dockerfile.
        name: String,
        /// A recipe file (TOML) instead of the built-in one.
        #[arg(long, conflicts_with = "dockerfile")]
        file: Option<PathBuf>,
        /// Rebuild even if a build with the same inputs exists.
        #[arg(long, conflicts_with = "dockerfile")]
        force: bool,
        /// Build this Dockerfile on the server (FROM a template the server knows, or an image).
        #[arg(long)]
        dockerfile: Option<PathBuf>,
        /// The directory COPY sources are relative to (default: the Dockerfile's directory).
        #[arg(long, requires = "dockerfile")]
        context: Option<PathBuf>,
        /// A tag for the build (repeatable); `Sandbox.create("name:tag")` resolves it.
        #[arg(long = "tag", requires = "dockerfile")]
        tags: Vec<String>,
        /// `KEY=VALUE` for an ARG of the Dockerfile (repeatable).
        #[arg(long = "build-arg", value_parser = crate::client::parse_kv, requires = "dockerfile")]
        build_args: Vec<(String, String)>,
        /// vCPUs of the template's sandboxes (the server's default when unset).
        #[arg(long = "cpu", requires = "dockerfile")]
        cpu_count: Option<u32>,
        /// Memory of the template's sandboxes, MiB (the server's default when unset).
        #[arg(long, requires = "dockerfile")]
        memory_mb: Option<u32>,
        /// Run every step again instead of reusing the server's layer cache.
        #[arg(long, requires = "dockerfile")]
        no_cache: bool,
        /// The command that says the start command is ready (default with CMD/ENTRYPOINT, as
        /// the SDK's from_dockerfile: `sleep 20`).
        #[arg(long, requires = "dockerfile")]
        ready_cmd: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// List templates: the server's when --api-url or E2B_API_URL is set, else this host's cache.
    Ls {
        #[command(flatten)]
        remote: Remote,
    },
    /// Delete a template on the server (by name or id); running sandboxes keep running.
    Rm {
        template: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// A server build's log (`--follow`: until the build ends; exit code 1 if it failed).
    Logs {
        /// The template's name or id.
        template: String,
        build_id: String,
        #[arg(long, short)]
        follow: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Verify a template's checksums (device state and RAM file).
    Verify { name: String },
}

pub async fn run(g: &Global, cmd: TemplateCmd) -> anyhow::Result<u8> {
    match cmd {
        TemplateCmd::Build {
            name,
            dockerfile: Some(dockerfile),
            context,
            tags,
            build_args,
            cpu_count,
            memory_mb,
            no_cache,
            ready_cmd,
            remote,
            ..
        } => {
            let api = remote.client(g)?;
            let req = DockerfileBuild {
                name,
                dockerfile,
                context,
                tags,
                build_args: build_args.into_iter().collect::<BTreeMap<_, _>>(),
                cpu_count,
                memory_mb,
                no_cache,
                ready_cmd,
            };
            crate::client::build::build_dockerfile(&api, req, g.json, &mut std::io::stdout()).await
        }
        TemplateCmd::Build {
            name, file, force, ..
        } => {
            let recipe = match file {
                Some(f) => {
                    let r = Recipe::parse(&std::fs::read_to_string(&f)?)?;
                    if r.name != name {
                        anyhow::bail!("recipe {} is named `{}`, not `{name}`", f.display(), r.name);
                    }
                    r
                }
                None => Recipe::builtin(&name)?,
            };
            let json = g.json;
            let bar = (!json).then(|| {
                let pb = indicatif::ProgressBar::new_spinner();
                pb.enable_steady_tick(std::time::Duration::from_millis(200));
                pb
            });
            let bar2 = bar.clone();
            let progress: alcove_image::build::Progress = Arc::new(move |ev: ProgressEvent| {
                if json {
                    println!("{}", serde_json::to_string(&ev).unwrap_or_default());
                    return;
                }
                let Some(pb) = &bar2 else { return };
                match ev {
                    ProgressEvent::Step {
                        index,
                        total,
                        name,
                        cached,
                    } => {
                        pb.println(format!(
                            "[{index}/{total}] {name}{}",
                            if cached { " (cached)" } else { "" }
                        ));
                    }
                    ProgressEvent::Line { text } => pb.set_message(text),
                }
            });
            let opts = BuildOptions {
                cache_dir: g.cache_dir(),
                agent_bin: g.agent_bin()?,
                // Template builds run trusted recipes and write the template's own files (its
                // RAM and root file system) where the jail's layout does not reach yet: unjailed.
                vmm: g.vmm().without_jail(),
                force,
                progress,
                // The template VM's NIC sits on a tap in a namespace of its own, with nothing
                // behind it: no egress proxy or resolver during the build's boot.
                netns: Arc::new(|| alcove_net::Netns::create(false).map(|(ns, _)| ns.into())),
            };
            let t = alcove_image::build_template(&recipe, &opts).await?;
            if let Some(pb) = bar {
                pb.finish_and_clear();
            }
            if json {
                println!("{}", serde_json::json!({ "event": "built", "template": t }));
            } else {
                println!(
                    "template {} ready: key {}, {} vCPU, {} MiB, built in {:.1} s (agent ready {:.1} s after boot)",
                    t.name,
                    t.key,
                    t.recipe.vcpus,
                    t.recipe.memory_mib,
                    t.build_secs,
                    t.boot_to_ready_secs
                );
            }
            Ok(0)
        }
        TemplateCmd::Ls {
            remote: remote @ Remote {
                api_url: Some(_), ..
            },
        } => crate::client::build::list(&remote.client(g)?, g.json, &mut std::io::stdout()).await,
        TemplateCmd::Rm { template, remote } => {
            crate::client::build::remove(
                &remote.client(g)?,
                &template,
                g.json,
                &mut std::io::stdout(),
            )
            .await
        }
        TemplateCmd::Logs {
            template,
            build_id,
            follow,
            remote,
        } => {
            crate::client::build::logs(
                &remote.client(g)?,
                &template,
                &build_id,
                follow,
                g.json,
                &mut std::io::stdout(),
            )
            .await
        }
        TemplateCmd::Ls { .. } => {
            let ts = alcove_image::build::list_templates(&g.cache_dir());
            if g.json {
                println!("{}", serde_json::to_string(&ts)?);
            } else {
                println!(
                    "{:<24} {:<18} {:>5} {:>8} ACCEL",
                    "NAME", "KEY", "VCPUS", "MEM_MIB"
                );
                for t in ts {
                    println!(
                        "{:<24} {:<18} {:>5} {:>8} {}",
                        t.name, t.key, t.recipe.vcpus, t.recipe.memory_mib, t.accel
                    );
                }
            }
            Ok(0)
        }
        TemplateCmd::Verify { name } => {
            let t = alcove_image::load_template(&g.cache_dir(), &name)?;
            t.verify_all()?;
            if g.json {
                println!("{}", serde_json::json!({ "template": name, "ok": true }));
            } else {
                println!("template {name}: checksums match");
            }
            Ok(0)
        }
    }
}

//! `alcove template build|ls`.

use std::path::PathBuf;
use std::sync::Arc;

use alcove_image::build::ProgressEvent;
use alcove_image::{BuildOptions, Recipe};

use crate::config::Global;

#[derive(clap::Subcommand)]
pub enum TemplateCmd {
    /// Build a template (idempotent: an unchanged recipe is a cache hit).
    Build {
        /// A built-in recipe name (`base`), or the recipe's name when --file is given.
        name: String,
        /// A recipe file (TOML) instead of the built-in one.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Rebuild even if a build with the same inputs exists.
        #[arg(long)]
        force: bool,
    },
    /// List built templates.
    Ls,
    /// Verify a template's checksums (device state and RAM file).
    Verify { name: String },
}

pub async fn run(g: &Global, cmd: TemplateCmd) -> anyhow::Result<u8> {
    match cmd {
        TemplateCmd::Build { name, file, force } => {
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
        TemplateCmd::Ls => {
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

//! Guest images: the kernel, the base root file system and templates.
//!
//! A template is a [`Recipe`] (packages, files, env, start command, vCPUs, memory) turned into
//! three read-only artifacts under `<cache>/templates/<key>/`: the root disk (`disk.ext4`), the RAM
//! of a VM that booted it and reached the agent's ready line (`mem`), and that VM's device state
//! (`state`). `<key>` hashes everything that went in (recipe, base rootfs, kernel, agent binary,
//! QEMU version, accelerator), so an unchanged recipe is a cache hit and a changed input is a new
//! template; `manifest.json` is written last and marks a template complete.
//!
//! What the guest expects (the agent's path, its ready line, its network settings) comes from
//! `alcove-guest-contract`; the template VM's network namespace is made by the caller
//! ([`BuildOptions::netns`]).
//!
//! Build recipes for the kernel and the base rootfs are the shell scripts under `guest/`, embedded
//! in the binary so an installed `alcove` needs no source checkout.

pub mod build;
pub mod oci;
pub mod recipe;

pub use build::{BuildOptions, NetnsFactory, Progress, Template, build_template, load_template};
pub use recipe::Recipe;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("template recipe is invalid: {0}")]
    Recipe(String),
    #[error(
        "unknown template `{0}`: build it with `alcove template build {0}` (built-in recipes: base, code-interpreter-v1, minimal, mcp-gateway)"
    )]
    UnknownTemplate(String),
    #[error("{step} failed: {detail}")]
    Step { step: &'static str, detail: String },
    #[error("i/o on {0}")]
    Io(String, #[source] std::io::Error),
    #[error("booting the template VM")]
    Boot(#[source] alcove_vmm::VmmError),
    #[error(
        "the template VM did not print the agent's ready line within {0:?}; console tail:\n{1}"
    )]
    NotReady(std::time::Duration, String),
    /// An OCI image could not become a disk (`oci::image_disk`).
    #[error(transparent)]
    Oci(#[from] oci::OciError),
    #[error(
        "template `{name}` is corrupt: {detail}; rebuild it with `alcove template build {name} --force`"
    )]
    Corrupt { name: String, detail: String },
}

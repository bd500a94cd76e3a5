//! OCI images as the root file system of a template (`fromImage`): pull from a registry, unpack
//! the layers, inject the agent, and make a raw ext4 disk the node boots and snapshots.
//!
//! Contract (the node's builder calls [`image_disk`]); the implementation lands with issue 14's
//! OCI work.

use std::path::PathBuf;

use crate::ImageError;
use crate::build::Progress;

/// Which image, and how to reach it.
#[derive(Clone)]
pub struct PullRequest {
    /// `host[:port]/repo[:tag]` or `...@sha256:<digest>`; a bare `repo[:tag]` means Docker Hub.
    pub reference: String,
    /// Registry credentials (basic auth / token exchange); never logged.
    pub credentials: Option<(String, String)>,
}

impl std::fmt::Debug for PullRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullRequest")
            .field("reference", &self.reference)
            .field("credentials", &self.credentials.as_ref().map(|(u, _)| u))
            .finish()
    }
}

/// The operator's settings for pulls.
#[derive(Clone)]
pub struct OciOptions {
    /// Unpacked image disks are cached under `<cache_dir>/images/<digest+agent hash>/`.
    pub cache_dir: PathBuf,
    /// The `alcove-agent` binary to inject at `alcove_guest_contract::AGENT_GUEST_PATH`.
    pub agent_bin: PathBuf,
    /// `--registry-mirror`: pulls of Docker Hub images go here instead.
    pub mirror: Option<String>,
    /// Registries spoken to over plain HTTP (e.g. a local test registry `127.0.0.1:5000`).
    pub insecure_registries: Vec<String>,
    /// Cap on the compressed size of all layers together.
    pub max_download_bytes: u64,
    /// Size of the ext4 disk made from the image.
    pub disk_mib: u32,
    pub progress: Progress,
}

/// What an image declares for the processes it runs (its config's `Env`, `WorkingDir`, `User`,
/// `Entrypoint` and `Cmd`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageConfig {
    pub env: Vec<(String, String)>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
}

/// A pulled image as a bootable disk: a raw ext4 file with the image's files, the agent, a `user`
/// account (uid 1000, as E2B's images have) and the guest's resolver.
#[derive(Debug, Clone)]
pub struct ImageDisk {
    pub disk: PathBuf,
    pub disk_mib: u32,
    /// The manifest digest that was pulled (`sha256:…`).
    pub digest: String,
    pub config: ImageConfig,
}

/// Pulls `req` and makes (or finds in the cache) its disk.
pub async fn image_disk(req: &PullRequest, opts: &OciOptions) -> Result<ImageDisk, ImageError> {
    let _ = opts;
    Err(ImageError::Step {
        step: "pulling an image",
        detail: format!("{}: OCI images are not supported yet", req.reference),
    })
}

//! OCI images as the root file system of a template (`fromImage`): pull from a registry, unpack
//! the layers, inject the agent, and make a raw ext4 disk the node boots and snapshots.
//!
//! The node's builder calls [`image_disk`] for `fromImage` builds. Steps:
//! 1. resolve the reference (Docker Hub references go to `OciOptions::mirror` when set), pull the
//!    manifest with `oci-client` (an index is narrowed to its linux/amd64 entry), the config and
//!    the layers, under a cap on download bytes and a timeout on every request;
//! 2. unpack the layers in order into a rootfs dir ([`unpack`]: the image is hostile, nothing is
//!    written outside that dir, whiteouts and hard links honoured, device nodes skipped);
//! 3. add the agent with its own glibc, a `user` account, the resolver and the agent's template
//!    config ([`inject`]), then `mkfs.ext4 -d` a sparse raw disk of `disk_mib`.
//!
//! Disks are cached under `<cache_dir>/images/<key>/` (`disk.raw`, `image.json`), `<key>`
//! hashing the manifest digest, the agent binary's sha256 and the disk size, so a second pull of
//! an unchanged image only re-reads its manifest. A cached disk is handed out by path and made
//! read-only (mode 0444): the builder only reads it (to copy it or put an overlay on it), and a
//! copy of a multi-GiB image per build would cost time and space for nothing. A disk is built in
//! a temporary dir and renamed into place, so a half-made one is never found.

mod inject;
mod unpack;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use oci_client::Reference;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::manifest::OciManifest;
use oci_client::secrets::RegistryAuth;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ImageError;
use crate::build::{Progress, ProgressEvent};

pub use inject::{PRIVATE_LIB, template_json};
pub use unpack::{Limits as UnpackLimits, UnpackError, Unpacker};

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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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

/// Why an image could not become a disk. Messages say what to do next: an LLM reads them.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error(
        "`{0}` is not a valid image reference: use `host[:port]/repo[:tag]`, `repo[:tag]` (Docker Hub) or `…@sha256:<digest>`"
    )]
    BadReference(String, #[source] oci_client::ParseError),
    #[error(
        "registry {registry} is unreachable (pulling `{reference}`): this server reaches no public registry by itself, so push the image to a registry it can reach, or start the server with `--registry-mirror` (and `--insecure-registry` for a plain-HTTP one)"
    )]
    Unreachable {
        reference: String,
        registry: String,
        #[source]
        source: OciDistributionError,
    },
    #[error(
        "registry {registry} refused access to `{reference}` (HTTP 401/403): check the username and password or token given as the registry credentials, and that they may pull this repository"
    )]
    Credentials {
        reference: String,
        registry: String,
        #[source]
        source: OciDistributionError,
    },
    #[error(
        "`{reference}` was not found in registry {registry}: check the repository name and the tag (tags are case-sensitive) and that the image was pushed there"
    )]
    NotFound {
        reference: String,
        registry: String,
        #[source]
        source: OciDistributionError,
    },
    #[error(
        "`{reference}` has no linux/amd64 image (it has: {platforms}): Alcove runs x86-64 Linux images only; build and push one for linux/amd64"
    )]
    NoPlatform {
        reference: String,
        platforms: String,
    },
    #[error(
        "`{reference}` is {size} bytes of layers, over this server's cap of {cap} bytes per image download: use a smaller image"
    )]
    TooBig {
        reference: String,
        size: u64,
        cap: u64,
    },
    #[error(
        "timed out after {secs} s {what} `{reference}`: the registry is slow or unreachable from the server; try again or use a closer registry (`--registry-mirror`)"
    )]
    Timeout {
        reference: String,
        what: &'static str,
        secs: u64,
    },
    #[error("pulling `{reference}` from registry {registry} failed")]
    Registry {
        reference: String,
        registry: String,
        #[source]
        source: OciDistributionError,
    },
    #[error("`{reference}` has a config that is not a valid OCI/Docker image config")]
    Config {
        reference: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("`{reference}` cannot be unpacked")]
    Unpack {
        reference: String,
        #[source]
        source: UnpackError,
    },
    #[error("adding the agent to the image: {what}")]
    Inject {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed while making the image disk: {detail}")]
    Tool { tool: &'static str, detail: String },
    #[error("i/o on {0}")]
    Io(String, #[source] std::io::Error),
}

/// Connect, and each read of a response: a registry that stalls this long is given up on.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Whole requests: a manifest or config, and one layer.
const MANIFEST_TIMEOUT: Duration = Duration::from_secs(60);
const LAYER_TIMEOUT: Duration = Duration::from_secs(20 * 60);
const MKFS_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// An image config is a small JSON document.
const MAX_CONFIG_BYTES: u64 = 4 << 20;
/// Tar entries per image (all layers).
const MAX_ENTRIES: u64 = 1_000_000;
/// Bumped when what goes into a disk changes, so old cached disks are not reused.
const DISK_FORMAT: u32 = 1;

/// What `image.json` in a cached image dir records.
#[derive(Debug, Serialize, Deserialize)]
struct CachedImage {
    reference: String,
    digest: String,
    disk_mib: u32,
    config: ImageConfig,
}

/// Pulls `req` and makes (or finds in the cache) its disk.
pub async fn image_disk(req: &PullRequest, opts: &OciOptions) -> Result<ImageDisk, ImageError> {
    Ok(image_disk_inner(req, opts).await?)
}

async fn image_disk_inner(req: &PullRequest, opts: &OciOptions) -> Result<ImageDisk, OciError> {
    let shown = req.reference.clone();
    let reg = Registry::new(req, opts)?;
    let line = |text: String| (opts.progress)(ProgressEvent::Line { text });

    line(format!("[image] resolving {shown} on {}", reg.registry));
    let (manifest, digest, image_ref) = reg.manifest().await?;
    let declared: u64 = manifest
        .layers
        .iter()
        .map(|l| u64::try_from(l.size).unwrap_or(0))
        .sum();
    if declared > opts.max_download_bytes {
        return Err(OciError::TooBig {
            reference: shown,
            size: declared,
            cap: opts.max_download_bytes,
        });
    }

    // Hashing 10+ MiB is CPU work: off the async threads.
    let agent_bin = opts.agent_bin.clone();
    let agent_sha = tokio::task::spawn_blocking(move || crate::build::sha256_file(&agent_bin))
        .await
        .map_err(|e| OciError::Io("the hashing thread".into(), std::io::Error::other(e)))?
        .map_err(|e| {
            OciError::Io(
                opts.agent_bin.display().to_string(),
                std::io::Error::other(e),
            )
        })?;
    let key = cache_key(&digest, &agent_sha, opts.disk_mib);
    let images = opts.cache_dir.join("images");
    let dir = images.join(&key);
    if let Some(found) = cached(&dir) {
        line(format!("[image] {shown} ({digest}): cached disk {key}"));
        return Ok(found);
    }

    std::fs::create_dir_all(&images).map_err(io(&images))?;
    remove_stale_tmp(&images);
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".tmp-{key}-"))
        .tempdir_in(&images)
        .map_err(io(&images))?;

    let config_bytes = reg.config(&image_ref, &manifest).await?;
    let config = parse_config(&config_bytes).map_err(|source| OciError::Config {
        reference: shown.clone(),
        source,
    })?;

    let layers_dir = tmp.path().join("layers");
    std::fs::create_dir_all(&layers_dir).map_err(io(&layers_dir))?;
    let downloaded = Arc::new(AtomicU64::new(0));
    let mut files = Vec::new();
    for (i, layer) in manifest.layers.iter().enumerate() {
        line(format!(
            "[image] layer {}/{}: {} ({} bytes)",
            i + 1,
            manifest.layers.len(),
            layer.digest,
            layer.size
        ));
        let path = layers_dir.join(format!("{i}"));
        reg.layer(&image_ref, layer, &path, &downloaded).await?;
        files.push(path);
    }

    let root = tmp.path().join("rootfs");
    std::fs::create_dir_all(&root).map_err(io(&root))?;
    let limits = UnpackLimits {
        max_bytes: u64::from(opts.disk_mib) << 20,
        max_entries: MAX_ENTRIES,
    };
    let unpack_root = root.clone();
    let unpacked =
        tokio::task::spawn_blocking(move || -> Result<(Vec<String>, u64), UnpackError> {
            let mut u = Unpacker::new(&unpack_root, limits);
            for (i, f) in files.iter().enumerate() {
                let file = std::fs::File::open(f).map_err(|source| UnpackError::Tar {
                    layer: i + 1,
                    source,
                })?;
                u.layer_blob(i + 1, std::io::BufReader::new(file))?;
            }
            let bytes = u.bytes();
            Ok((u.finish(), bytes))
        })
        .await
        .map_err(|e| OciError::Io("the unpacking thread".into(), std::io::Error::other(e)))?;
    let (skipped, bytes) = unpacked.map_err(|source| OciError::Unpack {
        reference: shown.clone(),
        source,
    })?;
    for s in skipped.iter().take(20) {
        tracing::info!(reference = %shown, entry = %s, "image entry skipped (device node, fifo or unknown type)");
    }
    line(format!(
        "[image] unpacked {bytes} bytes of files{}",
        if skipped.is_empty() {
            String::new()
        } else {
            format!(" ({} device nodes/fifos skipped)", skipped.len())
        }
    ));
    let _ = std::fs::remove_dir_all(&layers_dir);

    let bundle = inject::agent_bundle(&opts.agent_bin, &tmp.path().join("agent")).await?;
    {
        let root = root.clone();
        let config = config.clone();
        tokio::task::spawn_blocking(move || inject::prepare(&root, &bundle, &config))
            .await
            .map_err(|e| {
                OciError::Io(
                    "the agent injection thread".into(),
                    std::io::Error::other(e),
                )
            })??;
    }

    let disk = tmp.path().join("disk.raw");
    line(format!("[image] making a {} MiB ext4 disk", opts.disk_mib));
    mkfs(&root, &disk, opts.disk_mib).await?;
    {
        // Gigabytes of files for a large image: off the async threads.
        let root = root.clone();
        tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&root).map_err(io(&root)))
            .await
            .map_err(|e| OciError::Io("the clean-up thread".into(), std::io::Error::other(e)))??;
    }
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o444))
            .map_err(io(&disk))?;
    }
    let record = CachedImage {
        reference: shown.clone(),
        digest: digest.clone(),
        disk_mib: opts.disk_mib,
        config: config.clone(),
    };
    let rec_path = tmp.path().join("image.json");
    std::fs::write(
        &rec_path,
        serde_json::to_vec_pretty(&record).expect("serialises"),
    )
    .map_err(io(&rec_path))?;

    let tmp_path = tmp.keep();
    match std::fs::rename(&tmp_path, &dir) {
        Ok(()) => {}
        // Another build of the same image won the race: use its disk.
        Err(_) if cached(&dir).is_some() => {
            let _ = std::fs::remove_dir_all(&tmp_path);
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp_path);
            return Err(OciError::Io(dir.display().to_string(), e));
        }
    }
    cached(&dir).ok_or_else(|| {
        OciError::Io(
            dir.display().to_string(),
            std::io::Error::other("the image disk vanished right after it was made"),
        )
    })
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> OciError + '_ {
    move |e| OciError::Io(path.display().to_string(), e)
}

/// Removes what builds killed mid-way left (`.tmp-*` dirs a day old: no pull takes that long).
fn remove_stale_tmp(images: &Path) {
    let Ok(dir) = std::fs::read_dir(images) else {
        return;
    };
    for e in dir.flatten() {
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(24 * 3600));
        if old && e.file_name().to_string_lossy().starts_with(".tmp-") {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn cache_key(digest: &str, agent_sha: &str, disk_mib: u32) -> String {
    let mut h = Sha256::new();
    h.update(format!(
        "alcove-oci-disk {DISK_FORMAT}\n{digest}\n{agent_sha}\n{disk_mib}\n"
    ));
    hex::encode(h.finalize())[..16].to_string()
}

fn cached(dir: &Path) -> Option<ImageDisk> {
    let rec: CachedImage =
        serde_json::from_slice(&std::fs::read(dir.join("image.json")).ok()?).ok()?;
    let disk = dir.join("disk.raw");
    disk.is_file().then_some(ImageDisk {
        disk,
        disk_mib: rec.disk_mib,
        digest: rec.digest,
        config: rec.config,
    })
}

async fn mkfs(root: &Path, disk: &Path, disk_mib: u32) -> Result<(), OciError> {
    let run = tokio::process::Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-L",
            "alcove-root",
            "-E",
            "root_owner=0:0",
            "-d",
        ])
        .arg(root)
        .arg(disk)
        .arg(format!("{disk_mib}M"))
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(MKFS_TIMEOUT, run)
        .await
        .map_err(|_| OciError::Tool {
            tool: "mkfs.ext4",
            detail: format!("timed out after {} s", MKFS_TIMEOUT.as_secs()),
        })?
        .map_err(|e| OciError::Tool {
            tool: "mkfs.ext4",
            detail: format!("cannot start: {e} (install e2fsprogs: scripts/setup-host.sh)"),
        })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(10).collect();
        return Err(OciError::Tool {
            tool: "mkfs.ext4",
            detail: format!(
                "{} (if the disk is full, give the template more disk): {}",
                out.status,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            ),
        });
    }
    Ok(())
}

/// The parts of an image config (`application/vnd.oci.image.config.v1+json`, or Docker's) that
/// Alcove uses.
#[derive(Deserialize, Default)]
struct ConfigFile {
    #[serde(default)]
    config: Option<ContainerConfig>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct ContainerConfig {
    env: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
}

/// Parses an image config's `Env`, `WorkingDir`, `User`, `Entrypoint` and `Cmd`.
pub fn parse_config(bytes: &[u8]) -> Result<ImageConfig, serde_json::Error> {
    let file: ConfigFile = serde_json::from_slice(bytes)?;
    let c = file.config.unwrap_or_default();
    Ok(ImageConfig {
        env: c
            .env
            .unwrap_or_default()
            .into_iter()
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (!k.is_empty()).then(|| (k.to_string(), v.to_string()))
            })
            .collect(),
        workdir: c.working_dir.filter(|w| !w.is_empty()),
        user: c.user.filter(|u| !u.is_empty()),
        entrypoint: c.entrypoint.unwrap_or_default(),
        cmd: c.cmd.unwrap_or_default(),
    })
}

/// One pull's client, reference and credentials.
struct Registry {
    client: oci_client::Client,
    reference: Reference,
    auth: RegistryAuth,
    shown: String,
    /// Where requests go (the mirror, for Docker Hub references when one is set).
    registry: String,
    cap: u64,
}

impl Registry {
    fn new(req: &PullRequest, opts: &OciOptions) -> Result<Self, OciError> {
        // rustls needs its crypto provider chosen once per process (ring: see Cargo.toml).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut reference: Reference = req
            .reference
            .trim()
            .parse()
            .map_err(|e| OciError::BadReference(req.reference.clone(), e))?;
        let mut insecure: Vec<String> = opts
            .insecure_registries
            .iter()
            .map(|r| strip_scheme(r).0.to_string())
            .collect();
        if let Some(mirror) = &opts.mirror
            && reference.registry() == "docker.io"
        {
            let (host, plain) = strip_scheme(mirror);
            if plain {
                insecure.push(host.to_string());
            }
            reference.set_mirror_registry(host.to_string());
        }
        let registry = reference.resolve_registry().to_string();
        let config = ClientConfig {
            protocol: ClientProtocol::HttpsExcept(insecure),
            // Indexes are resolved by hand, to say which platforms an image has when it lacks ours.
            platform_resolver: None,
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            max_concurrent_download: 2,
            ..Default::default()
        };
        Ok(Self {
            client: oci_client::Client::new(config),
            reference,
            auth: match &req.credentials {
                Some((u, p)) => RegistryAuth::Basic(u.clone(), p.clone()),
                None => RegistryAuth::Anonymous,
            },
            shown: req.reference.clone(),
            registry,
            cap: opts.max_download_bytes,
        })
    }

    fn classify(&self, e: OciDistributionError) -> OciError {
        use OciDistributionError as E;
        let reference = self.shown.clone();
        let registry = self.registry.clone();
        let kind =
            match &e {
                E::RequestError(r) if r.is_connect() || r.is_timeout() => 'u',
                E::UnauthorizedError { .. } | E::AuthenticationFailure(_) => 'c',
                E::ServerError {
                    code: 401 | 403, ..
                } => 'c',
                E::ServerError { code: 404, .. } | E::ImageManifestNotFoundError(_) => 'n',
                E::RegistryError { envelope, .. } => {
                    if envelope.errors.iter().any(|x| {
                        matches!(x.code, OciErrorCode::Unauthorized | OciErrorCode::Denied)
                    }) {
                        'c'
                    } else if envelope.errors.iter().any(|x| {
                        matches!(
                            x.code,
                            OciErrorCode::ManifestUnknown
                                | OciErrorCode::NameUnknown
                                | OciErrorCode::NotFound
                        )
                    }) {
                        'n'
                    } else {
                        'r'
                    }
                }
                _ => 'r',
            };
        match kind {
            'u' => OciError::Unreachable {
                reference,
                registry,
                source: e,
            },
            'c' => OciError::Credentials {
                reference,
                registry,
                source: e,
            },
            'n' => OciError::NotFound {
                reference,
                registry,
                source: e,
            },
            _ => OciError::Registry {
                reference,
                registry,
                source: e,
            },
        }
    }

    fn timeout(&self, what: &'static str, t: Duration) -> OciError {
        OciError::Timeout {
            reference: self.shown.clone(),
            what,
            secs: t.as_secs(),
        }
    }

    /// The image manifest (an index narrowed to linux/amd64), its digest, and the reference to
    /// pull its blobs by.
    async fn manifest(
        &self,
    ) -> Result<(oci_client::manifest::OciImageManifest, String, Reference), OciError> {
        let (m, digest) = tokio::time::timeout(
            MANIFEST_TIMEOUT,
            self.client.pull_manifest(&self.reference, &self.auth),
        )
        .await
        .map_err(|_| self.timeout("reading the manifest of", MANIFEST_TIMEOUT))?
        .map_err(|e| self.classify(e))?;
        match m {
            OciManifest::Image(m) => Ok((m, digest, self.reference.clone())),
            OciManifest::ImageIndex(index) => {
                let entry = index.manifests.iter().find(|e| {
                    e.platform.as_ref().is_some_and(|p| {
                        // Compared by their names: oci-client does not re-export oci-spec's enums.
                        p.os.to_string() == "linux" && p.architecture.to_string() == "amd64"
                    })
                });
                let Some(entry) = entry else {
                    let platforms: Vec<String> = index
                        .manifests
                        .iter()
                        .filter_map(|e| e.platform.as_ref())
                        .map(|p| format!("{}/{}", p.os, p.architecture))
                        .collect();
                    return Err(OciError::NoPlatform {
                        reference: self.shown.clone(),
                        platforms: if platforms.is_empty() {
                            "none declared".into()
                        } else {
                            platforms.join(", ")
                        },
                    });
                };
                let by_digest = self.reference.clone_with_digest(entry.digest.clone());
                let (m, digest) = tokio::time::timeout(
                    MANIFEST_TIMEOUT,
                    self.client.pull_manifest(&by_digest, &self.auth),
                )
                .await
                .map_err(|_| self.timeout("reading the linux/amd64 manifest of", MANIFEST_TIMEOUT))?
                .map_err(|e| self.classify(e))?;
                match m {
                    OciManifest::Image(m) => Ok((m, digest, by_digest)),
                    OciManifest::ImageIndex(_) => Err(OciError::NoPlatform {
                        reference: self.shown.clone(),
                        platforms: "an index nested in an index".into(),
                    }),
                }
            }
        }
    }

    async fn config(
        &self,
        image: &Reference,
        manifest: &oci_client::manifest::OciImageManifest,
    ) -> Result<Vec<u8>, OciError> {
        if u64::try_from(manifest.config.size).unwrap_or(u64::MAX) > MAX_CONFIG_BYTES {
            return Err(OciError::TooBig {
                reference: self.shown.clone(),
                size: u64::try_from(manifest.config.size).unwrap_or(u64::MAX),
                cap: MAX_CONFIG_BYTES,
            });
        }
        let counter = Arc::new(AtomicU64::new(0));
        let mut out = Capped {
            inner: Vec::new(),
            total: counter,
            cap: MAX_CONFIG_BYTES,
        };
        tokio::time::timeout(
            MANIFEST_TIMEOUT,
            self.client.pull_blob(image, &manifest.config, &mut out),
        )
        .await
        .map_err(|_| self.timeout("reading the config of", MANIFEST_TIMEOUT))?
        .map_err(|e| self.classify(e))?;
        Ok(out.inner)
    }

    /// Downloads one layer to `path`, adding its bytes to `total` (all layers) under the cap.
    async fn layer(
        &self,
        image: &Reference,
        layer: &oci_client::manifest::OciDescriptor,
        path: &Path,
        total: &Arc<AtomicU64>,
    ) -> Result<(), OciError> {
        let file = tokio::fs::File::create(path).await.map_err(io(path))?;
        let mut out = Capped {
            inner: tokio::io::BufWriter::new(file),
            total: total.clone(),
            cap: self.cap,
        };
        let r = tokio::time::timeout(LAYER_TIMEOUT, self.client.pull_blob(image, layer, &mut out))
            .await
            .map_err(|_| self.timeout("downloading a layer of", LAYER_TIMEOUT))?;
        if total.load(Ordering::Relaxed) > self.cap {
            return Err(OciError::TooBig {
                reference: self.shown.clone(),
                size: total.load(Ordering::Relaxed),
                cap: self.cap,
            });
        }
        r.map_err(|e| self.classify(e))
    }
}

/// `http://host` → (`host`, plain); `https://host` or `host` → (`host`, false).
fn strip_scheme(s: &str) -> (&str, bool) {
    let s = s.trim().trim_end_matches('/');
    if let Some(h) = s.strip_prefix("http://") {
        (h, true)
    } else {
        (s.strip_prefix("https://").unwrap_or(s), false)
    }
}

/// A writer that fails once the bytes written through all writers sharing `total` pass `cap`.
struct Capped<W> {
    inner: W,
    total: Arc<AtomicU64>,
    cap: u64,
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Capped<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let after = self.total.load(Ordering::Relaxed) + buf.len() as u64;
        if after > self.cap {
            self.total.store(after, Ordering::Relaxed);
            return std::task::Poll::Ready(Err(std::io::Error::other(
                "over the image download cap",
            )));
        }
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            self.total.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_fields_are_parsed() {
        let c = parse_config(
            br#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin:/usr/bin","A=b=c","bad"],"WorkingDir":"/www","User":"","Entrypoint":null,"Cmd":["/bin/busybox","httpd","-f"]}}"#,
        )
        .unwrap();
        assert_eq!(
            c.env,
            vec![
                ("PATH".to_string(), "/bin:/usr/bin".to_string()),
                ("A".to_string(), "b=c".to_string())
            ]
        );
        assert_eq!(c.workdir.as_deref(), Some("/www"));
        assert_eq!(c.user, None);
        assert!(c.entrypoint.is_empty());
        assert_eq!(c.cmd, ["/bin/busybox", "httpd", "-f"]);
        assert_eq!(parse_config(b"{}").unwrap(), ImageConfig::default());
        assert!(parse_config(b"[1]").is_err());
    }

    #[test]
    fn references_mirror_and_schemes() {
        let opts = |mirror: Option<&str>| OciOptions {
            cache_dir: "/nonexistent".into(),
            agent_bin: "/nonexistent".into(),
            mirror: mirror.map(str::to_string),
            insecure_registries: vec!["http://127.0.0.1:5000".into()],
            max_download_bytes: 1,
            disk_mib: 64,
            progress: Arc::new(|_| {}),
        };
        let req = |r: &str| PullRequest {
            reference: r.into(),
            credentials: None,
        };
        let r = Registry::new(&req("busybox:1"), &opts(Some("http://10.0.0.1:5000"))).unwrap();
        assert_eq!(r.registry, "10.0.0.1:5000");
        let r = Registry::new(&req("busybox"), &opts(None)).unwrap();
        assert_eq!(r.registry, "index.docker.io");
        // A non-Docker-Hub reference ignores the mirror.
        let r = Registry::new(&req("127.0.0.1:5000/a/b:1"), &opts(Some("m:1"))).unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        let err = Registry::new(&req("UPPER/Case::x"), &opts(None))
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("not a valid image reference"),
            "{err}"
        );
        assert_eq!(strip_scheme("http://h:1/"), ("h:1", true));
        assert_eq!(strip_scheme("h:1"), ("h:1", false));
    }

    #[test]
    fn cache_key_covers_digest_agent_and_size() {
        let a = cache_key("sha256:1", "aa", 512);
        assert_ne!(a, cache_key("sha256:2", "aa", 512));
        assert_ne!(a, cache_key("sha256:1", "ab", 512));
        assert_ne!(a, cache_key("sha256:1", "aa", 1024));
        assert_eq!(a.len(), 16);
    }
}

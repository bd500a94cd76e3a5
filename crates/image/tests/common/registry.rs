//! A real OCI registry for tests (Debian's `docker-registry`, started privately on a free
//! 127.0.0.1 port with its own storage and config, no system service) and test images built here
//! and pushed with oci-client. Shared by `tests/oci.rs` and `examples/push-test-images.rs`
//! (which `tests/registry/start.sh` runs for the SDK-level tests).

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::OciImageManifest;
use oci_client::secrets::RegistryAuth;

pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";
/// The test image the SDK tests use: busybox serving `/www` over HTTP on port 8080.
pub const BUSYBOX_HTTPD: &str = "alcove-test/busybox-httpd:1";
/// The same image, on a registry that wants credentials.
pub const PRIVATE: &str = "alcove-test/private:1";

/// A running registry; killed on drop.
pub struct Registry {
    child: Child,
    pub addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The registry's config: storage in `dir`, listening on `addr`, htpasswd auth when `htpasswd`.
pub fn config_yaml(dir: &Path, addr: &str, htpasswd: Option<&Path>) -> String {
    let mut c = format!(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
        dir.join("data").display()
    );
    if let Some(h) = htpasswd {
        c.push_str(&format!(
            "auth:\n  htpasswd:\n    realm: alcove-test\n    path: {}\n",
            h.display()
        ));
    }
    c
}

impl Registry {
    /// Starts a registry; with `credentials`, it requires them (htpasswd, bcrypt via apache2-utils'
    /// `htpasswd`).
    pub fn start(credentials: Option<(&str, &str)>) -> Registry {
        assert!(
            Path::new(REGISTRY_BIN).exists(),
            "{REGISTRY_BIN} is missing: apt-get install docker-registry (scripts/setup-host.sh)"
        );
        let dir = tempfile::tempdir().unwrap();
        let htpasswd = credentials.map(|(u, p)| {
            let out = Command::new("htpasswd")
                .args(["-Bbn", u, p])
                .output()
                .expect("htpasswd (apache2-utils) runs");
            assert!(out.status.success());
            let path = dir.path().join("htpasswd");
            std::fs::write(&path, out.stdout).unwrap();
            path
        });
        let addr = format!("127.0.0.1:{}", free_port());
        let cfg = dir.path().join("config.yml");
        std::fs::write(&cfg, config_yaml(dir.path(), &addr, htpasswd.as_deref())).unwrap();
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry starts");
        let reg = Registry {
            child,
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(&reg.addr).is_err() {
            assert!(Instant::now() < deadline, "registry did not listen in 15 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        reg
    }
}

/// A tar stream built in memory.
pub struct Layer(tar::Builder<Vec<u8>>);

impl Default for Layer {
    fn default() -> Self {
        Self::new()
    }
}

impl Layer {
    pub fn new() -> Self {
        Layer(tar::Builder::new(Vec::new()))
    }
    fn header(kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_mtime(1_700_000_000);
        h
    }
    /// Writes the name raw (so tests can write hostile ones).
    fn raw(mut self, mut h: tar::Header, path: &str, link: Option<&str>, body: &[u8]) -> Self {
        let name = &mut h.as_old_mut().name;
        assert!(path.len() < name.len());
        name[..path.len()].copy_from_slice(path.as_bytes());
        if let Some(l) = link {
            let ln = &mut h.as_old_mut().linkname;
            ln[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_cksum();
        self.0.append(&h, body).unwrap();
        self
    }
    pub fn file(self, path: &str, mode: u32, body: &[u8]) -> Self {
        let h = Self::header(tar::EntryType::Regular, body.len() as u64, mode);
        self.raw(h, path, None, body)
    }
    pub fn dir(self, path: &str) -> Self {
        let h = Self::header(tar::EntryType::Directory, 0, 0o755);
        self.raw(h, path, None, &[])
    }
    pub fn symlink(self, path: &str, target: &str) -> Self {
        let h = Self::header(tar::EntryType::Symlink, 0, 0o777);
        self.raw(h, path, Some(target), &[])
    }
    pub fn hardlink(self, path: &str, target: &str) -> Self {
        let h = Self::header(tar::EntryType::Link, 0, 0o644);
        self.raw(h, path, Some(target), &[])
    }
    pub fn device(self, path: &str) -> Self {
        let h = Self::header(tar::EntryType::Char, 0, 0o666);
        self.raw(h, path, None, &[])
    }
    pub fn tar(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
    pub fn gzip(self) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&self.tar()).unwrap();
        e.finish().unwrap()
    }
}

/// The busybox image: Debian busybox-static's `/bin/busybox`, applet links, a page in `/www`.
pub fn busybox_layer() -> Layer {
    let busybox = std::fs::read("/bin/busybox")
        .expect("/bin/busybox (Debian's busybox-static: scripts/setup-host.sh)");
    let mut l = Layer::new()
        .dir("bin/")
        .file("bin/busybox", 0o755, &busybox);
    for applet in [
        "sh", "ls", "cat", "echo", "httpd", "id", "env", "pwd", "mkdir", "sleep", "wget", "ps",
    ] {
        l = l.symlink(&format!("bin/{applet}"), "busybox");
    }
    l.dir("www/")
        .file("www/index.html", 0o644, b"hello from busybox-httpd\n")
}

/// The busybox image's config: `Env`, `WorkingDir`, `Cmd`.
pub fn busybox_config() -> serde_json::Value {
    serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/bin:/usr/bin", "GREETING=hello"],
            "WorkingDir": "/www",
            "Cmd": ["/bin/busybox", "httpd", "-f", "-p", "8080", "-h", "/www"]
        },
        "rootfs": {"type": "layers", "diff_ids": []}
    })
}

pub fn client() -> oci_client::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    oci_client::Client::new(ClientConfig {
        protocol: ClientProtocol::Http,
        ..Default::default()
    })
}

/// Pushes an image of `layers` (gzipped tars) and `config` as `addr/reference`.
pub async fn push(
    addr: &str,
    reference: &str,
    layers: Vec<Vec<u8>>,
    config: &serde_json::Value,
    credentials: Option<(&str, &str)>,
) -> String {
    let r: oci_client::Reference = format!("{addr}/{reference}").parse().unwrap();
    let layers: Vec<ImageLayer> = layers
        .into_iter()
        .map(|l| ImageLayer::oci_v1_gzip(l, None))
        .collect();
    let config = Config::oci_v1(serde_json::to_vec(config).unwrap(), None);
    let manifest = OciImageManifest::build(&layers, &config, None);
    let auth = match credentials {
        Some((u, p)) => RegistryAuth::Basic(u.into(), p.into()),
        None => RegistryAuth::Anonymous,
    };
    client()
        .push(&r, &layers, config, &auth, Some(manifest))
        .await
        .unwrap_or_else(|e| panic!("push {reference} to {addr}: {e}"))
        .manifest_url
}

/// Pushes the standard test images: [`BUSYBOX_HTTPD`], and [`PRIVATE`] when `credentials`.
pub async fn push_test_images(addr: &str, credentials: Option<(&str, &str)>) {
    let image = if credentials.is_some() {
        PRIVATE
    } else {
        BUSYBOX_HTTPD
    };
    push(
        addr,
        image,
        vec![busybox_layer().gzip()],
        &busybox_config(),
        credentials,
    )
    .await;
}

/// The host's kernel for test VMs: the newest built one in the cache.
pub fn cached_kernel(cache: &Path) -> Option<PathBuf> {
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(cache.join("kernel"))
        .ok()?
        .flatten()
        .map(|e| e.path().join("vmlinux"))
        .filter(|p| p.is_file())
        .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p)
}

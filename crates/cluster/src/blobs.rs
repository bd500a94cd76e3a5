//! The cluster's blob store: where a paused sandbox's files go so that another node can resume
//! it (its node drained or lost), and where each snapshot's and template's go so that sandboxes
//! can be made from them on any node. Behind the `object_store` API: a shared directory
//! (`file:///path`) or an S3 bucket (`s3://bucket/prefix`); any backend of that crate fits the
//! same calls.
//!
//! Layout: `<kind>/<id>/<file>` for each file (`paused/` for paused sandboxes, `snapshots/` for
//! snapshots, `templates/` for template builds by key), then `<kind>/<id>/manifest.json`
//! (names, sizes, SHA-256s), written last: an entry whose manifest is there is complete. A
//! download checks every file's size and SHA-256 against the manifest before it is used.

use std::path::Path;
use std::sync::Arc;

use futures::StreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, WriteMultipart};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

const MANIFEST: &str = "manifest.json";
/// Part size of uploads.
const CHUNK: usize = 8 << 20;
/// Largest manifest read (a few file names and hashes).
const MAX_MANIFEST: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error(
        "--blob-store {0}: use file:///absolute/path (a directory every node shares) or \
         s3://bucket[/prefix] (credentials, region and endpoint from the AWS_* environment)"
    )]
    Url(String),
    #[error("the blob store")]
    Store(#[from] object_store::Error),
    #[error("i/o on {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} in the blob store is damaged: {detail}")]
    Corrupt { what: String, detail: String },
    #[error("no complete copy of {0} is in the blob store")]
    Missing(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BlobError + '_ {
    move |source| BlobError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A blob store failure as the API's error: the backend call failed, with this as its cause.
impl From<BlobError> for alcove_api::backend::BackendError {
    fn from(e: BlobError) -> Self {
        alcove_api::backend::BackendError::Failed {
            op: "the blob store",
            source: Box::new(e),
        }
    }
}

/// What an entry of the store is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A paused sandbox: its record, disk and memory image.
    Paused,
    /// A snapshot: its disk layer (flattened onto the template's disk), memory image and meta.
    Snapshot,
    /// A template build, by its key: manifest, device state, RAM file, kernel and disk.
    Template,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Paused => "paused",
            Kind::Snapshot => "snapshots",
            Kind::Template => "templates",
        }
    }

    fn noun(self, id: &str) -> String {
        match self {
            Kind::Paused => format!("sandbox {id}"),
            Kind::Snapshot => format!("snapshot {id}"),
            Kind::Template => format!("template build {id}"),
        }
    }
}

/// One file of a stored entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The sandbox's or snapshot's id, or the template's build key.
    #[serde(alias = "sandbox_id")]
    pub id: String,
    pub files: Vec<FileEntry>,
}

#[derive(Clone)]
pub struct Blobs {
    store: Arc<dyn ObjectStore>,
    url: String,
}

impl std::fmt::Debug for Blobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Blobs({})", self.url)
    }
}

fn key(kind: Kind, id: &str, name: &str) -> ObjPath {
    ObjPath::from(format!("{}/{id}/{name}", kind.prefix()))
}

impl Blobs {
    /// `file:///absolute/dir` (made if missing), or `s3://bucket[/prefix]`: an S3-compatible
    /// bucket, configured as the AWS tools are (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_REGION`, and `AWS_ENDPOINT` for a store other than Amazon's; `AWS_ALLOW_HTTP=true`
    /// to reach one without TLS).
    pub fn open(url: &str) -> Result<Blobs, BlobError> {
        let bad = || BlobError::Url(url.to_owned());
        let store: Arc<dyn ObjectStore> = if let Some(dir) = url.strip_prefix("file://") {
            if !dir.starts_with('/') {
                return Err(bad());
            }
            std::fs::create_dir_all(dir).map_err(io(Path::new(dir)))?;
            Arc::new(object_store::local::LocalFileSystem::new_with_prefix(dir)?)
        } else if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let prefix = prefix.trim_matches('/');
            if bucket.is_empty() || url.contains(['?', '#']) {
                return Err(bad());
            }
            let s3 = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .build()?;
            if prefix.is_empty() {
                Arc::new(s3)
            } else {
                Arc::new(object_store::prefix::PrefixStore::new(s3, prefix))
            }
        } else {
            return Err(bad());
        };
        Ok(Blobs {
            store,
            url: url.to_owned(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Uploads `files` (name, path) as entry `id` of `kind`, then its manifest; answers the
    /// manifest.
    pub async fn put(
        &self,
        kind: Kind,
        id: &str,
        files: &[(String, std::path::PathBuf)],
    ) -> Result<Manifest, BlobError> {
        // A previous, possibly partial copy goes first: the manifest must never describe
        // files of another upload.
        self.delete(kind, id).await?;
        let mut entries = Vec::new();
        for (name, path) in files {
            let (size, sha256) = self.put_file(&key(kind, id, name), path).await?;
            entries.push(FileEntry {
                name: name.clone(),
                size,
                sha256,
            });
        }
        let manifest = Manifest {
            id: id.to_owned(),
            files: entries,
        };
        let body = serde_json::to_vec(&manifest).expect("a manifest serializes");
        self.store
            .put(&key(kind, id, MANIFEST), body.into())
            .await?;
        Ok(manifest)
    }

    /// Uploads the file at `path` as `to`; answers its size and SHA-256. A file of one part or
    /// less goes in one request (a multipart upload needs at least one part).
    async fn put_file(&self, to: &ObjPath, path: &Path) -> Result<(u64, String), BlobError> {
        let mut f = tokio::fs::File::open(path).await.map_err(io(path))?;
        let len = f.metadata().await.map_err(io(path))?.len();
        let mut sha = Sha256::new();
        if len <= CHUNK as u64 {
            let mut body = Vec::with_capacity(len as usize);
            (&mut f)
                .take(CHUNK as u64 + 1)
                .read_to_end(&mut body)
                .await
                .map_err(io(path))?;
            if body.len() <= CHUNK {
                sha.update(&body);
                let size = body.len() as u64;
                self.store.put(to, body.into()).await?;
                return Ok((size, hex::encode(sha.finalize())));
            }
            // It grew meanwhile: the multipart upload below, from the start.
            f.rewind().await.map_err(io(path))?;
        }
        let upload = self.store.put_multipart(to).await?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, CHUNK);
        let mut size = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f.read(&mut buf).await.map_err(io(path))?;
            if n == 0 {
                break;
            }
            sha.update(&buf[..n]);
            size += n as u64;
            w.wait_for_capacity(4).await?;
            w.write(&buf[..n]);
        }
        w.finish().await?;
        Ok((size, hex::encode(sha.finalize())))
    }

    async fn manifest(&self, kind: Kind, id: &str) -> Result<Manifest, BlobError> {
        let what = || format!("the manifest of {}", kind.noun(id));
        let got = match self.store.get(&key(kind, id, MANIFEST)).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(BlobError::Missing(kind.noun(id)));
            }
            Err(e) => return Err(e.into()),
        };
        if got.meta.size > MAX_MANIFEST as u64 {
            return Err(BlobError::Corrupt {
                what: what(),
                detail: "it is larger than 1 MiB".into(),
            });
        }
        let bytes = got.bytes().await?;
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| BlobError::Corrupt {
            what: what(),
            detail: e.to_string(),
        })?;
        if m.id != id {
            return Err(BlobError::Corrupt {
                what: what(),
                detail: format!("it describes {:?}", m.id),
            });
        }
        Ok(m)
    }

    /// Whether a complete copy of entry `id` of `kind` is stored.
    pub async fn has(&self, kind: Kind, id: &str) -> Result<bool, BlobError> {
        match self.store.head(&key(kind, id, MANIFEST)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Downloads entry `id` of `kind` into `dir` (made, owner-only), each file checked against
    /// the manifest; a file that does not match fails the whole download and nothing is kept.
    pub async fn get(&self, kind: Kind, id: &str, dir: &Path) -> Result<Manifest, BlobError> {
        let manifest = self.manifest(kind, id).await?;
        let result = self.download(kind, id, &manifest, dir).await;
        if result.is_err() {
            let _ = tokio::fs::remove_dir_all(dir).await;
        }
        result.map(|()| manifest)
    }

    async fn download(
        &self,
        kind: Kind,
        id: &str,
        m: &Manifest,
        dir: &Path,
    ) -> Result<(), BlobError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
        for e in &m.files {
            if e.name.contains('/') || e.name.starts_with('.') || e.name == MANIFEST {
                return Err(BlobError::Corrupt {
                    what: format!("the manifest of {}", kind.noun(id)),
                    detail: format!("it names a file {:?}", e.name),
                });
            }
            let path = dir.join(&e.name);
            let mut out = tokio::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .await
                .map_err(io(&path))?;
            let mut stream = self.store.get(&key(kind, id, &e.name)).await?.into_stream();
            let mut sha = Sha256::new();
            let mut size = 0u64;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                size += chunk.len() as u64;
                if size > e.size {
                    break;
                }
                sha.update(&chunk);
                // Runs of zeros (most of a memory image) stay holes in the file.
                if chunk.iter().all(|b| *b == 0) {
                    out.seek(std::io::SeekFrom::Current(chunk.len() as i64))
                        .await
                        .map_err(io(&path))?;
                } else {
                    out.write_all(&chunk).await.map_err(io(&path))?;
                }
            }
            out.flush().await.map_err(io(&path))?;
            out.set_len(size.min(e.size)).await.map_err(io(&path))?;
            let got = hex::encode(sha.finalize());
            if size != e.size || got != e.sha256 {
                return Err(BlobError::Corrupt {
                    what: format!("{} of {}", e.name, kind.noun(id)),
                    detail: format!(
                        "{size} bytes with SHA-256 {got}; the manifest says {} bytes, {}",
                        e.size, e.sha256
                    ),
                });
            }
        }
        Ok(())
    }

    /// Removes every stored file of entry `id` of `kind` (the manifest first).
    pub async fn delete(&self, kind: Kind, id: &str) -> Result<(), BlobError> {
        let _ = self.store.delete(&key(kind, id, MANIFEST)).await;
        let prefix = ObjPath::from(format!("{}/{id}", kind.prefix()));
        let metas: Vec<_> = self.store.list(Some(&prefix)).collect().await;
        for m in metas {
            match self.store.delete(&m?.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// The entries of `kind` with a complete copy.
    pub async fn list(&self, kind: Kind) -> Result<Vec<String>, BlobError> {
        let prefix = ObjPath::from(kind.prefix());
        let metas: Vec<_> = self.store.list(Some(&prefix)).collect().await;
        let mut ids = Vec::new();
        for m in metas {
            let loc = m?.location;
            let parts: Vec<_> = loc.parts().collect();
            if parts.len() == 3 && parts[2].as_ref() == MANIFEST {
                ids.push(parts[1].as_ref().to_owned());
            }
        }
        ids.sort();
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Paused sandboxes and snapshots go up and come back checked, through `blobs`.
    async fn round_trip(blobs: &Blobs) {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        let big: Vec<u8> = (0..(9 << 20)).map(|i| (i % 251) as u8).collect();
        std::fs::write(src.join("paused.state"), &big).unwrap();
        std::fs::write(src.join("record.json"), b"{}").unwrap();
        std::fs::write(src.join("empty.log"), b"").unwrap();
        // Zeros, then data, then zeros to the end: holes in the copy, the same bytes.
        let mut ram = vec![0u8; 6 << 20];
        ram[(3 << 20) + 17] = 9;
        std::fs::write(src.join("ram"), &ram).unwrap();
        let files = vec![
            ("paused.state".to_owned(), src.join("paused.state")),
            ("ram".to_owned(), src.join("ram")),
            ("record.json".to_owned(), src.join("record.json")),
            ("empty.log".to_owned(), src.join("empty.log")),
        ];
        let p = Kind::Paused;
        assert!(!blobs.has(p, "sb1").await.unwrap());
        let m = blobs.put(p, "sb1", &files).await.unwrap();
        assert_eq!(m.files[0].size, big.len() as u64);
        assert!(blobs.has(p, "sb1").await.unwrap());
        assert_eq!(blobs.list(p).await.unwrap(), vec!["sb1".to_owned()]);
        // The kinds are apart: a snapshot of the same id is another entry.
        assert!(!blobs.has(Kind::Snapshot, "sb1").await.unwrap());
        assert!(blobs.list(Kind::Snapshot).await.unwrap().is_empty());
        blobs.put(Kind::Snapshot, "sb1", &files[2..]).await.unwrap();
        assert_eq!(blobs.list(Kind::Snapshot).await.unwrap(), ["sb1"]);

        let out = dir.path().join("out");
        blobs.get(p, "sb1", &out).await.unwrap();
        assert_eq!(std::fs::read(out.join("paused.state")).unwrap(), big);
        assert_eq!(std::fs::read(out.join("ram")).unwrap(), ram);
        assert_eq!(std::fs::read(out.join("empty.log")).unwrap(), b"");
        {
            use std::os::unix::fs::MetadataExt;
            let md = std::fs::metadata(out.join("ram")).unwrap();
            assert!(
                md.blocks() * 512 < 1 << 20,
                "{} bytes allocated",
                md.blocks() * 512
            );
        }

        // One flipped byte in the store: the download fails and leaves nothing.
        let stored = key(p, "sb1", "paused.state");
        let mut bytes = blobs
            .store
            .get(&stored)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec();
        bytes[12345] ^= 1;
        blobs.store.put(&stored, bytes.into()).await.unwrap();
        let out2 = dir.path().join("out2");
        let e = blobs.get(p, "sb1", &out2).await.unwrap_err();
        assert!(e.to_string().contains("damaged"), "{e}");
        assert!(!out2.exists());

        // A manifest copied under another id is refused.
        let (from, to) = (
            key(Kind::Snapshot, "sb1", MANIFEST),
            key(Kind::Snapshot, "sb2", MANIFEST),
        );
        blobs.store.copy(&from, &to).await.unwrap();
        let e = blobs
            .get(Kind::Snapshot, "sb2", &dir.path().join("out3"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("damaged"), "{e}");

        for (kind, id) in [(p, "sb1"), (Kind::Snapshot, "sb1"), (Kind::Snapshot, "sb2")] {
            blobs.delete(kind, id).await.unwrap();
            assert!(!blobs.has(kind, id).await.unwrap());
        }
        assert!(blobs.list(Kind::Snapshot).await.unwrap().is_empty());
        assert!(matches!(
            blobs.get(p, "sb1", &out2).await,
            Err(BlobError::Missing(_))
        ));
    }

    #[tokio::test]
    async fn a_shared_directory_carries_sandboxes_and_snapshots_checked() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::open(&format!("file://{}", dir.path().join("store").display())).unwrap();
        round_trip(&blobs).await;
        for bad in [
            "ftp://bucket",
            "file://relative/dir",
            "s3://",
            "s3://bucket?endpoint=x",
        ] {
            assert!(matches!(Blobs::open(bad), Err(BlobError::Url(_))), "{bad}");
        }
    }

    /// Against an S3-compatible server when `ALCOVE_TEST_S3_URL` names a bucket of one
    /// (`scripts/with-s3.sh`: moto's); the test suite runs it so.
    #[tokio::test]
    async fn an_s3_bucket_carries_sandboxes_and_snapshots_checked() {
        let Ok(url) = std::env::var("ALCOVE_TEST_S3_URL") else {
            eprintln!("no ALCOVE_TEST_S3_URL: run under scripts/with-s3.sh for the S3 store");
            return;
        };
        let blobs = Blobs::open(&url).unwrap();
        round_trip(&blobs).await;
    }
}

//! The cluster's blob store: where a paused sandbox's files go so that another node can resume
//! it (its node drained or lost). Behind the `object_store` API: a shared directory
//! (`file:///path`) here; any backend of that crate fits the same calls.
//!
//! Layout: `paused/<sandbox id>/<file>` for each file, then `paused/<sandbox id>/manifest.json`
//! (names, sizes, SHA-256s), written last: a sandbox whose manifest is there is complete. A
//! download checks every file's size and SHA-256 against the manifest before it is used.

use std::path::Path;
use std::sync::Arc;

use futures::StreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, WriteMultipart};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

const MANIFEST: &str = "manifest.json";
/// Part size of uploads.
const CHUNK: usize = 8 << 20;
/// Largest manifest read (a few file names and hashes).
const MAX_MANIFEST: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("--blob-store {0}: only file:///absolute/path is supported by this build")]
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
    #[error("no complete copy of sandbox {0} is in the blob store")]
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

/// One file of a stored sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub sandbox_id: String,
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

fn key(sandbox_id: &str, name: &str) -> ObjPath {
    ObjPath::from(format!("paused/{sandbox_id}/{name}"))
}

impl Blobs {
    /// `file:///absolute/dir` (made if missing).
    pub fn open(url: &str) -> Result<Blobs, BlobError> {
        let dir = url
            .strip_prefix("file://")
            .filter(|d| d.starts_with('/'))
            .ok_or_else(|| BlobError::Url(url.to_owned()))?;
        std::fs::create_dir_all(dir).map_err(io(Path::new(dir)))?;
        let store = object_store::local::LocalFileSystem::new_with_prefix(dir)?;
        Ok(Blobs {
            store: Arc::new(store),
            url: url.to_owned(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Uploads `files` (name, path) as sandbox `id`, then its manifest; answers the manifest.
    pub async fn put_sandbox(
        &self,
        id: &str,
        files: &[(String, std::path::PathBuf)],
    ) -> Result<Manifest, BlobError> {
        // A previous, possibly partial copy goes first: the manifest must never describe
        // files of another upload.
        self.delete_sandbox(id).await?;
        let mut entries = Vec::new();
        for (name, path) in files {
            let mut f = tokio::fs::File::open(path).await.map_err(io(path))?;
            let upload = self.store.put_multipart(&key(id, name)).await?;
            let mut w = WriteMultipart::new_with_chunk_size(upload, CHUNK);
            let mut sha = Sha256::new();
            let mut size = 0u64;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = tokio::io::AsyncReadExt::read(&mut f, &mut buf)
                    .await
                    .map_err(io(path))?;
                if n == 0 {
                    break;
                }
                sha.update(&buf[..n]);
                size += n as u64;
                w.wait_for_capacity(4).await?;
                w.write(&buf[..n]);
            }
            w.finish().await?;
            entries.push(FileEntry {
                name: name.clone(),
                size,
                sha256: hex::encode(sha.finalize()),
            });
        }
        let manifest = Manifest {
            sandbox_id: id.to_owned(),
            files: entries,
        };
        let body = serde_json::to_vec(&manifest).expect("a manifest serializes");
        self.store.put(&key(id, MANIFEST), body.into()).await?;
        Ok(manifest)
    }

    async fn manifest(&self, id: &str) -> Result<Manifest, BlobError> {
        let got = match self.store.get(&key(id, MANIFEST)).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(BlobError::Missing(id.to_owned()));
            }
            Err(e) => return Err(e.into()),
        };
        if got.meta.size > MAX_MANIFEST as u64 {
            return Err(BlobError::Corrupt {
                what: format!("the manifest of {id}"),
                detail: "it is larger than 1 MiB".into(),
            });
        }
        let bytes = got.bytes().await?;
        serde_json::from_slice(&bytes).map_err(|e| BlobError::Corrupt {
            what: format!("the manifest of {id}"),
            detail: e.to_string(),
        })
    }

    /// Whether a complete copy of sandbox `id` is stored.
    pub async fn has_sandbox(&self, id: &str) -> Result<bool, BlobError> {
        match self.store.head(&key(id, MANIFEST)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Downloads sandbox `id` into `dir` (made, owner-only), each file checked against the
    /// manifest; a file that does not match fails the whole download and nothing is kept.
    pub async fn get_sandbox(&self, id: &str, dir: &Path) -> Result<Manifest, BlobError> {
        let manifest = self.manifest(id).await?;
        let result = self.download(id, &manifest, dir).await;
        if result.is_err() {
            let _ = tokio::fs::remove_dir_all(dir).await;
        }
        result.map(|()| manifest)
    }

    async fn download(&self, id: &str, m: &Manifest, dir: &Path) -> Result<(), BlobError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
        for e in &m.files {
            if e.name.contains('/') || e.name.starts_with('.') || e.name == MANIFEST {
                return Err(BlobError::Corrupt {
                    what: format!("the manifest of {id}"),
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
            let mut stream = self.store.get(&key(id, &e.name)).await?.into_stream();
            let mut sha = Sha256::new();
            let mut size = 0u64;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk?;
                size += chunk.len() as u64;
                if size > e.size {
                    break;
                }
                sha.update(&chunk);
                out.write_all(&chunk).await.map_err(io(&path))?;
            }
            out.flush().await.map_err(io(&path))?;
            let got = hex::encode(sha.finalize());
            if size != e.size || got != e.sha256 {
                return Err(BlobError::Corrupt {
                    what: format!("{} of sandbox {id}", e.name),
                    detail: format!(
                        "{size} bytes with SHA-256 {got}; the manifest says {} bytes, {}",
                        e.size, e.sha256
                    ),
                });
            }
        }
        Ok(())
    }

    /// Removes every stored file of sandbox `id` (the manifest first).
    pub async fn delete_sandbox(&self, id: &str) -> Result<(), BlobError> {
        let _ = self.store.delete(&key(id, MANIFEST)).await;
        let prefix = ObjPath::from(format!("paused/{id}"));
        let metas: Vec<_> = self.store.list(Some(&prefix)).collect().await;
        for m in metas {
            match self.store.delete(&m?.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// The sandboxes with a complete copy.
    pub async fn sandboxes(&self) -> Result<Vec<String>, BlobError> {
        let prefix = ObjPath::from("paused");
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

    #[tokio::test]
    async fn a_sandbox_goes_up_and_comes_back_checked() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = Blobs::open(&format!("file://{}", dir.path().join("store").display())).unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        let big: Vec<u8> = (0..(9 << 20)).map(|i| (i % 251) as u8).collect();
        std::fs::write(src.join("paused.state"), &big).unwrap();
        std::fs::write(src.join("record.json"), b"{}").unwrap();
        let files = vec![
            ("paused.state".to_owned(), src.join("paused.state")),
            ("record.json".to_owned(), src.join("record.json")),
        ];
        assert!(!blobs.has_sandbox("sb1").await.unwrap());
        let m = blobs.put_sandbox("sb1", &files).await.unwrap();
        assert_eq!(m.files[0].size, big.len() as u64);
        assert!(blobs.has_sandbox("sb1").await.unwrap());
        assert_eq!(blobs.sandboxes().await.unwrap(), vec!["sb1".to_owned()]);

        let out = dir.path().join("out");
        blobs.get_sandbox("sb1", &out).await.unwrap();
        assert_eq!(std::fs::read(out.join("paused.state")).unwrap(), big);

        // One flipped byte in the store: the download fails and leaves nothing.
        let stored = dir.path().join("store/paused/sb1/paused.state");
        let mut bytes = std::fs::read(&stored).unwrap();
        bytes[12345] ^= 1;
        std::fs::write(&stored, bytes).unwrap();
        let out2 = dir.path().join("out2");
        let e = blobs.get_sandbox("sb1", &out2).await.unwrap_err();
        assert!(e.to_string().contains("damaged"), "{e}");
        assert!(!out2.exists());

        blobs.delete_sandbox("sb1").await.unwrap();
        assert!(!blobs.has_sandbox("sb1").await.unwrap());
        assert!(matches!(
            blobs.get_sandbox("sb1", &out2).await,
            Err(BlobError::Missing(_))
        ));
        assert!(Blobs::open("s3://bucket").is_err());
    }
}

//! Secrets at rest, and the egress proxy's way to their values.
//!
//! Every version of a secret's value is sealed with AES-256-GCM under one server key
//! ([`SecretKey`], 32 random bytes in `<data-dir>/secrets.key`, made owner-only on first start
//! and refused when it is not 32 bytes), with a random 96-bit nonce per version and
//! `team id, secret id, version` as associated data, so a ciphertext moved to another secret,
//! team or version does not open. The store (`alcove_store` `secrets.rs`) holds only nonces and
//! ciphertext; decrypted values live in [`Zeroizing`] buffers and are never logged, audited or
//! sent in a response.
//!
//! [`StoreSecrets`] is the [`SecretSource`] the egress proxy asks, per request, for the current
//! value of a secret of a sandbox's team: one indexed query and one decryption.
//!
//! The same key also yields, through a derived HMAC-SHA256 key that is never used for anything
//! else, the volume content tokens ([`SecretKey::volume_token`]): stored nowhere, the same for a
//! volume across restarts, useless for any other volume.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use alcove_net::secrets::{SecretLookupError, SecretSource, SecretValue};
use alcove_store::{SealedValue, Store};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::error::chain;

/// The key file in the data directory. Losing it loses every stored secret.
pub const KEY_FILE: &str = "secrets.key";
/// AES-256: the key's length in bytes.
pub const KEY_LEN: usize = 32;
/// What starts every volume token.
pub const VOLUME_TOKEN_PREFIX: &str = "vtok_";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading the secrets key {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error(
        "the secrets key {path} holds {len} bytes, not {KEY_LEN}: restore the original file from \
         a backup (secrets stored under it cannot be read without it), or move it away to start \
         with a new key and no readable secrets"
    )]
    WrongSize { path: PathBuf, len: usize },
    #[error("creating the secrets key {0}")]
    Create(PathBuf, #[source] std::io::Error),
    #[error("the system's random number generator failed")]
    Random,
    #[error("opening the store")]
    Store(#[source] alcove_store::StoreError),
}

/// Sealing or opening a value failed.
#[derive(Debug, thiserror::Error)]
pub enum CipherError {
    #[error("the system's random number generator failed")]
    Random,
    #[error("encrypting a secret value")]
    Seal,
    /// Wrong key, or a ciphertext that is not this secret's version (or was changed).
    #[error("a stored secret value does not decrypt under this server's key")]
    Open,
}

/// The server's secrets key. `Debug` shows nothing of it.
pub struct SecretKey {
    key: LessSafeKey,
    /// HMAC-SHA256 key for volume tokens, derived from the key's bytes with its own label so
    /// the AES key is never used as a MAC key.
    volume_mac: hmac::Key,
    rng: SystemRandom,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(..)")
    }
}

impl SecretKey {
    /// Reads the key at `path`, or makes one (32 bytes from the system's RNG, the file created
    /// 0600 and synced) if there is none. A key file open to group or others is narrowed to
    /// 0600; one of the wrong size is refused.
    pub fn load_or_create(path: &Path) -> Result<SecretKey, KeyError> {
        use std::io::{Read, Write};
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        match std::fs::File::open(path) {
            Ok(mut f) => {
                let mut bytes = Zeroizing::new(Vec::with_capacity(KEY_LEN));
                // One byte more than a key: enough to tell a longer file.
                (&mut f)
                    .take(KEY_LEN as u64 + 1)
                    .read_to_end(&mut bytes)
                    .map_err(|e| KeyError::Read(path.into(), e))?;
                if bytes.len() != KEY_LEN {
                    let len = f
                        .metadata()
                        .map(|m| m.len() as usize)
                        .unwrap_or(bytes.len());
                    return Err(KeyError::WrongSize {
                        path: path.into(),
                        len,
                    });
                }
                let mode = f
                    .metadata()
                    .map_err(|e| KeyError::Read(path.into(), e))?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                        .map_err(|e| KeyError::Read(path.into(), e))?;
                    tracing::warn!(path = %path.display(), "the secrets key was readable by others; narrowed it to 0600");
                }
                Self::from_bytes(&bytes)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let rng = SystemRandom::new();
                let mut bytes = Zeroizing::new([0u8; KEY_LEN]);
                rng.fill(&mut bytes[..]).map_err(|_| KeyError::Random)?;
                let create = || -> std::io::Result<()> {
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(path)?;
                    f.write_all(&bytes[..])?;
                    f.sync_all()
                };
                match create() {
                    Ok(()) => {
                        tracing::info!(path = %path.display(), "created the secrets key");
                        Self::from_bytes(&bytes[..])
                    }
                    // Made by someone else between the two calls: use theirs.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        Self::load_or_create(path)
                    }
                    Err(e) => Err(KeyError::Create(path.into(), e)),
                }
            }
            Err(e) => Err(KeyError::Read(path.into(), e)),
        }
    }

    /// A key from its 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<SecretKey, KeyError> {
        let unbound = UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| KeyError::WrongSize {
            path: PathBuf::new(),
            len: bytes.len(),
        })?;
        let derive = hmac::Key::new(hmac::HMAC_SHA256, bytes);
        let volume_key = hmac::sign(&derive, b"alcove/volume-token-key/v1");
        Ok(SecretKey {
            key: LessSafeKey::new(unbound),
            volume_mac: hmac::Key::new(hmac::HMAC_SHA256, volume_key.as_ref()),
            rng: SystemRandom::new(),
        })
    }

    /// The token of the volume content API for `volume_id`: `vtok_` and the hex of
    /// HMAC-SHA256("alcove volume token v1:" + id) under the derived volume key.
    pub fn volume_token(&self, volume_id: &str) -> String {
        let tag = hmac::sign(&self.volume_mac, &volume_token_message(volume_id));
        format!("{VOLUME_TOKEN_PREFIX}{}", hex::encode(tag.as_ref()))
    }

    /// Whether `token` is `volume_id`'s token, compared in constant time.
    pub fn verify_volume_token(&self, volume_id: &str, token: &str) -> bool {
        let Some(tag) = token
            .strip_prefix(VOLUME_TOKEN_PREFIX)
            .and_then(|h| hex::decode(h).ok())
        else {
            return false;
        };
        hmac::verify(&self.volume_mac, &volume_token_message(volume_id), &tag).is_ok()
    }

    /// Encrypts version `version` of the team's secret `secret_id` under a fresh nonce.
    pub fn seal(
        &self,
        team_id: &str,
        secret_id: &str,
        version: i64,
        value: &[u8],
    ) -> Result<SealedValue, CipherError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| CipherError::Random)?;
        let mut buf = value.to_vec();
        let aad = aad(team_id, secret_id, version);
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad),
                &mut buf,
            )
            .map_err(|_| CipherError::Seal)?;
        Ok(SealedValue {
            nonce: nonce.to_vec(),
            ciphertext: buf,
        })
    }

    /// Decrypts what [`SecretKey::seal`] made for the same team, secret and version.
    pub fn open(
        &self,
        team_id: &str,
        secret_id: &str,
        version: i64,
        sealed: &SealedValue,
    ) -> Result<Zeroizing<Vec<u8>>, CipherError> {
        let nonce =
            Nonce::try_assume_unique_for_key(&sealed.nonce).map_err(|_| CipherError::Open)?;
        let mut buf = Zeroizing::new(sealed.ciphertext.clone());
        let aad = aad(team_id, secret_id, version);
        let len = self
            .key
            .open_in_place(nonce, Aad::from(&aad), &mut buf)
            .map_err(|_| CipherError::Open)?
            .len();
        buf.truncate(len);
        Ok(buf)
    }
}

fn volume_token_message(volume_id: &str) -> Vec<u8> {
    format!("alcove volume token v1:{volume_id}").into_bytes()
}

/// The associated data of one version: which team, secret and version it belongs to. Ids never
/// hold a NUL, so the encoding is unambiguous.
fn aad(team_id: &str, secret_id: &str, version: i64) -> Vec<u8> {
    format!("alcove-secret/v1\0{team_id}\0{secret_id}\0{version}").into_bytes()
}

/// The egress proxy's [`SecretSource`]: the server's store and key. Cheap to clone.
#[derive(Clone)]
pub struct StoreSecrets {
    store: Arc<Store>,
    key: Arc<SecretKey>,
}

impl std::fmt::Debug for StoreSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StoreSecrets(..)")
    }
}

impl StoreSecrets {
    pub fn new(store: Arc<Store>, key: Arc<SecretKey>) -> Self {
        StoreSecrets { store, key }
    }

    /// Over the server's data directory, before the server starts (the node's egress proxy is
    /// made first): its own connection to the store `db` (migrated, as [`Store::connect`]
    /// does) and the key in `<data_dir>/secrets.key`, made if missing.
    /// [`crate::Server::bind`] then finds the same key.
    pub fn open(data_dir: &Path, db: &alcove_store::Database) -> Result<Self, KeyError> {
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(data_dir)
                .map_err(|e| KeyError::Create(data_dir.into(), e))?;
        }
        let key = SecretKey::load_or_create(&data_dir.join(KEY_FILE))?;
        let store = Store::connect(db).map_err(KeyError::Store)?;
        Ok(StoreSecrets::new(Arc::new(store), Arc::new(key)))
    }

    /// The current value of the secret `name` (lower-cased here too) of the team that owns
    /// `sandbox_id`.
    pub async fn lookup(
        &self,
        sandbox_id: &str,
        name: &str,
    ) -> Result<SecretValue, SecretLookupError> {
        let name = name.to_lowercase();
        let (store, sbx, n) = (self.store.clone(), sandbox_id.to_owned(), name.clone());
        let found = tokio::task::spawn_blocking(move || store.sandbox_secret(&sbx, &n))
            .await
            .map_err(|_| SecretLookupError::Unavailable("the lookup task failed".into()))?
            .map_err(|e| {
                tracing::error!(sandbox_id, error = %chain(&e), "secrets: store lookup failed");
                SecretLookupError::Unavailable("the secret store could not be read".into())
            })?;
        let Some(s) = found else {
            return Err(SecretLookupError::NotFound(name));
        };
        self.key
            .open(&s.team_id, &s.secret_id, s.version, &s.sealed)
            .map_err(|e| {
                tracing::error!(
                    sandbox_id,
                    secret_id = %s.secret_id,
                    version = s.version,
                    error = %chain(&e),
                    "secrets: a stored value does not decrypt (was secrets.key replaced?)"
                );
                SecretLookupError::Unavailable(format!(
                    "the secret {name:?} could not be decrypted; the server log has the cause"
                ))
            })
    }
}

impl SecretSource for StoreSecrets {
    fn resolve<'a>(
        &'a self,
        sandbox_id: &'a str,
        name: &'a str,
    ) -> alcove_net::secrets::Resolving<'a> {
        Box::pin(self.lookup(sandbox_id, name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_open_only_for_their_own_team_secret_and_version() {
        let key = SecretKey::from_bytes(&[7u8; KEY_LEN]).unwrap();
        let a = key.seal("t1", "sec_1", 1, b"hunter2").unwrap();
        let b = key.seal("t1", "sec_1", 1, b"hunter2").unwrap();
        assert_ne!(a.nonce, b.nonce, "a fresh nonce per seal");
        assert_eq!(a.nonce.len(), 12);
        assert!(!a.ciphertext.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(&key.open("t1", "sec_1", 1, &a).unwrap()[..], b"hunter2");
        for (t, s, v) in [("t2", "sec_1", 1), ("t1", "sec_2", 1), ("t1", "sec_1", 2)] {
            assert!(matches!(key.open(t, s, v, &a), Err(CipherError::Open)));
        }
        let other = SecretKey::from_bytes(&[8u8; KEY_LEN]).unwrap();
        assert!(matches!(
            other.open("t1", "sec_1", 1, &a),
            Err(CipherError::Open)
        ));
        let mut tampered = a.clone();
        tampered.ciphertext[0] ^= 1;
        assert!(key.open("t1", "sec_1", 1, &tampered).is_err());
    }

    #[test]
    fn volume_tokens_are_stable_per_volume_and_key_and_checked() {
        let key = SecretKey::from_bytes(&[7u8; KEY_LEN]).unwrap();
        let t = key.volume_token("vol_1");
        assert!(t.starts_with("vtok_") && t.len() == 5 + 64, "{t}");
        assert_eq!(
            SecretKey::from_bytes(&[7u8; KEY_LEN])
                .unwrap()
                .volume_token("vol_1"),
            t,
            "the same after a restart"
        );
        assert!(key.verify_volume_token("vol_1", &t));
        assert!(!key.verify_volume_token("vol_2", &t), "another volume's");
        assert_ne!(key.volume_token("vol_2"), t);
        let other = SecretKey::from_bytes(&[8u8; KEY_LEN]).unwrap();
        assert!(!other.verify_volume_token("vol_1", &t), "another key's");
        for bad in ["", "vtok_", "vtok_zz", &t[5..], &t[..t.len() - 2]] {
            assert!(!key.verify_volume_token("vol_1", bad), "{bad:?}");
        }
    }

    #[test]
    fn the_key_file_is_made_owner_only_reused_and_checked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        let key = SecretKey::load_or_create(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), KEY_LEN as u64);
        let sealed = key.seal("t", "sec_1", 1, b"v").unwrap();
        let again = SecretKey::load_or_create(&path).unwrap();
        assert_eq!(&again.open("t", "sec_1", 1, &sealed).unwrap()[..], b"v");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        SecretKey::load_or_create(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::write(&path, [1u8; 16]).unwrap();
        let err = SecretKey::load_or_create(&path).unwrap_err();
        assert!(matches!(err, KeyError::WrongSize { len: 16, .. }), "{err}");
        assert!(err.to_string().contains("not 32"));
    }
}

//! The desired set the agent holds: built from the hub's full sets and deltas,
//! and kept on disk, encrypted with a local key, so that the agent goes on
//! syncing and serving through hub outages and its own restarts.
//!
//! Applying hub messages is pure ([`DesiredSet::from_full`],
//! [`DesiredSet::apply_delta`]); [`DesiredFile`] is the only part with I/O.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use imgfleet::api::v1 as pb;
use rand::RngCore as _;
use serde::{Deserialize, Serialize};

/// One image, pinned by digest, that the cluster must hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredImage {
    /// `<namespace>/<repository name>@<digest>`.
    pub key: String,
    /// Namespace and name of the Repository it comes from.
    pub source: (String, String),
    /// Key of the credential to pull with.
    pub registry_key: String,
    /// Registry host and optional port.
    pub registry: String,
    /// Repository path inside the registry.
    pub repository: String,
    /// Manifest or index digest.
    pub digest: String,
    /// Tags the mirror serves for it.
    pub tags: Vec<String>,
    /// Platforms to fetch from an index; empty means all.
    pub platforms: Vec<String>,
    /// Versions of the repository to keep; 0 means the agent default.
    pub keep_versions: u32,
    /// Grace period before collection, in seconds; 0 means the agent default.
    pub grace_period_seconds: u64,
}

/// How to reach one registry. The password is redacted from `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryCredential {
    /// `<namespace>/<RegistrySecret name>`.
    pub key: String,
    /// Registry host and optional port.
    pub domain: String,
    /// User name; empty for anonymous pulls.
    pub username: String,
    /// Password; empty for anonymous pulls.
    pub password: String,
    /// Plain HTTP.
    pub insecure: bool,
}

impl fmt::Debug for RegistryCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegistryCredential")
            .field("key", &self.key)
            .field("domain", &self.domain)
            .field("username", &self.username)
            .field(
                "password",
                &if self.password.is_empty() {
                    ""
                } else {
                    "<redacted>"
                },
            )
            .field("insecure", &self.insecure)
            .finish()
    }
}

/// The complete desired set at one generation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredSet {
    /// Grows with every change within an epoch; 0 means "none held yet".
    pub generation: u64,
    /// The hub store the generations come from.
    pub epoch: String,
    /// Images by key.
    pub images: BTreeMap<String, DesiredImage>,
    /// Credentials by key.
    pub registries: BTreeMap<String, RegistryCredential>,
}

/// Why a delta cannot be applied: the agent must ask for a full set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    /// The delta starts from another generation than the one held.
    #[error("delta from generation {from} does not apply to held generation {held}")]
    WrongBase { held: u64, from: u64 },
    /// The delta belongs to another hub store.
    #[error("delta of epoch {got:?} does not apply to held epoch {held:?}")]
    WrongEpoch { held: String, got: String },
    /// The delta does not move forward.
    #[error("delta to generation {to} does not move past {from}")]
    NotForward { from: u64, to: u64 },
}

impl From<pb::DesiredImage> for DesiredImage {
    fn from(i: pb::DesiredImage) -> Self {
        let source = i.source.map(|s| (s.namespace, s.name)).unwrap_or_default();
        DesiredImage {
            key: i.key,
            source,
            registry_key: i.registry_key,
            registry: i.registry,
            repository: i.repository,
            digest: i.digest,
            tags: i.tags,
            platforms: i.platforms,
            keep_versions: i.keep_versions,
            grace_period_seconds: i.grace_period_seconds,
        }
    }
}

impl From<pb::RegistryCredential> for RegistryCredential {
    fn from(c: pb::RegistryCredential) -> Self {
        RegistryCredential {
            key: c.key,
            domain: c.domain,
            username: c.username,
            password: c.password,
            insecure: c.insecure,
        }
    }
}

impl DesiredSet {
    /// The set a full `DesiredSet` message describes.
    pub fn from_full(set: pb::DesiredSet) -> DesiredSet {
        DesiredSet {
            generation: set.generation,
            epoch: set.epoch,
            images: set
                .images
                .into_iter()
                .map(|i| (i.key.clone(), DesiredImage::from(i)))
                .collect(),
            registries: set
                .registries
                .into_iter()
                .map(|c| (c.key.clone(), RegistryCredential::from(c)))
                .collect(),
        }
    }

    /// The set after a delta, or why the delta does not fit what is held.
    pub fn apply_delta(&self, delta: pb::DesiredSetDelta) -> Result<DesiredSet, DeltaError> {
        if delta.epoch != self.epoch {
            return Err(DeltaError::WrongEpoch {
                held: self.epoch.clone(),
                got: delta.epoch,
            });
        }
        if delta.from_generation != self.generation {
            return Err(DeltaError::WrongBase {
                held: self.generation,
                from: delta.from_generation,
            });
        }
        if delta.generation <= delta.from_generation {
            return Err(DeltaError::NotForward {
                from: delta.from_generation,
                to: delta.generation,
            });
        }
        let mut next = self.clone();
        next.generation = delta.generation;
        for key in &delta.removals {
            next.images.remove(key);
        }
        for image in delta.upserts {
            next.images.insert(image.key.clone(), image.into());
        }
        for key in &delta.registry_removals {
            next.registries.remove(key);
        }
        for cred in delta.registry_upserts {
            next.registries.insert(cred.key.clone(), cred.into());
        }
        Ok(next)
    }
}

/// Errors reading or writing the desired-set file.
#[derive(Debug, thiserror::Error)]
pub enum DesiredFileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The desired set on disk: `desired.bin` sealed with AES-256-GCM under a key
/// in `local.key` (mode 0600), both in the agent's data directory. Writes go
/// to a temporary file that is fsynced and renamed over the old one, so a
/// crash leaves either the old set or the new one, never half of either.
pub struct DesiredFile {
    path: PathBuf,
    cipher: Aes256Gcm,
}

impl fmt::Debug for DesiredFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DesiredFile")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

const MAGIC: &[u8; 8] = b"IMGFDS1\n";
const NONCE_LEN: usize = 12;

impl DesiredFile {
    /// Opens the file in `data_dir`, creating the local key on first use.
    pub fn open(data_dir: &Path) -> Result<DesiredFile, DesiredFileError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| DesiredFileError::Io { path, source }
        };
        std::fs::create_dir_all(data_dir).map_err(io(data_dir))?;
        let key_path = data_dir.join("local.key");
        let key = match std::fs::read(&key_path) {
            Ok(bytes) => {
                check_private(&key_path)?;
                let bytes: [u8; 32] =
                    bytes
                        .try_into()
                        .map_err(|b: Vec<u8>| DesiredFileError::Invalid {
                            path: key_path.clone(),
                            message: format!("expected a 32-byte key, found {} bytes", b.len()),
                        })?;
                bytes
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                rand::rng().fill_bytes(&mut key);
                write_atomic(&key_path, &key)?;
                key
            }
            Err(e) => return Err(io(&key_path)(e)),
        };
        Ok(DesiredFile {
            path: data_dir.join("desired.bin"),
            cipher: Aes256Gcm::new(&key.into()),
        })
    }

    /// Where the sealed set lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The held set; an empty set (generation 0) when none was saved yet.
    pub fn load(&self) -> Result<DesiredSet, DesiredFileError> {
        let sealed = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(DesiredSet::default()),
            Err(source) => {
                return Err(DesiredFileError::Io {
                    path: self.path.clone(),
                    source,
                });
            }
        };
        let invalid = |message: &str| DesiredFileError::Invalid {
            path: self.path.clone(),
            message: message.to_string(),
        };
        let body = sealed
            .strip_prefix(MAGIC.as_slice())
            .filter(|b| b.len() > NONCE_LEN)
            .ok_or_else(|| invalid("not an imgfleet desired-set file"))?;
        let (nonce, ciphertext) = body.split_at(NONCE_LEN);
        let plain = self
            .cipher
            .decrypt(Nonce::from_slice(nonce), ciphertext)
            .map_err(|_| {
                invalid("cannot be decrypted with local.key (wrong key or damaged file)")
            })?;
        serde_json::from_slice(&plain).map_err(|e| invalid(&format!("damaged content: {e}")))
    }

    /// Seals and saves a set, durably.
    pub fn save(&self, set: &DesiredSet) -> Result<(), DesiredFileError> {
        let plain = serde_json::to_vec(set).map_err(|e| DesiredFileError::Invalid {
            path: self.path.clone(),
            message: format!("cannot encode: {e}"),
        })?;
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let ciphertext = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), plain.as_slice())
            .map_err(|_| DesiredFileError::Invalid {
                path: self.path.clone(),
                message: "encryption failed".into(),
            })?;
        let mut out = Vec::with_capacity(MAGIC.len() + NONCE_LEN + ciphertext.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ciphertext);
        write_atomic(&self.path, &out)
    }
}

/// Refuses a key file that others can read.
fn check_private(path: &Path) -> Result<(), DesiredFileError> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path)
        .map_err(|source| DesiredFileError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(DesiredFileError::Invalid {
            path: path.to_path_buf(),
            message: format!(
                "mode {:o} lets others read the key: expected 0600",
                mode & 0o777
            ),
        });
    }
    Ok(())
}

/// Writes `bytes` to `path` with mode 0600: temporary file, fsync, rename, fsync of the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DesiredFileError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let io = |source| DesiredFileError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(key: &str, digest: &str) -> pb::DesiredImage {
        pb::DesiredImage {
            key: key.into(),
            source: Some(pb::ObjectRef {
                name: "app".into(),
                namespace: "default".into(),
            }),
            registry_key: "default/harbor".into(),
            registry: "127.0.0.1:5000".into(),
            repository: "demo/app".into(),
            digest: digest.into(),
            tags: vec!["v1".into()],
            ..Default::default()
        }
    }

    fn credential(password: &str) -> pb::RegistryCredential {
        pb::RegistryCredential {
            key: "default/harbor".into(),
            domain: "127.0.0.1:5000".into(),
            username: "admin".into(),
            password: password.into(),
            insecure: true,
            provider: pb::Provider::Harbor as i32,
        }
    }

    fn full(generation: u64) -> DesiredSet {
        DesiredSet::from_full(pb::DesiredSet {
            generation,
            epoch: "e1".into(),
            images: vec![image("default/app@sha256:a", "sha256:a")],
            registries: vec![credential("Harbor12345")],
        })
    }

    #[test]
    fn deltas_apply_only_on_their_base() {
        let held = full(3);
        let delta = pb::DesiredSetDelta {
            from_generation: 3,
            generation: 4,
            epoch: "e1".into(),
            upserts: vec![image("default/app@sha256:b", "sha256:b")],
            removals: vec!["default/app@sha256:a".into()],
            ..Default::default()
        };
        let next = held
            .apply_delta(delta.clone())
            .expect("delta on its base applies");
        assert_eq!(next.generation, 4);
        assert_eq!(
            next.images.keys().collect::<Vec<_>>(),
            ["default/app@sha256:b"]
        );
        assert_eq!(
            next.registries.len(),
            1,
            "credentials untouched by the delta stay"
        );

        let stale = next
            .apply_delta(delta.clone())
            .expect_err("the same delta twice");
        assert_eq!(stale, DeltaError::WrongBase { held: 4, from: 3 });
        let other_epoch = pb::DesiredSetDelta {
            epoch: "e2".into(),
            ..delta.clone()
        };
        assert!(matches!(
            held.apply_delta(other_epoch),
            Err(DeltaError::WrongEpoch { .. })
        ));
        let backwards = pb::DesiredSetDelta {
            generation: 3,
            ..delta
        };
        assert!(matches!(
            held.apply_delta(backwards),
            Err(DeltaError::NotForward { .. })
        ));
    }

    #[test]
    fn saved_set_survives_reopen_and_hides_the_password() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = DesiredFile::open(dir.path()).expect("open");
        assert_eq!(file.load().expect("empty load").generation, 0);
        let set = full(7);
        file.save(&set).expect("save");

        let raw = std::fs::read(file.path()).expect("read sealed file");
        let needle = b"Harbor12345";
        assert!(
            !raw.windows(needle.len()).any(|w| w == needle),
            "the password is in the file in plaintext"
        );
        assert!(
            !format!("{set:?}").contains("Harbor12345"),
            "Debug shows the password"
        );

        let reopened = DesiredFile::open(dir.path()).expect("reopen");
        assert_eq!(reopened.load().expect("load"), set);

        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join("local.key"))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn damaged_or_foreign_files_are_refused_with_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = DesiredFile::open(dir.path()).expect("open");
        file.save(&full(1)).expect("save");
        let mut raw = std::fs::read(file.path()).expect("read");
        let last = raw.len() - 1;
        raw[last] ^= 0xff;
        std::fs::write(file.path(), &raw).expect("tamper");
        let err = file.load().expect_err("tampered file");
        assert!(err.to_string().contains("desired.bin"), "{err}");
        assert!(err.to_string().contains("decrypted"), "{err}");

        std::fs::write(file.path(), b"hello").expect("write junk");
        let err = file.load().expect_err("junk");
        assert!(
            err.to_string().contains("not an imgfleet desired-set file"),
            "{err}"
        );

        use std::os::unix::fs::PermissionsExt as _;
        let key = dir.path().join("local.key");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = DesiredFile::open(dir.path()).expect_err("world-readable key");
        assert!(err.to_string().contains("0600"), "{err}");
    }
}

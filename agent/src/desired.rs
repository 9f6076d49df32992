//! The desired set the agent holds: built from the hub's full sets and deltas,
//! and kept on disk, encrypted with a local key, so that the agent goes on
//! syncing and serving through hub outages and its own restarts.
//!
//! Applying a delta is pure ([`DesiredSet::apply_delta`]) over the agent's
//! own types; the hub's messages become them in [`crate::wire`], and
//! [`DesiredFile`] is the only part with I/O.
//!
//! The serde form of [`DesiredSet`] is what `desired.bin` holds (sealed):
//! renaming, reordering or retyping a field changes what an agent written
//! by an earlier version can load. `tests/stored_formats.rs` loads a file
//! written by version 0.1.0.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use imgfleet_common::registry::Credentials;
use rand::RngCore as _;
use serde::{Deserialize, Serialize};

use crate::gc::Retention;
use crate::transfer::Pull;

/// One image, pinned by digest, that the cluster must hold: the one shape of
/// an image from the hub's message to the transfer engine and GC.
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
    /// W3C `traceparent` of the change that produced the entry, which the
    /// image's sync span joins; empty when the hub exports no traces (and then
    /// not written: held sets of earlier versions load unchanged).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub trace_context: String,
    /// Public keys (name, PEM) one of which must have signed the image
    /// (cosign) before it becomes visible; empty: no check. Sets written
    /// before signatures were checked have none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verify_keys: Vec<(String, String)>,
}

impl DesiredImage {
    /// Its Repository's retention (zero fields: the agent's defaults).
    pub fn retention(&self) -> Retention {
        Retention {
            keep_versions: self.keep_versions,
            grace_period_seconds: self.grace_period_seconds,
        }
    }
}

/// How to reach one registry. The password is redacted from `Debug`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryCredential {
    /// `<namespace>/<RegistrySecret name>`.
    pub key: String,
    /// Registry host and optional port.
    pub domain: String,
    /// User name; empty for anonymous pulls.
    pub username: String,
    /// Password; empty for anonymous pulls.
    pub password: Password,
    /// Plain HTTP.
    pub insecure: bool,
}

impl RegistryCredential {
    /// What to pull with: `None` (anonymous) without a user name.
    pub fn credentials(&self) -> Option<Credentials> {
        (!self.username.is_empty())
            .then(|| Credentials::new(self.username.clone(), self.password.expose().to_owned()))
    }
}

/// A registry password. `Debug` shows only whether one is set, so a logged
/// credential never leaks it; serde sees the plain string, so `desired.bin`
/// (sealed as a whole) keeps its format.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Password(pub String);

impl Password {
    /// The password itself, for the registry client.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Password {
    fn from(password: String) -> Self {
        Self(password)
    }
}

impl From<&str> for Password {
    fn from(password: &str) -> Self {
        Self(password.to_owned())
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() {
            "\"\""
        } else {
            "<redacted>"
        })
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

/// Changes that turn the set at `from_generation` into the set at
/// `generation`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delta {
    /// The generation the changes apply to.
    pub from_generation: u64,
    /// The generation after them.
    pub generation: u64,
    /// The epoch of both.
    pub epoch: String,
    /// Images added or changed, matched by key.
    pub upserts: Vec<DesiredImage>,
    /// Keys of images no longer desired.
    pub removals: Vec<String>,
    /// Credentials added or changed, matched by key.
    pub registry_upserts: Vec<RegistryCredential>,
    /// Keys of credentials no longer needed.
    pub registry_removals: Vec<String>,
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

impl DesiredSet {
    /// The set after a delta, or why the delta does not fit what is held.
    pub fn apply_delta(&self, delta: Delta) -> Result<DesiredSet, DeltaError> {
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
            next.images.insert(image.key.clone(), image);
        }
        for key in &delta.registry_removals {
            next.registries.remove(key);
        }
        for cred in delta.registry_upserts {
            next.registries.insert(cred.key.clone(), cred);
        }
        Ok(next)
    }

    /// What the engine needs to bring one image in: the image and the
    /// credential its `registry_key` names (anonymous over HTTPS when the
    /// set holds none).
    pub fn pull(&self, image: &DesiredImage) -> Pull {
        let cred = self.registries.get(&image.registry_key);
        Pull {
            image: image.clone(),
            credentials: cred.and_then(RegistryCredential::credentials),
            insecure: cred.is_some_and(|c| c.insecure),
        }
    }
}

/// Errors reading or writing the desired-set file; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum DesiredFileError {
    /// A filesystem operation failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file does not start as a desired-set file does.
    #[error("{path}: not an imgfleet desired-set file")]
    Foreign { path: PathBuf },
    /// The seal does not open: another key, or damage.
    #[error("{path}: cannot be decrypted with local.key (wrong key or damaged file)")]
    Undecryptable { path: PathBuf },
    /// The seal opens but the content is not a desired set.
    #[error("{path}: damaged content: {source}")]
    Damaged {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// The set could not be encoded.
    #[error("{path}: cannot encode: {source}")]
    Encode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// Sealing failed.
    #[error("{path}: encryption failed")]
    Encrypt { path: PathBuf },
    /// The key file does not hold a key.
    #[error("{path}: expected a 32-byte key, found {len} bytes")]
    KeyLength { path: PathBuf, len: usize },
    /// Others may read the key file.
    #[error("{path}: mode {mode:o} lets others read the key: expected 0600")]
    KeyReadable { path: PathBuf, mode: u32 },
    /// The blocking save did not finish (it panicked, or the runtime is
    /// shutting down).
    #[error("{path}: saving task failed: {source}")]
    Task {
        path: PathBuf,
        #[source]
        source: tokio::task::JoinError,
    },
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
                        .map_err(|b: Vec<u8>| DesiredFileError::KeyLength {
                            path: key_path.clone(),
                            len: b.len(),
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
        let path = || self.path.clone();
        let body = sealed
            .strip_prefix(MAGIC.as_slice())
            .filter(|b| b.len() > NONCE_LEN)
            .ok_or_else(|| DesiredFileError::Foreign { path: path() })?;
        let (nonce, ciphertext) = body.split_at(NONCE_LEN);
        let plain = self
            .cipher
            .decrypt(Nonce::from_slice(nonce), ciphertext)
            .map_err(|_| DesiredFileError::Undecryptable { path: path() })?;
        serde_json::from_slice(&plain).map_err(|source| DesiredFileError::Damaged {
            path: path(),
            source,
        })
    }

    /// Seals and saves a set, durably.
    pub fn save(&self, set: &DesiredSet) -> Result<(), DesiredFileError> {
        let plain = serde_json::to_vec(set).map_err(|source| DesiredFileError::Encode {
            path: self.path.clone(),
            source,
        })?;
        let mut nonce = [0u8; NONCE_LEN];
        rand::rng().fill_bytes(&mut nonce);
        let ciphertext = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), plain.as_slice())
            .map_err(|_| DesiredFileError::Encrypt {
                path: self.path.clone(),
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
        return Err(DesiredFileError::KeyReadable {
            path: path.to_path_buf(),
            mode: mode & 0o777,
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

    fn image(key: &str, digest: &str) -> DesiredImage {
        DesiredImage {
            key: key.into(),
            source: ("default".into(), "app".into()),
            registry_key: "default/harbor".into(),
            registry: "127.0.0.1:5000".into(),
            repository: "demo/app".into(),
            digest: digest.into(),
            tags: vec!["v1".into()],
            platforms: Vec::new(),
            keep_versions: 0,
            grace_period_seconds: 0,
            trace_context: String::new(),
            verify_keys: Vec::new(),
        }
    }

    fn credential(password: &str) -> RegistryCredential {
        RegistryCredential {
            key: "default/harbor".into(),
            domain: "127.0.0.1:5000".into(),
            username: "admin".into(),
            password: password.into(),
            insecure: true,
        }
    }

    fn full(generation: u64) -> DesiredSet {
        let image = image("default/app@sha256:a", "sha256:a");
        let credential = credential("Harbor12345");
        DesiredSet {
            generation,
            epoch: "e1".into(),
            images: [(image.key.clone(), image)].into(),
            registries: [(credential.key.clone(), credential)].into(),
        }
    }

    #[test]
    fn deltas_apply_only_on_their_base() {
        let held = full(3);
        let delta = Delta {
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
        let other_epoch = Delta {
            epoch: "e2".into(),
            ..delta.clone()
        };
        assert!(matches!(
            held.apply_delta(other_epoch),
            Err(DeltaError::WrongEpoch { .. })
        ));
        let backwards = Delta {
            generation: 3,
            ..delta
        };
        assert!(matches!(
            held.apply_delta(backwards),
            Err(DeltaError::NotForward { .. })
        ));
    }

    #[test]
    fn a_pull_takes_the_credential_its_key_names() {
        let set = full(1);
        let image = &set.images["default/app@sha256:a"];
        let pull = set.pull(image);
        assert_eq!(pull.image, *image);
        assert_eq!(
            pull.credentials,
            Some(Credentials::new("admin", "Harbor12345"))
        );
        assert!(pull.insecure);

        let mut anonymous = set.clone();
        anonymous
            .registries
            .get_mut("default/harbor")
            .expect("credential")
            .username
            .clear();
        assert_eq!(anonymous.pull(image).credentials, None);

        let mut unknown = image.clone();
        unknown.registry_key = "default/other".into();
        let pull = set.pull(&unknown);
        assert_eq!((pull.credentials, pull.insecure), (None, false));
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

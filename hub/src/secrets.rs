//! Encryption of secret fields at rest: AES-256-GCM under a keyring whose
//! newest key encrypts and whose older keys still decrypt, so keys can be
//! rotated without rewriting every stored secret at once.
//!
//! A sealed value is self-describing: `enc:v1:<key id>:<base64(nonce || ciphertext)>`.
//! The caller's associated data (for example `RegistrySecret/team-a/harbor`)
//! binds the value to its object, so a sealed password copied into another
//! object does not decrypt there. The version and key id are bound too.
//!
//! The key file holds one key per line, `<id>:<64 hex digits>` (base64 of the
//! 32 bytes is accepted as well); `#` starts a comment. The LAST key is the
//! active one. The file must not be readable by group or others.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use zeroize::{Zeroize, Zeroizing};

const PREFIX: &str = "enc:v1:";
const NONCE_LEN: usize = 12;
const KEY_LEN: usize = 32;

/// Errors of the keyring. None of them ever contains a key or a plaintext.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// The key file exists but is unusable (mode, format, content).
    #[error("key file {path}: {message}")]
    KeyFile { path: PathBuf, message: String },
    /// Reading or writing the key file failed.
    #[error("key file {path}: {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// A key given directly (e.g. by flag) is unusable.
    #[error("encryption key {id:?}: {message}")]
    InvalidKey { id: String, message: String },
    /// The value is not of the form `enc:v1:<key id>:<base64>`.
    #[error("sealed value is malformed: expected enc:v1:<key id>:<base64 of nonce and ciphertext>")]
    Malformed,
    /// The value was sealed with a key this keyring does not hold.
    #[error("sealed value uses key {0:?}, which is not in the keyring")]
    UnknownKey(String),
    /// Authentication failed: tampered, sealed for another object, or a different key with the same id.
    #[error(
        "sealed value does not decrypt with key {key_id:?} for this object (tampered, moved from another object, or wrong key)"
    )]
    Decrypt { key_id: String },
}

/// A plaintext secret. Prints as `<redacted>` and is wiped from memory on drop.
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The plaintext. Call only where it is handed to its one consumer (e.g.
    /// an HTTP Authorization header), never to log or format it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Secret {
        Secret(s)
    }
}

impl Clone for Secret {
    fn clone(&self) -> Secret {
        Secret(self.0.clone())
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// One key of the ring; the bytes are wiped on drop and never printed.
struct RingKey {
    id: String,
    bytes: Zeroizing<[u8; KEY_LEN]>,
}

/// AES-256-GCM keys by id; the last one encrypts, all of them decrypt.
pub struct Keyring {
    keys: Vec<RingKey>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("key_ids", &self.key_ids())
            .field("active", &self.active_key_id())
            .finish()
    }
}

impl Keyring {
    /// Loads the key file at `path`, or creates it with one fresh key (mode
    /// 0600, written to a temporary file, fsynced, then linked into place so an
    /// existing file is never replaced). A file readable by group or others, or
    /// one that does not parse, is refused.
    pub fn load_or_create(path: &Path) -> Result<Keyring, SecretsError> {
        match std::fs::symlink_metadata(path) {
            Ok(_) => return Self::load(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(path, "reading metadata", e)),
        }
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| io_err(parent, "creating directory", e))?;
        }
        let ring = Keyring {
            keys: vec![RingKey {
                id: "k1".into(),
                bytes: random_key(),
            }],
        };
        let tmp = write_temp(path, &ring.render())?;
        // hard_link fails if `path` appeared meanwhile: then the other writer's
        // key wins and is loaded, instead of being silently replaced.
        let linked = std::fs::hard_link(&tmp, path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                sync_dir(path)?;
                Ok(ring)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Self::load(path),
            Err(e) => Err(io_err(path, "creating", e)),
        }
    }

    /// Loads an existing key file.
    pub fn load(path: &Path) -> Result<Keyring, SecretsError> {
        let meta = std::fs::metadata(path).map_err(|e| io_err(path, "reading metadata", e))?;
        if !meta.is_file() {
            return Err(key_file_err(path, "expected a regular file"));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(key_file_err(
                path,
                &format!(
                    "mode {mode:04o} lets group or others read it: expected mode 0600 (chmod 600 {})",
                    path.display()
                ),
            ));
        }
        let text =
            Zeroizing::new(std::fs::read_to_string(path).map_err(|e| io_err(path, "reading", e))?);
        Self::parse(&text).map_err(|message| key_file_err(path, &message))
    }

    /// A keyring of one key given directly (e.g. by a flag), `id` must be a
    /// simple name and `key` exactly 32 bytes.
    pub fn from_key(id: &str, key: &[u8]) -> Result<Keyring, SecretsError> {
        check_id(id).map_err(|message| SecretsError::InvalidKey {
            id: id.to_string(),
            message,
        })?;
        let bytes: [u8; KEY_LEN] = key.try_into().map_err(|_| SecretsError::InvalidKey {
            id: id.to_string(),
            message: format!("expected {KEY_LEN} bytes, got {}", key.len()),
        })?;
        Ok(Keyring {
            keys: vec![RingKey {
                id: id.to_string(),
                bytes: Zeroizing::new(bytes),
            }],
        })
    }

    /// A keyring from text in the key file format (`<id>:<hex or base64>` per
    /// line), e.g. the value of a flag. The error never repeats the key material.
    pub fn from_spec(spec: &str) -> Result<Keyring, SecretsError> {
        Self::parse(spec).map_err(|message| SecretsError::InvalidKey {
            id: spec
                .split(':')
                .next()
                .unwrap_or_default()
                .chars()
                .take(32)
                .collect(),
            message,
        })
    }

    /// Appends a fresh key to the key file at `path` and makes it active. The
    /// whole file is rewritten to a temporary file, fsynced and renamed over
    /// the old one, so a crash leaves either the old or the new ring.
    pub fn rotate(path: &Path) -> Result<Keyring, SecretsError> {
        let mut ring = Self::load(path)?;
        let mut n = ring.keys.len() + 1;
        while ring.keys.iter().any(|k| k.id == format!("k{n}")) {
            n += 1;
        }
        ring.keys.push(RingKey {
            id: format!("k{n}"),
            bytes: random_key(),
        });
        let tmp = write_temp(path, &ring.render())?;
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io_err(path, "replacing", e)
        })?;
        sync_dir(path)?;
        Ok(ring)
    }

    /// The id of the key new values are sealed with.
    pub fn active_key_id(&self) -> &str {
        self.keys.last().map_or("", |k| k.id.as_str())
    }

    /// All key ids, oldest first.
    pub fn key_ids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.id.as_str()).collect()
    }

    /// Seals `plaintext` with the active key, bound to `aad` (name the object,
    /// e.g. `RegistrySecret/<namespace>/<name>`).
    pub fn encrypt(&self, plaintext: &str, aad: &str) -> String {
        // A Keyring always holds at least one key: every constructor ensures it.
        let Some(key) = self.keys.last() else {
            unreachable!("a Keyring is never empty")
        };
        let nonce: [u8; NONCE_LEN] = rand::random();
        let header = format!("{PREFIX}{}:", key.id);
        let full_aad = format!("{header}{aad}");
        let cipher = Aes256Gcm::new((&*key.bytes).into());
        // AES-GCM fails only for inputs above 64 GiB, which a &str field never is.
        let ct = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext.as_bytes(),
                    aad: full_aad.as_bytes(),
                },
            )
            .unwrap_or_default();
        let mut blob = Vec::with_capacity(NONCE_LEN + ct.len());
        blob.extend_from_slice(&nonce);
        blob.extend_from_slice(&ct);
        format!("{header}{}", B64.encode(blob))
    }

    /// Opens a value sealed by [`Keyring::encrypt`] with any key of the ring,
    /// for the same `aad`.
    pub fn decrypt(&self, sealed: &str, aad: &str) -> Result<Secret, SecretsError> {
        let rest = sealed.strip_prefix(PREFIX).ok_or(SecretsError::Malformed)?;
        let (id, b64) = rest.split_once(':').ok_or(SecretsError::Malformed)?;
        let key = self
            .keys
            .iter()
            .rev()
            .find(|k| k.id == id)
            .ok_or_else(|| SecretsError::UnknownKey(id.chars().take(64).collect()))?;
        let blob = B64.decode(b64).map_err(|_| SecretsError::Malformed)?;
        if blob.len() < NONCE_LEN + 16 {
            return Err(SecretsError::Malformed);
        }
        let (nonce, ct) = blob.split_at(NONCE_LEN);
        let full_aad = format!("{PREFIX}{id}:{aad}");
        let cipher = Aes256Gcm::new((&*key.bytes).into());
        let pt = Zeroizing::new(
            cipher
                .decrypt(
                    Nonce::from_slice(nonce),
                    Payload {
                        msg: ct,
                        aad: full_aad.as_bytes(),
                    },
                )
                .map_err(|_| SecretsError::Decrypt {
                    key_id: id.to_string(),
                })?,
        );
        let text = std::str::from_utf8(&pt).map_err(|_| SecretsError::Decrypt {
            key_id: id.to_string(),
        })?;
        Ok(Secret::new(text))
    }

    /// Parses the key file format; the error message names the line.
    fn parse(text: &str) -> Result<Keyring, String> {
        let mut keys: Vec<RingKey> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let lineno = i + 1;
            let (id, material) = line.split_once(':').ok_or_else(|| {
                format!("line {lineno}: expected <key id>:<64 hex digits or base64 of 32 bytes>")
            })?;
            let id = id.trim();
            check_id(id).map_err(|m| format!("line {lineno}: {m}"))?;
            let bytes = decode_key(material.trim()).ok_or_else(|| {
                format!(
                    "line {lineno} (key {id:?}): expected 64 hex digits or base64 of {KEY_LEN} bytes"
                )
            })?;
            if keys.iter().any(|k| k.id == id) {
                return Err(format!("line {lineno}: key id {id:?} appears twice"));
            }
            keys.push(RingKey {
                id: id.to_string(),
                bytes,
            });
        }
        if keys.is_empty() {
            return Err("no keys: expected at least one line <key id>:<64 hex digits>".into());
        }
        Ok(Keyring { keys })
    }

    fn render(&self) -> Zeroizing<String> {
        let mut out = Zeroizing::new(String::from(
            "# imgfleet secret encryption keys; the last one is active. Keep mode 0600.\n",
        ));
        for k in &self.keys {
            out.push_str(&k.id);
            out.push(':');
            out.push_str(&Zeroizing::new(hex_encode(&*k.bytes)));
            out.push('\n');
        }
        out
    }
}

/// True for a value produced by [`Keyring::encrypt`] (it may still fail to decrypt).
pub fn is_sealed(value: &str) -> bool {
    value.starts_with(PREFIX)
}

fn check_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 32
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "key id {:?}: expected 1 to 32 letters, digits, '-' or '_'",
            id.chars().take(40).collect::<String>()
        ))
    }
}

fn decode_key(s: &str) -> Option<Zeroizing<[u8; KEY_LEN]>> {
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    if s.len() == 2 * KEY_LEN && s.bytes().all(|b| b.is_ascii_hexdigit()) {
        for (i, pair) in s.as_bytes().chunks(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            out[i] = u8::try_from(hi * 16 + lo).ok()?;
        }
        return Some(out);
    }
    let decoded = Zeroizing::new(B64.decode(s).ok()?);
    if decoded.len() != KEY_LEN {
        return None;
    }
    out.copy_from_slice(&decoded);
    Some(out)
}

fn hex_encode(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 0xf)] as char);
    }
    s
}

fn random_key() -> Zeroizing<[u8; KEY_LEN]> {
    Zeroizing::new(rand::random())
}

/// Writes `content` to a new 0600 file beside `path` and fsyncs it.
fn write_temp(path: &Path, content: &str) -> Result<PathBuf, SecretsError> {
    let suffix: u64 = rand::random();
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{suffix:016x}"));
    let tmp = path.with_file_name(name);
    let result = (|| {
        // The mode is set at creation, so the key is never readable by others,
        // not even for a moment.
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(content.as_bytes())?;
        f.sync_all()
    })();
    match result {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(io_err(path, "writing a new key file", e))
        }
    }
}

fn sync_dir(path: &Path) -> Result<(), SecretsError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, "syncing directory", e))
}

fn io_err(path: &Path, action: &'static str, source: std::io::Error) -> SecretsError {
    SecretsError::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}

fn key_file_err(path: &Path, message: &str) -> SecretsError {
    SecretsError::KeyFile {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PW: &str = "s3cr3t-Pa55word!";
    const AAD: &str = "RegistrySecret/team-a/harbor";

    fn ring() -> Keyring {
        Keyring::from_key("k1", &[7u8; 32]).expect("valid key")
    }

    #[test]
    fn round_trip() {
        let r = ring();
        let sealed = r.encrypt(PW, AAD);
        assert!(sealed.starts_with("enc:v1:k1:"), "{sealed}");
        assert!(is_sealed(&sealed));
        assert!(!sealed.contains(PW));
        assert_eq!(r.decrypt(&sealed, AAD).expect("decrypts").expose(), PW);
        // Nonces are random: the same plaintext seals differently.
        assert_ne!(sealed, r.encrypt(PW, AAD));
        assert_eq!(
            r.decrypt(&r.encrypt("", AAD), AAD).expect("empty").expose(),
            ""
        );
    }

    #[test]
    fn wrong_aad_fails() {
        let r = ring();
        let sealed = r.encrypt(PW, AAD);
        let err = r
            .decrypt(&sealed, "RegistrySecret/team-b/harbor")
            .expect_err("moved to another object");
        assert!(matches!(err, SecretsError::Decrypt { .. }), "{err:?}");
    }

    #[test]
    fn tampering_fails() {
        let r = ring();
        let sealed = r.encrypt(PW, AAD);
        let (head, b64) = sealed.rsplit_once(':').expect("format");
        let mut blob = B64.decode(b64).expect("base64");
        for i in [0, NONCE_LEN, blob.len() - 1] {
            let mut t = blob.clone();
            t[i] ^= 1;
            let bad = format!("{head}:{}", B64.encode(&t));
            assert!(
                matches!(r.decrypt(&bad, AAD), Err(SecretsError::Decrypt { .. })),
                "flipped byte {i} must fail"
            );
        }
        blob.truncate(10);
        let short = format!("{head}:{}", B64.encode(&blob));
        assert!(matches!(
            r.decrypt(&short, AAD),
            Err(SecretsError::Malformed)
        ));
        for bad in [
            "plain",
            "enc:v1:",
            "enc:v1:k1",
            "enc:v1:k1:!!!",
            "enc:v2:k1:AAAA",
        ] {
            assert!(r.decrypt(bad, AAD).is_err(), "{bad}");
        }
        // Relabelling with another key id does not work either.
        let other = Keyring::from_key("k2", &[7u8; 32]).expect("key");
        let relabelled = sealed.replacen("enc:v1:k1:", "enc:v1:k2:", 1);
        assert!(matches!(
            other.decrypt(&relabelled, AAD),
            Err(SecretsError::Decrypt { .. })
        ));
        assert!(
            matches!(other.decrypt(&sealed, AAD), Err(SecretsError::UnknownKey(id)) if id == "k1")
        );
    }

    #[test]
    fn creates_key_file_0600_and_reloads_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys/secret.key");
        let a = Keyring::load_or_create(&path).expect("create");
        let mode = std::fs::metadata(&path)
            .expect("exists")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let b = Keyring::load_or_create(&path).expect("reload");
        assert_eq!(b.key_ids(), ["k1"]);
        let sealed = a.encrypt(PW, AAD);
        assert_eq!(b.decrypt(&sealed, AAD).expect("same key").expose(), PW);
        // No temporary files are left behind.
        let names: Vec<_> = std::fs::read_dir(path.parent().expect("parent"))
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from("secret.key")]);
    }

    #[test]
    fn refuses_group_or_world_readable_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secret.key");
        Keyring::load_or_create(&path).expect("create");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = Keyring::load_or_create(&path).expect_err("0644 must be refused");
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("0644") && msg.contains("0600"), "{msg}");
        assert!(
            !msg.contains(&hex_of_file(&path)),
            "the key must not appear in the error"
        );
    }

    fn hex_of_file(path: &Path) -> String {
        let text = std::fs::read_to_string(path).expect("read");
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once(':').map(|(_, k)| k.to_string()))
            .next()
            .expect("a key line")
    }

    #[test]
    fn refuses_malformed_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secret.key");
        for (content, expect) in [
            ("", "no keys"),
            ("# only a comment\n", "no keys"),
            ("k1\n", "line 1"),
            ("k1:abcd\n", "64 hex digits"),
            (
                "bad id:0000000000000000000000000000000000000000000000000000000000000000\n",
                "key id",
            ),
            (
                "k1:0000000000000000000000000000000000000000000000000000000000000000\nk1:1111111111111111111111111111111111111111111111111111111111111111\n",
                "twice",
            ),
        ] {
            std::fs::write(&path, content).expect("write");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
            let msg = Keyring::load(&path).expect_err(content).to_string();
            assert!(msg.contains(expect), "{content:?}: {msg}");
            assert!(msg.contains(&path.display().to_string()), "{msg}");
        }
        // A base64 key is accepted too.
        std::fs::write(&path, format!("ops-2026:{}\n", B64.encode([9u8; 32]))).expect("write");
        assert_eq!(
            Keyring::load(&path).expect("base64 key").active_key_id(),
            "ops-2026"
        );
    }

    #[test]
    fn rotation_keeps_old_keys_decrypting() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secret.key");
        let old = Keyring::load_or_create(&path).expect("create");
        let sealed_old = old.encrypt(PW, AAD);
        let new = Keyring::rotate(&path).expect("rotate");
        assert_eq!(new.key_ids(), ["k1", "k2"]);
        assert_eq!(new.active_key_id(), "k2");
        let sealed_new = new.encrypt(PW, AAD);
        assert!(sealed_new.starts_with("enc:v1:k2:"));
        assert_eq!(new.decrypt(&sealed_old, AAD).expect("old key").expose(), PW);
        // The rotated file is what a restarted hub loads.
        let reloaded = Keyring::load_or_create(&path).expect("reload");
        assert_eq!(reloaded.active_key_id(), "k2");
        assert_eq!(
            reloaded.decrypt(&sealed_new, AAD).expect("new").expose(),
            PW
        );
        assert_eq!(
            std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        // The old ring cannot read what the new key sealed.
        assert!(matches!(
            old.decrypt(&sealed_new, AAD),
            Err(SecretsError::UnknownKey(_))
        ));
    }

    #[test]
    fn from_key_and_spec_validate() {
        assert!(Keyring::from_key("k1", &[1u8; 31]).is_err());
        assert!(Keyring::from_key("k:1", &[1u8; 32]).is_err());
        let spec = format!("flag:{}", "ab".repeat(32));
        let r = Keyring::from_spec(&spec).expect("spec");
        assert_eq!(r.active_key_id(), "flag");
        let err = Keyring::from_spec("flag:abab")
            .expect_err("short")
            .to_string();
        assert!(err.contains("flag") && !err.contains("abab"), "{err}");
    }

    #[test]
    fn nothing_prints_the_plaintext_or_key() {
        let r = ring();
        let sealed = r.encrypt(PW, AAD);
        let secret = r.decrypt(&sealed, AAD).expect("decrypts");
        let key_hex = hex_encode(&[7u8; 32]);
        for printed in [
            format!("{secret:?}"),
            format!("{secret}"),
            format!("{r:?}"),
            format!("{:?}", r.decrypt(&sealed, "other")),
            format!("{}", r.decrypt(&sealed, "other").expect_err("aad")),
            sealed.clone(),
        ] {
            assert!(!printed.contains(PW), "{printed}");
            assert!(!printed.contains(&key_hex), "{printed}");
        }
        assert_eq!(format!("{secret:?}"), "<redacted>");
        assert_eq!(secret.expose(), PW);
    }
}

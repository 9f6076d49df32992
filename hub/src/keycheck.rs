//! The key check: proof, kept in the policy store, that this hub's keyring
//! is the one that sealed what the store holds.
//!
//! Without it a hub whose `secret.key` was lost, or a second replica started
//! with its own key, would create a fresh key, fail to open every stored
//! password, and ship agents desired sets without them. The first hub on a
//! store seals a known value under its active key (`meta/keycheck`); every
//! hub after that must open it, and every stored password, before it serves.
//! A hub that cannot refuses to start (exit 64), naming the key setting.

use imgfleet::model::{Kind, Object};

use crate::desired::META_KIND;
use crate::objects::{ObjectError, Objects};
use crate::secrets::Keyring;
use crate::store::{Key, PolicyStore, StoreError};

/// Name of the key-check record in [`META_KIND`].
pub const KEYCHECK_NAME: &str = "keycheck";
/// What the key check seals; the associated data binds it to its purpose.
const PLAINTEXT: &str = "imgfleet key check v1";
const AAD: &str = "meta/keycheck";

/// Why the keyring does not fit the store. Every variant is the operator's
/// to fix (exit 64); `Store` is worth a retry.
#[derive(Debug, thiserror::Error)]
pub enum KeyCheckError {
    /// The key file is missing but the store holds values sealed by a key.
    #[error(
        "{setting}: the key file is missing, but the policy store holds passwords sealed with \
         the fleet's key. Restore that file (every hub replica must use the same key file), \
         or pass the key with --secret-key; the hub will not create a new key over sealed data"
    )]
    KeyMissing { setting: String },
    /// The store's key check does not open with this keyring.
    #[error(
        "{setting}: this keyring (key ids {ours}) cannot open the policy store's key check \
         ({reason}). Another key sealed the store's passwords: every hub replica must use the \
         same key file; copy it from the first hub, or pass the same --secret-key"
    )]
    Mismatch {
        setting: String,
        ours: String,
        reason: String,
    },
    /// Stored passwords that do not open with this keyring.
    #[error(
        "{setting}: stored passwords cannot be opened with this keyring: {objects}. Add the key \
         that sealed them to the key file (keys are tried by id), or re-apply those \
         RegistrySecrets with their passwords"
    )]
    Unopenable { setting: String, objects: String },
    /// The store could not be read or written.
    #[error("checking the secret key against the policy store: {0}")]
    Store(#[source] StoreError),
    /// The RegistrySecrets could not be read.
    #[error("checking the secret key against the policy store: {0}")]
    ReadSecrets(#[source] ObjectError),
    /// Another replica created the key check, and it was gone when read.
    #[error(
        "checking the secret key against the policy store: the key check vanished while created"
    )]
    Vanished,
}

impl KeyCheckError {
    /// True when the operator must change the key configuration.
    pub fn is_config(&self) -> bool {
        !matches!(
            self,
            KeyCheckError::Store(_) | KeyCheckError::ReadSecrets(_) | KeyCheckError::Vanished
        )
    }
}

fn key() -> Key {
    Key::new(META_KIND, "", KEYCHECK_NAME)
}

/// Whether the store holds anything sealed: the key check or a password.
/// Decides whether a missing key file may be created.
pub async fn store_has_sealed_data(store: &dyn PolicyStore) -> Result<bool, KeyCheckError> {
    if store
        .get(&key())
        .await
        .map_err(KeyCheckError::Store)?
        .is_some()
    {
        return Ok(true);
    }
    let (items, _) = store
        .list(Kind::RegistrySecret.plural(), None)
        .await
        .map_err(KeyCheckError::Store)?;
    Ok(items.iter().any(|v| {
        // Only whether a sealed value is there; nothing is decrypted here.
        serde_json::from_slice::<serde_json::Value>(&v.value)
            .ok()
            .and_then(|o| {
                o.pointer("/spec/password")
                    .and_then(|p| p.as_str())
                    .map(crate::secrets::is_sealed)
            })
            .unwrap_or(false)
    }))
}

/// Verifies `keyring` against the store: the key check must open and so
/// must every stored password. On a store without a key check (a new one,
/// or one written before key checks existed) it is created once every
/// password opened. `setting` names the key's configuration in errors.
pub async fn verify(
    objects: &Objects,
    keyring: &Keyring,
    setting: &str,
) -> Result<(), KeyCheckError> {
    let store = objects.store();
    let stored = store.get(&key()).await.map_err(KeyCheckError::Store)?;
    if let Some(v) = &stored {
        check_value(keyring, &v.value, setting)?;
    }
    let (secrets, _) = objects
        .list(Kind::RegistrySecret, None)
        .await
        .map_err(KeyCheckError::ReadSecrets)?;
    let mut bad = Vec::new();
    for obj in &secrets {
        if let Object::RegistrySecret(rs) = obj
            && let Err(e) = objects.password(rs)
        {
            bad.push(e.to_string());
        }
    }
    if !bad.is_empty() {
        return Err(KeyCheckError::Unopenable {
            setting: setting.to_string(),
            objects: bad.join("; "),
        });
    }
    if stored.is_none() {
        let sealed = keyring.encrypt(PLAINTEXT, AAD);
        match store.create(&key(), sealed.into_bytes()).await {
            Ok(_) => {}
            // Another replica created it first, maybe with another key.
            Err(StoreError::AlreadyExists(_)) => {
                let v = store
                    .get(&key())
                    .await
                    .map_err(KeyCheckError::Store)?
                    .ok_or(KeyCheckError::Vanished)?;
                check_value(keyring, &v.value, setting)?;
            }
            Err(e) => return Err(KeyCheckError::Store(e)),
        }
    }
    Ok(())
}

fn check_value(keyring: &Keyring, value: &[u8], setting: &str) -> Result<(), KeyCheckError> {
    let mismatch = |reason: String| KeyCheckError::Mismatch {
        setting: setting.to_string(),
        ours: keyring.key_ids().join(","),
        reason,
    };
    let text = std::str::from_utf8(value).map_err(|_| mismatch("not UTF-8".into()))?;
    let opened = keyring
        .decrypt(text, AAD)
        .map_err(|e| mismatch(e.to_string()))?;
    if opened.expose() != PLAINTEXT {
        return Err(mismatch("it opened to something else".into()));
    }
    Ok(())
}

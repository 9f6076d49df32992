//! The stored desired sets (kind "desiredsets", one per cluster) and the hub
//! epoch: their key, their encoding, and their conditional writes.
//!
//! A stored set is the JSON of [`StoredDesiredSet`]: its generation and the
//! content placement computed ([`DesiredSetContent`]). The controller decides
//! whether a set changed by comparing encodings, so the encoding is the
//! format: field names and order must not change (a test decodes and
//! re-encodes a set written by the version before the shapes were merged).

use serde::{Deserialize, Serialize};

use crate::placement::DesiredSetContent;
use crate::store::{Key, PolicyStore, StoreError};

/// Store kind of the per-cluster desired sets (cluster-scoped: empty namespace).
pub const DESIRED_KIND: &str = "desiredsets";
/// Store kind of hub-wide metadata.
pub const META_KIND: &str = "meta";
/// Name of the epoch record in [`META_KIND`].
pub const EPOCH_NAME: &str = "epoch";
/// How many times [`store_desired`] re-reads after a concurrent write.
const WRITE_ATTEMPTS: usize = 10;

/// A stored desired set: its generation and content.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct StoredDesiredSet {
    pub generation: u64,
    pub content: DesiredSetContent,
}

/// [`StoredDesiredSet`] by reference, to encode without cloning the content;
/// serializes exactly like it.
#[derive(Serialize)]
struct StoredDesiredSetRef<'a> {
    generation: u64,
    content: &'a DesiredSetContent,
}

/// Why a stored desired set could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum DesiredSetError {
    #[error("desired set of cluster {cluster}: {source}")]
    Store {
        cluster: String,
        #[source]
        source: StoreError,
    },
    #[error("stored desired set of cluster {cluster} is unreadable: {source}")]
    Corrupt {
        cluster: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("desired set of cluster {cluster} cannot be encoded: {source}")]
    Encode {
        cluster: String,
        #[source]
        source: serde_json::Error,
    },
    /// Other writers changed it every time it was read.
    #[error(
        "desired set of cluster {cluster}: changed concurrently {WRITE_ATTEMPTS} times in a row"
    )]
    Contended { cluster: String },
}

/// The store key of a cluster's desired set.
pub fn desired_key(cluster: &str) -> Key {
    Key::new(DESIRED_KIND, "", cluster)
}

/// Decode a stored desired set.
pub fn decode(cluster: &str, bytes: &[u8]) -> Result<StoredDesiredSet, DesiredSetError> {
    serde_json::from_slice(bytes).map_err(|source| DesiredSetError::Corrupt {
        cluster: cluster.to_string(),
        source,
    })
}

/// The stored encoding of `content` at `generation`.
pub fn encode(
    cluster: &str,
    generation: u64,
    content: &DesiredSetContent,
) -> Result<Vec<u8>, DesiredSetError> {
    serde_json::to_vec(&StoredDesiredSetRef {
        generation,
        content,
    })
    .map_err(|source| DesiredSetError::Encode {
        cluster: cluster.to_string(),
        source,
    })
}

/// The generation of a stored desired set, read without building its
/// content.
pub fn peek_generation(bytes: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct Generation {
        generation: u64,
    }
    serde_json::from_slice::<Generation>(bytes)
        .ok()
        .map(|g| g.generation)
}

/// The hub store's epoch, created (once, by whichever replica is first) if absent.
pub async fn ensure_epoch(store: &dyn PolicyStore) -> Result<String, StoreError> {
    let key = Key::new(META_KIND, "", EPOCH_NAME);
    loop {
        if let Some(v) = store.get(&key).await? {
            return Ok(String::from_utf8_lossy(&v.value).into_owned());
        }
        let fresh = uuid::Uuid::new_v4().to_string();
        match store.create(&key, fresh.clone().into_bytes()).await {
            Ok(_) => return Ok(fresh),
            // Another replica won the race: read its epoch.
            Err(StoreError::AlreadyExists(_)) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Store `content` as the cluster's desired set unless it is already the
/// stored content. Returns the new generation when it wrote. Two replicas
/// computing the same change bump the generation once: the loser's
/// conditional write conflicts, it re-reads and finds the content equal.
pub async fn store_desired(
    store: &dyn PolicyStore,
    cluster: &str,
    content: &DesiredSetContent,
) -> Result<Option<u64>, DesiredSetError> {
    let key = desired_key(cluster);
    let store_err = |source| DesiredSetError::Store {
        cluster: cluster.to_string(),
        source,
    };
    for _ in 0..WRITE_ATTEMPTS {
        let current = store.get(&key).await.map_err(store_err)?;
        let (generation, revision) = match &current {
            Some(v) => {
                let old = decode(cluster, &v.value)?;
                if &old.content == content {
                    return Ok(None);
                }
                (old.generation + 1, Some(v.revision))
            }
            None => (1, None),
        };
        let bytes = encode(cluster, generation, content)?;
        let written = match revision {
            Some(rev) => store.update(&key, bytes, Some(rev)).await,
            None => store.create(&key, bytes).await,
        };
        match written {
            Ok(_) => return Ok(Some(generation)),
            Err(StoreError::Conflict { .. }) | Err(StoreError::AlreadyExists(_)) => continue,
            Err(e) => return Err(store_err(e)),
        }
    }
    Err(DesiredSetError::Contended {
        cluster: cluster.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::{DesiredImage, RegistryRef};

    #[test]
    fn the_borrowed_encoding_equals_the_stored_one() {
        let set = StoredDesiredSet {
            generation: 7,
            content: DesiredSetContent {
                images: vec![DesiredImage {
                    key: "k".into(),
                    digest: "sha256:1".into(),
                    tags: vec!["v1".into()],
                    ..Default::default()
                }],
                registries: vec![RegistryRef {
                    key: "default/reg".into(),
                    fingerprint: "f".into(),
                }],
            },
        };
        let owned = serde_json::to_vec(&set).unwrap();
        let borrowed = encode("c", 7, &set.content).unwrap();
        assert_eq!(owned, borrowed);
        assert_eq!(peek_generation(&owned), Some(7));
        assert_eq!(peek_generation(b"{}"), None);
    }

    /// Sets stored by the version before placement and storage shared one
    /// image shape (the fixtures were written by it) decode, and encode
    /// again to the same bytes: the controller compares encodings, so a
    /// different one would rewrite every set and bump every generation.
    #[test]
    fn sets_stored_before_the_shapes_merged_read_back_byte_for_byte() {
        let fixtures: [&[u8]; 2] = [
            include_bytes!("../tests/fixtures/desired-set.json"),
            include_bytes!("../tests/fixtures/desired-set-empty.json"),
        ];
        for bytes in fixtures {
            let set = decode("c", bytes).expect("decodes");
            assert_eq!(peek_generation(bytes), Some(set.generation));
            assert_eq!(encode("c", set.generation, &set.content).unwrap(), bytes);
            assert_eq!(serde_json::to_vec(&set).unwrap(), bytes);
        }
        let set = decode("c", fixtures[0]).expect("decodes");
        let image = &set.content.images[0];
        assert_eq!(
            image.source(),
            crate::placement::ObjectId::new("default", "nginx-latest")
        );
        assert_eq!(image.tags, ["1.27", "latest"]);
        assert_eq!(
            set.content.registries[1].fingerprint,
            "ffeeddccbbaa998877665544"
        );
    }
}

//! The agent stream's wire types, at the edge of the hub: every `pb::` type
//! of `AgentService.Connect` is read or built here and nowhere else. The
//! session hands in stored desired sets, placement deltas and credentials,
//! and gets back plain values ([`Hello`], [`FromAgent`], [`ImageState`]);
//! placement, status aggregation and the store never see a prost type.
//! (The admin API converts in `imgfleet::convert`, at the edge of its own.)

use imgfleet::api::v1 as pb;
use imgfleet::api::v1::agent_message::Msg as AgentMsg;
use imgfleet::api::v1::hub_message::Msg as HubMsg;
use imgfleet::convert::{time_from_proto, time_to_proto};
use imgfleet::model::{self, ImagePhase, MAX_HELD};

use crate::desired::StoredDesiredSet;
use crate::placement::{Delta, DesiredImage};
use crate::status::{Held, ImageState};

/// What an agent says about itself when it connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The cluster it claims to serve (checked against its certificate).
    pub cluster: String,
    pub agent_version: String,
    /// The epoch and generation of the desired set it holds on disk.
    pub epoch: String,
    pub generation: u64,
    /// Bytes used and capacity of its storage.
    pub storage: (u64, u64),
}

impl Hello {
    /// The Hello of a session's first message, `None` when it is none.
    pub fn from_first(m: Option<pb::AgentMessage>) -> Option<Hello> {
        match m.and_then(|m| m.msg) {
            Some(AgentMsg::Hello(h)) => {
                let storage = h.storage.unwrap_or_default();
                Some(Hello {
                    cluster: h.cluster_name,
                    agent_version: h.agent_version,
                    epoch: h.current_epoch,
                    generation: h.current_generation,
                    storage: (storage.used_bytes, storage.capacity_bytes),
                })
            }
            _ => None,
        }
    }
}

/// One message from an agent after its Hello.
#[derive(Debug)]
pub enum FromAgent {
    /// The agent stored (or, with an `error`, could not apply) a generation.
    Ack {
        epoch: String,
        generation: u64,
        /// Why the agent could not apply the set; `None` when it did.
        error: Option<String>,
    },
    /// Image progress and storage.
    Progress(Progress),
    Heartbeat,
    /// A CSR for the cluster's next certificate.
    Renew {
        csr_pem: String,
    },
    /// Anything else (a second Hello, an empty message): only proof of life.
    Other,
}

/// A progress report, converted image by image as it is taken, so a large
/// report costs no second list.
#[derive(Debug)]
pub struct Progress {
    storage: Option<(u64, u64)>,
    held: Option<pb::HeldInventory>,
    images: Vec<pb::ImageProgress>,
}

impl Progress {
    /// The store's whole inventory, if the agent sent one (`None`: the one
    /// the hub has stands); taken once.
    pub fn take_held(&mut self) -> Option<Held> {
        self.held.take().map(held)
    }

    /// Storage (`(used, capacity)` bytes) if reported, and each image's
    /// state by key.
    pub fn into_parts(
        self,
    ) -> (
        Option<(u64, u64)>,
        impl Iterator<Item = (String, ImageState)>,
    ) {
        (self.storage, self.images.into_iter().map(image_state))
    }
}

/// An agent's inventory, at most [`MAX_HELD`] digests whatever the agent
/// sent: it goes into the Cluster object, which must stay small. Empty
/// repository entries are dropped.
fn held(h: pb::HeldInventory) -> Held {
    let mut left = MAX_HELD;
    let mut truncated = h.truncated;
    let mut repositories = Vec::with_capacity(h.repositories.len());
    for r in h.repositories {
        let mut r = imgfleet::convert::held_from_proto(r);
        if r.digests.len() > left {
            r.digests.truncate(left);
            truncated = true;
        }
        left -= r.digests.len();
        if !r.digests.is_empty() {
            repositories.push(r);
        }
    }
    Held {
        repositories,
        truncated,
    }
}

impl From<pb::AgentMessage> for FromAgent {
    fn from(m: pb::AgentMessage) -> FromAgent {
        match m.msg {
            Some(AgentMsg::Ack(ack)) => FromAgent::Ack {
                epoch: ack.epoch,
                generation: ack.generation,
                error: Some(ack.error).filter(|e| !e.is_empty()),
            },
            Some(AgentMsg::Progress(p)) => FromAgent::Progress(Progress {
                storage: p.storage.map(|s| (s.used_bytes, s.capacity_bytes)),
                held: p.held,
                images: p.images,
            }),
            Some(AgentMsg::Heartbeat(_)) => FromAgent::Heartbeat,
            Some(AgentMsg::Renew(r)) => FromAgent::Renew { csr_pem: r.csr_pem },
            Some(AgentMsg::Hello(_)) | None => FromAgent::Other,
        }
    }
}

/// The state of one image as an agent reported it, by its key.
fn image_state(p: pb::ImageProgress) -> (String, ImageState) {
    let phase = match pb::ImagePhase::try_from(p.phase) {
        Ok(pb::ImagePhase::Pending) => Some(ImagePhase::Pending),
        Ok(pb::ImagePhase::Syncing) => Some(ImagePhase::Syncing),
        Ok(pb::ImagePhase::Synced) => Some(ImagePhase::Synced),
        Ok(pb::ImagePhase::Failed) => Some(ImagePhase::Failed),
        Ok(pb::ImagePhase::Offline) | Ok(pb::ImagePhase::Unspecified) | Err(_) => None,
    };
    let state = ImageState {
        digest: p.digest,
        phase,
        bytes_done: p.bytes_done,
        bytes_total: p.bytes_total,
        layers_done: p.layers_done,
        layers_total: p.layers_total,
        message: Some(p.message).filter(|m| !m.is_empty()),
        updated_at: p.updated_at.as_ref().and_then(time_from_proto),
        next_retry_time: p.next_retry_time.as_ref().and_then(time_from_proto),
        attempts: p.attempts,
    };
    (p.key, state)
}

/// A message to an agent.
pub type Outbound = pb::HubMessage;

fn message(msg: HubMsg) -> Outbound {
    pb::HubMessage { msg: Some(msg) }
}

fn image(i: &DesiredImage) -> pb::DesiredImage {
    pb::DesiredImage {
        key: i.key.clone(),
        source: Some(pb::ObjectRef {
            name: i.source_name.clone(),
            namespace: i.source_namespace.clone(),
        }),
        registry_key: i.registry_key.clone(),
        registry: i.registry.clone(),
        repository: i.repository.clone(),
        digest: i.digest.clone(),
        tags: i.tags.clone(),
        platforms: i.platforms.clone(),
        keep_versions: i.keep_versions,
        grace_period_seconds: i.grace_period_seconds,
        trace_context: i.trace_context.clone(),
        verify: (!i.verify_keys.is_empty()).then(|| pb::Verify {
            keys: i
                .verify_keys
                .iter()
                .map(|k| pb::VerifyKey {
                    name: k.name.clone(),
                    public_key: k.public_key.clone(),
                })
                .collect(),
            mode: pb::VerifyMode::Enforce as i32,
        }),
    }
}

/// A registry credential, password opened, as an agent gets it.
/// Its `Debug` redacts the password (see `imgfleet::api`).
#[derive(Debug, Clone)]
pub struct Credential(pb::RegistryCredential);

impl Credential {
    /// The credential of RegistrySecret `rs`, known to agents as `key`
    /// (`<namespace>/<name>`).
    pub fn new(key: &str, rs: &model::RegistrySecret, password: Option<&str>) -> Credential {
        Credential(pb::RegistryCredential {
            key: key.to_string(),
            domain: rs.spec.domain.clone(),
            username: rs.spec.username.clone().unwrap_or_default(),
            password: password.unwrap_or_default().to_string(),
            insecure: rs.spec.insecure,
            provider: provider(rs.spec.provider) as i32,
        })
    }
}

fn provider(p: model::Provider) -> pb::Provider {
    match p {
        model::Provider::Harbor => pb::Provider::Harbor,
        model::Provider::Dockerhub => pb::Provider::Dockerhub,
        model::Provider::Aliyun => pb::Provider::Aliyun,
        model::Provider::Generic => pb::Provider::Generic,
    }
}

/// The whole desired set `set` of `epoch`, with the credentials of its
/// registries that could be opened.
pub fn full_set(set: &StoredDesiredSet, epoch: &str, registries: Vec<Credential>) -> Outbound {
    message(HubMsg::DesiredSet(pb::DesiredSet {
        generation: set.generation,
        epoch: epoch.to_string(),
        images: set.content.images.iter().map(image).collect(),
        registries: registries.into_iter().map(|c| c.0).collect(),
    }))
}

/// The change from generation `from` to `to` of `epoch`, with the
/// credentials of the registries it upserts.
pub fn delta(
    from: u64,
    to: u64,
    epoch: &str,
    delta: Delta,
    registry_upserts: Vec<Credential>,
) -> Outbound {
    message(HubMsg::Delta(pb::DesiredSetDelta {
        from_generation: from,
        generation: to,
        epoch: epoch.to_string(),
        upserts: delta.upserts.iter().map(image).collect(),
        removals: delta.removals,
        registry_upserts: registry_upserts.into_iter().map(|c| c.0).collect(),
        registry_removals: delta.registry_removals,
    }))
}

/// The answer to a renewal: the certificate, or why there is none.
pub fn renewed(result: Result<String, String>) -> Outbound {
    let (cert_pem, error) = match result {
        Ok(c) => (c, String::new()),
        Err(e) => (String::new(), e),
    };
    message(HubMsg::Renewed(pb::Renewed { cert_pem, error }))
}

/// The hub's heartbeat number `seq` of a session.
pub fn heartbeat(seq: u64) -> Outbound {
    message(HubMsg::Heartbeat(pb::Heartbeat {
        sent_at: Some(time_to_proto(&crate::live::now())),
        seq,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_becomes_image_states() {
        let m = pb::AgentMessage {
            msg: Some(AgentMsg::Progress(pb::Progress {
                images: vec![pb::ImageProgress {
                    key: "default/app@sha256:1".into(),
                    digest: "sha256:1".into(),
                    phase: pb::ImagePhase::Synced as i32,
                    bytes_done: 10,
                    bytes_total: 10,
                    message: String::new(),
                    ..Default::default()
                }],
                storage: Some(pb::StorageReport {
                    used_bytes: 5,
                    capacity_bytes: 9,
                }),
                held: None,
            })),
        };
        let FromAgent::Progress(mut p) = FromAgent::from(m) else {
            panic!("not progress");
        };
        assert_eq!(
            p.take_held(),
            None,
            "no inventory: the hub keeps the last one"
        );
        let (storage, images) = p.into_parts();
        assert_eq!(storage, Some((5, 9)));
        let images: Vec<_> = images.collect();
        assert_eq!(images.len(), 1);
        assert_eq!(images[0].0, "default/app@sha256:1");
        assert_eq!(images[0].1.phase, Some(ImagePhase::Synced));
        assert_eq!(images[0].1.message, None, "an empty message is none");
    }

    #[test]
    fn progress_carries_the_inventory_capped() {
        let repo = |name: &str, n: usize| pb::HeldRepository {
            registry: "r.example:5000".into(),
            repository: name.into(),
            digests: (0..n).map(|i| format!("sha256:{name}{i}")).collect(),
        };
        let held_of = |held: pb::HeldInventory| {
            let m = pb::AgentMessage {
                msg: Some(AgentMsg::Progress(pb::Progress {
                    held: Some(held),
                    ..Default::default()
                })),
            };
            let FromAgent::Progress(mut p) = FromAgent::from(m) else {
                panic!("not progress");
            };
            p.take_held().expect("an inventory")
        };
        let h = held_of(pb::HeldInventory {
            repositories: vec![repo("app", 2), repo("web", 1)],
            truncated: false,
        });
        assert!(!h.truncated);
        assert_eq!(h.repositories.len(), 2);
        assert_eq!(h.repositories[0].registry, "r.example:5000");
        assert_eq!(h.repositories[0].repository, "app");
        assert_eq!(h.repositories[0].digests, ["sha256:app0", "sha256:app1"]);
        assert_eq!(h.repositories[1].digests, ["sha256:web0"]);
        // The agent's own truncation is kept.
        assert!(
            held_of(pb::HeldInventory {
                repositories: vec![repo("app", 1)],
                truncated: true,
            })
            .truncated
        );
        // An empty inventory is one: the store holds nothing.
        assert_eq!(held_of(pb::HeldInventory::default()), Held::default());
        // More than MAX_HELD from a misbehaving agent: cut, and said so.
        let h = held_of(pb::HeldInventory {
            repositories: vec![repo("app", MAX_HELD - 1), repo("web", 5), repo("zzz", 1)],
            truncated: false,
        });
        assert!(h.truncated);
        assert_eq!(h.repositories.len(), 2, "no empty entry");
        assert_eq!(h.repositories[1].digests, ["sha256:web0"]);
    }

    #[test]
    fn an_ack_without_error_applied() {
        let ack = |error: &str| {
            FromAgent::from(pb::AgentMessage {
                msg: Some(AgentMsg::Ack(pb::Ack {
                    generation: 3,
                    epoch: "e".into(),
                    error: error.into(),
                })),
            })
        };
        assert!(matches!(
            ack(""),
            FromAgent::Ack {
                error: None,
                generation: 3,
                ..
            }
        ));
        assert!(
            matches!(ack("disk full"), FromAgent::Ack { error: Some(e), .. } if e == "disk full")
        );
        assert_eq!(Hello::from_first(None), None);
    }
}

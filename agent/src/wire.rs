//! The agent's one meeting point with the wire contract (`AgentService`): the
//! hub's messages become the agent's own types here, and the agent's hello,
//! acks, heartbeats and reports become prost messages here. The session
//! sends and receives them; nothing else in the crate sees a `pb::` type.

use std::time::SystemTime;

use imgfleet::api::v1 as pb;

use crate::desired::{Delta, DesiredImage, DesiredSet, RegistryCredential};
use crate::report::{HeldInventory, ImageReport, ReportPhase, StorageReport};

/// What one hub message asks of the agent.
#[derive(Debug)]
pub enum FromHub {
    /// A full set: it replaces what the agent holds.
    Set(DesiredSet),
    /// Changes to the set the agent holds.
    Delta(Delta),
    /// Liveness only.
    Heartbeat,
    /// The answer to a renewal: the new certificate, or why there is none.
    Renewed(Result<String, String>),
}

/// A hub message with nothing in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("hub sent an empty message")]
pub struct EmptyMessage;

impl TryFrom<pb::HubMessage> for FromHub {
    type Error = EmptyMessage;

    fn try_from(m: pb::HubMessage) -> Result<Self, EmptyMessage> {
        Ok(match m.msg.ok_or(EmptyMessage)? {
            pb::hub_message::Msg::DesiredSet(set) => FromHub::Set(set.into()),
            pb::hub_message::Msg::Delta(delta) => FromHub::Delta(delta.into()),
            pb::hub_message::Msg::Heartbeat(_) => FromHub::Heartbeat,
            pb::hub_message::Msg::Renewed(r) => FromHub::Renewed(if r.error.is_empty() {
                Ok(r.cert_pem)
            } else {
                Err(r.error)
            }),
        })
    }
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
            trace_context: i.trace_context,
            verify_keys: i
                .verify
                .map(|v| v.keys.into_iter().map(|k| (k.name, k.public_key)).collect())
                .unwrap_or_default(),
        }
    }
}

impl From<pb::RegistryCredential> for RegistryCredential {
    /// The provider is the hub's concern (token quirks when it resolves
    /// tags); the agent's client answers whatever challenge it meets.
    fn from(c: pb::RegistryCredential) -> Self {
        RegistryCredential {
            key: c.key,
            domain: c.domain,
            username: c.username,
            password: c.password.into(),
            insecure: c.insecure,
        }
    }
}

impl From<pb::DesiredSet> for DesiredSet {
    fn from(set: pb::DesiredSet) -> Self {
        DesiredSet {
            generation: set.generation,
            epoch: set.epoch,
            images: set
                .images
                .into_iter()
                .map(|i| (i.key.clone(), i.into()))
                .collect(),
            registries: set
                .registries
                .into_iter()
                .map(|c| (c.key.clone(), c.into()))
                .collect(),
        }
    }
}

impl From<pb::DesiredSetDelta> for Delta {
    fn from(d: pb::DesiredSetDelta) -> Self {
        Delta {
            from_generation: d.from_generation,
            generation: d.generation,
            epoch: d.epoch,
            upserts: d.upserts.into_iter().map(Into::into).collect(),
            removals: d.removals,
            registry_upserts: d.registry_upserts.into_iter().map(Into::into).collect(),
            registry_removals: d.registry_removals,
        }
    }
}

impl From<ReportPhase> for pb::ImagePhase {
    fn from(p: ReportPhase) -> Self {
        match p {
            ReportPhase::Pending => pb::ImagePhase::Pending,
            ReportPhase::Syncing => pb::ImagePhase::Syncing,
            ReportPhase::Synced => pb::ImagePhase::Synced,
            ReportPhase::Failed => pb::ImagePhase::Failed,
        }
    }
}

impl From<ImageReport> for pb::ImageProgress {
    fn from(r: ImageReport) -> Self {
        pb::ImageProgress {
            key: r.key,
            digest: r.digest,
            phase: pb::ImagePhase::from(r.phase) as i32,
            bytes_done: r.bytes_done,
            bytes_total: r.bytes_total,
            layers_done: r.layers_done,
            layers_total: r.layers_total,
            message: r.message.unwrap_or_default(),
            updated_at: Some(r.updated_at.into()),
            next_retry_time: r.next_retry.map(Into::into),
            attempts: r.attempts,
        }
    }
}

impl From<StorageReport> for pb::StorageReport {
    fn from(s: StorageReport) -> Self {
        pb::StorageReport {
            used_bytes: s.used_bytes,
            capacity_bytes: s.capacity_bytes,
        }
    }
}

fn agent(msg: pb::agent_message::Msg) -> pb::AgentMessage {
    pb::AgentMessage { msg: Some(msg) }
}

/// The first message of a session: who the agent is and what it holds.
pub fn hello(
    cluster: &str,
    version: &str,
    held: &DesiredSet,
    storage: StorageReport,
) -> pb::AgentMessage {
    agent(pb::agent_message::Msg::Hello(pb::Hello {
        cluster_name: cluster.to_string(),
        agent_version: version.to_string(),
        current_generation: held.generation,
        current_epoch: held.epoch.clone(),
        storage: Some(storage.into()),
    }))
}

/// A generation was persisted (`error` is `None`), or could not be.
pub fn ack(generation: u64, epoch: String, error: Option<String>) -> pb::AgentMessage {
    agent(pb::agent_message::Msg::Ack(pb::Ack {
        generation,
        epoch,
        error: error.unwrap_or_default(),
    }))
}

impl From<&HeldInventory> for pb::HeldInventory {
    fn from(h: &HeldInventory) -> Self {
        pb::HeldInventory {
            repositories: h
                .repositories
                .iter()
                .map(imgfleet::convert::held_to_proto)
                .collect(),
            truncated: h.truncated,
        }
    }
}

/// The latest state of some images, the storage, and the store's whole
/// inventory when it changed (`None`: the hub keeps the one it has).
pub fn progress(
    images: Vec<ImageReport>,
    storage: StorageReport,
    held: Option<&HeldInventory>,
) -> pb::AgentMessage {
    agent(pb::agent_message::Msg::Progress(pb::Progress {
        images: images.into_iter().map(Into::into).collect(),
        storage: Some(storage.into()),
        held: held.map(Into::into),
    }))
}

/// Asks for the cluster's next certificate for the key of `csr_pem`.
pub fn renew(csr_pem: String) -> pb::AgentMessage {
    agent(pb::agent_message::Msg::Renew(pb::RenewRequest { csr_pem }))
}

/// Liveness; `seq` grows by one per heartbeat within a session.
pub fn heartbeat(seq: u64) -> pb::AgentMessage {
    agent(pb::agent_message::Msg::Heartbeat(pb::Heartbeat {
        sent_at: Some(SystemTime::now().into()),
        seq,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_messages_become_the_agents_types() {
        let image = pb::DesiredImage {
            key: "default/app@sha256:a".into(),
            source: Some(pb::ObjectRef {
                name: "app".into(),
                namespace: "default".into(),
            }),
            registry_key: "default/lab".into(),
            registry: "r.example".into(),
            repository: "demo/app".into(),
            digest: "sha256:a".into(),
            tags: vec!["v1".into()],
            platforms: vec!["linux/amd64".into()],
            keep_versions: 3,
            grace_period_seconds: 60,
            trace_context: String::new(),
            verify: None,
        };
        let set = pb::DesiredSet {
            generation: 4,
            epoch: "e".into(),
            images: vec![image.clone()],
            registries: vec![pb::RegistryCredential {
                key: "default/lab".into(),
                domain: "r.example".into(),
                username: "u".into(),
                password: "p".into(),
                insecure: true,
                provider: pb::Provider::Harbor as i32,
            }],
        };
        let msg = pb::HubMessage {
            msg: Some(pb::hub_message::Msg::DesiredSet(set)),
        };
        let Ok(FromHub::Set(held)) = FromHub::try_from(msg) else {
            panic!("a full set");
        };
        assert_eq!(held.generation, 4);
        let mine = &held.images["default/app@sha256:a"];
        assert_eq!(mine.source, ("default".to_string(), "app".to_string()));
        assert_eq!(mine.retention().keep_versions, 3);
        assert_eq!(mine.platforms, ["linux/amd64"]);
        assert!(held.registries["default/lab"].insecure);
        assert!(matches!(
            FromHub::try_from(pb::HubMessage { msg: None }),
            Err(EmptyMessage)
        ));
    }

    #[test]
    fn reports_become_image_progress() {
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(100);
        let report = ImageReport {
            key: "k".into(),
            digest: "sha256:a".into(),
            phase: ReportPhase::Failed,
            bytes_done: 1,
            bytes_total: 2,
            layers_done: 3,
            layers_total: 4,
            message: Some("boom".into()),
            updated_at: at,
            next_retry: Some(at),
            attempts: 5,
        };
        let p = pb::ImageProgress::from(report);
        assert_eq!(p.phase, pb::ImagePhase::Failed as i32);
        assert_eq!(
            (p.bytes_done, p.bytes_total, p.layers_done, p.layers_total),
            (1, 2, 3, 4)
        );
        assert_eq!(p.message, "boom");
        assert_eq!(p.next_retry_time, Some(at.into()));
        assert_eq!(p.attempts, 5);
    }

    #[test]
    fn the_inventory_goes_out_only_when_given() {
        let held = HeldInventory {
            repositories: vec![imgfleet::model::HeldRepository {
                registry: "r.example".into(),
                repository: "demo/app".into(),
                digests: vec!["sha256:a".into(), "sha256:b".into()],
            }],
            truncated: true,
        };
        let progress = |m: pb::AgentMessage| match m.msg {
            Some(pb::agent_message::Msg::Progress(p)) => p,
            other => panic!("not progress: {other:?}"),
        };
        let p = progress(super::progress(
            vec![],
            StorageReport::default(),
            Some(&held),
        ));
        let sent = p.held.expect("held set");
        assert!(sent.truncated);
        assert_eq!(sent.repositories.len(), 1);
        assert_eq!(sent.repositories[0].registry, "r.example");
        assert_eq!(sent.repositories[0].repository, "demo/app");
        assert_eq!(sent.repositories[0].digests, ["sha256:a", "sha256:b"]);
        let p = progress(super::progress(vec![], StorageReport::default(), None));
        assert_eq!(p.held, None, "unset means unchanged");
    }
}

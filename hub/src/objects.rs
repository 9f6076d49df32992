//! Typed access to the policy store: resource-model objects stored as JSON,
//! with a RegistrySecret's password sealed before it is written and metadata
//! (uid, creationTimestamp, generation, resourceVersion) owned by the hub.
//!
//! The stored value is the JSON of the model object with `spec.password`
//! replaced by its sealed form and without `metadata.resourceVersion` (that is
//! the store revision, filled in on read). Anything that reads objects from
//! the store (admin API, tag resolver, placement) goes through [`Objects`] so
//! the format has one owner.
//!
//! Password rule for Apply: the password is write-only, so `get -o yaml`
//! never shows it; re-applying such output must not wipe the credential. An
//! Apply without `password` therefore keeps the stored password as long as
//! `username` is still set; an Apply without `username` (anonymous access)
//! stores no password. A given password always replaces the stored one.

use std::collections::BTreeMap;
use std::sync::Arc;

use imgfleet::model::{
    self, DEFAULT_NAMESPACE, DEFAULT_SYNC_INTERVAL, Kind, Object, ValidationError, format_duration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use zeroize::Zeroizing;

use crate::audit::{Draft, Outcome};
use crate::secrets::SecretsError;
use crate::store::{Key, PolicyStore, Put, StoreError, Versioned, Write};

/// The audit record an operator's change is committed with, and any other
/// writes that belong to the same change (a revocation with a delete).
#[derive(Debug, Clone, Copy)]
pub struct Audit<'a> {
    pub draft: &'a Draft,
    pub extra: &'a [Write],
}

/// Seals and opens secret fields. Implemented by the hub's keyring; narrow so
/// that the storage format does not depend on the key management.
pub trait Sealer: Send + Sync + 'static {
    /// Encrypt `plaintext`, binding it to `aad` (the owning object).
    fn seal(&self, plaintext: &str, aad: &str) -> Result<String, SecretsError>;
    /// Decrypt a value produced by [`Sealer::seal`] with the same `aad`.
    fn open(&self, sealed: &str, aad: &str) -> Result<Zeroizing<String>, SecretsError>;
}

impl Sealer for crate::secrets::Keyring {
    fn seal(&self, plaintext: &str, aad: &str) -> Result<String, SecretsError> {
        Ok(self.encrypt(plaintext, aad))
    }

    fn open(&self, sealed: &str, aad: &str) -> Result<Zeroizing<String>, SecretsError> {
        self.decrypt(sealed, aad)
            .map(|s| Zeroizing::new(s.expose().to_string()))
    }
}

/// Errors of typed object access, mapped to gRPC codes by the admin service.
/// `Unavailable` and `Contended` are worth a retry; the others are not.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("{}", join_validation(.0))]
    Invalid(Vec<ValidationError>),
    /// A resourceVersion that is not a number.
    #[error(
        "{id}: metadata.resourceVersion {given:?}: expected the number a previous get returned"
    )]
    BadResourceVersion { id: String, given: String },
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The given resourceVersion is not the stored one.
    #[error(
        "{id}: metadata.resourceVersion {given:?} is stale: the stored object is at {stored}; get it again and reapply"
    )]
    Stale {
        id: String,
        given: String,
        stored: u64,
    },
    /// Concurrent writers kept changing the object.
    #[error("{0}: changed concurrently, try again")]
    Contended(String),
    /// The store does not answer; the message starts with
    /// [`imgfleet::api::STORE_UNAVAILABLE`], which the CLI shows apart from
    /// a hub it cannot reach.
    #[error("{}: {}", imgfleet::api::STORE_UNAVAILABLE, .0)]
    Unavailable(String),
    /// A stored value that is not an object of the model.
    #[error("stored {}/{}/{} is unreadable: {source}", .key.kind, .key.namespace, .key.name)]
    Corrupt {
        key: Key,
        #[source]
        source: serde_json::Error,
    },
    /// An object where another kind was expected.
    #[error("{id} is not a {expected}")]
    WrongKind { id: String, expected: Kind },
    /// A stored password that this hub's keys cannot open.
    #[error("RegistrySecret {id}: stored password cannot be decrypted: {source}")]
    Unopenable {
        id: String,
        #[source]
        source: SecretsError,
    },
    #[error("{id}: sealing the password: {source}")]
    Seal {
        id: String,
        #[source]
        source: SecretsError,
    },
    #[error("encoding {id}: {source}")]
    Encode {
        id: String,
        #[source]
        source: serde_json::Error,
    },
    /// Any other refusal of the store (see [`StoreError`]).
    #[error(transparent)]
    Store(StoreError),
}

/// An unavailable store is [`ObjectError::Unavailable`]; any other store
/// error is kept whole in [`ObjectError::Store`], for callers to match.
impl From<StoreError> for ObjectError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(m) => ObjectError::Unavailable(m),
            other => ObjectError::Store(other),
        }
    }
}

fn join_validation(errors: &[ValidationError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// What Apply did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyOutcome {
    Created,
    Updated,
    Unchanged,
}

/// The store key of an object.
pub fn key_of(kind: Kind, namespace: Option<&str>, name: &str) -> Key {
    Key::new(
        kind.plural(),
        if kind.namespaced() {
            namespace.unwrap_or(DEFAULT_NAMESPACE)
        } else {
            ""
        },
        name,
    )
}

/// The additional authenticated data a password is sealed with, so a sealed
/// value copied into another object does not decrypt.
pub fn password_aad(namespace: &str, name: &str) -> String {
    format!("RegistrySecret/{namespace}/{name}/spec.password")
}

/// Typed, encrypting access to the policy store.
#[derive(Clone)]
pub struct Objects {
    store: Arc<dyn PolicyStore>,
    sealer: Arc<dyn Sealer>,
    /// Which trace each change belongs to, for the parts that handle it
    /// after it is stored.
    traces: crate::traces::TraceBook,
}

impl std::fmt::Debug for Objects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Objects").finish_non_exhaustive()
    }
}

/// How many times Apply re-reads and retries when another writer changed the
/// object between its read and its write (only without a resourceVersion).
const APPLY_ATTEMPTS: usize = 5;
/// How many times [`Objects::update_status`] re-reads and retries after a
/// concurrent write.
const STATUS_ATTEMPTS: usize = 8;

impl Objects {
    pub fn new(store: Arc<dyn PolicyStore>, sealer: Arc<dyn Sealer>) -> Self {
        Self {
            store,
            sealer,
            traces: Default::default(),
        }
    }

    /// Which trace each change belongs to.
    pub fn traces(&self) -> &crate::traces::TraceBook {
        &self.traces
    }

    /// The underlying store.
    pub fn store(&self) -> &Arc<dyn PolicyStore> {
        &self.store
    }

    /// Decode a stored value. The password stays sealed; use
    /// [`Objects::password`] to open it. `resourceVersion` is set to the
    /// value's revision.
    pub fn decode(&self, v: &Versioned) -> Result<Object, ObjectError> {
        let mut obj: Object =
            serde_json::from_slice(&v.value).map_err(|source| ObjectError::Corrupt {
                key: v.key.clone(),
                source,
            })?;
        obj.metadata_mut().resource_version = Some(v.revision.to_string());
        Ok(obj)
    }

    /// The plaintext password of a RegistrySecret read through this store.
    pub fn password(
        &self,
        rs: &model::RegistrySecret,
    ) -> Result<Option<Zeroizing<String>>, ObjectError> {
        let Some(sealed) = rs.spec.password.as_deref() else {
            return Ok(None);
        };
        let ns = rs
            .metadata
            .namespace
            .as_deref()
            .unwrap_or(DEFAULT_NAMESPACE);
        let name = rs.metadata.name.as_deref().unwrap_or("");
        self.sealer
            .open(sealed, &password_aad(ns, name))
            .map(Some)
            .map_err(|source| ObjectError::Unopenable {
                id: format!("{ns}/{name}"),
                source,
            })
    }

    pub async fn get(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Object, ObjectError> {
        let key = key_of(kind, namespace, name);
        match self.store.get(&key).await? {
            Some(v) => self.decode(&v),
            None => Err(ObjectError::NotFound(model::object_id(
                kind,
                kind.namespaced().then_some(key.namespace.as_str()),
                name,
            ))),
        }
    }

    /// Objects of one kind in one namespace (or all), sorted by namespace
    /// then name, and the revision the list was read at.
    pub async fn list(
        &self,
        kind: Kind,
        namespace: Option<&str>,
    ) -> Result<(Vec<Object>, u64), ObjectError> {
        let ns = if kind.namespaced() { namespace } else { None };
        let (items, rev) = self.store.list(kind.plural(), ns).await?;
        let objs = items
            .iter()
            .map(|v| self.decode(v))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((objs, rev))
    }

    /// Delete, optionally only at `resource_version`. Returns the last state.
    pub async fn delete(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        name: &str,
        resource_version: Option<&str>,
    ) -> Result<Object, ObjectError> {
        self.delete_audited(kind, namespace, name, resource_version, None)
            .await
    }

    /// [`Objects::delete`], committed with its audit record (and the
    /// audit's extra writes) in one transaction.
    pub async fn delete_audited(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        name: &str,
        resource_version: Option<&str>,
        audit: Option<Audit<'_>>,
    ) -> Result<Object, ObjectError> {
        let key = key_of(kind, namespace, name);
        let id = model::object_id(
            kind,
            kind.namespaced().then_some(key.namespace.as_str()),
            name,
        );
        let expected = parse_rv(&id, resource_version)?;
        let result = match audit {
            None => self.store.delete(&key, expected).await,
            Some(a) => {
                let mut writes = vec![Write::Delete {
                    key: key.clone(),
                    expected,
                }];
                writes.extend(a.extra.iter().cloned());
                self.store
                    .commit(writes, a.draft.put(Outcome::Allowed, 0, true, "deleted"))
                    .await
                    .and_then(|(mut written, _)| {
                        if written.is_empty() {
                            Err(StoreError::NotFound(key.clone()))
                        } else {
                            Ok(written.swap_remove(0))
                        }
                    })
            }
        };
        match result {
            Ok(v) => self.decode(&v),
            Err(StoreError::NotFound(_)) => Err(ObjectError::NotFound(id)),
            Err(StoreError::Conflict { actual, .. }) => Err(ObjectError::Stale {
                id,
                given: resource_version.unwrap_or_default().to_string(),
                stored: actual,
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Create or update `obj` as an operator asked: fill defaults, validate,
    /// keep hub-owned metadata and status, seal the password, write with
    /// optimistic concurrency. Returns the object as stored (password sealed).
    pub async fn apply(
        &self,
        obj: Object,
        dry_run: bool,
    ) -> Result<(Object, ApplyOutcome), ObjectError> {
        self.apply_audited(obj, dry_run, None).await
    }

    /// [`Objects::apply`], with a change committed together with its audit
    /// record (and the audit's extra writes) in one transaction. An apply
    /// that changes nothing writes nothing here.
    pub async fn apply_audited(
        &self,
        obj: Object,
        dry_run: bool,
        audit: Option<Audit<'_>>,
    ) -> Result<(Object, ApplyOutcome), ObjectError> {
        let mut obj = obj;
        fill_defaults(&mut obj)?;
        // A username without a password means "keep the stored password"
        // (see the module docs); validate as if it were given, and insist on
        // it below only when nothing is stored.
        let keeps_password = matches!(&obj, Object::RegistrySecret(rs)
            if rs.spec.username.is_some() && rs.spec.password.is_none());
        if keeps_password {
            let mut probe = obj.clone();
            if let Object::RegistrySecret(rs) = &mut probe {
                rs.spec.password = Some("kept".into());
            }
            probe.validate().map_err(ObjectError::Invalid)?;
        } else {
            obj.validate().map_err(ObjectError::Invalid)?;
        }
        let id = obj.id();
        let given_rv = obj
            .metadata()
            .resource_version
            .clone()
            .filter(|s| !s.is_empty());
        let expected = parse_rv(&id, given_rv.as_deref())?;
        let key = key_of(obj.kind(), obj.namespace(), obj.name());

        for _ in 0..APPLY_ATTEMPTS {
            let existing = self.store.get(&key).await?;
            let result = match existing {
                None => {
                    if given_rv.is_some() {
                        return Err(ObjectError::NotFound(format!(
                            "{id} (metadata.resourceVersion was given, so it must exist)"
                        )));
                    }
                    if keeps_password {
                        obj.validate().map_err(ObjectError::Invalid)?;
                    }
                    self.create(&key, obj.clone(), dry_run, audit).await
                }
                Some(stored) => {
                    if let Some(exp) = expected
                        && exp != stored.revision
                    {
                        return Err(ObjectError::Stale {
                            id,
                            given: given_rv.unwrap_or_default(),
                            stored: stored.revision,
                        });
                    }
                    if keeps_password && !self.decode(&stored).is_ok_and(|o| has_password(&o)) {
                        obj.validate().map_err(ObjectError::Invalid)?;
                    }
                    self.update(&key, obj.clone(), &stored, dry_run, audit)
                        .await
                }
            };
            match result {
                // Lost a race with another writer: re-read and decide again,
                // unless the caller pinned a resourceVersion.
                Err(ObjectError::Store(StoreError::AlreadyExists(_)))
                | Err(ObjectError::Store(StoreError::Conflict { .. }))
                    if expected.is_none() =>
                {
                    continue;
                }
                Err(ObjectError::Store(StoreError::Conflict { actual, .. })) => {
                    return Err(ObjectError::Stale {
                        id,
                        given: given_rv.unwrap_or_default(),
                        stored: actual,
                    });
                }
                Err(ObjectError::Store(StoreError::NotFound(_))) if expected.is_some() => {
                    return Err(ObjectError::NotFound(id));
                }
                Err(ObjectError::Store(StoreError::NotFound(_))) => continue,
                // An unavailable store says so in its own variant.
                Err(ObjectError::Store(e)) => return Err(e.into()),
                Err(e) => return Err(e),
                Ok(done) => return Ok(done),
            }
        }
        Err(ObjectError::Contended(id))
    }

    async fn create(
        &self,
        key: &Key,
        mut obj: Object,
        dry_run: bool,
        audit: Option<Audit<'_>>,
    ) -> Result<(Object, ApplyOutcome), ObjectError> {
        let meta = obj.metadata_mut();
        meta.uid = Some(uuid::Uuid::new_v4().to_string());
        meta.creation_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
        meta.generation = Some(1);
        meta.resource_version = None;
        clear_status(&mut obj);
        self.seal_password(&mut obj)?;
        let message = if has_password(&obj) {
            "created; password set"
        } else {
            "created"
        };
        let rev = if dry_run {
            0
        } else {
            self.write(
                Put {
                    key: key.clone(),
                    value: encode(&obj)?,
                    expected: None,
                },
                audit,
                message,
            )
            .await?
        };
        if !dry_run {
            obj.metadata_mut().resource_version = Some(rev.to_string());
        }
        Ok((obj, ApplyOutcome::Created))
    }

    async fn update(
        &self,
        key: &Key,
        mut obj: Object,
        stored: &Versioned,
        dry_run: bool,
        audit: Option<Audit<'_>>,
    ) -> Result<(Object, ApplyOutcome), ObjectError> {
        let current = self.decode(stored)?;
        // Hub-owned metadata and the status come from the stored object.
        {
            let cur = current.metadata();
            let meta = obj.metadata_mut();
            meta.uid = cur.uid.clone();
            meta.creation_timestamp = cur.creation_timestamp.clone();
            meta.generation = cur.generation;
            meta.resource_version = None;
        }
        copy_status(&current, &mut obj);

        // Decide the password and compare with plaintexts on both sides.
        let mut current_plain = current.clone();
        if let (Object::RegistrySecret(new), Object::RegistrySecret(cur)) =
            (&mut obj, &mut current_plain)
        {
            let stored_pw = self.password(cur)?;
            cur.spec.password = stored_pw.as_ref().map(|p| p.to_string());
            if new.spec.password.is_none() && new.spec.username.is_some() {
                new.spec.password = cur.spec.password.clone();
            }
        }
        let spec_changed = !same_spec(&obj, &current_plain);
        let meta_changed = !same_meta(&obj, &current_plain);
        // What changed, for the audit trail: never the password itself.
        let password_changed = matches!((&obj, &current_plain),
            (Object::RegistrySecret(n), Object::RegistrySecret(c)) if n.spec.password != c.spec.password);
        let message = match (spec_changed, meta_changed, password_changed) {
            (_, _, true) => "updated; password changed",
            (true, _, false) => "updated: spec changed",
            _ => "updated: labels or annotations changed",
        };
        if !spec_changed && !meta_changed {
            return Ok((current, ApplyOutcome::Unchanged));
        }
        if spec_changed {
            let g = obj.metadata().generation.unwrap_or(0);
            obj.metadata_mut().generation = Some(g + 1);
        }
        self.seal_password(&mut obj)?;
        let rev = if dry_run {
            stored.revision
        } else {
            self.write(
                Put {
                    key: key.clone(),
                    value: encode(&obj)?,
                    expected: Some(stored.revision),
                },
                audit,
                message,
            )
            .await?
        };
        obj.metadata_mut().resource_version = Some(rev.to_string());
        Ok((obj, ApplyOutcome::Updated))
    }

    /// One conditional put, with its audit record when there is one.
    async fn write(
        &self,
        put: Put,
        audit: Option<Audit<'_>>,
        message: &str,
    ) -> Result<u64, ObjectError> {
        match audit {
            None => match put.expected {
                None => self.store.create(&put.key, put.value).await,
                Some(r) => self.store.update(&put.key, put.value, Some(r)).await,
            },
            Some(a) => {
                let mut writes = vec![Write::Put(put)];
                writes.extend(a.extra.iter().cloned());
                self.store
                    .commit(writes, a.draft.put(Outcome::Allowed, 0, true, message))
                    .await
                    .map(|(written, _)| written.first().map_or(0, |v| v.revision))
            }
        }
        .map_err(ObjectError::Store)
    }

    fn seal_password(&self, obj: &mut Object) -> Result<(), ObjectError> {
        if let Object::RegistrySecret(rs) = obj
            && let Some(pw) = rs.spec.password.take()
        {
            let pw = Zeroizing::new(pw);
            let ns = rs
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| DEFAULT_NAMESPACE.into());
            let name = rs.metadata.name.clone().unwrap_or_default();
            let sealed = self
                .sealer
                .seal(&pw, &password_aad(&ns, &name))
                .map_err(|source| ObjectError::Seal {
                    id: format!("RegistrySecret {ns}/{name}"),
                    source,
                })?;
            rs.spec.password = Some(sealed);
        }
        Ok(())
    }

    /// A batched status write of `obj` (see [`PolicyStore::put_batch`]):
    /// the whole object as stored, expected at `expected_revision`.
    pub fn status_put(&self, obj: &Object, expected_revision: u64) -> Result<Put, ObjectError> {
        let mut copy = obj.clone();
        copy.metadata_mut().resource_version = None;
        Ok(Put {
            key: key_of(obj.kind(), obj.namespace(), obj.name()),
            value: encode(&copy)?,
            expected: Some(expected_revision),
        })
    }

    /// Replace the status of a stored object (tag resolver, sessions). The
    /// spec and generation are left alone; `expected_revision` guards against
    /// overwriting a concurrent spec change.
    pub async fn write_status(
        &self,
        obj: &Object,
        expected_revision: Option<u64>,
    ) -> Result<u64, ObjectError> {
        let key = key_of(obj.kind(), obj.namespace(), obj.name());
        let mut copy = obj.clone();
        copy.metadata_mut().resource_version = None;
        let bytes = encode(&copy)?;
        self.store
            .update(&key, bytes, expected_revision)
            .await
            .map_err(|e| match e {
                StoreError::Conflict {
                    actual, expected, ..
                } => ObjectError::Stale {
                    id: obj.id(),
                    given: expected.to_string(),
                    stored: actual,
                },
                StoreError::NotFound(_) => ObjectError::NotFound(obj.id()),
                other => other.into(),
            })
    }

    /// Read-modify-write of an object's status, redone when another writer
    /// (the tag resolver, the status writer, another replica) changed the
    /// object in between. `f` changes the object read and returns false
    /// when nothing needs writing; it may run once per attempt. Returns
    /// whether it wrote.
    pub async fn update_status(
        &self,
        kind: Kind,
        namespace: Option<&str>,
        name: &str,
        mut f: impl FnMut(&mut Object) -> bool,
    ) -> Result<bool, ObjectError> {
        for _ in 0..STATUS_ATTEMPTS {
            let mut obj = self.get(kind, namespace, name).await?;
            let rev = revision_of(&obj);
            if !f(&mut obj) {
                return Ok(false);
            }
            match self.write_status(&obj, rev).await {
                Ok(_) => return Ok(true),
                Err(ObjectError::Stale { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(ObjectError::Contended(model::object_id(
            kind, namespace, name,
        )))
    }
}

/// The store revision an object was read at (its `metadata.resourceVersion`,
/// which [`Objects`] fills in on every read).
pub fn revision_of(obj: &Object) -> Option<u64> {
    obj.metadata()
        .resource_version
        .as_deref()
        .and_then(|r| r.parse().ok())
}

fn encode(obj: &Object) -> Result<Vec<u8>, ObjectError> {
    serde_json::to_vec(obj).map_err(|source| ObjectError::Encode {
        id: obj.id(),
        source,
    })
}

fn parse_rv(id: &str, rv: Option<&str>) -> Result<Option<u64>, ObjectError> {
    match rv.filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(s) => s
            .parse::<u64>()
            .map(Some)
            .map_err(|_| ObjectError::BadResourceVersion {
                id: id.to_string(),
                given: s.to_string(),
            }),
    }
}

/// Defaults an operator may leave out, filled so that the stored object says
/// what the hub will do.
pub fn fill_defaults(obj: &mut Object) -> Result<(), ObjectError> {
    let kind = obj.kind();
    let meta = obj.metadata_mut();
    if kind.namespaced() {
        if meta.namespace.as_deref().is_none_or(str::is_empty) {
            meta.namespace = Some(DEFAULT_NAMESPACE.into());
        }
    } else if meta.namespace.as_deref().is_some_and(|n| !n.is_empty()) {
        let id = model::object_id(kind, None, meta.name.as_deref().unwrap_or(""));
        return Err(ObjectError::Invalid(vec![ValidationError::new(
            id,
            "metadata.namespace",
            "clusters are cluster-scoped: leave the namespace out",
        )]));
    } else {
        meta.namespace = None;
    }
    if meta.labels.as_ref().is_some_and(BTreeMap::is_empty) {
        meta.labels = None;
    }
    if meta.annotations.as_ref().is_some_and(BTreeMap::is_empty) {
        meta.annotations = None;
    }
    let ns = meta.namespace.clone();
    match obj {
        Object::Repository(r) => {
            if r.spec
                .registry_ref
                .namespace
                .as_deref()
                .is_none_or(str::is_empty)
            {
                r.spec.registry_ref.namespace = ns;
            }
            if r.spec.sync_interval.as_deref().is_none_or(str::is_empty) {
                r.spec.sync_interval = Some(format_duration(DEFAULT_SYNC_INTERVAL));
            }
            if let Some(tp) = r.spec.tag_pattern.as_mut()
                && tp.keep_latest.is_none()
            {
                tp.keep_latest = Some(1);
            }
        }
        Object::RegistrySecret(rs) => {
            // An empty password is the same as none: nothing to seal.
            if rs.spec.password.as_deref() == Some("") {
                rs.spec.password = None;
            }
            if rs.spec.username.as_deref() == Some("") {
                rs.spec.username = None;
            }
        }
        Object::Cluster(_) | Object::RoleBinding(_) | Object::ClusterRoleBinding(_) => {}
    }
    Ok(())
}

fn has_password(obj: &Object) -> bool {
    matches!(obj, Object::RegistrySecret(rs) if rs.spec.password.is_some())
}

fn clear_status(obj: &mut Object) {
    match obj {
        Object::RegistrySecret(o) => o.status = None,
        Object::Repository(o) => o.status = None,
        Object::Cluster(o) => o.status = None,
        // Bindings have no status.
        Object::RoleBinding(_) | Object::ClusterRoleBinding(_) => {}
    }
}

fn copy_status(from: &Object, to: &mut Object) {
    match (from, to) {
        (Object::RegistrySecret(a), Object::RegistrySecret(b)) => b.status = a.status.clone(),
        (Object::Repository(a), Object::Repository(b)) => b.status = a.status.clone(),
        (Object::Cluster(a), Object::Cluster(b)) => b.status = a.status.clone(),
        (_, to) => clear_status(to),
    }
}

fn same_spec(a: &Object, b: &Object) -> bool {
    match (a, b) {
        (Object::RegistrySecret(a), Object::RegistrySecret(b)) => a.spec == b.spec,
        (Object::Repository(a), Object::Repository(b)) => a.spec == b.spec,
        (Object::Cluster(a), Object::Cluster(b)) => a.spec == b.spec,
        (Object::RoleBinding(a), Object::RoleBinding(b)) => a.spec == b.spec,
        (Object::ClusterRoleBinding(a), Object::ClusterRoleBinding(b)) => a.spec == b.spec,
        _ => false,
    }
}

fn same_meta(a: &Object, b: &Object) -> bool {
    let norm = |m: &Option<BTreeMap<String, String>>| m.clone().filter(|m| !m.is_empty());
    norm(&a.metadata().labels) == norm(&b.metadata().labels)
        && norm(&a.metadata().annotations) == norm(&b.metadata().annotations)
}

//! Which trace a change belongs to, between the hub's parts that handle it
//! one after the other through the store: Apply records the trace context of
//! the Repository it wrote, the resolver continues that trace and records its
//! own span for the Repository, and the desired-set controller stamps it on
//! the new desired-set entries the change produced (`DesiredImage.
//! trace_context`), which sessions send on to agents, whose sync spans join
//! the trace.
//!
//! Only written while spans are exported (`imgfleet_common::telemetry::
//! enabled`); otherwise every method is a cheap no-op on an empty map. Kept
//! in memory: a change handled by two hub replicas (Apply on one, resolution
//! on the leader) starts a second trace at the resolution.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Most Repositories remembered; a burst beyond it drops the oldest half.
const MAX_ENTRIES: usize = 10_000;

#[derive(Debug, Default)]
struct Inner {
    /// Trace context of the Apply not yet resolved, per Repository (namespace, name).
    applied: HashMap<(String, String), String>,
    /// Trace context of the latest resolution, per Repository: the parent of
    /// the desired-set entries it produced.
    resolved: HashMap<(String, String), String>,
    /// The latest change not yet computed into desired sets.
    latest: Option<String>,
}

/// The shared book. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct TraceBook(Arc<Mutex<Inner>>);

impl TraceBook {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An Apply wrote Repository `ns/name` (`repository`) or another object,
    /// in the trace `traceparent`.
    pub fn applied(&self, repository: Option<(&str, &str)>, traceparent: String) {
        if traceparent.is_empty() {
            return;
        }
        let mut inner = self.lock();
        if let Some((ns, name)) = repository {
            if inner.applied.len() >= MAX_ENTRIES {
                inner.applied.clear();
            }
            inner
                .applied
                .insert((ns.to_string(), name.to_string()), traceparent.clone());
        }
        inner.latest = Some(traceparent);
    }

    /// The trace of the Apply of `ns/name` that is not resolved yet, taken.
    pub fn take_applied(&self, ns: &str, name: &str) -> String {
        if !imgfleet_common::telemetry::enabled() {
            return String::new();
        }
        self.lock()
            .applied
            .remove(&(ns.to_string(), name.to_string()))
            .unwrap_or_default()
    }

    /// A resolution of `ns/name` succeeded in the trace `traceparent`.
    pub fn resolved(&self, ns: &str, name: &str, traceparent: String) {
        if traceparent.is_empty() {
            return;
        }
        let mut inner = self.lock();
        if inner.resolved.len() >= MAX_ENTRIES {
            inner.resolved.clear();
        }
        inner
            .resolved
            .insert((ns.to_string(), name.to_string()), traceparent.clone());
        inner.latest = Some(traceparent);
    }

    /// The trace of the latest resolution of `ns/name`, or "".
    pub fn resolution(&self, ns: &str, name: &str) -> String {
        self.lock()
            .resolved
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
            .unwrap_or_default()
    }

    /// The latest change not yet computed, taken: the desired-set
    /// computation's parent.
    pub fn take_latest(&self) -> String {
        if !imgfleet_common::telemetry::enabled() {
            return String::new();
        }
        self.lock().latest.take().unwrap_or_default()
    }
}

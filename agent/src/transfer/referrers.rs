//! Referrers synced with their image: signatures, SBOMs and attestations
//! that name the image's root manifest as their OCI `subject`.
//!
//! They are found by the upstream's referrers API, or by the tag schema
//! (`sha256-<hex>`) where it has none (see
//! [`RegistryClient::referrers`](imgfleet_common::registry::RegistryClient::referrers)),
//! and each is brought in like an image (manifests, then missing blobs,
//! verified) and recorded with the image: `parent` the image root, so that
//! GC removes them together, and `subject` the digest they refer to, so that
//! the mirror lists them under it.
//!
//! A referrer that cannot be fetched does not hold back its image: the image
//! is what nodes run, and a missing SBOM must not stop it. It is logged and
//! left out. Signature verification (which needs the signatures) fetches what
//! it checks itself and fails the image there.
//!
//! A cosign signature kept at its own tag (`sha256-<hex>.sig`, cosign's
//! classic layout, which neither the API nor the tag schema lists) is
//! synced the same way and recorded under that tag as well, so the mirror
//! serves it where `cosign verify` looks.

use std::collections::HashMap;

use imgfleet_common::cosign;
use imgfleet_common::registry::ReferrerDescriptor;
use tracing::warn;

use super::progress::Tracker;
use super::{Engine, LazyClient, TransferError};
use crate::desired::DesiredImage;
use crate::store::{ManifestRecord, Pins};

/// The most referrers synced for one image; the rest are logged and left.
pub const MAX_SYNCED_REFERRERS: usize = 64;

/// What the referrers of one image added.
#[derive(Debug, Default)]
pub(super) struct Referrers {
    /// Records of each referrer and the manifests below it.
    pub records: Vec<ManifestRecord>,
    /// Blob bytes received for them.
    pub bytes_fetched: u64,
    /// Blobs received for them.
    pub blobs_fetched: u32,
}

impl Engine {
    /// Finds and brings in the referrers of `image`'s root manifest; see the
    /// module documentation for what a failure does.
    pub(super) async fn sync_referrers(
        &self,
        image: &DesiredImage,
        existing: &[ManifestRecord],
        client: &LazyClient<'_>,
        pins: &mut Pins,
    ) -> Referrers {
        let mut out = Referrers::default();
        let listed = match client.get().await {
            Ok(c) => c.referrers(&image.repository, &image.digest).await,
            Err(e) => {
                warn!(error = %e, "Cannot list the image's referrers; it is synced without them");
                return out;
            }
        };
        let mut listed = match listed {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "Cannot list the image's referrers; it is synced without them");
                return out;
            }
        };
        // Cosign's classic layout keeps a signature at a tag of its own,
        // which neither the referrers API nor its tag schema lists.
        let signature_tag = self.signature_tag(image, &listed, client).await;
        if let Some((descriptor, _)) = &signature_tag {
            listed.push(descriptor.clone());
        }
        if listed.len() > MAX_SYNCED_REFERRERS {
            warn!(
                found = listed.len(),
                kept = MAX_SYNCED_REFERRERS,
                "The image has more referrers than are synced; the rest are left out"
            );
            listed.truncate(MAX_SYNCED_REFERRERS);
        }
        for r in listed {
            match self.sync_referrer(image, &r, existing, client, pins).await {
                Ok(mut one) => {
                    // Served under that tag too, so that `cosign verify`
                    // against the mirror finds it where cosign looks.
                    if let Some((d, tag)) = &signature_tag
                        && d.digest == r.digest
                        && let Some(root) = one
                            .records
                            .iter()
                            .find(|x| x.digest == r.digest && x.subject.is_some())
                    {
                        let tagged = ManifestRecord {
                            tag: Some(tag.clone()),
                            ..root.clone()
                        };
                        one.records.push(tagged);
                    }
                    out.records.extend(one.records);
                    out.bytes_fetched += one.bytes_fetched;
                    out.blobs_fetched += one.blobs_fetched;
                }
                Err(e) => warn!(
                    referrer = %r.digest,
                    error = %e,
                    "Cannot sync a referrer; the image is synced without it"
                ),
            }
        }
        out
    }

    /// The manifest at cosign's signature tag (`sha256-<hex>.sig`) of
    /// `image`, with that tag, when the upstream has one and `listed` does
    /// not hold it already. A registry that answers anything but the
    /// manifest's head (no such tag, an error) means none: the image does
    /// not wait on it, and verification fetches what it checks itself.
    async fn signature_tag(
        &self,
        image: &DesiredImage,
        listed: &[ReferrerDescriptor],
        client: &LazyClient<'_>,
    ) -> Option<(ReferrerDescriptor, String)> {
        let tag = cosign::signature_tag(&image.digest)?;
        let client = client.get().await.ok()?;
        let head = client.head_manifest(&image.repository, &tag).await.ok()?;
        let (digest, size) = (head.digest?, head.size?);
        if listed.iter().any(|d| d.digest == digest) {
            return None;
        }
        let descriptor = ReferrerDescriptor {
            media_type: head.media_type.unwrap_or_default(),
            digest,
            size,
            artifact_type: None,
            annotations: Default::default(),
        };
        Some((descriptor, tag))
    }

    /// One referrer: its manifests and missing blobs, and its records.
    async fn sync_referrer(
        &self,
        image: &DesiredImage,
        referrer: &ReferrerDescriptor,
        existing: &[ManifestRecord],
        client: &LazyClient<'_>,
        pins: &mut Pins,
    ) -> Result<Referrers, TransferError> {
        // The referrer is walked as an image of its own (all platforms, no
        // tags), from the same repository.
        let as_image = DesiredImage {
            digest: referrer.digest.clone(),
            tags: Vec::new(),
            platforms: Vec::new(),
            ..image.clone()
        };
        pins.add(&referrer.digest);
        let root = self
            .manifest(
                &as_image,
                &referrer.digest,
                Some(referrer.size),
                existing,
                client,
            )
            .await?;
        let plan = self
            .plan(
                &as_image,
                Some(root),
                HashMap::new(),
                existing,
                client,
                pins,
            )
            .await?;
        // Counted apart: the image's own progress stays about the image.
        let silent = Tracker::new(&image.key, &referrer.digest, None);
        let stats = self
            .fetch_missing(&as_image, &plan.blobs, None, client, pins, &silent)
            .await?;
        let records = plan
            .records
            .into_iter()
            .map(|mut r| {
                if r.digest == referrer.digest && r.parent.is_none() {
                    r.subject = Some(image.digest.clone());
                }
                r.parent = Some(image.digest.clone());
                r
            })
            .collect();
        Ok(Referrers {
            records,
            bytes_fetched: stats.bytes_fetched,
            blobs_fetched: stats.blobs_fetched,
        })
    }
}

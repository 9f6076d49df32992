//! An OCI image generator: deterministic random layers of chosen sizes, real config JSON,
//! single-platform manifests and multi-platform indexes, pushed to a registry over the OCI
//! distribution API with reqwest (HEAD before upload, streaming monolithic PUT).
//!
//! Layers are real `application/vnd.oci.image.layer.v1.tar+gzip` blobs of exact sizes (see
//! [`LayerSpec`]), cheap to make because the gzip uses stored blocks; `skopeo copy` keeps
//! them byte for byte, where it would recompress an uncompressed layer.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::process::install_crypto_provider;
use crate::registry::Registry;

/// Media type of an OCI image manifest.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of an OCI image index.
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of an OCI image config.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// Media type the generated layers are declared with.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// The size of the pieces a layer is generated and uploaded in.
pub const CHUNK_SIZE: usize = 1024 * 1024;

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// xoshiro256++ seeded through splitmix64: fast enough in a debug build to generate hundreds
/// of MiB per second, and fully determined by the seed.
#[derive(Debug, Clone)]
struct Rng([u64; 4]);

impl Rng {
    fn new(seed: u64) -> Self {
        let mut sm = seed;
        let mut next = || {
            sm = sm.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = sm;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Rng([next(), next(), next(), next()])
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }
}

/// Mixes two values into one seed (used to derive per-layer and per-platform seeds).
fn mix(a: u64, b: u64) -> u64 {
    Rng::new(a ^ b.rotate_left(32).wrapping_mul(0x9E37_79B9_7F4A_7C15)).next_u64()
}

fn str_seed(s: &str) -> u64 {
    let d = Sha256::digest(s.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_le_bytes(b)
}

/// One layer: a gzip blob of exactly `size` bytes (at least [`MIN_LAYER_SIZE`]) whose content
/// is determined by `seed`. The same `(size, seed)` always gives the same blob, in any image,
/// so layers are shared by repeating the spec.
///
/// The blob is a real `tar+gzip` layer: the gzip stream uses stored (uncompressed) deflate
/// blocks, so it costs no compression time, and when `size` allows (about 1.6 KiB and up) it
/// wraps a tar archive holding one file of random bytes. Smaller layers gzip raw random
/// bytes. A gzip header comment pads the blob to the exact size. Tools that check
/// compression (skopeo recompresses layers it finds uncompressed) leave these blobs alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LayerSpec {
    /// Blob size in bytes; values below [`MIN_LAYER_SIZE`] are raised to it.
    pub size: u64,
    /// Seed of the content.
    pub seed: u64,
    /// In a multi-platform index, `true` means every platform gets this very blob; `false`
    /// gives each platform its own blob (the seed is mixed with the platform).
    pub shared: bool,
}

/// The smallest valid gzip layer the generator makes: 10 header + 5 block header + 1 byte +
/// 8 trailer.
pub const MIN_LAYER_SIZE: u64 = 24;

/// gzip header (10) + trailer (8).
const GZIP_OVERHEAD: u64 = 18;
/// Largest stored deflate block.
const BLOCK: u64 = 65535;
/// tar header + end-of-archive blocks.
const TAR_OVERHEAD: u64 = 512 + 1024;

fn deflate_len(u: u64) -> u64 {
    u + 5 * u.div_ceil(BLOCK).max(1)
}

/// How a layer of a given size is laid out.
#[derive(Debug, Clone, Copy)]
struct Layout {
    /// Random payload bytes.
    data: u64,
    /// Whether the payload is wrapped in a tar archive.
    tar: bool,
    /// Uncompressed stream length.
    ulen: u64,
    /// Length of the gzip comment field including its NUL (0 = no comment).
    comment: u64,
}

impl Layout {
    fn for_size(size: u64) -> Layout {
        let size = size.max(MIN_LAYER_SIZE);
        // Tar mode: payload a multiple of 512 so no padding is needed; take the largest that
        // fits and pad the rest with the gzip comment.
        if size >= GZIP_OVERHEAD + deflate_len(TAR_OVERHEAD) {
            let budget = size - GZIP_OVERHEAD;
            let mut k = (budget.saturating_sub(TAR_OVERHEAD)) / 512;
            while k > 0 && deflate_len(TAR_OVERHEAD + k * 512) > budget {
                k -= 1;
            }
            let ulen = TAR_OVERHEAD + k * 512;
            return Layout {
                data: k * 512,
                tar: true,
                ulen,
                comment: budget - deflate_len(ulen),
            };
        }
        let budget = size - GZIP_OVERHEAD;
        // Small sizes: one stored block of raw bytes (budget < 64 KiB here).
        let u = budget - 5;
        Layout {
            data: u,
            tar: false,
            ulen: u,
            comment: 0,
        }
    }
}

/// Digest, diff ID (sha256 of the uncompressed stream), cached per `(size, seed)`.
static DIGEST_CACHE: Mutex<Option<HashMap<(u64, u64), Digests>>> = Mutex::new(None);

/// `(blob digest, diff ID)` of one layer.
type Digests = (String, String);

impl LayerSpec {
    /// A per-platform layer.
    pub fn new(size: u64, seed: u64) -> Self {
        LayerSpec {
            size,
            seed,
            shared: false,
        }
    }

    /// A layer that every platform of an index shares.
    pub fn shared(size: u64, seed: u64) -> Self {
        LayerSpec {
            size,
            seed,
            shared: true,
        }
    }

    /// The exact blob size: `size`, raised to [`MIN_LAYER_SIZE`].
    pub fn blob_size(&self) -> u64 {
        self.size.max(MIN_LAYER_SIZE)
    }

    /// The blob as chunks of at most about [`CHUNK_SIZE`] bytes, generated lazily, so a large
    /// layer never sits in memory whole.
    pub fn chunks(&self) -> LayerChunks {
        LayerChunks::new(*self, false)
    }

    /// The whole blob in memory (fine for small layers).
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(usize::try_from(self.blob_size()).unwrap_or(0));
        for c in self.chunks() {
            out.extend_from_slice(&c);
        }
        out
    }

    /// `sha256:<hex>` of the blob; computed by streaming once, then cached per process.
    pub fn digest(&self) -> String {
        self.digests().0
    }

    /// `sha256:<hex>` of the uncompressed layer (the config's `rootfs.diff_ids` entry).
    pub fn diff_id(&self) -> String {
        self.digests().1
    }

    fn digests(&self) -> Digests {
        let key = (self.blob_size(), self.seed);
        if let Some(d) = DIGEST_CACHE
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(|m| m.get(&key))
        {
            return d.clone();
        }
        let mut chunks = LayerChunks::new(*self, true);
        let mut h = Sha256::new();
        for c in &mut chunks {
            h.update(&c);
        }
        let diff_id = chunks
            .uncompressed_hash
            .take()
            .map(|u| format!("sha256:{}", hex::encode(u.finalize())));
        let d = (
            format!("sha256:{}", hex::encode(h.finalize())),
            diff_id.unwrap_or_default(),
        );
        DIGEST_CACHE
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert_with(HashMap::new)
            .insert(key, d.clone());
        d
    }

    fn for_platform(&self, platform: &Platform) -> LayerSpec {
        if self.shared {
            *self
        } else {
            LayerSpec {
                seed: mix(self.seed, str_seed(&platform.to_string())),
                ..*self
            }
        }
    }
}

/// Iterator over the generated chunks of a layer blob.
pub struct LayerChunks {
    layout: Layout,
    rng: Rng,
    /// Bytes of the current random u64 not yet handed out, so the stream does not depend on
    /// how it is cut into pieces.
    spare: ([u8; 8], usize),
    tar_header: [u8; 512],
    /// Position in the uncompressed stream.
    upos: u64,
    crc: crc32fast::Hasher,
    uncompressed_hash: Option<Sha256>,
    header_done: bool,
    done: bool,
}

impl fmt::Debug for LayerChunks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LayerChunks")
            .field("upos", &self.upos)
            .field("ulen", &self.layout.ulen)
            .finish()
    }
}

impl LayerChunks {
    fn new(spec: LayerSpec, hash_uncompressed: bool) -> Self {
        let layout = Layout::for_size(spec.size);
        let tar_header = if layout.tar {
            tar_header(spec.seed, layout.data)
        } else {
            [0; 512]
        };
        LayerChunks {
            layout,
            rng: Rng::new(spec.seed),
            spare: ([0; 8], 8),
            tar_header,
            upos: 0,
            crc: crc32fast::Hasher::new(),
            uncompressed_hash: hash_uncompressed.then(Sha256::new),
            header_done: false,
            done: false,
        }
    }

    fn fill_random(&mut self, buf: &mut [u8]) {
        let mut i = 0;
        while i < buf.len() && self.spare.1 < 8 {
            buf[i] = self.spare.0[self.spare.1];
            self.spare.1 += 1;
            i += 1;
        }
        let mut chunks = buf[i..].chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.rng.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            self.spare = (self.rng.next_u64().to_le_bytes(), 0);
            let n = rest.len();
            rest.copy_from_slice(&self.spare.0[..n]);
            self.spare.1 = n;
        }
    }

    /// Writes the next `buf.len()` bytes of the uncompressed stream.
    fn fill_uncompressed(&mut self, buf: &mut [u8]) {
        let (hdr, data) = if self.layout.tar {
            (512u64, self.layout.data)
        } else {
            (0, self.layout.data)
        };
        let mut off = 0usize;
        while off < buf.len() {
            let p = self.upos;
            let n = if p < hdr {
                let n = ((hdr - p) as usize).min(buf.len() - off);
                buf[off..off + n].copy_from_slice(&self.tar_header[p as usize..p as usize + n]);
                n
            } else if p < hdr + data {
                let n = usize::try_from(hdr + data - p)
                    .unwrap_or(usize::MAX)
                    .min(buf.len() - off);
                self.fill_random(&mut buf[off..off + n]);
                n
            } else {
                // Tar end-of-archive zeros.
                let n = usize::try_from(self.layout.ulen - p)
                    .unwrap_or(usize::MAX)
                    .min(buf.len() - off);
                buf[off..off + n].fill(0);
                n
            };
            off += n;
            self.upos += n as u64;
        }
        self.crc.update(buf);
        if let Some(h) = &mut self.uncompressed_hash {
            h.update(&*buf);
        }
    }
}

impl Iterator for LayerChunks {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        let mut out = Vec::with_capacity(CHUNK_SIZE + 64);
        if !self.header_done {
            self.header_done = true;
            let flags = if self.layout.comment > 0 { 0x10 } else { 0 };
            out.extend_from_slice(&[0x1f, 0x8b, 8, flags, 0, 0, 0, 0, 0, 255]);
            if self.layout.comment > 0 {
                out.extend(std::iter::repeat_n(
                    b'p',
                    (self.layout.comment - 1) as usize,
                ));
                out.push(0);
            }
        }
        // Stored deflate blocks until the chunk is full or the stream ends.
        loop {
            let remaining = self.layout.ulen - self.upos;
            let n = remaining.min(BLOCK) as usize;
            let last = remaining == n as u64;
            out.push(u8::from(last));
            out.extend_from_slice(&(n as u16).to_le_bytes());
            out.extend_from_slice(&(!(n as u16)).to_le_bytes());
            let start = out.len();
            out.resize(start + n, 0);
            self.fill_uncompressed(&mut out[start..]);
            if last {
                out.extend_from_slice(&self.crc.clone().finalize().to_le_bytes());
                out.extend_from_slice(&(self.layout.ulen as u32).to_le_bytes());
                self.done = true;
                break;
            }
            if out.len() + BLOCK as usize + 5 > CHUNK_SIZE {
                break;
            }
        }
        Some(Bytes::from(out))
    }
}

/// A ustar header for one regular file `layer-<seed>.bin` of `size` bytes.
fn tar_header(seed: u64, size: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    let name = format!("layer-{seed:016x}.bin");
    h[..name.len()].copy_from_slice(name.as_bytes());
    let mut octal = |at: usize, len: usize, v: u64| {
        let s = format!("{v:0width$o}", width = len - 1);
        h[at..at + len - 1].copy_from_slice(s.as_bytes());
    };
    octal(100, 8, 0o644); // mode
    octal(108, 8, 0); // uid
    octal(116, 8, 0); // gid
    octal(124, 12, size);
    octal(136, 12, 0); // mtime
    h[156] = b'0'; // regular file
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    // The checksum is computed with its own field as spaces.
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    h
}

/// An OS/architecture pair, as in an index's `platform` field.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Platform {
    /// e.g. `linux`.
    pub os: String,
    /// e.g. `amd64`, `arm64`.
    pub architecture: String,
}

impl Platform {
    /// `Platform { os, architecture }`.
    pub fn new(os: &str, architecture: &str) -> Self {
        Platform {
            os: os.to_string(),
            architecture: architecture.to_string(),
        }
    }

    /// linux/amd64.
    pub fn linux_amd64() -> Self {
        Self::new("linux", "amd64")
    }

    /// linux/arm64.
    pub fn linux_arm64() -> Self {
        Self::new("linux", "arm64")
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)
    }
}

/// What to generate: the layers and a seed that makes the config (and so the manifest)
/// unique even when two specs share all their layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// Layers, bottom first.
    pub layers: Vec<LayerSpec>,
    /// Seed written into the config's labels.
    pub seed: u64,
    /// Extra config labels.
    pub labels: BTreeMap<String, String>,
}

impl ImageSpec {
    /// Layers of the given sizes with seeds derived from `seed` (layer `i` gets a distinct
    /// seed), none shared across platforms.
    pub fn random(sizes: &[u64], seed: u64) -> Self {
        let layers = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| LayerSpec::new(size, mix(seed, i as u64 + 1)))
            .collect();
        ImageSpec {
            layers,
            seed,
            labels: BTreeMap::new(),
        }
    }

    /// Puts `layer` at the bottom (a base layer: repeat the same spec in several images to
    /// share the blob; make it [`LayerSpec::shared`] to share it across platforms too).
    pub fn with_base(mut self, layer: LayerSpec) -> Self {
        self.layers.insert(0, layer);
        self
    }

    /// Adds a config label.
    pub fn with_label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_string(), value.to_string());
        self
    }

    /// Builds the config and manifest for `platform` (no network).
    pub fn build(&self, platform: &Platform) -> BuiltImage {
        let layers: Vec<LayerSpec> = self
            .layers
            .iter()
            .map(|l| l.for_platform(platform))
            .collect();
        let digests: Vec<String> = layers.iter().map(LayerSpec::digest).collect();
        let mut labels: serde_json::Map<String, Value> = self
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        labels.insert(
            "imgfleet.test/seed".into(),
            Value::String(self.seed.to_string()),
        );
        let config = json!({
            "created": "2026-01-01T00:00:00Z",
            "architecture": platform.architecture,
            "os": platform.os,
            "config": { "Labels": labels, "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"] },
            "rootfs": { "type": "layers", "diff_ids": layers.iter().map(LayerSpec::diff_id).collect::<Vec<_>>() },
        });
        let config_bytes = serde_json::to_vec(&config).unwrap_or_default();
        let config_digest = sha256_digest(&config_bytes);
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "config": { "mediaType": CONFIG_MEDIA_TYPE, "digest": config_digest, "size": config_bytes.len() },
            "layers": layers.iter().zip(&digests).map(|(l, d)| json!({
                "mediaType": LAYER_MEDIA_TYPE, "digest": d, "size": l.blob_size(),
            })).collect::<Vec<_>>(),
        });
        let manifest_bytes = serde_json::to_vec(&manifest).unwrap_or_default();
        BuiltImage {
            platform: platform.clone(),
            manifest_digest: sha256_digest(&manifest_bytes),
            manifest_bytes,
            config_digest,
            config_bytes,
            layers: layers.into_iter().zip(digests).collect(),
        }
    }
}

/// A built (not yet pushed) image: everything needed to serve or push it.
#[derive(Debug, Clone)]
pub struct BuiltImage {
    /// The platform written into the config.
    pub platform: Platform,
    /// The manifest JSON, exactly as pushed.
    pub manifest_bytes: Vec<u8>,
    /// `sha256:` of `manifest_bytes`.
    pub manifest_digest: String,
    /// The config JSON.
    pub config_bytes: Vec<u8>,
    /// `sha256:` of `config_bytes`.
    pub config_digest: String,
    /// The layers with their digests, bottom first.
    pub layers: Vec<(LayerSpec, String)>,
}

impl BuiltImage {
    /// Config plus layer sizes (the blobs a pull transfers, without the manifest).
    pub fn total_size(&self) -> u64 {
        self.config_bytes.len() as u64 + self.layers.iter().map(|(l, _)| l.blob_size()).sum::<u64>()
    }
}

/// Builds an OCI image index over `images` (each entry gets its platform).
pub fn build_index(images: &[BuiltImage]) -> Vec<u8> {
    let index = json!({
        "schemaVersion": 2,
        "mediaType": INDEX_MEDIA_TYPE,
        "manifests": images.iter().map(|i| json!({
            "mediaType": MANIFEST_MEDIA_TYPE,
            "digest": i.manifest_digest,
            "size": i.manifest_bytes.len(),
            "platform": { "architecture": i.platform.architecture, "os": i.platform.os },
        })).collect::<Vec<_>>(),
    });
    serde_json::to_vec(&index).unwrap_or_default()
}

/// The result of [`push_image`].
#[derive(Debug, Clone)]
pub struct PushedImage {
    /// `sha256:` of the manifest as stored.
    pub manifest_digest: String,
    /// `sha256:` of the config blob.
    pub config_digest: String,
    /// Layer digests, bottom first.
    pub layer_digests: Vec<String>,
    /// Layer sizes in bytes, bottom first.
    pub layer_sizes: Vec<u64>,
    /// Config size in bytes.
    pub config_size: u64,
    /// Config plus layer sizes in bytes.
    pub total_size: u64,
    /// The manifest JSON as pushed.
    pub manifest_bytes: Vec<u8>,
    /// The platform written into the config.
    pub platform: Platform,
}

impl PushedImage {
    /// Config and layer digests (every blob the manifest references).
    pub fn blob_digests(&self) -> Vec<String> {
        std::iter::once(self.config_digest.clone())
            .chain(self.layer_digests.iter().cloned())
            .collect()
    }
}

impl From<&BuiltImage> for PushedImage {
    fn from(b: &BuiltImage) -> Self {
        PushedImage {
            manifest_digest: b.manifest_digest.clone(),
            config_digest: b.config_digest.clone(),
            layer_digests: b.layers.iter().map(|(_, d)| d.clone()).collect(),
            layer_sizes: b.layers.iter().map(|(l, _)| l.blob_size()).collect(),
            config_size: b.config_bytes.len() as u64,
            total_size: b.total_size(),
            manifest_bytes: b.manifest_bytes.clone(),
            platform: b.platform.clone(),
        }
    }
}

/// The result of [`push_index`].
#[derive(Debug, Clone)]
pub struct PushedIndex {
    /// `sha256:` of the index as stored.
    pub index_digest: String,
    /// The index JSON as pushed.
    pub index_bytes: Vec<u8>,
    /// The per-platform images, in the order given.
    pub manifests: Vec<(Platform, PushedImage)>,
}

impl PushedIndex {
    /// Every distinct blob digest (configs and layers) of every platform.
    pub fn blob_digests(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .manifests
            .iter()
            .flat_map(|(_, m)| m.blob_digests())
            .collect();
        all.sort();
        all.dedup();
        all
    }

    /// Sum of the distinct blob sizes of all platforms.
    pub fn total_size(&self) -> u64 {
        // Shared layers count once.
        let mut seen = std::collections::HashSet::new();
        let mut total = 0;
        for (_, m) in &self.manifests {
            let sizes = std::iter::once(m.config_size).chain(m.layer_sizes.iter().copied());
            for (d, size) in m.blob_digests().into_iter().zip(sizes) {
                if seen.insert(d) {
                    total += size;
                }
            }
        }
        total
    }
}

/// Where to push: a registry's base URL, an HTTP client trusting it, and optional basic-auth
/// credentials. Build one from a [`Registry`] with `From`, or by hand to push through a
/// proxy or to another registry.
#[derive(Clone)]
pub struct PushTarget {
    /// `http://host:port` or `https://host:port`.
    pub base_url: String,
    /// The client used for every request.
    pub client: reqwest::Client,
    /// Basic-auth `(username, password)`.
    pub credentials: Option<(String, String)>,
}

impl fmt::Debug for PushTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PushTarget")
            .field("base_url", &self.base_url)
            .field(
                "credentials",
                &self
                    .credentials
                    .as_ref()
                    .map(|(u, _)| format!("{u}:<redacted>")),
            )
            .finish()
    }
}

impl From<&Registry> for PushTarget {
    fn from(r: &Registry) -> Self {
        PushTarget {
            base_url: r.base_url(),
            client: r.http_client().clone(),
            credentials: r.credentials().map(|(u, p)| (u.to_string(), p.to_string())),
        }
    }
}

impl PushTarget {
    /// A plain-HTTP target without credentials at `http://{addr}`.
    pub fn plain_http(addr: &str) -> Result<Self> {
        install_crypto_provider();
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(300))
            .build()
            .context("build HTTP client")?;
        Ok(PushTarget {
            base_url: format!("http://{addr}"),
            client,
            credentials: None,
        })
    }

    fn req(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let r = self.client.request(method, url);
        match &self.credentials {
            Some((u, p)) => r.basic_auth(u, Some(p)),
            None => r,
        }
    }

    /// True when the repository already has the blob (`HEAD /v2/<repo>/blobs/<digest>`).
    pub async fn has_blob(&self, repo: &str, digest: &str) -> Result<bool> {
        let url = format!("{}/v2/{repo}/blobs/{digest}", self.base_url);
        let resp = self
            .req(reqwest::Method::HEAD, &url)
            .send()
            .await
            .with_context(|| format!("HEAD {url}"))?;
        match resp.status().as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            s => bail!("HEAD {url}: unexpected HTTP {s}"),
        }
    }

    /// Uploads a blob unless it is there: POST an upload, then one PUT with the body streamed
    /// from `chunks` (`size` bytes, digest `digest`).
    pub async fn push_blob<I>(&self, repo: &str, digest: &str, size: u64, chunks: I) -> Result<()>
    where
        I: Iterator<Item = Bytes> + Send + 'static,
    {
        if self.has_blob(repo, digest).await? {
            return Ok(());
        }
        let url = format!("{}/v2/{repo}/blobs/uploads/", self.base_url);
        let resp = self
            .req(reqwest::Method::POST, &url)
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        if resp.status().as_u16() != 202 {
            let s = resp.status();
            bail!(
                "POST {url}: expected 202, got {s}: {}",
                resp.text().await.unwrap_or_default()
            );
        }
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .with_context(|| format!("POST {url}: 202 without a Location header"))?
            .to_string();
        let mut put_url = if location.starts_with("http://") || location.starts_with("https://") {
            location
        } else {
            format!("{}{location}", self.base_url)
        };
        put_url.push(if put_url.contains('?') { '&' } else { '?' });
        put_url.push_str("digest=");
        put_url.push_str(digest);
        let body = reqwest::Body::wrap_stream(futures::stream::iter(
            chunks.map(Ok::<Bytes, std::io::Error>),
        ));
        let resp = self
            .req(reqwest::Method::PUT, &put_url)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .header(reqwest::header::CONTENT_LENGTH, size)
            .body(body)
            .send()
            .await
            .with_context(|| format!("PUT blob {digest} to {repo}"))?;
        if resp.status().as_u16() != 201 {
            let s = resp.status();
            bail!(
                "PUT blob {digest} to {repo}: expected 201, got {s}: {}",
                resp.text().await.unwrap_or_default()
            );
        }
        Ok(())
    }

    /// Uploads a manifest or index under `reference` (a tag or its digest); returns the
    /// digest the registry reports.
    pub async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<String> {
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.base_url);
        let resp = self
            .req(reqwest::Method::PUT, &url)
            .header(reqwest::header::CONTENT_TYPE, media_type)
            .body(bytes.to_vec())
            .send()
            .await
            .with_context(|| format!("PUT {url}"))?;
        if resp.status().as_u16() != 201 {
            let s = resp.status();
            bail!(
                "PUT {url}: expected 201, got {s}: {}",
                resp.text().await.unwrap_or_default()
            );
        }
        let expected = sha256_digest(bytes);
        if let Some(d) = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            && d != expected
        {
            bail!("PUT {url}: registry reports digest {d}, expected {expected}");
        }
        Ok(expected)
    }

    /// Pushes the blobs and manifest of a built image, tagging it `reference`.
    pub async fn push_built(
        &self,
        repo: &str,
        reference: &str,
        image: &BuiltImage,
    ) -> Result<PushedImage> {
        let cfg = Bytes::from(image.config_bytes.clone());
        self.push_blob(
            repo,
            &image.config_digest,
            cfg.len() as u64,
            std::iter::once(cfg),
        )
        .await?;
        for (layer, digest) in &image.layers {
            self.push_blob(repo, digest, layer.blob_size(), layer.chunks())
                .await?;
        }
        self.push_manifest(repo, reference, MANIFEST_MEDIA_TYPE, &image.manifest_bytes)
            .await?;
        Ok(PushedImage::from(image))
    }

    /// Builds and pushes a single-platform (linux/amd64) image as `repo:tag`.
    pub async fn push_image(&self, repo: &str, tag: &str, spec: &ImageSpec) -> Result<PushedImage> {
        let built = spec.build(&Platform::linux_amd64());
        self.push_built(repo, tag, &built).await
    }

    /// Builds one image per platform, pushes each by digest, then the index as `repo:tag`.
    pub async fn push_index(
        &self,
        repo: &str,
        tag: &str,
        platforms: &[Platform],
        spec: &ImageSpec,
    ) -> Result<PushedIndex> {
        if platforms.is_empty() {
            bail!("push_index {repo}:{tag}: platforms is empty, expected at least one");
        }
        let built: Vec<BuiltImage> = platforms.iter().map(|p| spec.build(p)).collect();
        let mut manifests = Vec::new();
        for b in &built {
            let pushed = self.push_built(repo, &b.manifest_digest, b).await?;
            manifests.push((b.platform.clone(), pushed));
        }
        let index_bytes = build_index(&built);
        let index_digest = self
            .push_manifest(repo, tag, INDEX_MEDIA_TYPE, &index_bytes)
            .await?;
        Ok(PushedIndex {
            index_digest,
            index_bytes,
            manifests,
        })
    }
}

/// Builds and pushes a single-platform linux/amd64 image to `registry` as `repo:tag`.
pub async fn push_image(
    registry: &Registry,
    repo: &str,
    tag: &str,
    spec: &ImageSpec,
) -> Result<PushedImage> {
    PushTarget::from(registry).push_image(repo, tag, spec).await
}

/// Builds and pushes a multi-platform index to `registry` as `repo:tag`; each
/// `(os, arch)` gets its own config and (non-shared) layers.
pub async fn push_index(
    registry: &Registry,
    repo: &str,
    tag: &str,
    platforms: &[(&str, &str)],
    spec: &ImageSpec,
) -> Result<PushedIndex> {
    let platforms: Vec<Platform> = platforms
        .iter()
        .map(|(os, arch)| Platform::new(os, arch))
        .collect();
    PushTarget::from(registry)
        .push_index(repo, tag, &platforms, spec)
        .await
}

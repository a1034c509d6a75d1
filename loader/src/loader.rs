//! The loader: references in, composed keys and values in device memory out.
//!
//! A load resolves each reference (remembering resolutions for when the registry is down),
//! checks the cartridge was made for the asking model, and makes each cartridge resident:
//! already resident (the device tier), decoded from verified blobs on disk (the disk tier), or
//! fetched from the registry first — chunks downloaded in parallel and decoded into place as they
//! arrive. Concurrent loads of one cartridge share a single fetch. Several cartridges are then
//! concatenated, per layer along the token axis, into one buffer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cartridge_client::{FetchReport, NoProgress, PullOptions, fetch_blobs};
use cartridge_schemas::api::ErrorCode;
use cartridge_schemas::file::Header;
use cartridge_schemas::{Digest, Dtype, ModelFingerprint, Reference};
use serde::{Deserialize, Serialize};

use crate::device::{Buffer, Device, Location};
use crate::disk::{DiskCache, DiskUsage};
use crate::error::LoaderError;
use crate::resolve::{Resolved, Resolver, client_error};
use crate::store::{EntryKey, Resident, Store, StoreStatus};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadRequest {
    /// The model the keys and values are for; a cartridge made for another is refused.
    pub model: ModelFingerprint,
    /// Cartridges in the order their tokens should come.
    pub cartridges: Vec<String>,
    /// Answer as newline-delimited JSON events: [`LayersReady`] as a single cartridge's layers
    /// land, so a consumer can start on the first layers, then the [`LoadResponse`].
    #[serde(default)]
    pub stream: bool,
    /// Seconds the handle lives unless renewed (`POST /v1/renew`), so a consumer that dies
    /// without releasing does not hold the memory for good. Without one, the loader's
    /// `--default-lease` applies, and without that the handle lives until released. A consumer
    /// whose lease lapsed must stop using the buffer at once: the loader no longer keeps it (on
    /// a GPU the memory may go to another load).
    #[serde(default)]
    pub lease: Option<u64>,
}

/// The longest lease a load may ask for: a week.
pub const MAX_LEASE: u64 = 7 * 24 * 3600;

/// The first `ready` of `layers` layers in the buffer at `location` hold their final bytes (on a
/// GPU: their copies are done). Told while a single cartridge is decoded into a new buffer (a
/// composition, or a cartridge already resident, is answered whole). Provisional until the load
/// answers: if a cached blob fails verification the decode starts over in a new buffer (a new
/// location, counting from the start), and a failed load removes its buffer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayersReady {
    #[serde(flatten)]
    pub location: Location,
    pub ready: u32,
    pub layers: u32,
}

/// Told each time more leading layers of a load are ready; called from decoding threads, in
/// order.
pub type Progress = Arc<dyn Fn(&LayersReady) + Send + Sync>;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefetchRequest {
    pub cartridges: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    pub handle: u64,
}

/// A handle's lease, renewed: seconds from now (none for a handle without one).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Renewed {
    pub handle: u64,
    pub lease: Option<u64>,
}

/// What a handle holds, and until when.
struct Held {
    key: EntryKey,
    lease: Option<std::time::Duration>,
    expires: Option<Instant>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Part {
    pub reference: String,
    pub digest: Digest,
    pub tokens: u64,
}

/// Where one layer's keys and values are in the buffer.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct LayerSpan {
    pub keys: u64,
    pub values: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadResponse {
    pub handle: u64,
    /// Total tokens: the inference continues at this position.
    pub tokens: u64,
    pub layers: u32,
    pub kv_heads: u32,
    pub head_dim: u32,
    pub dtype: Dtype,
    pub parts: Vec<Part>,
    /// The slowest tier the load reached: `device`, `host`, `disk` or `registry`.
    pub tier: String,
    /// Where the keys and values are (`path`: a shared-memory file; `cuda`: GPU memory by IPC
    /// handle); each tensor is `[kv_heads, tokens, head_dim]` at the byte offsets of `layout`.
    #[serde(flatten)]
    pub location: Location,
    pub bytes: u64,
    pub layout: Vec<LayerSpan>,
    /// The handle's lease in seconds (the load's, else the loader's default): renew within it.
    /// None: it lives until released.
    pub lease: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct Status {
    /// What the device tier is: host memory, or which GPU.
    pub memory: String,
    pub device: StoreStatus,
    /// Decoded cartridges kept in page-locked host memory (on a GPU).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<StoreStatus>,
    /// GPU memory of dropped buffers kept for the next allocation of their size (on a GPU).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kept_bytes: Option<u64>,
    pub disk: DiskUsage,
    pub handles: usize,
}

/// Where a cartridge was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tier {
    Device,
    Host,
    Disk,
    Registry,
}

impl Tier {
    fn name(self) -> &'static str {
        match self {
            Self::Device => "device",
            Self::Host => "host",
            Self::Disk => "disk",
            Self::Registry => "registry",
        }
    }
}

pub struct LoaderOptions {
    pub device: Arc<Device>,
    pub transfers: PullOptions,
    /// The lease of a load that asks for none (none: such a handle lives until released).
    pub default_lease: Option<std::time::Duration>,
}

pub struct Loader {
    resolver: Resolver,
    disk: DiskCache,
    store: Mutex<Store<Buffer>>,
    options: LoaderOptions,
    handles: Mutex<HashMap<u64, Held>>,
    /// One lock per entry being made resident, so concurrent loads of it share one fetch.
    flights: Mutex<HashMap<EntryKey, Flight>>,
}

/// Loads of one entry take turns; each turn leaves how it ended for those waiting behind it.
type Flight = Arc<tokio::sync::Mutex<Option<Landed>>>;

/// How a turn ended, and when.
struct Landed {
    at: Instant,
    outcome: Result<Tier, LoaderError>,
}

impl Loader {
    pub fn new(resolver: Resolver, disk: DiskCache, budget: u64, options: LoaderOptions) -> Self {
        Self {
            resolver,
            disk,
            store: Mutex::new(Store::new("device", budget)),
            options,
            handles: Mutex::new(HashMap::new()),
            flights: Mutex::new(HashMap::new()),
        }
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store<Buffer>> {
        // A panic while holding the lock leaves plain bookkeeping, still consistent enough to use.
        self.store
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A reference may name the registry this loader fetches from, and no other: it holds one
    /// registry's token, and would otherwise serve that registry's cartridge under another's name.
    fn parse(&self, text: &str) -> Result<Reference, LoaderError> {
        let reference: Reference =
            text.parse()
                .map_err(|e: cartridge_schemas::reference::ReferenceError| {
                    LoaderError::BadRequest(e.to_string())
                })?;
        if let Some(named) = &reference.registry {
            let base = self.resolver.client().base();
            let same = url::Url::parse(&format!("{}://{named}", base.scheme())).is_ok_and(|url| {
                url.host() == base.host()
                    && url.port_or_known_default() == base.port_or_known_default()
            });
            if !same {
                return Err(LoaderError::BadRequest(format!(
                    "{text} names the registry {named}; this loader fetches from {base} only"
                )));
            }
        }
        Ok(reference)
    }

    /// Checks a load and resolves what it names, for the model it names: everything that can
    /// refuse it before memory is touched (a streamed load answers these with their own status).
    pub async fn prepare(&self, request: &LoadRequest) -> Result<Prepared, LoaderError> {
        counted(self.try_prepare(request).await)
    }

    async fn try_prepare(&self, request: &LoadRequest) -> Result<Prepared, LoaderError> {
        let started = Instant::now();
        if request.cartridges.is_empty() {
            return Err(LoaderError::BadRequest("no cartridges to load".into()));
        }
        check_count(&request.cartridges)?;
        let lease = match request.lease {
            Some(seconds @ 1..=MAX_LEASE) => Some(std::time::Duration::from_secs(seconds)),
            Some(seconds) => {
                return Err(LoaderError::BadRequest(format!(
                    "a lease of {seconds} s: expected 1 to {MAX_LEASE}"
                )));
            }
            None => self.options.default_lease,
        };
        let references = request
            .cartridges
            .iter()
            .map(|r| self.parse(r))
            .collect::<Result<Vec<_>, _>>()?;
        let parts = self.resolve_parts(&request.model, &references).await?;
        Ok(Prepared {
            started,
            lease,
            parts,
        })
    }

    /// Makes a prepared load resident and hands out a handle to it.
    pub async fn load(
        &self,
        prepared: Prepared,
        progress: Option<Progress>,
    ) -> Result<LoadResponse, LoaderError> {
        counted(self.try_load(prepared, progress).await)
    }

    async fn try_load(
        &self,
        prepared: Prepared,
        progress: Option<Progress>,
    ) -> Result<LoadResponse, LoaderError> {
        let Prepared {
            started,
            lease,
            parts,
        } = prepared;
        let (key, tier) = self.resident(&parts, progress).await?;
        if tier <= Tier::Host {
            // Hits on memory keep the blobs fresh on disk too, for when memory lets them go.
            parts
                .iter()
                .for_each(|part| self.disk.touch(&part.blob_digests()));
        }
        let (buffer, header) = self
            .store()
            .acquire(&key)
            .ok_or_else(|| LoaderError::Internal(format!("{key} vanished while loading")))?;
        // The acquire above is the handle's reference; the one the load itself took goes.
        self.store().release(&key);
        let handle = {
            let mut handles = self
                .handles
                .lock()
                .map_err(|_| LoaderError::Internal("handle table poisoned".into()))?;
            // Unguessable, as the API has no authentication (one consumer must not release
            // another's handle by counting), and exact as a JSON number (below 2^53).
            let handle = loop {
                let id = rand::random::<u64>() >> 11;
                if id != 0 && !handles.contains_key(&id) {
                    break id;
                }
            };
            handles.insert(
                handle,
                Held {
                    key,
                    lease,
                    expires: lease.map(|lease| Instant::now() + lease),
                },
            );
            handle
        };

        metrics::histogram!("loader_load_seconds", "tier" => tier.name())
            .record(started.elapsed().as_secs_f64());
        metrics::counter!("loader_loads_total", "tier" => tier.name()).increment(1);
        let tensor = header.tensor_bytes() as u64;
        Ok(LoadResponse {
            handle,
            tokens: header.tokens,
            layers: header.model.layers,
            kv_heads: header.model.kv_heads,
            head_dim: header.model.head_dim,
            dtype: header.dtype,
            parts: parts
                .iter()
                .map(|p| Part {
                    reference: p.reference.to_string(),
                    digest: p.digest,
                    tokens: p.manifest.cartridge.tokens,
                })
                .collect(),
            tier: tier.name().to_owned(),
            location: buffer.location(),
            bytes: buffer.bytes() as u64,
            layout: (0..u64::from(header.model.layers))
                .map(|l| LayerSpan {
                    keys: l * 2 * tensor,
                    values: (l * 2 + 1) * tensor,
                })
                .collect(),
            lease: lease.map(|lease| lease.as_secs()),
        })
    }

    pub fn release(&self, handle: u64) -> Result<(), LoaderError> {
        self.expire();
        let held = self
            .handles
            .lock()
            .map_err(|_| LoaderError::Internal("handle table poisoned".into()))?
            .remove(&handle)
            .ok_or(LoaderError::UnknownHandle(handle))?;
        self.store().release(&held.key);
        Ok(())
    }

    /// Extends a handle's lease by its length from now.
    pub fn renew(&self, handle: u64) -> Result<Renewed, LoaderError> {
        self.expire();
        let mut handles = self
            .handles
            .lock()
            .map_err(|_| LoaderError::Internal("handle table poisoned".into()))?;
        let held = handles
            .get_mut(&handle)
            .ok_or(LoaderError::UnknownHandle(handle))?;
        held.expires = held.lease.map(|lease| Instant::now() + lease);
        Ok(Renewed {
            handle,
            lease: held.lease.map(|lease| lease.as_secs()),
        })
    }

    /// Releases the handles whose lease lapsed. Checked whenever the loader is asked anything
    /// and before it reserves memory: memory is needed, and counted, only then.
    pub fn expire(&self) {
        let now = Instant::now();
        let lapsed: Vec<EntryKey> = {
            let Ok(mut handles) = self.handles.lock() else {
                return;
            };
            let ids: Vec<u64> = handles
                .iter()
                .filter(|(_, held)| held.expires.is_some_and(|at| at <= now))
                .map(|(id, _)| *id)
                .collect();
            ids.iter()
                .filter_map(|id| handles.remove(id))
                .map(|held| held.key)
                .collect()
        };
        if !lapsed.is_empty() {
            tracing::warn!(count = lapsed.len(), "released handles whose lease lapsed");
            metrics::counter!("loader_leases_lapsed_total").increment(lapsed.len() as u64);
            self.release_keys(&lapsed);
        }
    }

    fn release_keys(&self, keys: &[EntryKey]) {
        let mut store = self.store();
        keys.iter().for_each(|key| store.release(key));
    }

    /// Resolves and downloads cartridges to the disk tier, without decoding them. All of them
    /// must fit the disk cap together, and each stays pinned until the last has arrived: a
    /// prefetch that succeeds holds everything it names.
    pub async fn prefetch(&self, references: &[String]) -> Result<Vec<Part>, LoaderError> {
        check_count(references)?;
        self.expire();
        let parsed = references
            .iter()
            .map(|r| self.parse(r))
            .collect::<Result<Vec<_>, _>>()?;
        let resolutions =
            futures::future::try_join_all(parsed.iter().map(|r| self.resolver.resolve(r))).await?;
        let blobs: HashMap<Digest, u64> = resolutions
            .iter()
            .flat_map(|r| r.manifest.blobs())
            .map(|b| (b.digest, b.size))
            .collect();
        let (needed, cap) = (blobs.values().sum::<u64>(), self.disk.usage().cap);
        if needed > cap {
            return Err(LoaderError::OutOfMemory(format!(
                "the prefetch needs {needed} bytes of disk, over the cache's cap of {cap}"
            )));
        }
        let digests: Vec<Digest> = blobs.into_keys().collect();
        let _pinned = self.disk.pinned(&digests);
        let mut parts = Vec::new();
        for (reference, resolved) in references.iter().zip(resolutions) {
            let (ready, arrivals) = std::sync::mpsc::channel();
            drop(arrivals);
            let fetched = fetch_blobs(
                self.resolver.client(),
                &resolved.reference.repository,
                &resolved.manifest,
                self.disk.cache(),
                &self.options.transfers,
                &NoProgress,
                ready,
            )
            .await;
            from_registry(&fetched.map_err(|e| client_error(&e))?);
            parts.push(Part {
                reference: reference.clone(),
                digest: resolved.digest,
                tokens: resolved.manifest.cartridge.tokens,
            });
        }
        Ok(parts)
    }

    pub fn status(&self) -> Status {
        self.expire();
        let handles = self.handles.lock().map(|h| h.len()).unwrap_or(0);
        Status {
            memory: self.options.device.describe(),
            device: self.store().status(),
            host: self.options.device.host_tier(),
            kept_bytes: self.options.device.kept_bytes(),
            disk: self.disk.usage(),
            handles,
        }
    }

    /// Forgets a finished flight (later loads find the entry resident, or start a new one).
    /// Called by [`Landing`] however a turn ends.
    fn land(&self, key: &EntryKey) {
        let mut flights = self
            .flights
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if flights
            .get(key)
            .is_some_and(|flight| Arc::strong_count(flight) <= 2)
        {
            flights.remove(key);
        }
    }

    fn flight(&self, key: &EntryKey) -> Flight {
        let mut flights = self
            .flights
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        flights.entry(key.clone()).or_default().clone()
    }

    /// Resolves each reference and checks its cartridge suits `model`, and the first one's dtype.
    async fn resolve_parts(
        &self,
        model: &ModelFingerprint,
        references: &[Reference],
    ) -> Result<Vec<Resolved>, LoaderError> {
        // Side by side: each may wait on the registry.
        let resolutions =
            futures::future::try_join_all(references.iter().map(|r| self.resolver.resolve(r)))
                .await?;
        let mut parts: Vec<Resolved> = Vec::with_capacity(references.len());
        for (reference, resolved) in references.iter().zip(resolutions) {
            let header = &resolved.manifest.cartridge;
            model
                .check_compatible(&header.model)
                .map_err(|e| LoaderError::ModelMismatch {
                    reference: reference.to_string(),
                    detail: e.to_string(),
                })?;
            if let Some(first) = parts.first().map(|p| p.manifest.cartridge.dtype)
                && first != header.dtype
            {
                return Err(LoaderError::ModelMismatch {
                    reference: reference.to_string(),
                    detail: format!(
                        "dtype: holds {} but the first cartridge holds {first}: they cannot be composed",
                        header.dtype
                    ),
                });
            }
            parts.push(resolved);
        }
        Ok(parts)
    }

    /// Makes what `parts` name resident (one cartridge, or their composition) and takes a
    /// reference on it. Says the slowest tier a part came from.
    async fn resident(
        &self,
        parts: &[Resolved],
        progress: Option<Progress>,
    ) -> Result<(EntryKey, Tier), LoaderError> {
        if let [part] = parts {
            let tier = self.ensure_single(part, progress).await?;
            return Ok((EntryKey::Single(part.digest), tier));
        }
        // A resident composition needs none of its parts (they may have been evicted).
        let key = EntryKey::Composed(parts.iter().map(|p| p.digest).collect());
        let tier = self.fly(&key, self.compose(&key, parts)).await?;
        Ok((key, tier))
    }

    /// Takes a reference on `key`: resident already, made so by the load ahead of this one, or
    /// by `load` in this one's turn. Loads that waited behind a turn that failed for a reason
    /// of the loader's (the registry unreachable, no memory, corrupt data) get its error instead
    /// of each trying again in turn: a registry down would answer the last of a hundred after a
    /// hundred timeouts. One that failed for its request's sake (say, the repository it came
    /// through) is no answer for the others; loads arriving later try anew.
    async fn fly(
        &self,
        key: &EntryKey,
        load: impl Future<Output = Result<Tier, LoaderError>>,
    ) -> Result<Tier, LoaderError> {
        if self.store().acquire(key).is_some() {
            return Ok(Tier::Device);
        }
        let flight = self.flight(key);
        let _landing = Landing { loader: self, key };
        let waiting_since = Instant::now();
        let mut turn = flight.lock().await;
        let ahead = turn
            .as_ref()
            .filter(|landed| landed.at >= waiting_since)
            .map(|landed| landed.outcome.clone());
        if self.store().acquire(key).is_some() {
            // Waited for the tier the turn ahead reached.
            return Ok(ahead.and_then(Result::ok).unwrap_or(Tier::Device));
        }
        if let Some(Err(error)) = ahead {
            return Err(error);
        }
        let outcome = load.await;
        let answers_others = match &outcome {
            Ok(_) => true,
            Err(error) => matches!(
                error,
                LoaderError::Unavailable(_) | LoaderError::OutOfMemory(_) | LoaderError::Corrupt(_)
            ),
        };
        *turn = answers_others.then(|| Landed {
            at: Instant::now(),
            outcome: outcome.clone(),
        });
        outcome
    }

    /// Makes one cartridge resident and takes a reference on it.
    async fn ensure_single(
        &self,
        part: &Resolved,
        progress: Option<Progress>,
    ) -> Result<Tier, LoaderError> {
        let key = EntryKey::Single(part.digest);
        self.fly(&key, async {
            let bytes = part.manifest.cartridge.payload_bytes();
            // Leases that lapsed while this load waited free their memory for it.
            self.expire();
            let evicted = self.store().reserve(bytes)?;
            drop(evicted);
            let loaded = self.make_resident(part, progress).await;
            let mut store = self.store();
            match loaded {
                Ok((buffer, tier)) => {
                    store.insert(key.clone(), buffer, part.manifest.cartridge.clone());
                    Ok(tier)
                }
                Err(error) => {
                    store.unreserve(bytes);
                    Err(error)
                }
            }
        })
        .await
    }

    /// A new buffer holding the cartridge: copied from the host tier (on a GPU), or decoded
    /// from its blobs.
    async fn make_resident(
        &self,
        part: &Resolved,
        progress: Option<Progress>,
    ) -> Result<(Buffer, Tier), LoaderError> {
        let device = self.options.device.clone();
        let digest = part.digest;
        match tokio::task::spawn_blocking(move || device.restage(digest))
            .await
            .map_err(|e| LoaderError::Internal(format!("copying to the device: {e}")))?
        {
            Some(restaged) => restaged.map(|buffer| {
                metrics::counter!("loader_restaged_bytes_total")
                    .increment(part.manifest.cartridge.payload_bytes());
                (buffer, Tier::Host)
            }),
            None => self.fetch_and_decode(part, progress).await,
        }
    }

    /// Decodes a cartridge's chunks into a new buffer as its blobs arrive from disk or from the
    /// registry. A blob on disk that fails to verify is dropped by the decoder; one more attempt
    /// fetches it again.
    async fn fetch_and_decode(
        &self,
        part: &Resolved,
        progress: Option<Progress>,
    ) -> Result<(Buffer, Tier), LoaderError> {
        let digests = part.blob_digests();
        let _pinned = self.disk.pinned(&digests);
        let mut outcome = self.fetch_and_decode_once(part, progress.clone()).await;
        if matches!(outcome, Err(LoaderError::Corrupt(_))) {
            tracing::warn!(digest = %part.digest, "a cached blob failed verification; fetching it again");
            metrics::counter!("loader_corrupt_blobs_total").increment(1);
            outcome = self.fetch_and_decode_once(part, progress).await;
        }
        outcome
    }

    async fn fetch_and_decode_once(
        &self,
        part: &Resolved,
        progress: Option<Progress>,
    ) -> Result<(Buffer, Tier), LoaderError> {
        let manifest = Arc::new(part.manifest.clone());
        let bytes = manifest.cartridge.payload_bytes();
        let (ready, arrivals) = std::sync::mpsc::channel();
        let decoder = {
            let (manifest, cache, device, digest) = (
                manifest.clone(),
                self.disk.cache().clone(),
                self.options.device.clone(),
                part.digest,
            );
            tokio::task::spawn_blocking(move || {
                device.decode(&manifest, digest, &cache, arrivals, progress)
            })
        };
        let fetch = fetch_blobs(
            self.resolver.client(),
            &part.reference.repository,
            &manifest,
            self.disk.cache(),
            &self.options.transfers,
            &NoProgress,
            ready,
        );
        let joined = |decoded: Result<_, tokio::task::JoinError>| {
            decoded.map_err(|e| LoaderError::Internal(format!("decoding: {e}")))
        };
        let (mut fetch, mut decoder) = (std::pin::pin!(fetch), std::pin::pin!(decoder));
        let (fetched, decoded) = tokio::select! {
            // The fetch first: its end is what ends a decode waiting for blobs, and a failed
            // download explains an incomplete decode better than the decoder does.
            biased;
            fetched = &mut fetch => (fetched, joined(decoder.await)?),
            // A decode that fails before the blobs are all here (no memory for the buffer, a
            // corrupt blob) stops the downloads: partial files stay for the next try.
            decoded = &mut decoder => match joined(decoded)? {
                Err(error) => return Err(error),
                decoded => (fetch.await, decoded),
            },
        };
        let fetched = fetched.map_err(|e| match e.code() {
            // The reference resolved: a blob it names missing is the registry's fault (a
            // collection racing this load, lost storage), not an unknown cartridge.
            Some(ErrorCode::NotFound) => LoaderError::MissingBlob(format!(
                "{}: the registry lacks a blob its manifest names: {e}",
                part.reference
            )),
            _ => client_error(&e),
        })?;
        // Counted before the decode's outcome: a decode that fails once the downloads are done
        // still fetched their bytes.
        let tier = if from_registry(&fetched) {
            Tier::Registry
        } else {
            Tier::Disk
        };
        let buffer = decoded?;
        metrics::counter!("loader_decoded_bytes_total").increment(bytes);
        Ok((buffer, tier))
    }

    /// Makes the parts resident, each held meanwhile, and their composition (per layer, per
    /// head, the parts' tokens one after another) resident under `key`, with a reference on it.
    /// Says the slowest tier a part came from.
    async fn compose(&self, key: &EntryKey, parts: &[Resolved]) -> Result<Tier, LoaderError> {
        let (mut tier, mut held) = (Tier::Device, Vec::new());
        let composed = async {
            for part in parts {
                tier = tier.max(self.ensure_single(part, None).await?);
                held.push(EntryKey::Single(part.digest));
            }
            self.compose_resident(key, parts).await
        }
        .await;
        self.release_keys(&held);
        composed.map(|()| tier)
    }

    /// Makes the composition of resident parts resident under `key`, with a reference on it.
    async fn compose_resident(
        &self,
        key: &EntryKey,
        parts: &[Resolved],
    ) -> Result<(), LoaderError> {
        let headers: Vec<&Header> = parts.iter().map(|p| &p.manifest.cartridge).collect();
        let mut header = headers[0].clone();
        header.tokens = headers.iter().map(|h| h.tokens).sum();
        header.provenance = serde_json::json!({"composed_of": parts.iter().map(|p| p.reference.to_string()).collect::<Vec<_>>()});
        let bytes = header.payload_bytes();
        self.expire();
        let evicted = self.store().reserve(bytes).map_err(|error| match error {
            LoaderError::OutOfMemory(detail) => LoaderError::OutOfMemory(format!(
                "the composition: {detail} (its parts stay resident while it is built)"
            )),
            other => other,
        })?;
        drop(evicted);
        let (sources, inputs): (Vec<EntryKey>, Vec<_>) = {
            let mut store = self.store();
            parts
                .iter()
                .map(|p| EntryKey::Single(p.digest))
                .filter_map(|key| store.acquire(&key).map(|source| (key, source)))
                .unzip()
        };
        let composed = if inputs.len() == parts.len() {
            let device = self.options.device.clone();
            let layout = header.clone();
            // A panic is an error like any other: the cleanup below still runs.
            tokio::task::spawn_blocking(move || device.compose(&layout, &inputs))
                .await
                .unwrap_or_else(|e| Err(LoaderError::Internal(format!("composing: {e}"))))
        } else {
            Err(LoaderError::Internal(
                "a part was evicted while composing".into(),
            ))
        };
        let mut store = self.store();
        sources.iter().for_each(|source| store.release(source));
        match composed {
            Ok(buffer) => {
                store.insert(key.clone(), buffer, header);
                Ok(())
            }
            Err(error) => {
                store.unreserve(bytes);
                Err(error)
            }
        }
    }
}

/// Lands a flight when its turn ends, on every path out (an early `?` included), so the flight
/// table holds only flights in progress.
struct Landing<'a> {
    loader: &'a Loader,
    key: &'a EntryKey,
}

impl Drop for Landing<'_> {
    fn drop(&mut self) {
        self.loader.land(self.key);
    }
}

/// Whether a cartridge's blobs came from the registry (counted in the metrics) or all from disk.
fn from_registry(fetched: &FetchReport) -> bool {
    let fetched_any = fetched.downloaded_bytes + fetched.resumed_bytes > 0;
    if fetched_any {
        metrics::counter!("loader_fetches_total").increment(1);
        metrics::counter!("loader_fetched_bytes_total").increment(fetched.downloaded_bytes);
    }
    fetched_any
}

/// Most cartridges one request names: a composition of more is no use, and each costs a
/// resolution and a manifest in memory.
pub const MAX_CARTRIDGES: usize = 64;

/// A load checked and resolved, to be made resident ([`Loader::prepare`]).
pub struct Prepared {
    started: Instant,
    lease: Option<std::time::Duration>,
    parts: Vec<Resolved>,
}

/// Counts a failed load by the status it answers.
fn counted<T>(outcome: Result<T, LoaderError>) -> Result<T, LoaderError> {
    if let Err(error) = &outcome {
        metrics::counter!("loader_load_errors_total", "status" => error.code().http_status().to_string())
            .increment(1);
    }
    outcome
}

fn check_count(references: &[String]) -> Result<(), LoaderError> {
    if references.len() > MAX_CARTRIDGES {
        return Err(LoaderError::BadRequest(format!(
            "{} cartridges in one request; at most {MAX_CARTRIDGES}",
            references.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    /// Ten loads wait behind one that fails with `error`; how many attempts were made.
    async fn attempts_behind_a_failure(error: LoaderError) -> usize {
        let dir = tempfile::tempdir().unwrap();
        // Nothing listens there: the turns below never ask the registry.
        let client = cartridge_client::Client::new("http://127.0.0.1:9", None).unwrap();
        let resolver = Resolver::new(client, &dir.path().join("resolved"), Duration::ZERO).unwrap();
        let disk = DiskCache::open(&dir.path().join("cache"), 1 << 20).unwrap();
        let options = LoaderOptions {
            device: Arc::new(Device::host(&dir.path().join("shm"))),
            transfers: PullOptions::default(),
            default_lease: None,
        };
        let loader = Loader::new(resolver, disk, 1 << 20, options);
        let key = EntryKey::Single(Digest::of(b"cartridge"));
        let attempts = AtomicUsize::new(0);
        let failing = || async {
            attempts.fetch_add(1, Ordering::SeqCst);
            tokio::task::yield_now().await;
            Err::<Tier, _>(error.clone())
        };
        let (started, going) = tokio::sync::watch::channel(false);
        let leader = async {
            loader
                .fly(&key, async {
                    started.send_replace(true);
                    // Fails only once every follower waits behind it.
                    for _ in 0..10 {
                        tokio::task::yield_now().await;
                    }
                    failing().await
                })
                .await
        };
        let followers = futures::future::join_all((0..10).map(|_| {
            let mut going = going.clone();
            let (loader, key, failing) = (&loader, &key, &failing);
            async move {
                going.wait_for(|started| *started).await.unwrap();
                loader.fly(key, failing()).await
            }
        }));
        let (first, rest) = tokio::join!(leader, followers);
        assert!(
            first.is_err() && rest.iter().all(Result::is_err),
            "{rest:?}"
        );
        let behind = attempts.load(Ordering::SeqCst);
        // A load arriving after the failure tries again.
        assert!(loader.fly(&key, failing()).await.is_err());
        assert_eq!(attempts.load(Ordering::SeqCst), behind + 1);
        behind
    }

    #[tokio::test]
    async fn loads_waiting_behind_a_failure_of_the_loaders_get_its_error() {
        let down = LoaderError::Unavailable("registry down".into());
        assert_eq!(attempts_behind_a_failure(down).await, 1);
    }

    #[tokio::test]
    async fn loads_waiting_behind_a_failure_of_the_requests_own_try_themselves() {
        let gone = LoaderError::UnknownReference("team/gone@v1".into());
        assert_eq!(attempts_behind_a_failure(gone).await, 11);
    }
}

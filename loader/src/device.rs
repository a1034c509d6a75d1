//! Where resident keys and values live, and how they get there.
//!
//! `host`: each resident cartridge (or composition) is a shared-memory file an inference process
//! on the machine maps. `cuda`: each is a GPU allocation another process opens by its CUDA IPC
//! handle; a cartridge is decoded into page-locked host memory and each chunk is copied to the GPU
//! as soon as it is in place, and the decoded bytes stay in host memory (the host tier, under its
//! own budget), so a cartridge evicted from the GPU comes back by one copy.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

use cartridge_client::{Cache, decode_arrivals};
use cartridge_schemas::Digest;
use cartridge_schemas::file::Header;
use cartridge_schemas::manifest::{LayerRange, Manifest};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::buffer::HostBuffer;
#[cfg(feature = "cuda")]
use crate::cuda::{DeviceBuffer, Gpu, PinnedBuffer};
use crate::error::LoaderError;
use crate::loader::{LayersReady, Progress};
#[cfg(feature = "cuda")]
use crate::store::{EntryKey, Store};
use crate::store::{Resident, StoreStatus};

/// Where a buffer's bytes are, for the process that uses them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Location {
    /// A shared-memory file to map read-only.
    Path(PathBuf),
    /// GPU memory to open with `cuIpcOpenMemHandle` (or `cudaIpcOpenMemHandle`).
    Cuda(CudaLocation),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CudaLocation {
    /// The loader's ordinal of the GPU.
    pub device: u32,
    /// The GPU's UUID as `nvidia-smi -L` prints it (ordinals differ between processes when
    /// `CUDA_VISIBLE_DEVICES` does).
    pub uuid: String,
    /// The 64-byte `CUipcMemHandle`, hex.
    pub ipc_handle: String,
}

/// Memory holding one resident cartridge or composition.
#[derive(Debug)]
pub enum Buffer {
    Host(HostBuffer),
    #[cfg(feature = "cuda")]
    Cuda(DeviceBuffer),
}

impl Buffer {
    pub fn location(&self) -> Location {
        match self {
            Self::Host(buffer) => Location::Path(buffer.path().to_owned()),
            #[cfg(feature = "cuda")]
            Self::Cuda(buffer) => Location::Cuda(buffer.location().clone()),
        }
    }
}

impl Resident for Buffer {
    fn bytes(&self) -> usize {
        match self {
            Self::Host(buffer) => buffer.len(),
            #[cfg(feature = "cuda")]
            Self::Cuda(buffer) => buffer.bytes(),
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::Host(buffer) => buffer.path().display().to_string(),
            #[cfg(feature = "cuda")]
            Self::Cuda(buffer) => format!("cuda:{}", buffer.location().device),
        }
    }
}

#[cfg(feature = "cuda")]
impl Resident for PinnedBuffer {
    fn bytes(&self) -> usize {
        PinnedBuffer::bytes(self)
    }

    fn describe(&self) -> String {
        "page-locked host memory".into()
    }
}

pub enum Device {
    Host {
        shm_dir: PathBuf,
    },
    #[cfg(feature = "cuda")]
    Cuda {
        gpu: Gpu,
        /// The host tier: decoded cartridges in page-locked memory, by digest.
        staged: Mutex<Store<PinnedBuffer>>,
    },
}

#[cfg(not(feature = "cuda"))]
const WITHOUT_CUDA: &str = "this loader was built without CUDA (build it with `--features cuda`)";

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain bookkeeping, still consistent enough to use.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Device {
    /// Host memory: buffers are files in `shm_dir` (see [`crate::buffer::ShmDir`]).
    pub fn host(shm_dir: &Path) -> Self {
        Self::Host {
            shm_dir: shm_dir.to_owned(),
        }
    }

    /// The GPU with this ordinal, with a host tier of `host_budget` bytes.
    pub fn cuda(ordinal: usize, host_budget: u64) -> Result<Self, String> {
        #[cfg(feature = "cuda")]
        return Ok(Self::Cuda {
            gpu: Gpu::open(ordinal)?,
            staged: Mutex::new(Store::new("host", host_budget)),
        });
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (ordinal, host_budget);
            Err(WITHOUT_CUDA.into())
        }
    }

    /// The GPU's name and its [`Ceilings`](crate::cuda::Ceilings) for buffers of `len` bytes,
    /// as JSON.
    pub fn gpu_ceilings(ordinal: usize, len: usize) -> Result<serde_json::Value, String> {
        #[cfg(feature = "cuda")]
        {
            let gpu = Gpu::open(ordinal)?;
            let ceilings = gpu.bandwidth(len).map_err(|e| e.to_string())?;
            Ok(serde_json::json!({
                "device": gpu.name(),
                "bytes": len,
                "pinned_host_to_device_gb_per_s": ceilings.host_to_device / 1e9,
                "device_to_device_gb_per_s": ceilings.device_to_device / 1e9,
                "compose_copies_gb_per_s": ceilings.compose.map(|rate| rate / 1e9),
                "allocate_ms": ceilings.allocate * 1e3,
                "free_ms": ceilings.free * 1e3,
                "allocate_composed_ms": ceilings.allocate_composed.map(|s| s * 1e3),
                "free_composed_ms": ceilings.free_composed.map(|s| s * 1e3),
                "allocate_pinned_ms": ceilings.allocate_pinned.map(|s| s * 1e3),
            }))
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (ordinal, len);
            Err(WITHOUT_CUDA.into())
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Host { shm_dir } => format!("host memory in {}", shm_dir.display()),
            #[cfg(feature = "cuda")]
            Self::Cuda { gpu, .. } => {
                format!("cuda:{} ({}, {})", gpu.ordinal(), gpu.name(), gpu.uuid())
            }
        }
    }

    /// The host tier's entries, when there is one.
    pub fn host_tier(&self) -> Option<StoreStatus> {
        match self {
            Self::Host { .. } => None,
            #[cfg(feature = "cuda")]
            Self::Cuda { staged, .. } => Some(lock(staged).status()),
        }
    }

    /// The GPU memory kept for reuse (see [`crate::cuda`]), when there is a GPU.
    pub fn kept_bytes(&self) -> Option<u64> {
        match self {
            Self::Host { .. } => None,
            #[cfg(feature = "cuda")]
            Self::Cuda { gpu, .. } => Some(gpu.kept_bytes()),
        }
    }

    /// Decodes a cartridge into a new buffer as its blobs arrive (blocks until done).
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub fn decode(
        &self,
        manifest: &Manifest,
        digest: Digest,
        cache: &Cache,
        arrivals: Receiver<Digest>,
        progress: Option<Progress>,
    ) -> Result<Buffer, LoaderError> {
        let bytes = manifest.cartridge.payload_bytes() as usize;
        match self {
            Self::Host { shm_dir } => {
                let mut buffer = HostBuffer::create(shm_dir, bytes).map_err(|e| {
                    LoaderError::OutOfMemory(format!(
                        "allocating {bytes} bytes in {}: {e}",
                        shm_dir.display()
                    ))
                })?;
                let frontier = Frontier::new(
                    manifest,
                    Location::Path(buffer.path().to_owned()),
                    progress,
                    &|| true,
                );
                decode_into(
                    manifest,
                    cache,
                    buffer.as_mut_slice(),
                    arrivals,
                    &frontier,
                    &|_| Ok(()),
                )?;
                check_payload(manifest, digest, buffer.as_slice())?;
                Ok(Buffer::Host(buffer))
            }
            #[cfg(feature = "cuda")]
            Self::Cuda { gpu, staged } => {
                // The host tier is a cache: without room in it the decode still goes to the GPU,
                // through page-locked memory freed afterwards.
                let reserved = lock(staged).reserve(bytes as u64);
                let kept = reserved.is_ok();
                // A buffer evicted to make room, of this size, stages the decode: page-locking
                // new memory takes a while (the probe's `allocate_pinned_ms`), reusing it does
                // not. The others are freed here, outside the lock.
                let recycled = reserved.into_iter().flatten().find_map(|evicted| {
                    Arc::try_unwrap(evicted)
                        .ok()
                        .filter(|buffer| buffer.bytes() == bytes)
                });
                let staged_decode = || -> Result<(DeviceBuffer, PinnedBuffer), LoaderError> {
                    let mut staging = match recycled {
                        Some(buffer) => buffer,
                        None => gpu.pinned(bytes)?,
                    };
                    let mut target = gpu.alloc(bytes)?;
                    // Layers are told ready once their copies are done, not when enqueued.
                    let settle = || gpu.wait().is_ok();
                    let frontier = Frontier::new(
                        manifest,
                        Location::Cuda(target.location().clone()),
                        progress,
                        &settle,
                    );
                    gpu.fill(&mut staging, &target, |out, copy| {
                        decode_into(manifest, cache, out, arrivals, &frontier, copy)
                    })??;
                    check_payload(manifest, digest, staging.as_slice())?;
                    target.finish();
                    Ok((target, staging))
                };
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(staged_decode))
                    .unwrap_or_else(|panic| {
                        // A bug, and the load fails; the host tier gets its room back all the same.
                        if kept {
                            lock(staged).unreserve(bytes as u64);
                        }
                        std::panic::resume_unwind(panic)
                    });
                let mut staged = lock(staged);
                match outcome {
                    Ok((target, staging)) => {
                        if kept {
                            let key = EntryKey::Single(digest);
                            staged.insert(key.clone(), staging, manifest.cartridge.clone());
                            staged.release(&key);
                        }
                        Ok(Buffer::Cuda(target))
                    }
                    Err(error) => {
                        if kept {
                            staged.unreserve(bytes as u64);
                        }
                        Err(error)
                    }
                }
            }
        }
    }

    /// A cartridge still in the host tier, copied into a new device buffer (blocks until done);
    /// `None` when it is not there (always, on the host device).
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub fn restage(&self, digest: Digest) -> Option<Result<Buffer, LoaderError>> {
        match self {
            Self::Host { .. } => None,
            #[cfg(feature = "cuda")]
            Self::Cuda { gpu, staged } => {
                let key = EntryKey::Single(digest);
                let (staging, _) = lock(staged).acquire(&key)?;
                let uploaded = gpu.upload(&staging).map(Buffer::Cuda);
                lock(staged).release(&key);
                Some(uploaded)
            }
        }
    }

    /// Concatenates resident cartridges along the token axis into a new buffer: the payload is
    /// rows of (layer, keys or values, head), each holding that head's tokens, so every row of
    /// the result is the parts' rows one after another.
    pub fn compose(
        &self,
        header: &Header,
        parts: &[(Arc<Buffer>, Header)],
    ) -> Result<Buffer, LoaderError> {
        let heads = header.model.kv_heads as usize;
        let rows = 2 * header.model.layers as usize * heads;
        let row_bytes = |part: &Header| part.tensor_bytes() / heads;
        match self {
            Self::Host { shm_dir } => {
                let sources = parts
                    .iter()
                    .map(|(buffer, part)| match &**buffer {
                        Buffer::Host(host) => Ok((host.as_slice(), row_bytes(part))),
                        #[cfg(feature = "cuda")]
                        Buffer::Cuda(_) => Err(LoaderError::Internal(
                            "a part is on a GPU but the device is host memory".into(),
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                let bytes = header.payload_bytes() as usize;
                let mut buffer = HostBuffer::create(shm_dir, bytes).map_err(|e| {
                    LoaderError::OutOfMemory(format!("allocating {bytes} bytes: {e}"))
                })?;
                // Rows are filled on all cores.
                buffer
                    .as_mut_slice()
                    .par_chunks_mut(bytes / rows)
                    .enumerate()
                    .for_each(|(index, row)| {
                        let mut offset = 0;
                        for &(source, part) in &sources {
                            row[offset..offset + part]
                                .copy_from_slice(&source[index * part..(index + 1) * part]);
                            offset += part;
                        }
                    });
                Ok(Buffer::Host(buffer))
            }
            #[cfg(feature = "cuda")]
            Self::Cuda { gpu, .. } => {
                let sources = parts
                    .iter()
                    .map(|(buffer, part)| match &**buffer {
                        Buffer::Cuda(device) => Ok((device, row_bytes(part))),
                        Buffer::Host(_) => Err(LoaderError::Internal(
                            "a part is in host memory but the device is a GPU".into(),
                        )),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                gpu.compose(rows, &sources).map(Buffer::Cuda)
            }
        }
    }
}

/// Checks a decoded payload against its header's digest. Every chunk was checked against the
/// manifest as it decoded, but only the whole can show chunks in the wrong places (a manifest
/// made by hand), which a pull refuses too: the loader serves what a pull would.
fn check_payload(manifest: &Manifest, digest: Digest, payload: &[u8]) -> Result<(), LoaderError> {
    let actual = cartridge_schemas::file::payload_digest([payload]);
    let expected = manifest.cartridge.payload_digest;
    if actual == expected {
        return Ok(());
    }
    Err(LoaderError::Internal(format!(
        "cartridge {digest} is inconsistent: its chunks decode to a payload whose digest is {actual}, not its header's {expected}"
    )))
}

/// Decodes a cartridge's chunks into `out` (payload layout: every layer's keys then values) as
/// its blobs arrive, handing each chunk's byte range to `copy` once it is in place, then to the
/// frontier.
fn decode_into(
    manifest: &Manifest,
    cache: &Cache,
    out: &mut [u8],
    arrivals: Receiver<Digest>,
    frontier: &Frontier<'_>,
    copy: &(dyn Fn(Range<usize>) -> Result<(), LoaderError> + Sync),
) -> Result<(), LoaderError> {
    let layer_bytes = manifest.cartridge.layer_bytes() as usize;
    // One contiguous range per chunk: a chunk's layers are adjacent in the payload.
    let range = |layers: &LayerRange| {
        layers.start as usize * layer_bytes..layers.end as usize * layer_bytes
    };
    let failure = Mutex::new(None);
    let decoded = |index: usize| match copy(range(&manifest.chunks[index].layers)) {
        Ok(()) => frontier.decoded(index),
        Err(error) => {
            lock(&failure).get_or_insert(error);
        }
    };
    decode_arrivals(
        manifest,
        cache,
        out,
        &|chunk| vec![range(&chunk.layers)],
        arrivals,
        &decoded,
    )
    .map_err(|e| match e {
        cartridge_client::ClientError::Codec(codec) => LoaderError::Corrupt(codec.to_string()),
        // Gone from the disk cache since it was counted (another process evicted it): fetching
        // again is the remedy, as for a corrupt one.
        cartridge_client::ClientError::Io { ref source, .. }
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            LoaderError::Corrupt(e.to_string())
        }
        other => LoaderError::Internal(other.to_string()),
    })?;
    match failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        Some(error) => Err(error),
        None => Ok(()),
    }
}

/// Follows which chunks of a decode are in place and tells [`Progress`] each time the run of
/// complete leading layers grows.
struct Frontier<'a> {
    manifest: &'a Manifest,
    location: Location,
    progress: Option<Progress>,
    /// Run before telling: makes what is in place visible where the layers are read; nothing is
    /// told if it fails (the load then fails too).
    settle: &'a (dyn Fn() -> bool + Sync),
    /// Per chunk, whether it is in place; and how many leading chunks are.
    state: Mutex<(Vec<bool>, usize)>,
}

impl<'a> Frontier<'a> {
    fn new(
        manifest: &'a Manifest,
        location: Location,
        progress: Option<Progress>,
        settle: &'a (dyn Fn() -> bool + Sync),
    ) -> Self {
        Self {
            manifest,
            location,
            progress,
            settle,
            state: Mutex::new((vec![false; manifest.chunks.len()], 0)),
        }
    }

    fn decoded(&self, index: usize) {
        let Some(progress) = &self.progress else {
            return;
        };
        // Told under the lock, so the counts arrive in increasing order.
        let mut state = lock(&self.state);
        let (done, leading) = &mut *state;
        done[index] = true;
        let before = *leading;
        while *leading < done.len() && done[*leading] {
            *leading += 1;
        }
        if *leading > before && (self.settle)() {
            progress(&LayersReady {
                location: self.location.clone(),
                ready: self.manifest.chunks[*leading - 1].layers.end,
                layers: self.manifest.cartridge.model.layers,
            });
        }
    }
}

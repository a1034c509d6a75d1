//! Pull: resolve a reference, download the blobs the local cache lacks (several at once, hashed
//! as they arrive, resuming partial downloads, retrying stalls), and rebuild the cartridge file
//! byte for byte into the cache. Each chunk is decoded straight into its place in the new file as
//! soon as its blob is in, so decoding overlaps the downloads still running.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cartridge_codec::{CodecError, decode_chunk_into};
use cartridge_schemas::Digest;
use cartridge_schemas::file::{Cartridge, FileLayout};
use cartridge_schemas::manifest::{BlobInfo, ChunkDescriptor, Manifest};
use cartridge_schemas::reference::{Repository, Selector};
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use tokio::io::AsyncWriteExt;

use crate::push::backoff;
use crate::{Cache, Client, ClientError, Progress, RateLimit};

#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Blobs downloaded at once.
    pub jobs: usize,
    /// A download that receives nothing for this long is dropped and resumed.
    pub stall_timeout: Duration,
    pub rate: Option<Arc<RateLimit>>,
    /// Attempts after the first, with growing pauses, before a download gives up.
    pub retries: usize,
}

impl Default for PullOptions {
    fn default() -> Self {
        Self {
            jobs: 8,
            stall_timeout: Duration::from_secs(30),
            rate: None,
            retries: 6,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PullReport {
    pub reference: String,
    pub digest: Digest,
    pub path: PathBuf,
    pub blobs: usize,
    /// Blobs already in the local cache.
    pub cached_blobs: usize,
    pub downloaded_bytes: u64,
    /// Bytes an earlier, interrupted pull had already fetched.
    pub resumed_bytes: u64,
}

pub async fn pull(
    client: &Client,
    repo: &Repository,
    selector: &Selector,
    cache: &Cache,
    options: &PullOptions,
    progress: &dyn Progress,
) -> Result<PullReport, ClientError> {
    sweep_assemblies(cache);
    let resolved = client.resolve(repo, selector).await?;
    let target = cache.cartridge(&resolved.digest);
    let manifest = Arc::new(resolved.manifest);
    let blobs = manifest.blobs();
    let mut report = PullReport {
        reference: resolved.reference,
        digest: resolved.digest,
        path: target.clone(),
        blobs: blobs.len(),
        cached_blobs: 0,
        downloaded_bytes: 0,
        resumed_bytes: 0,
    };
    // A cached file is reused only if it is this manifest's (its payload digest included):
    // `pull -o` links it to a path of the user's, which anything may rewrite in place.
    if Cartridge::open(&target).is_ok_and(|cached| cached.header() == &manifest.cartridge) {
        report.cached_blobs = blobs.len();
        return Ok(report);
    }

    let mut first = true;
    loop {
        let (ready, arrivals) = std::sync::mpsc::channel();
        let assembler = {
            let (manifest, cache, target) = (manifest.clone(), cache.clone(), target.clone());
            tokio::task::spawn_blocking(move || assemble(&manifest, &cache, &target, arrivals))
        };
        let fetch = fetch_blobs(client, repo, &manifest, cache, options, progress, ready);
        let joined = |assembled: Result<_, tokio::task::JoinError>| {
            assembled.map_err(|e| ClientError::Usage(format!("assembling failed: {e}")))
        };
        let (mut fetch, mut assembler) = (std::pin::pin!(fetch), assembler);
        let (fetched, assembled) = tokio::select! {
            // The fetch first: a download error explains an incomplete assembly better than
            // the assembly error does.
            biased;
            fetched = &mut fetch => (fetched, joined(assembler.await)?),
            // An assembly that fails before the blobs are all here (no room for the file) stops
            // the downloads, unless fetching again is its remedy: what was downloaded stays.
            assembled = &mut assembler => match joined(assembled)? {
                Err(error) if !(first && refetch_mends(&error)) => return Err(error),
                assembled => (fetch.await, assembled),
            },
        };
        let fetched = fetched?;
        if first {
            report.cached_blobs = fetched.cached_blobs;
        }
        report.downloaded_bytes += fetched.downloaded_bytes;
        report.resumed_bytes += fetched.resumed_bytes;
        match assembled {
            // A cached blob can vanish before it is read (a loader evicting from a shared
            // folder) or be torn by a crash (a blob whose own bytes are wrong is removed): one
            // more round fetches it again. Other failures (a full disk, a manifest whose
            // chunks disagree with its layout) would only repeat.
            Err(error) if first && refetch_mends(&error) => {
                tracing::warn!(%error, "a cached blob could not be used; fetching it again");
                first = false;
            }
            assembled => return assembled.map(|()| report),
        }
    }
}

/// Whether an assembly failed on a cached blob that another round of fetching replaces.
fn refetch_mends(error: &ClientError) -> bool {
    match error {
        ClientError::Codec(
            CodecError::StoredDigestMismatch { .. } | CodecError::StoredSizeMismatch { .. },
        ) => true,
        ClientError::Io { source, .. } => source.kind() == std::io::ErrorKind::NotFound,
        _ => false,
    }
}

/// What [`fetch_blobs`] did.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct FetchReport {
    pub cached_blobs: usize,
    pub downloaded_bytes: u64,
    pub resumed_bytes: u64,
}

/// Makes every blob of `manifest` present (and verified) in the cache, downloading the missing
/// ones several at once, and announces each on `ready` as soon as it is there, so decoding can
/// start before the last download ends. Dropping `ready` at the end tells the receiver that
/// nothing more is coming.
pub async fn fetch_blobs(
    client: &Client,
    repo: &Repository,
    manifest: &Manifest,
    cache: &Cache,
    options: &PullOptions,
    progress: &dyn Progress,
    ready: Sender<Digest>,
) -> Result<FetchReport, ClientError> {
    let (cached, needed): (Vec<BlobInfo>, Vec<BlobInfo>) = manifest
        .blobs()
        .into_iter()
        .partition(|b| cache.blob(&b.digest).exists());
    for blob in &cached {
        let _ = ready.send(blob.digest);
    }
    // What each needed blob's partial download holds, counted as on hand from the start.
    let needed: Vec<(BlobInfo, u64)> = needed
        .into_iter()
        .map(|b| (b, partial_len(&cache.partial(&b.digest)).min(b.size)))
        .collect();
    progress.begin(
        needed.iter().map(|(b, _)| b.size).sum(),
        needed.iter().map(|(_, on_hand)| on_hand).sum(),
    );
    let fetched: Vec<(u64, u64)> = futures::stream::iter(needed)
        .map(|(blob, shown)| {
            let ready = ready.clone();
            async move {
                let counts =
                    fetch_blob(client, repo, blob, cache, options, (progress, shown)).await?;
                let _ = ready.send(blob.digest);
                Ok::<_, ClientError>(counts)
            }
        })
        .buffer_unordered(options.jobs.max(1))
        .try_collect()
        .await?;
    progress.end();
    Ok(FetchReport {
        cached_blobs: cached.len(),
        downloaded_bytes: fetched.iter().map(|(downloaded, _)| downloaded).sum(),
        resumed_bytes: fetched.iter().map(|(_, resumed)| resumed).sum(),
    })
}

/// Opens (creating) and exclusively locks a partial download. The lock is tried, not waited on
/// in a blocking call: a pull that fails elsewhere then ends at once, not when another process
/// lets go of its download.
async fn lock_partial(path: &Path) -> Result<std::fs::File, ClientError> {
    let mut told = false;
    loop {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(ClientError::io(path))?;
        match file.try_lock() {
            // While this waited, the holder may have renamed the file into place, or a disk
            // cache evicted it: the lock then guards a file no longer at the path, and a new
            // one there would have two writers. Only the file the path names counts.
            Ok(()) if is_at(&file, path) => return Ok(file),
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                if !told {
                    tracing::warn!(path = %path.display(), "waiting for another download of this blob (it holds the partial file's lock)");
                    told = true;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(std::fs::TryLockError::Error(error)) => return Err(ClientError::io(path)(error)),
        }
    }
}

#[cfg(unix)]
fn is_at(file: &std::fs::File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(held), Ok(named)) => (held.dev(), held.ino()) == (named.dev(), named.ino()),
        _ => false,
    }
}

/// Elsewhere a file open for writing cannot be renamed or removed.
#[cfg(not(unix))]
fn is_at(_: &std::fs::File, _: &Path) -> bool {
    true
}

fn partial_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// blake3 of a file's bytes, off the async threads.
async fn hash_file(path: &Path) -> Result<(blake3::Hasher, u64), ClientError> {
    let owned = path.to_owned();
    tokio::task::spawn_blocking(move || -> std::io::Result<(blake3::Hasher, u64)> {
        let mut hasher = blake3::Hasher::new();
        let length = std::fs::metadata(&owned)?.len();
        if length > 0 {
            hasher.update_mmap(&owned)?;
        }
        Ok((hasher, length))
    })
    .await
    .map_err(|e| ClientError::Usage(e.to_string()))?
    .map_err(ClientError::io(path))
}

/// Moves `progress` from counting `shown` bytes of a blob to counting `now`.
fn show(progress: &dyn Progress, shown: &mut u64, now: u64) {
    if now >= *shown {
        progress.advance(now - *shown);
    } else {
        progress.retreat(*shown - now);
    }
    *shown = now;
}

/// Downloads one blob into the cache, resuming what an earlier attempt or process left, and
/// verifies it; `progress` counts `shown` bytes of it already. Returns the bytes downloaded now
/// and the bytes resumed.
async fn fetch_blob(
    client: &Client,
    repo: &Repository,
    blob: BlobInfo,
    cache: &Cache,
    options: &PullOptions,
    (progress, mut shown): (&dyn Progress, u64),
) -> Result<(u64, u64), ClientError> {
    let partial = cache.partial(&blob.digest);
    // One downloader per blob at a time, across tasks and processes: an exclusive lock on the
    // partial file. Whoever waited finds the blob done (the file it locked was renamed into
    // place) and has nothing to fetch.
    let held = lock_partial(&partial).await?;
    if cache.blob(&blob.digest).exists() {
        // The partial file is the empty one this call made; it goes under the lock.
        let _ = tokio::fs::remove_file(&partial).await;
        show(progress, &mut shown, blob.size);
        return Ok((0, 0));
    }
    let mut resumed = partial_len(&partial);
    if resumed > blob.size {
        resumed = 0;
        // Emptied, not removed: the lock is on this file.
        truncate(&partial).await?;
    }
    let mut hasher = blake3::Hasher::new();
    let mut hashed = 0;
    let retries = || backon::BackoffBuilder::build(backoff().with_max_times(options.retries));
    loop {
        let mut delays = retries();
        // How far the download has ever come: only new ground renews the retries (an answer
        // that empties the partial file would otherwise make the same bytes count again).
        let mut furthest = partial_len(&partial);
        loop {
            // Bytes are hashed as they arrive; only what is already on disk (resumed, or
            // written before an attempt failed) is read back.
            if partial_len(&partial) != hashed {
                (hasher, hashed) = hash_file(&partial).await?;
            }
            // The bar counts what is on disk: bytes dropped (a partial file emptied, a write
            // lost) are to come again, and another process's are on hand.
            show(progress, &mut shown, hashed);
            let outcome = download_into(
                client,
                repo,
                &blob,
                (&partial, &held),
                (&mut hasher, &mut hashed),
                options,
                progress,
            )
            .await;
            // It moved the bar with the bytes it hashed.
            shown = hashed;
            match outcome {
                Ok(()) => break,
                Err(error) if error.is_transient() => {
                    // An attempt that emptied the partial file (a range that did not continue
                    // it) leaves nothing resumed: what follows is downloaded.
                    resumed = resumed.min(hashed);
                    // An attempt that moved the download on earns a fresh set of retries: a
                    // link that drops every few hundred kilobytes still gets there.
                    if hashed >= furthest + PROGRESS_FOR_RETRIES {
                        delays = retries();
                    }
                    furthest = furthest.max(hashed);
                    let Some(pause) = delays.next() else {
                        return Err(error);
                    };
                    let pause = error.pause(pause);
                    tracing::warn!(%error, ?pause, digest = %blob.digest, "download interrupted; resuming");
                    tokio::time::sleep(pause).await;
                }
                Err(error) => return Err(error),
            }
        }
        let actual = Digest::from(hasher.finalize());
        if actual == blob.digest {
            break;
        }
        if resumed > 0 {
            // What an earlier pull left was wrong (torn, or written by something else): the
            // registry's blob is not to blame. Once more, from byte 0.
            tracing::warn!(digest = %blob.digest, resumed, "a partial download proved wrong; downloading the blob again");
            truncate(&partial).await?;
            (hasher, hashed, resumed) = (blake3::Hasher::new(), 0, 0);
            continue;
        }
        // Never keep or resume from bytes that proved wrong.
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(CodecError::StoredDigestMismatch {
            expected: blob.digest,
            actual,
            size: blob.size,
        }
        .into());
    }
    let done = cache.blob(&blob.digest);
    tokio::fs::rename(&partial, &done)
        .await
        .map_err(ClientError::io(&done))?;
    Ok((blob.size - resumed, resumed))
}

/// Bytes an attempt must add to a download to reset its retries.
const PROGRESS_FOR_RETRIES: u64 = 64 << 10;

/// The first byte of a `Content-Range: bytes START-END/TOTAL`.
fn range_start(header: &str) -> Option<u64> {
    header
        .strip_prefix("bytes ")?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// Empties a partial download in place (whoever downloads it holds a lock on this very file).
async fn truncate(partial: &Path) -> Result<(), ClientError> {
    let file = tokio::fs::OpenOptions::new()
        .write(true)
        .open(partial)
        .await
        .map_err(ClientError::io(partial))?;
    file.set_len(0).await.map_err(ClientError::io(partial))
}

/// Appends the rest of a blob to its partial file, from where the file ends, hashing as it goes
/// (and moving `progress` with what it hashes, forward and back). Writes go through `held`, the
/// partial file as locked (opened for appending): the lock lasts until the last write is done,
/// even one still running when a download is dropped mid-way.
async fn download_into(
    client: &Client,
    repo: &Repository,
    blob: &BlobInfo,
    (partial, held): (&Path, &std::fs::File),
    (hasher, hashed): (&mut blake3::Hasher, &mut u64),
    options: &PullOptions,
    progress: &dyn Progress,
) -> Result<(), ClientError> {
    if *hashed == blob.size {
        return Ok(());
    }
    let resumed_from = *hashed;
    let response = client
        .blob(repo, &blob.digest, resumed_from, options.stall_timeout)
        .await?;
    let file = tokio::fs::File::from_std(held.try_clone().map_err(ClientError::io(partial))?);
    // Where the body starts in the blob: a whole blob (200) from 0, a range from where its
    // Content-Range says (a proxy may answer a range other than the one asked for).
    let starts_at = if response.status() == reqwest::StatusCode::PARTIAL_CONTENT {
        response
            .headers()
            .get(reqwest::header::CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(range_start)
    } else {
        Some(0)
    };
    // Bytes of the body the partial file already holds.
    let mut skip = match starts_at {
        // Content-addressed: what an earlier start (the whole blob included) sends again of
        // the bytes already here is the same, and skipped.
        Some(start) if start <= *hashed => *hashed - start,
        got => {
            // A gap, or no telling: the retry fetches the whole blob.
            file.set_len(0).await.map_err(ClientError::io(partial))?;
            progress.retreat(*hashed);
            (*hasher, *hashed) = (blake3::Hasher::new(), 0);
            return Err(ClientError::WrongRange {
                digest: blob.digest,
                asked: resumed_from,
                got,
            });
        }
    };
    // Network reads arrive in small pieces; batching them saves a blocking file write per piece.
    let mut file = tokio::io::BufWriter::with_capacity(1 << 20, file);
    let mut stream = response.bytes_stream();
    let received = async {
        while let Some(piece) = tokio::time::timeout(options.stall_timeout, stream.next())
            .await
            .map_err(|_| ClientError::Stalled {
                digest: blob.digest,
                seconds: options.stall_timeout.as_secs(),
            })?
        {
            let mut piece = piece.map_err(|source| ClientError::Download {
                digest: blob.digest,
                source: crate::error::redacted(source),
            })?;
            // Received is received: bytes skipped (a server that ignored the range) count
            // against the cap too.
            if let Some(rate) = &options.rate {
                rate.consume(piece.len() as u64).await;
            }
            if skip > 0 {
                let skipped = skip.min(piece.len() as u64);
                piece = piece.slice(skipped as usize..);
                skip -= skipped;
            }
            if *hashed + piece.len() as u64 > blob.size {
                return Err(ClientError::Manifest(format!(
                    "blob {} is longer than the {} bytes the manifest says",
                    blob.digest, blob.size
                )));
            }
            file.write_all(&piece)
                .await
                .map_err(ClientError::io(partial))?;
            hasher.update(&piece);
            *hashed += piece.len() as u64;
            progress.advance(piece.len() as u64);
        }
        Ok(())
    }
    .await;
    // However the transfer ended, what was received is on disk before the file's length is
    // read again: a tokio write still in flight could otherwise land after the next attempt
    // resumes from the shorter length, doubling bytes.
    let flushed = file.flush().await.map_err(ClientError::io(partial));
    if let Err(error @ ClientError::Manifest(_)) = received {
        // The bytes proved wrong: never resumed from (the cause is what to report).
        let _ = truncate(partial).await;
        progress.retreat(*hashed);
        (*hasher, *hashed) = (blake3::Hasher::new(), 0);
        return Err(error);
    }
    received?;
    flushed?;
    if *hashed < blob.size {
        // The body ended early (a dropped connection, a proxy cutting it); the next attempt
        // resumes from here.
        return Err(ClientError::EndedEarly {
            digest: blob.digest,
            received: *hashed,
            size: blob.size,
        });
    }
    Ok(())
}

/// What a cartridge file being assembled is named after, in `cartridges/`.
const ASSEMBLING: &str = "partial-";

/// Removes the files killed pulls left in `cartridges/` (full-size, so they add up): those no
/// pull holds locked, untouched for some seconds (one just made is locked a moment later).
fn sweep_assemblies(cache: &Cache) {
    let Ok(entries) = std::fs::read_dir(cache.cartridges()) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let assembling = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.starts_with(ASSEMBLING));
        let idle = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > Duration::from_secs(10)));
        if !(assembling && idle) {
            continue;
        }
        if let Ok(file) = std::fs::OpenOptions::new().write(true).open(&path)
            && file.try_lock().is_ok()
            && is_at(&file, &path)
        {
            tracing::info!(path = %path.display(), "removing what an interrupted pull left");
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Builds the cartridge file as its blobs arrive on `arrivals`: the safetensors header first, then
/// each chunk decoded (on all cores) straight into its tensors' places in a memory map of the new
/// file. When every blob is in, the file is validated like any cartridge and renamed into place;
/// on any failure the half-built file is removed. A cached blob whose own bytes are wrong is
/// dropped so it is fetched again.
fn assemble(
    manifest: &Manifest,
    cache: &Cache,
    target: &Path,
    arrivals: Receiver<Digest>,
) -> Result<(), ClientError> {
    let layout = FileLayout::parse(&manifest.file_header)?;
    // A name of this build's own, made new: processes sharing a cache may have one pid (each
    // container's first process is 1).
    let temporary = target.with_extension(format!(
        "{ASSEMBLING}{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&temporary)
        .map_err(ClientError::io(&temporary))?;
    // Held until the file is in place or gone: one a killed pull left is found unlocked and
    // removed (see `sweep_assemblies`).
    let result = file
        .lock()
        .map_err(ClientError::io(&temporary))
        .and_then(|()| build(manifest, &layout, cache, &file, &temporary, arrivals))
        .and_then(|()| {
            // No fsync: a file torn by a crash fails the validation every use of the cache
            // does (the payload digest) and is rebuilt, so durability would only cost time.
            Cartridge::open(&temporary)?;
            std::fs::rename(&temporary, target).map_err(ClientError::io(target))
        });
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    drop(file);
    result
}

fn build(
    manifest: &Manifest,
    layout: &FileLayout,
    cache: &Cache,
    file: &std::fs::File,
    path: &Path,
    arrivals: Receiver<Digest>,
) -> Result<(), ClientError> {
    let io = |source| ClientError::Io {
        path: path.to_owned(),
        source,
    };
    crate::allocate(file, layout.file_len as u64).map_err(io)?;
    // SAFETY: the file was just created under a name private to this build and is only
    // renamed into the cache after the map is dropped; nothing else maps or writes it.
    #[allow(unsafe_code)]
    let mut map = unsafe { memmap2::MmapMut::map_mut(file) }.map_err(io)?;
    map[..8].copy_from_slice(&(layout.header_text_len as u64).to_le_bytes());
    map[8..8 + layout.header_text_len].copy_from_slice(manifest.file_header.as_bytes());
    // Each chunk's raw bytes are its layers' keys and values, wherever the header put them.
    let ranges = |chunk: &ChunkDescriptor| {
        (chunk.layers.start as usize..chunk.layers.end as usize)
            .flat_map(|layer| layout.layers[layer].clone())
            .collect()
    };
    decode_arrivals(manifest, cache, &mut map, &ranges, arrivals, &|_| {})?;
    map.flush_async().map_err(io)?;
    Ok(())
}

/// Decodes each chunk into its places in `buffer` as its blob arrives on `arrivals`, on all
/// cores. `ranges` gives, for a chunk, the byte ranges of `buffer` its raw bytes fill, in order;
/// the ranges of all chunks must not overlap. `decoded` is told the index of each chunk whose
/// bytes are in place, from the decoding thread. Returns once every blob has arrived and decoded,
/// or with the first failure (a blob that fails to decode is dropped from the cache so the next
/// attempt fetches it again), or when `arrivals` closes early.
pub fn decode_arrivals(
    manifest: &Manifest,
    cache: &Cache,
    buffer: &mut [u8],
    ranges: &dyn Fn(&ChunkDescriptor) -> Vec<Range<usize>>,
    arrivals: Receiver<Digest>,
    decoded: &(dyn Fn(usize) + Sync),
) -> Result<(), ClientError> {
    let mut destinations = split_ranges(
        buffer,
        &manifest.chunks.iter().map(ranges).collect::<Vec<_>>(),
    )?;
    let mut chunks_of: HashMap<Digest, Vec<usize>> = HashMap::new();
    for (index, chunk) in manifest.chunks.iter().enumerate() {
        chunks_of
            .entry(chunk.stored.digest)
            .or_default()
            .push(index);
    }
    let failure: Mutex<Option<ClientError>> = Mutex::new(None);
    let failure_slot = &failure;
    // The receiving loop runs inside the scope so decodes start while later blobs download, on
    // this thread: run on a pool thread, a loop waiting out a slow download would hold it, and
    // as many slow downloads as cores would stop every other decode in the process.
    let never_arrived = rayon::in_place_scope(move |scope| {
        while !chunks_of.is_empty() {
            // A chunk that failed to decode fails the whole: waiting on later blobs would only
            // delay saying so (a caller may stop their downloads then).
            if failure_slot.lock().map_or(true, |slot| slot.is_some()) {
                break;
            }
            let digest = match arrivals.recv_timeout(Duration::from_millis(50)) {
                Ok(digest) => digest,
                Err(RecvTimeoutError::Timeout) => continue,
                // A closed channel before every blob arrived means a download failed.
                Err(RecvTimeoutError::Disconnected) => break,
            };
            for index in chunks_of.remove(&digest).unwrap_or_default() {
                let mut outs = std::mem::take(&mut destinations[index]);
                let chunk = &manifest.chunks[index];
                scope.spawn(move |_| match decode_cached(cache, chunk, &mut outs) {
                    Ok(()) => {
                        // Its bytes are final: the callback may read them (a GPU copy does).
                        drop(outs);
                        decoded(index)
                    }
                    Err(error) => {
                        if let Ok(mut slot) = failure_slot.lock() {
                            slot.get_or_insert(error);
                        }
                    }
                });
            }
        }
        chunks_of.len()
    });
    if let Some(error) = failure.into_inner().ok().flatten() {
        return Err(error);
    }
    if never_arrived > 0 {
        return Err(ClientError::Usage(format!(
            "{never_arrived} blobs never arrived"
        )));
    }
    Ok(())
}

fn decode_cached(
    cache: &Cache,
    chunk: &ChunkDescriptor,
    outs: &mut [&mut [u8]],
) -> Result<(), ClientError> {
    let path = cache.blob(&chunk.stored.digest);
    let file = std::fs::File::open(&path).map_err(ClientError::io(&path))?;
    // SAFETY: cached blobs are written once, under a temporary name, and renamed into place;
    // they are never modified, only deleted (which leaves an existing map intact).
    #[allow(unsafe_code)]
    let stored = unsafe { memmap2::Mmap::map(&file) }.map_err(ClientError::io(&path))?;
    decode_chunk_into(&stored, chunk, outs).inspect_err(|error| {
        // Only a blob whose own bytes are wrong goes: a manifest that describes a good blob
        // wrongly must not evict it for everyone else.
        let own_bytes_wrong = match error {
            CodecError::StoredDigestMismatch { .. } => true,
            // The manifest may have the size wrong: the bytes' own digest settles it.
            CodecError::StoredSizeMismatch { .. } => Digest::of(&stored) != chunk.stored.digest,
            _ => false,
        };
        if own_bytes_wrong {
            let _ = std::fs::remove_file(&path);
        }
    })?;
    Ok(())
}

/// Splits `buffer` into disjoint mutable pieces: for each group, one piece per range.
fn split_ranges<'a>(
    buffer: &'a mut [u8],
    groups: &[Vec<Range<usize>>],
) -> Result<Vec<Vec<&'a mut [u8]>>, ClientError> {
    let mut order: Vec<(usize, usize, Range<usize>)> = groups
        .iter()
        .enumerate()
        .flat_map(|(g, ranges)| {
            ranges
                .iter()
                .enumerate()
                .map(move |(i, r)| (g, i, r.clone()))
        })
        .collect();
    order.sort_by_key(|(_, _, range)| range.start);
    let mut pieces: Vec<Vec<Option<&'a mut [u8]>>> = groups
        .iter()
        .map(|ranges| ranges.iter().map(|_| None).collect())
        .collect();
    let mut rest = buffer;
    let mut consumed = 0;
    for (group, index, range) in order {
        if range.start < consumed || range.end < range.start || range.end - consumed > rest.len() {
            return Err(ClientError::Manifest(format!(
                "chunk destinations overlap or overrun the buffer at {range:?}"
            )));
        }
        let (_, tail) = rest.split_at_mut(range.start - consumed);
        let (piece, tail) = tail.split_at_mut(range.len());
        pieces[group][index] = Some(piece);
        rest = tail;
        consumed = range.end;
    }
    Ok(pieces
        .into_iter()
        .map(|group| group.into_iter().flatten().collect())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small real cartridge, encoded a chunk per layer: its bytes, manifest and blobs.
    fn encoded() -> (Vec<u8>, Manifest, Vec<cartridge_codec::EncodedChunk>) {
        use cartridge_schemas::file::{self, Cartridge, LayerData, NewCartridge};
        use cartridge_schemas::fingerprint::{ModelFingerprint, Rope, RopeLayout};
        let model = ModelFingerprint {
            architecture: "llama".into(),
            layers: 4,
            kv_heads: 2,
            head_dim: 8,
            rope: Rope {
                theta: 10000.0,
                layout: RopeLayout::Half,
                scaling: None,
            },
            weights: Digest::of(b"test model"),
        };
        let tensors: Vec<Vec<u8>> = (0..8u8)
            .map(|t| (0..512).map(|i| (i as u8).wrapping_mul(31) ^ t).collect())
            .collect();
        let layers: Vec<LayerData<'_>> = tensors
            .chunks(2)
            .map(|p| LayerData {
                keys: &p[0],
                values: &p[1],
            })
            .collect();
        let new = NewCartridge {
            model,
            dtype: cartridge_schemas::Dtype::Bf16,
            tokens: 16,
            frozen_tokens: 1,
            provenance: serde_json::Value::Null,
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        file::write(&path, new, &layers).unwrap();
        let cartridge = Cartridge::from_bytes(std::fs::read(path).unwrap()).unwrap();
        let options = cartridge_codec::EncodeOptions {
            target_chunk_bytes: 1,
            ..Default::default()
        };
        let chunks = cartridge_codec::encode_cartridge(&cartridge, &options).unwrap();
        let manifest = Manifest {
            schema_version: cartridge_schemas::manifest::MANIFEST_SCHEMA_VERSION,
            cartridge: cartridge.header().clone(),
            file_header: cartridge.file_header().to_owned(),
            chunks: chunks.iter().map(|c| c.descriptor.clone()).collect(),
            created: "2026-11-23T00:00:00Z".into(),
            annotations: Default::default(),
        };
        (tensors.concat(), manifest, chunks)
    }

    /// Decodes waiting on slow downloads hold no pool thread: with as many of them as the pool
    /// has threads, a decode whose blobs have all arrived still runs.
    #[test]
    fn decodes_waiting_for_blobs_leave_the_pool_free() {
        let (raw, manifest, chunks) = encoded();
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path()).unwrap();
        for chunk in &chunks {
            let path = cache.blob(&chunk.descriptor.stored.digest);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, &chunk.bytes).unwrap();
        }
        // Each chunk's raw bytes, one after another.
        let mut offsets = HashMap::new();
        let mut at = 0;
        for chunk in &manifest.chunks {
            offsets.insert(chunk.stored.digest, at);
            at += chunk.raw.size as usize;
        }
        let ranges = |chunk: &ChunkDescriptor| {
            let start = offsets[&chunk.stored.digest];
            std::iter::once(start..start + chunk.raw.size as usize).collect()
        };
        let decode = |arrivals: Receiver<Digest>| {
            let mut buffer = vec![0u8; at];
            decode_arrivals(&manifest, &cache, &mut buffer, &ranges, arrivals, &|_| {})
                .map(|()| buffer)
        };
        std::thread::scope(|threads| {
            let waiting: Vec<_> = (0..rayon::current_num_threads())
                .map(|_| {
                    let (sender, arrivals) = std::sync::mpsc::channel();
                    threads.spawn(move || decode(arrivals));
                    sender
                })
                .collect();
            std::thread::sleep(Duration::from_millis(200));
            let (sender, arrivals) = std::sync::mpsc::channel();
            for chunk in &chunks {
                sender.send(chunk.descriptor.stored.digest).unwrap();
            }
            let (done, outcome) = std::sync::mpsc::channel();
            threads.spawn(move || done.send(decode(arrivals)));
            let outcome = outcome.recv_timeout(Duration::from_secs(60));
            // The waiting decodes end (their blobs never come) whatever happened.
            drop(waiting);
            assert_eq!(
                outcome
                    .expect("the decode waited on other decodes' downloads")
                    .unwrap(),
                raw
            );
        });
    }

    /// A registry that answers with `status`, `headers` and `body`.
    fn answering(status: &str, headers: &str, body: &'static [u8]) -> String {
        use std::io::Write;
        let (status, headers) = (status.to_owned(), headers.to_owned());
        crate::testing::serve(move |_, stream| {
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .and_then(|()| stream.write_all(body));
        })
        .url
    }

    /// Resumes a download of `BLOB` whose first 4 bytes are on disk, from a registry answering
    /// as given; the partial file's bytes after.
    async fn resume(
        status: &str,
        headers: &str,
        body: &'static [u8],
    ) -> (Result<(), ClientError>, Vec<u8>) {
        const BLOB: &[u8] = b"0123456789";
        let dir = tempfile::tempdir().unwrap();
        let partial = dir.path().join("partial");
        std::fs::write(&partial, &BLOB[..4]).unwrap();
        let client = Client::new(&answering(status, headers, body), None).unwrap();
        let blob = BlobInfo {
            digest: Digest::of(BLOB),
            size: BLOB.len() as u64,
        };
        let (mut hasher, mut hashed) = hash_file(&partial).await.unwrap();
        let held = std::fs::OpenOptions::new()
            .append(true)
            .open(&partial)
            .unwrap();
        let outcome = download_into(
            &client,
            &"team/blobs".parse().unwrap(),
            &blob,
            (&partial, &held),
            (&mut hasher, &mut hashed),
            &PullOptions::default(),
            &crate::NoProgress,
        )
        .await;
        if outcome.is_ok() {
            assert_eq!(Digest::from(hasher.finalize()), blob.digest);
        }
        (outcome, std::fs::read(&partial).unwrap())
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_resume_takes_what_continues_the_blob_and_drops_the_rest() {
        // The range asked for, an earlier one, the whole blob: each ends in the blob.
        for (status, headers, body) in [
            (
                "206 Partial",
                "Content-Range: bytes 4-9/10\r\n",
                &b"456789"[..],
            ),
            (
                "206 Partial",
                "Content-Range: bytes 2-9/10\r\n",
                b"23456789",
            ),
            ("200 OK", "", b"0123456789"),
        ] {
            let (outcome, bytes) = resume(status, headers, body).await;
            assert!(outcome.is_ok(), "{headers}: {outcome:?}");
            assert_eq!(bytes, b"0123456789", "{headers}");
        }
        // A gap, or no Content-Range: the partial is emptied and the error is retried whole.
        for headers in ["Content-Range: bytes 6-9/10\r\n", ""] {
            let (outcome, bytes) = resume("206 Partial", headers, b"6789").await;
            let error = outcome.unwrap_err();
            assert!(
                matches!(error, ClientError::WrongRange { asked: 4, .. }),
                "{error}"
            );
            assert!(error.is_transient() && bytes.is_empty(), "{error}");
        }
    }

    /// Storage for one blob that answers ranges, sending at most `per_answer` bytes of each
    /// answer before the connection drops.
    fn flaky_storage(blob: &'static [u8], per_answer: usize) -> crate::testing::Server {
        use std::io::Write;
        crate::testing::serve(move |head, stream| {
            let from: usize = crate::testing::header(head, "range")
                .and_then(|r| r.strip_prefix("bytes=")?.strip_suffix('-')?.parse().ok())
                .unwrap_or(0);
            let rest = &blob[from..];
            let _ = write!(
                stream,
                "HTTP/1.1 206 Partial\r\nContent-Range: bytes {from}-{}/{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                blob.len() - 1,
                blob.len(),
                rest.len()
            )
            .and_then(|()| stream.write_all(&rest[..rest.len().min(per_answer)]));
        })
    }

    async fn fetch(
        url: &str,
        cache: &Cache,
        blob: &[u8],
        retries: usize,
    ) -> Result<(u64, u64), ClientError> {
        let client = Client::new(url, None).unwrap();
        let options = PullOptions {
            retries,
            ..PullOptions::default()
        };
        let info = BlobInfo {
            digest: Digest::of(blob),
            size: blob.len() as u64,
        };
        let repo = "team/blobs".parse().unwrap();
        // The bar begins at what the partial download holds, as a pull's does; it never
        // passes the blob's size, and a fetched blob leaves it there.
        let tally = crate::testing::Tally::default();
        let on_hand = partial_len(&cache.partial(&info.digest)).min(info.size);
        tally.begin(info.size, on_hand);
        let fetched = fetch_blob(&client, &repo, info, cache, &options, (&tally, on_hand)).await;
        assert!(tally.furthest() <= info.size as i64, "{}", tally.furthest());
        if fetched.is_ok() {
            assert_eq!(tally.position(), info.size as i64);
        }
        fetched
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn retries_are_renewed_while_a_download_moves_on() {
        // Twenty drops, two retries: each drop came after progress.
        static BLOB: std::sync::LazyLock<Vec<u8>> =
            std::sync::LazyLock::new(|| (0..2_000_000u32).map(|i| (i % 251) as u8).collect());
        let storage = flaky_storage(&BLOB, 100_000);
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path()).unwrap();
        let (downloaded, resumed) = fetch(&storage.url, &cache, &BLOB, 2).await.unwrap();
        assert_eq!((downloaded, resumed), (BLOB.len() as u64, 0));
        assert_eq!(
            std::fs::read(cache.blob(&Digest::of(&BLOB))).unwrap(),
            *BLOB
        );
        assert_eq!(storage.requests.lock().unwrap().len(), 20);
        // Without progress the retries run out (and the error names the blob).
        let stuck = flaky_storage(&BLOB, 0);
        let other = tempfile::tempdir().unwrap();
        let error = fetch(&stuck.url, &Cache::new(other.path()).unwrap(), &BLOB, 2)
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains(&Digest::of(&BLOB).to_string()), "{error}");
        assert_eq!(stuck.requests.lock().unwrap().len(), 3);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn ground_won_again_renews_no_retries() {
        use std::io::Write;
        static BLOB: std::sync::LazyLock<Vec<u8>> =
            std::sync::LazyLock::new(|| (0..1_000_000u32).map(|i| (i % 251) as u8).collect());
        // Ranges are answered from a byte too late (the partial file is emptied), whole
        // answers break off after 100 kB: the same bytes, won again and again.
        let storage = crate::testing::serve(|head, stream| {
            let _ = match crate::testing::header(head, "range") {
                Some(range) => {
                    let from: usize = range[6..range.len() - 1].parse().unwrap();
                    write!(
                        stream,
                        "HTTP/1.1 206 Partial\r\nContent-Range: bytes {}-{}/{}\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx",
                        from + 1,
                        from + 1,
                        BLOB.len()
                    )
                }
                None => write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    BLOB.len()
                )
                .and_then(|()| stream.write_all(&BLOB[..100_000])),
            };
        });
        let dir = tempfile::tempdir().unwrap();
        let error = fetch(&storage.url, &Cache::new(dir.path()).unwrap(), &BLOB, 2)
            .await
            .unwrap_err();
        assert!(error.is_transient(), "{error}");
        // The first 100 kB renewed the retries (two); nothing after did.
        assert_eq!(storage.requests.lock().unwrap().len(), 3);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_resumed_download_that_proves_wrong_starts_over() {
        const BLOB: &[u8] = b"0123456789";
        let storage = flaky_storage(BLOB, usize::MAX);
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path()).unwrap();
        // What an earlier pull left is not the blob's start.
        std::fs::write(cache.partial(&Digest::of(BLOB)), b"XXXX").unwrap();
        let (downloaded, resumed) = fetch(&storage.url, &cache, BLOB, 0).await.unwrap();
        assert_eq!((downloaded, resumed), (10, 0));
        assert_eq!(std::fs::read(cache.blob(&Digest::of(BLOB))).unwrap(), BLOB);
        let asked: Vec<_> = storage
            .requests
            .lock()
            .unwrap()
            .iter()
            .map(|head| crate::testing::header(head, "range").map(str::to_owned))
            .collect();
        assert_eq!(asked, [Some("bytes=4-".to_owned()), None]);
    }

    #[test]
    fn what_a_killed_pull_left_is_swept() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path()).unwrap();
        let name = |n| cache.cartridges().join(format!("{n}.{ASSEMBLING}1-0"));
        let old = std::time::SystemTime::now() - Duration::from_secs(120);
        let make = |path: &Path, modified| {
            let file = std::fs::File::create(path).unwrap();
            file.set_len(1000).unwrap();
            file.set_modified(modified).unwrap();
            file
        };
        let left = make(&name("left"), old);
        drop(left);
        // One a running pull holds, and one made a moment ago (locked next).
        let held = make(&name("held"), old);
        held.lock().unwrap();
        drop(make(&name("new"), std::time::SystemTime::now()));
        let done = cache.cartridge(&Digest::of(b"done"));
        drop(make(&done, old));
        sweep_assemblies(&cache);
        assert!(!name("left").exists());
        assert!(name("held").exists() && name("new").exists() && done.exists());
        drop(held);
    }

    #[test]
    fn a_range_answer_says_where_it_starts() {
        assert_eq!(range_start("bytes 100-199/200"), Some(100));
        assert_eq!(range_start("bytes 0-0/1"), Some(0));
        assert_eq!(range_start("bytes */200"), None);
        assert_eq!(range_start("items 1-2/3"), None);
    }

    // Reads the open files from /proc.
    #[cfg(target_os = "linux")]
    #[tokio::test(flavor = "multi_thread")]
    async fn a_waiting_downloader_locks_the_file_at_the_path_not_one_renamed_away() {
        let dir = tempfile::tempdir().unwrap();
        let (partial, done) = (dir.path().join("partial"), dir.path().join("blob"));
        let held = lock_partial(&partial).await.unwrap();
        let waiter = tokio::spawn({
            let partial = partial.clone();
            async move { lock_partial(&partial).await }
        });
        // Until the waiter holds the file open too (it then polls for the lock): renamed before
        // that, it would simply open a new file at the path.
        let identity = |meta: std::fs::Metadata| {
            use std::os::unix::fs::MetadataExt;
            (meta.dev(), meta.ino())
        };
        let file = identity(partial.metadata().unwrap());
        let opened = || {
            std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .filter_map(|fd| std::fs::metadata(fd.ok()?.path()).ok())
                .filter(|meta| identity(meta.clone()) == file)
                .count()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while opened() < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "the waiter never opened the file"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        std::fs::rename(&partial, &done).unwrap();
        drop(held);
        let locked = waiter.await.unwrap().unwrap();
        assert!(is_at(&locked, &partial));
        assert!(!is_at(&locked, &done));
    }
}

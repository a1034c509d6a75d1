//! Pull: resolve a reference, download the blobs the local cache lacks (several at once, resuming
//! partial downloads, retrying stalls), verify every one, and rebuild the cartridge file byte for
//! byte into the cache, atomically.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cartridge_codec::{CodecError, decode_chunk};
use cartridge_schemas::Digest;
use cartridge_schemas::file::{Cartridge, FileLayout};
use cartridge_schemas::manifest::{BlobInfo, Manifest};
use cartridge_schemas::reference::{Repository, Selector};
use futures::{StreamExt, TryStreamExt};
use rayon::prelude::*;
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
}

impl Default for PullOptions {
    fn default() -> Self {
        Self {
            jobs: 8,
            stall_timeout: Duration::from_secs(30),
            rate: None,
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
    let resolved = client.resolve(repo, selector).await?;
    let manifest = Arc::new(resolved.manifest);
    let target = cache.cartridge(&resolved.digest);
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
    if target.exists() && Cartridge::open(&target).is_ok() {
        report.cached_blobs = blobs.len();
        return Ok(report);
    }

    let needed: Vec<BlobInfo> = blobs
        .into_iter()
        .filter(|b| !cache.blob(&b.digest).exists())
        .collect();
    report.cached_blobs = report.blobs - needed.len();
    let resumable: u64 = needed
        .iter()
        .map(|b| partial_len(&cache.partial(&b.digest)).min(b.size))
        .sum();
    progress.begin(needed.iter().map(|b| b.size).sum(), resumable);
    let fetched: Vec<(u64, u64)> = futures::stream::iter(needed)
        .map(|blob| fetch_blob(client, repo, blob, cache, options, progress))
        .buffer_unordered(options.jobs.max(1))
        .try_collect()
        .await?;
    progress.end();
    report.downloaded_bytes = fetched.iter().map(|(downloaded, _)| downloaded).sum();
    report.resumed_bytes = fetched.iter().map(|(_, resumed)| resumed).sum();

    let (cache, destination) = (cache.clone(), target.clone());
    tokio::task::spawn_blocking(move || assemble(&manifest, &cache, &destination))
        .await
        .map_err(|e| ClientError::Usage(format!("assembling failed: {e}")))??;
    Ok(report)
}

fn partial_len(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// Downloads one blob into the cache, resuming what an earlier attempt left. Returns the bytes
/// downloaded now and the bytes resumed.
async fn fetch_blob(
    client: &Client,
    repo: &Repository,
    blob: BlobInfo,
    cache: &Cache,
    options: &PullOptions,
    progress: &dyn Progress,
) -> Result<(u64, u64), ClientError> {
    let partial = cache.partial(&blob.digest);
    let mut resumed = partial_len(&partial);
    if resumed > blob.size {
        resumed = 0;
        tokio::fs::remove_file(&partial)
            .await
            .map_err(ClientError::io(&partial))?;
    }
    let mut delays = backon::BackoffBuilder::build(backoff());
    loop {
        match download_into(client, repo, &blob, &partial, options, progress).await {
            Ok(()) => break,
            Err(error) if error.is_transient() => match delays.next() {
                Some(pause) => {
                    tracing::warn!(%error, ?pause, digest = %blob.digest, "download interrupted; resuming");
                    tokio::time::sleep(pause).await;
                }
                None => return Err(error),
            },
            Err(error) => return Err(error),
        }
    }

    let (path, digest) = (partial.clone(), blob.digest);
    let actual = tokio::task::spawn_blocking(move || -> std::io::Result<Digest> {
        let mut hasher = blake3::Hasher::new();
        hasher.update_mmap_rayon(&path)?;
        Ok(hasher.finalize().into())
    })
    .await
    .map_err(|e| ClientError::Usage(e.to_string()))?
    .map_err(ClientError::io(&partial))?;
    if actual != digest {
        // Never keep or resume from bytes that proved wrong.
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(CodecError::StoredDigestMismatch {
            expected: digest,
            actual,
            size: blob.size,
        }
        .into());
    }
    let done = cache.blob(&digest);
    tokio::fs::rename(&partial, &done)
        .await
        .map_err(ClientError::io(&done))?;
    Ok((blob.size - resumed, resumed))
}

/// Appends the rest of a blob to its partial file, from where the file ends.
async fn download_into(
    client: &Client,
    repo: &Repository,
    blob: &BlobInfo,
    partial: &Path,
    options: &PullOptions,
    progress: &dyn Progress,
) -> Result<(), ClientError> {
    let mut offset = partial_len(partial);
    if offset == blob.size {
        return Ok(());
    }
    let response = client.blob(repo, &blob.digest, offset).await?;
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(partial)
        .await
        .map_err(ClientError::io(partial))?;
    if offset > 0 && response.status() != reqwest::StatusCode::PARTIAL_CONTENT {
        // The server sent the whole blob: start over.
        file.set_len(0).await.map_err(ClientError::io(partial))?;
        offset = 0;
    }
    let mut stream = response.bytes_stream();
    let stalled = || ClientError::Stalled {
        digest: blob.digest,
        seconds: options.stall_timeout.as_secs(),
    };
    while let Some(piece) = tokio::time::timeout(options.stall_timeout, stream.next())
        .await
        .map_err(|_| stalled())?
    {
        let piece = piece?;
        if offset + piece.len() as u64 > blob.size {
            let _ = tokio::fs::remove_file(partial).await;
            return Err(ClientError::Manifest(format!(
                "blob {} is longer than the {} bytes the manifest says",
                blob.digest, blob.size
            )));
        }
        file.write_all(&piece)
            .await
            .map_err(ClientError::io(partial))?;
        offset += piece.len() as u64;
        progress.advance(piece.len() as u64);
        if let Some(rate) = &options.rate {
            rate.consume(piece.len() as u64).await;
        }
    }
    file.flush().await.map_err(ClientError::io(partial))?;
    if offset < blob.size {
        // The connection ended early; the next attempt resumes from here.
        return Err(stalled());
    }
    Ok(())
}

/// Rebuilds the cartridge file from its header and decoded chunks, checks it, and renames it into
/// place. A cached blob that fails to decode is dropped so the next pull fetches it again.
fn assemble(manifest: &Manifest, cache: &Cache, target: &Path) -> Result<(), ClientError> {
    let layout = FileLayout::parse(&manifest.file_header)?;
    let temporary = target.with_extension(format!("partial-{:08x}", rand_suffix()));
    let file = std::fs::File::create(&temporary).map_err(ClientError::io(&temporary))?;
    let result = (|| {
        let io = ClientError::io(&temporary);
        file.set_len(layout.file_len as u64)
            .map_err(ClientError::io(&temporary))?;
        file.write_all_at(&(layout.header_text_len as u64).to_le_bytes(), 0)
            .map_err(ClientError::io(&temporary))?;
        file.write_all_at(manifest.file_header.as_bytes(), 8)
            .map_err(io)?;
        let tensor_bytes = manifest.cartridge.tensor_bytes();
        manifest
            .chunks
            .par_iter()
            .try_for_each(|chunk| -> Result<(), ClientError> {
                let source = cache.blob(&chunk.stored.digest);
                let stored = std::fs::read(&source).map_err(ClientError::io(&source))?;
                let raw = decode_chunk(&stored, chunk).inspect_err(|_| {
                    let _ = std::fs::remove_file(&source);
                })?;
                for (index, layer) in
                    (chunk.layers.start as usize..chunk.layers.end as usize).enumerate()
                {
                    let [keys, values] = &layout.layers[layer];
                    let start = index * 2 * tensor_bytes;
                    file.write_all_at(&raw[start..start + tensor_bytes], keys.start as u64)
                        .map_err(ClientError::io(&temporary))?;
                    file.write_all_at(
                        &raw[start + tensor_bytes..start + 2 * tensor_bytes],
                        values.start as u64,
                    )
                    .map_err(ClientError::io(&temporary))?;
                }
                Ok(())
            })?;
        file.sync_all().map_err(ClientError::io(&temporary))?;
        // The rebuilt file must pass the same validation as any other cartridge.
        Cartridge::open(&temporary)?;
        std::fs::rename(&temporary, target).map_err(ClientError::io(target))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    result
}

fn rand_suffix() -> u32 {
    std::process::id()
        ^ (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos()))
}

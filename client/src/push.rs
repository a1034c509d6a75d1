//! Push: chunk and compress a cartridge, upload only the blobs the registry lacks (several at
//! once, retried), publish the version, then move tags.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use cartridge_codec::{EncodeOptions, EncodedChunk, encode_cartridge};
use cartridge_schemas::Digest;
use cartridge_schemas::api::{ErrorCode, Published, TagEntry, TagUpdate};
use cartridge_schemas::file::Cartridge;
use cartridge_schemas::manifest::{MANIFEST_SCHEMA_VERSION, Manifest};
use cartridge_schemas::reference::{Repository, Selector, Tag, Version};
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;

use crate::{Client, ClientError, Progress, RateLimit};

#[derive(Debug, Clone)]
pub struct PushOptions {
    pub encode: EncodeOptions,
    /// Blobs uploaded at once.
    pub jobs: usize,
    /// Tags to point at the new version once it is published.
    pub tags: Vec<Tag>,
    pub rate: Option<Arc<RateLimit>>,
}

impl Default for PushOptions {
    fn default() -> Self {
        Self {
            encode: EncodeOptions::default(),
            jobs: 8,
            tags: vec![Tag::latest()],
            rate: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PushReport {
    pub reference: String,
    pub digest: Digest,
    pub chunks: usize,
    pub uploaded_blobs: usize,
    pub uploaded_bytes: u64,
    /// Blobs the registry already held (shared with other versions).
    pub reused_blobs: usize,
    pub payload_bytes: u64,
    pub stored_bytes: u64,
    pub tags: Vec<String>,
    /// The version already held this cartridge (an earlier push of it): nothing was
    /// published, and the tags were moved to it, but for `latest` on another version.
    pub already_published: bool,
    /// Tags not moved: `latest`, on another version, when this one was published before.
    pub tags_left: Vec<String>,
}

/// How long a publish or tag move the registry defers is tried again: a garbage collection
/// holds them back while it runs, for up to its lease (10 minutes) if its collector died.
const PATIENCE: Duration = Duration::from_secs(15 * 60);

/// Moves a tag, trying again while the registry defers the move (a garbage collection holds
/// it back) or its answer is lost, for [`PATIENCE`]. A try whose answer was lost may have gone
/// through: when a later one finds its condition failed, the tag already pointing at this
/// manifest counts as moved.
pub async fn move_tag_patiently(
    client: &Client,
    repo: &Repository,
    tag: &Tag,
    update: &TagUpdate,
) -> Result<TagEntry, ClientError> {
    let (mut deferral, mut deferred) = (Deferral::default(), false);
    loop {
        match client.move_tag(repo, tag, update).await {
            Err(error) if deferral.wait(&error).await => {
                tracing::warn!(%error, "tag move deferred; retrying");
                deferred = true;
            }
            Err(error) if deferred && error.code() == Some(ErrorCode::TagMoved) => {
                // A cartridge with nothing left to list has no tags: the move failed.
                let tags = match client.tags(repo).await {
                    Err(listing) if listing.code() == Some(ErrorCode::NotFound) => Vec::new(),
                    listing => listing?,
                };
                return tags
                    .into_iter()
                    .find(|entry| &entry.tag == tag && entry.manifest == update.manifest)
                    .ok_or(error);
            }
            outcome => return outcome,
        }
    }
}

/// Waits before a deferred call is made again, for [`PATIENCE`] from the first deferral.
#[derive(Default)]
struct Deferral {
    since: Option<Instant>,
}

impl Deferral {
    /// Whether to try again (after a pause) rather than give up with `error`.
    async fn wait(&mut self, error: &ClientError) -> bool {
        let since = *self.since.get_or_insert_with(Instant::now);
        if !error.is_deferred() || since.elapsed() >= PATIENCE {
            return false;
        }
        tokio::time::sleep(error.pause(Duration::from_secs(5))).await;
        true
    }
}

/// Retry policy for one transfer or call: a few tries with growing pauses.
pub(crate) fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(10))
        .with_max_times(6)
}

pub async fn push(
    client: &Client,
    repo: &Repository,
    version: &Version,
    file: &Path,
    options: &PushOptions,
    progress: &dyn Progress,
) -> Result<PushReport, ClientError> {
    let path = file.to_owned();
    let encode = options.encode;
    // Read once, then validated whole (its digest included) before anything is sent: the
    // chunks are encoded from the very bytes checked. (A mapped file rewritten in place during
    // the push would publish chunks that disagree with the header, a version no pull accepts.)
    // Only the manifest and the chunks outlive this: not the file's bytes.
    let (manifest, chunks) = tokio::task::spawn_blocking(move || -> Result<_, ClientError> {
        let bytes = std::fs::read(&path).map_err(ClientError::io(&path))?;
        let cartridge = Cartridge::from_bytes(bytes)?;
        let chunks = encode_cartridge(&cartridge, &encode)?;
        let manifest = Manifest {
            schema_version: MANIFEST_SCHEMA_VERSION,
            cartridge: cartridge.header().clone(),
            file_header: cartridge.file_header().to_owned(),
            chunks: chunks.iter().map(|c| c.descriptor.clone()).collect(),
            created: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            annotations: Default::default(),
        };
        Ok((manifest, chunks))
    })
    .await
    .map_err(|e| ClientError::Usage(format!("encoding failed: {e}")))??;
    manifest
        .validate()
        .map_err(|e| ClientError::Manifest(e.to_string()))?;

    let mut uploaded = (0, 0);
    // A publish can find blobs missing that were present when we asked (garbage collection
    // removed old unreferenced ones in between): upload those and publish again.
    let mut deferral = Deferral::default();
    let mut rounds = 0;
    let mut already_published = false;
    // A try made again after one whose answer never came: that one may have published.
    let mut tried_before = false;
    let published = loop {
        let (blobs, bytes) = upload_missing(client, repo, &chunks, options, progress).await?;
        uploaded = (uploaded.0 + blobs, uploaded.1 + bytes);
        match client.publish(repo, version, &manifest).await {
            Ok(result) => break result,
            Err(error) if error.code() == Some(ErrorCode::MissingBlobs) => {
                rounds += 1;
                if rounds == 24 {
                    return Err(ClientError::Usage(
                        "blobs kept disappearing before the publish (a garbage collection with a short grace?); retry".into(),
                    ));
                }
            }
            // The version may hold this very cartridge already: an earlier try of this push
            // whose answer was lost, or an earlier push stopped before it moved its tags. Then
            // the push goes on to the tags; any other content is a conflict.
            Err(error) if error.code() == Some(ErrorCode::VersionExists) => {
                match client
                    .resolve(repo, &Selector::Version(version.clone()))
                    .await
                {
                    Ok(existing) if same_cartridge(&existing.manifest, &manifest) => {
                        // This push's own manifest (its `created` too) after a try whose answer
                        // was lost: that try published it, and its tags move as a new
                        // version's do.
                        already_published = !(tried_before && existing.digest == manifest.digest());
                        break Published {
                            reference: existing.reference,
                            digest: existing.digest,
                        };
                    }
                    // Another cartridge, or a deleted version: the conflict stands.
                    _ => return Err(error),
                }
            }
            // A garbage collection holds publishes back, or the answer was lost (a reset, a
            // timeout): try again.
            Err(error) if deferral.wait(&error).await => {
                tracing::warn!(%error, "publish deferred; retrying");
                tried_before = true;
            }
            Err(error) => return Err(error),
        }
    };

    let mut left = Vec::new();
    for tag in &options.tags {
        // A version published before may have been followed by others: `latest` moves back to
        // it only from nowhere, or stays where it is.
        let only_if_unset = already_published && *tag == Tag::latest();
        let update = TagUpdate {
            manifest: published.digest,
            if_matches: None,
            if_generation: None,
            if_absent: only_if_unset,
        };
        match move_tag_patiently(client, repo, tag, &update).await {
            Ok(_) => {}
            Err(error) if only_if_unset && error.code() == Some(ErrorCode::TagMoved) => {
                // Already here (the earlier push moved it), or on another version.
                let here = client
                    .tags(repo)
                    .await?
                    .into_iter()
                    .any(|entry| entry.tag == *tag && entry.manifest == published.digest);
                if !here {
                    left.push(format!("{repo}@{tag}"));
                }
            }
            Err(error) => {
                return Err(ClientError::Usage(format!(
                    "published {} ({}), but moving its tag {tag} failed: {error}; run `cartridge tag {} {tag}`",
                    published.reference, published.digest, published.reference
                )));
            }
        }
    }
    let unique = manifest.blobs().len();
    Ok(PushReport {
        reference: published.reference,
        digest: published.digest,
        chunks: chunks.len(),
        uploaded_blobs: uploaded.0,
        uploaded_bytes: uploaded.1,
        reused_blobs: unique.saturating_sub(uploaded.0),
        payload_bytes: manifest.cartridge.payload_bytes(),
        stored_bytes: chunks.iter().map(|c| c.bytes.len() as u64).sum(),
        tags: options
            .tags
            .iter()
            .map(|t| format!("{repo}@{t}"))
            .filter(|t| !left.contains(t))
            .collect(),
        already_published,
        tags_left: left,
    })
}

/// Whether two manifests describe the same cartridge stored the same way: all but when each
/// was made.
fn same_cartridge(existing: &Manifest, new: &Manifest) -> bool {
    let existing = Manifest {
        created: new.created.clone(),
        ..existing.clone()
    };
    existing == *new
}

/// Uploads the chunks the registry lacks; returns how many blobs and bytes went up.
async fn upload_missing(
    client: &Client,
    repo: &Repository,
    chunks: &[EncodedChunk],
    options: &PushOptions,
    progress: &dyn Progress,
) -> Result<(usize, u64), ClientError> {
    let digests: Vec<Digest> = chunks.iter().map(|c| c.descriptor.stored.digest).collect();
    let missing = (|| client.missing(repo, digests.clone()))
        .retry(backoff())
        .when(ClientError::is_transient)
        .adjust(|error, pause| pause.map(|p| error.pause(p)))
        .notify(|error, pause| tracing::warn!(%error, ?pause, "asking for missing blobs failed; retrying"))
        .await?;
    let to_send: Vec<&EncodedChunk> = missing
        .iter()
        .filter_map(|digest| {
            chunks
                .iter()
                .find(|c| c.descriptor.stored.digest == *digest)
        })
        .collect();
    if to_send.is_empty() {
        return Ok((0, 0));
    }
    let total: u64 = to_send.iter().map(|c| c.bytes.len() as u64).sum();
    progress.begin(total, 0);
    futures::stream::iter(to_send.iter())
        .map(|chunk| async move {
            let bytes = Bytes::from(chunk.bytes.clone());
            // Each attempt asks where to send the blob right before sending it: presigned URLs
            // expire, and a long push must not reach its last blobs with stale ones. Each one
            // that sends is charged against the cap: a retry sends the bytes again.
            let send = || async {
                let target = client.upload_target(repo, chunk.descriptor.stored).await?;
                if let Some(rate) = &options.rate {
                    rate.consume(bytes.len() as u64).await;
                }
                client.upload(&target, bytes.clone()).await
            };
            send.retry(backoff())
                .when(ClientError::is_transient)
                .adjust(|error, pause| pause.map(|p| error.pause(p)))
                .notify(|error, pause| tracing::warn!(%error, ?pause, digest = %chunk.descriptor.stored.digest, "upload failed; retrying"))
                .await?;
            progress.advance(bytes.len() as u64);
            Ok::<_, ClientError>(())
        })
        .buffer_unordered(options.jobs.max(1))
        .try_collect::<Vec<()>>()
        .await?;
    progress.end();
    Ok((to_send.len(), total))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// A registry that answers each connection with the next of `answers` (status, JSON body).
    fn scripted(answers: Vec<(u16, String)>) -> String {
        let answers = std::sync::Mutex::new(answers.into_iter());
        crate::testing::serve(move |_, stream| {
            let Some((status, body)) = answers.lock().unwrap().next() else {
                return;
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        })
        .url
    }

    /// A move put off, then refused as moved: it went through after all when the tag already
    /// points at its manifest; refused outright, it stays refused.
    #[tokio::test]
    async fn a_tag_move_whose_answer_was_lost_counts_once_the_tag_is_there() {
        let manifest = Digest::of(b"manifest");
        let (repo, tag): (Repository, Tag) = ("ns/x".parse().unwrap(), "latest".parse().unwrap());
        let update = TagUpdate {
            manifest,
            if_matches: Some(Digest::of(b"before")),
            if_generation: Some(6),
            if_absent: false,
        };
        let moved = r#"{"code": "tag_moved", "message": "ns/x@latest moved"}"#.to_owned();
        let url = scripted(vec![
            (
                503,
                r#"{"code": "unavailable", "message": "collecting"}"#.to_owned(),
            ),
            (412, moved.clone()),
            (
                200,
                serde_json::json!({"repository": "ns/x", "versions": [],
                    "tags": [{"tag": "latest", "manifest": manifest, "generation": 7}]})
                .to_string(),
            ),
        ]);
        let client = Client::new(&url, None).unwrap();
        let entry = move_tag_patiently(&client, &repo, &tag, &update)
            .await
            .unwrap();
        assert_eq!((entry.manifest, entry.generation), (manifest, 7));

        let client = Client::new(&scripted(vec![(412, moved)]), None).unwrap();
        let error = move_tag_patiently(&client, &repo, &tag, &update)
            .await
            .unwrap_err();
        assert_eq!(error.code(), Some(ErrorCode::TagMoved));
    }
}

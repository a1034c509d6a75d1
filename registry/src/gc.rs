//! Online mark-and-sweep garbage collection.
//!
//! Roots are the manifests that versions and tags point at, plus every manifest younger than the
//! grace period (a publish in flight has written its manifest but not yet its version). Blobs
//! that no root references and that are older than the grace period are deleted; younger ones
//! may belong to a push still uploading. Publishes wait while a collection holds the lease, so a
//! blob a publish relies on cannot disappear between its check and its version being written
//! (see `Storage::publish`).
//!
//! A repository's links (what was sent or published to it, see `Storage::link_blob`) are swept
//! by the same rule, per repository: once a version is deleted, content only it held stops being
//! readable through that repository (its manifest's link goes with the version; its blobs' here),
//! even while another repository keeps the bytes stored.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cartridge_schemas::Digest;
use cartridge_schemas::reference::{Name, Namespace, Tag, Version};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use object_store::ObjectMeta;
use object_store::path::Path;
use serde::Serialize;

use crate::storage::{GC_LEASE_TTL, Key, Storage, StorageError};

#[derive(Debug, Clone, Copy)]
pub struct GcOptions {
    /// Objects younger than this are never deleted.
    pub grace: Duration,
    /// Report what would be deleted without deleting it.
    pub dry_run: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub manifests_kept: usize,
    pub manifests_deleted: Vec<Digest>,
    pub blobs_kept: usize,
    pub blobs_deleted: Vec<Digest>,
    pub bytes_freed: u64,
    pub uploads_deleted: usize,
    /// Links of repositories to content none of their versions or tags references any more.
    pub links_deleted: usize,
}

pub async fn collect(storage: &Storage, options: GcOptions) -> Result<GcReport, StorageError> {
    collect_until(storage, options, std::future::pending()).await
}

/// [`collect`], stopped early when `stop` completes (a signal): at the next step (a delete, a
/// listed object, a lease renewal), never inside one, and the lease is released all the same,
/// so publishes do not wait for it to expire. Each object deleted so far was unreferenced.
pub async fn collect_until(
    storage: &Storage,
    options: GcOptions,
    stop: impl std::future::Future<Output = ()>,
) -> Result<GcReport, StorageError> {
    if options.dry_run {
        // A dry run writes nothing, not even a clock probe: ages by this host's clock.
        return sweep(storage, options, Utc::now(), None, &AtomicBool::new(false)).await;
    }
    let owner = format!("gc-{}-{:08x}", std::process::id(), rand::random::<u32>());
    let Some(expires) = storage.acquire_gc_lease(&owner).await? else {
        return Err(StorageError::GcRunning);
    };
    let stopped = AtomicBool::new(false);
    let collected = async {
        // Ages by the earlier of the two clocks: neither a host running ahead of the store nor
        // one running behind it finds an object older than it is.
        let now = storage.clock().await?.min(Utc::now());
        sweep(storage, options, now, Some((&owner, expires)), &stopped).await
    };
    // The signal only raises a flag: the sweep stops at its next step, so no delete or lease
    // write is left in flight to land after the release below.
    let watch = async {
        stop.await;
        stopped.store(true, Ordering::Relaxed);
        std::future::pending::<()>().await;
    };
    let result = tokio::select! {
        biased;
        () = watch => unreachable!("the watch never ends"),
        result = collected => result,
    };
    // Release even after a failure, so publishes do not wait for the lease to expire.
    let released = storage.release_gc_lease(&owner).await;
    let report = result?;
    released?;
    Ok(report)
}

/// Keeps the lease fresh during a long sweep, and stops the sweep if it was lost. Called before
/// every step that could outlast it: each listed object and each delete.
struct Heartbeat<'a> {
    storage: &'a Storage,
    /// The owner and when the lease expires (wall-clock time, as the lease reads it: a suspended
    /// machine's monotonic clock stands still).
    lease: Option<(&'a str, DateTime<Utc>)>,
    /// Raised to stop the sweep at its next step.
    stopped: &'a AtomicBool,
}

impl Heartbeat<'_> {
    async fn beat(&mut self) -> Result<(), StorageError> {
        if self.stopped.load(Ordering::Relaxed) {
            return Err(StorageError::GcInterrupted);
        }
        if let Some((owner, expires)) = &mut self.lease
            && Utc::now() > *expires - GC_LEASE_TTL * 3 / 4
        {
            *expires = self.storage.renew_gc_lease(owner).await?;
        }
        Ok(())
    }

    /// Deletes the object at `location`, the lease kept fresh first; a dry run deletes nothing.
    async fn delete(&mut self, location: &Path, dry_run: bool) -> Result<(), StorageError> {
        if !dry_run {
            self.beat().await?;
            self.storage.delete_object(location).await?;
        }
        Ok(())
    }

    /// Everything under `key`, the lease kept fresh while a long listing pages on.
    async fn list(&mut self, key: Key<'_>) -> Result<Vec<ObjectMeta>, StorageError> {
        let storage = self.storage;
        let mut listing = storage.listing(key);
        let mut all = Vec::new();
        while let Some(meta) = listing.try_next().await? {
            self.beat().await?;
            all.push(meta);
        }
        Ok(all)
    }
}

/// Content-addressed objects by digest.
fn by_digest(objects: Vec<ObjectMeta>) -> BTreeMap<Digest, ObjectMeta> {
    objects
        .into_iter()
        .filter_map(|meta| Some((Digest::from_hex(meta.location.filename()?).ok()?, meta)))
        .collect()
}

/// Whether an object under `repos/` has a name of the layout the roots are read from.
fn readable_name(location: &Path) -> bool {
    let parts: Vec<_> = location.parts().collect();
    let parts: Vec<&str> = parts.iter().map(AsRef::as_ref).collect();
    let ["repos", namespace, name, rest @ ..] = parts.as_slice() else {
        return false;
    };
    namespace.parse::<Namespace>().is_ok()
        && name.parse::<Name>().is_ok()
        && match rest {
            ["versions", version] => version.parse::<Version>().is_ok(),
            // As `Key::TagGeneration` writes them: only those are read as the tag.
            ["tags", tag, generation] => {
                tag.parse::<Tag>().is_ok()
                    && generation.len() == 20
                    && generation.bytes().all(|b| b.is_ascii_digit())
            }
            ["links", "blobs" | "manifests", digest] => Digest::from_hex(digest).is_ok(),
            _ => false,
        }
}

async fn sweep(
    storage: &Storage,
    options: GcOptions,
    now: DateTime<Utc>,
    lease: Option<(&str, DateTime<Utc>)>,
    stopped: &AtomicBool,
) -> Result<GcReport, StorageError> {
    let mut heartbeat = Heartbeat {
        storage,
        lease,
        stopped,
    };
    heartbeat.beat().await?;
    let grace = chrono::Duration::from_std(options.grace).unwrap_or(chrono::Duration::MAX);
    let cutoff = now
        .checked_sub_signed(grace)
        .unwrap_or(chrono::DateTime::<Utc>::MIN_UTC);
    let mut report = GcReport {
        dry_run: options.dry_run,
        ..GcReport::default()
    };

    // Each repository's roots: the manifests its versions and tags point at.
    let mut roots = Vec::new();
    for namespace in storage.namespaces().await? {
        for repo in storage.repositories(&namespace).await? {
            heartbeat.beat().await?;
            let referenced: HashSet<Digest> = storage
                .referenced_manifests(&repo)
                .await?
                .into_iter()
                .collect();
            roots.push((repo, referenced));
        }
    }
    // Roots are found by parsing stored names. One this release cannot parse (written by another
    // release, or copied in) would hide the manifest it points at, whose content would then be
    // deleted: stop instead, naming it.
    for meta in heartbeat.list(Key::Repos).await? {
        if !readable_name(&meta.location) {
            return Err(StorageError::Corrupt {
                key: meta.location.to_string(),
                detail: "this name cannot be read, so what it points at cannot be kept; \
                         move or delete it, then collect"
                    .into(),
            });
        }
    }
    let referenced: HashSet<Digest> = roots.iter().flat_map(|(_, r)| r).copied().collect();
    // The blobs of every kept manifest, and what the young ones (publishes in flight, in any
    // repository) hold.
    let mut blobs_of = HashMap::new();
    let (mut young_manifests, mut young_blobs) = (HashSet::new(), HashSet::new());
    for (digest, meta) in by_digest(heartbeat.list(Key::Manifests).await?) {
        heartbeat.beat().await?;
        let young = meta.last_modified > cutoff;
        if referenced.contains(&digest) || young {
            // A live manifest that cannot be read would leave its blobs unmarked: stop rather
            // than delete what it may reference.
            let manifest = storage.get_manifest(&digest).await?;
            let blobs: Vec<Digest> = manifest.blobs().into_iter().map(|b| b.digest).collect();
            if young {
                young_manifests.insert(digest);
                young_blobs.extend(blobs.iter().copied());
            }
            blobs_of.insert(digest, blobs);
            report.manifests_kept += 1;
        } else {
            heartbeat.delete(&meta.location, options.dry_run).await?;
            report.manifests_deleted.push(digest);
        }
    }

    // A version or tag whose manifest is gone leaves its blobs unmarked: stop before deleting
    // them, naming what to repair (the manifest may yet be pushed again).
    for (repo, referenced) in &roots {
        if let Some(missing) = referenced.iter().find(|d| !blobs_of.contains_key(*d)) {
            return Err(StorageError::Corrupt {
                key: Key::Manifest(missing).path().to_string(),
                detail: format!(
                    "{repo} points at this manifest but it is missing; \
                     delete or push again the version or tag that names it, then collect"
                ),
            });
        }
    }
    let marked: HashSet<Digest> = blobs_of.values().flatten().copied().collect();
    // Each repository's blob links, listed once: for the blobs sent again lately and for the
    // link sweep below.
    let mut blob_links = Vec::with_capacity(roots.len());
    for (repo, _) in &roots {
        heartbeat.beat().await?;
        blob_links.push(by_digest(heartbeat.list(Key::BlobLinks(repo)).await?));
    }
    // A blob sent again lately is young whatever its own age: an upload that finds the bytes
    // stored (content whose last version was deleted) only writes the repository's link, and
    // the push that sent it has yet to publish.
    let relinked: HashSet<Digest> = blob_links
        .iter()
        .flatten()
        .filter(|(_, meta)| meta.last_modified > cutoff)
        .map(|(digest, _)| *digest)
        .collect();
    for (digest, meta) in by_digest(heartbeat.list(Key::Blobs).await?) {
        if marked.contains(&digest) || relinked.contains(&digest) || meta.last_modified > cutoff {
            report.blobs_kept += 1;
            continue;
        }
        heartbeat.delete(&meta.location, options.dry_run).await?;
        report.bytes_freed += meta.size;
        report.blobs_deleted.push(digest);
    }

    for meta in heartbeat.list(Key::Uploads).await? {
        if meta.last_modified <= cutoff {
            heartbeat.delete(&meta.location, options.dry_run).await?;
            report.uploads_deleted += 1;
        }
    }

    for ((repo, referenced), blob_links) in roots.iter().zip(blob_links) {
        let referenced_blobs: HashSet<Digest> = referenced
            .iter()
            .filter_map(|manifest| blobs_of.get(manifest))
            .flatten()
            .copied()
            .collect();
        // Manifest links first: a sweep cut short never leaves a manifest readable through the
        // repository whose blobs are not.
        let manifest_links = by_digest(heartbeat.list(Key::ManifestLinks(repo)).await?);
        for (links, kept, young) in [
            (manifest_links, referenced, &young_manifests),
            (blob_links, &referenced_blobs, &young_blobs),
        ] {
            for (digest, meta) in links {
                if kept.contains(&digest) || young.contains(&digest) || meta.last_modified > cutoff
                {
                    continue;
                }
                heartbeat.delete(&meta.location, options.dry_run).await?;
                report.links_deleted += 1;
            }
        }
    }
    tracing::info!(
        dry_run = options.dry_run,
        manifests_deleted = report.manifests_deleted.len(),
        blobs_deleted = report.blobs_deleted.len(),
        links_deleted = report.links_deleted,
        bytes_freed = report.bytes_freed,
        "garbage collection done"
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn an_interrupted_collection_releases_its_lease() {
        let storage = Storage::new(Arc::new(object_store::memory::InMemory::new()), "memory");
        let options = GcOptions {
            grace: Duration::from_secs(600),
            dry_run: false,
        };
        let error = collect_until(&storage, options, std::future::ready(()))
            .await
            .unwrap_err();
        assert!(matches!(error, StorageError::GcInterrupted), "{error}");
        // The next collection finds no live lease: publishes were not held back either.
        collect(&storage, options).await.unwrap();
    }
}

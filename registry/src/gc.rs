//! Online mark-and-sweep garbage collection.
//!
//! Roots are the manifests that versions and tags point at, plus every manifest younger than the
//! grace period (a publish in flight has written its manifest but not yet its version). Blobs
//! that no root references and that are older than the grace period are deleted; younger ones
//! may belong to a push still uploading. Publishes wait while a collection holds the lease, so a
//! blob a publish relies on cannot disappear between its check and its version being written
//! (see `Storage::publish`).

use std::collections::HashSet;
use std::time::Duration;

use cartridge_schemas::Digest;
use chrono::Utc;
use serde::Serialize;

use crate::storage::{Key, Storage, StorageError};

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
}

pub async fn collect(storage: &Storage, options: GcOptions) -> Result<GcReport, StorageError> {
    if options.dry_run {
        return sweep(storage, options, None).await;
    }
    let owner = format!("gc-{}-{:08x}", std::process::id(), rand::random::<u32>());
    if !storage.acquire_gc_lease(&owner).await? {
        return Err(StorageError::GcRunning);
    }
    let result = sweep(storage, options, Some(&owner)).await;
    // Release even after a failure, so publishes do not wait for the lease to expire.
    let released = storage.release_gc_lease(&owner).await;
    let report = result?;
    released?;
    Ok(report)
}

/// Keeps the lease fresh during a long sweep, and stops the sweep if it was lost.
struct Heartbeat<'a> {
    storage: &'a Storage,
    owner: Option<&'a str>,
    last: std::time::Instant,
}

impl Heartbeat<'_> {
    async fn beat(&mut self) -> Result<(), StorageError> {
        if let Some(owner) = self.owner
            && self.last.elapsed() > crate::storage::GC_LEASE_TTL / 4
        {
            self.storage.renew_gc_lease(owner).await?;
            self.last = std::time::Instant::now();
        }
        Ok(())
    }
}

async fn sweep(
    storage: &Storage,
    options: GcOptions,
    owner: Option<&str>,
) -> Result<GcReport, StorageError> {
    let mut heartbeat = Heartbeat {
        storage,
        owner,
        last: std::time::Instant::now(),
    };
    let grace = chrono::Duration::from_std(options.grace).unwrap_or(chrono::Duration::MAX);
    let cutoff = Utc::now()
        .checked_sub_signed(grace)
        .unwrap_or(chrono::DateTime::<Utc>::MIN_UTC);
    let mut report = GcReport {
        dry_run: options.dry_run,
        ..GcReport::default()
    };

    let mut referenced = HashSet::new();
    for namespace in storage.namespaces().await? {
        for repo in storage.repositories(&namespace).await? {
            heartbeat.beat().await?;
            referenced.extend(storage.referenced_manifests(&repo).await?);
        }
    }
    let mut marked = HashSet::new();
    for (digest, meta) in storage.content_objects(Key::Manifests).await? {
        heartbeat.beat().await?;
        if referenced.contains(&digest) || meta.last_modified > cutoff {
            // A live manifest that cannot be read would leave its blobs unmarked: stop rather
            // than delete what it may reference.
            let manifest = storage.get_manifest(&digest).await?;
            marked.extend(manifest.blobs().into_iter().map(|blob| blob.digest));
            report.manifests_kept += 1;
        } else {
            if !options.dry_run {
                heartbeat.beat().await?;
                storage.delete_object(&meta.location).await?;
            }
            report.manifests_deleted.push(digest);
        }
    }

    for (digest, meta) in storage.content_objects(Key::Blobs).await? {
        if marked.contains(&digest) || meta.last_modified > cutoff {
            report.blobs_kept += 1;
            continue;
        }
        if !options.dry_run {
            heartbeat.beat().await?;
            storage.delete_object(&meta.location).await?;
        }
        report.bytes_freed += meta.size;
        report.blobs_deleted.push(digest);
    }

    for meta in storage.uploads().await? {
        if meta.last_modified <= cutoff {
            if !options.dry_run {
                storage.delete_object(&meta.location).await?;
            }
            report.uploads_deleted += 1;
        }
    }
    tracing::info!(
        dry_run = options.dry_run,
        manifests_deleted = report.manifests_deleted.len(),
        blobs_deleted = report.blobs_deleted.len(),
        bytes_freed = report.bytes_freed,
        "garbage collection done"
    );
    Ok(report)
}

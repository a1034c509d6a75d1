//! One storage conformance suite, run against memory://, file:// and a real S3-compatible server.

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use cartridge_registry::backend;
use cartridge_registry::gc::{self, GcOptions};
use cartridge_registry::storage::{
    BlobWriter, Key, Storage, StorageError, TagCondition, UploadDestination,
};
use cartridge_schemas::Digest;
use cartridge_schemas::api::NamespaceSettings;
use cartridge_schemas::reference::{Repository, Tag, Version};
use object_store::{GetRange, ObjectStoreExt, PutPayload};

use crate::moto::Moto;
use crate::support::{encoded, upload_all};

fn repo(text: &str) -> Repository {
    text.parse().unwrap()
}

fn version(text: &str) -> Version {
    text.parse().unwrap()
}

fn tag(text: &str) -> Tag {
    text.parse().unwrap()
}

async fn blobs(storage: &Storage) {
    let repo = repo("team/blobs");
    let bytes = Bytes::from_static(b"some chunk bytes");
    let digest = Digest::of(&bytes);
    assert_eq!(
        storage
            .missing_blobs(&repo, &[digest, digest])
            .await
            .unwrap(),
        vec![digest]
    );

    let mut wrong = BlobWriter::new(Digest::of(b"other"), 1024);
    wrong.append(bytes::Bytes::copy_from_slice(&bytes)).unwrap();
    assert!(matches!(
        wrong.finish(),
        Err(StorageError::DigestMismatch { .. })
    ));
    let mut small = BlobWriter::new(digest, 4);
    assert!(matches!(
        small.append(bytes::Bytes::copy_from_slice(&bytes)),
        Err(StorageError::TooLarge { .. })
    ));

    let mut writer = BlobWriter::new(digest, 1024);
    writer
        .append(bytes::Bytes::copy_from_slice(&bytes[..5]))
        .unwrap();
    writer
        .append(bytes::Bytes::copy_from_slice(&bytes[5..]))
        .unwrap();
    storage
        .put_blob(&repo, writer.finish().unwrap())
        .await
        .unwrap();
    assert!(
        storage
            .missing_blobs(&repo, &[digest])
            .await
            .unwrap()
            .is_empty()
    );
    // Stored once, but another repository holds it only once its bytes are sent there too:
    // knowing a digest is not holding the content.
    let elsewhere = self::repo("other/blobs");
    assert_eq!(
        storage.missing_blobs(&elsewhere, &[digest]).await.unwrap(),
        vec![digest]
    );
    let mut again = BlobWriter::new(digest, 1024);
    again.append(bytes::Bytes::copy_from_slice(&bytes)).unwrap();
    storage
        .put_blob(&elsewhere, again.finish().unwrap())
        .await
        .unwrap();
    assert!(
        storage
            .missing_blobs(&elsewhere, &[digest])
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        storage.blob_meta(&digest).await.unwrap().unwrap().size,
        bytes.len() as u64
    );

    let whole = storage
        .get_blob(&digest, None)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(whole, bytes);
    let part = storage
        .get_blob(&digest, Some(GetRange::Bounded(5..10)))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(part, bytes.slice(5..10));
    let tail = storage
        .get_blob(&digest, Some(GetRange::Offset(12)))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(tail, bytes.slice(12..));
    assert!(matches!(
        storage.get_blob(&Digest::of(b"absent"), None).await,
        Err(StorageError::NotFound { .. })
    ));
}

async fn manifests(storage: &Storage) {
    let (manifest, _) = encoded(1);
    let digest = storage.put_manifest(&manifest).await.unwrap();
    assert_eq!(digest, manifest.digest());
    assert_eq!(storage.get_manifest(&digest).await.unwrap(), manifest);
    // A manifest whose bytes no longer match its name is reported, not served.
    let tampered = Digest::of(b"tampered manifest");
    storage
        .object_store()
        .put(
            &Key::Manifest(&tampered).path(),
            PutPayload::from(manifest.to_canonical_json()),
        )
        .await
        .unwrap();
    assert!(matches!(
        storage.get_manifest(&tampered).await,
        Err(StorageError::Corrupt { .. })
    ));
    storage
        .delete_object(&Key::Manifest(&tampered).path())
        .await
        .unwrap();
}

async fn publish(storage: &Storage) {
    let repo = repo("legal/contracts");
    let (manifest, chunks) = encoded(2);
    let err = storage
        .publish(&repo, &version("v1"), &manifest)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StorageError::MissingBlobs { count: 4, .. }),
        "{err}"
    );
    assert_eq!(storage.version(&repo, &version("v1")).await.unwrap(), None);

    // Blobs sent to another repository are that repository's: naming them is not enough.
    upload_all(storage, &self::repo("mallory/x"), &chunks).await;
    assert!(matches!(
        storage.publish(&repo, &version("v1"), &manifest).await,
        Err(StorageError::MissingBlobs { count: 4, .. })
    ));
    upload_all(storage, &repo, &chunks).await;
    // A manifest that misstates a stored blob's size (the last one: all are checked).
    let mut misstated = manifest.clone();
    misstated.chunks.last_mut().unwrap().stored.size += 1;
    let err = storage
        .publish(&repo, &version("v1"), &misstated)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StorageError::InvalidManifest(m) if m.contains("the manifest says")),
        "{err}"
    );
    let digest = storage
        .publish(&repo, &version("v1"), &manifest)
        .await
        .unwrap();
    assert_eq!(
        storage.version(&repo, &version("v1")).await.unwrap(),
        Some(digest)
    );

    let (other, other_chunks) = encoded(3);
    upload_all(storage, &repo, &other_chunks).await;
    let err = storage
        .publish(&repo, &version("v1"), &other)
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::VersionExists { .. }), "{err}");
    assert_eq!(
        storage.version(&repo, &version("v1")).await.unwrap(),
        Some(digest),
        "the first publish is intact"
    );

    let versions = storage.versions(&repo).await.unwrap();
    assert_eq!(versions, vec![(version("v1"), digest)]);
    storage.delete_version(&repo, &version("v1")).await.unwrap();
    assert!(storage.versions(&repo).await.unwrap().is_empty());
    // Its content is no longer the repository's: no tag can point at it by digest.
    assert!(matches!(
        storage
            .move_tag(&repo, &tag("stable"), Some(digest), TagCondition::Always)
            .await,
        Err(StorageError::NotFound { .. })
    ));
    // A deleted version's name is never published again.
    let err = storage
        .publish(&repo, &version("v1"), &other)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("was deleted, and a version's name is never used again"),
        "{err}"
    );
    assert!(matches!(
        storage.delete_version(&repo, &version("v1")).await,
        Err(StorageError::NotFound { .. })
    ));
}

async fn concurrent_publishes(storage: &Storage) {
    let repo = repo("race/publish");
    let mut contenders = Vec::new();
    for seed in 10..30u8 {
        let (manifest, chunks) = encoded(seed);
        upload_all(storage, &repo, &chunks).await;
        contenders.push(manifest);
    }
    let digests: Vec<Digest> = contenders.iter().map(|m| m.digest()).collect();
    let tasks: Vec<_> = contenders
        .into_iter()
        .map(|manifest| {
            let storage = storage.clone();
            let repo = repo.clone();
            tokio::spawn(async move { storage.publish(&repo, &version("v1"), &manifest).await })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(digest) => winners.push(digest),
            Err(StorageError::VersionExists { .. }) => {}
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert_eq!(
        winners.len(),
        1,
        "exactly one of 20 concurrent publishes wins"
    );
    assert_eq!(
        storage.version(&repo, &version("v1")).await.unwrap(),
        Some(winners[0])
    );
    // A loser's content did not publish: it cannot be read or tagged by digest.
    for digest in digests.iter().filter(|d| **d != winners[0]) {
        assert!(
            !storage
                .exists(Key::ManifestLink(&repo, digest))
                .await
                .unwrap(),
            "a losing publish left {digest} in the repository"
        );
    }
    assert!(
        storage
            .exists(Key::ManifestLink(&repo, &winners[0]))
            .await
            .unwrap()
    );
}

/// Deleting every version of one content at once: while a tag points at it, one version always
/// survives (each deletion saw the others still there); with no tag, the content leaves the
/// repository.
async fn concurrent_deletes(storage: &Storage) {
    let repo = repo("race/delete");
    let (manifest, chunks) = encoded(40);
    upload_all(storage, &repo, &chunks).await;
    let names: Vec<Version> = (0..8).map(|i| version(&format!("3.0.{i}"))).collect();
    let delete_all = |names: Vec<Version>| {
        let tasks: Vec<_> = names
            .into_iter()
            .map(|name| {
                let (storage, repo) = (storage.clone(), repo.clone());
                tokio::spawn(async move { storage.delete_version(&repo, &name).await })
            })
            .collect();
        futures::future::join_all(tasks)
    };
    for name in &names {
        storage.publish(&repo, name, &manifest).await.unwrap();
    }
    let digest = manifest.digest();
    storage
        .move_tag(&repo, &tag("keep"), Some(digest), TagCondition::Always)
        .await
        .unwrap();
    for outcome in delete_all(names.clone()).await {
        match outcome.unwrap() {
            Ok(()) | Err(StorageError::InUse { .. }) => {}
            Err(other) => panic!("unexpected {other}"),
        }
    }
    let left = storage.versions(&repo).await.unwrap();
    assert!(
        left.iter().any(|(_, d)| *d == digest),
        "the tag outlived every version of its content"
    );
    assert!(
        storage
            .exists(Key::ManifestLink(&repo, &digest))
            .await
            .unwrap()
    );

    storage
        .move_tag(&repo, &tag("keep"), None, TagCondition::Always)
        .await
        .unwrap();
    let survivors = left.into_iter().map(|(name, _)| name).collect();
    for outcome in delete_all(survivors).await {
        outcome.unwrap().unwrap();
    }
    assert!(storage.versions(&repo).await.unwrap().is_empty());
    assert!(
        !storage
            .exists(Key::ManifestLink(&repo, &digest))
            .await
            .unwrap(),
        "deleting every version at once left the content in the repository"
    );
}

async fn tags(storage: &Storage) {
    let repo = repo("legal/tagged");
    let (first, chunks) = encoded(40);
    upload_all(storage, &repo, &chunks).await;
    let a = storage
        .publish(&repo, &version("1.0.0"), &first)
        .await
        .unwrap();
    let (second, chunks) = encoded(41);
    upload_all(storage, &repo, &chunks).await;
    let b = storage
        .publish(&repo, &version("1.1.0"), &second)
        .await
        .unwrap();
    let latest = tag("latest");

    assert_eq!(storage.tag(&repo, &latest).await.unwrap(), None);
    let head = storage
        .move_tag(&repo, &latest, Some(a), TagCondition::Absent)
        .await
        .unwrap();
    assert_eq!(head.manifest, Some(a));
    let err = storage
        .move_tag(&repo, &latest, Some(b), TagCondition::Absent)
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::TagMoved { .. }), "{err}");
    let err = storage
        .move_tag(&repo, &latest, Some(b), TagCondition::Matches(b))
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::TagMoved { .. }), "{err}");
    let moved = storage
        .move_tag(&repo, &latest, Some(b), TagCondition::Matches(a))
        .await
        .unwrap();
    assert_eq!(moved.generation, head.generation + 1);
    // Back at `a`, a later generation: a compare-and-swap that saw the first `a` fails.
    let back = storage
        .move_tag(&repo, &latest, Some(a), TagCondition::Always)
        .await
        .unwrap();
    let err = storage
        .move_tag(
            &repo,
            &latest,
            Some(b),
            TagCondition::MatchesAt(a, head.generation),
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("(generation {})", head.generation)),
        "{err}"
    );
    let moved = storage
        .move_tag(
            &repo,
            &latest,
            Some(b),
            TagCondition::MatchesAt(a, back.generation),
        )
        .await
        .unwrap();
    assert_eq!(moved.generation, back.generation + 1);
    // A tag points only at manifests published in its own repository.
    let elsewhere: Repository = "other/place".parse().unwrap();
    let err = storage
        .move_tag(&elsewhere, &latest, Some(a), TagCondition::Always)
        .await
        .unwrap_err();
    assert!(matches!(err, StorageError::NotFound { .. }), "{err}");
    let unknown = Digest::of(b"no such manifest");
    assert!(matches!(
        storage
            .move_tag(&repo, &latest, Some(unknown), TagCondition::Always)
            .await,
        Err(StorageError::NotFound { .. })
    ));

    // Compare-and-swap under contention: of ten movers that all saw `b`, one wins.
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (storage, repo, latest) = (storage.clone(), repo.clone(), latest.clone());
            tokio::spawn(async move {
                storage
                    .move_tag(&repo, &latest, Some(a), TagCondition::Matches(b))
                    .await
            })
        })
        .collect();
    let mut wins = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => wins += 1,
            Err(StorageError::TagMoved { .. }) => {}
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert_eq!(wins, 1);

    // Unconditional moves all land, one generation each, and old generations are pruned.
    for _ in 0..12 {
        storage
            .move_tag(&repo, &latest, Some(b), TagCondition::Always)
            .await
            .unwrap();
    }
    let generations = storage
        .object_store()
        .list(Some(&Key::Tag(&repo, &latest).path()));
    let count = futures::TryStreamExt::try_collect::<Vec<_>>(generations)
        .await
        .unwrap()
        .len();
    assert!(count <= 9, "{count} generations kept");
    assert_eq!(
        storage.tag(&repo, &latest).await.unwrap().unwrap().manifest,
        Some(b)
    );

    let tags = storage.tags(&repo).await.unwrap();
    assert_eq!(tags.len(), 1);
    storage
        .move_tag(&repo, &latest, None, TagCondition::Always)
        .await
        .unwrap();
    assert!(storage.tags(&repo).await.unwrap().is_empty());
    assert_eq!(
        storage.tag(&repo, &latest).await.unwrap().unwrap().manifest,
        None
    );
    assert!(matches!(
        storage
            .move_tag(&repo, &latest, None, TagCondition::Always)
            .await,
        Err(StorageError::NotFound { .. })
    ));
    storage
        .move_tag(&repo, &latest, Some(a), TagCondition::Absent)
        .await
        .unwrap();

    // A version a tag points at is not deleted (the tag would go on serving it)...
    let err = storage
        .delete_version(&repo, &version("1.0.0"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StorageError::InUse { by, .. } if by == "tag latest"),
        "{err}"
    );
    assert_eq!(
        storage.version(&repo, &version("1.0.0")).await.unwrap(),
        Some(a)
    );
    // ...unless another version holds the same content.
    storage
        .publish(&repo, &version("1.0.1"), &first)
        .await
        .unwrap();
    storage
        .delete_version(&repo, &version("1.0.0"))
        .await
        .unwrap();
}

async fn listings_and_settings(storage: &Storage) {
    let namespaces: Vec<String> = storage
        .namespaces()
        .await
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    // Every namespace anything was sent to (the API lists those with a cartridge to pull).
    assert_eq!(namespaces, ["legal", "mallory", "other", "race", "team"]);
    let names: Vec<String> = storage
        .names(&"legal".parse().unwrap())
        .await
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    // legal/contracts keeps only its deleted version's tombstone: nothing to list.
    assert_eq!(names, ["tagged"]);

    let legal = "legal".parse().unwrap();
    assert_eq!(
        storage.namespace_settings(&legal).await.unwrap(),
        NamespaceSettings::default()
    );
    storage
        .set_namespace_settings(
            &legal,
            &NamespaceSettings {
                anonymous_pull: true,
            },
        )
        .await
        .unwrap();
    assert!(
        storage
            .namespace_settings(&legal)
            .await
            .unwrap()
            .anonymous_pull
    );
    assert_eq!(
        storage.namespaces().await.unwrap().len(),
        5,
        "settings do not create namespaces"
    );
}

async fn garbage_collection(storage: &Storage) {
    let repo = repo("gc/kept");
    let (kept, chunks) = encoded(50);
    upload_all(storage, &repo, &chunks).await;
    storage.publish(&repo, &version("v1"), &kept).await.unwrap();
    // An abandoned push: blobs and a manifest that no version references.
    let (orphan, orphan_chunks) = encoded(51);
    upload_all(storage, &repo, &orphan_chunks).await;
    let orphan_digest = storage.put_manifest(&orphan).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;

    // Within the grace period nothing goes.
    let report = gc::collect(
        storage,
        GcOptions {
            grace: Duration::from_secs(3600),
            dry_run: false,
        },
    )
    .await
    .unwrap();
    assert!(report.blobs_deleted.is_empty() && report.manifests_deleted.is_empty());
    assert_eq!(report.links_deleted, 0);

    let dry = gc::collect(
        storage,
        GcOptions {
            grace: Duration::ZERO,
            dry_run: true,
        },
    )
    .await
    .unwrap();
    let orphan_blobs: BTreeSet<Digest> = orphan_chunks
        .iter()
        .map(|c| c.descriptor.stored.digest)
        .collect();
    assert!(orphan_blobs.iter().all(|d| dry.blobs_deleted.contains(d)));
    assert!(dry.manifests_deleted.contains(&orphan_digest));
    assert!(
        storage
            .blob_meta(orphan_blobs.first().unwrap())
            .await
            .unwrap()
            .is_some(),
        "a dry run deletes nothing"
    );

    let report = gc::collect(
        storage,
        GcOptions {
            grace: Duration::ZERO,
            dry_run: false,
        },
    )
    .await
    .unwrap();
    for digest in &orphan_blobs {
        assert!(report.blobs_deleted.contains(digest));
        assert!(storage.blob_meta(digest).await.unwrap().is_none());
    }
    assert!(matches!(
        storage.get_manifest(&orphan_digest).await,
        Err(StorageError::NotFound { .. })
    ));
    for chunk in &chunks {
        assert!(
            storage
                .blob_meta(&chunk.descriptor.stored.digest)
                .await
                .unwrap()
                .is_some(),
            "referenced blobs stay"
        );
    }
    assert!(storage.get_manifest(&kept.digest()).await.is_ok());
    let kept_blobs: Vec<Digest> = chunks.iter().map(|c| c.descriptor.stored.digest).collect();
    assert!(
        storage
            .missing_blobs(&repo, &kept_blobs)
            .await
            .unwrap()
            .is_empty()
    );

    // A deleted version's content stops being readable through its repository, while another
    // repository holding the same bytes keeps them.
    let (shared, shared_chunks) = encoded(53);
    let (deleter, keeper) = (self::repo("gc/deleter"), self::repo("gc/keeper"));
    for repo in [&deleter, &keeper] {
        upload_all(storage, repo, &shared_chunks).await;
        storage
            .publish(repo, &version("v1"), &shared)
            .await
            .unwrap();
    }
    storage
        .delete_version(&deleter, &version("v1"))
        .await
        .unwrap();
    // Its manifest is no longer the repository's at once...
    let link = Key::ManifestLink(&deleter, &shared.digest());
    assert!(!storage.exists(link).await.unwrap());
    // ...and a link left behind (as a publish racing the deletion could leave) goes at
    // collection, with the blobs' links.
    storage
        .object_store()
        .put(&link.path(), PutPayload::from_static(b""))
        .await
        .unwrap();
    let shared_blobs: BTreeSet<Digest> = shared_chunks
        .iter()
        .map(|c| c.descriptor.stored.digest)
        .collect();
    let shared_blobs: Vec<Digest> = shared_blobs.into_iter().collect();
    let collect = |dry_run| {
        gc::collect(
            storage,
            GcOptions {
                grace: Duration::ZERO,
                dry_run,
            },
        )
    };
    let dry = collect(true).await.unwrap();
    assert!(
        storage
            .missing_blobs(&deleter, &shared_blobs)
            .await
            .unwrap()
            .is_empty()
    );
    let report = collect(false).await.unwrap();
    assert_eq!(dry.links_deleted, report.links_deleted);
    assert!(report.links_deleted > shared_blobs.len(), "{report:?}");
    assert_eq!(
        storage
            .missing_blobs(&deleter, &shared_blobs)
            .await
            .unwrap(),
        shared_blobs
    );
    assert!(
        !storage
            .exists(Key::ManifestLink(&deleter, &shared.digest()))
            .await
            .unwrap()
    );
    assert!(
        storage
            .missing_blobs(&keeper, &shared_blobs)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        storage
            .exists(Key::ManifestLink(&keeper, &shared.digest()))
            .await
            .unwrap()
    );
    for digest in &shared_blobs {
        assert!(storage.blob_meta(digest).await.unwrap().is_some());
    }
    // Blobs sent long ago that a young manifest names (a publish in flight) keep their links,
    // though no version references them yet.
    let (pending, pending_chunks) = encoded(54);
    let pending_repo = self::repo("gc/pending");
    // And blobs stored long ago that no manifest names, sent again lately (a push whose content
    // an abandoned push once sent): the new link keeps them for the push's publish. (Seed 88
    // shares no layer with the other cartridges here: a seed's layers are `seed ^ 0..8`.)
    let (_, resent_chunks) = encoded(88);
    let (abandoned_repo, resent_repo) = (self::repo("gc/abandoned"), self::repo("gc/resent"));
    upload_all(storage, &abandoned_repo, &resent_chunks).await;
    // (S3 may tell times to the second: the blobs are past the grace by more than a second,
    // and the manifest stays within it by seconds, however long the collection takes to start.)
    upload_all(storage, &pending_repo, &pending_chunks).await;
    tokio::time::sleep(Duration::from_millis(5500)).await;
    storage.put_manifest(&pending).await.unwrap();
    upload_all(storage, &resent_repo, &resent_chunks).await;
    gc::collect(
        storage,
        GcOptions {
            grace: Duration::from_secs(4),
            dry_run: false,
        },
    )
    .await
    .unwrap();
    let pending_blobs: Vec<Digest> = pending_chunks
        .iter()
        .map(|c| c.descriptor.stored.digest)
        .collect();
    assert!(
        storage
            .missing_blobs(&pending_repo, &pending_blobs)
            .await
            .unwrap()
            .is_empty()
    );
    let resent_blobs: Vec<Digest> = resent_chunks
        .iter()
        .map(|c| c.descriptor.stored.digest)
        .collect();
    assert!(
        storage
            .missing_blobs(&resent_repo, &resent_blobs)
            .await
            .unwrap()
            .is_empty(),
        "blobs sent again lately stay"
    );

    // A version whose manifest went missing stops a collection before it deletes the blobs
    // only that manifest marked; once the version is deleted, collecting goes on. (Seed 72
    // shares no layer with the other cartridges here: a seed's layers are `seed ^ 0..8`.)
    let (lost, lost_chunks) = encoded(72);
    let lost_repo = self::repo("gc/lost");
    upload_all(storage, &lost_repo, &lost_chunks).await;
    storage
        .publish(&lost_repo, &version("v1"), &lost)
        .await
        .unwrap();
    storage
        .delete_object(&Key::Manifest(&lost.digest()).path())
        .await
        .unwrap();
    let collect = || {
        gc::collect(
            storage,
            GcOptions {
                grace: Duration::ZERO,
                dry_run: false,
            },
        )
    };
    let error = collect().await.unwrap_err();
    assert!(
        matches!(&error, StorageError::Corrupt { detail, .. } if detail.contains("gc/lost")),
        "{error}"
    );
    let lost_blobs: Vec<Digest> = lost_chunks
        .iter()
        .map(|c| c.descriptor.stored.digest)
        .collect();
    for digest in &lost_blobs {
        assert!(storage.blob_meta(digest).await.unwrap().is_some());
    }
    storage
        .delete_version(&lost_repo, &version("v1"))
        .await
        .unwrap();
    let report = collect().await.unwrap();
    assert!(lost_blobs.iter().all(|d| report.blobs_deleted.contains(d)));

    // A version under a name this release cannot read (another release's, or copied in) hides
    // what it points at: collection stops, naming it, and deletes nothing.
    let (unread, unread_chunks) = encoded(73);
    let unread_repo = self::repo("gc/unread");
    upload_all(storage, &unread_repo, &unread_chunks).await;
    storage
        .publish(&unread_repo, &version("v1"), &unread)
        .await
        .unwrap();
    let versions = Key::Versions(&unread_repo).path();
    let odd = object_store::path::Path::from(format!("{versions}/Not_A_Version"));
    let pointer = storage
        .object_store()
        .get(&Key::Version(&unread_repo, &version("v1")).path())
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    storage
        .object_store()
        .put(&odd, pointer.into())
        .await
        .unwrap();
    storage
        .delete_version(&unread_repo, &version("v1"))
        .await
        .unwrap();
    let error = collect().await.unwrap_err();
    assert!(
        matches!(&error, StorageError::Corrupt { key, .. } if key.ends_with("Not_A_Version")),
        "{error}"
    );
    let unread_blobs: Vec<Digest> = unread_chunks
        .iter()
        .map(|c| c.descriptor.stored.digest)
        .collect();
    for digest in &unread_blobs {
        assert!(storage.blob_meta(digest).await.unwrap().is_some());
    }
    storage.object_store().delete(&odd).await.unwrap();
    let report = collect().await.unwrap();
    assert!(
        unread_blobs
            .iter()
            .all(|d| report.blobs_deleted.contains(d))
    );

    // A collection whose lease lapsed (a long listing, a paused process) stops: while it was
    // lapsed a publish may have gone ahead on content its listing holds as unreferenced.
    storage
        .object_store()
        .put(
            &Key::GcLease(1_000).path(),
            PutPayload::from_static(br#"{"expires":"2000-01-01T00:00:00Z","owner":"lapsed"}"#),
        )
        .await
        .unwrap();
    assert!(matches!(
        storage.renew_gc_lease("lapsed").await,
        Err(StorageError::GcLeaseLost)
    ));
    // Of collectors racing to take the lapsed lease over, exactly one wins.
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(8));
    let racing: Vec<_> = (0..8)
        .map(|i| {
            let (storage, start) = (storage.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                storage.acquire_gc_lease(&format!("racer {i}")).await
            })
        })
        .collect();
    let mut winners = Vec::new();
    for (i, race) in racing.into_iter().enumerate() {
        if race.await.unwrap().unwrap().is_some() {
            winners.push(i);
        }
    }
    assert_eq!(winners.len(), 1, "{winners:?}");
    let winner = format!("racer {}", winners[0]);
    storage.renew_gc_lease(&winner).await.unwrap();
    storage.release_gc_lease(&winner).await.unwrap();

    // A second collection cannot start while one holds the lease, and a publish waits for it.
    assert!(
        storage
            .acquire_gc_lease("someone else")
            .await
            .unwrap()
            .is_some()
    );
    assert!(matches!(
        storage.renew_gc_lease("me").await,
        Err(StorageError::GcLeaseLost)
    ));
    storage.release_gc_lease("me").await.unwrap();
    assert!(
        storage.acquire_gc_lease("me").await.unwrap().is_none(),
        "releasing needs the owner"
    );
    assert!(matches!(
        gc::collect(
            storage,
            GcOptions {
                grace: Duration::ZERO,
                dry_run: false
            }
        )
        .await,
        Err(StorageError::GcRunning)
    ));
    let (late, late_chunks) = encoded(52);
    upload_all(storage, &repo, &late_chunks).await;
    let publishing = {
        let (storage, repo, late) = (storage.clone(), repo.clone(), late.clone());
        tokio::spawn(async move { storage.publish(&repo, &version("v2"), &late).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !publishing.is_finished(),
        "publish waits while a collection runs"
    );
    // The running collection listed the manifests before the publish wrote its manifest, saw
    // an old unreferenced copy of it, and deletes it now: the publish must not end up pointing
    // at nothing.
    storage
        .delete_object(&Key::Manifest(&late.digest()).path())
        .await
        .unwrap();
    storage.release_gc_lease("someone else").await.unwrap();
    let digest = publishing.await.unwrap().unwrap();
    assert_eq!(
        storage.version(&repo, &version("v2")).await.unwrap(),
        Some(digest)
    );
    assert!(storage.get_manifest(&digest).await.is_ok());
}

async fn direct_uploads(storage: &Storage) {
    let bytes = b"bytes sent straight to object storage".to_vec();
    let digest = Digest::of(&bytes);
    let repo = repo("team/direct");
    let UploadDestination::Presigned { url, id } =
        storage.upload_destination(&repo, &digest).await.unwrap()
    else {
        panic!("S3 storage presigns uploads");
    };
    let http = reqwest::Client::new();
    assert!(
        http.put(url.clone())
            .body(bytes.clone())
            .send()
            .await
            .unwrap()
            .status()
            .is_success()
    );
    assert!(
        storage.blob_meta(&digest).await.unwrap().is_none(),
        "not visible before the commit verifies it"
    );
    // The upload is its repository's: another repository's commit, though its caller may push
    // there and knows the digest and the id, does not find it.
    assert!(matches!(
        storage
            .commit_upload(&self::repo("other/team"), &digest, &id, 1 << 20)
            .await,
        Err(StorageError::NotFound { .. })
    ));
    storage
        .commit_upload(&repo, &digest, &id, 1 << 20)
        .await
        .unwrap();
    assert!(
        storage
            .missing_blobs(&repo, &[digest])
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        storage
            .get_blob(&digest, None)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
        bytes
    );
    let download = storage.blob_download_url(&digest).await.unwrap().unwrap();
    assert_eq!(
        http.get(download)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap(),
        bytes
    );

    // Bytes that do not match the digest they were sent under never become the blob.
    let claimed = Digest::of(b"what the client claimed");
    let UploadDestination::Presigned { url, id } =
        storage.upload_destination(&repo, &claimed).await.unwrap()
    else {
        unreachable!()
    };
    http.put(url)
        .body(b"something else".to_vec())
        .send()
        .await
        .unwrap();
    assert!(matches!(
        storage.commit_upload(&repo, &claimed, &id, 1 << 20).await,
        Err(StorageError::DigestMismatch { .. })
    ));
    assert!(storage.blob_meta(&claimed).await.unwrap().is_none());
}

/// The store tells its own time, which garbage collection measures ages in.
async fn clock(storage: &Storage) {
    let slack = chrono::Duration::seconds(60);
    let before = chrono::Utc::now() - slack;
    let now = storage.clock().await.unwrap();
    assert!(before <= now && now <= chrono::Utc::now() + slack, "{now}");
}

async fn conformance(storage: Storage) {
    storage.check_conditional_writes().await.unwrap();
    clock(&storage).await;
    blobs(&storage).await;
    manifests(&storage).await;
    publish(&storage).await;
    concurrent_publishes(&storage).await;
    concurrent_deletes(&storage).await;
    tags(&storage).await;
    listings_and_settings(&storage).await;
    garbage_collection(&storage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory() {
    conformance(backend::open("memory://").unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_filesystem() {
    let dir = tempfile::tempdir().unwrap();
    conformance(backend::open(&format!("file://{}", dir.path().display())).unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_compatible_server() {
    let moto = Moto::start();
    moto.create_bucket("cartridges");
    // The AWS_* variables, as explicit settings (tests share one process environment).
    let settings: Vec<(String, String)> = moto
        .environment()
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .collect();
    let options: Vec<(&str, &str)> = settings
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let storage = backend::open_with("s3://cartridges/team-a", &options).unwrap();
    direct_uploads(&storage).await;
    conformance(storage).await;
}

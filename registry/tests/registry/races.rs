//! What real stores and writers do but no test reliably provokes: a second writer's object
//! landing right after a chosen write, and a store that ignores create-only writes. An in-memory
//! store does each on cue.

use std::fmt;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use cartridge_registry::storage::{Key, Storage, StorageError, TagCondition};
use cartridge_schemas::reference::{Repository, Tag, Version};
use futures::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};

use crate::support::{encoded, upload_all};

/// An in-memory store where, once `after` is written, the objects `then` land too, before the
/// writer of `after` hears back; or, `unconditional`, one that overwrites where asked to create only (as
/// S3-compatible stores that ignore `If-None-Match` do).
#[derive(Debug, Default)]
struct Interleaved {
    inner: InMemory,
    armed: Mutex<Option<(Path, Vec<Landing>)>>,
    unconditional: bool,
}

/// An object another writer puts, and its bytes.
type Landing = (Path, Bytes);

impl Interleaved {
    fn arm(&self, after: Path, then: Vec<Landing>) {
        *self.armed.lock().unwrap() = Some((after, then));
    }
}

impl fmt::Display for Interleaved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Interleaved({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for Interleaved {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        mut opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        if self.unconditional {
            opts.mode = PutMode::Overwrite;
        }
        let result = self.inner.put_opts(location, payload, opts).await?;
        let next = {
            let mut armed = self.armed.lock().unwrap();
            match armed.take() {
                Some((after, then)) if &after == location => Some(then),
                other => {
                    *armed = other;
                    None
                }
            }
        };
        for (then, bytes) in next.into_iter().flatten() {
            self.inner.put(&then, bytes.into()).await?;
        }
        Ok(result)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

/// A tag move that lands is a move made, even when another mover moves the tag on before the
/// first hears back: the first is not told it failed, and (moving unconditionally) does not
/// move the tag back over the second.
#[tokio::test]
async fn a_tag_move_overtaken_at_once_still_counts() {
    let store = Arc::new(Interleaved::default());
    let storage = Storage::new(store.clone(), "interleaved");
    let repo: Repository = "legal/raced".parse().unwrap();
    let mut published = Vec::new();
    for (seed, version) in [(50, "1.0.0"), (51, "2.0.0")] {
        let (manifest, chunks) = encoded(seed);
        upload_all(&storage, &repo, &chunks).await;
        let version: Version = version.parse().unwrap();
        published.push(storage.publish(&repo, &version, &manifest).await.unwrap());
    }
    let (a, b) = (published[0], published[1]);
    let latest: Tag = "latest".parse().unwrap();
    let generation = |n| Key::TagGeneration(&repo, &latest, n).path();
    storage
        .move_tag(&repo, &latest, Some(a), TagCondition::Absent)
        .await
        .unwrap();
    // What another mover writes to point the tag back at `a`: the first generation's bytes.
    let to_a = store
        .get(&generation(1))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();

    // X moves a → b; Y, having seen b, moves it back to a before X checks its write.
    store.arm(generation(2), vec![(generation(3), to_a.clone())]);
    let moved = storage
        .move_tag(&repo, &latest, Some(b), TagCondition::Matches(a))
        .await
        .unwrap();
    assert_eq!((moved.generation, moved.manifest), (2, Some(b)));
    let head = storage.tag(&repo, &latest).await.unwrap().unwrap();
    assert_eq!((head.generation, head.manifest), (3, Some(a)));

    // Unconditionally the same: X's move to b counts, and Y's later move stays.
    store.arm(generation(4), vec![(generation(5), to_a.clone())]);
    let moved = storage
        .move_tag(&repo, &latest, Some(b), TagCondition::Always)
        .await
        .unwrap();
    assert_eq!((moved.generation, moved.manifest), (4, Some(b)));
    let head = storage.tag(&repo, &latest).await.unwrap().unwrap();
    assert_eq!((head.generation, head.manifest), (5, Some(a)));

    // Past what pruning keeps, a write cannot be told from a stale recreation of a pruned
    // generation: it is taken as lost. Unconditionally, it is written again on top...
    let past = |from: u64| {
        (from..from + 9)
            .map(|n| (generation(n), to_a.clone()))
            .collect()
    };
    store.arm(generation(6), past(7));
    let moved = storage
        .move_tag(&repo, &latest, Some(b), TagCondition::Always)
        .await
        .unwrap();
    assert_eq!((moved.generation, moved.manifest), (16, Some(b)));
    // ...and conditionally, the move is reported refused, naming where the tag points now.
    store.arm(generation(17), past(18));
    let refused = storage
        .move_tag(&repo, &latest, Some(a), TagCondition::Matches(b))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, StorageError::TagMoved { current, .. } if *current == a.to_string()),
        "{refused}"
    );
}

/// Every invariant rests on create-only writes: a store that ignores them is refused at start.
#[tokio::test]
async fn a_store_that_ignores_conditional_writes_is_refused() {
    let honest = Storage::new(Arc::new(Interleaved::default()), "honest");
    honest.check_conditional_writes().await.unwrap();
    let store = Interleaved {
        unconditional: true,
        ..Interleaved::default()
    };
    let storage = Storage::new(Arc::new(store), "unconditional");
    assert!(matches!(
        storage.check_conditional_writes().await,
        Err(StorageError::Unconditional)
    ));
}

/// A version of the same content published while another is deleted keeps its manifest the
/// repository's: the deletion saw no other holder, but one appeared before it took the link.
#[tokio::test]
async fn a_deletion_racing_a_publish_of_the_same_content_keeps_its_link() {
    let store = Arc::new(Interleaved::default());
    let storage = Storage::new(store.clone(), "interleaved");
    let repo: Repository = "legal/raced".parse().unwrap();
    let (manifest, chunks) = encoded(60);
    upload_all(&storage, &repo, &chunks).await;
    let (old, new): (Version, Version) = ("1.0.0".parse().unwrap(), "1.0.1".parse().unwrap());
    let digest = storage.publish(&repo, &old, &manifest).await.unwrap();
    let pointer = store
        .get(&Key::Version(&repo, &old).path())
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    // The publish of `new` lands right after the deletion's tombstone.
    store.arm(
        Key::Version(&repo, &old).path(),
        vec![(Key::Version(&repo, &new).path(), pointer)],
    );
    storage.delete_version(&repo, &old).await.unwrap();
    assert_eq!(storage.version(&repo, &new).await.unwrap(), Some(digest));
    assert!(
        storage
            .exists(Key::ManifestLink(&repo, &digest))
            .await
            .unwrap()
    );
    let stable: Tag = "stable".parse().unwrap();
    storage
        .move_tag(&repo, &stable, Some(digest), TagCondition::Absent)
        .await
        .unwrap();
}

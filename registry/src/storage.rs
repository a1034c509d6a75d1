//! The registry's only state: objects in an object store.
//!
//! Layout (every key comes from [`Key`]):
//! ```text
//! blobs/<hex>                                  one chunk as stored; the key is blake3 of its bytes
//! manifests/<hex>                              canonical JSON manifest; the key is blake3 of its bytes
//! repos/<ns>/<name>/versions/<version>         {"manifest": digest}, written create-only
//! repos/<ns>/<name>/tags/<tag>/<generation>    {"manifest": digest | null}, each move creates the next
//! namespaces/<ns>/settings.json                namespace settings (anonymous pull)
//! uploads/<hex>/<id>                           direct uploads to object storage, awaiting verification
//! gc/leases/<generation>                      {"owner", "expires"}: the collection lease, as tags
//! ```
//! Invariants: only bytes whose blake3 matches their key ever reach `blobs/` or `manifests/`;
//! a version is written create-only after its manifest and every blob it references are present
//! and were sent to its repository (a digest alone never makes another repository's blob one's own);
//! a tag moves by creating generation n+1 create-only after reading generation n, so two racing
//! moves cannot both win. Create-only puts are the one conditional write every backend supports
//! atomically (object_store's local filesystem has no compare-and-swap on etags), which is why tags
//! are generations rather than one object updated in place.

use std::collections::{BTreeSet, HashSet};
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cartridge_schemas::api::NamespaceSettings;
use cartridge_schemas::manifest::Manifest;
use cartridge_schemas::reference::{Namespace, Repository, Tag, Version};
use cartridge_schemas::{Digest, canonical};
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{
    GetOptions, GetRange, GetResult, ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions,
    PutPayload,
};
use serde::{Deserialize, Serialize};

/// Tag generations kept behind the current one (older ones are pruned after a move).
const TAG_HISTORY: u64 = 8;
/// How long presigned URLs stay valid.
const PRESIGN_TTL: Duration = Duration::from_secs(15 * 60);
/// How long a publish waits for a running garbage collection before answering 503.
const GC_WAIT: Duration = Duration::from_secs(20);
/// A garbage collection lease is considered abandoned after this long.
pub const GC_LEASE_TTL: Duration = Duration::from_secs(10 * 60);

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{what} not found")]
    NotFound { what: String },
    #[error("{reference} {}", if *deleted {
        "was deleted, and a version's name is never used again"
    } else {
        "already exists; published versions never change"
    })]
    VersionExists { reference: String, deleted: bool },
    #[error("{what} is in use by {by}: move or delete that first")]
    InUse { what: String, by: String },
    #[error("tag {reference} moved: it points at {current}, not {expected}")]
    TagMoved {
        reference: String,
        expected: String,
        current: String,
    },
    #[error("blob {expected}: the bytes received hash to {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("blob {digest} is over the {limit} byte limit")]
    TooLarge { digest: Digest, limit: u64 },
    #[error("{count} blobs are missing, first {first}: upload them before publishing")]
    MissingBlobs { count: usize, first: Digest },
    #[error("stored object {key} is corrupt: {detail}")]
    Corrupt { key: String, detail: String },
    #[error("garbage collection is running; retry in a moment")]
    GcRunning,
    #[error("{what} keeps changing; retry in a moment")]
    Contended { what: String },
    #[error("the garbage collection lease lapsed or was taken over; stopped")]
    GcLeaseLost,
    #[error("the garbage collection was interrupted; what it had not deleted yet stays")]
    GcInterrupted,
    #[error("invalid manifest: {0}")]
    InvalidManifest(String),
    #[error(
        "the object store ignores conditional writes (a create over an object overwrote it): published versions could change and concurrent publishes both win; use a store that honours If-None-Match (S3, MinIO)"
    )]
    Unconditional,
    #[error("storage: {0}")]
    Backend(#[from] object_store::Error),
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// Every object the registry stores.
#[derive(Debug, Clone, Copy)]
pub enum Key<'a> {
    Blob(&'a Digest),
    Blobs,
    Manifest(&'a Digest),
    Manifests,
    Repos,
    Namespace(&'a Namespace),
    Version(&'a Repository, &'a Version),
    Versions(&'a Repository),
    TagGeneration(&'a Repository, &'a Tag, u64),
    Tag(&'a Repository, &'a Tag),
    Tags(&'a Repository),
    NamespaceSettings(&'a Namespace),
    /// A direct upload to a repository: only a commit to that repository can take it.
    Upload(&'a Repository, &'a Digest, &'a str),
    /// A private copy of a direct upload, hashed where the uploader can no longer write.
    Verifying(&'a Repository, &'a Digest, &'a str),
    Uploads,
    /// Marks content as part of a repository: reads through the repository see only this.
    BlobLink(&'a Repository, &'a Digest),
    BlobLinks(&'a Repository),
    ManifestLink(&'a Repository, &'a Digest),
    ManifestLinks(&'a Repository),
    /// Generations of the garbage collection lease, each written once (create-only).
    GcLeases,
    GcLease(u64),
    /// Written twice at start, create-only, to see the store refuse the second.
    Probe(&'a str),
}

impl Key<'_> {
    pub fn path(&self) -> Path {
        // Every component was validated by its type (lowercase, no '/', no '..'), so it is safe
        // as a path segment on every backend.
        let repo = |r: &Repository| format!("repos/{}/{}", r.namespace, r.name);
        let text = match self {
            Self::Blob(digest) => format!("blobs/{}", digest.hex()),
            Self::Blobs => "blobs".into(),
            Self::Manifest(digest) => format!("manifests/{}", digest.hex()),
            Self::Manifests => "manifests".into(),
            Self::Repos => "repos".into(),
            Self::Namespace(namespace) => format!("repos/{namespace}"),
            Self::Version(r, version) => format!("{}/versions/{version}", repo(r)),
            Self::Versions(r) => format!("{}/versions", repo(r)),
            // Zero-padded so generations sort as text in every listing.
            Self::TagGeneration(r, tag, generation) => {
                format!("{}/tags/{tag}/{generation:020}", repo(r))
            }
            Self::Tag(r, tag) => format!("{}/tags/{tag}", repo(r)),
            Self::Tags(r) => format!("{}/tags", repo(r)),
            Self::NamespaceSettings(namespace) => format!("namespaces/{namespace}/settings.json"),
            Self::Upload(r, digest, id) => format!("uploads/{r}/{}/{id}", digest.hex()),
            Self::Verifying(r, digest, id) => {
                format!("uploads/{r}/{}/{id}.verifying", digest.hex())
            }
            Self::BlobLink(r, digest) => format!("{}/links/blobs/{}", repo(r), digest.hex()),
            Self::BlobLinks(r) => format!("{}/links/blobs", repo(r)),
            Self::ManifestLink(r, digest) => {
                format!("{}/links/manifests/{}", repo(r), digest.hex())
            }
            Self::ManifestLinks(r) => format!("{}/links/manifests", repo(r)),
            Self::Uploads => "uploads".into(),
            Self::GcLeases => "gc/leases".into(),
            Self::GcLease(generation) => format!("gc/leases/{generation:020}"),
            Self::Probe(id) => format!("probes/{id}"),
        };
        Path::from(text)
    }
}

/// What in a repository holds a manifest.
struct Holders {
    versions: Vec<Version>,
    tags: Vec<String>,
}

impl Holders {
    fn is_empty(&self) -> bool {
        self.versions.is_empty() && self.tags.is_empty()
    }
}

/// Whether content made publishable must already be part of the repository (a tag move) or
/// becomes part of it (a publish).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Linked {
    Required,
    New,
}

/// What a version or tag generation holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Pointer {
    manifest: Option<Digest>,
}

/// A tag's newest generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TagHead {
    pub generation: u64,
    /// `None` once the tag was deleted.
    pub manifest: Option<Digest>,
}

/// The condition a tag move is made under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagCondition {
    /// Move whatever it points at now.
    Always,
    /// Only if the tag does not exist.
    Absent,
    /// Only if it points at this manifest.
    Matches(Digest),
    /// Only if it points at this manifest, moved to it by this generation's move.
    MatchesAt(Digest, u64),
}

impl TagCondition {
    /// What the tag was expected to point at, as a refusal names it.
    fn expected(&self) -> String {
        match self {
            Self::Always | Self::Absent => "nothing".into(),
            Self::Matches(expected) => expected.to_string(),
            Self::MatchesAt(expected, generation) => {
                format!("{expected} (generation {generation})")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct GcLease {
    owner: String,
    expires: DateTime<Utc>,
}

/// Collects a blob's bytes as they arrive, hashing them on the way and refusing more than the cap.
#[derive(Debug)]
pub struct BlobWriter {
    expected: Digest,
    limit: u64,
    hasher: blake3::Hasher,
    /// The bytes in pieces of at least [`PIECE`] (but the last), stored as they are: not one
    /// growing buffer, which holds up to three times a blob's size while it doubles, nor every
    /// piece as it came, which tiny ones from a hostile sender would multiply.
    pieces: Vec<Bytes>,
    /// Small pieces gathered until they make one.
    gathering: bytes::BytesMut,
    len: u64,
}

/// Pieces of an upload smaller than this are gathered into one of this size.
const PIECE: usize = 1 << 20;

/// Bytes proven to hash to `digest`; only these reach `blobs/`.
#[derive(Debug)]
pub struct VerifiedBlob {
    digest: Digest,
    pieces: Vec<Bytes>,
    len: u64,
}

impl VerifiedBlob {
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl BlobWriter {
    pub fn new(expected: Digest, limit: u64) -> Self {
        Self {
            expected,
            limit,
            hasher: blake3::Hasher::new(),
            pieces: Vec::new(),
            gathering: bytes::BytesMut::new(),
            len: 0,
        }
    }

    pub fn append(&mut self, piece: Bytes) -> Result<()> {
        if self.len + piece.len() as u64 > self.limit {
            return Err(StorageError::TooLarge {
                digest: self.expected,
                limit: self.limit,
            });
        }
        self.hasher.update(&piece);
        self.len += piece.len() as u64;
        if piece.len() >= PIECE {
            self.gathered();
            self.pieces.push(piece);
        } else {
            if self.gathering.capacity() == 0 {
                self.gathering.reserve(PIECE);
            }
            self.gathering.extend_from_slice(&piece);
            if self.gathering.len() >= PIECE {
                self.gathered();
            }
        }
        Ok(())
    }

    /// Ends the piece being gathered.
    fn gathered(&mut self) {
        if !self.gathering.is_empty() {
            self.pieces.push(self.gathering.split().freeze());
        }
    }

    pub fn finish(mut self) -> Result<VerifiedBlob> {
        self.gathered();
        let actual = Digest::from(self.hasher.finalize());
        if actual != self.expected {
            return Err(StorageError::DigestMismatch {
                expected: self.expected,
                actual,
            });
        }
        Ok(VerifiedBlob {
            digest: actual,
            pieces: self.pieces,
            len: self.len,
        })
    }
}

/// Where a client sends one blob's bytes.
#[derive(Debug, Clone)]
pub enum UploadDestination {
    /// Through the registry itself (`PUT .../blobs/{digest}`), which verifies as bytes arrive.
    Registry,
    /// Straight to object storage; the registry verifies when the upload is committed.
    Presigned { url: url::Url, id: String },
}

#[derive(Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    /// For backends that can presign (S3): the signer and the prefix its paths need.
    signer: Option<(Arc<dyn Signer>, Path)>,
    description: String,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("description", &self.description)
            .finish()
    }
}

fn is_not_found(error: &object_store::Error) -> bool {
    matches!(error, object_store::Error::NotFound { .. })
}

impl Storage {
    pub fn new(store: Arc<dyn ObjectStore>, description: impl Into<String>) -> Self {
        Self {
            store,
            signer: None,
            description: description.into(),
        }
    }

    /// Lets clients move blob bytes straight to and from the object store with presigned URLs.
    /// `prefix` is prepended to every key when signing (the store itself may already apply it).
    pub fn with_signer(mut self, signer: Arc<dyn Signer>, prefix: Path) -> Self {
        self.signer = Some((signer, prefix));
        self
    }

    pub fn description(&self) -> &str {
        &self.description
    }

    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    async fn read(&self, key: Key<'_>) -> Result<Option<Bytes>> {
        match self.store.get(&key.path()).await {
            Ok(result) => Ok(Some(result.bytes().await?)),
            Err(error) if is_not_found(&error) => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    async fn read_json<T: for<'de> Deserialize<'de>>(&self, key: Key<'_>) -> Result<Option<T>> {
        let Some(bytes) = self.read(key).await? else {
            return Ok(None);
        };
        parse_json(key, &bytes).map(Some)
    }

    /// The newest of a series of generations, each written once, create-only (a tag's moves,
    /// the collection lease), and its bytes; `None` for an empty series. Only the series' own
    /// keys count (nothing else stored below it), and a generation pruned between the listing
    /// and the read means a newer one exists: the series is listed again, a bounded number of
    /// times.
    async fn newest_generation<'k>(
        &self,
        series: Key<'_>,
        generation_key: impl Fn(u64) -> Key<'k>,
    ) -> Result<Option<(u64, Bytes)>> {
        for _ in 0..16 {
            let Some(generation) = (self.list(series).await?)
                .iter()
                .filter_map(|meta| {
                    let generation = meta.location.filename()?.parse::<u64>().ok()?;
                    (meta.location == generation_key(generation).path()).then_some(generation)
                })
                .max()
            else {
                return Ok(None);
            };
            if let Some(bytes) = self.read(generation_key(generation)).await? {
                return Ok(Some((generation, bytes)));
            }
        }
        Err(StorageError::Contended {
            what: series.path().to_string(),
        })
    }

    /// Checks the store refuses to create what exists: every invariant (a version never
    /// changes, one of two concurrent publishes wins, one collector at a time) rests on it, and
    /// an S3-compatible store that ignores `If-None-Match` would overwrite silently.
    pub async fn check_conditional_writes(&self) -> Result<()> {
        let id = format!("{:032x}", rand::random::<u128>());
        let probe = Key::Probe(&id);
        self.create(probe, b"probe".to_vec()).await?;
        let again = self.create(probe, b"probe".to_vec()).await;
        if let Err(error) = self.delete(probe).await {
            tracing::warn!(%error, key = %probe.path(), "removing the conditional-write probe");
        }
        if again? {
            return Err(StorageError::Unconditional);
        }
        Ok(())
    }

    /// The store's own time: when it says a probe written now was written. Object ages are
    /// measured in it; a host whose clock runs ahead would otherwise find young objects old.
    pub async fn clock(&self) -> Result<DateTime<Utc>> {
        let id = format!("{:032x}", rand::random::<u128>());
        let probe = Key::Probe(&id);
        self.create(probe, b"clock".to_vec()).await?;
        let written = self.store.head(&probe.path()).await;
        if let Err(error) = self.delete(probe).await {
            tracing::warn!(%error, key = %probe.path(), "removing the clock probe");
        }
        Ok(written?.last_modified)
    }

    /// Writes `bytes` only if nothing is at `key`; `Ok(false)` if something was.
    async fn create(&self, key: Key<'_>, bytes: Vec<u8>) -> Result<bool> {
        let options = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&key.path(), PutPayload::from(bytes), options)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(error) => Err(error.into()),
        }
    }

    async fn delete(&self, key: Key<'_>) -> Result<()> {
        match self.store.delete(&key.path()).await {
            Ok(()) => Ok(()),
            Err(error) if is_not_found(&error) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    async fn list(&self, key: Key<'_>) -> Result<Vec<ObjectMeta>> {
        Ok(self.store.list(Some(&key.path())).try_collect().await?)
    }

    /// The children of `key` that parse as names, each read by `read`, 16 at a time and in order
    /// (on S3 each read is a round trip); those it finds nothing for are left out.
    async fn read_children<'a, N: std::str::FromStr, T>(
        &'a self,
        key: Key<'_>,
        read: impl Fn(N) -> BoxFuture<'a, Result<Option<T>>>,
    ) -> Result<Vec<T>> {
        let names: Vec<N> = (self.list_children(key).await?)
            .iter()
            .filter_map(|n| n.parse().ok())
            .collect();
        let read: Vec<Option<T>> = futures::stream::iter(names)
            .map(read)
            .buffered(16)
            .try_collect()
            .await?;
        Ok(read.into_iter().flatten().collect())
    }

    /// The immediate children of a prefix, as names.
    async fn list_children(&self, key: Key<'_>) -> Result<Vec<String>> {
        let listing = self.store.list_with_delimiter(Some(&key.path())).await?;
        Ok(listing
            .common_prefixes
            .iter()
            .chain(listing.objects.iter().map(|o| &o.location))
            .filter_map(|p| p.filename().map(str::to_owned))
            .collect())
    }

    // ----- blobs -----

    pub async fn blob_meta(&self, digest: &Digest) -> Result<Option<ObjectMeta>> {
        match self.store.head(&Key::Blob(digest).path()).await {
            Ok(meta) => Ok(Some(meta)),
            Err(error) if is_not_found(&error) => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    /// Stores a blob whose bytes were verified as they arrived, for `repo`.
    pub async fn put_blob(&self, repo: &Repository, blob: VerifiedBlob) -> Result<()> {
        // Content-addressed: if it is there already, it is these bytes.
        let options = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let digest = blob.digest;
        match self
            .store
            .put_opts(
                &Key::Blob(&digest).path(),
                blob.pieces.into_iter().collect::<PutPayload>(),
                options,
            )
            .await
        {
            Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => {
                self.link_blob(repo, &digest).await
            }
            Err(error) => Err(error.into()),
        }
    }

    /// Makes a blob part of `repo`, for whoever sent its bytes there: content is stored once,
    /// but a repository may name in a manifest, and serve, only blobs sent to it (knowing a
    /// digest is not holding the bytes).
    async fn link_blob(&self, repo: &Repository, digest: &Digest) -> Result<()> {
        self.store
            .put(
                &Key::BlobLink(repo, digest).path(),
                PutPayload::from_static(b""),
            )
            .await?;
        Ok(())
    }

    pub async fn get_blob(&self, digest: &Digest, range: Option<GetRange>) -> Result<GetResult> {
        let options = GetOptions {
            range,
            ..Default::default()
        };
        self.store
            .get_opts(&Key::Blob(digest).path(), options)
            .await
            .map_err(|error| match error {
                error if is_not_found(&error) => StorageError::NotFound {
                    what: format!("blob {digest}"),
                },
                error => error.into(),
            })
    }

    /// A presigned GET URL for a blob, on backends that presign.
    pub async fn blob_download_url(&self, digest: &Digest) -> Result<Option<url::Url>> {
        let Some((signer, prefix)) = &self.signer else {
            return Ok(None);
        };
        let path = join(prefix, &Key::Blob(digest).path());
        Ok(Some(
            signer
                .signed_url(http::Method::GET, &path, PRESIGN_TTL)
                .await?,
        ))
    }

    /// Where a client should send a blob: straight to object storage when it can presign.
    pub async fn upload_destination(
        &self,
        repo: &Repository,
        digest: &Digest,
    ) -> Result<UploadDestination> {
        let Some((signer, prefix)) = &self.signer else {
            return Ok(UploadDestination::Registry);
        };
        let id = format!("{:032x}", rand::random::<u128>());
        let path = join(prefix, &Key::Upload(repo, digest, &id).path());
        let url = signer
            .signed_url(http::Method::PUT, &path, PRESIGN_TTL)
            .await?;
        Ok(UploadDestination::Presigned { url, id })
    }

    /// Verifies a direct upload to `repo` and makes it the blob. The upload is first copied
    /// (server side) to a key of this commit's own, which neither the uploader's presigned URL
    /// nor another commit of the same upload can write, and that copy is what is hashed and
    /// becomes the blob: bytes swapped in after the check can never reach `blobs/`.
    pub async fn commit_upload(
        &self,
        repo: &Repository,
        digest: &Digest,
        id: &str,
        max_bytes: u64,
    ) -> Result<()> {
        let staged = Key::Upload(repo, digest, id).path();
        let commit = format!("{id}.{:016x}", rand::random::<u64>());
        let verifying = Key::Verifying(repo, digest, &commit).path();
        let gone = |error: object_store::Error| match error {
            error if is_not_found(&error) => StorageError::NotFound {
                what: format!("upload {id} of blob {digest}"),
            },
            error => error.into(),
        };
        let meta = self.store.head(&staged).await.map_err(gone)?;
        if meta.size > max_bytes {
            self.discard(&staged).await;
            return Err(StorageError::TooLarge {
                digest: *digest,
                limit: max_bytes,
            });
        }
        // Gone since the head: another commit of the same upload took it.
        self.store.copy(&staged, &verifying).await.map_err(gone)?;
        self.discard(&staged).await;
        let outcome = self.verify_and_promote(digest, &verifying, max_bytes).await;
        self.discard(&verifying).await;
        outcome?;
        self.link_blob(repo, digest).await
    }

    /// Deletes an upload's leftover. A failure is logged, not returned: the commit's own outcome
    /// (stored, too large, the wrong bytes) is the answer, and collection removes leftovers.
    async fn discard(&self, location: &Path) {
        if let Err(error) = self.delete_object(location).await {
            tracing::warn!(%error, key = %location, "removing an upload's leftover failed");
        }
    }

    async fn verify_and_promote(
        &self,
        digest: &Digest,
        verifying: &Path,
        max_bytes: u64,
    ) -> Result<()> {
        let result = self.store.get(verifying).await?;
        if result.meta.size > max_bytes {
            return Err(StorageError::TooLarge {
                digest: *digest,
                limit: max_bytes,
            });
        }
        let mut hasher = blake3::Hasher::new();
        let mut stream = result.into_stream();
        while let Some(piece) = stream.next().await {
            hasher.update(&piece?);
        }
        let actual = Digest::from(hasher.finalize());
        if actual != *digest {
            return Err(StorageError::DigestMismatch {
                expected: *digest,
                actual,
            });
        }
        // Content-addressed: a blob already there is these same bytes; never overwrite it.
        if self.blob_meta(digest).await?.is_none() {
            self.store
                .copy(verifying, &Key::Blob(digest).path())
                .await?;
        }
        Ok(())
    }

    /// Which of `digests` `repo` lacks: a blob counts once stored and sent to (or published in)
    /// that repository, see [`Storage::link_blob`].
    pub async fn missing_blobs(
        &self,
        repo: &Repository,
        digests: &[Digest],
    ) -> Result<Vec<Digest>> {
        let unique: BTreeSet<Digest> = digests.iter().copied().collect();
        let present = futures::stream::iter(unique.iter().copied())
            .map(|digest| async move {
                let present = self.exists(Key::BlobLink(repo, &digest)).await?
                    && self.blob_meta(&digest).await?.is_some();
                Ok::<_, StorageError>((digest, present))
            })
            .buffer_unordered(16)
            .try_collect::<Vec<_>>()
            .await?;
        let missing: HashSet<Digest> = present
            .into_iter()
            .filter(|(_, present)| !present)
            .map(|(d, _)| d)
            .collect();
        // Keep the caller's order.
        let mut seen = HashSet::new();
        Ok(digests
            .iter()
            .copied()
            .filter(|d| missing.contains(d) && seen.insert(*d))
            .collect())
    }

    // ----- manifests -----

    /// Stores a manifest (canonical JSON) and returns its digest. Rewriting an identical manifest
    /// refreshes its age, which garbage collection relies on (see [`Storage::publish`]).
    pub async fn put_manifest(&self, manifest: &Manifest) -> Result<Digest> {
        let bytes = manifest.to_canonical_json();
        let digest = Digest::of(&bytes);
        self.store
            .put(&Key::Manifest(&digest).path(), PutPayload::from(bytes))
            .await?;
        Ok(digest)
    }

    /// Reads a manifest, re-verifying that its bytes hash to its name.
    pub async fn get_manifest(&self, digest: &Digest) -> Result<Manifest> {
        let key = Key::Manifest(digest);
        let bytes = self
            .read(key)
            .await?
            .ok_or_else(|| StorageError::NotFound {
                what: format!("manifest {digest}"),
            })?;
        let corrupt = |detail: String| StorageError::Corrupt {
            key: key.path().to_string(),
            detail,
        };
        let actual = Digest::of(&bytes);
        if actual != *digest {
            return Err(corrupt(format!("its bytes hash to {actual}")));
        }
        Manifest::from_json(&bytes).map_err(|e| corrupt(e.to_string()))
    }

    // ----- versions -----

    /// What a version holds: `Some(None)` is a deleted version, kept as a tombstone.
    async fn version_pointer(
        &self,
        repo: &Repository,
        version: &Version,
    ) -> Result<Option<Option<Digest>>> {
        let pointer: Option<Pointer> = self.read_json(Key::Version(repo, version)).await?;
        Ok(pointer.map(|p| p.manifest))
    }

    pub async fn version(&self, repo: &Repository, version: &Version) -> Result<Option<Digest>> {
        Ok(self.version_pointer(repo, version).await?.flatten())
    }

    /// Makes `manifest` safe to reference from `repo`: (re)writes it, waits out a running garbage
    /// collection, checks every blob it names is present in the repository (sent there: see
    /// [`Storage::link_blob`]) with the size it says, and links the manifest to the repository
    /// (reads through a repository see only linked content). Returns the manifest's digest.
    ///
    /// Ordering against garbage collection: the manifest is (re)written first, so it is young and
    /// protects its blobs from any collection that starts after this point; then, if a collection
    /// is already running, we wait for it to end before checking that the manifest and the blobs
    /// are present, so nothing it deletes can go unnoticed.
    async fn ensure_publishable(
        &self,
        repo: &Repository,
        manifest: &Manifest,
        linked: Linked,
    ) -> Result<Digest> {
        let digest = self.put_manifest(manifest).await?;
        self.wait_for_gc().await?;
        // A collection that ran meanwhile may have taken the manifest out of the repository (no
        // version or tag referenced it): that stands.
        if linked == Linked::Required && !self.exists(Key::ManifestLink(repo, &digest)).await? {
            return Err(StorageError::NotFound {
                what: format!("manifest {digest} in {repo}"),
            });
        }
        // A collection that listed the manifests before that write saw this one old (it may
        // have been stored, unreferenced, long before) and may have deleted it since. Any such
        // collection has ended now, and any later one sees it young.
        if !self.exists(Key::Manifest(&digest)).await? {
            self.put_manifest(manifest).await?;
        }
        let blobs = manifest.blobs();
        let missing = self
            .missing_blobs(repo, &blobs.iter().map(|b| b.digest).collect::<Vec<_>>())
            .await?;
        if let Some(first) = missing.first() {
            return Err(StorageError::MissingBlobs {
                count: missing.len(),
                first: *first,
            });
        }
        // Side by side, as `missing_blobs` asks: on S3 each is a round trip, and a publish must
        // end well within a collection's grace.
        let sizes: Vec<(Digest, u64)> = blobs.iter().map(|b| (b.digest, b.size)).collect();
        futures::stream::iter(sizes)
            .map(|(digest, size)| async move {
                match self.blob_meta(&digest).await? {
                    Some(meta) if meta.size != size => Err(StorageError::InvalidManifest(format!(
                        "blob {digest} holds {} bytes, the manifest says {size}",
                        meta.size
                    ))),
                    _ => Ok(()),
                }
            })
            .buffer_unordered(16)
            .try_collect::<Vec<()>>()
            .await?;
        self.link_manifest(repo, &digest).await?;
        Ok(digest)
    }

    /// Marks a manifest as part of `repo` (published there).
    async fn link_manifest(&self, repo: &Repository, digest: &Digest) -> Result<()> {
        self.store
            .put(
                &Key::ManifestLink(repo, digest).path(),
                PutPayload::from_static(b""),
            )
            .await?;
        Ok(())
    }

    /// Whether an object is stored; for a link, whether content is part of its repository
    /// (published there).
    pub async fn exists(&self, key: Key<'_>) -> Result<bool> {
        match self.store.head(&key.path()).await {
            Ok(_) => Ok(true),
            Err(error) if is_not_found(&error) => Ok(false),
            Err(error) => Err(error.into()),
        }
    }

    /// Publishes `repo@version` → `manifest`, create-only. The manifest and every blob it references
    /// must be present; the first of two concurrent publishes wins, the other gets `VersionExists`.
    /// A deleted version's name is never reused.
    pub async fn publish(
        &self,
        repo: &Repository,
        version: &Version,
        manifest: &Manifest,
    ) -> Result<Digest> {
        let exists = |deleted: bool| StorageError::VersionExists {
            reference: format!("{repo}@{version}"),
            deleted,
        };
        if let Some(pointer) = self.version_pointer(repo, version).await? {
            return Err(exists(pointer.is_none()));
        }
        let digest = self.ensure_publishable(repo, manifest, Linked::New).await?;
        let pointer = json_bytes(&Pointer {
            manifest: Some(digest),
        });
        if !self.create(Key::Version(repo, version), pointer).await? {
            // The loser linked its manifest too: unless something else here holds it, the
            // content it was told did not publish must not be readable or taggable by digest.
            if self.holders(repo, &digest).await?.is_empty() {
                self.unlink_manifest(repo, &digest).await?;
            }
            return Err(exists(false));
        }
        // Again: a deletion of another version of this content, deciding meanwhile that nothing
        // else held it, may have taken the link.
        self.link_manifest(repo, &digest).await?;
        Ok(digest)
    }

    /// Deletes a version, leaving a tombstone so the name is never published again with other
    /// content. If nothing else in the repository holds its manifest, the manifest stops being
    /// the repository's at once (its link goes); it and the blobs go at the next garbage
    /// collection if no repository uses them. Refused while a tag points at its content and no
    /// other version holds it: the tag would go on serving what was deleted.
    pub async fn delete_version(&self, repo: &Repository, version: &Version) -> Result<()> {
        let Some(digest) = self.version(repo, version).await? else {
            return Err(StorageError::NotFound {
                what: format!("{repo}@{version}"),
            });
        };
        let in_use = |by: String| StorageError::InUse {
            what: format!("{repo}@{version}"),
            by,
        };
        let tagged = |tags: Vec<String>| format!("tag {}", tags.join(", "));
        let before = self.holders(repo, &digest).await?;
        if !before.versions.iter().any(|v| v != version) && !before.tags.is_empty() {
            return Err(in_use(tagged(before.tags)));
        }
        let pointer = |manifest| PutPayload::from(json_bytes(&Pointer { manifest }));
        let key = Key::Version(repo, version).path();
        self.store.put(&key, pointer(None)).await?;
        // Decided again once the tombstone is written: deletions of two versions of one content
        // at once each saw the other still there. Whichever finds no version left after its own
        // write undoes it if a tag points there, so a tag never outlives the last version of its
        // content (both may be refused, never both done).
        let after = self.holders(repo, &digest).await?;
        if after.versions.iter().any(|v| v != version) {
            return Ok(());
        }
        if after.versions.contains(version) {
            // A deletion of this same version undid its own, and so this one.
            return Err(in_use(
                "a tag, as a deletion of it at the same time found".into(),
            ));
        }
        if !after.tags.is_empty() {
            self.store.put(&key, pointer(Some(digest))).await?;
            // Published again, as a publish does: a collection that ran while no version held
            // the content may have deleted it (the tag having moved away meanwhile); then the
            // deletion stands.
            let restored = match self.get_manifest(&digest).await {
                Ok(manifest) => self.ensure_publishable(repo, &manifest, Linked::New).await,
                Err(error) => Err(error),
            };
            match restored {
                Ok(_) => return Err(in_use(tagged(after.tags))),
                Err(StorageError::NotFound { .. } | StorageError::MissingBlobs { .. }) => {}
                // Not checked (a collection held on past the wait, say): the restore stands
                // only while a tag points there, which keeps the content from collection.
                Err(error) if !self.holders(repo, &digest).await?.tags.is_empty() => {
                    return Err(error);
                }
                Err(_) => {}
            }
            // The content went, or no tag holds it any more: the deletion stands after all.
            self.store.put(&key, pointer(None)).await?;
        }
        // Nothing else holds it: its content is no longer the repository's to tag or read by
        // digest (collection would have taken the link; a tag moved by digest meanwhile would
        // have served deleted content). A tag moved onto it between the check above and the
        // link's removal is the window left.
        self.unlink_manifest(repo, &digest).await
    }

    /// The live versions and the tags of `repo` that point at `digest`.
    async fn holders(&self, repo: &Repository, digest: &Digest) -> Result<Holders> {
        let versions = (self.versions(repo).await?)
            .into_iter()
            .filter(|(_, d)| d == digest)
            .map(|(version, _)| version)
            .collect();
        let tags = (self.tags(repo).await?)
            .into_iter()
            .filter(|(_, head)| head.manifest == Some(*digest))
            .map(|(tag, _)| tag.to_string())
            .collect();
        Ok(Holders { versions, tags })
    }

    /// Takes a manifest out of `repo`, found unheld. A publish of the same content meanwhile
    /// links it again once its version exists; one whose version came before the removal is
    /// seen here, and the link put back.
    async fn unlink_manifest(&self, repo: &Repository, digest: &Digest) -> Result<()> {
        self.delete(Key::ManifestLink(repo, digest)).await?;
        if !self.holders(repo, digest).await?.versions.is_empty() {
            self.link_manifest(repo, digest).await?;
        }
        Ok(())
    }

    /// The names under `repo`'s versions (deleted ones' tombstones included) in reading order,
    /// from one listing: nothing is read.
    pub async fn version_names(&self, repo: &Repository) -> Result<Vec<Version>> {
        let mut names: Vec<Version> = (self.list_children(Key::Versions(repo)).await?)
            .iter()
            .filter_map(|n| n.parse().ok())
            .collect();
        names.sort_by(|a, b| a.precedence().cmp(&b.precedence()));
        Ok(names)
    }

    pub async fn versions<'a>(&'a self, repo: &'a Repository) -> Result<Vec<(Version, Digest)>> {
        self.read_children(Key::Versions(repo), |version: Version| {
            async move { Ok(self.version(repo, &version).await?.map(|d| (version, d))) }.boxed()
        })
        .await
    }

    // ----- tags -----

    pub async fn tag(&self, repo: &Repository, tag: &Tag) -> Result<Option<TagHead>> {
        let generation_key = |generation| Key::TagGeneration(repo, tag, generation);
        let Some((generation, bytes)) = self
            .newest_generation(Key::Tag(repo, tag), generation_key)
            .await?
        else {
            return Ok(None);
        };
        let pointer: Pointer = parse_json(generation_key(generation), &bytes)?;
        Ok(Some(TagHead {
            generation,
            manifest: pointer.manifest,
        }))
    }

    /// Points `tag` at `manifest` (or deletes it with `None`) if `condition` holds.
    pub async fn move_tag(
        &self,
        repo: &Repository,
        tag: &Tag,
        manifest: Option<Digest>,
        condition: TagCondition,
    ) -> Result<TagHead> {
        let reference = format!("{repo}@{tag}");
        if let Some(digest) = manifest {
            // A tag points only at what was published in its own repository, and whose blobs
            // are all still there (the same checks as a publish, against garbage collection too).
            if !self.exists(Key::ManifestLink(repo, &digest)).await? {
                return Err(StorageError::NotFound {
                    what: format!("manifest {digest} in {repo}"),
                });
            }
            let content = self.get_manifest(&digest).await?;
            self.ensure_publishable(repo, &content, Linked::Required)
                .await?;
        }
        loop {
            let head = self.tag(repo, tag).await?;
            let current = head.and_then(|h| h.manifest);
            let moved = |expected: String| StorageError::TagMoved {
                reference: reference.clone(),
                expected,
                current: current.map_or("nothing".into(), |d| d.to_string()),
            };
            let holds = match condition {
                TagCondition::Always => true,
                TagCondition::Absent => current.is_none(),
                TagCondition::Matches(expected) => current == Some(expected),
                TagCondition::MatchesAt(expected, at) => {
                    current == Some(expected) && head.map(|h| h.generation) == Some(at)
                }
            };
            if !holds {
                return Err(moved(condition.expected()));
            }
            if manifest.is_none() && current.is_none() {
                return Err(StorageError::NotFound {
                    what: format!("tag {reference}"),
                });
            }
            let generation = head.map_or(1, |h| h.generation + 1);
            let pointer = json_bytes(&Pointer { manifest });
            if self
                .create(Key::TagGeneration(repo, tag, generation), pointer)
                .await?
            {
                // A mover that stalled while others moved far past could recreate a generation
                // already pruned. Pruning keeps the newest TAG_HISTORY, so a generation that
                // close to the newest was never pruned, never written before: the move counts,
                // even if others have moved on from it since. (Further behind, a first write is
                // taken for a stale one: it happened, but is reported lost, or written again.)
                let newest = self.tag(repo, tag).await?.map_or(0, |h| h.generation);
                if newest <= generation + TAG_HISTORY {
                    if newest == generation {
                        self.prune_tag(repo, tag, generation).await;
                    }
                    return Ok(TagHead {
                        generation,
                        manifest,
                    });
                }
            }
            // Someone else created this generation first (or it was a stale recreation).
            if condition != TagCondition::Always {
                let now = self.tag(repo, tag).await?.and_then(|h| h.manifest);
                return Err(StorageError::TagMoved {
                    reference,
                    expected: condition.expected(),
                    current: now.map_or("nothing".into(), |d| d.to_string()),
                });
            }
        }
    }

    async fn prune_tag(&self, repo: &Repository, tag: &Tag, newest: u64) {
        let Ok(generations) = self.list(Key::Tag(repo, tag)).await else {
            return;
        };
        for meta in generations {
            let old = meta
                .location
                .filename()
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|g| g + TAG_HISTORY < newest);
            if old && let Err(error) = self.store.delete(&meta.location).await {
                tracing::warn!(%error, location = %meta.location, "pruning an old tag generation failed");
            }
        }
    }

    /// The tags of `repo` that point at something (a deleted tag leaves an empty generation).
    pub async fn tags<'a>(&'a self, repo: &'a Repository) -> Result<Vec<(Tag, TagHead)>> {
        self.read_children(Key::Tags(repo), |tag: Tag| {
            async move {
                let head = self.tag(repo, &tag).await?;
                Ok(head.filter(|h| h.manifest.is_some()).map(|h| (tag, h)))
            }
            .boxed()
        })
        .await
    }

    // ----- namespaces -----

    /// Every namespace anything was stored for (blobs sent for a push included).
    pub async fn namespaces(&self) -> Result<Vec<Namespace>> {
        let mut names: Vec<Namespace> = self
            .list_children(Key::Repos)
            .await?
            .into_iter()
            .filter_map(|n| n.parse().ok())
            .collect();
        names.sort();
        Ok(names)
    }

    /// The cartridges of a namespace that hold something to pull: a name whose versions were
    /// all deleted (their tombstones stay) and that no tag points from is not listed.
    pub async fn names(
        &self,
        namespace: &Namespace,
    ) -> Result<Vec<cartridge_schemas::reference::Name>> {
        // The checks run side by side: on S3 each is a round trip.
        let kept = futures::stream::iter(self.repositories(namespace).await?)
            .map(
                |repo| async move { Ok::<_, StorageError>((self.has_content(&repo).await?, repo)) },
            )
            .buffer_unordered(16)
            .try_collect::<Vec<_>>()
            .await?;
        let mut names: Vec<_> = kept
            .into_iter()
            .filter_map(|(content, repo)| content.then_some(repo.name))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Whether a namespace holds a cartridge to pull (see [`Storage::names`]); stops at the first.
    pub async fn has_names(&self, namespace: &Namespace) -> Result<bool> {
        for repo in self.repositories(namespace).await? {
            if self.has_content(&repo).await? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Every cartridge stored under a namespace, tombstones only or not.
    pub async fn repositories(&self, namespace: &Namespace) -> Result<Vec<Repository>> {
        Ok(self
            .list_children(Key::Namespace(namespace))
            .await?
            .into_iter()
            .filter_map(|name| name.parse().ok())
            .map(|name| Repository {
                namespace: namespace.clone(),
                name,
            })
            .collect())
    }

    /// Stops at the first live version, so a listing costs about one read per name.
    async fn has_content(&self, repo: &Repository) -> Result<bool> {
        for name in self.list_children(Key::Versions(repo)).await? {
            if let Ok(version) = name.parse::<Version>()
                && self.version(repo, &version).await?.is_some()
            {
                return Ok(true);
            }
        }
        Ok(!self.tags(repo).await?.is_empty())
    }

    pub async fn namespace_settings(&self, namespace: &Namespace) -> Result<NamespaceSettings> {
        Ok(self
            .read_json(Key::NamespaceSettings(namespace))
            .await?
            .unwrap_or_default())
    }

    pub async fn set_namespace_settings(
        &self,
        namespace: &Namespace,
        settings: &NamespaceSettings,
    ) -> Result<()> {
        let bytes = json_bytes(settings);
        self.store
            .put(
                &Key::NamespaceSettings(namespace).path(),
                PutPayload::from(bytes),
            )
            .await?;
        Ok(())
    }

    // ----- garbage collection support -----

    /// The manifests `repo`'s versions and tags point at.
    pub async fn referenced_manifests(&self, repo: &Repository) -> Result<Vec<Digest>> {
        let versions = self.versions(repo).await?.into_iter().map(|(_, d)| d);
        let tags = self
            .tags(repo)
            .await?
            .into_iter()
            .filter_map(|(_, h)| h.manifest);
        Ok(versions.chain(tags).collect())
    }

    /// Every object under `key`, as the backend pages through them.
    pub fn listing(&self, key: Key<'_>) -> BoxStream<'_, Result<ObjectMeta>> {
        self.store
            .list(Some(&key.path()))
            .map_err(Into::into)
            .boxed()
    }

    pub async fn delete_object(&self, location: &Path) -> Result<()> {
        match self.store.delete(location).await {
            Ok(()) => Ok(()),
            Err(error) if is_not_found(&error) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    /// Takes the collection lease; `false` if a live one is held. Each change of the lease is a
    /// new generation written create-only, so of collectors racing for it exactly one wins, on
    /// every backend.
    pub async fn acquire_gc_lease(&self, owner: &str) -> Result<Option<DateTime<Utc>>> {
        let (generation, current) = self.gc_lease().await?;
        if current.is_some_and(|l| l.expires > Utc::now()) {
            return Ok(None);
        }
        let expires = Utc::now() + GC_LEASE_TTL;
        Ok(self
            .write_gc_lease(generation + 1, owner, expires)
            .await?
            .then_some(expires))
    }

    /// Extends the lease `owner` holds and returns its new expiry; fails with `GcLeaseLost` if
    /// someone else holds it now or it lapsed at any moment (a publish may then have gone ahead
    /// without waiting, on content this collection's earlier listing holds as unreferenced), so
    /// the collection stops before deleting anything more.
    pub async fn renew_gc_lease(&self, owner: &str) -> Result<DateTime<Utc>> {
        let (generation, current) = self.gc_lease().await?;
        let Some(held) = current.filter(|l| l.owner == owner && l.expires > Utc::now()) else {
            return Err(StorageError::GcLeaseLost);
        };
        let expires = Utc::now() + GC_LEASE_TTL;
        if !self.write_gc_lease(generation + 1, owner, expires).await?
            // Checked after the write: a pause before it could have outlasted the lease.
            || Utc::now() >= held.expires
        {
            return Err(StorageError::GcLeaseLost);
        }
        Ok(expires)
    }

    /// Gives the lease up, if `owner` still holds it: a generation that has already expired.
    pub async fn release_gc_lease(&self, owner: &str) -> Result<()> {
        let (generation, current) = self.gc_lease().await?;
        if current.is_some_and(|l| l.owner == owner) {
            self.write_gc_lease(generation + 1, owner, DateTime::<Utc>::MIN_UTC)
                .await?;
        }
        Ok(())
    }

    /// The newest generation of the lease and what it holds (an unreadable one holds nothing,
    /// and is taken over).
    async fn gc_lease(&self) -> Result<(u64, Option<GcLease>)> {
        Ok(self
            .newest_generation(Key::GcLeases, Key::GcLease)
            .await?
            .map_or((0, None), |(generation, bytes)| {
                (generation, serde_json::from_slice(&bytes).ok())
            }))
    }

    /// Writes `generation` of the lease; `false` unless it is ours and, once written, still the
    /// newest. (A writer that stalled while others wrote past it and pruned that generation could
    /// write it again, and a create whose response was lost reads as someone else's.) Prunes
    /// the generations before it.
    pub(crate) async fn write_gc_lease(
        &self,
        generation: u64,
        owner: &str,
        expires: DateTime<Utc>,
    ) -> Result<bool> {
        let lease = GcLease {
            owner: owner.to_owned(),
            expires,
        };
        if !self
            .create(Key::GcLease(generation), json_bytes(&lease))
            .await?
            && self
                .read_json::<GcLease>(Key::GcLease(generation))
                .await
                .ok()
                .flatten()
                .as_ref()
                != Some(&lease)
        {
            return Ok(false);
        }
        if self.gc_lease().await?.0 != generation {
            return Ok(false);
        }
        for old in generation.saturating_sub(4)..generation {
            if let Err(error) = self.delete(Key::GcLease(old)).await {
                tracing::warn!(%error, generation = old, "pruning an old lease generation failed");
            }
        }
        Ok(true)
    }

    async fn gc_running(&self) -> Result<bool> {
        Ok(self
            .gc_lease()
            .await?
            .1
            .is_some_and(|l| l.expires > Utc::now()))
    }

    /// Waits a bounded time (under an API gateway's 29 s, as the registry may run behind one),
    /// then answers 503 and the client tries again.
    async fn wait_for_gc(&self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + GC_WAIT;
        loop {
            if !self.gc_running().await? {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(StorageError::GcRunning);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// Canonical JSON of the small records the registry writes (pointers, settings, leases), which
/// have no maps with non-string keys and so always serialize.
fn json_bytes<T: Serialize>(value: &T) -> Vec<u8> {
    canonical::to_canonical_json(value).expect("registry records always serialize")
}

/// `bytes` read from `key`, as JSON; bytes that are not are a corrupt object.
fn parse_json<T: for<'de> Deserialize<'de>>(key: Key<'_>, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| StorageError::Corrupt {
        key: key.path().to_string(),
        detail: e.to_string(),
    })
}

/// `path` under `prefix`, part by part: both are already encoded, and parsing their text
/// again would encode a prefix's `%7E` a second time, signing URLs for keys nothing stores.
fn join(prefix: &Path, path: &Path) -> Path {
    prefix.parts().chain(path.parts()).collect()
}

/// A `bytes=` range header value of one range, in object_store's terms. `None` for anything we
/// do not serve as a range (which then gets the whole blob, as HTTP allows).
pub fn parse_range(header: &str) -> Option<GetRange> {
    let spec = header.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (start, end) = spec.split_once('-')?;
    match (start.trim(), end.trim()) {
        ("", suffix) => Some(GetRange::Suffix(suffix.parse().ok()?)),
        (start, "") => Some(GetRange::Offset(start.parse().ok()?)),
        (start, end) => {
            let (start, end): (u64, u64) = (start.parse().ok()?, end.parse().ok()?);
            (end >= start).then(|| {
                GetRange::Bounded(Range {
                    start,
                    // The last byte may be named as u64::MAX: "to the end".
                    end: end.saturating_add(1),
                })
            })
        }
    }
}

/// The bytes a range selects from an object of `size` bytes; `None` if it selects none.
pub fn resolve_range(range: &GetRange, size: u64) -> Option<Range<u64>> {
    let resolved = match range {
        GetRange::Bounded(r) => r.start..r.end.min(size),
        GetRange::Offset(start) => *start..size,
        GetRange::Suffix(n) => size.saturating_sub(*n)..size,
    };
    (resolved.start < resolved.end).then_some(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_upload_in_tiny_pieces_is_kept_in_large_ones() {
        let bytes: Vec<u8> = (0..(2 * PIECE + 10)).map(|i| (i % 251) as u8).collect();
        let mut writer = BlobWriter::new(Digest::of(&bytes), u64::MAX);
        for piece in bytes.chunks(7) {
            writer.append(Bytes::copy_from_slice(piece)).unwrap();
        }
        writer.append(Bytes::new()).unwrap();
        let blob = writer.finish().unwrap();
        assert_eq!(blob.len(), bytes.len() as u64);
        assert_eq!(blob.pieces.len(), 3, "two gathered pieces and the rest");
        assert_eq!(blob.pieces.concat(), bytes);
    }

    /// The key a presigned URL names is the key the prefixed store writes, also for a prefix
    /// with characters object_store encodes.
    #[tokio::test]
    async fn signed_keys_are_the_stored_keys() {
        use object_store::ObjectStoreExt;
        let inner = Arc::new(object_store::memory::InMemory::new());
        let prefix = Path::from("~team/reg");
        let prefixed = object_store::prefix::PrefixStore::new(inner.clone(), prefix.clone());
        let key = Key::Blob(&Digest::of(b"x")).path();
        prefixed.put(&key, "x".into()).await.unwrap();
        let stored = inner.head(&join(&prefix, &key)).await.unwrap();
        assert_eq!(stored.size, 1);
    }

    #[test]
    fn a_range_to_the_last_possible_byte_is_to_the_end() {
        let range = parse_range("bytes=5-18446744073709551615").unwrap();
        assert_eq!(resolve_range(&range, 10), Some(5..10));
    }

    #[tokio::test]
    async fn a_lease_generation_written_again_after_pruning_is_no_lease() {
        let storage = Storage::new(Arc::new(object_store::memory::InMemory::new()), "memory");
        assert!(storage.acquire_gc_lease("a").await.unwrap().is_some());
        // "a" collects, then releases: generation 2, which prunes generation 1.
        storage.release_gc_lease("a").await.unwrap();
        // "b" read the lease before "a" took it, stalled, and now writes generation 1.
        let expires = Utc::now() + GC_LEASE_TTL;
        assert!(!storage.write_gc_lease(1, "b", expires).await.unwrap());
        assert!(!storage.gc_running().await.unwrap());
    }

    #[tokio::test]
    async fn a_lease_write_whose_response_was_lost_is_recognized_as_ours() {
        let storage = Storage::new(Arc::new(object_store::memory::InMemory::new()), "memory");
        let expires = Utc::now() + GC_LEASE_TTL;
        let lease = |owner: &str| {
            json_bytes(&GcLease {
                owner: owner.into(),
                expires,
            })
        };
        // The first attempt landed; the retry finds it there.
        assert!(storage.create(Key::GcLease(1), lease("a")).await.unwrap());
        assert!(storage.write_gc_lease(1, "a", expires).await.unwrap());
        // Someone else's write of the next generation is not ours.
        assert!(storage.create(Key::GcLease(2), lease("b")).await.unwrap());
        assert!(!storage.write_gc_lease(2, "a", expires).await.unwrap());
    }
}

//! Resolving references, remembered on disk: every successful resolution is saved (the reference's
//! manifest digest, and the manifest by its digest), so when the registry is down a cartridge that
//! was seen before still resolves and whatever is cached keeps serving. A resolution younger than
//! the resolver's time-to-live is reused without asking the registry, so loads of resident
//! cartridges take no round trip; a moved tag or deleted version is seen once it expires. Past
//! it, a reference resolved before waits at most two seconds on the registry, and loads of one
//! reference share one ask.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cartridge_client::{Client, ClientError};
use cartridge_schemas::api::ErrorCode;
use cartridge_schemas::manifest::Manifest;
use cartridge_schemas::{Digest, Reference};
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};

use crate::error::LoaderError;

/// How long a load waits on the registry to resolve a reference it has a resolution of.
const REMEMBERED_WAIT: Duration = Duration::from_secs(2);

/// How long an ask of the registry may take in all: past it, the next load asks again.
const ASK_WITHIN: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct Resolver {
    client: Client,
    memory: Arc<Memory>,
}

/// What the resolver remembers: recent resolutions in memory, every one on disk.
#[derive(Debug)]
struct Memory {
    dir: PathBuf,
    ttl: Duration,
    recent: Mutex<HashMap<String, (Instant, Resolved)>>,
    /// The asks of the registry under way, by reference, each with its id.
    asking: Mutex<HashMap<String, (u64, Ask)>>,
}

/// A reference resolved to its manifest.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub reference: Reference,
    pub digest: Digest,
    pub manifest: Manifest,
    /// Resolved from the local record because the registry could not be reached.
    pub from_memory: bool,
}

impl Resolved {
    /// The blobs holding the cartridge, each once.
    pub fn blob_digests(&self) -> Vec<Digest> {
        self.manifest.blobs().iter().map(|b| b.digest).collect()
    }
}

impl Resolver {
    /// Resolutions are reused for `ttl` (zero: every load asks the registry).
    pub fn new(client: Client, dir: &Path, ttl: Duration) -> Result<Self, LoaderError> {
        for sub in ["refs", "manifests"] {
            std::fs::create_dir_all(dir.join(sub))
                .map_err(|e| LoaderError::Internal(format!("{}: {e}", dir.display())))?;
        }
        Ok(Self {
            client,
            memory: Arc::new(Memory {
                dir: dir.to_owned(),
                ttl,
                recent: Mutex::new(HashMap::new()),
                asking: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub async fn resolve(&self, reference: &Reference) -> Result<Resolved, LoaderError> {
        if let Some(resolved) = self.memory.recent(reference) {
            return Ok(resolved);
        }
        let remembered = self.memory.remembered(reference);
        let ask = self.ask(reference, remembered.as_ref().map(|r| r.digest));
        // A reference resolved before waits on the registry only briefly: one that takes
        // connections but never answers would hold loads of resident cartridges for the
        // client's minutes.
        let answer = if remembered.is_some() {
            match tokio::time::timeout(REMEMBERED_WAIT, ask).await {
                Ok(answer) => answer,
                // Transient: the remembered resolution serves, below.
                Err(_) => Err(Arc::new(ClientError::NoAnswer {
                    seconds: REMEMBERED_WAIT.as_secs(),
                })),
            }
        } else {
            ask.await
        };
        match answer {
            Ok(resolved) => Ok(resolved),
            Err(error) if error.code() == Some(ErrorCode::NotFound) => {
                Err(LoaderError::UnknownReference(reference.to_string()))
            }
            // Access taken away from the loader (a narrowed scope) is meant: nothing serves.
            Err(error) if error.code() == Some(ErrorCode::Forbidden) => Err(client_error(&error)),
            // Whatever else keeps the registry from answering (down, a proxy's page in its
            // place, the loader's token expired): what was resolved before keeps serving.
            Err(error) => match (client_error(&error), remembered) {
                (LoaderError::Unavailable(_), Some(resolved)) => {
                    tracing::warn!(%reference, %error, "registry unavailable; serving the last resolution");
                    Ok(resolved)
                }
                (LoaderError::Unavailable(cause), None) => Err(LoaderError::Unavailable(format!(
                    "resolving {reference} failed: {cause}"
                ))),
                (other, _) => Err(other),
            },
        }
    }

    /// The registry's answer for `reference`: one ask at a time per reference, shared by the
    /// loads waiting on it, on a task of its own that remembers what it learns. A load that
    /// stops waiting leaves it to finish, so a registry slower than the wait still refreshes
    /// what later loads find; against one that never answers, loads do not pile up requests.
    fn ask(&self, reference: &Reference, known: Option<Digest>) -> Ask {
        let key = reference.to_string();
        let mut asking = self.memory.asking();
        if let Some((_, ask)) = asking.get(&key) {
            return ask.clone();
        }
        let id = rand::random::<u64>();
        let (client, memory, reference) =
            (self.client.clone(), self.memory.clone(), reference.clone());
        let guard = Asking(memory.clone(), key.clone(), id);
        // The task starts when the ask is first waited on, after it is in the map and the map's
        // lock is let go; its end takes this ask, never a newer one, out of the map (the guard
        // goes with the task's future, also when a runtime shutting down drops it unpolled).
        let ask = async move {
            let task = tokio::spawn(async move {
                let _guard = guard;
                let asked = client.resolve(&reference.repository, &reference.selector);
                match tokio::time::timeout(ASK_WITHIN, asked).await {
                    Ok(Ok(resolved)) => Ok(memory.remember(&reference, resolved)),
                    Ok(Err(error)) => {
                        if error.code() == Some(ErrorCode::NotFound) {
                            // Gone from the registry (a deleted tag or version): not to be
                            // served from memory the next time the registry is unreachable.
                            memory.forget(&reference, known);
                        }
                        Err(Arc::new(error))
                    }
                    Err(_) => Err(Arc::new(ClientError::NoAnswer {
                        seconds: ASK_WITHIN.as_secs(),
                    })),
                }
            });
            task.await.unwrap_or_else(|error| {
                // Cancelled or a panic: a failure to ask, after which a remembered resolution
                // serves.
                tracing::warn!(%error, "a resolve task failed");
                Err(Arc::new(ClientError::NoAnswer { seconds: 0 }))
            })
        }
        .boxed()
        .shared();
        asking.insert(key, (id, ask.clone()));
        ask
    }
}

/// An ask of the registry that loads share.
type Ask = Shared<BoxFuture<'static, Result<Resolved, Arc<ClientError>>>>;

/// An ask of a reference under way (its id tells it from a later one), until dropped.
struct Asking(Arc<Memory>, String, u64);

impl Drop for Asking {
    fn drop(&mut self) {
        self.0.end_ask(&self.1, self.2);
    }
}

impl Memory {
    /// The asks under way. Every change to them is whole, so a panic elsewhere while one was
    /// held leaves them usable.
    fn asking(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, Ask)>> {
        self.asking
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn end_ask(&self, key: &str, id: u64) {
        let mut asking = self.asking();
        if asking.get(key).is_some_and(|(current, _)| *current == id) {
            asking.remove(key);
        }
    }

    fn ref_path(&self, reference: &Reference) -> PathBuf {
        self.dir
            .join("refs")
            .join(Digest::of(reference.to_string().as_bytes()).hex())
    }

    fn manifest_path(&self, digest: &Digest) -> PathBuf {
        self.dir.join("manifests").join(digest.hex())
    }

    /// A resolution younger than the time-to-live.
    fn recent(&self, reference: &Reference) -> Option<Resolved> {
        let recent = self.recent.lock().ok()?;
        let (at, resolved) = recent.get(&reference.to_string())?;
        (at.elapsed() < self.ttl).then(|| resolved.clone())
    }

    /// Keeps what the registry answered, in memory and on disk.
    fn remember(
        &self,
        reference: &Reference,
        resolved: cartridge_schemas::api::Resolved,
    ) -> Resolved {
        // Remembering is best effort: a full disk must not fail a load.
        let _ = write_whole(
            &self.manifest_path(&resolved.digest),
            &resolved.manifest.to_canonical_json(),
        );
        let _ = write_whole(
            &self.ref_path(reference),
            resolved.digest.to_string().as_bytes(),
        );
        let resolved = Resolved {
            reference: reference.clone(),
            digest: resolved.digest,
            manifest: resolved.manifest,
            from_memory: false,
        };
        if let Ok(mut recent) = self.recent.lock() {
            // Expired entries go as new ones come, so the map holds what is in use.
            let ttl = self.ttl;
            recent.retain(|_, (at, _)| at.elapsed() < ttl);
            recent.insert(reference.to_string(), (Instant::now(), resolved.clone()));
        }
        resolved
    }

    /// Forgets the resolution of `reference` the 404 was an answer to (`known` when the ask
    /// began): one remembered since, from a newer answer, stays.
    fn forget(&self, reference: &Reference, known: Option<Digest>) {
        let path = self.ref_path(reference);
        let stored = std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| text.trim().parse::<Digest>().ok());
        if stored.is_some() && stored == known {
            let _ = std::fs::remove_file(path);
        }
        if let Ok(mut recent) = self.recent.lock()
            && recent
                .get(&reference.to_string())
                .is_some_and(|(_, resolved)| Some(resolved.digest) == known)
        {
            recent.remove(&reference.to_string());
        }
    }

    /// The last resolution of `reference` saved on disk, if its manifest still verifies.
    fn remembered(&self, reference: &Reference) -> Option<Resolved> {
        let digest: Digest = std::fs::read_to_string(self.ref_path(reference))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let bytes = std::fs::read(self.manifest_path(&digest)).ok()?;
        if Digest::of(&bytes) != digest {
            return None;
        }
        let manifest = Manifest::from_json(&bytes).ok()?;
        Some(Resolved {
            reference: reference.clone(),
            digest,
            manifest,
            from_memory: true,
        })
    }
}

/// Puts `bytes` at `path` by renaming a new file over it: a loader reading it meanwhile (another
/// sharing the folder), or after a crash, finds the old contents or the new, never a torn file.
fn write_whole(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let folder = path.parent().unwrap_or(Path::new("."));
    // Readable as a plain write leaves a file (0666 less the umask): another loader sharing
    // the folder may run as another user of its group.
    let mut file = tempfile::Builder::new()
        .permissions(std::fs::Permissions::from_mode(0o666))
        .tempfile_in(folder)?;
    file.write_all(bytes)?;
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Registry errors as the loader reports them.
pub fn client_error(error: &ClientError) -> LoaderError {
    match error.code() {
        Some(ErrorCode::NotFound) => LoaderError::UnknownReference(error.to_string()),
        Some(ErrorCode::Unauthorized | ErrorCode::Forbidden) => LoaderError::Unavailable(format!(
            "the registry refused the loader (its --token): {error}"
        )),
        // Answers that are not the API's (a redirect, a proxy's page): the registry URL the
        // loader was given does not reach a registry, which is what 503 says.
        _ if error.is_transient() || matches!(error, ClientError::Unexpected { .. }) => {
            LoaderError::Unavailable(error.to_string())
        }
        _ => LoaderError::Internal(error.to_string()),
    }
}

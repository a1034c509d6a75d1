//! Resolving references, remembered on disk: every successful resolution is saved (the reference's
//! manifest digest, and the manifest by its digest), so when the registry is down a cartridge that
//! was seen before still resolves and whatever is cached keeps serving. A resolution younger than
//! the resolver's time-to-live is reused without asking the registry, so loads of resident
//! cartridges take no round trip; a moved tag or deleted version is seen once it expires. Past
//! it, a reference resolved before waits at most two seconds on the registry.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cartridge_client::{Client, ClientError};
use cartridge_schemas::api::ErrorCode;
use cartridge_schemas::manifest::Manifest;
use cartridge_schemas::{Digest, Reference};

use crate::error::LoaderError;

/// How long a load waits on the registry to resolve a reference it has a resolution of.
const REMEMBERED_WAIT: Duration = Duration::from_secs(2);

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
    /// References whose resolution is being asked of the registry.
    asking: Mutex<HashSet<String>>,
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
                asking: Mutex::new(HashSet::new()),
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
        // Asked on a task of its own, which remembers the answer: a load that stops waiting
        // for it (below) leaves it to finish, so a registry slower than the wait still
        // refreshes what later loads find.
        let remembered = self.memory.remembered(reference);
        let key = reference.to_string();
        let first = self
            .memory
            .asking
            .lock()
            .map_or(true, |mut asking| asking.insert(key.clone()));
        // While one load asks a slow registry, the others serve what it last said rather than
        // each asking again (against a registry that never answers, every load would leave a
        // request waiting minutes).
        if !first && let Some(remembered) = remembered {
            return Ok(remembered);
        }
        let asked = {
            let (client, memory, reference) =
                (self.client.clone(), self.memory.clone(), reference.clone());
            tokio::spawn(async move {
                // Ends the asking however the task ends, a panic included.
                let _asking = first.then(|| Asking(memory.clone(), key));
                client
                    .resolve(&reference.repository, &reference.selector)
                    .await
                    .map(|resolved| memory.remember(&reference, resolved))
            })
        };
        // A task that failed to finish (a panic) is a failure to ask, like an unreachable
        // registry: the remembered resolution serves, if there is one.
        let joined = |joined: Result<_, tokio::task::JoinError>| match joined {
            Ok(answer) => Ok(answer),
            Err(error) if remembered.is_some() => {
                tracing::warn!(%reference, %error, "resolving failed; serving the last resolution");
                Ok(Err(ClientError::NoAnswer { seconds: 0 }))
            }
            Err(error) => Err(LoaderError::Internal(format!(
                "resolving {reference}: {error}"
            ))),
        };
        // A reference resolved before waits on the registry only briefly: one that takes
        // connections but never answers would hold loads of resident cartridges for the
        // client's minutes.
        let answer = if remembered.is_some() {
            match tokio::time::timeout(REMEMBERED_WAIT, asked).await {
                Ok(answer) => joined(answer)?,
                // Transient: the remembered resolution serves, below.
                Err(_) => Err(ClientError::NoAnswer {
                    seconds: REMEMBERED_WAIT.as_secs(),
                }),
            }
        } else {
            joined(asked.await)?
        };
        match answer {
            Ok(resolved) => Ok(resolved),
            Err(error) if error.code() == Some(ErrorCode::NotFound) => {
                // Gone from the registry (a deleted tag or version): not to be served from
                // memory the next time the registry is unreachable.
                self.memory.forget(reference);
                Err(LoaderError::UnknownReference(reference.to_string()))
            }
            Err(error) if error.is_transient() => match remembered {
                Some(resolved) => {
                    tracing::warn!(%reference, %error, "registry unreachable; serving the last resolution");
                    Ok(resolved)
                }
                None => Err(LoaderError::Unavailable(format!(
                    "resolving {reference} failed: {error}"
                ))),
            },
            Err(error) => Err(client_error(error)),
        }
    }
}

/// A reference being asked of the registry, until dropped.
struct Asking(Arc<Memory>, String);

impl Drop for Asking {
    fn drop(&mut self) {
        if let Ok(mut asking) = self.0.asking.lock() {
            asking.remove(&self.1);
        }
    }
}

impl Memory {
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
        let _ = std::fs::write(
            self.manifest_path(&resolved.digest),
            resolved.manifest.to_canonical_json(),
        );
        let _ = std::fs::write(self.ref_path(reference), resolved.digest.to_string());
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

    fn forget(&self, reference: &Reference) {
        let _ = std::fs::remove_file(self.ref_path(reference));
        if let Ok(mut recent) = self.recent.lock() {
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

/// Registry errors as the loader reports them.
pub fn client_error(error: ClientError) -> LoaderError {
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

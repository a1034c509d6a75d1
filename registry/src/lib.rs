//! The cartridge registry: content-addressed, compressed cartridges in object storage with
//! versioned metadata, served over a JSON HTTP API. The object store is the only state, so the
//! same Router runs as a long-lived server or inside AWS Lambda.

pub mod auth;
pub mod backend;
pub mod error;
pub mod extract;
pub mod gc;
pub mod metrics;
pub mod routes;
pub mod server;
pub mod storage;

use std::sync::Arc;
use std::time::Duration;

use cartridge_schemas::api::ErrorCode;
use cartridge_schemas::reference::{Namespace, Repository};

use crate::auth::{Action, Keyring};
use crate::error::ApiError;
use crate::extract::Caller;
use crate::storage::Storage;

/// Size caps on request bodies.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest blob accepted (chunks are a few MiB; the cap bounds memory per upload).
    pub max_blob_bytes: u64,
    /// Largest JSON body (manifests, requests).
    pub max_json_bytes: usize,
    /// Blob uploads through the registry held at once; each buffers up to `max_blob_bytes`, so
    /// this bounds their memory. Further uploads wait their turn, for `upload_wait` at most.
    pub max_concurrent_uploads: usize,
    /// How long an upload waits for a slot before it is answered 503 (the client retries).
    pub upload_wait: Duration,
    /// How long an upload may send nothing before it is dropped.
    pub upload_stall: Duration,
    /// Bytes per second an upload must average, once it has run for `upload_stall`, while
    /// another waits for its slot: one trickling a byte at a time would otherwise hold the slot
    /// for good. (Uncontested, a slow link keeps its pace.)
    pub min_upload_rate: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_blob_bytes: 256 << 20,
            max_json_bytes: 4 << 20,
            max_concurrent_uploads: 16,
            upload_wait: Duration::from_secs(30),
            upload_stall: Duration::from_secs(60),
            min_upload_rate: 16 << 10,
        }
    }
}

/// What every handler shares.
#[derive(Debug, Clone)]
pub struct AppState {
    pub storage: Storage,
    /// Replaced whole when the keyring file changes (see [`AppState::replace_keyring`]).
    keyring: Arc<std::sync::RwLock<Arc<Keyring>>>,
    pub limits: Limits,
    pub uploads: Arc<tokio::sync::Semaphore>,
    /// Uploads waiting for a slot.
    pub upload_waiters: Arc<std::sync::atomic::AtomicUsize>,
    /// Changes of several writes, run on tasks of their own (see `routes::versions`): shutdown
    /// waits for them after the last request.
    pub changes: tokio_util::task::TaskTracker,
}

impl AppState {
    pub fn new(storage: Storage, keyring: Keyring, limits: Limits) -> Self {
        let uploads = Arc::new(tokio::sync::Semaphore::new(
            limits.max_concurrent_uploads.max(1),
        ));
        Self {
            storage,
            keyring: Arc::new(std::sync::RwLock::new(Arc::new(keyring))),
            limits,
            uploads,
            upload_waiters: Arc::default(),
            changes: tokio_util::task::TaskTracker::new(),
        }
    }

    /// The keys tokens are checked against now.
    pub fn keyring(&self) -> Arc<Keyring> {
        self.keyring
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Takes a new keyring (a key added or removed): requests from now on are checked against it.
    pub fn replace_keyring(&self, keyring: Keyring) {
        *self
            .keyring
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(keyring);
    }

    /// Checks that the caller may do `action` on `repo`. Anonymous callers may pull from
    /// namespaces that allow it and nothing else.
    pub async fn authorize(
        &self,
        caller: &Caller,
        repo: &Repository,
        action: Action,
    ) -> Result<(), ApiError> {
        self.authorize_in(caller, &repo.namespace, Some(repo), action)
            .await
    }

    /// Like [`AppState::authorize`], for requests about a whole namespace.
    pub async fn authorize_namespace(
        &self,
        caller: &Caller,
        namespace: &Namespace,
        action: Action,
    ) -> Result<(), ApiError> {
        self.authorize_in(caller, namespace, None, action).await
    }

    async fn authorize_in(
        &self,
        caller: &Caller,
        namespace: &Namespace,
        repo: Option<&Repository>,
        action: Action,
    ) -> Result<(), ApiError> {
        let target = repo.map_or_else(|| format!("{namespace}/*"), ToString::to_string);
        if let Some(claims) = &caller.0
            && claims.allows(namespace, repo.map(|r| &r.name), action)
        {
            return Ok(());
        }
        // What anyone may pull, a token without a matching scope may pull too.
        if action == Action::Pull
            && self
                .storage
                .namespace_settings(namespace)
                .await?
                .anonymous_pull
        {
            return Ok(());
        }
        match &caller.0 {
            Some(claims) => Err(ApiError::new(
                ErrorCode::Forbidden,
                format!(
                    "token of {:?} does not grant {action} on {target}",
                    claims.subject
                ),
            )),
            None => Err(ApiError::new(
                ErrorCode::Unauthorized,
                format!("{action} on {target} needs a token"),
            )),
        }
    }
}

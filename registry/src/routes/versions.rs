use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use cartridge_schemas::api::{ErrorCode, Published};
use cartridge_schemas::manifest::Manifest;

use crate::AppState;
use crate::auth::Action;
use crate::error::ApiError;
use crate::extract::{Caller, Params, Unread};
use crate::storage::StorageError;

/// `PUT /v1/repos/{ns}/{name}/versions/{version}` with the manifest as the body: publishes a
/// version, create-only. 409 if it exists, 422 if the manifest is invalid or blobs are missing.
pub async fn publish(
    State(state): State<AppState>,
    caller: Caller,
    params: Params,
    body: Unread,
) -> Result<(StatusCode, Json<Published>), ApiError> {
    let repo = params.repository()?;
    let version = params.version()?;
    state.authorize(&caller, &repo, Action::Push).await?;
    let manifest = Manifest::from_json(&body.bytes().await?)
        .map_err(|e| ApiError::new(ErrorCode::InvalidManifest, e.to_string()))?;
    let digest = to_the_end(&state, {
        let (storage, repo, version) = (state.storage.clone(), repo.clone(), version.clone());
        async move { storage.publish(&repo, &version, &manifest).await }
    })
    .await?;
    let reference = format!("{repo}@{version}");
    tracing::info!(%reference, %digest, "published");
    Ok((StatusCode::CREATED, Json(Published { reference, digest })))
}

/// `DELETE /v1/repos/{ns}/{name}/versions/{version}` (admin): 409 while a tag points at it; its
/// manifest stops being the repository's at once, and it and the blobs stay stored until garbage
/// collection finds them unreferenced.
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    params: Params,
) -> Result<StatusCode, ApiError> {
    let repo = params.repository()?;
    let version = params.version()?;
    state.authorize(&caller, &repo, Action::Admin).await?;
    to_the_end(&state, {
        let (storage, repo, version) = (state.storage.clone(), repo.clone(), version.clone());
        async move { storage.delete_version(&repo, &version).await }
    })
    .await?;
    tracing::info!(reference = %format!("{repo}@{version}"), "version deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// Runs a change of several writes on its own task: a caller that disconnects drops its
/// request's future, and a change left halfway (a manifest linked but never published, a
/// version deleted with its tombstone's check undone) would stay so. Shutdown waits for it
/// (`AppState::changes`).
async fn to_the_end<T: Send + 'static>(
    state: &AppState,
    change: impl Future<Output = Result<T, StorageError>> + Send + 'static,
) -> Result<T, ApiError> {
    match state.changes.spawn(change).await {
        Ok(outcome) => outcome.map_err(ApiError::from),
        Err(error) => Err(ApiError::new(
            ErrorCode::Internal,
            format!("the change's task failed: {error}"),
        )),
    }
}

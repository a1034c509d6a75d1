use axum::Json;
use axum::extract::State;
use cartridge_schemas::api::{RepositoryListing, Resolved, TagEntry, VersionEntry};
use cartridge_schemas::manifest::Manifest;
use cartridge_schemas::reference::Selector;

use crate::AppState;
use crate::auth::Action;
use crate::error::ApiError;
use crate::extract::{Caller, Params};
use crate::storage::Key;

/// `GET /v1/repos/{ns}/{name}`: every version and tag.
pub async fn listing(
    State(state): State<AppState>,
    caller: Caller,
    params: Params,
) -> Result<Json<RepositoryListing>, ApiError> {
    let repo = params.repository()?;
    state.authorize(&caller, &repo, Action::Pull).await?;
    let mut versions: Vec<VersionEntry> = state
        .storage
        .versions(&repo)
        .await?
        .into_iter()
        .map(|(version, manifest)| VersionEntry { version, manifest })
        .collect();
    let tags: Vec<TagEntry> = state
        .storage
        .tags(&repo)
        .await?
        .into_iter()
        .filter_map(|(tag, head)| {
            Some(TagEntry {
                tag,
                manifest: head.manifest?,
                generation: head.generation,
            })
        })
        .collect();
    if versions.is_empty() && tags.is_empty() {
        return Err(ApiError::not_found(format!("{repo} has no versions")));
    }
    versions.sort_by(|a, b| a.version.precedence().cmp(&b.version.precedence()));
    Ok(Json(RepositoryListing {
        repository: repo.to_string(),
        versions,
        tags,
    }))
}

/// `GET /v1/repos/{ns}/{name}/resolve/{selector}`: a version, tag or digest to its manifest.
pub async fn resolve(
    State(state): State<AppState>,
    caller: Caller,
    params: Params,
) -> Result<Json<Resolved>, ApiError> {
    let repo = params.repository()?;
    let selector: Selector = params.selector()?.parse()?;
    state.authorize(&caller, &repo, Action::Pull).await?;
    let reference = format!("{repo}@{selector}");
    let digest = match &selector {
        Selector::Version(version) => state.storage.version(&repo, version).await?,
        Selector::Tag(tag) => state
            .storage
            .tag(&repo, tag)
            .await?
            .and_then(|head| head.manifest),
        // A digest is resolved only among what was published in this repository.
        Selector::Digest(digest) => state
            .storage
            .exists(Key::ManifestLink(&repo, digest))
            .await?
            .then_some(*digest),
    }
    .ok_or_else(|| ApiError::not_found(format!("{reference} not found")))?;
    let manifest = state.storage.get_manifest(&digest).await?;
    Ok(Json(Resolved {
        reference,
        digest,
        manifest,
    }))
}

/// `GET /v1/repos/{ns}/{name}/manifests/{digest}`.
pub async fn manifest(
    State(state): State<AppState>,
    caller: Caller,
    params: Params,
) -> Result<Json<Manifest>, ApiError> {
    let repo = params.repository()?;
    let digest = params.digest()?;
    state.authorize(&caller, &repo, Action::Pull).await?;
    if !state
        .storage
        .exists(Key::ManifestLink(&repo, &digest))
        .await?
    {
        return Err(ApiError::not_found(format!(
            "manifest {digest} not found in {repo}"
        )));
    }
    Ok(Json(state.storage.get_manifest(&digest).await?))
}

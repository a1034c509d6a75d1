use axum::Json;
use axum::extract::{RawQuery, State};
use cartridge_schemas::api::{LISTING_PAGE, RepositoryListing, Resolved, TagEntry, VersionEntry};
use cartridge_schemas::manifest::Manifest;
use cartridge_schemas::reference::{Selector, Version};
use futures::{StreamExt, TryStreamExt};

use crate::AppState;
use crate::auth::Action;
use crate::error::ApiError;
use crate::extract::{Caller, Params, query_param};
use crate::storage::Key;

/// `GET /v1/repos/{ns}/{name}[?after=VERSION&limit=N]`: a page of versions in reading order
/// (those after `after`), and every tag. Only the page's versions are read.
pub async fn listing(
    State(state): State<AppState>,
    caller: Caller,
    params: Params,
    RawQuery(query): RawQuery,
) -> Result<Json<RepositoryListing>, ApiError> {
    let repo = params.repository()?;
    state.authorize(&caller, &repo, Action::Pull).await?;
    let after: Option<Version> = query_param(query.as_deref(), "after")
        .map(|v| v.parse())
        .transpose()?;
    let limit = match query_param(query.as_deref(), "limit") {
        None => LISTING_PAGE,
        Some(text) => text
            .parse()
            .ok()
            .filter(|n| (1..=LISTING_PAGE).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(format!("limit must be a number from 1 to {LISTING_PAGE}"))
            })?,
    };
    let mut names = state.storage.version_names(&repo).await?;
    if let Some(after) = &after {
        names.retain(|v| v.precedence() > after.precedence());
    }
    let next = (names.len() > limit).then(|| names[limit - 1].clone());
    names.truncate(limit);
    let storage = &state.storage;
    let read: Vec<Option<VersionEntry>> = futures::stream::iter(names)
        .map(|version| {
            let repo = &repo;
            async move {
                let manifest = storage.version(repo, &version).await?;
                Ok::<_, ApiError>(manifest.map(|manifest| VersionEntry { version, manifest }))
            }
        })
        .buffered(16)
        .try_collect()
        .await?;
    let versions: Vec<VersionEntry> = read.into_iter().flatten().collect();
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
    // A later page may be empty; the first is empty only for a cartridge with nothing in it.
    if versions.is_empty() && tags.is_empty() && after.is_none() && next.is_none() {
        return Err(ApiError::not_found(format!("{repo} has no versions")));
    }
    Ok(Json(RepositoryListing {
        repository: repo.to_string(),
        versions,
        tags,
        next,
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

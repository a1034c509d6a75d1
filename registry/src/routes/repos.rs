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

/// `GET /v1/repos/{ns}/{name}[?limit=N[&after=VERSION]]`: versions in reading order and, on the
/// first page, the tags. Without `limit`, every version (as before pages); with it, up to N after
/// `after`, and `next` when more follow. Only the page's versions are read, and a page holds
/// one live version at least unless none is left: deleted ones' tombstones are read past.
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
        None if after.is_some() => {
            return Err(ApiError::bad_request("after needs a limit"));
        }
        None => usize::MAX,
        Some(text) => text
            .parse()
            .ok()
            .filter(|n| (1..=LISTING_PAGE).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(format!("limit must be a number from 1 to {LISTING_PAGE}"))
            })?,
    };
    let names = state.storage.version_names(&repo).await?;
    let stored = !names.is_empty();
    let mut rest: &[Version] = &names;
    if let Some(after) = &after {
        let past = rest.partition_point(|v| v.precedence() <= after.precedence());
        rest = &rest[past..];
    }
    let storage = &state.storage;
    // Up to `limit` live versions, read `limit` names at a time, then (past deleted ones) at
    // least 16 at a time; `consumed` names of `rest` are behind the page.
    let (mut versions, mut consumed, mut chunk) = (Vec::new(), 0, limit);
    'reading: while versions.len() < limit && consumed < rest.len() {
        let page = &rest[consumed..rest.len().min(consumed.saturating_add(chunk))];
        let read: Vec<Option<VersionEntry>> = futures::stream::iter(page.to_vec())
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
        for entry in read {
            consumed += 1;
            versions.extend(entry);
            if versions.len() == limit {
                break 'reading;
            }
        }
        chunk = chunk.max(16);
    }
    // Where this page ended, if versions follow: the last name it took.
    let next = (consumed < rest.len()).then(|| rest[consumed - 1].clone());
    let tags: Vec<TagEntry> = if after.is_some() {
        Vec::new()
    } else {
        state
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
            .collect()
    };
    // Nothing to pull: never published, or every version deleted and no tag left.
    let empty = versions.is_empty() && next.is_none();
    if empty && tags.is_empty() && (after.is_none() || !stored) {
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

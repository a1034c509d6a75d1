use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use cartridge_schemas::api::{ErrorCode, TagEntry, TagUpdate};

use crate::AppState;
use crate::auth::Action;
use crate::error::ApiError;
use crate::extract::{Caller, Params, Unread};
use crate::storage::TagCondition;

/// `PUT /v1/repos/{ns}/{name}/tags/{tag}`: point a tag at a manifest, optionally only if it still
/// points where the caller saw it (412 otherwise).
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    params: Params,
    body: Unread,
) -> Result<Json<TagEntry>, ApiError> {
    let repo = params.repository()?;
    let tag = params.tag()?;
    state.authorize(&caller, &repo, Action::Push).await?;
    let update: TagUpdate = body.json().await?;
    let condition = match (update.if_matches, update.if_absent, update.if_generation) {
        (Some(_), true, _) => {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                "if_matches and if_absent exclude each other",
            ));
        }
        (None, _, Some(_)) => {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                "if_generation goes with if_matches",
            ));
        }
        (Some(digest), false, None) => TagCondition::Matches(digest),
        (Some(digest), false, Some(generation)) => TagCondition::MatchesAt(digest, generation),
        (None, true, None) => TagCondition::Absent,
        (None, false, None) => TagCondition::Always,
    };
    let head = state
        .storage
        .move_tag(&repo, &tag, Some(update.manifest), condition)
        .await?;
    tracing::info!(reference = %format!("{repo}@{tag}"), manifest = %update.manifest, generation = head.generation, "tag moved");
    Ok(Json(TagEntry {
        tag,
        manifest: update.manifest,
        generation: head.generation,
    }))
}

/// `DELETE /v1/repos/{ns}/{name}/tags/{tag}`.
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    params: Params,
) -> Result<StatusCode, ApiError> {
    let repo = params.repository()?;
    let tag = params.tag()?;
    state.authorize(&caller, &repo, Action::Push).await?;
    state
        .storage
        .move_tag(&repo, &tag, None, TagCondition::Always)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

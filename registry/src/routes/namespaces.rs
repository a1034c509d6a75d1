use axum::Json;
use axum::extract::State;
use cartridge_schemas::api::{ErrorCode, NameList, NamespaceList, NamespaceSettings};
use cartridge_schemas::reference::Name;
use futures::{StreamExt, TryStreamExt};

use crate::AppState;
use crate::auth::Action;
use crate::error::ApiError;
use crate::extract::{Caller, Params, Unread};

/// `GET /v1/namespaces`: the namespaces the caller can see that hold a cartridge to pull (blobs
/// sent for a push that never published do not make one).
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<NamespaceList>, ApiError> {
    // Each namespace costs a few storage reads: they run side by side (in order of the answer).
    let shown = futures::stream::iter(state.storage.namespaces().await?)
        .map(|namespace| {
            let (state, caller) = (&state, &caller);
            async move {
                // A token sees what its scopes touch, and whatever anyone may pull.
                let visible = caller.0.as_ref().is_some_and(|claims| {
                    claims.scopes.iter().any(|scope| scope.touches(&namespace))
                }) || state
                    .storage
                    .namespace_settings(&namespace)
                    .await?
                    .anonymous_pull;
                let shown = visible && state.storage.has_names(&namespace).await?;
                Ok::<_, ApiError>(shown.then_some(namespace))
            }
        })
        .buffered(16)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(Json(NamespaceList {
        namespaces: shown.into_iter().flatten().collect(),
    }))
}

/// `GET /v1/repos/{ns}`: the cartridges of a namespace the caller can pull.
pub async fn names(
    State(state): State<AppState>,
    caller: Caller,
    params: Params,
) -> Result<Json<NameList>, ApiError> {
    let namespace = params.namespace()?;
    let anonymous = state
        .storage
        .namespace_settings(&namespace)
        .await?
        .anonymous_pull;
    if !anonymous {
        match &caller.0 {
            None => {
                return Err(ApiError::new(
                    ErrorCode::Unauthorized,
                    format!("listing {namespace} needs a token"),
                ));
            }
            // As a repository of it would answer: forbidden, not an empty list.
            Some(claims) if !claims.scopes.iter().any(|s| s.touches(&namespace)) => {
                return Err(ApiError::new(
                    ErrorCode::Forbidden,
                    format!("the token has no scope in {namespace}"),
                ));
            }
            Some(_) => {}
        }
    }
    let can_pull = |name: &Name| {
        anonymous
            || caller
                .0
                .as_ref()
                .is_some_and(|c| c.allows(&namespace, Some(name), Action::Pull))
    };
    let names = state
        .storage
        .names(&namespace)
        .await?
        .into_iter()
        .filter(can_pull)
        .collect();
    Ok(Json(NameList { namespace, names }))
}

/// `GET /v1/namespaces/{ns}/settings`.
pub async fn settings(
    State(state): State<AppState>,
    caller: Caller,
    params: Params,
) -> Result<Json<NamespaceSettings>, ApiError> {
    let namespace = params.namespace()?;
    let settings = state.storage.namespace_settings(&namespace).await?;
    let touches = caller
        .0
        .as_ref()
        .is_some_and(|claims| claims.scopes.iter().any(|s| s.touches(&namespace)));
    if !settings.anonymous_pull && !touches {
        state
            .authorize_namespace(&caller, &namespace, Action::Pull)
            .await?;
    }
    Ok(Json(settings))
}

/// `PUT /v1/namespaces/{ns}/settings` (admin of the namespace).
pub async fn set_settings(
    State(state): State<AppState>,
    caller: Caller,
    params: Params,
    body: Unread,
) -> Result<Json<NamespaceSettings>, ApiError> {
    let namespace = params.namespace()?;
    state
        .authorize_namespace(&caller, &namespace, Action::Admin)
        .await?;
    let settings: NamespaceSettings = body.json().await?;
    state
        .storage
        .set_namespace_settings(&namespace, &settings)
        .await?;
    tracing::info!(%namespace, ?settings, "namespace settings changed");
    Ok(Json(settings))
}

//! The `/v1` API: one handler per endpoint, grouped by resource.

mod blobs;
mod namespaces;
mod repos;
mod system;
mod tags;
mod versions;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post, put};
use cartridge_schemas::api::ErrorCode;
use tower_http::trace::TraceLayer;

use crate::AppState;
use crate::error::ApiError;

pub fn router(state: AppState) -> Router {
    let json_limit = state.limits.max_json_bytes;
    // Install the recorder before the first request is counted.
    cartridge_schemas::metrics::handle();
    Router::new()
        .route("/v1/health", get(system::health))
        .route("/metrics", get(system::metrics))
        .route("/v1/namespaces", get(namespaces::list))
        .route(
            "/v1/namespaces/{ns}/settings",
            get(namespaces::settings).put(namespaces::set_settings),
        )
        .route("/v1/repos/{ns}", get(namespaces::names))
        .route("/v1/repos/{ns}/{name}", get(repos::listing))
        .route(
            "/v1/repos/{ns}/{name}/resolve/{selector}",
            get(repos::resolve),
        )
        .route(
            "/v1/repos/{ns}/{name}/manifests/{digest}",
            get(repos::manifest),
        )
        .route("/v1/repos/{ns}/{name}/blobs/missing", post(blobs::missing))
        .route("/v1/repos/{ns}/{name}/blobs/uploads", post(blobs::uploads))
        // Blob uploads stream under their own cap (Limits::max_blob_bytes), checked as bytes arrive.
        .route(
            "/v1/repos/{ns}/{name}/blobs/{digest}",
            get(blobs::download)
                .put(blobs::upload)
                .layer(DefaultBodyLimit::disable()),
        )
        .route(
            "/v1/repos/{ns}/{name}/blobs/{digest}/commit",
            post(blobs::commit),
        )
        .route(
            "/v1/repos/{ns}/{name}/versions/{version}",
            put(versions::publish).delete(versions::delete),
        )
        .route(
            "/v1/repos/{ns}/{name}/tags/{tag}",
            put(tags::update).delete(tags::delete),
        )
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                ErrorCode::MethodNotAllowed,
                "method not allowed on this endpoint",
            )
        })
        .layer(DefaultBodyLimit::max(json_limit))
        .layer(axum::middleware::from_fn(crate::metrics::track))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

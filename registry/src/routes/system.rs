use axum::Json;
use axum::extract::State;
use axum::response::IntoResponse;
use cartridge_schemas::api::ErrorCode;
use serde_json::{Value, json};

use crate::AppState;
use crate::error::ApiError;

/// `GET /v1/health`: 200 when storage answers, 503 when it does not. Anyone may ask, so it
/// says nothing of where the storage is (the server logs that at start).
pub async fn health(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    state.storage.namespaces().await.map_err(|error| {
        tracing::warn!(%error, "health check: storage unreachable");
        ApiError::new(ErrorCode::Unavailable, "storage is unreachable")
    })?;
    Ok(Json(json!({"status": "ok"})))
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics() -> impl IntoResponse {
    let handle = cartridge_schemas::metrics::handle();
    // Without the exporter's own background task, histograms are drained here.
    handle.run_upkeep();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        handle.render(),
    )
}

//! The local API: `POST /v1/load`, `POST /v1/release`, `POST /v1/prefetch`, `GET /v1/status`,
//! `GET /metrics`. Errors are `{code, message}`.

use std::sync::{Arc, OnceLock};

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::de::DeserializeOwned;

use crate::error::LoaderError;
use crate::loader::{
    LoadRequest, LoadResponse, Loader, Part, PrefetchRequest, ReleaseRequest, Status,
};

fn metrics_handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// A JSON body whose errors answer as `{code, message}`.
struct Body<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = LoaderError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        Json::<T>::from_request(request, state)
            .await
            .map(|Json(v)| Self(v))
            .map_err(|e: JsonRejection| LoaderError::BadRequest(e.body_text()))
    }
}

async fn load(
    State(loader): State<Arc<Loader>>,
    Body(request): Body<LoadRequest>,
) -> Result<Json<LoadResponse>, LoaderError> {
    // The load runs to completion on its own task even if the caller goes away (a cancelled
    // future would strand its reservations, pins and references); a handle nobody received is
    // released at once.
    let (answer, answered) = tokio::sync::oneshot::channel();
    let worker = loader.clone();
    tokio::spawn(async move {
        let result = worker.load(request).await;
        if let Err(Ok(unclaimed)) = answer.send(result) {
            let _ = worker.release(unclaimed.handle);
        }
    });
    let result = answered
        .await
        .map_err(|_| LoaderError::Internal("the load task ended without an answer".into()))?;
    Ok(Json(result?))
}

async fn release(
    State(loader): State<Arc<Loader>>,
    Body(request): Body<ReleaseRequest>,
) -> Result<Json<serde_json::Value>, LoaderError> {
    loader.release(request.handle)?;
    Ok(Json(serde_json::json!({"released": request.handle})))
}

async fn prefetch(
    State(loader): State<Arc<Loader>>,
    Body(request): Body<PrefetchRequest>,
) -> Result<Json<Vec<Part>>, LoaderError> {
    Ok(Json(loader.prefetch(&request.cartridges).await?))
}

async fn status(State(loader): State<Arc<Loader>>) -> Json<Status> {
    Json(loader.status())
}

async fn metrics() -> String {
    let handle = metrics_handle();
    handle.run_upkeep();
    handle.render()
}

pub fn router(loader: Arc<Loader>) -> Router {
    metrics_handle();
    Router::new()
        .route("/v1/load", post(load))
        .route("/v1/release", post(release))
        .route("/v1/prefetch", post(prefetch))
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .fallback(|| async { LoaderError::BadRequest("no such endpoint".into()) })
        // Refusals (507 when a load does not fit, 503 when the registry is down) are expected
        // answers, not faults: log them as warnings.
        .layer(
            tower_http::trace::TraceLayer::new_for_http()
                .on_failure(tower_http::trace::DefaultOnFailure::new().level(tracing::Level::WARN)),
        )
        .with_state(loader)
}

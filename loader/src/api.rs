//! The local API: `POST /v1/load`, `POST /v1/release`, `POST /v1/renew`, `POST /v1/prefetch`,
//! `GET /v1/status`, `GET /metrics`. Errors are `{code, message}`.
//!
//! A load with `"stream": true` answers `200` with newline-delimited JSON events, each tagged by
//! `event`: `layers` ([`LayersReady`]) as layers land, then `loaded` (the [`LoadResponse`]) or
//! `error` (`{code, message, status}`: the HTTP status it would have had). What is refused
//! before memory is touched answers with its own status instead, streamed or not.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cartridge_schemas::api::ErrorBody;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::LoaderError;
use crate::loader::{
    LayersReady, LoadRequest, LoadResponse, Loader, Part, PrefetchRequest, Progress,
    ReleaseRequest, Renewed, Status,
};

/// A JSON body whose errors answer as `{code, message}`.
struct Body<T>(T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Body<T> {
    type Rejection = LoaderError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        Json::<T>::from_request(request, state)
            .await
            .map(|Json(v)| Self(v))
            .map_err(|e: JsonRejection| match e.status() {
                StatusCode::PAYLOAD_TOO_LARGE => {
                    LoaderError::TooLarge(format!("request body too large: {}", e.body_text()))
                }
                _ => LoaderError::BadRequest(e.body_text()),
            })
    }
}

/// One line of a streamed load.
#[derive(Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum LoadEvent {
    Layers(LayersReady),
    Loaded(LoadResponse),
    Error {
        #[serde(flatten)]
        body: ErrorBody,
        /// The HTTP status the error would have had, had the answer not begun.
        status: u16,
    },
}

impl LoadEvent {
    fn line(&self) -> String {
        let mut line = serde_json::to_string(self).unwrap_or_else(|e| {
            serde_json::json!({"event": "error", "code": "internal", "status": 500, "message": format!("answer unwritable: {e}")})
                .to_string()
        });
        line.push('\n');
        line
    }
}

async fn load(State(loader): State<Arc<Loader>>, Body(request): Body<LoadRequest>) -> Response {
    // Refusals come first, with their own status, streamed or not.
    let prepared = match loader.prepare(&request).await {
        Ok(prepared) => prepared,
        Err(error) => return error.into_response(),
    };
    // The load runs to completion on its own task even if the caller goes away (a cancelled
    // future would strand its reservations, pins and references); a handle nobody received is
    // released at once (`Unclaimed`).
    if request.stream {
        let (lines, receiver) = tokio::sync::mpsc::unbounded_channel();
        let progress: Progress = {
            let lines = lines.clone();
            Arc::new(move |ready: &LayersReady| {
                let _ = lines.send((LoadEvent::Layers(ready.clone()).line(), None));
            })
        };
        tokio::spawn(async move {
            let (last, unclaimed) = match loader.load(prepared, Some(progress)).await {
                Ok(answer) => {
                    let unclaimed = Unclaimed::handle(&loader, answer.handle);
                    (LoadEvent::Loaded(answer), Some(unclaimed))
                }
                Err(error) => (
                    LoadEvent::Error {
                        status: error.code().http_status(),
                        body: ErrorBody {
                            code: error.code(),
                            message: error.to_string(),
                        },
                    },
                    None,
                ),
            };
            // Not sent (the caller left): the line's handle is released with it.
            let _ = lines.send((last.line(), unclaimed));
        });
        return (
            [(header::CONTENT_TYPE, "application/x-ndjson")],
            axum::body::Body::from_stream(streamed(receiver)),
        )
            .into_response();
    }
    let (answer, answered) = tokio::sync::oneshot::channel();
    let worker = loader.clone();
    tokio::spawn(async move {
        let result = worker.load(prepared, None).await;
        let unclaimed = result
            .as_ref()
            .ok()
            .map(|answer| Unclaimed::handle(&worker, answer.handle));
        // Not received (the caller left): the handle is released with it.
        let _ = answer.send((result, unclaimed));
    });
    let result = match answered.await {
        Ok((result, unclaimed)) => {
            if let Some(unclaimed) = unclaimed {
                unclaimed.handed_over();
            }
            result
        }
        Err(_) => Err(LoaderError::Internal(
            "the load task ended without an answer".into(),
        )),
    };
    match result {
        Ok(answer) => Json(answer).into_response(),
        Err(error) => error.into_response(),
    }
}

/// A handle nobody has been handed yet: released when dropped, unless handed over.
struct Unclaimed(Option<Box<dyn FnOnce() + Send>>);

impl Unclaimed {
    fn new(release: impl FnOnce() + Send + 'static) -> Self {
        Self(Some(Box::new(release)))
    }

    /// A loaded handle, released through `loader`.
    fn handle(loader: &Arc<Loader>, handle: u64) -> Self {
        let loader = loader.clone();
        Self::new(move || {
            let _ = loader.release(handle);
        })
    }

    fn handed_over(mut self) {
        self.0 = None;
    }
}

impl Drop for Unclaimed {
    fn drop(&mut self) {
        if let Some(release) = self.0.take() {
            release();
        }
    }
}

/// A streamed load's body: its lines as they come. A line that hands over a handle counts as
/// handed over once the server takes it to write (no later point proves the caller read it,
/// and releasing a handle the caller holds would be far worse than keeping one it lost); a body
/// dropped with the line still queued (its caller went away) releases the handle.
fn streamed(
    receiver: tokio::sync::mpsc::UnboundedReceiver<(String, Option<Unclaimed>)>,
) -> impl futures::Stream<Item = Result<String, std::convert::Infallible>> {
    futures::stream::unfold(receiver, |mut receiver| async move {
        let (line, unclaimed) = receiver.recv().await?;
        if let Some(unclaimed) = unclaimed {
            unclaimed.handed_over();
        }
        Some((Ok(line), receiver))
    })
}

async fn release(
    State(loader): State<Arc<Loader>>,
    Body(request): Body<ReleaseRequest>,
) -> Result<Json<serde_json::Value>, LoaderError> {
    loader.release(request.handle)?;
    Ok(Json(serde_json::json!({"released": request.handle})))
}

async fn renew(
    State(loader): State<Arc<Loader>>,
    Body(request): Body<ReleaseRequest>,
) -> Result<Json<Renewed>, LoaderError> {
    Ok(Json(loader.renew(request.handle)?))
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

async fn metrics(State(loader): State<Arc<Loader>>) -> String {
    // Lapsed leases count as they are found: a node only scraped still finds them.
    loader.expire();
    let handle = cartridge_schemas::metrics::handle();
    handle.run_upkeep();
    handle.render()
}

pub fn router(loader: Arc<Loader>) -> Router {
    cartridge_schemas::metrics::handle();
    Router::new()
        .route("/v1/load", post(load))
        .route("/v1/release", post(release))
        .route("/v1/renew", post(renew))
        .route("/v1/prefetch", post(prefetch))
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .fallback(|uri: Uri| async move { LoaderError::NoEndpoint(uri.path().to_owned()) })
        .method_not_allowed_fallback(|uri: Uri| async move {
            LoaderError::WrongMethod(uri.path().to_owned())
        })
        // Refusals (507 when a load does not fit, 503 when the registry is down) are expected
        // answers, not faults: log them as warnings.
        .layer(
            tower_http::trace::TraceLayer::new_for_http()
                .on_failure(tower_http::trace::DefaultOnFailure::new().level(tracing::Level::WARN)),
        )
        .with_state(loader)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures::StreamExt;

    use super::*;

    /// Releases counted by `released`.
    fn unclaimed(released: &Arc<AtomicUsize>) -> Option<Unclaimed> {
        let released = released.clone();
        Some(Unclaimed::new(move || {
            released.fetch_add(1, Ordering::SeqCst);
        }))
    }

    #[tokio::test]
    async fn a_handle_is_released_unless_its_line_was_taken_to_be_written() {
        let released = Arc::new(AtomicUsize::new(0));
        // Taken to be written: handed over, never released, even if the body goes right after.
        let (lines, receiver) = tokio::sync::mpsc::unbounded_channel();
        lines.send(("loaded".into(), unclaimed(&released))).unwrap();
        let mut body = Box::pin(streamed(receiver));
        assert_eq!(body.next().await.unwrap().unwrap(), "loaded");
        drop(body);
        assert_eq!(released.load(Ordering::SeqCst), 0);
        // Still queued behind another line when the body went.
        let (lines, receiver) = tokio::sync::mpsc::unbounded_channel();
        lines.send(("layers".into(), None)).unwrap();
        lines.send(("loaded".into(), unclaimed(&released))).unwrap();
        let mut body = Box::pin(streamed(receiver));
        assert_eq!(body.next().await.unwrap().unwrap(), "layers");
        drop(body);
        assert_eq!(released.load(Ordering::SeqCst), 1);
        // Sent after the body went: released as the send fails.
        let (lines, receiver) =
            tokio::sync::mpsc::unbounded_channel::<(String, Option<Unclaimed>)>();
        drop(receiver);
        let _ = lines.send(("loaded".into(), unclaimed(&released)));
        assert_eq!(released.load(Ordering::SeqCst), 2);
    }
}

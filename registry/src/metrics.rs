//! Prometheus metrics: request counts and latencies by route and status, blob bytes moved.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

pub async fn track(request: Request, next: Next) -> Response {
    let started = Instant::now();
    // Any token is a method to HTTP: only the API's own get a label of their own, so requests
    // cannot grow the metrics without end.
    let method: &'static str = match *request.method() {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        _ => "other",
    };
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched".to_owned(), |p| p.as_str().to_owned());
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("registry_requests_total", "method" => method, "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("registry_request_duration_seconds", "method" => method, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

pub fn blob_bytes(direction: &'static str, bytes: u64) {
    metrics::counter!("registry_blob_bytes_total", "direction" => direction).increment(bytes);
}

//! Prometheus metrics: request counts and latencies by route and status, blob bytes moved.

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// The process-wide recorder, installed on first use (a process has one metrics recorder).
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(cartridge_schemas::api::LATENCY_BUCKETS)
            .expect("the bounds are not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Histogram samples are kept until drained: drained every few seconds, scraped or not.
        let upkeep = handle.clone();
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(std::time::Duration::from_secs(5));
                upkeep.run_upkeep();
            }
        });
        // Fails only if another recorder was installed first; then our metrics go there.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

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

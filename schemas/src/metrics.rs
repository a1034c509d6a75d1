//! The Prometheus recorder the registry and the loader export on `/metrics`.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Bucket bounds (seconds) of the latency histograms: histograms, unlike summaries, add up
/// across a fleet of servers.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The process-wide recorder, installed on first use (a process has one metrics recorder; a
/// service asks for it first of all, so what happens at start counts too).
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(LATENCY_BUCKETS)
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

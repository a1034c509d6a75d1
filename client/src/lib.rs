//! Client of the cartridge registry: the HTTP API, and push and pull built on it with parallel,
//! resumable, retried and verified transfers into a local content-addressed cache.

mod api;
mod cache;
mod error;
mod pull;
mod push;
mod rate;
#[cfg(test)]
mod testing;

pub use api::Client;
pub use cache::{Cache, allocate};
pub use error::ClientError;
pub use pull::{FetchReport, PullOptions, PullReport, decode_arrivals, fetch_blobs, pull};
pub use push::{PushOptions, PushReport, move_tag_patiently, push};
pub use rate::{RateLimit, parse_rate};

/// Receives transfer progress (the CLI draws a progress bar with it).
pub trait Progress: Send + Sync {
    /// A transfer of `total` bytes begins (`already` of them are on hand, e.g. resumed).
    fn begin(&self, total: u64, already: u64);
    fn advance(&self, bytes: u64);
    /// Bytes counted before are to come again (a download that starts over).
    fn retreat(&self, bytes: u64);
    fn end(&self);
}

/// Progress nobody watches.
pub struct NoProgress;

impl Progress for NoProgress {
    fn begin(&self, _: u64, _: u64) {}
    fn advance(&self, _: u64) {}
    fn retreat(&self, _: u64) {}
    fn end(&self) {}
}

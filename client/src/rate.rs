//! A shared byte-rate cap for transfers running in parallel.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Caps the combined rate of every transfer that consumes from it.
#[derive(Debug)]
pub struct RateLimit {
    bytes_per_second: u64,
    state: Mutex<(Instant, u64)>,
}

impl RateLimit {
    pub fn new(bytes_per_second: u64) -> Self {
        Self {
            bytes_per_second: bytes_per_second.max(1),
            state: Mutex::new((Instant::now(), 0)),
        }
    }

    /// Accounts for `bytes` just moved, sleeping as long as needed to stay under the cap.
    pub async fn consume(&self, bytes: u64) {
        let wait = {
            let Ok(mut state) = self.state.lock() else {
                return;
            };
            state.1 += bytes;
            let due = Duration::from_secs_f64(state.1 as f64 / self.bytes_per_second as f64);
            due.saturating_sub(state.0.elapsed())
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

//! A shared byte-rate cap for transfers running in parallel.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Caps the combined rate of every transfer that consumes from it: a token bucket holding at
/// most one second of bytes, so time spent not transferring (encoding, waiting on a lock or a
/// retry, a link slower than the cap) never builds up credit for a later burst.
#[derive(Debug)]
pub struct RateLimit {
    bytes_per_second: u64,
    /// When the bytes consumed so far are paid for at the cap (the bucket's debt).
    paid_until: Mutex<Option<Instant>>,
}

/// A command line's rate (e.g. `20MiB`): more than zero, which would never finish.
pub fn parse_rate(text: &str) -> Result<bytesize::ByteSize, String> {
    match text.parse::<bytesize::ByteSize>()? {
        rate if rate.as_u64() == 0 => {
            Err("a rate of 0 would never finish; leave the option out for no cap".into())
        }
        rate => Ok(rate),
    }
}

/// The most a transfer may run ahead of the cap.
const BURST: Duration = Duration::from_secs(1);

impl RateLimit {
    /// A cap of `bytes_per_second` (more than zero).
    pub fn new(bytes_per_second: u64) -> Self {
        assert!(bytes_per_second > 0, "a rate limit of zero bytes a second");
        Self {
            bytes_per_second,
            paid_until: Mutex::new(None),
        }
    }

    /// Accounts for `bytes` just moved, sleeping as long as needed to stay under the cap.
    pub async fn consume(&self, bytes: u64) {
        let wait = {
            let Ok(mut paid_until) = self.paid_until.lock() else {
                return;
            };
            let now = Instant::now();
            let from = paid_until.map_or(now, |paid| paid.max(now));
            let until = from + Duration::from_secs_f64(bytes as f64 / self.bytes_per_second as f64);
            *paid_until = Some(until);
            until.saturating_duration_since(now + BURST)
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_time_earns_no_burst() {
        let rate = RateLimit::new(1000);
        // A second's worth goes at once (the burst), the next second's waits.
        let started = Instant::now();
        rate.consume(1000).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
        // A long idle spell earns nothing beyond the burst.
        tokio::time::sleep(Duration::from_secs(60)).await;
        let started = Instant::now();
        for _ in 0..3 {
            rate.consume(1000).await;
        }
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(1990), "{elapsed:?}");
    }
}

//! Self-study training of cartridges: the model (a Llama family forward with a KV prefix),
//! synthesis of conversations about a corpus, distillation into a cartridge, and evaluation.

pub mod cartridge;
pub mod corpus;
pub mod distill;
mod error;
pub mod eval;
pub mod model;
pub mod pipeline;
pub mod synthesis;

pub use error::{Error, Result};

/// Shortens how long candle's idle CPU workers spin before they sleep, on machines of four cores
/// or fewer, unless `CANDLE_BARRIER_POOL_SPIN_LIMIT` is set. candle hands elementwise work to a
/// pool whose workers spin 25,000 times after each op; on few cores that spinning takes the
/// cores the matmuls and our rayon ops need (a distillation step on 2 cores: about 800 ms
/// spinning that long, 600 ms at 1,000).
///
/// # Safety
/// It sets an environment variable: call it first in `main`, before any thread starts.
#[allow(unsafe_code)]
pub unsafe fn tune_cpu_workers() {
    const VARIABLE: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    let few = std::thread::available_parallelism().is_ok_and(|n| n.get() <= 4);
    if few && std::env::var_os(VARIABLE).is_none() {
        // SAFETY: the caller's promise, no other thread reads the environment meanwhile.
        unsafe { std::env::set_var(VARIABLE, "1000") };
    }
}

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

/// Tunes the process for training and evaluating on the CPU, where a step allocates and frees
/// tensors of hundreds of megabytes:
/// - glibc's allocator keeps freed memory for the next tensor (allocations up to 1 GiB come from
///   its heap, which is not trimmed), instead of mapping fresh pages the kernel must zero for
///   each: a distillation step at P=256, L=512, B=2 on 2 cores took 5.1-5.5 s so, 5.5-7.0 s
///   without (interleaved), for 4% more peak memory;
/// - on four cores or fewer, unless `CANDLE_BARRIER_POOL_SPIN_LIMIT` is set, candle's idle CPU
///   workers spin 1,000 times before they sleep instead of 25,000, which took the cores the
///   matmuls and our rayon ops need (a step at P=64, L=128: 608-675 ms against 789-876 ms).
///
/// # Safety
/// It sets an environment variable and the allocator's parameters: call it first in `main`,
/// before any thread starts.
#[allow(unsafe_code)]
pub unsafe fn tune_cpu() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: no other thread allocates meanwhile (the caller's promise).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
    const VARIABLE: &str = "CANDLE_BARRIER_POOL_SPIN_LIMIT";
    let few = std::thread::available_parallelism().is_ok_and(|n| n.get() <= 4);
    if few && std::env::var_os(VARIABLE).is_none() {
        // SAFETY: no other thread reads the environment meanwhile (the caller's promise).
        unsafe { std::env::set_var(VARIABLE, "1000") };
    }
}

//! The cartridge loader: a sidecar beside an inference server that puts the right cartridges in
//! device memory on demand. Tiers: registry → verified blobs on disk (size cap, LRU, survives
//! restarts) → decoded keys and values in device memory (byte budget, reference counts, LRU).
//! The device is a GPU (`cuda`, with a host tier of page-locked memory in front of it) or host
//! memory in shared-memory files another process maps.

pub mod api;
pub mod buffer;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod disk;
pub mod error;
pub mod loader;
pub mod resolve;
pub mod store;

pub use loader::{LoadRequest, LoadResponse, Loader, LoaderOptions};

//! Shared types of cartridge: references, the cartridge file format, model fingerprints,
//! manifests and the registry's API bodies. No I/O beyond reading and writing these formats.

pub mod api;
pub mod canonical;
pub mod digest;
pub mod dtype;
pub mod file;
pub mod fingerprint;
pub mod manifest;
#[cfg(feature = "prometheus")]
pub mod metrics;
pub mod paths;
pub mod reference;
pub mod report;

pub use digest::Digest;
pub use dtype::Dtype;
pub use fingerprint::ModelFingerprint;
pub use reference::Reference;

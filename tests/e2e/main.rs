//! End-to-end tests: the real `cartridge`, `cartridge-registry` and `cartridge-loader` binaries
//! on real files, on loopback ports, against a real S3-compatible server.

mod chat;
mod loader;
#[path = "../support/moto.rs"]
mod moto;
mod offline;
mod registry;
mod serve;
mod support;
mod trainer;

//! End-to-end tests: the real `cartridge` and `cartridge-registry` binaries on real files, on
//! loopback ports, against a real S3-compatible server.

#[path = "../support/moto.rs"]
mod moto;
mod offline;
mod registry;
mod support;
mod trainer;

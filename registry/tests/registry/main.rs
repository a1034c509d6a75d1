//! The registry's integration tests: the storage conformance suite against every backend (a real
//! S3-compatible server included) and the HTTP API called in-process.

mod api;
mod conformance;
#[cfg(feature = "lambda")]
mod lambda;
#[path = "../../../tests/support/moto.rs"]
mod moto;
mod races;
mod server;
mod support;

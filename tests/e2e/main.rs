//! End-to-end tests: the real `cartridge` binary on real files.

mod offline;
mod support;

pub mod compose;
pub mod eval;
pub mod import;
pub mod inspect;
pub mod login;
pub mod ls;
pub mod model;
pub mod namespace;
pub mod pull;
pub mod push;
pub mod rm;
pub mod tag;
pub mod train;
pub mod verify;

use std::sync::Arc;

use anyhow::{Context, Result};
use bytesize::ByteSize;
use cartridge_client::{Client, RateLimit};
use cartridge_schemas::reference::Registry;
use clap::Args;

use cartridge_schemas::paths::Paths;

/// Which registry to talk to, for commands whose reference names none.
#[derive(Debug, Args)]
pub struct RegistryArgs {
    /// Registry URL; defaults to the one `cartridge login` saved.
    #[arg(long, env = "CARTRIDGE_REGISTRY", global = true)]
    pub registry: Option<String>,
}

impl RegistryArgs {
    pub fn connect(&self, from_reference: Option<&Registry>) -> Result<Client> {
        crate::config::connect(
            &Paths::from_env()?,
            from_reference,
            self.registry.as_deref(),
        )
    }
}

/// Transfer settings shared by push and pull.
#[derive(Debug, Args)]
pub struct TransferArgs {
    /// Blobs transferred at once.
    #[arg(long, default_value_t = 8)]
    pub jobs: usize,
    /// Cap on the combined transfer rate, per second (e.g. 20MiB).
    #[arg(long)]
    pub limit_rate: Option<ByteSize>,
}

impl TransferArgs {
    pub fn rate(&self) -> Option<Arc<RateLimit>> {
        self.limit_rate
            .map(|rate| Arc::new(RateLimit::new(rate.as_u64())))
    }
}

/// A multi-threaded runtime for the network commands.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new().context("starting the async runtime")
}

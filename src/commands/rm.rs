use anyhow::{Result, bail};
use cartridge_schemas::Reference;
use cartridge_schemas::reference::Selector;
use clap::Args;

use super::RegistryArgs;

/// Delete a version (needs admin; its blobs go at the next garbage collection) or a tag.
#[derive(Debug, Args)]
pub struct RmArgs {
    /// ns/name@version or ns/name@tag.
    pub reference: Reference,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

pub fn run(args: RmArgs) -> Result<()> {
    let client = args.registry.connect(args.reference.registry.as_ref())?;
    let repo = &args.reference.repository;
    let runtime = super::runtime()?;
    match &args.reference.selector {
        Selector::Version(version) => runtime.block_on(client.delete_version(repo, version))?,
        Selector::Tag(tag) => runtime.block_on(client.delete_tag(repo, tag))?,
        Selector::Digest(_) => bail!(
            "{}: remove a version or a tag, not a digest",
            args.reference
        ),
    }
    println!("removed {}", args.reference);
    Ok(())
}

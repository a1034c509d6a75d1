use anyhow::Result;
use cartridge_schemas::Reference;
use cartridge_schemas::reference::{ReferenceError, Selector};
use clap::Args;

use super::RegistryArgs;

/// Delete a version (needs admin; its blobs go at the next garbage collection; refused while a
/// tag points at it) or a tag.
#[derive(Debug, Args)]
pub struct RmArgs {
    /// ns/name@version or ns/name@tag, named in full (`latest` too).
    pub reference: Named,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

pub fn run(args: RmArgs) -> Result<()> {
    let Named(reference) = args.reference;
    let client = args.registry.connect(reference.registry.as_ref())?;
    let repo = &reference.repository;
    let runtime = super::runtime()?;
    match &reference.selector {
        Selector::Version(version) => runtime.block_on(client.delete_version(repo, version))?,
        Selector::Tag(tag) => runtime.block_on(client.delete_tag(repo, tag))?,
        Selector::Digest(_) => unreachable!("refused when parsed"),
    }
    println!("removed {reference}");
    Ok(())
}

/// A reference that names its version or tag: one without means `latest`, which a deletion
/// must say (`rm legal/contracts` reads as removing the cartridge, and would remove a tag).
#[derive(Debug, Clone)]
pub struct Named(Reference);

impl std::str::FromStr for Named {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let reference: Reference = text.parse().map_err(|e: ReferenceError| e.to_string())?;
        if !text.contains('@') {
            return Err(format!(
                "name the version or tag to remove (e.g. {text}@latest)"
            ));
        }
        if let Selector::Digest(_) = reference.selector {
            return Err("remove a version or a tag, not a digest".into());
        }
        Ok(Self(reference))
    }
}

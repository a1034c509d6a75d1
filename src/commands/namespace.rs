use anyhow::Result;
use cartridge_schemas::api::NamespaceSettings;
use cartridge_schemas::reference::Namespace;
use clap::{Args, Subcommand};

use super::RegistryArgs;

/// Namespace settings (needs admin on the namespace).
#[derive(Debug, Args)]
pub struct NamespaceArgs {
    #[command(subcommand)]
    pub command: NamespaceCommand,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(Debug, Subcommand)]
pub enum NamespaceCommand {
    /// Change a namespace's settings.
    Set {
        /// The namespace (the first part of `ns/name`).
        namespace: Namespace,
        /// Let anyone pull from the namespace without a token.
        #[arg(long, action = clap::ArgAction::Set)]
        anonymous_pull: bool,
    },
}

pub fn run(args: NamespaceArgs) -> Result<()> {
    let client = args.registry.connect(None)?;
    match args.command {
        NamespaceCommand::Set {
            namespace,
            anonymous_pull,
        } => {
            let settings = super::runtime()?.block_on(
                client.set_namespace_settings(&namespace, &NamespaceSettings { anonymous_pull }),
            )?;
            println!(
                "{namespace}: anonymous pull {}",
                if settings.anonymous_pull { "on" } else { "off" }
            );
        }
    }
    Ok(())
}

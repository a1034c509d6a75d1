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
    /// Show a namespace's settings.
    Get {
        /// The namespace (the first part of `ns/name`).
        namespace: Namespace,
    },
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
    let runtime = super::runtime()?;
    let show = |namespace: &Namespace, settings: &NamespaceSettings| {
        let state = if settings.anonymous_pull { "on" } else { "off" };
        println!("{namespace}: anonymous pull {state}");
    };
    match args.command {
        NamespaceCommand::Get { namespace } => {
            show(
                &namespace,
                &runtime.block_on(client.namespace_settings(&namespace))?,
            );
        }
        NamespaceCommand::Set {
            namespace,
            anonymous_pull,
        } => {
            let settings = runtime.block_on(
                client.set_namespace_settings(&namespace, &NamespaceSettings { anonymous_pull }),
            )?;
            show(&namespace, &settings);
            // A mistyped namespace takes settings as readily as the intended one.
            if runtime
                .block_on(client.names(&namespace))
                .is_ok_and(|list| list.names.is_empty())
            {
                eprintln!(
                    "warning: {namespace} holds no cartridges yet; its settings apply to what is pushed there"
                );
            }
        }
    }
    Ok(())
}

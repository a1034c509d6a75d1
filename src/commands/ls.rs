use anyhow::{Result, bail};
use cartridge_schemas::reference::{Namespace, Reference, Registry};
use clap::Args;

use super::RegistryArgs;

/// List namespaces, the cartridges of a namespace (NS), or the versions and tags of one (NS/NAME).
#[derive(Debug, Args)]
pub struct LsArgs {
    /// Nothing, a namespace, or namespace/name; a registry named as `host:port` may come first
    /// (`host:port`, `host:port/ns`, `host[:port]/ns/name`).
    pub what: Option<String>,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: LsArgs) -> Result<()> {
    let runtime = super::runtime()?;
    let print = |value: serde_json::Value, lines: Vec<String>| -> Result<()> {
        if args.json {
            println!("{}", serde_json::to_string_pretty(&value)?);
        } else {
            lines.iter().for_each(|line| println!("{line}"));
        }
        Ok(())
    };
    // A leading `host:port` names the registry; a name without a port could be a namespace
    // (`my.team/x`, `localhost/x`), so a host without one is named in full references only.
    let (host, what) = match args
        .what
        .as_deref()
        .map(|w| w.split_once('/').unwrap_or((w, "")))
    {
        Some((first, rest)) if first.contains(':') && rest.matches('/').count() < 2 => {
            let host: Registry = first.parse()?;
            (Some(host), Some(rest).filter(|r| !r.is_empty()))
        }
        _ => (None, args.what.as_deref()),
    };
    match what {
        None => {
            let client = args.registry.connect(host.as_ref())?;
            let list = runtime.block_on(client.namespaces())?;
            let lines = list.namespaces.iter().map(ToString::to_string).collect();
            print(serde_json::to_value(&list)?, lines)
        }
        Some(what) if what.contains('/') => {
            // A repository, on a named registry too (`host:port/ns/name`), as other commands
            // take references.
            if what.contains('@') {
                bail!("{what}: ls lists every version and tag of a repository; leave out the @…");
            }
            let reference: Reference = what.parse()?;
            let client = args
                .registry
                .connect(reference.registry.as_ref().or(host.as_ref()))?;
            let repo = reference.repository;
            let listing = runtime.block_on(client.listing(&repo))?;
            let mut lines: Vec<String> = listing
                .versions
                .iter()
                .map(|v| format!("{repo}@{}  {}", v.version, v.manifest))
                .collect();
            lines.extend(listing.tags.iter().map(|t| {
                format!(
                    "{repo}@{}  {}  (tag, generation {})",
                    t.tag, t.manifest, t.generation
                )
            }));
            print(serde_json::to_value(&listing)?, lines)
        }
        Some(namespace) => {
            let namespace: Namespace = namespace.parse()?;
            let client = args.registry.connect(host.as_ref())?;
            let list = runtime.block_on(client.names(&namespace))?;
            let lines = list
                .names
                .iter()
                .map(|name| format!("{namespace}/{name}"))
                .collect();
            print(serde_json::to_value(&list)?, lines)
        }
    }
}

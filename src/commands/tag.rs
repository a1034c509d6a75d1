use anyhow::Result;
use cartridge_schemas::Reference;
use cartridge_schemas::api::TagUpdate;
use cartridge_schemas::reference::Tag;
use clap::Args;

use super::RegistryArgs;

/// Point TAG of REF's cartridge at what REF resolves to (e.g. `tag legal/contracts@v3 stable`).
#[derive(Debug, Args)]
pub struct TagArgs {
    /// What the tag should point at: `[host[:port]/]ns/name@version|@tag|@blake3:<hex>`.
    pub reference: Reference,
    /// The tag to point there (created if absent).
    pub tag: Tag,
    /// Move only if the tag still points at this manifest digest (compare-and-swap).
    #[arg(long)]
    pub if_matches: Option<cartridge_schemas::Digest>,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: TagArgs) -> Result<()> {
    let client = args.registry.connect(args.reference.registry.as_ref())?;
    let repo = &args.reference.repository;
    let entry = super::runtime()?.block_on(async {
        let resolved = client.resolve(repo, &args.reference.selector).await?;
        let update = TagUpdate {
            manifest: resolved.digest,
            if_matches: args.if_matches,
            if_absent: false,
        };
        // Deferred while a garbage collection runs: tried again, as a push does.
        cartridge_client::move_tag_patiently(&client, repo, &args.tag, &update).await
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&entry)?);
    } else {
        println!(
            "{repo}@{} -> {} (generation {})",
            entry.tag, entry.manifest, entry.generation
        );
    }
    Ok(())
}

use anyhow::Result;
use cartridge_schemas::Reference;
use cartridge_schemas::api::{ErrorCode, TagUpdate};
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
        // The compare-and-swap also holds the generation it saw: a move tried again after its
        // answer was lost cannot then undo a move back to the expected manifest meanwhile.
        let if_generation = match args.if_matches {
            Some(expected) => {
                let seen = client
                    .tags(repo)
                    .await?
                    .into_iter()
                    .find(|entry| entry.tag == args.tag);
                match seen {
                    Some(entry) if entry.manifest == expected => Some(entry.generation),
                    seen => {
                        return Err(anyhow::Error::new(NotMoved(format!(
                            "{repo}@{} points at {}, not {expected}: not moved",
                            args.tag,
                            seen.map_or("nothing".into(), |e| e.manifest.to_string())
                        ))));
                    }
                }
            }
            None => None,
        };
        let update = TagUpdate {
            manifest: resolved.digest,
            if_matches: args.if_matches,
            if_generation,
            if_absent: false,
        };
        // Deferred while a garbage collection runs: tried again, as a push does.
        match cartridge_client::move_tag_patiently(&client, repo, &args.tag, &update).await {
            // A registry from before if_generation refuses the field: the plain compare-and-swap
            // it knows is the most it offers.
            Err(error)
                if update.if_generation.is_some()
                    && error.code() == Some(ErrorCode::BadRequest)
                    && error.to_string().contains("if_generation") =>
            {
                eprintln!(
                    "warning: this registry compares the manifest only, not the tag's generation"
                );
                let plain = TagUpdate {
                    if_generation: None,
                    ..update
                };
                Ok(cartridge_client::move_tag_patiently(&client, repo, &args.tag, &plain).await?)
            }
            moved => Ok(moved?),
        }
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

/// `--if-matches` found the tag elsewhere: an answer, not a failure to run.
#[derive(Debug)]
struct NotMoved(String);

impl std::fmt::Display for NotMoved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotMoved {}

/// The exit status of a compare-and-swap that found the tag moved, here or at the registry,
/// which scripts tell from other failures.
pub const NOT_MOVED_STATUS: u8 = 3;

/// Whether `error` is a compare-and-swap that found the tag moved.
pub fn not_moved(error: &anyhow::Error) -> bool {
    error.is::<NotMoved>()
        || error
            .downcast_ref::<cartridge_client::ClientError>()
            .is_some_and(|e| e.code() == Some(ErrorCode::TagMoved))
}

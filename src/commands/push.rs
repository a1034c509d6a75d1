use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use bytesize::ByteSize;
use cartridge_client::{PushOptions, push};
use cartridge_codec::EncodeOptions;
use cartridge_schemas::Reference;
use cartridge_schemas::reference::{Selector, Tag};
use clap::Args;

use super::{RegistryArgs, TransferArgs};
use crate::output::human_bytes;
use crate::progress::Bar;

/// Publish a cartridge file as REF (which must name a version, e.g. legal/contracts@v3). Only
/// chunks the registry lacks are uploaded. `latest` moves to the new version unless --no-latest.
#[derive(Debug, Args)]
pub struct PushArgs {
    /// `[host[:port]/]ns/name@version`: the version to publish.
    pub reference: Reference,
    /// The cartridge file (.safetensors).
    pub file: PathBuf,
    /// Also point these tags at the new version (repeatable).
    #[arg(long = "tag")]
    pub tags: Vec<Tag>,
    /// Leave the `latest` tag where it is.
    #[arg(long)]
    pub no_latest: bool,
    /// zstd level.
    #[arg(long, default_value_t = cartridge_codec::DEFAULT_LEVEL)]
    pub level: i32,
    /// Target raw size of a chunk (whole layers).
    #[arg(long, default_value = "4MiB")]
    pub chunk_size: ByteSize,
    #[command(flatten)]
    pub transfer: TransferArgs,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Print a JSON report.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: PushArgs) -> Result<()> {
    let Selector::Version(version) = &args.reference.selector else {
        bail!(
            "{}: push needs a version (e.g. {}@v1); tags move with --tag",
            args.reference,
            args.reference.repository
        );
    };
    let client = args.registry.connect(args.reference.registry.as_ref())?;
    let mut tags = args.tags.clone();
    if !args.no_latest && !tags.contains(&Tag::latest()) {
        tags.push(Tag::latest());
    }
    let options = PushOptions {
        encode: EncodeOptions {
            level: args.level,
            target_chunk_bytes: args.chunk_size.as_u64(),
            shuffle: true,
        },
        jobs: args.transfer.jobs,
        tags,
        rate: args.transfer.rate(),
    };
    let bar = Bar::new(&format!("push {}", args.reference), args.json);
    let report = super::runtime()?
        .block_on(push(
            &client,
            &args.reference.repository,
            version,
            &args.file,
            &options,
            &bar,
        ))
        .with_context(|| format!("pushing {}", args.file.display()))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if report.already_published {
        println!(
            "{} already holds this cartridge ({}): nothing to publish",
            report.reference, report.digest
        );
        for tag in &report.tags {
            println!("tagged {tag}");
        }
        for tag in &report.tags_left {
            println!(
                "left {tag} on the version it names (`cartridge tag {} {}` moves it here)",
                report.reference,
                tag.rsplit('@').next().unwrap_or("latest")
            );
        }
    } else {
        println!(
            "pushed {} ({}): {} chunks, {} uploaded in {} blobs, {} reused; {} stored for {} payload",
            report.reference,
            report.digest,
            report.chunks,
            human_bytes(report.uploaded_bytes),
            report.uploaded_blobs,
            report.reused_blobs,
            human_bytes(report.stored_bytes),
            human_bytes(report.payload_bytes)
        );
        for tag in &report.tags {
            println!("tagged {tag}");
        }
    }
    Ok(())
}

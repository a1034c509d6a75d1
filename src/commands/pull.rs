use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use cartridge_client::{Cache, PullOptions, pull};
use cartridge_schemas::Reference;
use clap::Args;

use super::{RegistryArgs, TransferArgs};
use crate::output::human_bytes;
use crate::progress::Bar;
use cartridge_schemas::paths::Paths;

/// Fetch a cartridge into the local cache (resuming an interrupted pull, verifying every chunk)
/// and print its path.
#[derive(Debug, Args)]
pub struct PullArgs {
    pub reference: Reference,
    /// Also copy the cartridge here.
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Drop and resume a download that receives nothing for this long.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub stall_timeout: Duration,
    #[command(flatten)]
    pub transfer: TransferArgs,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Print a JSON report.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: PullArgs) -> Result<()> {
    let client = args.registry.connect(args.reference.registry.as_ref())?;
    let cache = Cache::new(Paths::from_env()?.cache)?;
    let options = PullOptions {
        jobs: args.transfer.jobs,
        stall_timeout: args.stall_timeout,
        rate: args.transfer.rate(),
        ..PullOptions::default()
    };
    let bar = Bar::new(&format!("pull {}", args.reference), args.json);
    let report = super::runtime()?.block_on(pull(
        &client,
        &args.reference.repository,
        &args.reference.selector,
        &cache,
        &options,
        &bar,
    ))?;
    if let Some(output) = &args.output {
        copy_atomically(&report.path, output)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        if report.downloaded_bytes > 0 || report.resumed_bytes > 0 {
            eprintln!(
                "pulled {} ({}): {} downloaded, {} resumed, {} of {} blobs cached",
                report.reference,
                report.digest,
                human_bytes(report.downloaded_bytes),
                human_bytes(report.resumed_bytes),
                report.cached_blobs,
                report.blobs
            );
        }
        println!("{}", args.output.as_ref().unwrap_or(&report.path).display());
    }
    Ok(())
}

/// Links (or, across filesystems, copies) the cached file next to the destination, then renames,
/// so a reader never sees half a file. Cached files are never written in place, and every use
/// of one re-validates it, so sharing the inode with the cache is safe.
fn copy_atomically(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    // Beside the destination, named after all of it (`x.safetensors.partial`): `with_extension`
    // would make `x.partial`, which may be someone's file.
    let mut temporary = to.as_os_str().to_owned();
    temporary.push(".partial");
    let temporary = std::path::PathBuf::from(temporary);
    let _ = std::fs::remove_file(&temporary);
    if std::fs::hard_link(from, &temporary).is_err() {
        std::fs::copy(from, &temporary)
            .with_context(|| format!("writing {}", temporary.display()))?;
    }
    std::fs::rename(&temporary, to).with_context(|| format!("writing {}", to.display()))
}

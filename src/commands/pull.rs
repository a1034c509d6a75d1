use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// `[host[:port]/]ns/name[@version|@tag|@blake3:<hex>]` (the tag `latest` if none).
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
    // A destination that cannot take the file is refused before the transfer, not after it.
    if let Some(output) = &args.output {
        cartridge_schemas::file::check_destination(output)
            .with_context(|| format!("cannot write {}", output.display()))?;
    }
    let bar = Bar::new(&format!("pull {}", args.reference), args.json);
    let runtime = super::runtime()?;
    let interrupted = Arc::new(AtomicBool::new(false));
    let listening = !super::sigint_ignored();
    // Interrupted, the pull stops where it is: what it downloaded stays to resume from, and
    // the half-built cartridge goes (its builder sees the downloads end) before the runtime
    // does; so does a half-made copy for -o (the copy sees `interrupted`). Further Ctrl-Cs
    // wait for that (a pull caught in its last decode finishes it first).
    let pulled = runtime.block_on(async {
        let work = async {
            let report = pull(
                &client,
                &args.reference.repository,
                &args.reference.selector,
                &cache,
                &options,
                &bar,
            )
            .await?;
            if let Some(output) = args.output.clone() {
                let (from, interrupted) = (report.path.clone(), interrupted.clone());
                tokio::task::spawn_blocking(move || copy_atomically(&from, &output, &interrupted))
                    .await??;
            }
            anyhow::Ok(report)
        };
        tokio::select! {
            report = work => Some(report),
            _ = async {
                if listening {
                    tokio::signal::ctrl_c().await
                } else {
                    std::future::pending().await
                }
            } => {
                interrupted.store(true, Ordering::Relaxed);
                None
            }
        }
    });
    drop(runtime);
    let Some(report) = pulled else {
        bar.abandon();
        eprintln!("interrupted; a later pull resumes what was downloaded");
        super::end_interrupted();
    };
    let report = report?;
    if args.json {
        let mut json = serde_json::to_value(&report)?;
        if let Some(output) = &args.output {
            json["output"] = output.display().to_string().into();
        }
        println!("{}", serde_json::to_string_pretty(&json)?);
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

/// Bytes `pull -o` copies between looks at whether it was interrupted.
const COPY_PIECE: u64 = 64 << 20;

/// Links (or, across filesystems, copies) the cached file next to the destination, then renames,
/// so a reader never sees half a file. Cached files are never written in place, and every use
/// of one re-validates it, so sharing the inode with the cache is safe. A copy stops, and goes,
/// once `interrupted` is set.
fn copy_atomically(from: &Path, to: &Path, interrupted: &AtomicBool) -> Result<()> {
    cartridge_schemas::file::check_destination(to)
        .with_context(|| format!("cannot write {}", to.display()))?;
    // Already the cached file (an earlier pull linked it there, or -o names the cache entry): a
    // rename between two names of one file does nothing and would leave the new name behind.
    if same_file(from, to) {
        return Ok(());
    }
    // Under a name of its own beside the destination (the rename stays on one filesystem, and
    // never lands on a file someone else put there): linked where it can be, else copied and
    // synced; removed if anything fails.
    let dir = to
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut builder = tempfile::Builder::new();
    builder.prefix(".cartridge-pull-");
    let temporary = match builder.make_in(dir, |path| std::fs::hard_link(from, path)) {
        // The cache's file is written back lazily: on disk before a name the user reads
        // points at it.
        Ok(linked) => {
            std::fs::File::open(from)
                .and_then(|file| file.sync_all())
                .with_context(|| format!("syncing {}", from.display()))?;
            linked.into_temp_path()
        }
        Err(_) => {
            let copy = builder
                .tempfile_in(dir)
                .with_context(|| format!("writing beside {}", to.display()))?;
            copy_into(from, copy, interrupted)?.into_temp_path()
        }
    };
    // Interrupted while it synced, the copy goes too: what exits interrupted writes nothing.
    anyhow::ensure!(!interrupted.load(Ordering::Relaxed), "interrupted");
    temporary
        .persist(to)
        .with_context(|| format!("writing {}", to.display()))
}

/// Copies `from` into `copy`, with its permissions, and syncs it; stops once `interrupted` is
/// set (dropped, the copy goes).
fn copy_into(
    from: &Path,
    mut copy: tempfile::NamedTempFile,
    interrupted: &AtomicBool,
) -> Result<tempfile::NamedTempFile> {
    let path = copy.path().to_owned();
    let writing = || format!("writing {}", path.display());
    let source =
        std::fs::File::open(from).with_context(|| format!("reading {}", from.display()))?;
    // In pieces, to see an interruption; each `take` of a file still copies in the kernel
    // where it can.
    loop {
        anyhow::ensure!(!interrupted.load(Ordering::Relaxed), "interrupted");
        let copied = std::io::copy(&mut (&source).take(COPY_PIECE), copy.as_file_mut());
        if copied.with_context(writing)? == 0 {
            break;
        }
    }
    let mode = std::fs::metadata(from)
        .with_context(|| format!("reading {}", from.display()))?
        .permissions();
    copy.as_file().set_permissions(mode).with_context(writing)?;
    copy.as_file().sync_all().with_context(writing)?;
    Ok(copy)
}

/// Whether two paths name one file.
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interrupted_copy_leaves_nothing_beside_the_destination() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let from = dir.path().join("cached");
        std::fs::write(&from, b"cartridge bytes")?;
        let beside = tempfile::tempdir()?;
        let fresh = || tempfile::Builder::new().tempfile_in(beside.path());
        let copied = copy_into(&from, fresh()?, &AtomicBool::new(false))?;
        assert_eq!(std::fs::read(copied.path())?, b"cartridge bytes");
        drop(copied);
        let error = copy_into(&from, fresh()?, &AtomicBool::new(true)).unwrap_err();
        assert_eq!(error.to_string(), "interrupted");
        assert_eq!(std::fs::read_dir(beside.path())?.count(), 0);
        Ok(())
    }
}

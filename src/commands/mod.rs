pub mod chat;
pub mod compose;
pub mod eval;
pub mod import;
pub mod inspect;
pub mod login;
pub mod ls;
pub mod model;
pub mod namespace;
pub mod pull;
pub mod push;
pub mod rm;
pub mod serve;
pub mod tag;
pub mod train;
pub mod verify;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use bytesize::ByteSize;
use cartridge_client::{Client, RateLimit};
use cartridge_schemas::Reference;
use cartridge_schemas::reference::Registry;
use clap::Args;

use cartridge_schemas::paths::Paths;

/// Ends the process as Ctrl-C's default action would, once what was interrupted is cleaned up:
/// a shell running it in a loop or a script then sees the interrupt and stops too (an exit
/// status of 130 would read as the command handling it and the script going on).
#[allow(unsafe_code)]
pub fn end_interrupted() -> ! {
    // SAFETY: the signal's default action, then the signal: the process ends by it.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_DFL);
        libc::raise(libc::SIGINT);
    }
    // Reached only where SIGINT is blocked.
    std::process::exit(130)
}

/// Whether SIGINT is ignored, as a shell leaves it for a command it starts in the background:
/// such a command is not one for Ctrl-C to stop.
#[allow(unsafe_code)]
pub fn sigint_ignored() -> bool {
    // SAFETY: reads the disposition, changing nothing.
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGINT, std::ptr::null(), &mut current) == 0
            && current.sa_sigaction == libc::SIG_IGN
    }
}

/// A cartridge named on the command line: a file here, else a reference to one in a registry.
pub enum Target {
    File(PathBuf),
    Reference(Reference),
}

impl Target {
    pub fn parse(target: &str) -> Result<Self> {
        // A folder (or anything but a file) that happens to share a reference's name is no
        // cartridge: the reference is meant.
        let path = Path::new(target);
        if path.is_file() {
            return Ok(Self::File(path.to_owned()));
        }
        match target.parse() {
            Ok(reference) => Ok(Self::Reference(reference)),
            Err(error) => bail!("{target} is not a file, and not a reference: {error}"),
        }
    }
}

/// What a registry made of `target`, read as a reference. `out/missing.safetensors` reads as
/// one too: one named like a file, or in a folder that is here, is far more likely a mistyped
/// path than a cartridge in a registry, and its error says so first.
pub fn looked_up<T>(target: &str, result: Result<T>) -> Result<T> {
    let path = Path::new(target);
    let file_like = path.extension().is_some_and(|e| e == "safetensors")
        || path
            .parent()
            .is_some_and(|p| !p.as_os_str().is_empty() && p.is_dir());
    match result {
        Err(error) if file_like => {
            Err(error.context(format!("there is no file {target}; as a reference")))
        }
        result => result,
    }
}

/// Which registry to talk to, for commands whose reference names none.
#[derive(Debug, Args)]
pub struct RegistryArgs {
    /// Registry URL; defaults to the one `cartridge login` saved.
    #[arg(long, env = "CARTRIDGE_REGISTRY", global = true)]
    pub registry: Option<String>,
}

impl RegistryArgs {
    pub fn connect(&self, from_reference: Option<&Registry>) -> Result<Client> {
        crate::config::connect(
            &Paths::from_env()?,
            from_reference,
            self.registry.as_deref(),
        )
    }
}

/// Transfer settings shared by push and pull.
#[derive(Debug, Args)]
pub struct TransferArgs {
    /// Blobs transferred at once.
    #[arg(long, default_value_t = 8)]
    pub jobs: usize,
    /// Cap on the combined transfer rate, per second (e.g. 20MiB).
    #[arg(long, value_parser = cartridge_client::parse_rate)]
    pub limit_rate: Option<ByteSize>,
}

impl TransferArgs {
    pub fn rate(&self) -> Option<Arc<RateLimit>> {
        self.limit_rate
            .map(|rate| Arc::new(RateLimit::new(rate.as_u64())))
    }
}

/// What a command reads, which what it writes must not land on.
pub enum Input {
    Corpus,
    Model,
    /// A file it converts or combines.
    File,
}

/// Refuses an output that would write over an input, or land inside an input folder: inside a
/// corpus folder the next run would read it as corpus, inside a model folder as part of the
/// model.
pub fn check_outputs(outputs: &[(&str, &Path)], inputs: &[(Input, &Path)]) -> Result<()> {
    let inputs: Vec<(&Input, PathBuf)> = inputs
        .iter()
        .filter_map(|(kind, path)| Some((kind, path.canonicalize().ok()?)))
        .collect();
    for (what, path) in outputs {
        let resolved = cartridge_trainer::pipeline::resolve(path);
        // A file's path starts with nothing but itself.
        if let Some((kind, inside)) = inputs.iter().find(|(_, c)| resolved.starts_with(c)) {
            let (place, harm) = match (inside.is_dir(), kind) {
                (true, Input::Corpus) => (
                    "lies inside the corpus folder",
                    "the next run would read it as corpus",
                ),
                (true, Input::Model) => (
                    "lies inside the model folder",
                    "it would be read as part of the model",
                ),
                (true, Input::File) => ("lies inside the input folder", "it would be read as one"),
                (false, Input::Corpus) => ("is the corpus file", "it would be written over"),
                (false, Input::Model) => ("is the model file", "it would be written over"),
                (false, Input::File) => ("is the input file", "it would be written over"),
            };
            bail!(
                "the {what} {} {place} {}: {harm}",
                path.display(),
                inside.display()
            );
        }
    }
    Ok(())
}

/// A multi-threaded runtime for the network commands.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new().context("starting the async runtime")
}

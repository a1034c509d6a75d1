//! `cartridge-registry`: serve the registry, collect garbage, mint tokens, manage keys.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytesize::ByteSize;
use cartridge_registry::auth::{Keyring, Scope};
use cartridge_registry::gc::{self, GcOptions};
use cartridge_registry::{AppState, Limits, backend, routes, server};
use cartridge_schemas::paths::{cartridge_home, xdg_dir};
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "cartridge-registry",
    version,
    about = "The cartridge registry: content-addressed, versioned cartridges in object storage"
)]
struct Cli {
    /// Without one, the binary runs as Lambda runs a deployment's `bootstrap` (no arguments):
    /// the `lambda` command where the Lambda Runtime API is named, else this help.
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the HTTP API until Ctrl-C or SIGTERM.
    Serve(ServeArgs),
    /// Delete blobs and manifests nothing references that are older than the grace period.
    Gc(GcArgs),
    /// Mint bearer tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Manage the signing keys tokens are verified with.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Serve the same API from AWS Lambda (storage and keys from the environment).
    #[cfg(feature = "lambda")]
    Lambda,
}

#[derive(Debug, Args)]
struct StorageArgs {
    /// Where everything is stored: file://DIR, s3://bucket[/prefix] (AWS_* variables configure the
    /// client and endpoint) or memory://. Defaults to a directory in the user's data folder.
    #[arg(long, env = "CARTRIDGE_REGISTRY_STORAGE")]
    storage: Option<String>,
}

impl StorageArgs {
    fn url(&self) -> Result<String> {
        match &self.storage {
            Some(url) => Ok(url.clone()),
            None => Ok(format!("file://{}", data_dir()?.join("registry").display())),
        }
    }
}

#[derive(Debug, Args)]
struct KeysArgs {
    /// The keyring file (JSON). `CARTRIDGE_REGISTRY_KEYS` may instead hold the keyring itself.
    #[arg(long, env = "CARTRIDGE_REGISTRY_KEYS_FILE")]
    keys: Option<PathBuf>,
}

impl KeysArgs {
    fn path(&self) -> Result<PathBuf> {
        match &self.keys {
            Some(path) => Ok(path.clone()),
            None => Ok(config_dir()?.join("registry-keys.json")),
        }
    }

    fn load(&self) -> Result<Keyring> {
        if let Ok(json) = std::env::var("CARTRIDGE_REGISTRY_KEYS") {
            // Two keyrings named: signing or checking with the one not meant is worse than
            // stopping.
            anyhow::ensure!(
                self.keys.is_none(),
                "both CARTRIDGE_REGISTRY_KEYS (a keyring) and --keys or CARTRIDGE_REGISTRY_KEYS_FILE (a keyring file) are given; name one"
            );
            return Ok(Keyring::from_json(&json, "CARTRIDGE_REGISTRY_KEYS")?);
        }
        Ok(Keyring::load(&self.path()?)?)
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
struct ServeArgs {
    #[command(flatten)]
    storage: StorageArgs,
    #[command(flatten)]
    keys: KeysArgs,
    /// Address to listen on; port 0 picks a free one (the address is printed).
    #[arg(
        long,
        env = "CARTRIDGE_REGISTRY_LISTEN",
        default_value = "127.0.0.1:7070"
    )]
    listen: SocketAddr,
    /// Log format.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Largest blob accepted.
    #[arg(long, default_value = "256MiB")]
    max_blob_size: ByteSize,
    /// Largest JSON body accepted (manifests, requests).
    #[arg(long, default_value = "4MiB")]
    max_json_size: ByteSize,
}

/// The shortest grace a collection may run with.
const MIN_GRACE: Duration = Duration::from_secs(10 * 60);

#[derive(Debug, Args)]
struct GcArgs {
    #[command(flatten)]
    storage: StorageArgs,
    /// Objects younger than this are kept: it must exceed the longest push (at least 10m).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// List what would be deleted without deleting.
    #[arg(long)]
    dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Mint a token signed with the current signing key.
    Create {
        #[command(flatten)]
        keys: KeysArgs,
        /// What the token grants: `*:admin`, `legal/*:pull`, `legal/contracts:push`, … (repeatable).
        #[arg(long = "scope", required = true)]
        scopes: Vec<Scope>,
        /// How long the token is valid (at most 10 years).
        #[arg(long, default_value = "30d", value_parser = token_ttl)]
        ttl: Duration,
        /// Who the token is for (recorded in logs).
        #[arg(long, default_value = "cli")]
        subject: String,
    },
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Create a keyring with one signing key (refuses to overwrite one).
    Init(KeysArgs),
    /// Add a new signing key; tokens signed by older keys stay valid until those are removed.
    Rotate(KeysArgs),
    /// Remove a key: tokens it signed stop being accepted (a serving registry reads its keyring
    /// file again within seconds; one given CARTRIDGE_REGISTRY_KEYS, as on Lambda, on restart).
    Remove {
        #[command(flatten)]
        keys: KeysArgs,
        id: String,
    },
}

/// A token's lifetime: past 10 years the expiry no longer fits the token's clock.
fn token_ttl(text: &str) -> Result<Duration, String> {
    const MAX: Duration = Duration::from_secs(10 * 366 * 24 * 3600);
    match humantime::parse_duration(text) {
        Ok(ttl) if ttl.is_zero() || ttl > MAX => {
            Err("expected more than 0 and at most 10 years".into())
        }
        Ok(ttl) => Ok(ttl),
        Err(error) => Err(error.to_string()),
    }
}

fn data_dir() -> Result<PathBuf> {
    Ok(cartridge_home().map_or_else(|| xdg_dir("XDG_DATA_HOME", ".local/share"), Ok)?)
}

fn config_dir() -> Result<PathBuf> {
    Ok(cartridge_home().map_or_else(|| xdg_dir("XDG_CONFIG_HOME", ".config"), Ok)?)
}

fn init_logging(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// How often a serving registry looks at its keyring file.
const KEYRING_POLL: Duration = Duration::from_secs(3);

/// Takes up changes to the keyring file (`keys rotate`, `keys remove`, a rewritten secret) while
/// serving: a removed key's tokens stop being accepted within seconds, without a restart. The
/// file's bytes are compared (it is small), not its times: a chown that makes it readable, or two
/// writes within one clock tick, count. The first look reloads once, so a change made while the
/// server started is not missed.
async fn watch_keyring(path: PathBuf, state: AppState) {
    let (mut loaded, mut failed) = (None::<Vec<u8>>, None::<String>);
    loop {
        tokio::time::sleep(KEYRING_POLL).await;
        let outcome = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                if loaded.as_ref() == Some(&bytes) {
                    return Ok(None);
                }
                let keyring = Keyring::from_json(
                    &String::from_utf8_lossy(&bytes),
                    &path.display().to_string(),
                )
                .map_err(|e| e.to_string())?;
                Ok(Some((bytes, keyring)))
            });
        match outcome {
            Ok(None) => {}
            Ok(Some((bytes, keyring))) => {
                state.replace_keyring(keyring);
                if loaded.is_some() {
                    tracing::info!(path = %path.display(), "keyring reloaded");
                }
                (loaded, failed) = (Some(bytes), None);
            }
            // Told once per cause, and tried again at every look.
            Err(error) => {
                if failed.as_ref() != Some(&error) {
                    tracing::warn!(%error, path = %path.display(), "the keyring does not load; keeping the one in use");
                    failed = Some(error);
                }
            }
        }
    }
}

fn keyring_for_serve(keys: &KeysArgs) -> Result<Keyring> {
    if std::env::var_os("CARTRIDGE_REGISTRY_KEYS").is_none() {
        let path = keys.path()?;
        if !path.exists() {
            Keyring::generate().save(&path)?;
            tracing::info!(path = %path.display(), "created a signing keyring; mint tokens with `cartridge-registry token create`");
        }
    }
    keys.load()
}

async fn serve(args: ServeArgs) -> Result<()> {
    init_logging(args.log_format);
    let storage = backend::open(&args.storage.url()?)?;
    storage.check_conditional_writes().await?;
    let keyring = keyring_for_serve(&args.keys)?;
    let limits = Limits {
        max_blob_bytes: args.max_blob_size.as_u64(),
        max_json_bytes: args.max_json_size.as_u64() as usize,
        ..Limits::default()
    };
    let description = storage.description().to_owned();
    let state = AppState::new(storage, keyring, limits);
    if std::env::var_os("CARTRIDGE_REGISTRY_KEYS").is_none() {
        tokio::spawn(watch_keyring(args.keys.path()?, state.clone()));
    }
    let changes = state.changes.clone();
    let router = routes::router(state);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let address = listener.local_addr()?;
    tracing::info!(%address, storage = %description, "serving");
    // Scripts and tests read the chosen port from this line.
    println!("listening on http://{address}");
    server::run(
        listener,
        router,
        server::HEADER_READ,
        server::shutdown_signal(),
    )
    .await?;
    // Changes whose callers went away finish before the process does.
    changes.close();
    if tokio::time::timeout(server::DRAIN, changes.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = changes.len(),
            "changes still running after the drain: stopping them"
        );
    }
    Ok(())
}

async fn collect_garbage(args: GcArgs) -> Result<()> {
    init_logging(LogFormat::Text);
    // A publish checks its blobs once a running collection ends (or after waiting 20 s), then
    // writes its version: a collection started meanwhile must still see its manifest young,
    // however many blobs the publish checks.
    if args.grace < MIN_GRACE && !args.dry_run {
        bail!(
            "a grace of {} could delete what a publish in progress has just checked: use at least {}",
            humantime::format_duration(args.grace),
            humantime::format_duration(MIN_GRACE)
        );
    }
    let url = args.storage.url()?;
    // A mistyped folder would be created and found clean: said, not collected.
    if let Some(dir) = url.strip_prefix("file://") {
        anyhow::ensure!(
            std::path::Path::new(dir).is_dir(),
            "nothing is stored at {url}: is it the registry's --storage?"
        );
    }
    let storage = backend::open(&url)?;
    // A dry run writes nothing (read-only credentials do).
    if !args.dry_run {
        storage.check_conditional_writes().await?;
    }
    // Ctrl-C or a job's deadline (SIGTERM) stops it with its lease released.
    let report = gc::collect_until(
        &storage,
        GcOptions {
            grace: args.grace,
            dry_run: args.dry_run,
        },
        server::shutdown_signal(),
    )
    .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let verb = if args.dry_run {
        "would delete"
    } else {
        "deleted"
    };
    for digest in &report.manifests_deleted {
        println!("{verb} manifest {digest}");
    }
    for digest in &report.blobs_deleted {
        println!("{verb} blob {digest}");
    }
    println!(
        "{verb} {} manifests, {} blobs ({}), {} stale uploads, {} links of repositories to \
         content none of their versions holds; kept {} manifests, {} blobs",
        report.manifests_deleted.len(),
        report.blobs_deleted.len(),
        ByteSize::b(report.bytes_freed),
        report.uploads_deleted,
        report.links_deleted,
        report.manifests_kept,
        report.blobs_kept
    );
    Ok(())
}

fn keys(command: KeysCommand) -> Result<()> {
    match command {
        KeysCommand::Init(keys) => {
            let path = keys.path()?;
            if path.exists() {
                bail!("{} exists; use `keys rotate` to add a key", path.display());
            }
            Keyring::generate().save(&path)?;
            println!("{}", path.display());
        }
        KeysCommand::Rotate(keys) => {
            let path = keys.path()?;
            let mut keyring = Keyring::load(&path)?;
            let id = keyring.rotate();
            keyring.save(&path)?;
            println!("new signing key {id} in {}", path.display());
        }
        KeysCommand::Remove { keys, id } => {
            let path = keys.path()?;
            let mut keyring = Keyring::load(&path)?;
            keyring.remove(&id)?;
            keyring.save(&path)?;
            println!("removed key {id} from {}", path.display());
        }
    }
    Ok(())
}

#[cfg(feature = "lambda")]
async fn lambda() -> Result<()> {
    // As `serve` logs: info unless RUST_LOG says otherwise.
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let url = std::env::var("CARTRIDGE_REGISTRY_STORAGE")
        .context("CARTRIDGE_REGISTRY_STORAGE must name the s3:// storage")?;
    // Each instance has its own memory and a scratch /tmp: anything but S3 would lose pushes.
    if !url.starts_with("s3://") {
        bail!("CARTRIDGE_REGISTRY_STORAGE is {url}: on Lambda the storage must be s3://");
    }
    let keys = std::env::var("CARTRIDGE_REGISTRY_KEYS")
        .context("CARTRIDGE_REGISTRY_KEYS must hold the keyring JSON")?;
    let storage = backend::open(&url)?;
    storage.check_conditional_writes().await?;
    let state = AppState::new(
        storage,
        Keyring::from_json(&keys, "CARTRIDGE_REGISTRY_KEYS")?,
        Limits::default(),
    );
    lambda_http::run(routes::router(state))
        .await
        .map_err(|e| anyhow::anyhow!(e))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let lambda_runtime = std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some();
    let command = match cli.command {
        Some(command) => command,
        #[cfg(feature = "lambda")]
        None if lambda_runtime => Command::Lambda,
        None => {
            use clap::CommandFactory;
            let _ = Cli::command().print_help();
            if lambda_runtime {
                eprintln!("\nerror: started by Lambda, but built without the `lambda` feature");
            }
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match command {
            Command::Serve(args) => serve(args).await,
            Command::Gc(args) => collect_garbage(args).await,
            Command::Token {
                command:
                    TokenCommand::Create {
                        keys,
                        scopes,
                        ttl,
                        subject,
                    },
            } => {
                let token = keys.load()?.mint(&subject, &scopes, ttl)?;
                println!("{token}");
                Ok(())
            }
            Command::Keys { command } => keys(command),
            #[cfg(feature = "lambda")]
            Command::Lambda => lambda().await,
        }
    });
    cartridge_schemas::report::exit(result)
}

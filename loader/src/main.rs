//! `cartridge-loader serve`: the sidecar's HTTP API on loopback or a Unix socket.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytesize::ByteSize;
use cartridge_client::{Client, PullOptions};
use cartridge_loader::buffer::ShmDir;
use cartridge_loader::device::Device;
use cartridge_loader::disk::DiskCache;
use cartridge_loader::resolve::Resolver;
use cartridge_loader::{Loader, LoaderOptions, api};
use cartridge_schemas::paths::Paths;
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "cartridge-loader",
    version,
    about = "Sidecar that loads cartridges into device memory on demand"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the loader API until Ctrl-C or SIGTERM.
    Serve(Box<ServeArgs>),
    /// Measure this machine's copy bandwidths into and within a GPU (plain, and a composition's
    /// strided copies), the time to allocate and free a buffer of SIZE and one of four times
    /// SIZE, and to allocate SIZE of page-locked host memory (JSON on stdout): the ceilings of
    /// the loader's own loads and compositions.
    Bandwidth {
        /// The GPU: `cuda` or `cuda:N`.
        #[arg(long, default_value = "cuda")]
        device: DeviceArg,
        /// Bytes per copy.
        #[arg(long, default_value = "256MiB")]
        size: ByteSize,
    },
}

/// `host`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeviceArg {
    Host,
    Cuda(usize),
}

impl std::str::FromStr for DeviceArg {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "host" => Ok(Self::Host),
            "cuda" => Ok(Self::Cuda(0)),
            _ => text
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("`{text}` is not host, cuda or cuda:N")),
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// The registry cartridges come from.
    #[arg(long, env = "CARTRIDGE_REGISTRY")]
    registry: String,
    /// Token for the registry (pull scope).
    #[arg(long, env = "CARTRIDGE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Disk tier: verified blobs and remembered resolutions (default: the user cache's loader/).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Size cap of the disk tier.
    #[arg(long, default_value = "20GiB")]
    disk_cap: ByteSize,
    /// Where resident keys and values live: `cuda` / `cuda:N` (a GPU, handed out by CUDA IPC
    /// handle) or `host` (shared-memory files).
    #[arg(long, default_value = "host")]
    device: DeviceArg,
    /// Byte budget of the device tier (GPU memory, or host memory with `--device host`).
    #[arg(long, default_value = "8GiB")]
    gpu_budget: ByteSize,
    /// Byte budget of the host tier in front of a GPU: decoded cartridges kept in page-locked
    /// memory, so one evicted from the GPU comes back by a single copy.
    #[arg(long, default_value = "16GiB")]
    host_budget: ByteSize,
    /// With `--device host`: the directory in which the loader makes its own folder of buffers,
    /// files other processes can map (default /dev/shm, else the temporary folder). Folders left
    /// by loaders that died are removed at start.
    #[arg(long)]
    shm_dir: Option<PathBuf>,
    /// Address to listen on (loopback by default; port 0 picks a free one, printed).
    #[arg(long, default_value = "127.0.0.1:7071", conflicts_with = "socket")]
    listen: SocketAddr,
    /// Allow `--listen` on an address other machines reach. The API has no authentication:
    /// anyone who reaches it can load, release and read cartridges.
    #[arg(long)]
    allow_remote: bool,
    /// Serve on a Unix socket instead of TCP.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Chunks downloaded at once per cartridge.
    #[arg(long, default_value_t = 8)]
    jobs: usize,
    /// Cap on the loader's download rate, per second (e.g. 200MiB), to leave the node's network
    /// to inference traffic.
    #[arg(long, value_parser = cartridge_client::parse_rate)]
    limit_rate: Option<ByteSize>,
    /// How long a resolved reference is reused without asking the registry again: a moved tag
    /// or a deleted version is seen within this time (0s: every load asks).
    #[arg(long, default_value = "5s")]
    resolve_ttl: humantime::Duration,
    /// Attempts after the first before a download from the registry gives up.
    #[arg(long, default_value_t = 6)]
    retries: usize,
    /// The lease of a load that asks for none (e.g. 10m): its handle is released unless renewed
    /// within it, so a consumer that dies holding one, or never asked, does not hold the memory
    /// for good (default: such a handle lives until released).
    #[arg(long, value_parser = lease)]
    default_lease: Option<Duration>,
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

/// A lease as a load may ask for one: whole seconds, from one to a week.
fn lease(text: &str) -> Result<Duration, String> {
    let lease = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if lease.subsec_nanos() != 0
        || !(1..=cartridge_loader::loader::MAX_LEASE).contains(&lease.as_secs())
    {
        return Err(format!(
            "expected whole seconds from 1s to {}s (a week)",
            cartridge_loader::loader::MAX_LEASE
        ));
    }
    Ok(lease)
}

async fn serve(args: ServeArgs) -> Result<()> {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match args.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    let cache_dir = match &args.cache_dir {
        Some(dir) => dir.clone(),
        None => Paths::from_env()?.cache.join("loader"),
    };
    if args.socket.is_none() && !args.listen.ip().is_loopback() && !args.allow_remote {
        anyhow::bail!(
            "--listen {} is reachable from other machines, and the API has no authentication: listen on loopback, use --socket, or pass --allow-remote",
            args.listen
        );
    }
    cartridge_schemas::metrics::handle();
    // Listening first: a loader refused its socket or port touches nothing of a live one's (its
    // disk cache, which opening would trim to this one's cap).
    let listener = match &args.socket {
        Some(path) => {
            remove_stale_socket(path)?;
            // Consumers in the loader's group connect, as they read its buffers (0640). The
            // socket is made with that mode, not changed to it after: in between, anyone could
            // connect. No other thread makes files yet, so the process-wide mask is ours here.
            let mask = rustix::process::umask(rustix::fs::Mode::from_bits_truncate(0o117));
            let bound = tokio::net::UnixListener::bind(path);
            rustix::process::umask(mask);
            let listener = bound.with_context(|| format!("binding {}", path.display()))?;
            let ours = socket_identity(path)
                .with_context(|| format!("reading {} after binding it", path.display()))?;
            Listener::Unix(listener, path.clone(), ours)
        }
        None => Listener::Tcp(
            tokio::net::TcpListener::bind(args.listen)
                .await
                .with_context(|| format!("binding {}", args.listen))?,
        ),
    };
    let client = Client::new(&args.registry, args.token.clone())?;
    let resolver = Resolver::new(client, &cache_dir, args.resolve_ttl.into())?;
    let disk = DiskCache::open(&cache_dir, args.disk_cap.as_u64())
        .with_context(|| format!("opening {}", cache_dir.display()))?;
    // The buffer folder lives until the end of `serve`, after the last request.
    let (device, shm_dir) = match args.device {
        DeviceArg::Host => {
            let dir = ShmDir::create_in(args.shm_dir.clone())?;
            (Device::host(dir.path()), Some(dir))
        }
        DeviceArg::Cuda(ordinal) => (
            Device::cuda(ordinal, args.host_budget.as_u64()).map_err(anyhow::Error::msg)?,
            None,
        ),
    };
    tracing::info!(device = %device.describe(), "device tier");
    let options = LoaderOptions {
        device: Arc::new(device),
        transfers: PullOptions {
            jobs: args.jobs,
            stall_timeout: Duration::from_secs(30),
            rate: args
                .limit_rate
                .map(|r| Arc::new(cartridge_client::RateLimit::new(r.as_u64()))),
            retries: args.retries,
        },
        default_lease: args.default_lease,
    };
    let loader = Arc::new(Loader::new(
        resolver,
        disk,
        args.gpu_budget.as_u64(),
        options,
    ));
    let router = api::router(loader);
    let (signalled, mut stopping) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        let interrupt = tokio::signal::ctrl_c();
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = interrupt => {},
            _ = async { match terminate.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {},
        }
        tracing::info!("shutting down");
        signalled.send_replace(true);
    };
    // Loads in flight may finish within the grace; a fetch stalled on a slow registry does not
    // hold the process past it (an orchestrator would kill it, leaving its buffers behind).
    let grace = async move {
        let _ = stopping.wait_for(|stopping| *stopping).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
        tracing::warn!(
            "requests still running {} s after the signal: stopping",
            SHUTDOWN_GRACE.as_secs()
        );
    };
    let served = match &listener {
        Listener::Unix(_, path, _) => format!("unix:{}", path.display()),
        Listener::Tcp(listener) => format!("http://{}", listener.local_addr()?),
    };
    println!("listening on {served}");
    // The socket this process made, removed at the end only if it is still the one at its
    // path: a successor started during the grace took the path over (the socket refused it
    // connections once this one stopped listening), and its socket is not ours to remove.
    let socket = match &listener {
        Listener::Unix(_, path, ours) => Some((path.clone(), *ours)),
        Listener::Tcp(_) => None,
    };
    let serving = async {
        match listener {
            Listener::Unix(listener, _, _) => {
                axum::serve(listener, router)
                    .with_graceful_shutdown(shutdown)
                    .await
            }
            Listener::Tcp(listener) => {
                axum::serve(listener, router)
                    .with_graceful_shutdown(shutdown)
                    .await
            }
        }
    };
    let served = tokio::select! {
        served = serving => served,
        () = grace => Ok(()),
    };
    if let Some((path, ours)) = socket
        && socket_identity(&path).is_ok_and(|found| found == ours)
    {
        let _ = std::fs::remove_file(path);
    }
    drop(shm_dir);
    served?;
    Ok(())
}

/// How long a signalled loader lets requests in flight finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

enum Listener {
    /// The listener, its path, and the socket file's identity.
    Unix(tokio::net::UnixListener, std::path::PathBuf, SocketIdentity),
    Tcp(tokio::net::TcpListener),
}

/// Device, inode and change time (to the nanosecond: a successor's socket may get the inode
/// this one's had) of the file at a path, which tell one socket made there from another.
type SocketIdentity = (u64, u64, i64, i64);

fn socket_identity(path: &std::path::Path) -> std::io::Result<SocketIdentity> {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::symlink_metadata(path)?;
    Ok((
        metadata.dev(),
        metadata.ino(),
        metadata.ctime(),
        metadata.ctime_nsec(),
    ))
}

/// Removes a socket left by a loader that is gone; refuses anything else at `path` (a file,
/// or a socket someone may still listen on).
fn remove_stale_socket(path: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(metadata) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    anyhow::ensure!(
        metadata.file_type().is_socket(),
        "{} exists and is not a socket; choose another --socket path",
        path.display()
    );
    // Only a refused connection says nobody listens (a full backlog or another user's socket
    // fail otherwise).
    match std::os::unix::net::UnixStream::connect(path) {
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => {}
        Ok(_) => anyhow::bail!(
            "{} is in use: another process listens on it",
            path.display()
        ),
        Err(error) => anyhow::bail!("{} is in use or not ours: {error}", path.display()),
    }
    std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))
}

fn bandwidth(device: DeviceArg, size: ByteSize) -> Result<()> {
    let DeviceArg::Cuda(ordinal) = device else {
        anyhow::bail!("bandwidth measures a GPU: --device cuda or cuda:N");
    };
    let report =
        Device::gpu_ceilings(ordinal, size.as_u64() as usize).map_err(anyhow::Error::msg)?;
    println!("{report}");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = tokio::runtime::Runtime::new()
        .context("starting the async runtime")
        .and_then(|runtime| {
            runtime.block_on(async {
                match cli.command {
                    Command::Serve(args) => serve(*args).await,
                    Command::Bandwidth { device, size } => bandwidth(device, size),
                }
            })
        });
    cartridge_schemas::report::exit(result)
}

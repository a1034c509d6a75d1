//! Registry benchmark, side by side in one run with the CNCF distribution registry (Debian's
//! `docker-registry`) storing the same bytes through its blob API with curl as the client.
//!
//! - push and pull MB/s of one cartridge end to end: ours chunks, compresses, hashes, uploads,
//!   verifies and writes (`cartridge push`, `cartridge pull -o`); distribution's client hashes
//!   (sha256sum) and uploads the file as one blob, then downloads and hashes it;
//! - resolve latency p50/p99 at a fixed request rate (ours: resolve a version to its manifest;
//!   distribution: GET the manifest of a tag).
//!
//! Both servers store on the local filesystem on loopback, fresh storage per repetition. Needs
//! `cargo build --release --bins` and `apt-get install docker-registry curl`.
//! Writes bench/results/registry.json.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytesize::ByteSize;
use cartridge_bench::{
    Server, mb_per_s, results_path, sibling, smollm2_shape, write_gaussian_cartridge, write_results,
};
use clap::Parser;
use serde_json::json;

#[derive(Debug, Parser)]
struct Args {
    /// Cartridge size (SmolLM2-shaped Gaussian bf16, so it compresses like a trained one).
    #[arg(long, default_value = "256MiB")]
    size: ByteSize,
    /// Push/pull repetitions; the median is kept.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Resolve requests per second, sent on a fixed schedule.
    #[arg(long, default_value_t = 200)]
    rate: u64,
    /// How long to send resolve requests.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    #[arg(long)]
    output: Option<PathBuf>,
}

fn run(command: &mut Command) -> Result<String> {
    let output = command
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {command:?}"))?;
    ensure!(output.status.success(), "{command:?} failed");
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn timed(work: impl FnOnce() -> Result<()>) -> Result<Duration> {
    let started = Instant::now();
    work()?;
    Ok(started.elapsed())
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn wait_for(url: &str) -> Result<()> {
    let started = Instant::now();
    while Command::new("curl")
        .args(["-sf", "-o", "/dev/null", url])
        .status()?
        .code()
        != Some(0)
    {
        if started.elapsed() > Duration::from_secs(30) {
            bail!("{url} did not come up");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

struct Ours {
    server: Server,
    url: String,
    token: String,
}

fn start_ours(dir: &Path) -> Result<Ours> {
    let registry = sibling("cartridge-registry")?;
    let keys = dir.join("keys.json");
    let (server, url) = Server::start(
        Command::new(&registry)
            .args(["serve", "--listen", "127.0.0.1:0", "--storage"])
            .arg(format!("file://{}", dir.join("store").display()))
            .arg("--keys")
            .arg(&keys),
    )?;
    let token = run(Command::new(&registry)
        .args(["token", "create", "--scope", "*:admin", "--keys"])
        .arg(&keys))?
    .trim()
    .to_owned();
    Ok(Ours { server, url, token })
}

fn cartridge(dir: &Path, ours: &Ours) -> Result<Command> {
    let mut command = Command::new(sibling("cartridge")?);
    command
        .current_dir(dir)
        .env("CARTRIDGE_HOME", dir.join("home"))
        .env("CARTRIDGE_REGISTRY", &ours.url)
        .env("CARTRIDGE_TOKEN", &ours.token)
        .stdout(Stdio::null());
    Ok(command)
}

fn start_distribution(dir: &Path) -> Result<(Server, String)> {
    let port = free_port()?;
    let config = dir.join("config.yml");
    std::fs::create_dir_all(dir.join("store"))?;
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("store").display()
        ),
    )?;
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting docker-registry (apt-get install docker-registry)")?;
    let url = format!("http://127.0.0.1:{port}");
    wait_for(&format!("{url}/v2/"))?;
    Ok((Server(child), url))
}

fn sha256(path: &Path) -> Result<String> {
    let output = run(Command::new("sha256sum").arg(path))?;
    Ok(output
        .split_whitespace()
        .next()
        .context("sha256sum output")?
        .to_owned())
}

/// Monolithic blob upload: POST for an upload URL, then PUT the bytes with their digest.
fn distribution_push(url: &str, file: &Path) -> Result<String> {
    let digest = format!("sha256:{}", sha256(file)?);
    let headers = run(Command::new("curl").args([
        "-sf",
        "-D",
        "-",
        "-o",
        "/dev/null",
        "-X",
        "POST",
        &format!("{url}/v2/bench/c/blobs/uploads/"),
    ]))?;
    let location = headers
        .lines()
        .find_map(|l| {
            l.strip_prefix("Location: ")
                .or_else(|| l.strip_prefix("location: "))
        })
        .context("no upload Location")?
        .trim()
        .to_owned();
    let target = if location.starts_with("http") {
        location
    } else {
        format!("{url}{location}")
    };
    let separator = if target.contains('?') { '&' } else { '?' };
    run(Command::new("curl")
        .args([
            "-sf",
            "-o",
            "/dev/null",
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/octet-stream",
            "--upload-file",
        ])
        .arg(file)
        .arg(format!("{target}{separator}digest={digest}")))?;
    Ok(digest)
}

fn distribution_pull(url: &str, digest: &str, out: &Path) -> Result<()> {
    run(Command::new("curl")
        .args(["-sf", "-o"])
        .arg(out)
        .arg(format!("{url}/v2/bench/c/blobs/{digest}")))?;
    ensure!(
        format!("sha256:{}", sha256(out)?) == digest,
        "distribution returned other bytes"
    );
    Ok(())
}

/// An OCI manifest for `v1` referencing the blob, so the tag can be resolved.
fn distribution_tag(url: &str, dir: &Path, digest: &str, size: u64) -> Result<()> {
    let config = dir.join("config.json");
    std::fs::write(&config, b"{}")?;
    let config_digest = distribution_push(url, &config)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": 2},
        "layers": [{"mediaType": "application/octet-stream", "digest": digest, "size": size}],
    });
    run(Command::new("curl")
        .args([
            "-sf",
            "-o",
            "/dev/null",
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/vnd.oci.image.manifest.v1+json",
            "--data-binary",
        ])
        .arg(manifest.to_string())
        .arg(format!("{url}/v2/bench/c/manifests/v1")))?;
    Ok(())
}

/// Sends GETs on a fixed schedule (open loop: a slow answer does not delay the next request)
/// and returns latencies in milliseconds.
async fn latencies(
    url: String,
    headers: Vec<(&'static str, String)>,
    rate: u64,
    duration: Duration,
) -> Result<serde_json::Value> {
    let client = reqwest::Client::new();
    let mut interval = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::new();
    let started = Instant::now();
    while started.elapsed() < duration {
        interval.tick().await;
        let (client, url, headers) = (client.clone(), url.clone(), headers.clone());
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let mut request = client.get(&url);
            for (name, value) in headers {
                request = request.header(name, value);
            }
            let response = request.send().await?;
            let ok = response.status().is_success();
            response.bytes().await?;
            anyhow::ensure!(ok, "resolve failed");
            Ok::<_, anyhow::Error>(sent.elapsed().as_secs_f64() * 1e3)
        }));
    }
    let mut samples = Vec::with_capacity(tasks.len());
    for task in tasks {
        samples.push(task.await??);
    }
    samples.sort_by(f64::total_cmp);
    let percentile = |p: f64| samples[((samples.len() - 1) as f64 * p).round() as usize];
    Ok(
        json!({"requests": samples.len(), "rate_per_s": rate, "p50_ms": percentile(0.5), "p99_ms": percentile(0.99), "max_ms": percentile(1.0)}),
    )
}

fn main() -> Result<()> {
    let args = Args::parse();
    let scratch = tempfile::tempdir()?;
    let file = scratch.path().join("bench.safetensors");
    let model = smollm2_shape();
    let per_token = u64::from(model.layers * model.kv_heads * model.head_dim) * 2 * 2;
    write_gaussian_cartridge(&file, model, (args.size.as_u64() / per_token).max(1), 11)?;
    let bytes = std::fs::metadata(&file)?.len();
    println!("cartridge: {}", ByteSize::b(bytes));

    let (mut ours_push, mut ours_pull, mut dist_push, mut dist_pull) =
        (vec![], vec![], vec![], vec![]);
    for repeat in 0..args.repeats {
        let dir = scratch.path().join(format!("ours-{repeat}"));
        std::fs::create_dir_all(&dir)?;
        let ours = start_ours(&dir)?;
        let push = timed(|| {
            run(cartridge(&dir, &ours)?
                .args(["push", "bench/c@v1"])
                .arg(&file))
            .map(drop)
        })?;
        let pulled = dir.join("pulled.safetensors");
        let pull = timed(|| {
            run(cartridge(&dir, &ours)?
                .args(["pull", "bench/c@v1", "-o"])
                .arg(&pulled))
            .map(drop)
        })?;
        ensure!(
            std::fs::read(&pulled)? == std::fs::read(&file)?,
            "pull returned other bytes"
        );
        ours_push.push(mb_per_s(bytes, push));
        ours_pull.push(mb_per_s(bytes, pull));
        drop(ours.server);
        std::fs::remove_dir_all(&dir)?;

        let dir = scratch.path().join(format!("distribution-{repeat}"));
        std::fs::create_dir_all(&dir)?;
        let (server, url) = start_distribution(&dir)?;
        let mut digest = String::new();
        let push = timed(|| {
            digest = distribution_push(&url, &file)?;
            Ok(())
        })?;
        let pull = timed(|| distribution_pull(&url, &digest, &dir.join("pulled")))?;
        dist_push.push(mb_per_s(bytes, push));
        dist_pull.push(mb_per_s(bytes, pull));
        drop(server);
        std::fs::remove_dir_all(&dir)?;
        println!(
            "repeat {repeat}: push ours {:.0} MB/s vs distribution {:.0}; pull ours {:.0} vs {:.0}",
            ours_push[repeat], dist_push[repeat], ours_pull[repeat], dist_pull[repeat]
        );
    }

    // Resolve latency, each server holding one published cartridge.
    let runtime = tokio::runtime::Runtime::new()?;
    let dir = scratch.path().join("ours-resolve");
    std::fs::create_dir_all(&dir)?;
    let ours = start_ours(&dir)?;
    run(cartridge(&dir, &ours)?
        .args(["push", "bench/c@v1"])
        .arg(&file))?;
    let ours_resolve = runtime.block_on(latencies(
        format!("{}/v1/repos/bench/c/resolve/v1", ours.url),
        vec![("authorization", format!("Bearer {}", ours.token))],
        args.rate,
        args.duration,
    ))?;
    drop(ours);
    let dir = scratch.path().join("distribution-resolve");
    std::fs::create_dir_all(&dir)?;
    let (server, url) = start_distribution(&dir)?;
    let digest = distribution_push(&url, &file)?;
    distribution_tag(&url, &dir, &digest, bytes)?;
    let dist_resolve = runtime.block_on(latencies(
        format!("{url}/v2/bench/c/manifests/v1"),
        vec![(
            "accept",
            "application/vnd.oci.image.manifest.v1+json".into(),
        )],
        args.rate,
        args.duration,
    ))?;
    drop(server);

    let (push, pull) = (
        (median(ours_push.clone()), median(dist_push.clone())),
        (median(ours_pull.clone()), median(dist_pull.clone())),
    );
    println!(
        "push: ours {:.0} MB/s, distribution {:.0} MB/s ({:.2}x)",
        push.0,
        push.1,
        push.0 / push.1
    );
    println!(
        "pull: ours {:.0} MB/s, distribution {:.0} MB/s ({:.2}x)",
        pull.0,
        pull.1,
        pull.0 / pull.1
    );
    println!(
        "resolve at {}/s: ours p50 {} ms p99 {} ms; distribution p50 {} ms p99 {} ms",
        args.rate,
        ours_resolve["p50_ms"],
        ours_resolve["p99_ms"],
        dist_resolve["p50_ms"],
        dist_resolve["p99_ms"]
    );

    let output = args.output.unwrap_or_else(|| results_path("registry"));
    write_results(
        &output,
        json!({
            "benchmark": "registry",
            "baseline": "CNCF distribution 2.8 (Debian docker-registry), blob API with curl + sha256sum, filesystem storage",
            "cartridge_bytes": bytes,
            "repeats": args.repeats,
            "push_mb_per_s": {"ours": push.0, "distribution": push.1, "ratio": push.0 / push.1, "ours_runs": ours_push, "distribution_runs": dist_push},
            "pull_mb_per_s": {"ours": pull.0, "distribution": pull.1, "ratio": pull.0 / pull.1, "ours_runs": ours_pull, "distribution_runs": dist_pull},
            "resolve": {"ours": ours_resolve, "distribution": dist_resolve},
        }),
    )?;
    println!("wrote {}", output.display());
    Ok(())
}

//! Shared pieces of the benchmarks: synthetic cartridges, timing, and the JSON results file.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use cartridge_schemas::Dtype;
use cartridge_schemas::digest::Digest;
use cartridge_schemas::file::{self, LayerData, NewCartridge};
use cartridge_schemas::fingerprint::{ModelFingerprint, Rope, RopeLayout};
use rand::SeedableRng;
use rand_distr::{Distribution, Normal};

/// SmolLM2-135M's cache dimensions, so synthetic cartridges have the real model's shape.
pub fn smollm2_shape() -> ModelFingerprint {
    ModelFingerprint {
        architecture: "llama".into(),
        layers: 30,
        kv_heads: 3,
        head_dim: 64,
        rope: Rope {
            theta: 100_000.0,
            layout: RopeLayout::Half,
            scaling: None,
        },
        weights: Digest::of(b"synthetic"),
    }
}

/// Writes a bf16 cartridge of standard-normal values (seeded, so every run sees the same bytes).
pub fn write_gaussian_cartridge(
    path: &Path,
    model: ModelFingerprint,
    tokens: u64,
    seed: u64,
) -> Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, 1.0).context("normal distribution")?;
    let elements = (model.kv_heads as u64 * tokens * model.head_dim as u64) as usize;
    let tensors: Vec<Vec<u8>> = (0..model.layers * 2)
        .map(|_| {
            (0..elements)
                .flat_map(|_| half::bf16::from_f32(normal.sample(&mut rng)).to_le_bytes())
                .collect()
        })
        .collect();
    let layers: Vec<LayerData<'_>> = tensors
        .chunks_exact(2)
        .map(|pair| LayerData {
            keys: &pair[0],
            values: &pair[1],
        })
        .collect();
    let new = NewCartridge {
        model,
        dtype: Dtype::Bf16,
        tokens,
        frozen_tokens: 1,
        provenance: serde_json::json!({"synthetic": "gaussian bf16", "seed": seed}),
    };
    file::write(path, new, &layers)?;
    Ok(())
}

/// Runs `work` `repeats` times and returns the median wall time.
pub fn median_time<T>(
    repeats: usize,
    mut work: impl FnMut() -> Result<T>,
) -> Result<(Duration, T)> {
    let mut times = Vec::with_capacity(repeats);
    let mut last = None;
    for _ in 0..repeats.max(1) {
        let start = Instant::now();
        last = Some(work()?);
        times.push(start.elapsed());
    }
    times.sort();
    Ok((times[times.len() / 2], last.context("no runs")?))
}

/// Megabytes (10^6 bytes) per second.
pub fn mb_per_s(bytes: u64, time: Duration) -> f64 {
    bytes as f64 / 1e6 / time.as_secs_f64()
}

/// What the numbers were measured on.
pub fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        });
    serde_json::json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "cpu": cpu,
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
    })
}

/// `bench/results/<name>.json` in the workspace.
pub fn results_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("results")
        .join(format!("{name}.json"))
}

/// Writes a result document, stamped with the time and machine, and returns where it went.
pub fn write_results(path: &Path, mut result: serde_json::Value) -> Result<()> {
    result["measured_at"] = humantime::format_rfc3339_seconds(SystemTime::now())
        .to_string()
        .into();
    result["machine"] = machine();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_vec_pretty(&result)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A server process started by a benchmark, killed when dropped.
pub struct Server(pub std::process::Child);

impl Server {
    /// Starts a server binary listening on a free port and returns it with the URL it printed
    /// (`listening on URL`).
    pub fn start(command: &mut std::process::Command) -> Result<(Self, String)> {
        let mut child = command
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {command:?}"))?;
        let stdout = child.stdout.take().context("stdout")?;
        let server = Self(child);
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .context("no address printed")?
            .to_owned();
        Ok((server, url))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A binary built beside the running benchmark (`cargo build --release --workspace --bins`).
pub fn sibling(name: &str) -> Result<PathBuf> {
    let path = std::env::current_exe()?.with_file_name(name);
    anyhow::ensure!(
        path.exists(),
        "{} is missing: run `cargo build --release --workspace --bins`",
        path.display()
    );
    Ok(path)
}

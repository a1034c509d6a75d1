//! Loader benchmark (host-memory path): in one run, the machine's own memory copy bandwidth (warm
//! and into fresh shared memory), then a cold load from a loopback registry and a load from the
//! disk tier (decode only), each with the time to its first ready layer, a device-tier hit, and
//! the composition of four cartridges, as GB/s of keys and values made resident.
//! Needs `cargo build --release --workspace --bins`. Writes bench/results/loader-cpu.json.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use bytesize::ByteSize;
use cartridge_bench::{
    Server, results_path, sibling, smollm2_shape, write_gaussian_cartridge, write_results,
};
use clap::Parser;
use serde_json::{Value, json};

#[derive(Debug, Parser)]
struct Args {
    /// Size of each of the four cartridges.
    #[arg(long, default_value = "64MiB")]
    size: ByteSize,
    #[arg(long)]
    output: Option<PathBuf>,
}

/// An in-process HTTP client, so the figures hold the loader's time and not a process start.
struct Http {
    runtime: tokio::runtime::Runtime,
    client: reqwest::Client,
}

impl Http {
    fn post(&self, url: &str, path: &str, body: &Value) -> Result<Value> {
        self.runtime.block_on(async {
            let response = self
                .client
                .post(format!("{url}{path}"))
                .json(body)
                .send()
                .await?;
            let status = response.status();
            let text = response.text().await?;
            ensure!(status.is_success(), "POST {path}: {status} {text}");
            Ok(serde_json::from_str(&text)?)
        })
    }

    /// A streamed load of one cartridge: the time to its first ready layer, the time to the whole
    /// answer, and the answer.
    fn streamed_load(&self, url: &str, model: &Value, reference: &str) -> Result<Streamed> {
        let started = Instant::now();
        let body = json!({"model": model, "cartridges": [reference], "stream": true});
        let (first_layer, answer) = self.runtime.block_on(async {
            let mut response = self
                .client
                .post(format!("{url}/v1/load"))
                .json(&body)
                .send()
                .await?;
            let mut first_layer = None;
            let mut pending = Vec::new();
            let mut last = Value::Null;
            while let Some(bytes) = response.chunk().await? {
                pending.extend_from_slice(&bytes);
                while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    let event: Value = serde_json::from_slice(&line)?;
                    if event["event"] == "layers" && first_layer.is_none() {
                        first_layer = Some(started.elapsed());
                    }
                    last = event;
                }
            }
            anyhow::Ok((first_layer, last))
        })?;
        let total = started.elapsed();
        ensure!(
            answer["event"] == "loaded",
            "streamed load failed: {answer}"
        );
        self.post(url, "/v1/release", &json!({"handle": answer["handle"]}))?;
        Ok(Streamed {
            first_layer: first_layer.context("no layer event")?,
            total,
            answer,
        })
    }

    fn timed_load(&self, url: &str, model: &Value, refs: &[String]) -> Result<(Duration, Value)> {
        let started = Instant::now();
        let answer = self.post(
            url,
            "/v1/load",
            &json!({"model": model, "cartridges": refs}),
        )?;
        let elapsed = started.elapsed();
        self.post(url, "/v1/release", &json!({"handle": answer["handle"]}))?;
        Ok((elapsed, answer))
    }
}

struct Streamed {
    first_layer: Duration,
    total: Duration,
    answer: Value,
}

fn gb_per_s(bytes: u64, time: Duration) -> f64 {
    bytes as f64 / 1e9 / time.as_secs_f64()
}

fn start_loader(dir: &Path, shm: &Path, registry: &str, token: &str) -> Result<(Server, String)> {
    Server::start(
        Command::new(sibling("cartridge-loader")?)
            .args([
                "serve",
                "--registry",
                registry,
                "--listen",
                "127.0.0.1:0",
                "--gpu-budget",
                "4GiB",
                "--cache-dir",
            ])
            .arg(dir.join("loader-cache"))
            .arg("--shm-dir")
            .arg(shm)
            .env("CARTRIDGE_TOKEN", token),
    )
}

fn main() -> Result<()> {
    let args = Args::parse();
    let scratch = tempfile::tempdir()?;
    let dir = scratch.path();

    // The ceiling: this machine's memory copy bandwidth on a buffer of the same size.
    let bytes = args.size.as_u64() as usize;
    let source = vec![1u8; bytes];
    let mut target = vec![0u8; bytes];
    let mut copies = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        target.copy_from_slice(&source);
        copies.push(started.elapsed());
    }
    copies.sort();
    let memcpy = gb_per_s(bytes as u64, copies[2]);
    drop(target);

    let registry_bin = sibling("cartridge-registry")?;
    let (_registry, registry) = Server::start(
        Command::new(&registry_bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--storage"])
            .arg(format!("file://{}", dir.join("store").display()))
            .arg("--keys")
            .arg(dir.join("keys.json")),
    )?;
    let token = String::from_utf8(
        Command::new(&registry_bin)
            .args(["token", "create", "--scope", "*:admin", "--keys"])
            .arg(dir.join("keys.json"))
            .output()?
            .stdout,
    )?
    .trim()
    .to_owned();
    let model = smollm2_shape();
    let per_token = u64::from(model.layers * model.kv_heads * model.head_dim) * 4;
    let mut refs = Vec::new();
    for index in 0..4 {
        let file = dir.join(format!("c{index}.safetensors"));
        write_gaussian_cartridge(
            &file,
            model.clone(),
            (args.size.as_u64() / per_token).max(1),
            100 + index,
        )?;
        let reference = format!("bench/c{index}@v1");
        let status = Command::new(sibling("cartridge")?)
            .args(["push", &reference])
            .arg(&file)
            .env("CARTRIDGE_REGISTRY", &registry)
            .env("CARTRIDGE_TOKEN", &token)
            .env("CARTRIDGE_HOME", dir.join("home"))
            .stdout(Stdio::null())
            .status()?;
        ensure!(status.success(), "push failed");
        refs.push(reference);
    }
    let model = serde_json::to_value(&model)?;

    let http = Http {
        runtime: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        client: reqwest::Client::new(),
    };
    // Resident buffers live where they would in service: in shared memory when the machine
    // has it, not in files on disk.
    let shm_root = Path::new("/dev/shm");
    let shm = if shm_root.is_dir() {
        tempfile::tempdir_in(shm_root)?
    } else {
        tempfile::tempdir_in(dir)?
    };
    // A new resident buffer also pays for its pages: the same copy into fresh shared memory.
    let mut fresh = Vec::new();
    for _ in 0..5 {
        let file = tempfile::tempfile_in(shm.path())?;
        file.set_len(bytes as u64)?;
        // SAFETY: the file is anonymous and private to this loop.
        #[allow(unsafe_code)]
        let mut map = unsafe { memmap2::MmapMut::map_mut(&file)? };
        let started = Instant::now();
        map.copy_from_slice(&source);
        fresh.push(started.elapsed());
    }
    fresh.sort();
    let fresh_copy = gb_per_s(bytes as u64, fresh[2]);
    drop(source);

    let (loader, url) = start_loader(dir, shm.path(), &registry, &token)?;
    let cold = http.streamed_load(&url, &model, &refs[0])?;
    let payload = cold.answer["bytes"].as_u64().context("bytes")?;
    let (hit, _) = http.timed_load(&url, &model, &refs[..1])?;
    for reference in &refs[1..] {
        http.timed_load(&url, &model, std::slice::from_ref(reference))?;
    }
    let (compose, composed) = http.timed_load(&url, &model, &refs)?;
    drop(loader);
    // A fresh loader: nothing resident, every blob on disk. The killed one's buffers go too.
    for entry in std::fs::read_dir(shm.path())? {
        std::fs::remove_file(entry?.path())?;
    }
    let (_loader, url) = start_loader(dir, shm.path(), &registry, &token)?;
    let disk = http.streamed_load(&url, &model, &refs[0])?;
    ensure!(
        disk.answer["tier"] == "disk",
        "expected a disk-tier load, got {}",
        disk.answer["tier"]
    );

    let report = json!({
        "benchmark": "loader",
        "path": "host memory (no CUDA)",
        "cartridge_bytes": payload,
        "memcpy_gb_per_s": memcpy,
        "copy_into_fresh_shm_gb_per_s": fresh_copy,
        "cold_load_from_registry": {"seconds": cold.total.as_secs_f64(), "gb_per_s": gb_per_s(payload, cold.total), "first_layer_ms": cold.first_layer.as_secs_f64() * 1e3},
        "load_from_disk_tier": {"seconds": disk.total.as_secs_f64(), "gb_per_s": gb_per_s(payload, disk.total), "share_of_memcpy": gb_per_s(payload, disk.total) / memcpy, "first_layer_ms": disk.first_layer.as_secs_f64() * 1e3},
        "device_tier_hit_ms": hit.as_secs_f64() * 1e3,
        "compose_4": {"bytes": composed["bytes"], "seconds": compose.as_secs_f64(), "gb_per_s": gb_per_s(composed["bytes"].as_u64().unwrap_or(0), compose), "share_of_memcpy": gb_per_s(composed["bytes"].as_u64().unwrap_or(0), compose) / memcpy, "share_of_fresh_shm_copy": gb_per_s(composed["bytes"].as_u64().unwrap_or(0), compose) / fresh_copy},
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    let output = args.output.unwrap_or_else(|| results_path("loader-cpu"));
    write_results(&output, report)?;
    println!("wrote {}", output.display());
    Ok(())
}

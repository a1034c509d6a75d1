//! Loader benchmark: in one run, the machine's own copy bandwidths (the ceilings), then a cold
//! load from a loopback registry and a load from the disk tier, each with the time to its first
//! ready layer, a device-tier hit, the composition of four cartridges, and (on a GPU) a load from
//! the host tier, as GB/s of keys and values made resident.
//! `--device host` (default): ceilings are memcpy, warm and into fresh shared memory; writes
//! bench/results/loader-cpu.json. `--device cuda`: ceilings are page-locked host-to-device and
//! device-to-device copies, measured by `cartridge-loader bandwidth`; writes loader-cuda.json.
//! Needs `cargo build --release --workspace --bins`.

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
    /// The loader's device: `host` or `cuda`.
    #[arg(long, default_value = "host")]
    device: String,
    #[arg(long)]
    output: Option<PathBuf>,
    /// Once the compositions are measured, run the Python client's check
    /// (loader/python/test_client.py) against that loader, with the interpreter named here (it
    /// needs torch on a GPU).
    #[arg(long)]
    python: Option<PathBuf>,
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

    /// The sum and count of the loader's own timings (`loader_load_seconds`) of loads that
    /// found their parts on the device: its time from request to answer, without the HTTP
    /// round trip around it.
    fn device_load_seconds(&self, url: &str) -> Result<(f64, f64)> {
        let text = self.runtime.block_on(async {
            let response = self.client.get(format!("{url}/metrics")).send().await?;
            ensure!(
                response.status().is_success(),
                "GET /metrics: {}",
                response.status()
            );
            Ok(response.text().await?)
        })?;
        let value = |name: &str| {
            let prefix = format!("{name}{{tier=\"device\"}} ");
            text.lines()
                .find_map(|line| line.strip_prefix(&prefix))
                .with_context(|| format!("/metrics has no {prefix}"))?
                .parse::<f64>()
                .with_context(|| format!("{name} in /metrics"))
        };
        Ok((
            value("loader_load_seconds_sum")?,
            value("loader_load_seconds_count")?,
        ))
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

/// The middle of `times` (an odd count), as the ceilings are taken.
fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// `refs` turned left by `turn` places.
fn rotated(refs: &[String], turn: usize) -> Vec<String> {
    let mut order = refs.to_vec();
    order.rotate_left(turn);
    order
}

fn gb_per_s(bytes: u64, time: Duration) -> f64 {
    bytes as f64 / 1e9 / time.as_secs_f64()
}

fn start_loader(
    dir: &Path,
    shm: &Path,
    registry: &str,
    token: &str,
    device: &str,
    budget: u64,
    host_budget: Option<u64>,
) -> Result<(Server, String)> {
    let mut command = Command::new(sibling("cartridge-loader")?);
    command
        .args([
            "serve",
            "--registry",
            registry,
            "--listen",
            "127.0.0.1:0",
            "--device",
            device,
            "--gpu-budget",
            &budget.to_string(),
            "--cache-dir",
        ])
        .arg(dir.join("loader-cache"))
        .arg("--shm-dir")
        .arg(shm)
        .env("CARTRIDGE_TOKEN", token);
    if let Some(host_budget) = host_budget {
        command.args(["--host-budget", &host_budget.to_string()]);
    }
    Server::start(&mut command)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let scratch = tempfile::tempdir()?;
    let dir = scratch.path();

    let bytes = args.size.as_u64() as usize;
    let cuda = args.device != "host";
    // Where --output names (a GPU machine's, lent by the minute), written as figures come in:
    // a later step that fails or runs out of time leaves the earlier ones. The default, a
    // committed result, is written only whole.
    let partial = args.output.clone();
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| results_path(if cuda { "loader-cuda" } else { "loader-cpu" }));
    let save_partial = |report: serde_json::Value| match &partial {
        Some(path) => write_results(path, report),
        None => Ok(()),
    };
    let ceilings = if cuda {
        let probe = Command::new(sibling("cartridge-loader")?)
            .args(["bandwidth", "--device", &args.device, "--size"])
            .arg(args.size.as_u64().to_string())
            .output()?;
        ensure!(
            probe.status.success(),
            "{}",
            String::from_utf8_lossy(&probe.stderr)
        );
        serde_json::from_slice(&probe.stdout)?
    } else {
        host_ceilings(bytes)?
    };

    save_partial(
        json!({"benchmark": "loader", "ceilings": ceilings, "partial": "bandwidth ceilings only"}),
    )?;

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
    let shm = shared_memory_dir(dir)?;
    // Room for the four cartridges and one composition of them at a time (or, for the Python
    // client's check, one of two).
    let (loader, url) = start_loader(
        dir,
        shm.path(),
        &registry,
        &token,
        &args.device,
        10 * args.size.as_u64(),
        None,
    )?;
    // Each figure goes into the report as it comes, and (with --output) to disk: a later
    // step that fails or runs out of time leaves the earlier ones.
    let mut report = json!({"benchmark": "loader", "ceilings": ceilings});
    let save_stage = |report: &serde_json::Value, stage: &str| {
        let mut so_far = report.clone();
        so_far["partial"] = json!(format!("up to {stage}"));
        save_partial(so_far)
    };
    let cold = http.streamed_load(&url, &model, &refs[0])?;
    let payload = cold.answer["bytes"].as_u64().context("bytes")?;
    report["cartridge_bytes"] = json!(payload);
    report["cold_load_from_registry"] = json!({"seconds": cold.total.as_secs_f64(), "gb_per_s": gb_per_s(payload, cold.total), "first_layer_ms": cold.first_layer.as_secs_f64() * 1e3});
    let (hit, _) = http.timed_load(&url, &model, &refs[..1])?;
    report["device_tier_hit_ms"] = json!(hit.as_secs_f64() * 1e3);
    save_stage(&report, "the cold load")?;
    for reference in &refs[1..] {
        http.timed_load(&url, &model, std::slice::from_ref(reference))?;
    }
    let (compose, composed) = http.timed_load(&url, &model, &refs)?;
    let composed_bytes = composed["bytes"].as_u64().context("bytes")?;
    let compose_rate = gb_per_s(composed_bytes, compose);
    report["compose_4"] = json!({"bytes": composed_bytes, "seconds": compose.as_secs_f64(), "gb_per_s": compose_rate});
    save_stage(&report, "the first composition")?;
    // The first composition pays for its buffer; a serving loader composes again and again.
    // Each order below is a composition not yet made, and evicts the one before it.
    let reversed: Vec<String> = refs.iter().rev().cloned().collect();
    let orders: Vec<Vec<String>> = (1..4)
        .map(|turn| rotated(&refs, turn))
        .chain((0..4).map(|turn| rotated(&reversed, turn)))
        .collect();
    // The tiers stand beside the figure (each should be `device`: resident parts), reported
    // rather than lost with everything else.
    let mut again = Vec::new();
    let mut tiers = Vec::new();
    // Beside the time a caller waits, the loader's own (its histogram's sum before and after
    // each): what composing takes without the request's round trip (a device-tier hit's).
    let mut inside = Vec::new();
    for order in &orders {
        let before = http.device_load_seconds(&url)?;
        let (elapsed, answer) = http.timed_load(&url, &model, order)?;
        let after = http.device_load_seconds(&url)?;
        ensure!(after.1 == before.1 + 1.0, "another load ran meanwhile");
        again.push(elapsed);
        inside.push(Duration::from_secs_f64(after.0 - before.0));
        tiers.push(answer["tier"].clone());
    }
    let compose_again = median(again);
    let within_loader = median(inside);
    report["compose_4"]["again"] = json!({"compositions": orders.len(), "tiers": tiers, "median_seconds": compose_again.as_secs_f64(), "gb_per_s": gb_per_s(composed_bytes, compose_again), "loader_median_seconds": within_loader.as_secs_f64(), "loader_gb_per_s": gb_per_s(composed_bytes, within_loader)});
    // The Python client's check, against this loader: it has room to compose two cartridges.
    // Its outcome goes in the report; the figures stand whatever it finds.
    if args.python.is_some() {
        report["python_client"] = json!("not finished");
    }
    save_stage(&report, "the later compositions")?;
    let python_client = args
        .python
        .as_ref()
        .map(|python| python_check(python, &url, &refs, dir));
    if let Some(outcome) = &python_client {
        report["python_client"] = json!(match outcome {
            Ok(status) if status.success() => "passed".to_owned(),
            Ok(status) => format!("failed ({status})"),
            Err(error) => format!("did not run: {error}"),
        });
        save_stage(&report, "the Python client's check")?;
    }
    drop(loader);
    // A fresh loader with room for one cartridge on the GPU and two in its host tier: nothing
    // resident, every blob on disk. It removes the killed one's buffers when it starts.
    let (_loader, url) = start_loader(
        dir,
        shm.path(),
        &registry,
        &token,
        &args.device,
        args.size.as_u64() * 3 / 2,
        Some(2 * args.size.as_u64()),
    )?;
    // Should be `disk`: the tier stands beside the figure.
    let disk = http.streamed_load(&url, &model, &refs[0])?;
    report["load_from_disk_tier"] = json!({"tier": disk.answer["tier"], "seconds": disk.total.as_secs_f64(), "gb_per_s": gb_per_s(payload, disk.total), "first_layer_ms": disk.first_layer.as_secs_f64() * 1e3});
    save_stage(&report, "the disk-tier load")?;
    if cuda {
        // The second cartridge evicts the first from the GPU; from then on the two take turns,
        // each coming back from the host tier by one copy.
        http.timed_load(&url, &model, &refs[1..2])?;
        let mut loads = Vec::new();
        let mut tiers = Vec::new();
        for turn in 0..7 {
            let (elapsed, answer) = http.timed_load(&url, &model, &refs[turn % 2..turn % 2 + 1])?;
            loads.push(elapsed);
            tiers.push(answer["tier"].clone());
        }
        let host = median(loads.clone());
        // A third cartridge from disk: its decode evicts one of the two from the host tier and
        // reuses that page-locked buffer, as a serving loader's do once its host tier is full.
        let recycled = http.streamed_load(&url, &model, &refs[2])?;
        report["load_from_disk_tier_recycled_staging"] = json!({"tier": recycled.answer["tier"], "seconds": recycled.total.as_secs_f64(), "gb_per_s": gb_per_s(payload, recycled.total), "first_layer_ms": recycled.first_layer.as_secs_f64() * 1e3});
        let raw = ceilings["pinned_host_to_device_gb_per_s"]
            .as_f64()
            .context("bandwidth")?;
        let within = ceilings["device_to_device_gb_per_s"]
            .as_f64()
            .context("bandwidth")?;
        report["path"] = json!(format!("GPU ({})", ceilings["device"]));
        // The tiers the loads came from stand beside the figure: one not from the host tier (a
        // cartridge not evicted, say) is reported, not lost with everything else.
        report["load_from_host_tier"] = json!({"tiers": tiers, "loads": loads.len(), "first_seconds": loads[0].as_secs_f64(), "median_seconds": host.as_secs_f64(), "gb_per_s": gb_per_s(payload, host), "share_of_pinned_host_to_device": gb_per_s(payload, host) / raw});
        report["compose_4"]["share_of_device_to_device"] = json!(compose_rate / within);
        report["compose_4"]["again"]["share_of_device_to_device"] =
            json!(gb_per_s(composed_bytes, compose_again) / within);
        report["compose_4"]["again"]["loader_share_of_device_to_device"] =
            json!(gb_per_s(composed_bytes, within_loader) / within);
        // What share of the composed load its copies take; the rest is the request, the
        // allocation (`allocate_composed_ms` above) and the handoff. (Null where the probe
        // lacked the memory to measure the copies.)
        let copies = ceilings["compose_copies_gb_per_s"].as_f64();
        report["compose_4"]["share_of_compose_copies"] =
            json!(copies.map(|copies| compose_rate / copies));
        report["compose_4"]["again"]["share_of_compose_copies"] =
            json!(copies.map(|copies| gb_per_s(composed_bytes, compose_again) / copies));
    } else {
        let memcpy = ceilings["memcpy_gb_per_s"].as_f64().context("memcpy")?;
        let fresh = ceilings["copy_into_fresh_shm_gb_per_s"]
            .as_f64()
            .context("memcpy")?;
        report["path"] = json!("host memory (no CUDA)");
        report["load_from_disk_tier"]["share_of_memcpy"] =
            json!(gb_per_s(payload, disk.total) / memcpy);
        report["compose_4"]["share_of_memcpy"] = json!(compose_rate / memcpy);
        report["compose_4"]["share_of_fresh_shm_copy"] = json!(compose_rate / fresh);
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    write_results(&output, report)?;
    println!("wrote {}", output.display());
    if let Some(outcome) = python_client {
        ensure!(outcome?.success(), "the Python client's check failed");
    }
    Ok(())
}

/// Runs loader/python/test_client.py against the loader at `url` with `python`: the first
/// cartridge alone, and composed with the second.
fn python_check(
    python: &Path,
    url: &str,
    refs: &[String],
    dir: &Path,
) -> std::io::Result<std::process::ExitStatus> {
    let client = Path::new("loader/python");
    if !client.is_dir() {
        return Err(std::io::Error::other(
            "loader/python/ is not here (run from the repository root)",
        ));
    }
    let mut path = std::ffi::OsString::from(client);
    if let Some(existing) = std::env::var_os("PYTHONPATH") {
        path.push(":");
        path.push(existing);
    }
    Command::new(python)
        .arg(client.join("test_client.py"))
        .env("PYTHONPATH", path)
        .env("PYTHONUNBUFFERED", "1")
        .env("LOADER_URL", url)
        .env("CARTRIDGE", &refs[0])
        .env("CARTRIDGE_FILE", dir.join("c0.safetensors"))
        .env("CARTRIDGE_OTHER", &refs[1])
        .env("CARTRIDGE_OTHER_FILE", dir.join("c1.safetensors"))
        .status()
}

/// Resident buffers live where they would in service: in shared memory when the machine has it,
/// not in files on disk.
fn shared_memory_dir(dir: &Path) -> Result<tempfile::TempDir> {
    let shm_root = Path::new("/dev/shm");
    Ok(if shm_root.is_dir() {
        tempfile::tempdir_in(shm_root)?
    } else {
        tempfile::tempdir_in(dir)?
    })
}

/// Host memory's copy bandwidth on a buffer of `bytes`: warm, and into fresh shared memory (a
/// new resident buffer also pays for its pages).
fn host_ceilings(bytes: usize) -> Result<Value> {
    let source = vec![1u8; bytes];
    let mut target = vec![0u8; bytes];
    let mut copies = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        target.copy_from_slice(&source);
        copies.push(started.elapsed());
    }
    drop(target);
    let scratch = tempfile::tempdir()?;
    let shm = shared_memory_dir(scratch.path())?;
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
    Ok(json!({
        "memcpy_gb_per_s": gb_per_s(bytes as u64, median(copies)),
        "copy_into_fresh_shm_gb_per_s": gb_per_s(bytes as u64, median(fresh)),
    }))
}

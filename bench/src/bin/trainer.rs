//! Trainer speed: distillation step tokens/s (forward + backward + Adam, prefix P, rows of L
//! tokens, B rows, loss on every position against top-20 teacher targets) and synthesis
//! generated tokens/s (batched, sampled, a shared prompt), on random weights of SmolLM2's shapes
//! (speed does not depend on the values).
//!
//! The GPU configuration of ../shared/bench/torch_selfstudy_step.py is P=2048, L=2048, B=4 with
//! `--device cuda`; run that script in the same call for the side-by-side ratio. On CPU the
//! defaults are small, so the figures track regressions. Writes bench/results/trainer-<device>.json.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use candle_core::{DType, Device, Tensor};
use cartridge_bench::{results_path, write_results};
use cartridge_trainer::distill::{DistillOptions, Distiller};
use cartridge_trainer::model::{Config, GenerationRequest, Llama, Prefix, Sampling, generate};
use cartridge_trainer::synthesis::{Conversation, SeedKind};
use clap::{Parser, ValueEnum};
use serde_json::json;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DeviceKind {
    Cpu,
    Cuda,
}

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, value_enum, default_value = "cpu")]
    device: DeviceKind,
    /// Cartridge length P.
    #[arg(long, default_value_t = 64)]
    prefix: usize,
    /// Tokens per row L.
    #[arg(long, default_value_t = 128)]
    length: usize,
    /// Rows per step B.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Timed steps (after two warm-up steps).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Sequences generated at once.
    #[arg(long, default_value_t = 8)]
    generate_batch: usize,
    /// Shared prompt tokens.
    #[arg(long, default_value_t = 128)]
    generate_prompt: usize,
    /// New tokens per sequence.
    #[arg(long, default_value_t = 32)]
    generate_new: usize,
    #[arg(long)]
    output: Option<PathBuf>,
}

/// One conversation per row, filling it, with a loss on every position after the first.
fn rows(count: usize, length: usize, vocab: u32) -> Vec<Conversation> {
    (0..count)
        .map(|row| {
            let token = |i: usize| ((row * 7919 + i * 104_729) as u32) % vocab;
            let answer: Vec<u32> = (1..length).map(token).collect();
            Conversation {
                batch: 0,
                chunk_start: 0,
                chunk_tokens: 0,
                seed: SeedKind::Question,
                user: String::new(),
                opening: String::new(),
                assistant: String::new(),
                prompt_ids: vec![token(0)],
                teacher: answer
                    .iter()
                    .map(|&t| {
                        (0..20)
                            .map(|k| ((t + k) % vocab, -1.0 - k as f32))
                            .collect()
                    })
                    .collect(),
                answer_ids: answer,
            }
        })
        .collect()
}

fn main() -> Result<()> {
    // SAFETY: no thread has started yet.
    #[allow(unsafe_code)]
    unsafe {
        cartridge_trainer::tune_cpu()
    };
    let args = Args::parse();
    let (device, dtype) = match args.device {
        DeviceKind::Cpu => (Device::Cpu, DType::F32),
        DeviceKind::Cuda if candle_core::utils::cuda_is_available() => {
            (Device::new_cuda(0)?, DType::BF16)
        }
        DeviceKind::Cuda => bail!("built without CUDA (--features cuda)"),
    };
    let config = Config::smollm2_135m();
    let model = Llama::random(config.clone(), 1, &device, dtype)?;
    let prefix_tensor = |seed: f64| -> Result<Vec<Tensor>> {
        (0..config.layers)
            .map(|_| {
                Ok((Tensor::randn(
                    0f32,
                    0.5,
                    (config.kv_heads, args.prefix, config.head_dim),
                    &device,
                )? * seed)?
                    .to_dtype(dtype)?)
            })
            .collect()
    };
    let prefix = Prefix {
        keys: prefix_tensor(1.0)?,
        values: prefix_tensor(1.0)?,
    };

    let options = DistillOptions {
        tokens: args.prefix,
        frozen: 1,
        learning_rate: 2e-2,
        steps: 0,
        row_tokens: args.length,
        rows: args.batch,
        seed: 0,
        ..DistillOptions::default()
    };
    let data = rows(args.batch * 4, args.length, config.vocab as u32);
    let synchronize = || -> Result<()> { Ok(device.synchronize()?) };
    // Two warm-up steps (allocations; on the GPU, kernel loading), then a fresh timed run.
    Distiller::from_prefix(
        &model,
        &prefix,
        DistillOptions {
            steps: 2,
            ..options.clone()
        },
    )?
    .train(&data, |_, _, _, _| Ok(()))?;
    let mut timed = Distiller::from_prefix(
        &model,
        &prefix,
        DistillOptions {
            steps: args.steps,
            ..options
        },
    )?;
    synchronize()?;
    let started = Instant::now();
    timed.train(&data, |_, _, _, _| Ok(()))?;
    synchronize()?;
    let step_seconds = started.elapsed().as_secs_f64() / args.steps as f64;
    let step_tokens = (args.batch * args.length) as f64;
    let peak_host_bytes = peak_resident_bytes();
    println!(
        "distillation step: {:.1} ms, {:.0} tokens/s (P={}, L={}, B={})",
        step_seconds * 1e3,
        step_tokens / step_seconds,
        args.prefix,
        args.length,
        args.batch
    );

    let shared: Vec<u32> = (0..args.generate_prompt as u32)
        .map(|i| (i * 31) % config.vocab as u32)
        .collect();
    let prompts: Vec<Vec<u32>> = (0..args.generate_batch)
        .map(|i| vec![(i as u32 * 17) % config.vocab as u32])
        .collect();
    let request = GenerationRequest {
        prefix: None,
        shared: &shared,
        prompts: &prompts,
        max_new_tokens: args.generate_new,
        sampling: Sampling {
            temperature: 0.7,
            top_p: 1.0,
        },
        top_logprobs: None,
        stop_ids: &[],
        stop_on_repeat: 0,
        seed: 0,
    };
    generate(
        &model,
        &GenerationRequest {
            max_new_tokens: 2,
            ..request.clone()
        },
    )?;
    synchronize()?;
    let started = Instant::now();
    let generated = generate(&model, &request)?;
    synchronize()?;
    let generate_seconds = started.elapsed().as_secs_f64();
    let new_tokens: usize = generated.iter().map(|g| g.tokens.len()).sum();
    println!(
        "generation: {:.0} new tokens/s (batch {}, prompt {}, {} new each)",
        new_tokens as f64 / generate_seconds,
        args.generate_batch,
        args.generate_prompt,
        args.generate_new
    );

    let device_name = match args.device {
        DeviceKind::Cpu => "cpu",
        DeviceKind::Cuda => "cuda",
    };
    let output = args
        .output
        .unwrap_or_else(|| results_path(&format!("trainer-{device_name}")));
    write_results(
        &output,
        json!({
            "benchmark": "trainer",
            "baselines": "../shared/bench/torch_selfstudy_step.py and hf_generate.py, run beside this on the GPU machine",
            "device": device_name,
            "dtype": format!("{dtype:?}"),
            "model_shape": "SmolLM2-135M (random weights)",
            "distillation": {"prefix": args.prefix, "length": args.length, "batch": args.batch, "steps_timed": args.steps, "step_ms": step_seconds * 1e3, "tokens_per_s": step_tokens / step_seconds, "peak_host_bytes": peak_host_bytes},
            "generation": {"batch": args.generate_batch, "prompt": args.generate_prompt, "new_tokens": args.generate_new, "seconds": generate_seconds, "new_tokens_per_s": new_tokens as f64 / generate_seconds},
        }),
    )?;
    println!("wrote {}", output.display());
    Ok(())
}

/// The process's peak resident memory so far (Linux), the host side of what a step holds.
fn peak_resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

//! Chunk codec benchmark: our shuffle+zstd against plain zstd at the same level on the same
//! chunks of the same cartridge, with the same parallelism. Reports stored size and encode/decode
//! throughput (raw MB/s) and writes JSON to bench/results/codec.json.

use std::path::PathBuf;

use anyhow::{Context, Result};
use cartridge_bench::{
    mb_per_s, median_time, results_path, smollm2_shape, write_gaussian_cartridge, write_results,
};
use cartridge_codec::{EncodeOptions, EncodedChunk, decode_payload, encode_cartridge};
use cartridge_schemas::file::Cartridge;
use clap::Parser;
use serde_json::json;

#[derive(Debug, Parser)]
struct Args {
    /// A real cartridge to measure; without it a synthetic Gaussian bf16 one of SmolLM2's shape.
    #[arg(long)]
    cartridge: Option<PathBuf>,
    /// Tokens of the synthetic cartridge.
    #[arg(long, default_value_t = 2048)]
    tokens: u64,
    /// zstd levels to compare at.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 3, 9])]
    levels: Vec<i32>,
    /// Target raw bytes per chunk.
    #[arg(long, default_value_t = cartridge_codec::DEFAULT_CHUNK_BYTES)]
    chunk_bytes: u64,
    /// Timed runs per measurement (the median is kept).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Where to write the JSON.
    #[arg(long)]
    output: Option<PathBuf>,
}

fn measure(
    cartridge: &Cartridge,
    options: EncodeOptions,
    repeats: usize,
) -> Result<serde_json::Value> {
    let raw = cartridge.header().payload_bytes();
    let (encode_time, chunks) =
        median_time(repeats, || Ok(encode_cartridge(cartridge, &options)?))?;
    let stored: u64 = chunks
        .iter()
        .map(|c: &EncodedChunk| c.bytes.len() as u64)
        .sum();
    let inputs: Vec<_> = chunks
        .iter()
        .map(|c| (c.descriptor.clone(), c.bytes.as_slice()))
        .collect();
    let (decode_time, payload) =
        median_time(repeats, || Ok(decode_payload(cartridge.header(), &inputs)?))?;
    anyhow::ensure!(
        payload.len() as u64 == raw,
        "decoded payload has the wrong size"
    );
    Ok(json!({
        "codec": chunks[0].descriptor.codec.to_string(),
        "stored_bytes": stored,
        "ratio": stored as f64 / raw as f64,
        "encode_mb_per_s": mb_per_s(raw, encode_time),
        "decode_mb_per_s": mb_per_s(raw, decode_time),
    }))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let scratch = tempfile::tempdir()?;
    let (path, source) = match &args.cartridge {
        Some(path) => (path.clone(), json!({"kind": "file", "path": path})),
        None => {
            let path = scratch.path().join("gaussian.safetensors");
            write_gaussian_cartridge(&path, smollm2_shape(), args.tokens, 7)?;
            (
                path,
                json!({"kind": "synthetic gaussian bf16, N(0, 1)", "shape": "SmolLM2-135M", "tokens": args.tokens}),
            )
        }
    };
    let cartridge = Cartridge::open(&path).with_context(|| format!("{}", path.display()))?;
    let header = cartridge.header();

    let mut rows = Vec::new();
    for &level in &args.levels {
        let options = EncodeOptions {
            level,
            target_chunk_bytes: args.chunk_bytes,
            shuffle: true,
        };
        let ours = measure(&cartridge, options, args.repeats)?;
        let plain = measure(
            &cartridge,
            EncodeOptions {
                shuffle: false,
                ..options
            },
            args.repeats,
        )?;
        let size_vs_plain = ours["stored_bytes"].as_f64().unwrap_or(0.0)
            / plain["stored_bytes"].as_f64().unwrap_or(1.0);
        println!(
            "level {level:>2}: ours {:.3} of raw, {:>7.0} MB/s encode, {:>7.0} MB/s decode | plain zstd {:.3}, {:>7.0}, {:>7.0} | size vs plain {size_vs_plain:.3}",
            ours["ratio"].as_f64().unwrap_or(0.0),
            ours["encode_mb_per_s"].as_f64().unwrap_or(0.0),
            ours["decode_mb_per_s"].as_f64().unwrap_or(0.0),
            plain["ratio"].as_f64().unwrap_or(0.0),
            plain["encode_mb_per_s"].as_f64().unwrap_or(0.0),
            plain["decode_mb_per_s"].as_f64().unwrap_or(0.0),
        );
        rows.push(json!({"level": level, "ours": ours, "plain_zstd": plain, "size_vs_plain_zstd": size_vs_plain}));
    }

    let output = args.output.unwrap_or_else(|| results_path("codec"));
    write_results(
        &output,
        json!({
            "benchmark": "codec",
            "baseline": "plain zstd at the same level on the same chunks",
            "input": source,
            "dtype": header.dtype,
            "payload_bytes": header.payload_bytes(),
            "chunk_bytes": args.chunk_bytes,
            "threads": rayon::current_num_threads(),
            "repeats": args.repeats,
            "results": rows,
        }),
    )?;
    println!("wrote {}", output.display());
    Ok(())
}

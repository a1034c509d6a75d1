use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use cartridge_schemas::file::{self, Cartridge, LayerData, NewCartridge, Part};
use clap::Args;
use serde_json::json;

use super::{Input, check_outputs};
use crate::output::human_bytes;

/// Concatenate cartridges along the token axis, in the order given, into one that answers about
/// all of their corpora. Refuses parts made for different models or stored in different dtypes.
#[derive(Debug, Args)]
pub struct ComposeArgs {
    /// Two or more cartridge files; the first one's tokens come first.
    #[arg(required = true, num_args = 2..)]
    pub parts: Vec<PathBuf>,
    /// Where to write the composed cartridge.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Print the written header as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: ComposeArgs) -> Result<()> {
    let inputs: Vec<(Input, &Path)> = args
        .parts
        .iter()
        .map(|p| (Input::File, p.as_path()))
        .collect();
    cartridge_schemas::file::check_destination(&args.output)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    check_outputs(&[("output", &args.output)], &inputs)?;
    let parts = args
        .parts
        .iter()
        .map(|path| Cartridge::open(path).with_context(|| format!("{}", path.display())))
        .collect::<Result<Vec<_>>>()?;
    let header = compose(&args.parts, &parts, &args.output)?;
    if args.json {
        let report = json!({"output": args.output.display().to_string(), "header": header});
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "wrote {}: {} tokens from {} parts, {}",
            args.output.display(),
            header.tokens,
            parts.len(),
            human_bytes(header.payload_bytes())
        );
    }
    Ok(())
}

fn compose(paths: &[PathBuf], parts: &[Cartridge], output: &Path) -> Result<file::Header> {
    let first = parts[0].header();
    for (path, part) in paths.iter().zip(parts).skip(1) {
        let header = part.header();
        first
            .model
            .check_compatible(&header.model)
            .with_context(|| {
                format!(
                    "{} was made for another model than {}",
                    path.display(),
                    paths[0].display()
                )
            })?;
        if header.dtype != first.dtype {
            bail!(
                "{} holds {} but {} holds {}: only cartridges of one dtype compose",
                path.display(),
                header.dtype,
                paths[0].display(),
                first.dtype
            );
        }
    }

    // Each tensor is [kv_heads, tokens, head_dim]: per head, the parts' rows follow one another.
    let kv_heads = first.model.kv_heads as usize;
    let tensors: Vec<Vec<u8>> = (0..parts[0].layer_count())
        .flat_map(|layer| [(layer, Part::Keys), (layer, Part::Values)])
        .map(|(layer, which)| {
            let total: usize = parts.iter().map(|p| p.tensor(layer, which).len()).sum();
            let mut out = Vec::with_capacity(total);
            for head in 0..kv_heads {
                for part in parts {
                    let tensor = part.tensor(layer, which);
                    let per_head = tensor.len() / kv_heads;
                    out.extend_from_slice(&tensor[head * per_head..(head + 1) * per_head]);
                }
            }
            out
        })
        .collect();
    let layers: Vec<LayerData<'_>> = tensors
        .chunks_exact(2)
        .map(|pair| LayerData {
            keys: &pair[0],
            values: &pair[1],
        })
        .collect();

    let composed_of: Vec<_> = paths
        .iter()
        .zip(parts)
        .map(|(path, part)| {
            let header = part.header();
            json!({
                "source": path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
                "tokens": header.tokens,
                "frozen_tokens": header.frozen_tokens,
                "payload_digest": header.payload_digest,
                "provenance": header.provenance,
            })
        })
        .collect();
    let new = NewCartridge {
        model: first.model.clone(),
        dtype: first.dtype,
        tokens: parts.iter().map(|p| p.header().tokens).sum(),
        // Only the leading run of frozen positions stays frozen; later parts' sinks are ordinary
        // positions of the composed cartridge (the paper composes by plain concatenation).
        frozen_tokens: first.frozen_tokens,
        provenance: json!({ "composed_of": composed_of }),
    };
    file::write(output, new, &layers).with_context(|| format!("writing {}", output.display()))
}

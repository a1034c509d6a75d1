use std::path::PathBuf;

use anyhow::{Context, Result};
use cartridge_schemas::file::Cartridge;
use clap::Args;
use serde_json::json;

use crate::output::{Table, human_bytes};

/// Show a cartridge file's model, tokens, layers, dtype, size and provenance.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The cartridge file (.safetensors).
    pub file: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: InspectArgs) -> Result<()> {
    let cartridge =
        Cartridge::open(&args.file).with_context(|| format!("{}", args.file.display()))?;
    let header = cartridge.header();
    if args.json {
        let report = json!({
            "file": args.file,
            "file_bytes": cartridge.file_bytes().len(),
            "payload_bytes": header.payload_bytes(),
            "layers": cartridge.layer_count(),
            "tensor_shape": header.tensor_shape(),
            "header": header,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let mut table = Table::default();
    table.row("file", args.file.display());
    table.row("model", &header.model);
    table.row("dtype", header.dtype);
    table.row(
        "tokens",
        format!("{} ({} frozen)", header.tokens, header.frozen_tokens),
    );
    let [kv_heads, tokens, head_dim] = header.tensor_shape();
    table.row(
        "layers",
        format!(
            "{} × keys/values [{kv_heads}, {tokens}, {head_dim}]",
            cartridge.layer_count()
        ),
    );
    table.row(
        "size",
        format!(
            "{} (payload {})",
            human_bytes(cartridge.file_bytes().len() as u64),
            human_bytes(header.payload_bytes())
        ),
    );
    table.row("digest", header.payload_digest);
    if let Some(parts) = header
        .provenance
        .get("composed_of")
        .and_then(|p| p.as_array())
    {
        for (index, part) in parts.iter().enumerate() {
            let label = if index == 0 { "parts" } else { "" };
            let source = part.get("source").and_then(|s| s.as_str()).unwrap_or("?");
            let tokens = part.get("tokens").and_then(|t| t.as_u64()).unwrap_or(0);
            let digest = part
                .get("payload_digest")
                .and_then(|d| d.as_str())
                .unwrap_or("?");
            table.row(
                label,
                format!("{}. {source}: {tokens} tokens, {digest}", index + 1),
            );
        }
    }
    table.row(
        "provenance",
        serde_json::to_string_pretty(&header.provenance)?,
    );
    print!("{table}");
    Ok(())
}

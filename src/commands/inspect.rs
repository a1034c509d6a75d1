use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use cartridge_schemas::file::{Cartridge, Header};
use clap::Args;
use serde_json::json;

use super::RegistryArgs;
use crate::output::{Table, human_bytes};

/// Show a cartridge's model, tokens, layers, dtype, size and provenance: a local file, or a
/// reference in a registry (ns/name@version).
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A cartridge file (.safetensors) or a reference.
    pub target: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

pub fn run(args: InspectArgs) -> Result<()> {
    let reference = match super::Target::parse(&args.target)? {
        super::Target::File(path) => return inspect_file(&path, args.json),
        super::Target::Reference(reference) => reference,
    };
    let resolved = super::looked_up(
        &args.target,
        args.registry
            .connect(reference.registry.as_ref())
            .and_then(|client| {
                Ok(super::runtime()?
                    .block_on(client.resolve(&reference.repository, &reference.selector))?)
            }),
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&resolved)?);
        return Ok(());
    }
    let manifest = &resolved.manifest;
    let mut table = Table::default();
    table.row("reference", &resolved.reference);
    table.row("manifest", resolved.digest);
    table.row("created", &manifest.created);
    let stored: u64 = manifest.blobs().iter().map(|b| b.size).sum();
    describe(&mut table, &manifest.cartridge);
    table.row(
        "stored",
        format!(
            "{} in {} chunks ({:.2} of the payload)",
            human_bytes(stored),
            manifest.chunks.len(),
            stored as f64 / manifest.cartridge.payload_bytes() as f64
        ),
    );
    table.row(
        "provenance",
        serde_json::to_string_pretty(&manifest.cartridge.provenance)?,
    );
    print!("{table}");
    Ok(())
}

fn inspect_file(path: &Path, json: bool) -> Result<()> {
    let cartridge = Cartridge::open(path).with_context(|| format!("{}", path.display()))?;
    let header = cartridge.header();
    if json {
        let report = json!({
            "file": PathBuf::from(path),
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
    table.row("file", path.display());
    describe(&mut table, header);
    table.row(
        "size",
        format!(
            "{} (payload {})",
            human_bytes(cartridge.file_bytes().len() as u64),
            human_bytes(header.payload_bytes())
        ),
    );
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

/// The rows every cartridge has, wherever it lives.
fn describe(table: &mut Table, header: &Header) {
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
            header.model.layers
        ),
    );
    table.row("digest", header.payload_digest);
}

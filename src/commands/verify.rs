use std::path::PathBuf;

use anyhow::{Result, bail};
use cartridge_schemas::Reference;
use cartridge_schemas::file::Cartridge;
use clap::Args;
use serde_json::json;

/// Validate a cartridge file fully: framing, header, every tensor's dtype and shape, and the
/// payload digest. Exits non-zero naming the first defect.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The cartridge file (.safetensors).
    pub file: PathBuf,
    /// Print JSON instead of a line of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: VerifyArgs) -> Result<()> {
    let file = args.file.display();
    match Cartridge::open(&args.file) {
        Ok(cartridge) => {
            let header = cartridge.header();
            if args.json {
                let report = json!({
                    "file": file.to_string(),
                    "ok": true,
                    "layers": cartridge.layer_count(),
                    "tokens": header.tokens,
                    "dtype": header.dtype,
                    "payload_digest": header.payload_digest,
                });
                println!("{report}");
            } else {
                println!(
                    "ok: {file}: {} layers, {} tokens, {}, payload {}",
                    cartridge.layer_count(),
                    header.tokens,
                    header.dtype,
                    header.payload_digest
                );
            }
            Ok(())
        }
        Err(error) => {
            if args.json {
                println!(
                    "{}",
                    json!({"file": file.to_string(), "ok": false, "error": error.to_string()})
                );
            }
            // A reference given for a file: pulling is how a published cartridge is checked.
            let named = args.file.to_str().is_some_and(|text| {
                !args.file.exists() && text.contains('@') && text.parse::<Reference>().is_ok()
            });
            if named {
                bail!(
                    "{file}: no such file; `cartridge pull {file}` fetches a published cartridge and verifies it the same way"
                );
            }
            bail!("{file}: {error}")
        }
    }
}

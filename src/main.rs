//! `cartridge`: hold, check, combine, convert, push and pull cartridges.

mod commands;
mod model;
mod output;
mod paths;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "cartridge",
    version,
    about = "Package manager for cartridges: trained KV caches that give a model a corpus"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Inspect(commands::inspect::InspectArgs),
    Verify(commands::verify::VerifyArgs),
    Compose(commands::compose::ComposeArgs),
    Import(commands::import::ImportArgs),
    Model(commands::model::ModelArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(args) => commands::inspect::run(args),
        Command::Verify(args) => commands::verify::run(args),
        Command::Compose(args) => commands::compose::run(args),
        Command::Import(args) => commands::import::run(args),
        Command::Model(args) => commands::model::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

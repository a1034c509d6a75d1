//! `cartridge`: hold, check, combine, convert, push and pull cartridges.

mod commands;
mod config;
mod output;
mod progress;

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
    Login(commands::login::LoginArgs),
    Push(commands::push::PushArgs),
    Pull(commands::pull::PullArgs),
    Tag(commands::tag::TagArgs),
    Ls(commands::ls::LsArgs),
    Rm(commands::rm::RmArgs),
    Namespace(commands::namespace::NamespaceArgs),
    Train(commands::train::TrainArgs),
    Eval(commands::eval::EvalArgs),
    Chat(commands::chat::ChatArgs),
    Serve(commands::serve::ServeArgs),
}

fn main() -> ExitCode {
    // Output piped into `head` ends quietly, as other command-line tools do, rather than as a
    // panic on the broken pipe.
    // SAFETY: restores the default action and tunes the CPU paths before any thread
    // starts.
    #[allow(unsafe_code)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        cartridge_trainer::tune_cpu();
    }
    let cli = Cli::parse();
    // Warnings (retries, resumed downloads) go to stderr; RUST_LOG turns up the detail.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Inspect(args) => commands::inspect::run(args),
        Command::Verify(args) => commands::verify::run(args),
        Command::Compose(args) => commands::compose::run(args),
        Command::Import(args) => commands::import::run(args),
        Command::Model(args) => commands::model::run(args),
        Command::Login(args) => commands::login::run(args),
        Command::Push(args) => commands::push::run(args),
        Command::Pull(args) => commands::pull::run(args),
        Command::Tag(args) => commands::tag::run(args),
        Command::Ls(args) => commands::ls::run(args),
        Command::Rm(args) => commands::rm::run(args),
        Command::Namespace(args) => commands::namespace::run(args),
        Command::Train(args) => commands::train::run(args),
        Command::Eval(args) => commands::eval::run(args),
        Command::Chat(args) => commands::chat::run(args),
        Command::Serve(args) => commands::serve::run(args),
    };
    cartridge_schemas::report::exit_with(result, |error| match commands::tag::not_moved(error) {
        true => commands::tag::NOT_MOVED_STATUS,
        false => 1,
    })
}

use std::io::{BufRead, IsTerminal};

use anyhow::{Context, Result, bail};
use cartridge_client::Client;
use clap::Args;

use crate::config::{Config, RegistryConfig, is_this_machine, normalize};
use cartridge_schemas::paths::Paths;

/// Save a token for a registry and make it the default. The token is read from
/// `CARTRIDGE_TOKEN` or standard input (one line), and checked against the registry first.
#[derive(Debug, Args)]
pub struct LoginArgs {
    /// The registry's URL, e.g. http://127.0.0.1:7070.
    pub url: String,
}

pub fn run(args: LoginArgs) -> Result<()> {
    let url = normalize(&args.url);
    let token = match std::env::var("CARTRIDGE_TOKEN") {
        Ok(token) if !token.trim().is_empty() => {
            // Said, so a token meant for another registry, or one piped in too, is noticed.
            eprintln!("using the token in CARTRIDGE_TOKEN (standard input is not read)");
            token.trim().to_owned()
        }
        // Typed or pasted at a terminal, it is not shown (where the process has a controlling
        // terminal to turn echo off on; elsewhere the line is read as it comes).
        _ => {
            let hidden = match std::io::stdin().is_terminal().then(prompt_hidden) {
                Some(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => {
                    bail!("interrupted")
                }
                read => read.and_then(Result::ok),
            };
            match hidden {
                Some(token) => token.trim().to_owned(),
                None => {
                    let mut line = String::new();
                    std::io::stdin()
                        .lock()
                        .read_line(&mut line)
                        .context("reading the token from standard input")?;
                    line.trim().to_owned()
                }
            }
        }
    };
    if token.is_empty() {
        bail!("no token: pipe one to standard input or set CARTRIDGE_TOKEN");
    }
    // A laptop's or a private network's registry may speak plain HTTP; say what that costs.
    if let Ok(parsed) = url::Url::parse(&url)
        && parsed.scheme() == "http"
        && !parsed.host_str().is_some_and(is_this_machine)
    {
        eprintln!(
            "warning: {url} is plain HTTP: the token crosses the network unencrypted with every request"
        );
    }
    let client = Client::new(&url, Some(token.clone()))?;
    // Any authenticated call proves the token; listing namespaces needs no particular scope.
    let namespaces = super::runtime()?
        .block_on(client.namespaces())
        .with_context(|| format!("checking the token with {url}"))?;
    let paths = Paths::from_env()?;
    Config::update(&paths, |config| {
        // One entry per registry: an older spelling of it would shadow the new token.
        let origin = |u: &str| url::Url::parse(u).ok().map(|u| u.origin());
        config.registries.retain(|saved, _| {
            saved == &url || origin(saved).is_none_or(|o| Some(o) != origin(&url))
        });
        config
            .registries
            .insert(url.clone(), RegistryConfig { token: Some(token) });
        config.default_registry = Some(url.clone());
    })?;
    let visible = namespaces.namespaces.len();
    println!(
        "logged in to {url} ({visible} namespace{} visible); it is now the default registry",
        if visible == 1 { "" } else { "s" }
    );
    Ok(())
}

/// The token, read from the terminal without echo. On Ctrl-C, rpassword raises SIGINT itself
/// with the terminal still without echo, and the signal's default action would end the process
/// before rpassword puts the terminal back: the shell would then show nothing typed. Ignored
/// while the prompt reads (typed, Ctrl-C reaches rpassword as a character, not a signal), it
/// lets rpassword restore the terminal and return; it is raised again once it is.
#[allow(unsafe_code)]
fn prompt_hidden() -> std::io::Result<String> {
    // SAFETY: dispositions only (ignore, then the one before): no handler runs in the signal.
    let before = unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let read = rpassword::prompt_password("paste the token and press enter (it is not shown): ");
    unsafe { libc::signal(libc::SIGINT, before) };
    if matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::Interrupted) {
        eprintln!();
        // SAFETY: raising a signal; as the user's Ctrl-C would have, it ends the process where
        // SIGINT's action is the default (and where it is not, `interrupted` is returned).
        unsafe { libc::raise(libc::SIGINT) };
    }
    read
}

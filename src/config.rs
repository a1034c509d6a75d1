//! The user's configuration (`config.toml`): the default registry and a token per registry.
//! `CARTRIDGE_REGISTRY` and `CARTRIDGE_TOKEN` override it.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::{Context, Result, bail};
use cartridge_client::Client;
use cartridge_schemas::reference::Registry;
use serde::{Deserialize, Serialize};

use cartridge_schemas::paths::Paths;

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Config {
    /// The registry used when a reference names none.
    pub default_registry: Option<String>,
    #[serde(default)]
    pub registries: BTreeMap<String, RegistryConfig>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct RegistryConfig {
    pub token: Option<String>,
}

impl Config {
    pub fn load(paths: &Paths) -> Result<Self> {
        let path = paths.config_file();
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                toml::from_str(&text).with_context(|| format!("reading {}", path.display()))
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(error) => Err(error).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes the configuration readable by its owner only: it holds tokens.
    pub fn save(&self, paths: &Paths) -> Result<()> {
        let path = paths.config_file();
        std::fs::create_dir_all(&paths.config)
            .with_context(|| format!("creating {}", paths.config.display()))?;
        let temporary = path.with_extension("toml.tmp");
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options
            .open(&temporary)
            .with_context(|| format!("writing {}", temporary.display()))?;
        file.write_all(toml::to_string_pretty(self)?.as_bytes())?;
        std::fs::rename(&temporary, &path).with_context(|| format!("writing {}", path.display()))
    }
}

/// The registry URL for a reference's host prefix: plain HTTP only for the local machine.
pub fn registry_url(host: &Registry) -> String {
    let name = host
        .as_str()
        .rsplit_once(':')
        .map_or(host.as_str(), |(name, _)| name);
    let local = matches!(name, "localhost" | "[::1]") || name.starts_with("127.");
    format!("{}://{host}", if local { "http" } else { "https" })
}

pub fn normalize(url: &str) -> String {
    url.trim_end_matches('/').to_owned()
}

/// A client for the registry a command should talk to: the reference's own, else `--registry`
/// (or `CARTRIDGE_REGISTRY`), else the configured default.
pub fn connect(
    paths: &Paths,
    from_reference: Option<&Registry>,
    flag: Option<&str>,
) -> Result<Client> {
    let config = Config::load(paths)?;
    let url = match (from_reference, flag, &config.default_registry) {
        (Some(host), ..) => registry_url(host),
        (None, Some(url), _) => normalize(url),
        (None, None, Some(url)) => normalize(url),
        (None, None, None) => {
            bail!(
                "no registry: pass --registry URL, set CARTRIDGE_REGISTRY, or run `cartridge login URL`"
            )
        }
    };
    let token = std::env::var("CARTRIDGE_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .or_else(|| config.registries.get(&url).and_then(|r| r.token.clone()));
    Ok(Client::new(&url, token)?)
}

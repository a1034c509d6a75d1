//! The user's configuration (`config.toml`): the default registry and a token per registry.
//! `CARTRIDGE_REGISTRY` and `CARTRIDGE_TOKEN` override it.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::{Context, Result, bail};
use cartridge_client::Client;
use cartridge_schemas::reference::Registry;
use serde::{Deserialize, Serialize};

use cartridge_schemas::paths::Paths;

/// Unknown keys are refused: a misspelt one would be ignored, then dropped at the next login.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The registry used when a reference names none.
    pub default_registry: Option<String>,
    #[serde(default)]
    pub registries: BTreeMap<String, RegistryConfig>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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

    /// Changes the stored configuration under an exclusive lock, so that two logins at once
    /// each keep their registry's entry.
    pub fn update(paths: &Paths, change: impl FnOnce(&mut Self)) -> Result<()> {
        std::fs::create_dir_all(&paths.config)
            .with_context(|| format!("creating {}", paths.config.display()))?;
        let lock_path = paths.config.join("config.lock");
        let lock = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("opening {}", lock_path.display()))?;
        lock.lock()
            .with_context(|| format!("locking {}", lock_path.display()))?;
        let mut config = Self::load(paths)?;
        change(&mut config);
        config.save(paths)
    }

    /// Writes the configuration readable by its owner only: it holds tokens.
    fn save(&self, paths: &Paths) -> Result<()> {
        let path = paths.config_file();
        // A new file of its own (created 0600, never an existing one or a link someone left),
        // synced, then renamed into place.
        let mut file = tempfile::NamedTempFile::new_in(&paths.config)
            .with_context(|| format!("writing in {}", paths.config.display()))?;
        file.write_all(toml::to_string_pretty(self)?.as_bytes())?;
        file.as_file().sync_all()?;
        file.persist(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }
}

/// The registry URL for a reference's host prefix: plain HTTP only for the local machine.
pub fn registry_url(host: &Registry) -> String {
    let text = host.as_str();
    // The host without its port: `[::1]:80` → `::1`, `127.0.0.1:80` → `127.0.0.1`.
    let name = match text.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or(bracketed),
        None => text.rsplit_once(':').map_or(text, |(name, _)| name),
    };
    format!(
        "{}://{host}",
        if is_this_machine(name) {
            "http"
        } else {
            "https"
        }
    )
}

/// Whether a host name (without port; an IPv6 address bracketed or not) is this machine's.
/// Only an address of this machine: a name such as `127.example.com` is anyone's.
pub fn is_this_machine(name: &str) -> bool {
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name == "localhost"
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// One spelling per registry (`HTTP://Host:443/` → `http://host:443`, `https://h:443` →
/// `https://h`), so a token saved for it is found however it is named. A bare `host[:port]`, as
/// references name registries, is read as they read it (https, but http for this machine). A
/// URL with a path is left for the client to refuse.
pub fn normalize(url: &str) -> String {
    let bare = (!url.contains("://"))
        .then(|| url.trim_end_matches('/').parse::<Registry>().ok())
        .flatten();
    let url = bare.as_ref().map_or_else(|| url.to_owned(), registry_url);
    match url::Url::parse(&url) {
        Ok(parsed)
            if matches!(parsed.scheme(), "http" | "https")
                && parsed.path() == "/"
                && parsed.query().is_none() =>
        {
            parsed.origin().ascii_serialization()
        }
        _ => url.trim_end_matches('/').to_owned(),
    }
}

/// A client for the registry a command should talk to: the reference's own, else `--registry`
/// (or `CARTRIDGE_REGISTRY`), else the configured default.
pub fn connect(
    paths: &Paths,
    from_reference: Option<&Registry>,
    flag: Option<&str>,
) -> Result<Client> {
    let config = Config::load(paths)?;
    let chosen = flag
        .map(normalize)
        .or_else(|| config.default_registry.as_deref().map(normalize));
    let url = match (from_reference, &chosen) {
        (Some(host), _) => registry_url(host),
        (None, Some(url)) => url.clone(),
        (None, None) => {
            bail!(
                "no registry: pass --registry URL, set CARTRIDGE_REGISTRY, or run `cartridge login URL`"
            )
        }
    };
    let token = token_for(
        &config,
        &url,
        chosen.as_deref(),
        std::env::var("CARTRIDGE_TOKEN").ok(),
    );
    Ok(Client::new(&url, token)?)
}

/// The token to send to `url`: `CARTRIDGE_TOKEN` (`from_env`) is for the registry the flag,
/// environment or configuration names (`chosen`), never for another host a reference happens to
/// name (with none chosen, the reference's host is the one named); otherwise the one saved for
/// `url`.
fn token_for(
    config: &Config,
    url: &str,
    chosen: Option<&str>,
    from_env: Option<String>,
) -> Option<String> {
    let origin = |url: &str| url::Url::parse(url).ok().map(|u| u.origin());
    let for_url =
        chosen.is_none_or(|chosen| origin(chosen).is_some_and(|o| Some(o) == origin(url)));
    // Whitespace alone is no token (the client trims what it sends).
    from_env
        .filter(|t| !t.trim().is_empty() && for_url)
        .or_else(|| {
            // Saved under the spelling normalize gives, else an older one (compared as origins).
            let older = || {
                (config.registries.iter())
                    .find(|(saved, _)| origin(saved).is_some_and(|o| Some(o) == origin(url)))
                    .map(|(_, r)| r)
            };
            (config.registries.get(url))
                .or_else(older)
                .and_then(|r| r.token.clone())
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environments_token_goes_only_to_the_chosen_registry() {
        let mut config = Config::default();
        config.registries.insert(
            "https://hub.example".into(),
            RegistryConfig {
                token: Some("saved".into()),
            },
        );
        let env = || Some("from-env".to_owned());
        let ours = Some("https://ours.example");
        assert_eq!(
            token_for(&config, "https://ours.example", ours, env()).as_deref(),
            Some("from-env")
        );
        assert_eq!(
            token_for(&config, "https://hub.example", ours, env()).as_deref(),
            Some("saved")
        );
        assert_eq!(
            token_for(&config, "https://evil.example", ours, env()),
            None
        );
        // The same registry however it is spelled; and with none chosen, the one named.
        assert_eq!(
            token_for(&config, "https://ours.example:443", ours, env()).as_deref(),
            Some("from-env")
        );
        assert_eq!(
            token_for(&config, "https://evil.example", None, env()).as_deref(),
            Some("from-env")
        );
    }

    #[test]
    fn logins_at_once_each_keep_their_entry() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths {
            config: dir.path().join("config"),
            cache: dir.path().join("cache"),
        };
        std::thread::scope(|scope| {
            for i in 0..8 {
                let paths = &paths;
                scope.spawn(move || {
                    Config::update(paths, |config| {
                        // Hold the read-modify-write open a moment, so that writers overlap.
                        std::thread::sleep(std::time::Duration::from_millis(5));
                        config.registries.insert(
                            format!("https://r{i}.example"),
                            RegistryConfig {
                                token: Some(format!("t{i}")),
                            },
                        );
                    })
                    .unwrap();
                });
            }
        });
        let config = Config::load(&paths).unwrap();
        assert_eq!(config.registries.len(), 8);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(paths.config_file())
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn a_saved_token_is_found_however_its_registry_is_spelled() {
        assert_eq!(normalize("HTTP://Reg.Example:80/"), "http://reg.example");
        assert_eq!(normalize("https://reg.example:443"), "https://reg.example");
        assert_eq!(normalize("http://127.0.0.1:7070/"), "http://127.0.0.1:7070");
        // As a reference names its registry.
        assert_eq!(normalize("127.0.0.1:7070"), "http://127.0.0.1:7070");
        assert_eq!(normalize("localhost:7070/"), "http://localhost:7070");
        assert_eq!(normalize("reg.example"), "https://reg.example");
        // A path is kept, for the client to refuse by name.
        assert_eq!(
            normalize("https://reg.example/v1/"),
            "https://reg.example/v1"
        );
        let mut config = Config::default();
        config.registries.insert(
            "http://127.0.0.1:7070/".into(),
            RegistryConfig {
                token: Some("saved".into()),
            },
        );
        let url = normalize("HTTP://127.0.0.1:7070");
        assert_eq!(
            token_for(&config, &url, None, None).as_deref(),
            Some("saved")
        );
    }

    #[test]
    fn the_exact_spelling_wins_over_an_older_one() {
        let mut config = Config::default();
        for (saved, token) in [
            ("HTTP://127.0.0.1:7070/", "older"),
            ("http://127.0.0.1:7070", "newer"),
        ] {
            config.registries.insert(
                saved.into(),
                RegistryConfig {
                    token: Some(token.into()),
                },
            );
        }
        assert_eq!(
            token_for(&config, "http://127.0.0.1:7070", None, None).as_deref(),
            Some("newer")
        );
    }

    #[test]
    fn a_misspelt_setting_is_refused_not_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths {
            config: dir.path().to_owned(),
            cache: dir.path().join("cache"),
        };
        std::fs::write(
            paths.config_file(),
            "default-registry = \"http://x.example\"\n",
        )
        .unwrap();
        let error = format!("{:#}", Config::load(&paths).unwrap_err());
        assert!(
            error.contains("unknown field `default-registry`"),
            "{error}"
        );
    }

    #[test]
    fn only_this_machine_is_reached_over_plain_http() {
        let url = |host: &str| registry_url(&host.parse().unwrap());
        assert_eq!(url("127.0.0.1:7070"), "http://127.0.0.1:7070");
        assert_eq!(url("localhost:7070"), "http://localhost:7070");
        assert_eq!(url("127.example.com:7070"), "https://127.example.com:7070");
        assert_eq!(url("[::1]"), "http://[::1]");
        assert_eq!(url("[::1]:7070"), "http://[::1]:7070");
    }
}

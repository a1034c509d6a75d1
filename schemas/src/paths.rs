//! Where cartridge keeps things on a user's machine, shared by every tool.
//!
//! `CARTRIDGE_HOME` moves everything under one directory (`config.toml`, `cache/`); otherwise the
//! XDG locations are used: `~/.config/cartridge` and `~/.cache/cartridge`.

use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct Paths {
    pub config: PathBuf,
    pub cache: PathBuf,
}

#[derive(Debug, thiserror::Error)]
#[error("HOME is not set; set CARTRIDGE_HOME")]
pub struct NoHome;

impl Paths {
    pub fn from_env() -> Result<Self, NoHome> {
        // Empty is unset: it would put the token in whatever folder a command runs in.
        if let Some(home) = std::env::var_os("CARTRIDGE_HOME").filter(|h| !h.is_empty()) {
            let home = PathBuf::from(home);
            return Ok(Self {
                config: home.clone(),
                cache: home.join("cache"),
            });
        }
        let xdg = |variable: &str, fallback: &str| -> Result<PathBuf, NoHome> {
            Ok(
                match std::env::var_os(variable).filter(|dir| !dir.is_empty()) {
                    Some(dir) => PathBuf::from(dir),
                    None => PathBuf::from(std::env::var_os("HOME").ok_or(NoHome)?).join(fallback),
                }
                .join("cartridge"),
            )
        };
        Ok(Self {
            config: xdg("XDG_CONFIG_HOME", ".config")?,
            cache: xdg("XDG_CACHE_HOME", ".cache")?,
        })
    }

    /// Models installed from their packages (`cartridge model install`).
    pub fn models(&self) -> PathBuf {
        self.cache.join("models")
    }

    pub fn config_file(&self) -> PathBuf {
        self.config.join("config.toml")
    }
}

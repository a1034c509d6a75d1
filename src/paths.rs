//! Where cartridge keeps things on a user's machine.
//!
//! `CARTRIDGE_HOME` moves everything under one directory (`config.toml`, `cache/`); otherwise the
//! XDG locations are used: `~/.config/cartridge` and `~/.cache/cartridge`.

use std::path::PathBuf;

use anyhow::{Context, Result};

#[derive(Debug, Clone)]
pub struct Paths {
    pub config: PathBuf,
    pub cache: PathBuf,
}

impl Paths {
    pub fn from_env() -> Result<Self> {
        if let Some(home) = std::env::var_os("CARTRIDGE_HOME") {
            let home = PathBuf::from(home);
            return Ok(Self {
                config: home.clone(),
                cache: home.join("cache"),
            });
        }
        let user_home = || {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .context("HOME is not set; set CARTRIDGE_HOME")
        };
        let xdg = |variable: &str, fallback: &str| -> Result<PathBuf> {
            Ok(match std::env::var_os(variable) {
                Some(dir) => PathBuf::from(dir),
                None => user_home()?.join(fallback),
            }
            .join("cartridge"))
        };
        Ok(Self {
            config: xdg("XDG_CONFIG_HOME", ".config")?,
            cache: xdg("XDG_CACHE_HOME", ".cache")?,
        })
    }

    /// Models installed by `cartridge model install`.
    pub fn models(&self) -> PathBuf {
        self.cache.join("models")
    }

    pub fn config_file(&self) -> PathBuf {
        self.config.join("config.toml")
    }
}

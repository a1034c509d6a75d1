//! Where cartridge keeps things on a user's machine.
//!
//! `CARTRIDGE_HOME` moves everything under one directory (`config/`, `cache/`); otherwise the XDG
//! locations are used: `~/.config/cartridge` and `~/.cache/cartridge`.

use std::path::PathBuf;

use anyhow::{Context, Result};

#[derive(Debug, Clone)]
pub struct Paths {
    pub cache: PathBuf,
}

impl Paths {
    pub fn from_env() -> Result<Self> {
        if let Some(home) = std::env::var_os("CARTRIDGE_HOME") {
            let home = PathBuf::from(home);
            return Ok(Self {
                cache: home.join("cache"),
            });
        }
        let user_home = || {
            std::env::var_os("HOME")
                .map(PathBuf::from)
                .context("HOME is not set; set CARTRIDGE_HOME")
        };
        let cache = match std::env::var_os("XDG_CACHE_HOME") {
            Some(dir) => PathBuf::from(dir),
            None => user_home()?.join(".cache"),
        };
        Ok(Self {
            cache: cache.join("cartridge"),
        })
    }

    /// Models installed by `cartridge model install`.
    pub fn models(&self) -> PathBuf {
        self.cache.join("models")
    }
}

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

/// `CARTRIDGE_HOME`, unless unset or empty (empty would put tokens and keys in whatever folder
/// a command runs in).
pub fn cartridge_home() -> Option<PathBuf> {
    std::env::var_os("CARTRIDGE_HOME")
        .filter(|home| !home.is_empty())
        .map(PathBuf::from)
}

/// `cartridge` under the XDG folder `variable` names (unless unset or empty), else under
/// `$HOME/fallback`.
pub fn xdg_dir(variable: &str, fallback: &str) -> Result<PathBuf, NoHome> {
    Ok(
        match std::env::var_os(variable).filter(|dir| !dir.is_empty()) {
            Some(dir) => PathBuf::from(dir),
            None => PathBuf::from(std::env::var_os("HOME").ok_or(NoHome)?).join(fallback),
        }
        .join("cartridge"),
    )
}

impl Paths {
    pub fn from_env() -> Result<Self, NoHome> {
        if let Some(home) = cartridge_home() {
            return Ok(Self {
                config: home.clone(),
                cache: home.join("cache"),
            });
        }
        Ok(Self {
            config: xdg_dir("XDG_CONFIG_HOME", ".config")?,
            cache: xdg_dir("XDG_CACHE_HOME", ".cache")?,
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

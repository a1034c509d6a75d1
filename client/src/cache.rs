//! The local content-addressed cache a pull fills:
//! ```text
//! blobs/<hex>                      verified blobs as stored (shared across versions)
//! partial/<hex>                    downloads in progress; a later pull resumes them
//! cartridges/<manifest hex>.safetensors   assembled cartridges
//! ```

use std::path::{Path, PathBuf};

use cartridge_schemas::Digest;

use crate::ClientError;

#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, ClientError> {
        let cache = Self { root: root.into() };
        for dir in ["blobs", "partial", "cartridges"] {
            let path = cache.root.join(dir);
            std::fs::create_dir_all(&path).map_err(ClientError::io(&path))?;
        }
        Ok(cache)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blob(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs").join(digest.hex())
    }

    pub fn partial(&self, digest: &Digest) -> PathBuf {
        self.root.join("partial").join(digest.hex())
    }

    pub fn cartridge(&self, manifest: &Digest) -> PathBuf {
        self.root
            .join("cartridges")
            .join(format!("{}.safetensors", manifest.hex()))
    }
}

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
        self.cartridges()
            .join(format!("{}.safetensors", manifest.hex()))
    }

    /// The folder of assembled cartridges.
    pub fn cartridges(&self) -> PathBuf {
        self.root.join("cartridges")
    }
}

/// Gives the file `len` bytes with their blocks reserved where the filesystem reserves them
/// (tmpfs, ext4, xfs): one without room for them fails here with an error, where a file merely set
/// to that length would kill the process with SIGBUS at the first write through a memory map past
/// the space.
#[cfg(target_os = "linux")]
pub fn allocate(file: &std::fs::File, len: u64) -> std::io::Result<()> {
    loop {
        match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), 0, len) {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::INTR) => {}
            // A filesystem without fallocate (or a sandbox refusing it) gets the length alone.
            Err(
                rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS | rustix::io::Errno::PERM,
            ) => return file.set_len(len),
            Err(error) => return Err(error.into()),
        }
    }
}

#[cfg(not(target_os = "linux"))]
pub fn allocate(file: &std::fs::File, len: u64) -> std::io::Result<()> {
    file.set_len(len)
}

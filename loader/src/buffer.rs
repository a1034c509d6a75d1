//! Device memory for the host path: shared-memory files, mapped.
//!
//! With `--device host` the loader's "device" is host memory. Each resident cartridge (or
//! composition) lives in one file under a shared-memory directory (`/dev/shm` by default), so an
//! inference process on the same machine maps it read-only instead of copying it — the host
//! counterpart of handing out CUDA IPC handles. The file is unlinked when the buffer is dropped; a process that
//! still maps it keeps its view.

use std::path::{Path, PathBuf};

pub struct HostBuffer {
    path: PathBuf,
    map: memmap2::MmapMut,
}

impl std::fmt::Debug for HostBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostBuffer")
            .field("path", &self.path)
            .field("len", &self.map.len())
            .finish()
    }
}

impl HostBuffer {
    /// A zeroed buffer of `len` (> 0) bytes in a new file under `dir`.
    pub fn create(dir: &Path, len: usize) -> std::io::Result<Self> {
        let path = dir.join(format!("kv-{:016x}", rand::random::<u64>()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        file.set_len(len as u64)?;
        // SAFETY: the file is new, and only ever written through this map; readers in other
        // processes (which may map it while layers still land) map it read-only.
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::MmapMut::map_mut(&file) }.inspect_err(|_| {
            let _ = std::fs::remove_file(&path);
        })?;
        Ok(Self { path, map })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.map
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.map
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

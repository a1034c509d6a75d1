//! Device memory for the host path: shared-memory files, mapped.
//!
//! With `--device host` the loader's "device" is host memory. Each resident cartridge (or
//! composition) lives in one file under a shared-memory directory (`/dev/shm` by default), so an
//! inference process on the same machine maps it read-only instead of copying it — the host
//! counterpart of handing out CUDA IPC handles. The file is unlinked when the buffer is dropped; a process that
//! still maps it keeps its view.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
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
    /// A zeroed buffer of `len` (> 0) bytes in a new file under `dir`. Readable by the loader's
    /// user and group only (a cartridge is its corpus, in another form): a consumer running as
    /// another user shares the group.
    pub fn create(dir: &Path, len: usize) -> std::io::Result<Self> {
        let path = dir.join(format!("kv-{:016x}", rand::random::<u64>()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o640)
            .open(&path)?;
        let remove = |_: &std::io::Error| {
            let _ = std::fs::remove_file(&path);
        };
        // A tmpfs too small (a pod's /dev/shm is often 64 MiB) fails here: the load gets a 507.
        cartridge_client::allocate(&file, len as u64).inspect_err(remove)?;
        // SAFETY: the file is new, and only ever written through this map; readers in other
        // processes (which may map it while layers still land) map it read-only.
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::MmapMut::map_mut(&file) }.inspect_err(remove)?;
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

/// This loader's own folder of buffer files under a shared base directory (`/dev/shm`), marked
/// live by an exclusive lock held for the life of the process and removed when dropped.
///
/// A loader that dies without cleaning up (SIGKILL, the OOM killer) leaves its folder, and tmpfs
/// keeps those pages allocated until the files go: a crash-looping sidecar would fill its pod's
/// memory. The kernel drops a dead process's locks, so the next loader to start removes every
/// folder whose lock it can take, and never touches one a running loader holds.
#[derive(Debug)]
pub struct ShmDir {
    path: PathBuf,
    /// The folder itself, flock'd while this loader runs: a sweep removes exactly the folders
    /// whose lock no process holds, including one whose loader died before it took the lock.
    _lock: std::fs::File,
}

const SHM_PREFIX: &str = "cartridge-loader-";

impl ShmDir {
    /// Removes the folders dead loaders left under `base`, then makes this process's own.
    pub fn create(base: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(base)?;
        let removed = sweep(base);
        if removed > 0 {
            tracing::info!(removed, base = %base.display(), "removed buffer folders of loaders that are gone");
        }
        let mut attempts = 0;
        loop {
            // The pid alone can repeat: every container's first process is pid 1.
            let path = base.join(format!(
                "{SHM_PREFIX}{}-{:08x}",
                std::process::id(),
                rand::random::<u32>()
            ));
            std::fs::DirBuilder::new().mode(0o750).create(&path)?;
            // Another loader's sweep may take the folder between its creation and the lock:
            // the lock counts only if the path still names the folder that was locked.
            let locked = std::fs::File::open(&path).and_then(|dir| {
                dir.try_lock().map_err(std::io::Error::from)?;
                let same = std::fs::metadata(&path)?.ino() == dir.metadata()?.ino();
                Ok(same.then_some(dir))
            });
            match locked {
                Ok(Some(lock)) => return Ok(Self { path, _lock: lock }),
                Ok(None) => {}
                Err(_) => {
                    let _ = std::fs::remove_dir_all(&path);
                }
            }
            attempts += 1;
            if attempts == 8 {
                return Err(std::io::Error::other(format!(
                    "could not make a locked buffer folder under {}",
                    base.display()
                )));
            }
        }
    }

    /// [`ShmDir::create`] under `base`, else under `/dev/shm`, else (warned) under the
    /// temporary folder.
    pub fn create_in(base: Option<PathBuf>) -> anyhow::Result<Self> {
        let base = base.unwrap_or_else(|| {
            let shared = Path::new("/dev/shm");
            if shared.is_dir() {
                shared.to_owned()
            } else {
                let fallback = std::env::temp_dir();
                tracing::warn!(folder = %fallback.display(), "no /dev/shm: resident buffers go to the temporary folder, which may be on disk (choose with --shm-dir)");
                fallback
            }
        });
        Self::create(&base)
            .map_err(|e| anyhow::anyhow!("making a buffer folder in {}: {e}", base.display()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ShmDir {
    fn drop(&mut self) {
        // Consumers that still map a buffer keep their view; the files go with the loader.
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Removes the loader folders under `base` whose lock no process holds; returns how many.
fn sweep(base: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(base) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|entry| entry.file_name().to_string_lossy().starts_with(SHM_PREFIX))
        .filter(|entry| {
            // Held while removing: a loader that makes this folder right now cannot lock it
            // meanwhile, and so never keeps a folder that is being removed.
            std::fs::File::open(entry.path()).is_ok_and(|dir| {
                dir.try_lock().is_ok() && std::fs::remove_dir_all(entry.path()).is_ok()
            })
        })
        .count()
}

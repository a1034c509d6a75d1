//! The disk tier: verified blobs as stored, content-addressed, under a size cap with
//! least-recently-used eviction. Blobs a load is using are pinned and never evicted under it.
//! The index is rebuilt from the directory at start, with file times as last use, so the cache
//! survives restarts; every read re-verifies the blob (decoding checks its digest).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::SystemTime;

use cartridge_client::Cache;
use cartridge_schemas::Digest;

#[derive(Debug)]
struct Entry {
    size: u64,
    used: SystemTime,
    pins: usize,
}

#[derive(Debug)]
pub struct DiskCache {
    cache: Cache,
    cap: u64,
    entries: Mutex<HashMap<Digest, Entry>>,
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct DiskUsage {
    pub cap: u64,
    pub used: u64,
    pub blobs: usize,
}

impl DiskCache {
    pub fn open(root: &Path, cap: u64) -> Result<Self, cartridge_client::ClientError> {
        let cache = Cache::new(root)?;
        let mut entries = HashMap::new();
        let blobs = root.join("blobs");
        for entry in std::fs::read_dir(&blobs)
            .map_err(cartridge_client::ClientError::io(&blobs))?
            .flatten()
        {
            let (Some(digest), Ok(metadata)) = (
                entry
                    .file_name()
                    .to_str()
                    .and_then(|n| Digest::from_hex(n).ok()),
                entry.metadata(),
            ) else {
                continue;
            };
            let used = metadata.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            entries.insert(
                digest,
                Entry {
                    size: metadata.len(),
                    used,
                    pins: 0,
                },
            );
        }
        Ok(Self {
            cache,
            cap,
            entries: Mutex::new(entries),
        })
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// Keeps these blobs from eviction (and marks them used) until [`DiskCache::unpin`].
    pub fn pin(&self, digests: &[Digest]) {
        let now = SystemTime::now();
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        for digest in digests {
            let entry = entries.entry(*digest).or_insert(Entry {
                size: 0,
                used: now,
                pins: 0,
            });
            entry.pins += 1;
            entry.used = now;
            // The file time carries recency across restarts.
            if let Ok(file) = std::fs::File::options()
                .write(true)
                .open(self.cache.blob(digest))
            {
                let _ = file.set_modified(now);
            }
        }
    }

    /// Releases pins, records the blobs' sizes as they now are on disk, and evicts the least
    /// recently used unpinned blobs while the cache is over its cap.
    pub fn unpin(&self, digests: &[Digest]) -> u64 {
        let Ok(mut entries) = self.entries.lock() else {
            return 0;
        };
        for digest in digests {
            if let Some(entry) = entries.get_mut(digest) {
                entry.pins = entry.pins.saturating_sub(1);
                entry.size = std::fs::metadata(self.cache.blob(digest)).map_or(0, |m| m.len());
            }
        }
        entries.retain(|digest, entry| entry.pins > 0 || self.cache.blob(digest).exists());
        let mut used: u64 = entries.values().map(|e| e.size).sum();
        let mut evicted = 0;
        while used > self.cap {
            let Some((digest, size)) = entries
                .iter()
                .filter(|(_, e)| e.pins == 0)
                .min_by_key(|(_, e)| e.used)
                .map(|(d, e)| (*d, e.size))
            else {
                break;
            };
            let _ = std::fs::remove_file(self.cache.blob(&digest));
            entries.remove(&digest);
            used -= size;
            evicted += 1;
        }
        if evicted > 0 {
            metrics::counter!("loader_evictions_total", "tier" => "disk").increment(evicted);
        }
        evicted
    }

    pub fn usage(&self) -> DiskUsage {
        let entries = self
            .entries
            .lock()
            .map(|e| (e.values().map(|e| e.size).sum(), e.len()))
            .unwrap_or((0, 0));
        DiskUsage {
            cap: self.cap,
            used: entries.0,
            blobs: entries.1,
        }
    }
}

//! The disk tier: verified blobs as stored, content-addressed, under a size cap with
//! least-recently-used eviction (partial downloads count and go the same way, unless one is
//! being written). Blobs a load is using are pinned and never evicted under it.
//! The index is read from the directory at start, with file times as last use, so the cache
//! survives restarts, and again after each load, as several loaders may share the directory;
//! every read re-verifies the blob (decoding checks its digest).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::SystemTime;

use cartridge_client::Cache;
use cartridge_schemas::Digest;

/// How stale a blob's last use must be before a hit in memory records a new one.
const TOUCH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

#[derive(Debug)]
struct Entry {
    size: u64,
    used: SystemTime,
    pins: usize,
    /// Used by this loader since it started: others sharing the folder do not tell their pins,
    /// so a blob only they used lately is left to them (see [`DiskCache::shrink`]).
    ours: bool,
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
        let disk = Self {
            cache: Cache::new(root)?,
            cap,
            entries: Mutex::new(HashMap::new()),
        };
        // A cap lowered since the last run holds from the start.
        if let Ok(mut entries) = disk.entries.lock() {
            disk.rescan(&mut entries)?;
            disk.shrink(&mut entries);
        }
        Ok(disk)
    }

    /// Brings the index up to what the folder holds: at start (so the cache survives restarts,
    /// with file times as last use), and after each load, as other loaders (one per GPU of a
    /// node, say) or `cartridge pull` may share the folder and add or evict blobs. Partial
    /// downloads count against the cap like blobs (a later load resumes one), so one whose blob is
    /// never asked for again is evicted in its turn instead of staying for good.
    fn rescan(
        &self,
        entries: &mut HashMap<Digest, Entry>,
    ) -> Result<(), cartridge_client::ClientError> {
        let mut found: HashMap<Digest, (u64, SystemTime)> = HashMap::new();
        for dir in ["partial", "blobs"] {
            let dir = self.cache.root().join(dir);
            for entry in std::fs::read_dir(&dir)
                .map_err(cartridge_client::ClientError::io(&dir))?
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
                let (size, last) = found.entry(digest).or_insert((0, used));
                *size += metadata.len();
                *last = (*last).max(used);
            }
        }
        for entry in entries.values_mut() {
            entry.size = 0;
        }
        for (digest, (size, used)) in found {
            let entry = entries.entry(digest).or_insert(Entry {
                size: 0,
                used,
                pins: 0,
                ours: false,
            });
            entry.size = size;
            entry.used = entry.used.max(used);
        }
        entries.retain(|_, entry| entry.pins > 0 || entry.size > 0);
        Ok(())
    }

    pub fn cache(&self) -> &Cache {
        &self.cache
    }

    /// Keeps these blobs from eviction (and marks them used) until the guard drops, however the
    /// caller's future ends (a dropped request included).
    pub fn pinned<'a>(&'a self, digests: &'a [Digest]) -> Pinned<'a> {
        self.pin(digests);
        Pinned {
            disk: self,
            digests,
        }
    }

    fn pin(&self, digests: &[Digest]) {
        let now = SystemTime::now();
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        for digest in digests {
            let entry = entries.entry(*digest).or_insert(Entry {
                size: 0,
                used: now,
                pins: 0,
                ours: true,
            });
            entry.pins += 1;
            entry.ours = true;
            self.mark_used(digest, entry, now);
        }
    }

    /// Marks blobs used by a load that found their cartridge in memory, so the hottest
    /// cartridges are not the first evicted from disk. (File times are written at most once a
    /// minute per blob: hits can come by the thousand.)
    pub fn touch(&self, digests: &[Digest]) {
        let now = SystemTime::now();
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        for digest in digests {
            if let Some(entry) = entries.get_mut(digest)
                && now.duration_since(entry.used).unwrap_or_default() > TOUCH_INTERVAL
            {
                self.mark_used(digest, entry, now);
            }
        }
    }

    fn mark_used(&self, digest: &Digest, entry: &mut Entry, now: SystemTime) {
        entry.used = now;
        // The file time carries recency across restarts.
        if let Ok(file) = std::fs::File::options()
            .write(true)
            .open(self.cache.blob(digest))
        {
            let _ = file.set_modified(now);
        }
    }

    /// Releases pins, records what the folder now holds, and evicts the least recently used
    /// unpinned blobs while the cache is over its cap.
    fn unpin(&self, digests: &[Digest]) -> u64 {
        let Ok(mut entries) = self.entries.lock() else {
            return 0;
        };
        for digest in digests {
            if let Some(entry) = entries.get_mut(digest) {
                entry.pins = entry.pins.saturating_sub(1);
            }
        }
        if let Err(error) = self.rescan(&mut entries) {
            tracing::warn!(%error, "reading the disk cache folder");
        }
        self.shrink(&mut entries)
    }

    /// Evicts the least recently used unpinned blobs while the cache is over its cap. A blob
    /// another loader sharing the folder used within the last minute (its pins mark the file's
    /// time) may be one it is reading: it stays, and the cache stays over its cap meanwhile.
    fn shrink(&self, entries: &mut HashMap<Digest, Entry>) -> u64 {
        let mut used: u64 = entries.values().map(|e| e.size).sum();
        let now = SystemTime::now();
        let mut candidates: Vec<(SystemTime, Digest)> = entries
            .iter()
            .filter(|(_, e)| {
                e.pins == 0
                    && (e.ours || now.duration_since(e.used).unwrap_or_default() > TOUCH_INTERVAL)
            })
            .map(|(d, e)| (e.used, *d))
            .collect();
        candidates.sort();
        let mut evicted = 0;
        for (_, digest) in candidates {
            if used <= self.cap {
                break;
            }
            if !self.remove_partial(&digest) {
                continue;
            }
            let _ = std::fs::remove_file(self.cache.blob(&digest));
            used -= entries.remove(&digest).map_or(0, |e| e.size);
            evicted += 1;
        }
        if evicted > 0 {
            metrics::counter!("loader_evictions_total", "tier" => "disk").increment(evicted);
        }
        evicted
    }

    /// Removes a partial download unless someone is downloading into it (another loader or a
    /// `cartridge pull` sharing the folder holds its lock): false then, and it stays.
    fn remove_partial(&self, digest: &Digest) -> bool {
        let path = self.cache.partial(digest);
        let Ok(file) = std::fs::File::options().append(true).open(&path) else {
            return true;
        };
        if file.try_lock().is_err() {
            return false;
        }
        // Removed while locked: a downloader waiting on this file finds it gone and starts anew.
        let _ = std::fs::remove_file(&path);
        true
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

pub struct Pinned<'a> {
    disk: &'a DiskCache,
    digests: &'a [Digest],
}

impl Drop for Pinned<'_> {
    fn drop(&mut self) {
        self.disk.unpin(self.digests);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Writes `size` bytes at `path`, last used `age_s` seconds ago.
    fn file(path: &Path, size: usize, age_s: u64) {
        std::fs::write(path, vec![0u8; size]).unwrap();
        let used = SystemTime::now() - Duration::from_secs(age_s);
        let file = std::fs::File::options().write(true).open(path).unwrap();
        file.set_modified(used).unwrap();
    }

    #[test]
    fn blobs_and_partial_downloads_share_the_cap_and_go_least_recently_used_first() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path()).unwrap();
        let [old, partial, recent, loading] = [1u8, 2, 3, 4].map(|n| Digest::of(&[n]));
        file(&cache.blob(&old), 300, 300);
        file(&cache.partial(&partial), 400, 200);
        file(&cache.blob(&recent), 300, 100);
        std::fs::write(dir.path().join("blobs/not-a-digest"), b"left alone").unwrap();

        let disk = DiskCache::open(dir.path(), 1000).unwrap();
        let usage = disk.usage();
        assert_eq!((usage.used, usage.blobs), (1000, 3));

        // A load pins its blob while it downloads; once done, the cache is over its cap and the
        // two least recently used go, the forgotten partial download among them.
        disk.pin(&[loading]);
        file(&cache.blob(&loading), 500, 0);
        assert_eq!(disk.unpin(&[loading]), 2);
        assert!(!cache.blob(&old).exists());
        assert!(!cache.partial(&partial).exists());
        assert!(cache.blob(&recent).exists() && cache.blob(&loading).exists());
        assert_eq!(disk.usage().used, 800);
        assert!(dir.path().join("blobs/not-a-digest").exists());

        // Opened again under a lower cap: the least recently used go at once.
        drop(disk);
        let disk = DiskCache::open(dir.path(), 500).unwrap();
        assert_eq!(disk.usage().used, 500);
        assert!(!cache.blob(&recent).exists() && cache.blob(&loading).exists());
    }

    #[test]
    fn a_partial_download_in_progress_elsewhere_is_not_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path()).unwrap();
        let [downloading, old, loaded] = [1u8, 2, 3].map(|n| Digest::of(&[n]));
        file(&cache.partial(&downloading), 400, 300);
        file(&cache.blob(&old), 400, 200);
        let disk = DiskCache::open(dir.path(), 1000).unwrap();
        // Another process (a `cartridge pull` on the same folder) is writing the partial file.
        let writer = std::fs::File::options()
            .append(true)
            .open(cache.partial(&downloading))
            .unwrap();
        writer.lock().unwrap();
        disk.pin(&[loaded]);
        file(&cache.blob(&loaded), 400, 0);
        // Over the cap: the least recently used is busy, so the next one goes.
        assert_eq!(disk.unpin(&[loaded]), 1);
        assert!(cache.partial(&downloading).exists() && !cache.blob(&old).exists());
        drop(writer);
        file(&cache.blob(&old), 400, 0);
        disk.pin(&[old]);
        assert_eq!(disk.unpin(&[old]), 1);
        assert!(!cache.partial(&downloading).exists());
    }

    #[test]
    fn a_pin_ends_with_its_guard_however_the_request_ends() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path()).unwrap();
        let [fetched, other] = [1u8, 2].map(|n| Digest::of(&[n]));
        let disk = DiskCache::open(dir.path(), 500).unwrap();
        let digests = [fetched];
        // A prefetch whose client went away: its future, guard and all, is dropped mid-fetch.
        let mut request = Box::pin(async {
            let _pinned = disk.pinned(&digests);
            file(&cache.blob(&fetched), 400, 100);
            std::future::pending::<()>().await;
        });
        assert!(futures::FutureExt::now_or_never(request.as_mut()).is_none());
        drop(request);
        disk.pin(&[other]);
        file(&cache.blob(&other), 400, 0);
        assert_eq!(
            disk.unpin(&[other]),
            1,
            "the dropped request's blob is evictable"
        );
        assert!(!cache.blob(&fetched).exists());
    }

    #[test]
    fn a_cartridge_served_from_memory_stays_fresh_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path()).unwrap();
        let [hot, cold, loaded] = [1u8, 2, 3].map(|n| Digest::of(&[n]));
        // Fetched long ago and served from memory since; the other fetched later, never used.
        file(&cache.blob(&hot), 400, 300);
        file(&cache.blob(&cold), 400, 200);
        let disk = DiskCache::open(dir.path(), 1000).unwrap();
        disk.touch(&[hot]);
        disk.touch(&[hot, loaded]);
        disk.pin(&[loaded]);
        file(&cache.blob(&loaded), 400, 0);
        assert_eq!(disk.unpin(&[loaded]), 1);
        assert!(cache.blob(&hot).exists() && !cache.blob(&cold).exists());
        // The use reached the file's time: a restart keeps the order.
        let age = std::fs::metadata(cache.blob(&hot))
            .unwrap()
            .modified()
            .unwrap()
            .elapsed()
            .unwrap_or_default();
        assert!(age < Duration::from_secs(60), "{age:?}");
    }

    #[test]
    fn loaders_sharing_a_folder_keep_it_under_the_cap_together() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path()).unwrap();
        let [first, second] = [1u8, 2].map(|n| Digest::of(&[n]));
        // One loader per GPU of a node, on one disk cache.
        let (a, b) = (
            DiskCache::open(dir.path(), 1000).unwrap(),
            DiskCache::open(dir.path(), 1000).unwrap(),
        );
        a.pin(&[first]);
        file(&cache.blob(&first), 600, 100);
        assert_eq!(a.unpin(&[first]), 0);
        b.pin(&[second]);
        file(&cache.blob(&second), 600, 0);
        // b counts what a stored: over the cap together, the least recently used goes.
        assert_eq!(b.unpin(&[second]), 1);
        assert!(!cache.blob(&first).exists() && cache.blob(&second).exists());
        assert_eq!(b.usage().used, 600);
        // a learns of it at its next load.
        a.pin(&[]);
        a.unpin(&[]);
        assert_eq!((a.usage().used, a.usage().blobs), (600, 1));

        // What b used in the last minute (it may still be reading it: b's pins are its own) is
        // not a's to evict, though it is less recently used than a's own: a gives up its own.
        let [third, stale] = [3u8, 4].map(|n| Digest::of(&[n]));
        file(&cache.blob(&stale), 300, 300);
        b.pin(&[third]);
        file(&cache.blob(&third), 300, 30);
        a.pin(&[first]);
        file(&cache.blob(&first), 800, 0);
        assert_eq!(a.unpin(&[first]), 2);
        assert!(cache.blob(&third).exists() && cache.blob(&second).exists());
        assert!(!cache.blob(&stale).exists() && !cache.blob(&first).exists());
    }

    #[test]
    fn what_a_load_uses_is_never_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path()).unwrap();
        let [used, other] = [1u8, 2].map(|n| Digest::of(&[n]));
        file(&cache.blob(&used), 600, 300);
        let disk = DiskCache::open(dir.path(), 1000).unwrap();
        disk.pin(&[used]);
        disk.pin(&[other]);
        file(&cache.blob(&other), 600, 0);
        // Over the cap: the pinned blob is the least recently used, yet the other one goes.
        assert_eq!(disk.unpin(&[other]), 1);
        assert!(cache.blob(&used).exists() && !cache.blob(&other).exists());
        assert_eq!(disk.unpin(&[used]), 0);
        assert_eq!(disk.usage().used, 600);
    }
}

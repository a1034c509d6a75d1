//! A tier of decoded cartridges (and compositions) resident in memory under a byte budget: the
//! device tier, and on a GPU also the host tier. Entries in use are never evicted; the least
//! recently used unused ones go first when room is needed; a request that cannot fit even then is
//! refused, never overrun.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use cartridge_schemas::Digest;
use cartridge_schemas::file::Header;
use serde::Serialize;

use crate::error::LoaderError;

/// What a resident entry holds: one cartridge, or several composed in order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EntryKey {
    Single(Digest),
    Composed(Vec<Digest>),
}

impl std::fmt::Display for EntryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Single(digest) => write!(f, "{digest}"),
            Self::Composed(digests) => write!(
                f,
                "{}",
                digests
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("+")
            ),
        }
    }
}

/// Memory a tier holds.
pub trait Resident {
    fn bytes(&self) -> usize;
    /// Where it is, for the status.
    fn describe(&self) -> String;
}

#[derive(Debug)]
struct Entry<B> {
    buffer: Arc<B>,
    /// The (composed) cartridge's header: model, dtype, tokens.
    header: Header,
    refs: usize,
    used: Instant,
}

#[derive(Debug, Serialize)]
pub struct EntryStatus {
    pub key: String,
    pub bytes: u64,
    pub tokens: u64,
    pub refs: usize,
    pub location: String,
}

#[derive(Debug, Serialize)]
pub struct StoreStatus {
    pub budget: u64,
    /// Bytes resident or reserved for loads in progress.
    pub used: u64,
    pub entries: Vec<EntryStatus>,
}

#[derive(Debug)]
pub struct Store<B> {
    /// The tier's name in metrics.
    tier: &'static str,
    budget: u64,
    /// Resident bytes plus reservations of loads in progress.
    used: u64,
    entries: HashMap<EntryKey, Entry<B>>,
}

impl<B: Resident> Store<B> {
    pub fn new(tier: &'static str, budget: u64) -> Self {
        Self {
            tier,
            budget,
            used: 0,
            entries: HashMap::new(),
        }
    }

    /// Takes a reference on a resident entry.
    pub fn acquire(&mut self, key: &EntryKey) -> Option<(Arc<B>, Header)> {
        let entry = self.entries.get_mut(key)?;
        entry.refs += 1;
        entry.used = Instant::now();
        Some((entry.buffer.clone(), entry.header.clone()))
    }

    pub fn release(&mut self, key: &EntryKey) {
        if let Some(entry) = self.entries.get_mut(key) {
            entry.refs = entry.refs.saturating_sub(1);
        }
    }

    /// Sets aside `bytes` for a load, evicting unused entries (least recently used first) as
    /// needed. Fails without side effects if even that cannot make room. Returns the evicted
    /// buffers, for the caller to drop once the lock is released: freeing memory takes a while.
    #[must_use = "the evicted buffers are freed where they are dropped"]
    pub fn reserve(&mut self, bytes: u64) -> Result<Vec<Arc<B>>, LoaderError> {
        if bytes > self.budget {
            return Err(LoaderError::OutOfMemory(format!(
                "{bytes} bytes exceed the whole {} byte budget",
                self.budget
            )));
        }
        let evictable: u64 = self
            .entries
            .values()
            .filter(|e| e.refs == 0)
            .map(|e| e.buffer.bytes() as u64)
            .sum();
        if self.used + bytes > self.budget + evictable {
            return Err(LoaderError::OutOfMemory(format!(
                "{bytes} bytes do not fit: {} of the {} byte budget are in use by handles or loads",
                self.used - evictable,
                self.budget
            )));
        }
        let mut evicted = Vec::new();
        while self.used + bytes > self.budget {
            let Some(key) = self
                .entries
                .iter()
                .filter(|(_, e)| e.refs == 0)
                .min_by_key(|(_, e)| e.used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some(entry) = self.entries.remove(&key) {
                self.used -= entry.buffer.bytes() as u64;
                metrics::counter!("loader_evictions_total", "tier" => self.tier).increment(1);
                tracing::debug!(%key, "evicted");
                evicted.push(entry.buffer);
            }
        }
        self.used += bytes;
        Ok(evicted)
    }

    /// Returns a reservation a failed load did not use.
    pub fn unreserve(&mut self, bytes: u64) {
        self.used = self.used.saturating_sub(bytes);
    }

    /// Makes a reserved load resident, holding one reference for the caller.
    pub fn insert(&mut self, key: EntryKey, buffer: B, header: Header) {
        self.entries.insert(
            key,
            Entry {
                buffer: Arc::new(buffer),
                header,
                refs: 1,
                used: Instant::now(),
            },
        );
    }

    pub fn status(&self) -> StoreStatus {
        let mut entries: Vec<EntryStatus> = self
            .entries
            .iter()
            .map(|(key, entry)| EntryStatus {
                key: key.to_string(),
                bytes: entry.buffer.bytes() as u64,
                tokens: entry.header.tokens,
                refs: entry.refs,
                location: entry.buffer.describe(),
            })
            .collect();
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        StoreStatus {
            budget: self.budget,
            used: self.used,
            entries,
        }
    }
}

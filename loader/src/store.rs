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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use cartridge_schemas::fingerprint::{ModelFingerprint, Rope, RopeLayout};
    use proptest::prelude::*;

    use super::*;

    /// Memory of `bytes` bytes that knows which entry it was made for.
    #[derive(Debug)]
    struct Held {
        key: u8,
        bytes: usize,
    }

    impl Resident for Held {
        fn bytes(&self) -> usize {
            self.bytes
        }

        fn describe(&self) -> String {
            format!("entry {}", self.key)
        }
    }

    fn header() -> Header {
        Header {
            format_version: cartridge_schemas::file::FORMAT_VERSION,
            model: ModelFingerprint {
                architecture: "llama".into(),
                layers: 1,
                kv_heads: 1,
                head_dim: 2,
                rope: Rope {
                    theta: 10000.0,
                    layout: RopeLayout::Half,
                    scaling: None,
                },
                weights: Digest::of(b"model"),
            },
            dtype: cartridge_schemas::Dtype::Bf16,
            tokens: 1,
            frozen_tokens: 0,
            payload_digest: Digest::of(b"payload"),
            provenance: serde_json::Value::Null,
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Reserve room for entry `key` of `bytes`, and make it resident (or give it back).
        Load {
            key: u8,
            bytes: u64,
            lands: bool,
        },
        Acquire(u8),
        Release(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..6u8, 1..=40u64, any::<bool>()).prop_map(|(key, bytes, lands)| Op::Load {
                key,
                bytes,
                lands
            }),
            (0..6u8).prop_map(Op::Acquire),
            (0..6u8).prop_map(Op::Release),
        ]
    }

    proptest! {
        /// Whatever loads and releases come, the budget holds, nothing in use is evicted, and
        /// what is counted is exactly what is resident.
        #[test]
        fn the_budget_holds_and_entries_in_use_stay(ops in proptest::collection::vec(op(), 1..80)) {
            const BUDGET: u64 = 100;
            let mut store: Store<Held> = Store::new("test", BUDGET);
            // The references each resident entry holds, as the callers know them.
            let mut refs: HashMap<u8, usize> = HashMap::new();
            let key = |k: u8| EntryKey::Single(Digest::of(&[k]));
            for op in ops {
                match op {
                    Op::Load { key: k, bytes, lands } => {
                        if refs.contains_key(&k) {
                            continue; // resident: a load acquires it instead
                        }
                        let in_use: u64 = store
                            .status()
                            .entries
                            .iter()
                            .filter(|e| e.refs > 0)
                            .map(|e| e.bytes)
                            .sum();
                        match store.reserve(bytes) {
                            Ok(evicted) => {
                                for buffer in evicted {
                                    prop_assert_eq!(refs.remove(&buffer.key), Some(0), "evicted {} in use", buffer.key);
                                }
                                if lands {
                                    store.insert(key(k), Held { key: k, bytes: bytes as usize }, header());
                                    refs.insert(k, 1);
                                } else {
                                    store.unreserve(bytes);
                                }
                            }
                            // Refused only when even evicting every unused entry leaves no room.
                            Err(_) => prop_assert!(in_use + bytes > BUDGET, "{bytes} refused with {in_use} in use"),
                        }
                    }
                    Op::Acquire(k) => {
                        let acquired = store.acquire(&key(k));
                        prop_assert_eq!(acquired.is_some(), refs.contains_key(&k));
                        if let Some(held) = refs.get_mut(&k) {
                            *held += 1;
                        }
                    }
                    Op::Release(k) => {
                        if let Some(held) = refs.get_mut(&k).filter(|h| **h > 0) {
                            *held -= 1;
                            store.release(&key(k));
                        }
                    }
                }
                let status = store.status();
                prop_assert!(status.used <= BUDGET, "{} used", status.used);
                prop_assert_eq!(status.used, status.entries.iter().map(|e| e.bytes).sum::<u64>());
                prop_assert_eq!(status.entries.len(), refs.len());
                for entry in &status.entries {
                    let k = refs.iter().find(|(k, _)| key(**k).to_string() == entry.key);
                    prop_assert_eq!(k.map(|(_, r)| *r), Some(entry.refs));
                }
            }
        }
    }
}

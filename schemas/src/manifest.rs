//! Manifests: what the registry stores for one pushed cartridge.
//!
//! A manifest is the cartridge's [`Header`] plus the list of chunks its payload was cut into.
//! It is stored as canonical JSON under the blake3 of those bytes, so its digest names it exactly.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::canonical;
use crate::digest::Digest;
use crate::file::{FileLayout, Header};

pub const MANIFEST_SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub schema_version: u32,
    pub cartridge: Header,
    /// The file's safetensors header text, exactly as stored, so a pull rebuilds the very bytes
    /// that were pushed. Its `cartridge` metadata must equal `cartridge`.
    pub file_header: String,
    /// In layer order; together they cover every layer exactly once.
    pub chunks: Vec<ChunkDescriptor>,
    /// RFC 3339, UTC.
    pub created: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// One chunk: a run of whole layers, stored compressed as one blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkDescriptor {
    /// Layers `start..end`; the raw bytes are each layer's keys then values, in order.
    pub layers: LayerRange,
    pub codec: Codec,
    /// The blob as stored; its digest is its object key.
    pub stored: BlobInfo,
    /// The bytes the blob decodes to.
    pub raw: BlobInfo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerRange {
    pub start: u32,
    pub end: u32,
}

impl LayerRange {
    pub fn len(&self) -> u32 {
        self.end.saturating_sub(self.start)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlobInfo {
    pub digest: Digest,
    pub size: u64,
}

/// How a chunk's raw bytes became its stored bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Codec {
    /// zstd of the raw bytes.
    #[serde(rename = "zstd")]
    Zstd,
    /// Bytes of each 2-byte element regrouped (all high bytes, then all low bytes), then zstd.
    #[serde(rename = "shuffle2+zstd")]
    Shuffle2Zstd,
    /// The same for 4-byte elements (most significant byte plane first).
    #[serde(rename = "shuffle4+zstd")]
    Shuffle4Zstd,
}

impl Codec {
    /// The byte-plane width this codec shuffles by, if it shuffles.
    pub fn shuffle_width(self) -> Option<usize> {
        match self {
            Self::Zstd => None,
            Self::Shuffle2Zstd => Some(2),
            Self::Shuffle4Zstd => Some(4),
        }
    }
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Zstd => "zstd",
            Self::Shuffle2Zstd => "shuffle2+zstd",
            Self::Shuffle4Zstd => "shuffle4+zstd",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid manifest: {detail}")]
pub struct ManifestError {
    pub detail: String,
}

impl ManifestError {
    fn new(detail: impl Into<String>) -> Self {
        Self {
            detail: detail.into(),
        }
    }
}

impl Manifest {
    /// Parses and validates a manifest from JSON (canonical or not).
    pub fn from_json(bytes: &[u8]) -> Result<Self, ManifestError> {
        let manifest: Self =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::new(e.to_string()))?;
        manifest.validate()?;
        Ok(manifest)
    }

    pub fn to_canonical_json(&self) -> Vec<u8> {
        // Only maps with non-string keys fail to serialize, and a manifest has none.
        canonical::to_canonical_json(self).expect("a manifest always serializes")
    }

    /// The manifest's name: blake3 of its canonical JSON.
    pub fn digest(&self) -> Digest {
        Digest::of(&self.to_canonical_json())
    }

    /// Every blob the manifest references, each once, in chunk order.
    pub fn blobs(&self) -> Vec<BlobInfo> {
        let mut seen = std::collections::HashSet::new();
        self.chunks
            .iter()
            .map(|chunk| chunk.stored)
            .filter(|blob| seen.insert(blob.digest))
            .collect()
    }

    /// Checks internal consistency: version, header, and chunks covering every layer once with the
    /// sizes the header implies.
    pub fn validate(&self) -> Result<(), ManifestError> {
        if self.schema_version != MANIFEST_SCHEMA_VERSION {
            return Err(ManifestError::new(format!(
                "unsupported schema_version {} (this build reads {MANIFEST_SCHEMA_VERSION})",
                self.schema_version
            )));
        }
        self.cartridge
            .check()
            .map_err(|e| ManifestError::new(e.to_string()))?;
        let layout = FileLayout::parse(&self.file_header)
            .map_err(|e| ManifestError::new(format!("file_header: {e}")))?;
        if layout.header != self.cartridge {
            return Err(ManifestError::new(
                "file_header's cartridge metadata differs from the manifest's cartridge",
            ));
        }
        let layers = self.cartridge.model.layers;
        let layer_bytes = self.cartridge.layer_bytes();
        let mut next = 0;
        // One blob is one size and decodes one way: `blobs()` keeps the first size it sees,
        // and a chunk describing the same bytes otherwise could never be pulled.
        let mut blobs = std::collections::HashMap::new();
        for (index, chunk) in self.chunks.iter().enumerate() {
            let stored = chunk.stored;
            let first =
                *blobs
                    .entry(stored.digest)
                    .or_insert((stored.size, chunk.codec, chunk.raw));
            if first.0 != stored.size {
                return Err(ManifestError::new(format!(
                    "chunk {index} gives blob {} two sizes",
                    stored.digest
                )));
            }
            if (first.1, first.2) != (chunk.codec, chunk.raw) {
                return Err(ManifestError::new(format!(
                    "chunk {index} decodes blob {} differently from an earlier chunk",
                    stored.digest
                )));
            }
            let range = chunk.layers;
            if range.start != next || range.end <= range.start || range.end > layers {
                return Err(ManifestError::new(format!(
                    "chunk {index} covers layers {}..{}, expected a non-empty range starting at {next} within 0..{layers}",
                    range.start, range.end
                )));
            }
            let expected = layer_bytes * u64::from(range.len());
            if chunk.raw.size != expected {
                return Err(ManifestError::new(format!(
                    "chunk {index} has {} raw bytes, but layers {}..{} hold {expected}",
                    chunk.raw.size, range.start, range.end
                )));
            }
            // A valid frame is never larger than this; a size past it would let a registry
            // send (and a reader store) bytes without end before the digest could refuse them.
            let bound = zstd::zstd_safe::compress_bound(expected as usize) as u64;
            if stored.size > bound {
                return Err(ManifestError::new(format!(
                    "chunk {index} claims {} stored bytes, more than zstd makes of {expected} raw bytes (at most {bound})",
                    stored.size
                )));
            }
            if let Some(width) = chunk.codec.shuffle_width()
                && width != self.cartridge.dtype.size()
            {
                return Err(ManifestError::new(format!(
                    "chunk {index} uses codec {} on {} elements",
                    chunk.codec, self.cartridge.dtype
                )));
            }
            next = range.end;
        }
        if next != layers {
            return Err(ManifestError::new(format!(
                "chunks cover layers 0..{next}, the model has {layers}"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> Manifest {
        let cartridge = crate::file::tests::sample_cartridge(4);
        let header = cartridge.header().clone();
        let layer_bytes = header.layer_bytes();
        let chunk = |start, blob: &[u8]| ChunkDescriptor {
            layers: LayerRange {
                start,
                end: start + 1,
            },
            codec: Codec::Shuffle2Zstd,
            stored: BlobInfo {
                digest: Digest::of(blob),
                size: 10,
            },
            raw: BlobInfo {
                digest: Digest::of(b"raw"),
                size: layer_bytes,
            },
        };
        Manifest {
            schema_version: MANIFEST_SCHEMA_VERSION,
            cartridge: header,
            file_header: cartridge.file_header().to_owned(),
            chunks: vec![chunk(0, b"a"), chunk(1, b"b")],
            created: "2026-11-23T00:00:00Z".into(),
            annotations: BTreeMap::new(),
        }
    }

    #[test]
    fn canonical_bytes_and_digest_are_stable() {
        let manifest = sample();
        let bytes = manifest.to_canonical_json();
        let reparsed = Manifest::from_json(&bytes).unwrap();
        assert_eq!(reparsed, manifest);
        assert_eq!(reparsed.to_canonical_json(), bytes);
        assert_eq!(reparsed.digest(), Digest::of(&bytes));
        // The same value from pretty, reordered JSON has the same digest.
        let pretty = serde_json::to_vec_pretty(&manifest).unwrap();
        assert_eq!(
            Manifest::from_json(&pretty).unwrap().digest(),
            manifest.digest()
        );
    }

    #[test]
    fn validation_names_the_problem() {
        let mut gap = sample();
        gap.chunks.remove(0);
        assert!(
            gap.validate()
                .unwrap_err()
                .to_string()
                .contains("chunk 0 covers layers 1..2")
        );

        let mut short = sample();
        short.chunks.pop();
        assert!(
            short
                .validate()
                .unwrap_err()
                .to_string()
                .contains("chunks cover layers 0..1, the model has 2")
        );

        let mut size = sample();
        size.chunks[1].raw.size += 1;
        assert!(
            size.validate()
                .unwrap_err()
                .to_string()
                .contains("chunk 1 has")
        );

        // Two chunks of 2^62 stored bytes each once summed to 2^63 without end in sight.
        let mut huge = sample();
        huge.chunks[1].stored.size = 1 << 62;
        let err = huge.validate().unwrap_err().to_string();
        assert!(
            err.contains("chunk 1 claims 4611686018427387904 stored bytes, more than zstd makes"),
            "{err}"
        );
        huge.chunks[1].stored.size =
            zstd::zstd_safe::compress_bound(huge.chunks[1].raw.size as usize) as u64;
        huge.validate().unwrap();

        let mut codec = sample();
        codec.chunks[0].codec = Codec::Shuffle4Zstd;
        assert!(
            codec
                .validate()
                .unwrap_err()
                .to_string()
                .contains("shuffle4+zstd on bf16")
        );

        assert!(
            Manifest::from_json(b"{}")
                .unwrap_err()
                .to_string()
                .starts_with("invalid manifest: missing field")
        );
    }

    #[test]
    fn file_header_must_match_the_cartridge() {
        let mut other = sample();
        other.cartridge.tokens = 5;
        other.cartridge.provenance = serde_json::json!({});
        assert!(
            other
                .validate()
                .unwrap_err()
                .to_string()
                .contains("file_header")
        );
        let mut garbage = sample();
        garbage.file_header = "{}".into();
        assert!(
            garbage
                .validate()
                .unwrap_err()
                .to_string()
                .contains("file_header: not a cartridge")
        );
    }

    #[test]
    fn blobs_are_deduplicated() {
        let mut manifest = sample();
        manifest.chunks[1].stored = manifest.chunks[0].stored;
        assert_eq!(manifest.blobs().len(), 1);
        manifest.validate().unwrap();
        let mut decoded_otherwise = manifest.clone();
        decoded_otherwise.chunks[1].raw.digest = Digest::of(b"other");
        let err = decoded_otherwise.validate().unwrap_err().to_string();
        assert!(err.contains("decodes blob"), "{err}");
        manifest.chunks[1].stored.size += 1;
        let err = manifest.validate().unwrap_err().to_string();
        assert!(err.contains("two sizes"), "{err}");
    }
}

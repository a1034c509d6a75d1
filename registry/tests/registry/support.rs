//! Cartridges, manifests and blobs to push in tests.

use cartridge_codec::{EncodeOptions, EncodedChunk, encode_cartridge};
use cartridge_registry::storage::{BlobWriter, Storage};
use cartridge_schemas::Digest;
use cartridge_schemas::file::{self, Cartridge, LayerData, NewCartridge};
use cartridge_schemas::fingerprint::{ModelFingerprint, Rope, RopeLayout};
use cartridge_schemas::manifest::{MANIFEST_SCHEMA_VERSION, Manifest};
use cartridge_schemas::reference::Repository;

/// A small real cartridge (4 layers, one chunk per layer) whose bytes depend on `seed`.
pub fn cartridge(seed: u8) -> Cartridge {
    let model = ModelFingerprint {
        architecture: "llama".into(),
        layers: 4,
        kv_heads: 2,
        head_dim: 8,
        rope: Rope {
            theta: 10000.0,
            layout: RopeLayout::Half,
            scaling: None,
        },
        weights: Digest::of(b"test model"),
    };
    let tokens = 16u64;
    let len = (2 * tokens * 8 * 2) as usize;
    let tensors: Vec<Vec<u8>> = (0..8u8)
        .map(|t| {
            (0..len)
                .map(|i| (i as u8).wrapping_mul(31) ^ t ^ seed)
                .collect()
        })
        .collect();
    let layers: Vec<LayerData<'_>> = tensors
        .chunks(2)
        .map(|p| LayerData {
            keys: &p[0],
            values: &p[1],
        })
        .collect();
    let new = NewCartridge {
        model,
        dtype: cartridge_schemas::Dtype::Bf16,
        tokens,
        frozen_tokens: 1,
        provenance: serde_json::json!({"seed": seed}),
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.safetensors");
    file::write(&path, new, &layers).unwrap();
    Cartridge::from_bytes(std::fs::read(path).unwrap()).unwrap()
}

/// A cartridge encoded into chunks (one layer each) and its manifest.
pub fn encoded(seed: u8) -> (Manifest, Vec<EncodedChunk>) {
    let cartridge = cartridge(seed);
    let options = EncodeOptions {
        target_chunk_bytes: 1,
        ..EncodeOptions::default()
    };
    let chunks = encode_cartridge(&cartridge, &options).unwrap();
    let manifest = Manifest {
        schema_version: MANIFEST_SCHEMA_VERSION,
        cartridge: cartridge.header().clone(),
        file_header: cartridge.file_header().to_owned(),
        chunks: chunks.iter().map(|c| c.descriptor.clone()).collect(),
        created: "2026-11-23T00:00:00Z".into(),
        annotations: Default::default(),
    };
    (manifest, chunks)
}

pub async fn upload_all(storage: &Storage, repo: &Repository, chunks: &[EncodedChunk]) {
    for chunk in chunks {
        let mut writer = BlobWriter::new(chunk.descriptor.stored.digest, 1 << 30);
        writer
            .append(bytes::Bytes::copy_from_slice(&chunk.bytes))
            .unwrap();
        storage
            .put_blob(repo, writer.finish().unwrap())
            .await
            .unwrap();
    }
}

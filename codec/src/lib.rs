//! The chunk codec shared by the registry client and the loader.
//!
//! A cartridge's payload is cut into chunks of whole layers (a few MiB each, so transfers run in
//! parallel and a loader can start on early layers while later ones arrive). Each chunk's raw
//! bytes — every layer's keys then values, in layer order — are byte-shuffled and compressed with
//! zstd. Shuffling groups the bytes of each element by significance: for bf16 the high bytes
//! (sign, exponent) are highly repetitive while the low bytes (mantissa) are close to noise, and
//! zstd compresses the two planes far better apart than interleaved.
//!
//! Both the stored and the raw bytes are named by blake3 digests; decoding checks the stored digest
//! before decompressing anything and the raw digest after, so a corrupted blob can never come back
//! as a plausible payload.

use cartridge_schemas::file::{Cartridge, Header};
use cartridge_schemas::manifest::{BlobInfo, ChunkDescriptor, Codec, LayerRange};
use cartridge_schemas::{Digest, Dtype};
use rayon::prelude::*;

/// zstd level 1: on bf16 cartridges it compresses shuffled chunks smaller than level 3 and
/// encodes faster (bench/results/codec.json).
pub const DEFAULT_LEVEL: i32 = 1;
pub const DEFAULT_CHUNK_BYTES: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("blob {expected} is corrupt: its {size} bytes hash to {actual}")]
    StoredDigestMismatch {
        expected: Digest,
        actual: Digest,
        size: u64,
    },
    #[error("blob {digest} has {actual} bytes, the manifest says {expected}")]
    StoredSizeMismatch {
        digest: Digest,
        expected: u64,
        actual: u64,
    },
    #[error("blob {digest} does not decompress: {detail}")]
    Decompress { digest: Digest, detail: String },
    #[error("blob {digest} decodes to {actual} bytes, the manifest says {expected}")]
    RawSizeMismatch {
        digest: Digest,
        expected: u64,
        actual: u64,
    },
    #[error("blob {digest} decodes to bytes hashing to {actual}, the manifest says {expected}")]
    RawDigestMismatch {
        digest: Digest,
        expected: Digest,
        actual: Digest,
    },
    #[error("zstd compression failed: {0}")]
    Compress(std::io::Error),
    #[error("{len} bytes are not a whole number of {width}-byte elements")]
    Misaligned { len: usize, width: usize },
    #[error("output buffer holds {actual} bytes, the chunk decodes to {expected}")]
    OutputSize { expected: u64, actual: usize },
    #[error("cannot allocate {bytes} bytes to decode into")]
    Allocation { bytes: u64 },
    #[error(
        "chunk {index} covers layers {start}..{end}, expected a range starting at {next} within 0..{layers}"
    )]
    Layout {
        index: usize,
        start: u32,
        end: u32,
        next: u32,
        layers: u32,
    },
}

#[derive(Debug, Clone, Copy)]
pub struct EncodeOptions {
    /// zstd level (1–22).
    pub level: i32,
    /// Chunks hold as many whole layers as fit in this many raw bytes (at least one layer).
    pub target_chunk_bytes: u64,
    /// Byte-shuffle before zstd (always on for pushes; off only to measure plain zstd).
    pub shuffle: bool,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        Self {
            level: DEFAULT_LEVEL,
            target_chunk_bytes: DEFAULT_CHUNK_BYTES,
            shuffle: true,
        }
    }
}

/// The shuffling codec for a dtype.
pub fn codec_for(dtype: Dtype) -> Codec {
    match dtype.size() {
        2 => Codec::Shuffle2Zstd,
        _ => Codec::Shuffle4Zstd,
    }
}

/// Cuts `layers` layers of `layer_bytes` each into chunks near `target_bytes`, sizes balanced so
/// the last chunk is not a runt.
pub fn plan_chunks(layers: u32, layer_bytes: u64, target_bytes: u64) -> Vec<LayerRange> {
    if layers == 0 {
        return Vec::new();
    }
    let per_chunk = (target_bytes / layer_bytes.max(1)).clamp(1, u64::from(layers)) as u32;
    let count = layers.div_ceil(per_chunk);
    let (base, extra) = (layers / count, layers % count);
    let mut start = 0;
    (0..count)
        .map(|index| {
            let end = start + base + u32::from(index < extra);
            let range = LayerRange { start, end };
            start = end;
            range
        })
        .collect()
}

/// One encoded chunk: its descriptor and the bytes to store.
#[derive(Debug, Clone)]
pub struct EncodedChunk {
    pub descriptor: ChunkDescriptor,
    pub bytes: Vec<u8>,
}

/// Encodes a whole cartridge, chunks in parallel on all cores.
pub fn encode_cartridge(
    cartridge: &Cartridge,
    options: &EncodeOptions,
) -> Result<Vec<EncodedChunk>, CodecError> {
    let header = cartridge.header();
    let codec = if options.shuffle {
        codec_for(header.dtype)
    } else {
        Codec::Zstd
    };
    plan_chunks(
        header.model.layers,
        header.layer_bytes(),
        options.target_chunk_bytes,
    )
    .into_par_iter()
    .map(|layers| {
        let pieces: Vec<&[u8]> = (layers.start as usize..layers.end as usize)
            .flat_map(|l| [cartridge.keys(l), cartridge.values(l)])
            .collect();
        encode_chunk(&pieces, layers, codec, options.level)
    })
    .collect()
}

/// Encodes one chunk whose raw bytes are `pieces` concatenated.
pub fn encode_chunk(
    pieces: &[&[u8]],
    layers: LayerRange,
    codec: Codec,
    level: i32,
) -> Result<EncodedChunk, CodecError> {
    let raw_size: usize = pieces.iter().map(|p| p.len()).sum();
    let mut hasher = blake3::Hasher::new();
    pieces.iter().for_each(|piece| {
        hasher.update(piece);
    });
    let raw = BlobInfo {
        digest: hasher.finalize().into(),
        size: raw_size as u64,
    };

    let bytes = match codec.shuffle_width() {
        Some(width) => {
            let mut shuffled = vec![0; raw_size];
            shuffle(pieces, width, &mut shuffled)?;
            zstd::bulk::compress(&shuffled, level)
        }
        None => zstd::bulk::compress(&pieces.concat(), level),
    }
    .map_err(CodecError::Compress)?;
    let stored = BlobInfo {
        digest: Digest::of(&bytes),
        size: bytes.len() as u64,
    };
    Ok(EncodedChunk {
        descriptor: ChunkDescriptor {
            layers,
            codec,
            stored,
            raw,
        },
        bytes,
    })
}

/// Checks that `stored` is the blob the descriptor names, without decoding it.
pub fn verify_stored(stored: &[u8], descriptor: &ChunkDescriptor) -> Result<(), CodecError> {
    let expected = descriptor.stored;
    if stored.len() as u64 != expected.size {
        return Err(CodecError::StoredSizeMismatch {
            digest: expected.digest,
            expected: expected.size,
            actual: stored.len() as u64,
        });
    }
    let actual = Digest::of(stored);
    if actual != expected.digest {
        return Err(CodecError::StoredDigestMismatch {
            expected: expected.digest,
            actual,
            size: expected.size,
        });
    }
    Ok(())
}

/// Verifies and decodes a stored chunk into its raw bytes.
pub fn decode_chunk(stored: &[u8], descriptor: &ChunkDescriptor) -> Result<Vec<u8>, CodecError> {
    // A blob other than the one named costs no allocation.
    verify_stored(stored, descriptor)?;
    let mut out = zeroed(descriptor.raw.size)?;
    decode_chunk_into(stored, descriptor, &mut [&mut out])?;
    Ok(out)
}

/// A zeroed buffer of a size a file or manifest stated: too large is an error, not an abort.
fn zeroed(bytes: u64) -> Result<Vec<u8>, CodecError> {
    let refused = || CodecError::Allocation { bytes };
    let len = usize::try_from(bytes).map_err(|_| refused())?;
    let mut out = Vec::new();
    out.try_reserve_exact(len).map_err(|_| refused())?;
    out.resize(len, 0);
    Ok(out)
}

/// Decompressed bytes are placed this many at a time. Decoding holds no copy of a chunk, so the
/// raw size a manifest states (a hostile one can state anything) never sizes an allocation: only
/// the caller's destinations, which it sized and counts.
const WINDOW: usize = 1 << 20;

/// Verifies and decodes a stored chunk into `outs`, the raw bytes' destinations in order (e.g.
/// each layer's keys and values where they belong in a file or in pinned host memory); their
/// lengths must add up to the raw size. The stored digest is checked before decompressing, the
/// raw digest after.
pub fn decode_chunk_into(
    stored: &[u8],
    descriptor: &ChunkDescriptor,
    outs: &mut [&mut [u8]],
) -> Result<(), CodecError> {
    verify_stored(stored, descriptor)?;
    let digest = descriptor.stored.digest;
    let expected = descriptor.raw.size;
    let total: usize = outs.iter().map(|out| out.len()).sum();
    if total as u64 != expected {
        return Err(CodecError::OutputSize {
            expected,
            actual: total,
        });
    }
    let width = descriptor.codec.shuffle_width().unwrap_or(1);
    for out in outs.iter() {
        check_aligned(out.len(), width)?;
    }
    let decompress_error = |e: std::io::Error| CodecError::Decompress {
        digest,
        detail: e.to_string(),
    };
    let mut decoder = zstd::stream::read::Decoder::with_buffer(stored)
        .map_err(decompress_error)?
        .single_frame();
    let mut window = vec![0; WINDOW.min(total).max(1)];
    let mut position = 0;
    loop {
        let read = match std::io::Read::read(&mut decoder, &mut window) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(decompress_error(error)),
        };
        // More than stated: stop at once (a small blob may expand without end).
        if position + read > total {
            return Err(CodecError::RawSizeMismatch {
                digest,
                expected,
                actual: (position + read) as u64,
            });
        }
        place(&window[..read], position, width, total / width, outs);
        position += read;
    }
    if position != total {
        return Err(CodecError::RawSizeMismatch {
            digest,
            expected,
            actual: position as u64,
        });
    }
    // A blob is one frame and nothing else.
    if !decoder.finish().is_empty() {
        return Err(CodecError::Decompress {
            digest,
            detail: "bytes follow the compressed frame".into(),
        });
    }
    let mut hasher = blake3::Hasher::new();
    for out in outs.iter() {
        hasher.update(out);
    }
    let actual = Digest::from(hasher.finalize());
    if actual != descriptor.raw.digest {
        return Err(CodecError::RawDigestMismatch {
            digest,
            expected: descriptor.raw.digest,
            actual,
        });
    }
    Ok(())
}

/// Decodes every chunk of a manifest in parallel into one payload buffer (layer order). The
/// chunks must cover the header's layers in order, each once.
pub fn decode_payload(
    header: &Header,
    chunks: &[(ChunkDescriptor, &[u8])],
) -> Result<Vec<u8>, CodecError> {
    let layers = header.model.layers;
    let mut next = 0;
    for (index, (descriptor, _)) in chunks.iter().enumerate() {
        let range = descriptor.layers;
        if range.start != next || range.end <= range.start || range.end > layers {
            return Err(CodecError::Layout {
                index,
                start: range.start,
                end: range.end,
                next,
                layers,
            });
        }
        next = range.end;
    }
    if next != layers {
        return Err(CodecError::Layout {
            index: chunks.len(),
            start: next,
            end: next,
            next,
            layers,
        });
    }
    let mut payload = zeroed(header.payload_bytes())?;
    let layer_bytes = header.layer_bytes() as usize;
    let mut outputs = Vec::with_capacity(chunks.len());
    let mut rest = payload.as_mut_slice();
    for (descriptor, stored) in chunks {
        // Each chunk's raw size is checked against its destination when it decodes.
        let (head, tail) = rest.split_at_mut(descriptor.layers.len() as usize * layer_bytes);
        outputs.push((descriptor, *stored, head));
        rest = tail;
    }
    outputs
        .into_par_iter()
        .try_for_each(|(descriptor, stored, out)| {
            decode_chunk_into(stored, descriptor, &mut [out])
        })?;
    Ok(payload)
}

/// Byte-shuffles `pieces` (concatenated) into `out`: byte plane `width-1` (most significant, on a
/// little-endian layout) of every element first, down to plane 0.
pub fn shuffle(pieces: &[&[u8]], width: usize, out: &mut [u8]) -> Result<(), CodecError> {
    let total: usize = pieces.iter().map(|p| p.len()).sum();
    check_aligned(total, width)?;
    check_aligned(out.len(), width)?;
    if out.len() != total {
        return Err(CodecError::OutputSize {
            expected: total as u64,
            actual: out.len(),
        });
    }
    let elements = total / width;
    if elements == 0 {
        return Ok(());
    }
    let mut offset = 0;
    for piece in pieces {
        check_aligned(piece.len(), width)?;
        match width {
            2 => shuffle_piece::<2>(piece, out, elements, offset),
            4 => shuffle_piece::<4>(piece, out, elements, offset),
            _ => shuffle_piece_dyn(piece, width, out, elements, offset),
        }
        offset += piece.len() / width;
    }
    Ok(())
}

/// Inverse of [`shuffle`], a window at a time: puts `bytes`, found at `position` of a shuffled
/// stream of `elements` elements of `width` bytes, where they belong in `outs` (the elements in
/// order, each out a whole number of them). Width 1 is a plain copy.
fn place(
    mut bytes: &[u8],
    mut position: usize,
    width: usize,
    elements: usize,
    outs: &mut [&mut [u8]],
) {
    while !bytes.is_empty() {
        // The run of one byte plane this window holds: elements first..first + count.
        let (plane, first) = (position / elements, position % elements);
        let count = bytes.len().min(elements - first);
        let byte = width - 1 - plane;
        let mut start = 0;
        for out in outs.iter_mut() {
            let end = start + out.len() / width;
            let (low, high) = (first.max(start), (first + count).min(end));
            if low < high {
                let source = &bytes[low - first..high - first];
                let target = &mut out[(low - start) * width..(high - start) * width];
                match width {
                    1 => target.copy_from_slice(source),
                    2 => place_plane::<2>(source, target, byte),
                    4 => place_plane::<4>(source, target, byte),
                    _ => {
                        for (element, value) in target.chunks_exact_mut(width).zip(source) {
                            element[byte] = *value;
                        }
                    }
                }
            }
            start = end;
        }
        bytes = &bytes[count..];
        position += count;
    }
}

fn check_aligned(len: usize, width: usize) -> Result<(), CodecError> {
    if width == 0 || !len.is_multiple_of(width) {
        return Err(CodecError::Misaligned { len, width });
    }
    Ok(())
}

// The const-width loops below compile to straight byte moves the optimizer can vectorize; the
// plane slices are split up front so the inner loop carries no bounds checks.
fn shuffle_piece<const W: usize>(piece: &[u8], out: &mut [u8], elements: usize, offset: usize) {
    let count = piece.len() / W;
    let mut planes: Vec<&mut [u8]> = out
        .chunks_exact_mut(elements)
        .map(|plane| &mut plane[offset..offset + count])
        .collect();
    for (index, element) in piece.chunks_exact(W).enumerate() {
        for (plane, byte) in planes.iter_mut().zip(element.iter().rev()) {
            plane[index] = *byte;
        }
    }
}

fn shuffle_piece_dyn(piece: &[u8], width: usize, out: &mut [u8], elements: usize, offset: usize) {
    for (index, element) in piece.chunks_exact(width).enumerate() {
        for (byte, value) in element.iter().enumerate() {
            out[(width - 1 - byte) * elements + offset + index] = *value;
        }
    }
}

fn place_plane<const W: usize>(source: &[u8], target: &mut [u8], byte: usize) {
    for (element, value) in target.chunks_exact_mut(W).zip(source) {
        element[byte] = *value;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn shuffle_puts_high_bytes_first() {
        let raw = [0x01, 0xa1, 0x02, 0xa2, 0x03, 0xa3];
        let mut out = [0; 6];
        shuffle(&[&raw[..2], &raw[2..]], 2, &mut out).unwrap();
        assert_eq!(out, [0xa1, 0xa2, 0xa3, 0x01, 0x02, 0x03]);
        let mut back = [0; 6];
        let (first, second) = back.split_at_mut(4);
        place(&out, 0, 2, 3, &mut [first, second]);
        assert_eq!(back, raw);
    }

    #[test]
    fn empty_input_round_trips() {
        let chunk =
            encode_chunk(&[], LayerRange { start: 0, end: 1 }, Codec::Shuffle2Zstd, 1).unwrap();
        assert!(
            decode_chunk(&chunk.bytes, &chunk.descriptor)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn plans_balanced_whole_layer_chunks() {
        let ranges = |layers, layer_bytes, target| {
            plan_chunks(layers, layer_bytes, target)
                .iter()
                .map(|r| (r.start, r.end))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            ranges(30, 1 << 20, 4 << 20),
            vec![
                (0, 4),
                (4, 8),
                (8, 12),
                (12, 16),
                (16, 20),
                (20, 24),
                (24, 27),
                (27, 30)
            ]
        );
        assert_eq!(ranges(3, 10 << 20, 4 << 20), vec![(0, 1), (1, 2), (2, 3)]);
        assert_eq!(ranges(5, 1, 1 << 20), vec![(0, 5)]);
        assert!(plan_chunks(0, 1, 1).is_empty());
    }

    fn encoded(raw: &[u8], codec: Codec) -> EncodedChunk {
        let layers = LayerRange { start: 0, end: 1 };
        let half = raw.len() / 2 / 8 * 8;
        encode_chunk(&[&raw[..half], &raw[half..]], layers, codec, 3).unwrap()
    }

    #[test]
    fn decoding_catches_every_corruption() {
        let raw: Vec<u8> = (0..4096u32).map(|i| (i * 31 % 251) as u8).collect();
        let chunk = encoded(&raw, Codec::Shuffle2Zstd);
        assert_eq!(decode_chunk(&chunk.bytes, &chunk.descriptor).unwrap(), raw);

        let mut flipped = chunk.bytes.clone();
        let middle = flipped.len() / 2;
        flipped[middle] ^= 0x40;
        let err = decode_chunk(&flipped, &chunk.descriptor)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(&format!(
                "blob {} is corrupt",
                chunk.descriptor.stored.digest
            )),
            "{err}"
        );

        let err = decode_chunk(&chunk.bytes[..10], &chunk.descriptor).unwrap_err();
        assert!(
            matches!(err, CodecError::StoredSizeMismatch { .. }),
            "{err}"
        );

        // A descriptor that lies about the raw bytes (a consistent but wrong manifest).
        let mut lying = chunk.descriptor.clone();
        lying.raw.digest = Digest::of(b"other");
        assert!(matches!(
            decode_chunk(&chunk.bytes, &lying),
            Err(CodecError::RawDigestMismatch { .. })
        ));
        let mut small = chunk.descriptor.clone();
        small.raw.size = 100;
        assert!(matches!(
            decode_chunk(&chunk.bytes, &small),
            Err(CodecError::RawSizeMismatch { .. })
        ));
        // A blob is its frame alone (the digest vouches only for whatever bytes were stored).
        let mut trailing = chunk.bytes.clone();
        trailing.extend_from_slice(b"more");
        let mut padded = chunk.descriptor.clone();
        padded.stored = BlobInfo {
            digest: Digest::of(&trailing),
            size: trailing.len() as u64,
        };
        let err = decode_chunk(&trailing, &padded).unwrap_err().to_string();
        assert!(err.contains("bytes follow"), "{err}");
        let mut large = chunk.descriptor.clone();
        large.raw.size = 5000;
        assert!(matches!(
            decode_chunk(&chunk.bytes, &large),
            Err(CodecError::RawSizeMismatch { .. })
        ));
        // A size no buffer can hold is refused, not an abort.
        large.raw.size = u64::MAX;
        assert!(matches!(
            decode_chunk(&chunk.bytes, &large),
            Err(CodecError::Allocation { bytes: u64::MAX })
        ));
        // Bytes that are no zstd frame, under their right digest.
        let mut garbage = chunk.descriptor.clone();
        garbage.stored = BlobInfo {
            digest: Digest::of(&raw),
            size: raw.len() as u64,
        };
        assert!(matches!(
            decode_chunk(&raw, &garbage),
            Err(CodecError::Decompress { .. })
        ));
    }

    #[test]
    fn a_payload_is_its_chunks_in_layer_order() {
        use cartridge_schemas::file;
        let model = cartridge_schemas::ModelFingerprint {
            architecture: "llama".into(),
            layers: 3,
            kv_heads: 2,
            head_dim: 8,
            rope: cartridge_schemas::fingerprint::Rope {
                theta: 10000.0,
                layout: cartridge_schemas::fingerprint::RopeLayout::Half,
                scaling: None,
            },
            weights: Digest::of(b"weights"),
        };
        let tensors: Vec<Vec<u8>> = (0..6u8)
            .map(|t| (0..2 * 4 * 8 * 2).map(|i| (i as u8) ^ (t * 40)).collect())
            .collect();
        let layers: Vec<_> = tensors
            .chunks(2)
            .map(|pair| file::LayerData {
                keys: &pair[0],
                values: &pair[1],
            })
            .collect();
        let new = file::NewCartridge {
            model,
            dtype: Dtype::Bf16,
            tokens: 4,
            frozen_tokens: 1,
            provenance: serde_json::json!({}),
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.safetensors");
        file::write(&path, new, &layers).unwrap();
        let cartridge = Cartridge::open(&path).unwrap();
        let header = cartridge.header();
        // A layer a chunk.
        let options = EncodeOptions {
            target_chunk_bytes: 1,
            ..Default::default()
        };
        let chunks = encode_cartridge(&cartridge, &options).unwrap();
        let inputs: Vec<_> = chunks
            .iter()
            .map(|c| (c.descriptor.clone(), c.bytes.as_slice()))
            .collect();
        assert_eq!(inputs.len(), 3);
        assert_eq!(decode_payload(header, &inputs).unwrap(), tensors.concat());
        // Chunks out of order would swap layers; a missing one would leave zeros.
        let mut swapped = inputs.clone();
        swapped.swap(0, 1);
        assert!(matches!(
            decode_payload(header, &swapped),
            Err(CodecError::Layout { index: 0, .. })
        ));
        let err = decode_payload(header, &inputs[..2]).unwrap_err();
        assert!(matches!(err, CodecError::Layout { index: 2, .. }), "{err}");
    }

    proptest! {
        #[test]
        fn round_trips_any_bytes(
            elements in prop::collection::vec(any::<u64>(), 0..1000),
            width in prop_oneof![Just(2usize), Just(4), Just(8)],
            split in 0usize..100,
            window in 0usize..100,
        ) {
            let raw: Vec<u8> = elements.iter().flat_map(|e| e.to_le_bytes()).collect();
            let cut = (split * raw.len() / 100) / width * width;
            let mut shuffled = vec![0; raw.len()];
            shuffle(&[&raw[..cut], &raw[cut..]], width, &mut shuffled).unwrap();
            // Placed in two windows cut anywhere, across planes and destinations.
            let mut back = vec![0; raw.len()];
            let (first, second) = back.split_at_mut(cut);
            let at = window * raw.len() / 100;
            let count = raw.len() / width;
            place(&shuffled[..at], 0, width, count, &mut [&mut *first, &mut *second]);
            place(&shuffled[at..], at, width, count, &mut [first, second]);
            prop_assert_eq!(&back, &raw);

            for codec in [Codec::Zstd, Codec::Shuffle2Zstd, Codec::Shuffle4Zstd] {
                let chunk = encoded(&raw, codec);
                prop_assert_eq!(decode_chunk(&chunk.bytes, &chunk.descriptor).unwrap(), raw.clone());
            }
        }
    }
}

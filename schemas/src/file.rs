//! The cartridge file: safetensors with one tensor pair per layer and a JSON header.
//!
//! Tensors are `layers.{i}.keys` and `layers.{i}.values`, each `[kv_heads, tokens, head_dim]` in
//! the header's dtype, little-endian. The safetensors metadata holds one entry, `cartridge`, whose
//! value is the JSON [`Header`]: format version, model fingerprint, dtype, token counts, the
//! blake3 digest of the payload and free-form provenance, sealed by the digest of those fields.
//!
//! The payload is the concatenation, in layer order, of each layer's keys then values. It is
//! defined independently of where safetensors places the tensors in the file, and it is exactly
//! the concatenation of the raw bytes of the codec's chunks. Reading a file (and so every pull)
//! and every decode by the loader check its digest; the registry, which never holds a payload
//! whole, checks each chunk's stored digest as the content-addressed manifest names it.
//!
//! Reading maps the file and validates everything before handing out byte slices into the map.

use std::fmt;
use std::fs::File;
use std::ops::{Deref, Range};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::dtype::Dtype;
use crate::fingerprint::ModelFingerprint;

/// The version this build writes. It reads every version from [`OLDEST_VERSION`]: version 1
/// headers are the same but for `header_digest`, which they lack.
pub const FORMAT_VERSION: u32 = 2;
pub const OLDEST_VERSION: u32 = 1;
/// The safetensors metadata key that holds the [`Header`].
pub const METADATA_KEY: &str = "cartridge";

/// Everything a cartridge says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub format_version: u32,
    pub model: ModelFingerprint,
    pub dtype: Dtype,
    pub tokens: u64,
    /// The first `frozen_tokens` positions are not trained (the attention sink).
    pub frozen_tokens: u64,
    pub payload_digest: Digest,
    /// Where the cartridge came from: corpus digest, trainer parameters, composed parts, ….
    #[serde(default)]
    pub provenance: serde_json::Value,
}

impl Header {
    /// `[kv_heads, tokens, head_dim]`, the shape of every tensor.
    pub fn tensor_shape(&self) -> [usize; 3] {
        [
            self.model.kv_heads as usize,
            self.tokens as usize,
            self.model.head_dim as usize,
        ]
    }

    /// Bytes of one tensor (the keys or the values of one layer).
    pub fn tensor_bytes(&self) -> usize {
        self.tensor_shape().iter().product::<usize>() * self.dtype.size()
    }

    /// Bytes of the whole payload: keys and values of every layer.
    pub fn payload_bytes(&self) -> u64 {
        self.layer_bytes() * u64::from(self.model.layers)
    }

    /// Bytes of one layer's keys and values together.
    pub fn layer_bytes(&self) -> u64 {
        self.tensor_bytes() as u64 * 2
    }

    /// Checks the header on its own: version, dimensions and token counts.
    pub fn check(&self) -> Result<(), FormatError> {
        if !(OLDEST_VERSION..=FORMAT_VERSION).contains(&self.format_version) {
            return Err(FormatError::UnsupportedVersion {
                found: u64::from(self.format_version),
            });
        }
        check_counts(&self.model, self.tokens, self.frozen_tokens)
    }
}

/// Which tensor of a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Keys,
    Values,
}

impl Part {
    fn as_str(self) -> &'static str {
        match self {
            Self::Keys => "keys",
            Self::Values => "values",
        }
    }
}

pub fn tensor_name(layer: usize, part: Part) -> String {
    format!("layers.{layer}.{}", part.as_str())
}

/// The first defect found in a cartridge file.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("truncated: {detail}")]
    Truncated { detail: String },
    #[error("not a valid safetensors file: {detail}")]
    Safetensors { detail: String },
    #[error("not a cartridge: the safetensors metadata has no '{METADATA_KEY}' entry")]
    NotACartridge,
    #[error(
        "unsupported cartridge format version {found} (this build reads versions {OLDEST_VERSION} to {FORMAT_VERSION})"
    )]
    UnsupportedVersion { found: u64 },
    #[error("invalid cartridge header: {detail}")]
    BadHeader { detail: String },
    #[error("missing tensor '{name}'")]
    MissingTensor { name: String },
    #[error("unexpected tensor '{name}' (the model has {layers} layers of keys and values)")]
    UnexpectedTensor { name: String, layers: u32 },
    #[error("tensor '{name}' has dtype {found}, the header says {expected}")]
    WrongDtype {
        name: String,
        expected: Dtype,
        found: String,
    },
    #[error(
        "tensor '{name}' has shape {found:?}, expected {expected:?} ([kv_heads, tokens, head_dim])"
    )]
    WrongShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error(
        "tensor '{name}' has {found} bytes, expected {expected} ([kv_heads, tokens, head_dim] of the dtype)"
    )]
    WrongLength {
        name: String,
        expected: usize,
        found: usize,
    },
    #[error("payload digest mismatch: the header says {expected}, the tensors hash to {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error(
        "the cartridge header is corrupt: it says it hashes to {expected}, it hashes to {actual}"
    )]
    HeaderDigestMismatch { expected: Digest, actual: Digest },
}

/// The bytes of a cartridge file: a read-only memory map, or a buffer already in memory.
enum Backing {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Deref for Backing {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Self::Mapped(map) => map,
            Self::Owned(bytes) => bytes,
        }
    }
}

/// A validated cartridge. Tensor data is borrowed from the file's memory map, never copied.
pub struct Cartridge {
    bytes: Backing,
    header: Header,
    /// Absolute byte ranges of each layer's keys and values.
    layers: Vec<[Range<usize>; 2]>,
}

impl fmt::Debug for Cartridge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cartridge")
            .field("header", &self.header)
            .field("file_bytes", &self.bytes.len())
            .finish()
    }
}

impl Cartridge {
    /// Maps and fully validates a cartridge file.
    pub fn open(path: &Path) -> Result<Self, FormatError> {
        let io = |source| FormatError::Io {
            path: path.to_owned(),
            source,
        };
        // Mapping a folder or a device fails with "No such device", and opening a pipe waits for
        // a writer: say what it is instead.
        let kind = std::fs::metadata(path).map_err(io)?.file_type();
        if !kind.is_file() {
            let what = if kind.is_dir() {
                "it is a folder, not a cartridge file"
            } else {
                "it is not a regular file"
            };
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                what,
            )));
        }
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only. Another process truncating the file while it is mapped would
        // fault the reader; files are only ever replaced by rename, never rewritten in place.
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Self::validate(Backing::Mapped(map))
    }

    /// Fully validates a cartridge held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, FormatError> {
        Self::validate(Backing::Owned(bytes))
    }

    pub fn header(&self) -> &Header {
        &self.header
    }

    pub fn layer_count(&self) -> usize {
        self.layers.len()
    }

    pub fn tensor(&self, layer: usize, part: Part) -> &[u8] {
        let [keys, values] = &self.layers[layer];
        match part {
            Part::Keys => &self.bytes[keys.clone()],
            Part::Values => &self.bytes[values.clone()],
        }
    }

    pub fn keys(&self, layer: usize) -> &[u8] {
        self.tensor(layer, Part::Keys)
    }

    pub fn values(&self, layer: usize) -> &[u8] {
        self.tensor(layer, Part::Values)
    }

    /// The whole file, as stored.
    pub fn file_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The payload in digest order: keys then values of layer 0, then layer 1, ….
    pub fn payload(&self) -> impl Iterator<Item = &[u8]> {
        (0..self.layer_count()).flat_map(|layer| [self.keys(layer), self.values(layer)])
    }

    fn validate(bytes: Backing) -> Result<Self, FormatError> {
        let layout = FileLayout::parse(header_text(&bytes)?)?;
        let held = bytes.len();
        if held != layout.file_len {
            let data_start = 8 + layout.header_text_len;
            let declared = layout.file_len - data_start;
            return Err(match held.checked_sub(data_start) {
                Some(data) if data < declared => FormatError::Truncated {
                    detail: format!(
                        "the header declares {declared} bytes of tensor data but the file holds {data}"
                    ),
                },
                // Longer than declared: something was appended, nothing cut off.
                Some(data) => FormatError::Safetensors {
                    detail: format!(
                        "{} bytes follow the {declared} bytes of tensor data",
                        data - declared
                    ),
                },
                None => FormatError::Truncated {
                    detail: format!("the file ends inside its header ({held} bytes)"),
                },
            });
        }
        let cartridge = Self {
            bytes,
            header: layout.header,
            layers: layout.layers,
        };
        let actual = payload_digest(cartridge.payload());
        if actual != cartridge.header.payload_digest {
            return Err(FormatError::DigestMismatch {
                expected: cartridge.header.payload_digest,
                actual,
            });
        }
        Ok(cartridge)
    }

    /// The safetensors header JSON, exactly as stored (padding included).
    pub fn file_header(&self) -> &str {
        // Validated as UTF-8 when the cartridge was opened.
        header_text(&self.bytes).unwrap_or_default()
    }
}

/// The safetensors header text of a file, checking the framing around it.
fn header_text(bytes: &[u8]) -> Result<&str, FormatError> {
    let Some(prefix) = bytes.first_chunk::<8>() else {
        return Err(FormatError::Truncated {
            detail: format!(
                "the file is {} bytes, shorter than the 8-byte safetensors length prefix",
                bytes.len()
            ),
        });
    };
    if bytes.get(8).is_some_and(|&first| first != b'{') {
        return Err(FormatError::Safetensors {
            detail: "the header is not JSON (is this a safetensors file?)".into(),
        });
    }
    let header_len = u64::from_le_bytes(*prefix);
    if header_len > bytes.len() as u64 - 8 {
        return Err(FormatError::Truncated {
            detail: format!(
                "the header declares {header_len} bytes but the file holds only {} after the prefix",
                bytes.len() - 8
            ),
        });
    }
    std::str::from_utf8(&bytes[8..8 + header_len as usize]).map_err(|e| FormatError::Safetensors {
        detail: format!("the header is not UTF-8: {e}"),
    })
}

/// Where everything sits in a cartridge file, read from its safetensors header alone: the
/// cartridge header and each layer's tensors as absolute byte ranges. Lets a reader check a file
/// it has not fetched yet, and a writer rebuild a file byte for byte from its header and payload.
#[derive(Debug, Clone, PartialEq)]
pub struct FileLayout {
    pub header: Header,
    /// Length of the header text (the `n` of the 8-byte prefix).
    pub header_text_len: usize,
    /// Per layer, the absolute byte ranges of its keys and values.
    pub layers: Vec<[Range<usize>; 2]>,
    /// Length of the whole file.
    pub file_len: usize,
}

impl FileLayout {
    /// Validates a safetensors header text as a cartridge's: metadata, every tensor's presence,
    /// dtype and shape, and no extra tensors.
    pub fn parse(text: &str) -> Result<Self, FormatError> {
        // What a file's reader demands (see `header_text`), so a manifest's header text passes
        // here only if the file rebuilt from it opens.
        if !text.starts_with('{') {
            return Err(FormatError::Safetensors {
                detail: "the header is not JSON (is this a safetensors file?)".into(),
            });
        }
        let metadata: safetensors::tensor::Metadata = unique_keys(text)
            .and_then(|()| serde_json::from_str(text))
            .map_err(|e| FormatError::Safetensors {
                detail: e.to_string(),
            })?;
        let header = parse_header(&metadata)?;
        let data_start = 8 + text.len();
        let tensors = metadata.tensors();
        let mut layers = Vec::with_capacity(header.model.layers as usize);
        let expected_shape = header.tensor_shape().to_vec();
        for layer in 0..header.model.layers as usize {
            let mut ranges =
                [Part::Keys, Part::Values].map(|part| (tensor_name(layer, part), 0..0));
            for (name, range) in &mut ranges {
                let info = tensors
                    .get(name.as_str())
                    .ok_or_else(|| FormatError::MissingTensor { name: name.clone() })?;
                if Dtype::from_safetensors(info.dtype) != Some(header.dtype) {
                    return Err(FormatError::WrongDtype {
                        name: name.clone(),
                        expected: header.dtype,
                        found: format!("{:?}", info.dtype).to_lowercase(),
                    });
                }
                if info.shape != expected_shape {
                    return Err(FormatError::WrongShape {
                        name: name.clone(),
                        expected: expected_shape.clone(),
                        found: info.shape.clone(),
                    });
                }
                let (start, end) = info.data_offsets;
                *range = match (data_start.checked_add(start), data_start.checked_add(end)) {
                    (Some(start), Some(end)) => start..end,
                    _ => {
                        return Err(FormatError::Safetensors {
                            detail: format!("tensor {name}'s offsets are past any file"),
                        });
                    }
                };
            }
            let [(_, keys), (_, values)] = ranges;
            layers.push([keys, values]);
        }
        if tensors.len() != layers.len() * 2 {
            let mut names: Vec<&String> = tensors.keys().collect();
            names.sort();
            let known: std::collections::HashSet<String> = (0..layers.len())
                .flat_map(|layer| [Part::Keys, Part::Values].map(|part| tensor_name(layer, part)))
                .collect();
            if let Some(name) = names.into_iter().find(|name| !known.contains(*name)) {
                return Err(FormatError::UnexpectedTensor {
                    name: name.clone(),
                    layers: header.model.layers,
                });
            }
        }
        Ok(Self {
            header,
            header_text_len: text.len(),
            layers,
            file_len: data_start + metadata.data_len(),
        })
    }
}

fn parse_header(metadata: &safetensors::tensor::Metadata) -> Result<Header, FormatError> {
    let json = metadata
        .metadata()
        .as_ref()
        .and_then(|m| m.get(METADATA_KEY))
        .ok_or(FormatError::NotACartridge)?;

    // The version is read on its own first, so a newer file is reported as such rather than as
    // a header with unknown fields.
    #[derive(Deserialize)]
    struct Versioned {
        format_version: u64,
    }
    let bad = |e: serde_json::Error| FormatError::BadHeader {
        detail: e.to_string(),
    };
    unique_keys(json).map_err(bad)?;
    let versioned: Versioned = serde_json::from_str(json).map_err(bad)?;
    if !(u64::from(OLDEST_VERSION)..=u64::from(FORMAT_VERSION)).contains(&versioned.format_version)
    {
        return Err(FormatError::UnsupportedVersion {
            found: versioned.format_version,
        });
    }
    let mut value: serde_json::Value = serde_json::from_str(json).map_err(bad)?;
    let sealed = value
        .as_object_mut()
        .and_then(|fields| fields.remove(HEADER_DIGEST));
    match (versioned.format_version, sealed) {
        // Version 1, made before headers carried their digest.
        (1, None) => {}
        (1, Some(_)) => {
            return Err(FormatError::BadHeader {
                detail: format!(
                    "a version 1 header carries a {HEADER_DIGEST}, which only later versions have"
                ),
            });
        }
        // The range was checked above: any other version is a later one.
        (_, Some(sealed)) => {
            let expected: Digest = serde_json::from_value(sealed).map_err(bad)?;
            let actual = header_digest(&value).map_err(bad)?;
            if actual != expected {
                return Err(FormatError::HeaderDigestMismatch { expected, actual });
            }
        }
        (version, None) => {
            return Err(FormatError::BadHeader {
                detail: format!("a version {version} header lacks its {HEADER_DIGEST}"),
            });
        }
    }
    let header: Header = serde_json::from_value(value).map_err(bad)?;
    header.check()?;
    Ok(header)
}

/// The field of the stored header JSON (from version 2) that holds the blake3 of the rest of
/// it, as canonical JSON: the payload digest covers only the tensors, this the header.
const HEADER_DIGEST: &str = "header_digest";

fn header_digest(fields: &serde_json::Value) -> serde_json::Result<Digest> {
    crate::canonical::canonical_digest(fields)
}

/// The JSON a file's `cartridge` metadata entry holds for `header`: its fields and, from
/// version 2, their digest.
pub fn header_json(header: &Header) -> Result<String, FormatError> {
    let bad = |e: serde_json::Error| FormatError::BadHeader {
        detail: e.to_string(),
    };
    let mut value = serde_json::to_value(header).map_err(bad)?;
    if header.format_version > 1 {
        let digest = header_digest(&value).map_err(bad)?;
        if let Some(fields) = value.as_object_mut() {
            fields.insert(
                HEADER_DIGEST.to_owned(),
                serde_json::to_value(digest).map_err(bad)?,
            );
        }
    }
    Ok(value.to_string())
}

/// Refuses JSON naming a key twice in one object, at any depth: serde_json keeps the last, other
/// readers the first, so the same header would say different things (another provenance) to
/// each.
fn unique_keys(text: &str) -> serde_json::Result<()> {
    use serde::de::{Deserializer, Error, MapAccess, SeqAccess, Visitor};
    struct Unique;
    impl<'de> Deserialize<'de> for Unique {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            deserializer.deserialize_any(Unique)
        }
    }
    impl<'de> Visitor<'de> for Unique {
        type Value = Unique;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("JSON")
        }
        fn visit_bool<E>(self, _: bool) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_i64<E>(self, _: i64) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_u64<E>(self, _: u64) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_f64<E>(self, _: f64) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_str<E>(self, _: &str) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_unit<E>(self) -> Result<Unique, E> {
            Ok(Unique)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Unique, A::Error> {
            while seq.next_element::<Unique>()?.is_some() {}
            Ok(Unique)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Unique, A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(key) = map.next_key::<String>()? {
                map.next_value::<Unique>()?;
                if !seen.insert(key.clone()) {
                    return Err(A::Error::custom(format!("key {key:?} appears twice")));
                }
            }
            Ok(Unique)
        }
    }
    serde_json::from_str::<Unique>(text).map(|_| ())
}

/// Bounds on a header's counts, far past any model's, so that sizes computed from them cannot
/// overflow or ask for absurd allocations: with these, one tensor is at most 2^50 bytes and a
/// payload fits in a u64.
const MAX_DIMENSION: u32 = 4096;
const MAX_TOKENS: u64 = 1 << 24;

fn check_counts(
    model: &ModelFingerprint,
    tokens: u64,
    frozen_tokens: u64,
) -> Result<(), FormatError> {
    // Names like GGUF's `general.architecture`: printed in tables and errors, so no control
    // characters or text direction tricks ride along.
    let architecture = &model.architecture;
    let detail = if architecture.is_empty()
        || architecture.len() > 64
        || !architecture
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
    {
        format!(
            "the model's architecture {architecture:?} must be 1 to 64 letters, digits, '_', '.' or '-'"
        )
    } else if model.layers == 0 || model.kv_heads == 0 || model.head_dim == 0 {
        "the model's layers, kv_heads and head_dim must all be at least 1".to_owned()
    } else if model.layers > MAX_DIMENSION
        || model.kv_heads > MAX_DIMENSION
        || model.head_dim > MAX_DIMENSION
    {
        // Counts come from files and requests: bounded before anything is sized by them.
        format!("the model's layers, kv_heads and head_dim must each be at most {MAX_DIMENSION}")
    } else if tokens == 0 {
        "tokens must be at least 1".to_owned()
    } else if tokens > MAX_TOKENS {
        format!("tokens ({tokens}) must be at most {MAX_TOKENS}")
    } else if frozen_tokens > tokens {
        format!("frozen_tokens ({frozen_tokens}) exceeds tokens ({tokens})")
    } else if !(model.rope.theta.is_finite() && model.rope.theta > 0.0) {
        // JSON has no NaN or infinity: such a header would be written as null and never read.
        format!(
            "the RoPE base ({}) must be a positive number",
            model.rope.theta
        )
    } else {
        return Ok(());
    };
    Err(FormatError::BadHeader { detail })
}

/// blake3 of the payload pieces in order.
pub fn payload_digest<'a>(pieces: impl IntoIterator<Item = &'a [u8]>) -> Digest {
    let mut hasher = blake3::Hasher::new();
    for piece in pieces {
        // Layers run to megabytes: hashing them on all cores pays.
        hasher.update_rayon(piece);
    }
    hasher.finalize().into()
}

/// What a writer supplies; the digest and format version are filled in by [`write`].
#[derive(Debug, Clone)]
pub struct NewCartridge {
    pub model: ModelFingerprint,
    pub dtype: Dtype,
    pub tokens: u64,
    pub frozen_tokens: u64,
    pub provenance: serde_json::Value,
}

/// One layer's tensors, each `[kv_heads, tokens, head_dim]` little-endian.
#[derive(Debug, Clone, Copy)]
pub struct LayerData<'a> {
    pub keys: &'a [u8],
    pub values: &'a [u8],
}

struct TensorRef<'a> {
    dtype: safetensors::Dtype,
    shape: &'a [usize],
    data: &'a [u8],
}

impl safetensors::View for TensorRef<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        self.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        self.data.into()
    }

    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Refuses a destination whose folder does not exist, or that exists and is not a regular file:
/// a write renames a new file over it, which would replace a device (`/dev/null`), a pipe or a
/// socket with a plain file.
pub fn check_destination(path: &Path) -> std::io::Result<()> {
    let folder = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match std::fs::metadata(folder) {
        Ok(meta) if meta.is_dir() => {}
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            return Err(std::io::Error::new(
                error.kind(),
                format!("{}: {error}", folder.display()),
            ));
        }
        Err(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} does not exist", folder.display()),
            ));
        }
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                format!("{} is not a folder", folder.display()),
            ));
        }
    }
    match std::fs::metadata(path) {
        Ok(existing) if existing.is_dir() => Err(std::io::Error::new(
            std::io::ErrorKind::IsADirectory,
            "it is a folder: name the file to write",
        )),
        Ok(existing) if !existing.is_file() => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "it is not a regular file (a device, pipe or socket), which writing would replace",
        )),
        _ => Ok(()),
    }
}

/// Writes a cartridge atomically (a sibling temporary file renamed into place) and returns its header.
pub fn write(
    path: &Path,
    new: NewCartridge,
    layers: &[LayerData<'_>],
) -> Result<Header, FormatError> {
    let header = build_header(new, layers)?;
    let shape = header.tensor_shape();
    let dtype = header.dtype.to_safetensors();
    let tensors = layers.iter().enumerate().flat_map(|(layer, data)| {
        [(Part::Keys, data.keys), (Part::Values, data.values)].map(|(part, data)| {
            (
                tensor_name(layer, part),
                TensorRef {
                    dtype,
                    shape: &shape,
                    data,
                },
            )
        })
    });
    let json = header_json(&header)?;
    let metadata = std::collections::HashMap::from([(METADATA_KEY.to_owned(), json)]);
    let written = |source| FormatError::Write {
        path: path.to_owned(),
        source,
    };
    check_destination(path).map_err(written)?;
    let mode = new_file_permissions(path).map_err(written)?;
    // safetensors writes a private (0600) temporary and renames it into place: the cartridge
    // then gets the mode any new file gets here (a loader or another user may read it), and
    // is synced before it counts as written.
    safetensors::serialize_to_file(tensors, Some(metadata), path).map_err(|error| match error {
        safetensors::SafeTensorError::IoError(source) => written(source),
        other => FormatError::Safetensors {
            detail: other.to_string(),
        },
    })?;
    let file = std::fs::File::open(path).map_err(written)?;
    file.set_permissions(mode).map_err(written)?;
    file.sync_all().map_err(written)?;
    Ok(header)
}

/// The permissions the file at `path` has, or else those a file created beside it gets (0666
/// less the umask, read off a probe: asking for the umask would change it, for every thread).
fn new_file_permissions(path: &Path) -> std::io::Result<std::fs::Permissions> {
    if let Ok(existing) = std::fs::metadata(path)
        && existing.is_file()
    {
        return Ok(existing.permissions());
    }
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let mut probe = tempfile::Builder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        probe.permissions(std::fs::Permissions::from_mode(0o666));
    }
    probe
        .tempfile_in(dir)?
        .as_file()
        .metadata()
        .map(|m| m.permissions())
}

fn build_header(new: NewCartridge, layers: &[LayerData<'_>]) -> Result<Header, FormatError> {
    check_counts(&new.model, new.tokens, new.frozen_tokens)?;
    if layers.len() != new.model.layers as usize {
        let name = tensor_name(layers.len().min(new.model.layers as usize), Part::Keys);
        return Err(if layers.len() < new.model.layers as usize {
            FormatError::MissingTensor { name }
        } else {
            FormatError::UnexpectedTensor {
                name,
                layers: new.model.layers,
            }
        });
    }
    let expected_bytes = new.model.kv_heads as usize
        * new.tokens as usize
        * new.model.head_dim as usize
        * new.dtype.size();
    for (layer, data) in layers.iter().enumerate() {
        for (part, bytes) in [(Part::Keys, data.keys), (Part::Values, data.values)] {
            if bytes.len() != expected_bytes {
                return Err(FormatError::WrongLength {
                    name: tensor_name(layer, part),
                    expected: expected_bytes,
                    found: bytes.len(),
                });
            }
        }
    }
    Ok(Header {
        format_version: FORMAT_VERSION,
        payload_digest: payload_digest(layers.iter().flat_map(|l| [l.keys, l.values])),
        model: new.model,
        dtype: new.dtype,
        tokens: new.tokens,
        frozen_tokens: new.frozen_tokens,
        provenance: new.provenance,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::fingerprint::tests::tiny;

    /// A valid cartridge of the tiny model, held in memory.
    pub(crate) fn sample_cartridge(tokens: u64) -> Cartridge {
        let dir = tempfile::tempdir().unwrap();
        let (new, tensors) = sample(tokens);
        let path = dir.path().join("sample.safetensors");
        write(&path, new, &layer_data(&tensors)).unwrap();
        Cartridge::from_bytes(std::fs::read(path).unwrap()).unwrap()
    }

    /// A cartridge for the tiny model whose bytes count up, so every element differs.
    fn sample(tokens: u64) -> (NewCartridge, Vec<Vec<u8>>) {
        let model = tiny();
        let len = (model.kv_heads as u64 * tokens * model.head_dim as u64 * 2) as usize;
        let tensors = (0..model.layers * 2)
            .map(|t| (0..len).map(|i| (i * 7 + t as usize) as u8).collect())
            .collect();
        let new = NewCartridge {
            model,
            dtype: Dtype::Bf16,
            tokens,
            frozen_tokens: 1,
            provenance: serde_json::json!({"corpus": "test"}),
        };
        (new, tensors)
    }

    fn layer_data(tensors: &[Vec<u8>]) -> Vec<LayerData<'_>> {
        tensors
            .chunks(2)
            .map(|pair| LayerData {
                keys: &pair[0],
                values: &pair[1],
            })
            .collect()
    }

    fn write_sample(dir: &Path) -> (PathBuf, Header, Vec<Vec<u8>>) {
        let (new, tensors) = sample(5);
        let path = dir.join("sample.safetensors");
        let header = write(&path, new, &layer_data(&tensors)).unwrap();
        (path, header, tensors)
    }

    /// A written cartridge has the mode any new file gets there (the writer's temporary was
    /// private), one written over keeps its own, and writing where a folder is says so.
    #[cfg(unix)]
    #[test]
    fn a_cartridge_is_written_with_the_mode_of_a_new_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("plain");
        std::fs::File::create(&plain).unwrap();
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        let (path, _, _) = write_sample(dir.path());
        assert_eq!(mode(&path), mode(&plain));
        // A mode no umask gives a new file.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o604)).unwrap();
        let (path, _, _) = write_sample(dir.path());
        assert_eq!(mode(&path), 0o604);

        let folder = dir.path().join("folder.safetensors");
        std::fs::create_dir(&folder).unwrap();
        let (new, tensors) = sample(5);
        let error = write(&folder, new, &layer_data(&tensors)).unwrap_err();
        assert!(error.to_string().starts_with("cannot write"), "{error}");
        // A device or pipe there is refused, never replaced by a plain file.
        use std::os::unix::fs::FileTypeExt;
        let pipe = dir.path().join("pipe");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&pipe)
                .status()
                .unwrap()
                .success()
        );
        let (new, tensors) = sample(5);
        let error = write(&pipe, new, &layer_data(&tensors)).unwrap_err();
        assert!(error.to_string().contains("not a regular file"), "{error}");
        assert!(
            std::fs::symlink_metadata(&pipe)
                .unwrap()
                .file_type()
                .is_fifo()
        );
    }

    #[test]
    fn write_then_open_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let (path, header, tensors) = write_sample(dir.path());
        let cartridge = Cartridge::open(&path).unwrap();
        assert_eq!(cartridge.header(), &header);
        assert_eq!(cartridge.layer_count(), 2);
        for layer in 0..2 {
            assert_eq!(cartridge.keys(layer), tensors[layer * 2]);
            assert_eq!(cartridge.values(layer), tensors[layer * 2 + 1]);
        }
        assert_eq!(
            header.payload_bytes(),
            tensors.iter().map(|t| t.len() as u64).sum::<u64>()
        );
        let from_memory = Cartridge::from_bytes(std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(from_memory.header(), &header);
    }

    #[test]
    fn counts_past_any_model_are_refused_before_anything_is_sized_by_them() {
        let mut model = tiny();
        model.layers = u32::MAX;
        let err = check_counts(&model, 4, 1).unwrap_err().to_string();
        assert!(err.contains("at most 4096"), "{err}");
        let err = check_counts(&tiny(), u64::MAX, 1).unwrap_err().to_string();
        assert!(err.contains("at most 16777216"), "{err}");
        for theta in [f64::NAN, f64::INFINITY, 0.0] {
            let mut model = tiny();
            model.rope.theta = theta;
            let err = check_counts(&model, 4, 1).unwrap_err().to_string();
            assert!(err.contains("RoPE base"), "{err}");
        }
        for architecture in [
            "",
            "llama\n\u{1b}[31mFAKE",
            "llama\u{202e}",
            &"x".repeat(65),
        ] {
            let mut model = tiny();
            model.architecture = architecture.into();
            let err = check_counts(&model, 4, 1).unwrap_err().to_string();
            assert!(err.contains("architecture"), "{err}");
        }
        let mut model = tiny();
        model.architecture = "gpt-neox_2.5".into();
        check_counts(&model, 4, 1).unwrap();
    }

    #[test]
    fn a_key_named_twice_is_refused_at_any_depth() {
        let dir = tempfile::tempdir().unwrap();
        let (path, ..) = write_sample(dir.path());
        let bytes = std::fs::read(path).unwrap();
        let text = header_text(&bytes).unwrap();
        // A second cartridge header (serde_json would read the last, other readers the first).
        let twice = text.replacen(
            "\"__metadata__\":{",
            "\"__metadata__\":{\"cartridge\":\"{}\",",
            1,
        );
        assert_ne!(twice, text);
        let err = FileLayout::parse(&twice).unwrap_err().to_string();
        assert!(err.contains("\"cartridge\" appears twice"), "{err}");
        // A key named twice inside the provenance.
        let inner = text.replacen(
            "\\\"corpus\\\":",
            "\\\"corpus\\\":\\\"x\\\",\\\"corpus\\\":",
            1,
        );
        assert_ne!(inner, text);
        let err = FileLayout::parse(&inner).unwrap_err().to_string();
        assert!(err.contains("\"corpus\" appears twice"), "{err}");
    }

    #[test]
    fn a_header_text_the_file_reader_refuses_is_refused_alone_too() {
        let dir = tempfile::tempdir().unwrap();
        let (path, ..) = write_sample(dir.path());
        let bytes = std::fs::read(path).unwrap();
        let text = header_text(&bytes).unwrap();
        assert!(FileLayout::parse(text).is_ok());
        let err = FileLayout::parse(&format!(" {text}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not JSON"), "{err}");
    }

    #[test]
    fn writing_is_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        let (path, ..) = write_sample(dir.path());
        let first = std::fs::read(&path).unwrap();
        let (path, ..) = write_sample(dir.path());
        assert_eq!(std::fs::read(path).unwrap(), first);
    }

    fn open_err(bytes: Vec<u8>) -> String {
        Cartridge::from_bytes(bytes).unwrap_err().to_string()
    }

    #[test]
    fn flipped_payload_byte_is_a_digest_mismatch() {
        let dir = tempfile::tempdir().unwrap();
        let (path, ..) = write_sample(dir.path());
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        assert!(open_err(bytes).starts_with("payload digest mismatch"));
    }

    #[test]
    fn truncation_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (path, ..) = write_sample(dir.path());
        let bytes = std::fs::read(&path).unwrap();
        let err = open_err(bytes[..bytes.len() - 10].to_vec());
        assert!(err.starts_with("truncated: the header declares"), "{err}");
        assert!(open_err(bytes[..100].to_vec()).starts_with("truncated"));
        assert!(open_err(bytes[..3].to_vec()).starts_with("truncated"));
        let mut longer = bytes.clone();
        longer.extend_from_slice(b"trailing");
        let err = open_err(longer);
        assert!(
            err.starts_with("not a valid safetensors file: 8 bytes follow"),
            "{err}"
        );
    }

    /// Writes a safetensors file with the given tensors and the sample's header, bypassing our writer.
    fn raw_file(
        header: &Header,
        tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>,
    ) -> Vec<u8> {
        let views: Vec<_> = tensors
            .iter()
            .map(|(name, dtype, shape, data)| {
                (
                    name.clone(),
                    TensorRef {
                        dtype: *dtype,
                        shape,
                        data,
                    },
                )
            })
            .collect();
        let metadata = std::collections::HashMap::from([(
            METADATA_KEY.to_owned(),
            header_json(header).unwrap(),
        )]);
        safetensors::serialize(views, Some(metadata)).unwrap()
    }

    fn sample_tensors(
        header: &Header,
        tensors: &[Vec<u8>],
    ) -> Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> {
        tensors
            .iter()
            .enumerate()
            .map(|(i, data)| {
                let part = if i % 2 == 0 { Part::Keys } else { Part::Values };
                (
                    tensor_name(i / 2, part),
                    safetensors::Dtype::BF16,
                    header.tensor_shape().to_vec(),
                    data.clone(),
                )
            })
            .collect()
    }

    #[test]
    fn structural_defects_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let (_, header, tensors) = write_sample(dir.path());
        let good = sample_tensors(&header, &tensors);
        assert!(Cartridge::from_bytes(raw_file(&header, good.clone())).is_ok());

        let mut wrong_shape = good.clone();
        wrong_shape[2].2 = vec![2, 8, 5];
        assert_eq!(
            open_err(raw_file(&header, wrong_shape)),
            "tensor 'layers.1.keys' has shape [2, 8, 5], expected [2, 5, 8] ([kv_heads, tokens, head_dim])"
        );

        let mut wrong_dtype = good.clone();
        wrong_dtype[1].1 = safetensors::Dtype::F16;
        assert_eq!(
            open_err(raw_file(&header, wrong_dtype)),
            "tensor 'layers.0.values' has dtype f16, the header says bf16"
        );

        let mut missing = good.clone();
        missing.remove(3);
        assert_eq!(
            open_err(raw_file(&header, missing)),
            "missing tensor 'layers.1.values'"
        );

        let mut extra = good.clone();
        extra.push((
            "layers.2.keys".into(),
            safetensors::Dtype::BF16,
            header.tensor_shape().to_vec(),
            tensors[0].clone(),
        ));
        assert!(
            open_err(raw_file(&header, extra)).starts_with("unexpected tensor 'layers.2.keys'")
        );

        let mut newer = header.clone();
        newer.format_version = FORMAT_VERSION + 1;
        assert!(
            open_err(raw_file(&newer, good.clone())).starts_with(&format!(
                "unsupported cartridge format version {}",
                FORMAT_VERSION + 1
            ))
        );
        // Version 1, without the header's digest, is read; version 2 is not without it.
        let mut older = header.clone();
        older.format_version = 1;
        Cartridge::from_bytes(raw_file(&older, good.clone())).unwrap();
        let views = good.iter().map(|(name, dtype, shape, data)| {
            let tensor = TensorRef {
                dtype: *dtype,
                shape,
                data,
            };
            (name.clone(), tensor)
        });
        let unsealed = std::collections::HashMap::from([(
            METADATA_KEY.to_owned(),
            serde_json::to_string(&header).unwrap(),
        )]);
        let unsealed = safetensors::serialize(views, Some(unsealed)).unwrap();
        let err = open_err(unsealed);
        assert!(
            err.contains("a version 2 header lacks its header_digest"),
            "{err}"
        );

        let mut frozen = header.clone();
        frozen.frozen_tokens = 6;
        assert!(
            open_err(raw_file(&frozen, good.clone()))
                .contains("frozen_tokens (6) exceeds tokens (5)")
        );

        let plain = safetensors::serialize(
            good.iter().map(|(n, d, s, b)| {
                (
                    n.clone(),
                    TensorRef {
                        dtype: *d,
                        shape: s,
                        data: b,
                    },
                )
            }),
            None,
        )
        .unwrap();
        assert!(open_err(plain).starts_with("not a cartridge"));
    }

    #[test]
    fn writer_refuses_wrong_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let (new, mut tensors) = sample(5);
        tensors[3].pop();
        let err = write(&dir.path().join("x"), new, &layer_data(&tensors)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tensor 'layers.1.values' has 159 bytes, expected 160 ([kv_heads, tokens, head_dim] of the dtype)"
        );
        assert!(!dir.path().join("x").exists());
    }
}

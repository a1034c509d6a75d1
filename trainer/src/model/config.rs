//! Model configuration: read from a GGUF file's metadata or a Hugging Face `config.json`, and
//! turned into one runtime [`Config`].

use std::fs::File;
use std::path::Path;

use candle_core::quantized::gguf_file;
use serde::Deserialize;

use crate::error::{Error, Result};

/// Opens a GGUF file: its metadata, its configuration (checked), and every tensor found within
/// the file (a truncated download fails here, not halfway through loading).
pub(crate) fn read_gguf(path: &Path) -> Result<(File, gguf_file::Content, Config)> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    // candle's reader divides by the file's `general.alignment` unchecked: a 0 there panics.
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        gguf_file::Content::read(&mut file)
    }))
    .map_err(|panic| {
        let reason = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        Error::Model(format!(
            "{}: not a readable GGUF file (its reader failed: {reason})",
            path.display()
        ))
    })?;
    let content = read.map_err(|e| Error::Model(format!("{}: {e}", path.display())))?;
    let config = Config::from_gguf(&content)?;
    config.check()?;
    let length = file.metadata().map_err(|e| Error::io(path, e))?.len();
    for (name, info) in &content.tensor_infos {
        let (count, block) = (info.shape.elem_count(), info.ggml_dtype.block_size());
        let end = (count.is_multiple_of(block))
            .then(|| (count / block).checked_mul(info.ggml_dtype.type_size()))
            .flatten()
            .and_then(|bytes| {
                content
                    .tensor_data_offset
                    .checked_add(info.offset)?
                    .checked_add(bytes as u64)
            });
        if end.is_none_or(|end| end > length) {
            return Err(Error::Model(format!(
                "{}: tensor {name} ({:?}, {:?}) lies past the file's {length} bytes (truncated?)",
                path.display(),
                info.shape,
                info.ggml_dtype
            )));
        }
    }
    Ok((file, content, config))
}

/// Dimensions and settings of a Llama-family model.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub vocab: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rms_eps: f64,
    pub max_positions: usize,
    pub tie_embeddings: bool,
}

impl Config {
    /// Reads a llama-architecture GGUF's metadata.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self> {
        let get = |key: &str| {
            content
                .metadata
                .get(key)
                .ok_or_else(|| Error::Model(format!("GGUF metadata has no {key}")))
        };
        let integer = |key: &str| -> Result<usize> {
            let value = get(key)?;
            let number = match value {
                gguf_file::Value::U8(v) => u64::from(*v),
                gguf_file::Value::U16(v) => u64::from(*v),
                gguf_file::Value::U32(v) => u64::from(*v),
                gguf_file::Value::U64(v) => *v,
                gguf_file::Value::I32(v) if *v >= 0 => *v as u64,
                gguf_file::Value::I64(v) if *v >= 0 => *v as u64,
                other => {
                    return Err(Error::Model(format!(
                        "GGUF {key} is {other:?}, expected a count"
                    )));
                }
            };
            Ok(number as usize)
        };
        // Absent, the default; present but not a count, an error (never the default).
        let optional = |key: &str| -> Result<Option<usize>> {
            content.metadata.get(key).map(|_| integer(key)).transpose()
        };
        let float = |key: &str, default: f64| -> Result<f64> {
            match content.metadata.get(key) {
                None => Ok(default),
                Some(gguf_file::Value::F32(v)) => Ok(f64::from(*v)),
                Some(gguf_file::Value::F64(v)) => Ok(*v),
                Some(other) => Err(Error::Model(format!(
                    "GGUF {key} is {other:?}, expected a number"
                ))),
            }
        };
        let architecture = match get("general.architecture")? {
            gguf_file::Value::String(name) => name.clone(),
            other => return Err(Error::Model(format!("general.architecture is {other:?}"))),
        };
        if architecture != "llama" {
            return Err(Error::Model(format!(
                "architecture {architecture:?} is not supported (llama family only)"
            )));
        }
        // Llama 3.1+ rescales rotary frequencies; running such a model without that would give
        // wrong logits silently.
        let scaled = content.tensor_infos.contains_key("rope_freqs.weight")
            || matches!(content.metadata.get("llama.rope.scaling.type"), Some(gguf_file::Value::String(kind)) if kind != "none");
        if scaled {
            return Err(Error::Model(
                "the GGUF uses rope scaling, which this trainer does not implement".into(),
            ));
        }
        let heads = integer("llama.attention.head_count")?;
        let hidden = integer("llama.embedding_length")?;
        let vocab = match content.metadata.get("tokenizer.ggml.tokens") {
            Some(gguf_file::Value::Array(tokens)) => tokens.len(),
            _ => integer("llama.vocab_size")?,
        };
        Ok(Self {
            vocab,
            hidden,
            intermediate: integer("llama.feed_forward_length")?,
            layers: integer("llama.block_count")?,
            heads,
            kv_heads: optional("llama.attention.head_count_kv")?.unwrap_or(heads),
            head_dim: optional("llama.attention.key_length")?.unwrap_or(hidden / heads.max(1)),
            rope_theta: float("llama.rope.freq_base", 10_000.0)?,
            rms_eps: float("llama.attention.layer_norm_rms_epsilon", 1e-5)?,
            max_positions: optional("llama.context_length")?.unwrap_or(4096),
            tie_embeddings: !content.tensor_infos.contains_key("output.weight"),
        })
    }

    /// Reads a Hugging Face `config.json`.
    pub fn from_hf_json(json: &str) -> Result<Self> {
        #[derive(Deserialize)]
        struct Wire {
            vocab_size: usize,
            hidden_size: usize,
            intermediate_size: usize,
            num_hidden_layers: usize,
            num_attention_heads: usize,
            num_key_value_heads: Option<usize>,
            head_dim: Option<usize>,
            rope_theta: Option<f64>,
            rms_norm_eps: Option<f64>,
            max_position_embeddings: Option<usize>,
            tie_word_embeddings: Option<bool>,
            rope_scaling: Option<serde_json::Value>,
            model_type: Option<String>,
            hidden_act: Option<String>,
            #[serde(default)]
            attention_bias: bool,
            #[serde(default)]
            mlp_bias: bool,
        }
        let wire: Wire =
            serde_json::from_str(json).map_err(|e| Error::Model(format!("config.json: {e}")))?;
        // Other families share most of these fields (Qwen2 adds biases, Gemma scales its
        // embeddings): read as Llama they would load and compute wrong logits without a word.
        match wire.model_type.as_deref() {
            Some("llama") => {}
            Some(other) => {
                return Err(Error::Model(format!(
                    "config.json: model_type {other:?} is not supported (llama family only)"
                )));
            }
            None => {
                return Err(Error::Model(
                    "config.json names no model_type (expected \"llama\")".into(),
                ));
            }
        }
        if let Some(act) = wire.hidden_act.as_deref().filter(|act| *act != "silu") {
            return Err(Error::Model(format!(
                "config.json: hidden_act {act:?} is not supported (Llama's is silu)"
            )));
        }
        if wire.attention_bias || wire.mlp_bias {
            return Err(Error::Model(
                "config.json: attention_bias and mlp_bias are not supported (Llama has none)"
                    .into(),
            ));
        }
        if wire.rope_scaling.as_ref().is_some_and(|s| !s.is_null()) {
            return Err(Error::Model(
                "config.json uses rope_scaling, which this trainer does not implement".into(),
            ));
        }
        Ok(Self {
            vocab: wire.vocab_size,
            hidden: wire.hidden_size,
            intermediate: wire.intermediate_size,
            layers: wire.num_hidden_layers,
            heads: wire.num_attention_heads,
            kv_heads: wire.num_key_value_heads.unwrap_or(wire.num_attention_heads),
            head_dim: wire
                .head_dim
                .unwrap_or(wire.hidden_size / wire.num_attention_heads.max(1)),
            rope_theta: wire.rope_theta.unwrap_or(10_000.0),
            rms_eps: wire.rms_norm_eps.unwrap_or(1e-6),
            max_positions: wire.max_position_embeddings.unwrap_or(4096),
            tie_embeddings: wire.tie_word_embeddings.unwrap_or(false),
        })
    }

    /// SmolLM2-135M's shape (the test model's): speed measurements and tests run it on random
    /// weights.
    pub fn smollm2_135m() -> Self {
        Self {
            vocab: 49152,
            hidden: 576,
            intermediate: 1536,
            layers: 30,
            heads: 9,
            kv_heads: 3,
            head_dim: 64,
            rope_theta: 100_000.0,
            rms_eps: 1e-5,
            max_positions: 8192,
            tie_embeddings: true,
        }
    }

    /// Odd metadata is an error naming the field, never an allocation of terabytes or a model
    /// that computes NaN. Layers, heads and head size are bounded as the cartridge format bounds
    /// them.
    pub fn check(&self) -> Result<()> {
        let bad = |what: String| Err(Error::Model(format!("model configuration: {what}")));
        for (name, value, most) in [
            ("layers", self.layers, 4096),
            ("heads", self.heads, 4096),
            ("kv_heads", self.kv_heads, 4096),
            ("head_dim", self.head_dim, 4096),
            ("hidden", self.hidden, 1 << 20),
            ("intermediate", self.intermediate, 1 << 22),
            ("vocab", self.vocab, 1 << 24),
            ("max_positions", self.max_positions, 1 << 21),
        ] {
            if value == 0 || value > most {
                return bad(format!("{name} is {value}, expected 1 to {most}"));
            }
        }
        if !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!(
                "heads ({}) is not a multiple of kv_heads ({})",
                self.heads, self.kv_heads
            ));
        }
        // The rotary tables hold every position: each field alone may be fine, their product
        // an allocation of tens of gigabytes (a million positions of 128 channels is allowed).
        if self.max_positions * self.head_dim > 1 << 27 {
            return bad(format!(
                "max_positions {} times head_dim {} is over 2^27 (rotary tables of that size)",
                self.max_positions, self.head_dim
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!(
                "head_dim {} is odd (rotary embeddings turn pairs)",
                self.head_dim
            ));
        }
        for (name, value) in [("rope_theta", self.rope_theta), ("rms_eps", self.rms_eps)] {
            if !(value.is_finite() && value > 0.0) {
                return bad(format!("{name} is {value}, expected a positive number"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF whose alignment is 0 (candle's reader divides by it) is an error, not a panic.
    #[test]
    fn a_gguf_aligned_to_zero_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("zero.gguf");
        let tensor = candle_core::quantized::QTensor::quantize(
            &candle_core::Tensor::zeros(32, candle_core::DType::F32, &candle_core::Device::Cpu)
                .unwrap(),
            candle_core::quantized::GgmlDType::F32,
        )
        .unwrap();
        let mut file = File::create(&path).unwrap();
        gguf_file::write(
            &mut file,
            &[("general.alignment", &gguf_file::Value::U32(0))],
            &[("token_embd.weight", &tensor)],
        )
        .unwrap();
        let error = read_gguf(&path).err().unwrap().to_string();
        assert!(error.contains("not a readable GGUF file"), "{error}");
    }

    /// A checkpoint of another family is refused by name, never read as Llama.
    #[test]
    fn hugging_face_configs_of_other_families_are_refused() {
        let llama = serde_json::json!({
            "model_type": "llama", "hidden_act": "silu", "vocab_size": 64, "hidden_size": 16,
            "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        });
        Config::from_hf_json(&llama.to_string()).unwrap();
        let cases = [
            (
                "model_type",
                serde_json::json!("qwen2"),
                "model_type \"qwen2\"",
            ),
            ("model_type", serde_json::Value::Null, "names no model_type"),
            (
                "hidden_act",
                serde_json::json!("gelu"),
                "hidden_act \"gelu\"",
            ),
            ("attention_bias", serde_json::json!(true), "attention_bias"),
            ("mlp_bias", serde_json::json!(true), "mlp_bias"),
        ];
        for (field, value, expected) in cases {
            let mut config = llama.clone();
            config[field] = value;
            let error = Config::from_hf_json(&config.to_string())
                .unwrap_err()
                .to_string();
            assert!(error.contains(expected), "{field}: {error}");
        }
    }

    /// Each odd value is refused by name: none may reach an allocation or a NaN model.
    #[test]
    fn odd_configurations_are_refused_naming_the_field() {
        Config::smollm2_135m().check().unwrap();
        type Change = fn(&mut Config);
        let cases: [(&str, Change); 10] = [
            ("max_positions 2097152 times head_dim 4096", |c| {
                (c.max_positions, c.head_dim) = (1 << 21, 4096)
            }),
            ("layers is 1099511627776", |c| c.layers = 1 << 40),
            ("head_dim is 0", |c| c.head_dim = 0),
            ("max_positions is 1000000000", |c| {
                c.max_positions = 1_000_000_000
            }),
            ("hidden is 0", |c| c.hidden = 0),
            ("not a multiple of kv_heads", |c| c.kv_heads = 2),
            ("head_dim 63 is odd", |c| c.head_dim = 63),
            ("rms_eps is NaN", |c| c.rms_eps = f64::NAN),
            ("rope_theta is -1", |c| c.rope_theta = -1.0),
            ("rope_theta is inf", |c| c.rope_theta = f64::INFINITY),
        ];
        for (expected, change) in cases {
            let mut config = Config::smollm2_135m();
            change(&mut config);
            let error = config.check().unwrap_err().to_string();
            assert!(error.contains(expected), "{expected}: {error}");
        }
    }
}

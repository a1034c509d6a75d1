//! Model configuration: read from a GGUF file's metadata or a Hugging Face `config.json`, and
//! turned into one runtime [`Config`].

use candle_core::quantized::gguf_file;
use serde::Deserialize;

use crate::error::{Error, Result};

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
            kv_heads: integer("llama.attention.head_count_kv").unwrap_or(heads),
            head_dim: integer("llama.attention.key_length").unwrap_or(hidden / heads.max(1)),
            rope_theta: float("llama.rope.freq_base", 10_000.0)?,
            rms_eps: float("llama.attention.layer_norm_rms_epsilon", 1e-5)?,
            max_positions: integer("llama.context_length").unwrap_or(4096),
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
        }
        let wire: Wire =
            serde_json::from_str(json).map_err(|e| Error::Model(format!("config.json: {e}")))?;
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

    pub fn check(&self) -> Result<()> {
        let ok = self.heads > 0
            && self.kv_heads > 0
            && self.heads.is_multiple_of(self.kv_heads)
            && self.head_dim.is_multiple_of(2)
            && self.layers > 0
            && self.vocab > 0;
        if !ok {
            return Err(Error::Model(format!(
                "inconsistent model configuration {self:?}"
            )));
        }
        Ok(())
    }
}

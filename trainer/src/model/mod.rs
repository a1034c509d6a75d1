//! The model: Llama-family weights, tokenizer and chat template, and the forward with a KV prefix.

mod config;
#[cfg(feature = "cuda")]
#[allow(unsafe_code)]
mod flash;
mod fused;
mod generate;
mod llama;
mod mask;
mod ops;
mod source;
mod text;

pub use config::Config;
pub use fused::AdamStep;
pub use generate::{Generated, GenerationRequest, Sampling, generate, generate_streaming};
pub use llama::{Cache, Context, Llama, Prefix};
pub use mask::Mask;
pub use ops::{
    select_rows, select_rows_backward, top_k_cross_entropy, top_k_cross_entropy_backward,
};
pub use source::{ALIASES, Alias, LoadedModel, ModelSource};
pub use text::{Message, TextCodec};

//! Self-study training of cartridges: the model (a Llama family forward with a KV prefix),
//! synthesis of conversations about a corpus, distillation into a cartridge, and evaluation.

mod error;
pub mod model;

pub use error::{Error, Result};

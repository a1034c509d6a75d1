//! Self-study training of cartridges: the model (a Llama family forward with a KV prefix),
//! synthesis of conversations about a corpus, distillation into a cartridge, and evaluation.

pub mod cartridge;
pub mod corpus;
pub mod distill;
mod error;
pub mod eval;
pub mod model;
pub mod pipeline;
pub mod synthesis;

pub use error::{Error, Result};

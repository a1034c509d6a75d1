//! The trainer's integration tests: the model against references, then training.

mod model;
mod support;
mod train;

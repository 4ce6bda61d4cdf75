//! peftkit core: everything the command-line tools share.
//!
//! The tools are thin (argument parsing plus one call in here). See docs/architecture.md.

pub mod cli;
pub mod data;
pub mod dist;
pub mod error;
pub mod eval;
pub mod generate;
pub mod gguf;
pub mod gpu;
pub mod inspect;
pub mod io;
pub mod kernels;
pub mod merge;
pub mod model;
pub mod profile;
pub mod progress;
pub mod quant;
pub mod rng;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};

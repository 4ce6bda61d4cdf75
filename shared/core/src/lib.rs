//! peftkit core: everything the command-line tools share.
//!
//! The tools are thin (argument parsing plus one call in here). See docs/architecture.md.

pub mod error;
pub mod gguf;
pub mod io;
pub mod kernels;
pub mod rng;

pub use error::{Error, Result};

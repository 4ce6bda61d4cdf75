//! Adapters out of the training loop: merged into base weights (`adapter-merge`), combined
//! into one adapter as PEFT's `add_weighted_adapter` does (`adapter-merge --combine`).

pub mod adapter_dir;
pub mod combine;
pub mod into_base;
pub mod lowrank;
pub mod task_arithmetic;

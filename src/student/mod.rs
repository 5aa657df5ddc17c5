//! The student stage: Llama-style students trained from a cache with distillation losses.

pub mod checkpoint;
pub mod config;
pub mod device;
pub mod model;
pub mod train;

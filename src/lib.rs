//! logitcache: offline knowledge distillation for language models.
//!
//! A teacher's next-token distributions are computed once ([`teacher`]), stored as top-k
//! log-probabilities plus the exact tail mass in Parquet shards ([`cache`]), and reused by
//! every student. See `README.md` for the command line and `schemas/` for the format.

pub mod cache;
#[cfg(feature = "cli")]
pub mod cli;
pub mod corpus;
pub mod device;
pub mod law;
#[cfg(feature = "cli")]
pub mod loss;
pub mod onnx;
#[cfg(feature = "cli")]
pub mod pipeline;
#[cfg(feature = "cli")]
pub mod progress;
pub mod rng;
#[cfg(feature = "cli")]
pub mod student;
#[cfg(feature = "cli")]
pub mod teacher;
pub mod tokenizer;
pub mod util;
pub mod windows;

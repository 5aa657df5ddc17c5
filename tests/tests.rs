//! Integration tests (one binary; helpers in `util.rs`).

mod util;

mod cache_format;
mod cache_v2;
mod correctness;
mod errors;
mod export;
mod llama_ref;
mod losses;
mod pipeline;
mod python_pkg;
mod resume;
mod stream;
mod student;
mod tokenize;
mod training;

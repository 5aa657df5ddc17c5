//! The student stage: Llama-style students trained from a cache with distillation losses.
//!
//! One noun per file, in the order the data flows: [`arch`] (the architecture, from TOML or
//! a preset), [`model`] (the burn module), [`data`] (a cache batch as tensors), [`step`]
//! (loss, gradients, clipping of one step), [`eval`] (held-out and corpus metrics),
//! [`checkpoint`] (weights in Hugging Face layout, saving and resuming a run), [`run_dir`]
//! (the run directory's files as types), [`config`] (how to train, with its defaults),
//! [`train`] (the loop) and [`export`] (a trained student as an ONNX teacher).
//!
//! ```no_run
//! use logitcache::student::run_dir::RunDir;
//! let last = RunDir::new("runs/micro").last_eval();
//! println!("{:?}", last.map(|e| e.metrics.eval_loss));
//! ```

pub mod arch;
pub mod checkpoint;
pub mod config;
pub mod data;
pub mod eval;
pub mod export;
pub mod model;
pub mod run_dir;
pub mod step;
pub mod train;

//! Writing ONNX models from Rust: the protobuf messages and a graph builder (infrastructure
//! for the teacher's top-k head, the pipeline's data model and the student exporter, which
//! live with their stages), and the toy teachers of the tests, the benches and
//! `logitcache toy-teacher`.
//!
//! This module imports no stage: `teacher`, `student` and `pipeline` build on it.

pub mod attention;
pub mod builder;
pub mod external;
pub mod logits_chain;
pub mod proto;
pub mod structure;
pub mod toy;

pub use builder::{Dim, GraphBuilder};
pub use proto::data_type;
pub use toy::{ToyFault, ToyLmSpec, toy_lm};

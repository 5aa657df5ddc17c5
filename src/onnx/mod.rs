//! Writing ONNX models from Rust: the protobuf messages, a graph builder, the toy teachers
//! used by tests and the demo, and the top-k head used after a teacher on a GPU, and
//! the exporter of trained students.

pub mod builder;
pub mod head;
pub mod proto;
pub mod toy;

pub use builder::{Dim, GraphBuilder};
pub use proto::data_type;
pub use toy::{ToyFault, ToyLmSpec, toy_lm};

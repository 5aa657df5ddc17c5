//! The pipeline's "data model": a tiny ONNX graph with the teacher interface whose only job
//! is to let the teacher stage write a k = 1 cache of a corpus's windows, which every
//! CE-only run (teacher pretraining, the CE baselines) reads for its tokens. Its
//! distribution is uniform (all logits 0), so it carries no knowledge and costs nothing.
//!
//! It is production code, versioned by [`DATA_MODEL_VERSION`], and the pipeline
//! fingerprints it by that version and its shape, not by its bytes: a change to the test
//! toys ([`crate::onnx::toy`]) never rebuilds a user's pipeline.

use crate::onnx::builder::{Dim, GraphBuilder, attr_int};
use crate::onnx::proto::data_type;

/// Bump when the graph below changes.
pub const DATA_MODEL_VERSION: u32 = 1;

/// The uniform model over `vocab` ids: `input_ids`, `attention_mask` → `logits` float32
/// `[batch, sequence, vocab]`, all 0.
///
/// ```
/// let bytes = logitcache::pipeline::data_model::data_model(16);
/// assert!(!bytes.is_empty());
/// ```
pub fn data_model(vocab: usize) -> Vec<u8> {
    let v = vocab as i64;
    let mut g = GraphBuilder::new("logitcache_data_model");
    g.metadata(
        "logitcache.data_model_version",
        &DATA_MODEL_VERSION.to_string(),
    );
    let bs = [Dim::sym("batch_size"), Dim::sym("sequence_length")];
    let ids = g.input("input_ids", data_type::INT64, &bs);
    // The mask is part of the interface; the output does not depend on it.
    g.input("attention_mask", data_type::INT64, &bs);
    let column = g.init_f32("zeros", &[v, 1], &vec![0.0; vocab]);
    let row = g.init_f32("ones", &[1, v], &vec![1.0; vocab]);
    let z = g.node("Gather", &[&column, &ids], vec![attr_int("axis", 0)]);
    let logits = g.node("MatMul", &[&z, &row], vec![]);
    g.output_as(
        &logits,
        "logits",
        data_type::FLOAT,
        &[
            Dim::sym("batch_size"),
            Dim::sym("sequence_length"),
            Dim::Fixed(v),
        ],
    );
    g.to_bytes()
}

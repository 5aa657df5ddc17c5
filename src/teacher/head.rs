//! The "top-k head": a small ONNX graph that runs right after the teacher, on the same
//! device, so only k values per position cross to the host (shared/DESIGN.md, IoBinding).
//!
//! Input `logits` [batch, seq, V] (f32 or f16). Outputs, at temperature T over the first
//! `vocab` logits:
//! - `topk_logprobs` f32 [batch, seq, k]: log-softmax values, descending;
//! - `topk_ids` i64 [batch, seq, k];
//! - `tail_logprob` f32 [batch, seq, 1]: log of the exact probability mass outside the top-k,
//!   computed as a log-sum-exp over the logits with the top-k set to -inf, so it has no
//!   cancellation when the tail is tiny.

use crate::onnx::builder::{Dim, GraphBuilder, attr_int, attr_ints, tensor_f32};
use crate::onnx::proto::data_type;

/// Builds the head for `vocab` columns (of `logits_vocab` in the input), `k` and `temperature`.
pub fn topk_head(
    logits_vocab: usize,
    vocab: usize,
    k: usize,
    temperature: f32,
    f16: bool,
) -> Vec<u8> {
    let mut g = GraphBuilder::new("logitcache_topk_head");
    let in_dims = [
        Dim::sym("batch_size"),
        Dim::sym("sequence_length"),
        Dim::Fixed(logits_vocab as i64),
    ];
    let elem = if f16 {
        data_type::FLOAT16
    } else {
        data_type::FLOAT
    };
    let logits = g.input("logits", elem, &in_dims);
    let mut x = if f16 {
        g.node(
            "Cast",
            &[&logits],
            vec![attr_int("to", data_type::FLOAT as i64)],
        )
    } else {
        logits
    };
    if vocab < logits_vocab {
        let starts = g.init_i64("starts", &[1], &[0]);
        let ends = g.init_i64("ends", &[1], &[vocab as i64]);
        let axes = g.init_i64("axes", &[1], &[2]);
        x = g.node("Slice", &[&x, &starts, &ends, &axes], vec![]);
    }
    let inv_t = g.init_f32("inv_temperature", &[], &[1.0 / temperature]);
    let x = g.node("Mul", &[&x, &inv_t], vec![]);
    let lse = g.node(
        "ReduceLogSumExp",
        &[&x],
        vec![attr_ints("axes", &[2]), attr_int("keepdims", 1)],
    );
    let kk = g.init_i64("k", &[1], &[k as i64]);
    let top = g.node_n(
        "TopK",
        &[&x, &kk],
        2,
        vec![
            attr_int("axis", 2),
            attr_int("largest", 1),
            attr_int("sorted", 1),
        ],
    );
    let logp = g.node("Sub", &[&top[0], &lse], vec![]);
    // Same shape as the indices, filled with -inf: blank out the top-k, then log-sum-exp.
    let shape = g.node("Shape", &[&top[0]], vec![]);
    let fill = g.node(
        "ConstantOfShape",
        &[&shape],
        vec![crate::onnx::builder::attr_tensor(
            "value",
            tensor_f32("neg_inf", &[1], &[f32::NEG_INFINITY]),
        )],
    );
    let rest = g.node(
        "ScatterElements",
        &[&x, &top[1], &fill],
        vec![attr_int("axis", 2)],
    );
    let rest_lse = g.node(
        "ReduceLogSumExp",
        &[&rest],
        vec![attr_ints("axes", &[2]), attr_int("keepdims", 1)],
    );
    let tail = g.node("Sub", &[&rest_lse, &lse], vec![]);
    let bsk = |last: Dim| [Dim::sym("batch_size"), Dim::sym("sequence_length"), last];
    g.output_as(
        &logp,
        "topk_logprobs",
        data_type::FLOAT,
        &bsk(Dim::Fixed(k as i64)),
    );
    g.output_as(
        &top[1],
        "topk_ids",
        data_type::INT64,
        &bsk(Dim::Fixed(k as i64)),
    );
    g.output_as(&tail, "tail_logprob", data_type::FLOAT, &bsk(Dim::Fixed(1)));
    g.to_bytes()
}

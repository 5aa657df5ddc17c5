//! The device "head": a small ONNX graph that runs right after the teacher, on the same
//! device, so only O(k + N) values per position cross to the host (shared/DESIGN.md,
//! IoBinding).
//!
//! Input `logits` [batch, seq, V] (f32 or f16), and for a sampled cache `uniforms` f32
//! [batch, seq, N] (the host's draws of [`crate::rng`], one stream per position, so both
//! paths draw from the same numbers). Outputs, at temperature T over the first `vocab`
//! logits:
//! - `topk_logprobs` f32 [batch, seq, k]: log-softmax values, descending (k > 0);
//! - `topk_ids` i64 [batch, seq, k] (k > 0);
//! - `tail_logprob` f32 [batch, seq, 1]: log of the exact probability mass outside the top-k,
//!   computed as a log-sum-exp over the logits with the top-k set to -inf, so it has no
//!   cancellation when the tail is tiny (k > 0);
//! - `entropy` f32 [batch, seq, 1]: the exact entropy of the distribution (nats);
//! - `sample_ids` i64 [batch, seq, N] and `sample_logprobs` f32 [batch, seq, N] (sampled
//!   caches): draw j is the id whose cumulative weight first exceeds `uniforms[j]` times the
//!   support's total (inverse CDF over the ids in order, the host sampler's mapping), found
//!   in three levels (4096-id super-blocks, 64-id blocks, ids), so no tensor larger than
//!   [batch, seq, N, 64] is made besides the logits' own. A hybrid's support is the ids
//!   outside the top-k. With a proposal temperature τ ≠ 1 the draws come from q ∝ p^(1/τ)
//!   over the support, and `sample_log_weights` f32 [batch, seq, N] holds each draw's
//!   ln p − ln q.

use crate::onnx::builder::{Dim, GraphBuilder, attr_int, attr_ints, tensor_f32};
use crate::onnx::proto::data_type;

/// Ids per block of the draws' middle level, and blocks per super-block.
const BLOCK: usize = 64;

/// What the head computes.
#[derive(Debug, Clone, Copy)]
pub struct HeadSpec {
    /// The logits' last dimension.
    pub logits_vocab: usize,
    /// The distribution's ids (the first `vocab` logits).
    pub vocab: usize,
    /// The top-k (0: none, a `sample` cache).
    pub k: usize,
    pub temperature: f32,
    /// The logits are float16.
    pub f16: bool,
    /// Draws per position (0: none).
    pub samples: usize,
    /// Draw from outside the top-k (`hybrid`).
    pub hybrid: bool,
    /// τ of the proposal q ∝ p^(1/τ) the draws come from (1: p itself); other than 1, the
    /// head also outputs each draw's ln p/q (`sample_log_weights`).
    pub proposal_temperature: f32,
}

/// Builds the top-k-only head for `vocab` columns (of `logits_vocab` in the input).
pub fn topk_head(
    logits_vocab: usize,
    vocab: usize,
    k: usize,
    temperature: f32,
    f16: bool,
) -> Vec<u8> {
    head(&HeadSpec {
        logits_vocab,
        vocab,
        k,
        temperature,
        f16,
        samples: 0,
        hybrid: false,
        proposal_temperature: 1.0,
    })
}

/// Builds the head of `spec`.
pub fn head(spec: &HeadSpec) -> Vec<u8> {
    let &HeadSpec {
        logits_vocab,
        vocab,
        k,
        temperature,
        f16,
        samples,
        hybrid,
        proposal_temperature,
    } = spec;
    let mut g = GraphBuilder::new("logitcache_topk_head");
    let bsk = |last: Dim| [Dim::sym("batch_size"), Dim::sym("sequence_length"), last];
    let in_dims = bsk(Dim::Fixed(logits_vocab as i64));
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
    let axis2 = g.init_i64("axis2", &[1], &[2]);
    // The entropy: −Σ p log p over the whole vocabulary.
    let logp_all = g.node("Sub", &[&x, &lse], vec![]);
    let p_all = g.node("Exp", &[&logp_all], vec![]);
    let plogp = g.node("Mul", &[&p_all, &logp_all], vec![]);
    let neg_h = g.node(
        "ReduceSum",
        &[&plogp, &axis2],
        vec![attr_int("keepdims", 1)],
    );
    let entropy = g.node("Neg", &[&neg_h], vec![]);
    g.output_as(&entropy, "entropy", data_type::FLOAT, &bsk(Dim::Fixed(1)));
    // A hybrid's tail: the logits with the top-k at -inf, and their log-sum-exp (what
    // `tail_logprob` is made of, and what a hybrid draws from, so a tail below float32's range
    // relative to the maximum is drawn from as on the host).
    let mut tail_support = None;
    if k > 0 {
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
        tail_support = Some((rest, rest_lse));
    }
    if samples > 0 {
        let u = g.input(
            "uniforms",
            data_type::FLOAT,
            &bsk(Dim::Fixed(samples as i64)),
        );
        // The draws' support: the whole row, or a hybrid's tail (the top-k at -inf), with
        // its log-sum-exp. At τ ≠ 1 the proposal is the log-softmax of support/τ; at τ = 1 the
        // support's own log-softmax (the entropy's softmax for a whole row).
        let (support, support_lse) = match (hybrid, tail_support) {
            (true, Some(t)) => t,
            _ => (x.clone(), lse.clone()),
        };
        let log_q = if proposal_temperature != 1.0 {
            let inv_tau = g.init_f32(
                "inv_proposal_temperature",
                &[],
                &[1.0 / proposal_temperature],
            );
            let xq = g.node("Mul", &[&support, &inv_tau], vec![]);
            let lse_q = g.node(
                "ReduceLogSumExp",
                &[&xq],
                vec![attr_ints("axes", &[2]), attr_int("keepdims", 1)],
            );
            Some(g.node("Sub", &[&xq, &lse_q], vec![]))
        } else {
            None
        };
        let weights = match (&log_q, hybrid) {
            (Some(lq), _) => g.node("Exp", &[lq], vec![]),
            (None, true) => {
                let lw = g.node("Sub", &[&support, &support_lse], vec![]);
                g.node("Exp", &[&lw], vec![])
            }
            (None, false) => p_all.clone(),
        };
        let ids = draws(&mut g, &weights, &u, vocab);
        let picked = g.node("GatherElements", &[&x, &ids], vec![attr_int("axis", 2)]);
        let lps = g.node("Sub", &[&picked, &lse], vec![]);
        let n = Dim::Fixed(samples as i64);
        g.output_as(&ids, "sample_ids", data_type::INT64, &bsk(n.clone()));
        if let Some(lq) = &log_q {
            let lq = g.node("GatherElements", &[lq, &ids], vec![attr_int("axis", 2)]);
            let w = g.node("Sub", &[&lps, &lq], vec![]);
            g.output_as(&w, "sample_log_weights", data_type::FLOAT, &bsk(n.clone()));
        }
        g.output_as(&lps, "sample_logprobs", data_type::FLOAT, &bsk(n));
    }
    g.to_bytes()
}

/// Index (as f32) of the last entry of `w` along `axis` that is > 0 (`w` ≥ 0), keepdims 0:
/// draws that rounding carries past a level's last weight land on it.
fn last_positive(g: &mut GraphBuilder, w: &str, axis: i64, len: usize) -> String {
    let zero = g.init_f32("zero", &[], &[0.0]);
    let pos = g.node("Greater", &[w, &zero], vec![]);
    let pos = g.node(
        "Cast",
        &[&pos],
        vec![attr_int("to", data_type::FLOAT as i64)],
    );
    let range: Vec<f32> = (0..len).map(|i| i as f32).collect();
    let range = g.init_f32("range", &[len as i64], &range);
    let idx = g.node("Mul", &[&pos, &range], vec![]);
    g.node(
        "ReduceMax",
        &[&idx],
        vec![attr_ints("axes", &[axis]), attr_int("keepdims", 0)],
    )
}

/// For each target (`t`, [.., N]) the index along the last axis of `cum` (inclusive cumulative
/// weights, [.., N, L] or broadcastable) of the first entry exceeding it: the count of entries
/// ≤ the target, clamped to `last` (f32 [.., N]); returned as i64 [.., N].
fn locate(g: &mut GraphBuilder, cum: &str, t: &str, last: &str, axis: i64) -> String {
    let ax = g.init_i64("ax", &[1], &[axis]);
    let t = g.node("Unsqueeze", &[t, &ax], vec![]);
    let le = g.node("LessOrEqual", &[cum, &t], vec![]);
    let le = g.node(
        "Cast",
        &[&le],
        vec![attr_int("to", data_type::FLOAT as i64)],
    );
    let count = g.node("ReduceSum", &[&le, &ax], vec![attr_int("keepdims", 0)]);
    let idx = g.node("Min", &[&count, last], vec![]);
    g.node(
        "Cast",
        &[&idx],
        vec![attr_int("to", data_type::INT64 as i64)],
    )
}

/// The draws' ids i64 [batch, seq, N] from the weights `p` [batch, seq, vocab] (≥ 0, any
/// scale: the inverse CDF is scale-free; 0 at ids outside the support) and the uniforms `u`
/// [batch, seq, N].
fn draws(g: &mut GraphBuilder, p: &str, u: &str, vocab: usize) -> String {
    let super_len = BLOCK * BLOCK;
    let supers = vocab.div_ceil(super_len);
    let padded = supers * super_len;
    // The padding weighs 0 too.
    let mut e = p.to_string();
    if padded > vocab {
        let pads = g.init_i64("pads", &[6], &[0, 0, 0, 0, 0, (padded - vocab) as i64]);
        e = g.node("Pad", &[&e, &pads], vec![]);
    }
    let shape5 = g.init_i64(
        "shape5",
        &[5],
        &[0, 0, supers as i64, BLOCK as i64, BLOCK as i64],
    );
    let e5 = g.node("Reshape", &[&e, &shape5], vec![]);
    let ax34 = g.init_i64("ax34", &[2], &[3, 4]);
    let ax4 = g.init_i64("ax4", &[1], &[4]);
    let ax3 = g.init_i64("ax3", &[1], &[3]);
    let ax2 = g.init_i64("ax2", &[1], &[2]);
    let keep0 = || vec![attr_int("keepdims", 0)];
    // Level 1: super-blocks. The total is the last inclusive sum, so every target is below it.
    let ss = g.node("ReduceSum", &[&e5, &ax34], keep0()); // [b, s, S]
    let cs = g.node("CumSum", &[&ss, &ax2], vec![]);
    let start = g.init_i64("start_last", &[1], &[-1]);
    let end = g.init_i64("end_last", &[1], &[i64::MAX]);
    let z = g.node("Slice", &[&cs, &start, &end, &ax2], vec![]); // [b, s, 1]
    let t = g.node("Mul", &[u, &z], vec![]); // [b, s, N]
    let last1 = last_positive(g, &ss, 2, supers); // [b, s]
    let last1 = g.node("Unsqueeze", &[&last1, &ax2], vec![]); // [b, s, 1]
    let cs_b = g.node("Unsqueeze", &[&cs, &ax2], vec![]); // [b, s, 1, S]
    let si = locate(g, &cs_b, &t, &last1, 3); // [b, s, N]
    let cs_excl = g.node("Sub", &[&cs, &ss], vec![]);
    let base1 = g.node(
        "GatherElements",
        &[&cs_excl, &si],
        vec![attr_int("axis", 2)],
    );
    let r1 = g.node("Sub", &[&t, &base1], vec![]);
    // Level 2: the chosen super-block's 64 block sums.
    let bs = g.node("ReduceSum", &[&e5, &ax4], keep0()); // [b, s, S, 64]
    let si4 = g.node("Unsqueeze", &[&si, &ax3], vec![]); // [b, s, N, 1]
    let si_shape = g.node("Shape", &[&si], vec![]);
    let block = g.init_i64("block", &[1], &[BLOCK as i64]);
    let shape4 = g.node("Concat", &[&si_shape, &block], vec![attr_int("axis", 0)]);
    let si_x = g.node("Expand", &[&si4, &shape4], vec![]);
    let rows = g.node("GatherElements", &[&bs, &si_x], vec![attr_int("axis", 2)]); // [b, s, N, 64]
    let (bi, r2) = within(g, &rows, &r1, &ax3);
    // Level 3: the chosen block's 64 weights.
    let shape4v = g.init_i64(
        "shape4v",
        &[4],
        &[0, 0, (supers * BLOCK) as i64, BLOCK as i64],
    );
    let e4 = g.node("Reshape", &[&e, &shape4v], vec![]);
    let blk = g.init_i64("blk", &[], &[BLOCK as i64]);
    let gi = g.node("Mul", &[&si, &blk], vec![]);
    let gi = g.node("Add", &[&gi, &bi], vec![]);
    let gi4 = g.node("Unsqueeze", &[&gi, &ax3], vec![]);
    let gi_x = g.node("Expand", &[&gi4, &shape4], vec![]);
    let vals = g.node("GatherElements", &[&e4, &gi_x], vec![attr_int("axis", 2)]);
    let (vi, _) = within(g, &vals, &r2, &ax3);
    let id = g.node("Mul", &[&gi, &blk], vec![]);
    g.node("Add", &[&id, &vi], vec![])
}

/// Within `w` [b, s, N, 64] (each target's own row of weights): the index of the entry
/// holding `r` [b, s, N] (the target's remainder past the row's start) and the remainder past
/// that entry's start.
fn within(g: &mut GraphBuilder, w: &str, r: &str, ax3: &str) -> (String, String) {
    let c = g.node("CumSum", &[w, ax3], vec![]);
    let last = last_positive(g, w, 3, BLOCK);
    let i = locate(g, &c, r, &last, 3);
    let excl = g.node("Sub", &[&c, w], vec![]);
    let i4 = g.node("Unsqueeze", &[&i, ax3], vec![]);
    let base = g.node("GatherElements", &[&excl, &i4], vec![attr_int("axis", 3)]);
    let base = g.node("Squeeze", &[&base, ax3], vec![]);
    let rest = g.node("Sub", &[r, &base], vec![]);
    (i, rest)
}

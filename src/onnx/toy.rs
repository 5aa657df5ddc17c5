//! Tiny ONNX causal language models with the Hugging Face Optimum `text-generation`
//! interface, generated from a seed. They are the teachers of the tests, the benchmarks and
//! the demo: small enough to build in milliseconds, real enough that every output position
//! depends on the tokens before it (and only on them), on the attention mask and on the
//! position ids.
//!
//! The model: `h_t = tanh(E[x_t] + mean_{s<=t, mask_s=1} E[x_s] + P[pos_t])`,
//! `logits_t = scale * h_t W + b`, with `pos = cumsum(mask) - 1` (clipped at 0) unless the
//! model takes `position_ids`. Padding on either side leaves the real positions unchanged.

use super::builder::{Dim, GraphBuilder, attr_int, attr_ints};
use super::proto::data_type;
use crate::rng::SplitMix;

/// How a toy model is deliberately broken (for tests of the teacher's input checks; not part
/// of the public API).
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ToyFault {
    #[default]
    None,
    /// The output is called `scores`, not `logits`.
    NoLogits,
    /// `logits` has rank 2 ([batch, vocab]).
    WrongRank,
    /// Logits are NaN at every position whose input token is this id.
    NanOnToken(i64),
    /// No `attention_mask` input.
    NoAttentionMask,
}

/// What toy model to build.
#[derive(Debug, Clone)]
pub struct ToyLmSpec {
    /// Size of the logits' last dimension (may exceed the tokenizer's vocabulary).
    pub vocab: usize,
    pub hidden: usize,
    /// Longest sequence the position table covers.
    pub max_positions: usize,
    pub seed: u64,
    /// Emit `logits` as float16.
    pub f16_logits: bool,
    /// Take `position_ids` as an input instead of deriving them from the mask.
    pub position_ids_input: bool,
    /// Take (unused, empty) `past_key_values.0.{key,value}` inputs like a KV-cache export.
    pub past_key_values: bool,
    /// With `past_key_values`: like Optimum's `…with_past` exports, the past keys/values are
    /// concatenated (on the sequence axis) with this step's, computed from the hidden state,
    /// into `present.0.{key,value}` outputs. The logits are unchanged.
    pub present_outputs: bool,
    /// Like `decoder_model_merged.onnx`: a `use_cache_branch` input selects, through an `If`
    /// node, between the no-cache logits (false) and a branch whose logits are halved (true:
    /// a flatter distribution), so feeding the wrong branch shows in the cache.
    pub use_cache_branch: bool,
    /// Multiplier on the logits: larger means peakier distributions.
    pub logit_scale: f32,
    /// Residual feed-forward blocks `h += tanh(h W1) W2` (width 4·hidden) before the head:
    /// compute without changing the interface, for benchmarks that need a teacher of a
    /// realistic cost.
    pub ffn_layers: usize,
    /// The head is one MatMul, as in real exports (the scale folded into its weights, no
    /// bias): the graph then holds one logits-sized tensor, not three, for memory benchmarks.
    pub plain_head: bool,
    pub fault: ToyFault,
}

impl Default for ToyLmSpec {
    fn default() -> Self {
        ToyLmSpec {
            vocab: 512,
            hidden: 16,
            max_positions: 4096,
            seed: 0,
            f16_logits: false,
            position_ids_input: false,
            past_key_values: false,
            present_outputs: false,
            use_cache_branch: false,
            logit_scale: 4.0,
            ffn_layers: 0,
            plain_head: false,
            fault: ToyFault::None,
        }
    }
}

/// Builds the toy model described by `spec` and returns the serialized ONNX bytes.
pub fn toy_lm(spec: &ToyLmSpec) -> Vec<u8> {
    let (v, d, p) = (
        spec.vocab as i64,
        spec.hidden as i64,
        spec.max_positions as i64,
    );
    let mut rng = SplitMix::new(spec.seed);
    let mut g = GraphBuilder::new("logitcache_toy_lm");
    g.metadata("logitcache.toy", "true");
    let bs = [Dim::sym("batch_size"), Dim::sym("sequence_length")];
    let ids = g.input("input_ids", data_type::INT64, &bs);
    let mask = if spec.fault == ToyFault::NoAttentionMask {
        let ones = g.node("Shape", &[&ids], vec![]);
        let one = super::builder::tensor_i64("one", &[1], &[1]);
        g.node(
            "ConstantOfShape",
            &[&ones],
            vec![super::builder::attr_tensor("value", one)],
        )
    } else {
        g.input("attention_mask", data_type::INT64, &bs)
    };
    let pos_in = spec
        .position_ids_input
        .then(|| g.input("position_ids", data_type::INT64, &bs));
    let mut past = Vec::new();
    if spec.past_key_values {
        for kind in ["key", "value"] {
            past.push(g.input(
                &format!("past_key_values.0.{kind}"),
                data_type::FLOAT,
                &[
                    Dim::sym("batch_size"),
                    Dim::Fixed(2),
                    Dim::sym("past_sequence_length"),
                    Dim::Fixed(4),
                ],
            ));
        }
    }
    let cache_branch = spec
        .use_cache_branch
        .then(|| g.input("use_cache_branch", data_type::BOOL, &[Dim::Fixed(1)]));

    let emb_table = g.init_f32("embed", &[v, d], &rng.vec((v * d) as usize, 1.0));
    let pos_table = g.init_f32("pos_embed", &[p, d], &rng.vec((p * d) as usize, 0.5));
    let mut w_values = rng.vec((d * v) as usize, 1.0);
    let b_values = rng.vec(v as usize, 0.5);
    if spec.plain_head {
        w_values.iter_mut().for_each(|x| *x *= spec.logit_scale);
    }
    let w = g.init_f32("lm_head", &[d, v], &w_values);
    let head = (!spec.plain_head).then(|| {
        (
            g.init_f32("lm_bias", &[v], &b_values),
            g.init_f32("scale", &[], &[spec.logit_scale]),
        )
    });
    let axis1 = g.init_i64("axis1", &[], &[1]);
    let axes2 = g.init_i64("axes2", &[1], &[2]);
    let one_f = g.init_f32("one_f", &[], &[1.0]);
    let one_i = g.init_i64("one_i", &[], &[1]);
    let zero_i = g.init_i64("zero_i", &[], &[0]);

    let emb = g.node("Gather", &[&emb_table, &ids], vec![attr_int("axis", 0)]);
    let maskf = g.node(
        "Cast",
        &[&mask],
        vec![attr_int("to", data_type::FLOAT as i64)],
    );
    let mask3 = g.node("Unsqueeze", &[&maskf, &axes2], vec![]);
    let masked = g.node("Mul", &[&emb, &mask3], vec![]);
    let csum = g.node("CumSum", &[&masked, &axis1], vec![]);
    let count = g.node("CumSum", &[&mask3, &axis1], vec![]);
    let count = g.node("Max", &[&count, &one_f], vec![]);
    let ctx = g.node("Div", &[&csum, &count], vec![]);
    let pos = match &pos_in {
        Some(p) => p.clone(),
        None => {
            let c = g.node("CumSum", &[&mask, &axis1], vec![]);
            let c = g.node("Sub", &[&c, &one_i], vec![]);
            g.node("Max", &[&c, &zero_i], vec![])
        }
    };
    let pemb = g.node("Gather", &[&pos_table, &pos], vec![attr_int("axis", 0)]);
    let h = g.node("Add", &[&emb, &ctx], vec![]);
    let h = g.node("Add", &[&h, &pemb], vec![]);
    let mut h = g.node("Tanh", &[&h], vec![]);
    for l in 0..spec.ffn_layers {
        let s = (1.0 / d as f32).sqrt();
        let w1 = g.init_f32(
            &format!("ffn{l}_w1"),
            &[d, 4 * d],
            &rng.vec((4 * d * d) as usize, s),
        );
        let w2 = g.init_f32(
            &format!("ffn{l}_w2"),
            &[4 * d, d],
            &rng.vec((4 * d * d) as usize, s * 0.5),
        );
        let u = g.node("MatMul", &[&h, &w1], vec![]);
        let u = g.node("Tanh", &[&u], vec![]);
        let u = g.node("MatMul", &[&u, &w2], vec![]);
        h = g.node("Add", &[&h, &u], vec![]);
    }
    if spec.present_outputs {
        // This step's keys/values: [batch, seq, 8] → [batch, seq, 2, 4] → [batch, 2, seq, 4].
        let shape = g.init_i64("kv_shape", &[4], &[0, 0, 2, 4]);
        for (i, kind) in ["key", "value"].iter().enumerate() {
            let wk = g.init_f32(
                &format!("w_{kind}"),
                &[d, 8],
                &rng.vec((d * 8) as usize, 0.5),
            );
            let new = g.node("MatMul", &[&h, &wk], vec![]);
            let new = g.node("Reshape", &[&new, &shape], vec![]);
            let new = g.node("Transpose", &[&new], vec![attr_ints("perm", &[0, 2, 1, 3])]);
            let present = g.node("Concat", &[&past[i], &new], vec![attr_int("axis", 2)]);
            g.output_as(
                &present,
                &format!("present.0.{kind}"),
                data_type::FLOAT,
                &[
                    Dim::sym("batch_size"),
                    Dim::Fixed(2),
                    Dim::sym("total_sequence_length"),
                    Dim::Fixed(4),
                ],
            );
        }
    }
    let mut logits = g.node("MatMul", &[&h, &w], vec![]);
    if let Some((b, scale)) = &head {
        let biased = g.node("Add", &[&logits, b], vec![]);
        logits = g.node("Mul", &[&biased, scale], vec![]);
    }
    if let Some(cond) = &cache_branch {
        let dims = [
            Dim::sym("batch_size"),
            Dim::sym("sequence_length"),
            Dim::Fixed(v),
        ];
        let branch = |name: &str, factor: f32| {
            let mut sub = GraphBuilder::new(name);
            let c = sub.init_f32("factor", &[], &[factor]);
            let out = sub.node("Mul", &[&logits, &c], vec![]);
            sub.output_as(&out, &format!("{name}_logits"), data_type::FLOAT, &dims);
            sub.finish().graph.expect("a graph")
        };
        logits = g.node(
            "If",
            &[cond],
            vec![
                super::builder::attr_graph("then_branch", branch("with_cache", 0.5)),
                super::builder::attr_graph("else_branch", branch("without_cache", 1.0)),
            ],
        );
    }

    if let ToyFault::NanOnToken(tok) = spec.fault {
        let t = g.init_i64("nan_token", &[], &[tok]);
        let is = g.node("Equal", &[&ids, &t], vec![]);
        let is = g.node(
            "Cast",
            &[&is],
            vec![attr_int("to", data_type::FLOAT as i64)],
        );
        let is = g.node("Unsqueeze", &[&is, &axes2], vec![]);
        let neg = g.node("Neg", &[&is], vec![]);
        // sqrt(-1) = NaN where the token matches, sqrt(-0) = -0 elsewhere.
        let nan = g.node("Sqrt", &[&neg], vec![]);
        logits = g.node("Add", &[&logits, &nan], vec![]);
    }
    let mut out_dims = vec![
        Dim::sym("batch_size"),
        Dim::sym("sequence_length"),
        Dim::Fixed(v),
    ];
    if spec.fault == ToyFault::WrongRank {
        logits = g.node(
            "ReduceMean",
            &[&logits],
            vec![attr_ints("axes", &[1]), attr_int("keepdims", 0)],
        );
        out_dims = vec![Dim::sym("batch_size"), Dim::Fixed(v)];
    }
    let mut elem = data_type::FLOAT;
    if spec.f16_logits {
        logits = g.node(
            "Cast",
            &[&logits],
            vec![attr_int("to", data_type::FLOAT16 as i64)],
        );
        elem = data_type::FLOAT16;
    }
    let out_name = if spec.fault == ToyFault::NoLogits {
        "scores"
    } else {
        "logits"
    };
    g.output_as(&logits, out_name, elem, &out_dims);
    g.to_bytes()
}

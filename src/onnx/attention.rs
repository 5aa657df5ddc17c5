//! The attention scores a teacher graph holds. A graph that computes attention unfused
//! (`MatMul(Q, Kᵀ) → … → Softmax → … → MatMul(·, V)`, as PyTorch's ONNX exporter writes
//! Hugging Face models) makes `[windows, heads, len, len]` scores per layer, several such
//! tensors at once (the mask added, the softmax, its NaN guard): at 32 heads and 2048 tokens
//! 512 MiB each per window, more than the logits the batch budget bounds. [`attention_scores`]
//! finds them so the planner can count them too.
//!
//! Only the graph's structure is decoded (like [`super::logits_chain`]). The main graph and
//! `If` branches are searched; `Scan` and `Loop` bodies are not: their scores are one
//! iteration's (`export-onnx`'s blocked attention computes 256 queries per `Scan` step).
//! Fused attention ops (`Attention`, `MultiHeadAttention`, `GroupQueryAttention`) are not
//! counted.

use super::structure::{
    ALIASES, LiteGraph, ModelStructure, Scope, default_domain, is_constant, op, producer,
};
use std::collections::HashSet;

/// What one window's attention scores take, as read from the graph.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionScores {
    /// Softmax sites (layers) found.
    pub sites: usize,
    /// The ops making score-sized tensors at the largest site, in order, from the scores'
    /// `MatMul` to the last one before `MatMul(·, V)` (e.g. `MatMul, Add, Softmax, IsNaN,
    /// Where`). ONNX Runtime was measured holding about all of them at once.
    pub ops: Vec<String>,
    /// Score matrices per window (heads; query groups × kv heads when grouped): the scores'
    /// dimensions between batch and the last two, from the graph's shapes (`value_info`), or
    /// `num_attention_heads` of a `config.json` beside the model; `None` when neither says.
    pub heads: Option<usize>,
    /// Where `heads` came from.
    pub heads_from: &'static str,
    /// Bytes per score (4 for float32, 2 for float16/bfloat16).
    pub elem_bytes: usize,
}

impl AttentionScores {
    /// Bytes the scores of one window of `len` tokens take at one site, all its score-sized
    /// tensors together: `heads × len² × elem_bytes × ops`. `None` when the heads are unknown.
    pub fn bytes_per_window(&self, len: usize) -> Option<u64> {
        let h = self.heads? as u64;
        Some(h * (len as u64).pow(2) * self.elem_bytes as u64 * self.ops.len() as u64)
    }
}

/// Ops that make a score-sized tensor from scores (element-wise or over the last axis).
const SAME_SIZE: &[&str] = &[
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Where",
    "Cast",
    "Tanh",
    "Neg",
    "Clip",
    "Max",
    "Min",
    "Exp",
    "IsNaN",
    "IsInf",
    "Not",
    "Dropout",
    "Softmax",
    "Transpose",
];
/// Products of two activations: where scores start and where they end (`· V`).
const MATMULS: &[&str] = &["MatMul", "FusedMatMul", "Einsum"];
/// Deepest walk (a guard against pathological graphs).
const MAX_DEPTH: usize = 16;

/// The ops from a product of two activations to `value` (in order, aliases left out), or
/// `None` when `value` does not come from one.
fn back<'a>(scopes: &[&Scope<'a>], value: &str, depth: usize) -> Option<Vec<&'a str>> {
    if depth > MAX_DEPTH {
        return None;
    }
    let (visible, node) = producer(scopes, value)?;
    let constant = |name: &str| is_constant(visible, name);
    let o = op(node);
    if ALIASES.contains(&o) {
        return back(visible, node.input.first()?, depth + 1);
    }
    if MATMULS.contains(&o) {
        let operands: Vec<&str> = node.input.iter().map(String::as_str).collect();
        let both = operands.len() >= 2 && operands[..2].iter().all(|i| !constant(i));
        return both.then(|| vec![o]);
    }
    if SAME_SIZE.contains(&o) {
        // Where's condition is a mask; the other ops' constant inputs are scales.
        let data = node
            .input
            .iter()
            .enumerate()
            .filter(|(i, _)| o != "Where" || *i > 0)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty() && !constant(v));
        let mut c = data
            .filter_map(|v| back(visible, v, depth + 1))
            .max_by_key(Vec::len)?;
        c.push(o);
        return Some(c);
    }
    None
}

/// The ops after a softmax that make score-sized tensors before `MatMul(·, V)`, or `None`
/// when the softmax's output does not reach a product (not attention: a router, a head).
fn forward<'a>(scope: &Scope<'a>, softmax_out: &'a str) -> Option<Vec<&'a str>> {
    let mut ops = Vec::new();
    let mut seen = HashSet::from([softmax_out]);
    let mut todo = vec![softmax_out];
    let mut reaches_product = false;
    while let Some(v) = todo.pop() {
        for n in scope.consumers.get(v).into_iter().flatten() {
            let o = op(n);
            if MATMULS.contains(&o) {
                reaches_product = true;
            } else if SAME_SIZE.contains(&o) || ALIASES.contains(&o) {
                let Some(out) = n.output.first() else {
                    continue;
                };
                if seen.insert(out.as_str()) {
                    if !ALIASES.contains(&o) {
                        ops.push(o);
                    }
                    if seen.len() > MAX_DEPTH {
                        return None;
                    }
                    todo.push(out.as_str());
                }
            }
        }
    }
    reaches_product.then_some(ops)
}

/// The scores' heads and bytes per element from the shape the graph records for `value`.
fn shape_of(scopes: &[&Scope], value: &str) -> (Option<usize>, Option<usize>) {
    let Some(t) = scopes.iter().rev().find_map(|s| s.types.get(value)) else {
        return (None, None);
    };
    let elem = match t.elem_type {
        Some(10 | 16) => Some(2), // float16, bfloat16
        Some(11) => Some(8),      // double
        Some(1) => Some(4),
        _ => None,
    };
    let dims = t.shape.as_ref().map(|s| s.dim.as_slice()).unwrap_or(&[]);
    // [batch, heads…, queries, keys]; scores of rank 3 have the heads folded into the batch.
    let heads = (dims.len() >= 4)
        .then(|| {
            dims[1..dims.len() - 2]
                .iter()
                .map(|d| d.dim_value.filter(|&v| v > 0).map(|v| v as usize))
                .product::<Option<usize>>()
        })
        .flatten();
    (heads, elem)
}

/// Every scope worth searching, the main graph and (recursively) `If` branches, each with
/// the scopes its names resolve in (`paths`: indices into `scopes`, outermost first).
fn scopes_of<'a>(
    g: &'a LiteGraph,
    mut path: Vec<usize>,
    scopes: &mut Vec<(&'a LiteGraph, Scope<'a>)>,
    paths: &mut Vec<Vec<usize>>,
) {
    path.push(scopes.len());
    scopes.push((g, Scope::new(g)));
    paths.push(path.clone());
    for n in g.node.iter().filter(|n| op(n) == "If") {
        for a in &n.attribute {
            if let (Some("then_branch" | "else_branch"), Some(b)) = (a.name.as_deref(), &a.g) {
                scopes_of(b, path.clone(), scopes, paths);
            }
        }
    }
}

/// The unfused attention scores in `model`, `None` when it has none.
pub fn attention_scores(model: &ModelStructure) -> Option<AttentionScores> {
    let mut found = model.model.graph.as_ref().and_then(scores_in)?;
    if found.heads.is_none()
        && let Some(h) = std::fs::read_to_string(model.dir.join("config.json"))
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| v.get("num_attention_heads").and_then(|h| h.as_u64()))
            .filter(|&h| h > 0)
    {
        found.heads = Some(h as usize);
        found.heads_from = "num_attention_heads in the config.json beside the model";
    }
    Some(found)
}

fn scores_in(g: &LiteGraph) -> Option<AttentionScores> {
    let mut scopes = Vec::new();
    let mut paths = Vec::new();
    scopes_of(g, Vec::new(), &mut scopes, &mut paths);
    let mut best: Option<AttentionScores> = None;
    let mut sites = 0;
    for path in &paths {
        let stack: Vec<&Scope> = path.iter().map(|&i| &scopes[i].1).collect();
        let (graph, here) = (scopes[*path.last()?].0, &scopes[*path.last()?].1);
        for n in graph
            .node
            .iter()
            .filter(|n| op(n) == "Softmax" && default_domain(n))
        {
            let (Some(input), Some(output)) = (n.input.first(), n.output.first()) else {
                continue;
            };
            let (Some(mut ops), Some(after)) =
                (back(&stack, input, 0), forward(here, output.as_str()))
            else {
                continue;
            };
            sites += 1;
            ops.push("Softmax");
            ops.extend(after);
            // The shape recorded for the scores, else for the softmax's output.
            let ((h_in, e_in), (h_out, e_out)) =
                (shape_of(&stack, input), shape_of(&stack, output));
            let (heads, elem) = (h_in.or(h_out), e_in.or(e_out));
            let site = AttentionScores {
                sites: 0,
                ops: ops.into_iter().map(str::to_string).collect(),
                heads,
                heads_from: "the graph's shapes (value_info)",
                elem_bytes: elem.unwrap_or(4),
            };
            let size = |s: &AttentionScores| {
                (
                    s.bytes_per_window(1).unwrap_or(0),
                    s.ops.len(),
                    s.heads.is_none(),
                )
            };
            if best.as_ref().is_none_or(|b| size(&site) > size(b)) {
                best = Some(site);
            }
        }
    }
    best.map(|b| AttentionScores { sites, ..b })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::builder::{Dim, GraphBuilder, attr_graph, attr_int, attr_ints};
    use crate::onnx::data_type;
    use crate::onnx::structure::LiteModel;
    use crate::onnx::{ToyLmSpec, toy_lm};
    use prost::Message;

    fn scores(bytes: &[u8]) -> Option<AttentionScores> {
        scores_in(&LiteModel::decode(bytes).unwrap().graph.unwrap())
    }

    /// One layer of attention as PyTorch exports it, `[b, l, heads·2]` activations in and
    /// out: `MatMul(q, kᵀ) → Add(mask) → Softmax → IsNaN → Where → MatMul(·, v)`; with
    /// `shapes`, the scores' shape is recorded.
    fn attention_layer(g: &mut GraphBuilder, x: &str, heads: i64, shapes: bool) -> String {
        let shape = g.init_i64("heads", &[4], &[0, 0, heads, 2]);
        let perm_q = attr_ints("perm", &[0, 2, 1, 3]);
        let r = g.node("Reshape", &[x, &shape], vec![]);
        let q = g.node("Transpose", &[&r], vec![perm_q.clone()]);
        let kt = g.node("Transpose", &[&r], vec![attr_ints("perm", &[0, 2, 3, 1])]);
        let s = g.node("MatMul", &[&q, &kt], vec![]);
        let mask = g.init_f32("mask", &[1], &[0.0]);
        let s = g.node("Add", &[&s, &mask], vec![]);
        let p = g.node("Softmax", &[&s], vec![attr_int("axis", -1)]);
        let nan = g.node("IsNaN", &[&p], vec![]);
        let zero = g.init_f32("zero", &[], &[0.0]);
        let p2 = g.node("Where", &[&nan, &zero, &p], vec![]);
        let o = g.node("MatMul", &[&p2, &q], vec![]);
        if shapes {
            let dims = [
                Dim::sym("batch_size"),
                Dim::Fixed(heads),
                Dim::sym("sequence_length"),
                Dim::sym("sequence_length"),
            ];
            g.annotate(&s, data_type::FLOAT, &dims);
            g.annotate(&p, data_type::FLOAT, &dims);
        }
        let o = g.node("Transpose", &[&o], vec![perm_q]);
        let back = g.init_i64("flat", &[3], &[0, 0, heads * 2]);
        g.node("Reshape", &[&o, &back], vec![])
    }

    fn model(layers: usize, heads: i64, shapes: bool) -> Vec<u8> {
        let mut g = GraphBuilder::new("attention");
        let x = g.input(
            "x",
            data_type::FLOAT,
            &[Dim::sym("b"), Dim::sym("l"), Dim::Fixed(heads * 2)],
        );
        let mut h = x;
        for _ in 0..layers {
            h = attention_layer(&mut g, &h, heads, shapes);
        }
        let w = g.init_f32("w", &[heads * 2, 5], &vec![0.1; heads as usize * 10]);
        let logits = g.node("MatMul", &[&h, &w], vec![]);
        g.output_as(
            &logits,
            "logits",
            data_type::FLOAT,
            &[Dim::sym("b"), Dim::sym("l"), Dim::Fixed(5)],
        );
        g.to_bytes()
    }

    #[test]
    fn unfused_attention_is_found_with_its_heads_and_tensors() {
        let s = scores(&model(3, 8, true)).unwrap();
        assert_eq!(s.sites, 3);
        assert_eq!(s.ops, ["MatMul", "Add", "Softmax", "IsNaN", "Where"]);
        assert_eq!(s.heads, Some(8));
        assert_eq!(s.elem_bytes, 4);
        // 8 heads × 2048² × 4 bytes × 5 tensors: 640 MiB per window.
        assert_eq!(s.bytes_per_window(2048), Some(640 << 20));
        // Without recorded shapes the heads are unknown (config.json may tell, see below).
        let s = scores(&model(1, 8, false)).unwrap();
        assert_eq!(
            (s.sites, s.heads, s.bytes_per_window(2048)),
            (1, None, None)
        );
        // Nor do scores of rank 3 ([batch × heads, queries, keys]) tell them.
        let mut g = GraphBuilder::new("rank3");
        let x = g.input(
            "x",
            data_type::FLOAT,
            &[Dim::sym("bh"), Dim::sym("l"), Dim::Fixed(2)],
        );
        let xt = g.node("Transpose", &[&x], vec![attr_ints("perm", &[0, 2, 1])]);
        let s = g.node("MatMul", &[&x, &xt], vec![]);
        g.annotate(
            &s,
            data_type::FLOAT,
            &[Dim::sym("bh"), Dim::sym("l"), Dim::sym("l")],
        );
        let p = g.node("Softmax", &[&s], vec![attr_int("axis", -1)]);
        let o = g.node("MatMul", &[&p, &x], vec![]);
        g.output_as(&o, "logits", data_type::FLOAT, &[]);
        let s = scores(&g.to_bytes()).unwrap();
        assert_eq!((s.ops.len(), s.heads, s.elem_bytes), (2, None, 4));
    }

    #[test]
    fn heads_come_from_config_json_beside_the_model() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.onnx");
        std::fs::write(&path, model(1, 4, false)).unwrap();
        let load = || ModelStructure::load(&path).unwrap();
        assert_eq!(attention_scores(&load()).unwrap().heads, None);
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"num_attention_heads": 4}"#,
        )
        .unwrap();
        let s = attention_scores(&load()).unwrap();
        assert_eq!(s.heads, Some(4));
        assert!(s.heads_from.contains("config.json"), "{}", s.heads_from);
    }

    #[test]
    fn graphs_without_unfused_attention_have_none() {
        // The toy teachers (no attention).
        assert_eq!(scores(&toy_lm(&ToyLmSpec::default())), None);
        // A softmax over a projection (a router, a head): its product has a weight.
        let mut g = GraphBuilder::new("router");
        let x = g.input("x", data_type::FLOAT, &[Dim::sym("b"), Dim::Fixed(4)]);
        let w = g.init_f32("w", &[4, 4], &[0.5; 16]);
        let s = g.node("MatMul", &[&x, &w], vec![]);
        let p = g.node("Softmax", &[&s], vec![attr_int("axis", -1)]);
        let o = g.node("MatMul", &[&p, &x], vec![]);
        g.output_as(
            &o,
            "logits",
            data_type::FLOAT,
            &[Dim::sym("b"), Dim::Fixed(4)],
        );
        assert_eq!(scores(&g.to_bytes()), None);
        // Scores of two activations that go to no product (not attention).
        let mut g = GraphBuilder::new("no-values");
        let x = g.input("x", data_type::FLOAT, &[Dim::sym("b"), Dim::Fixed(4)]);
        let xt = g.node("Transpose", &[&x], vec![]);
        let s = g.node("MatMul", &[&x, &xt], vec![]);
        let p = g.node("Softmax", &[&s], vec![attr_int("axis", -1)]);
        g.output_as(
            &p,
            "logits",
            data_type::FLOAT,
            &[Dim::sym("b"), Dim::sym("b")],
        );
        assert_eq!(scores(&g.to_bytes()), None);
    }

    #[test]
    fn attention_in_if_branches_counts_and_scan_bodies_do_not() {
        let body = |parent: &GraphBuilder, name: &str| {
            let mut b = parent.subgraph(name);
            let x = b.input(
                "x",
                data_type::FLOAT,
                &[Dim::sym("b"), Dim::sym("l"), Dim::Fixed(8)],
            );
            let o = attention_layer(&mut b, &x, 4, true);
            b.output_as(&o, &format!("{name}_out"), data_type::FLOAT, &[]);
            b.finish_graph()
        };
        for (op, attrs) in [
            ("If", vec!["then_branch", "else_branch"]),
            ("Scan", vec!["body"]),
        ] {
            let mut g = GraphBuilder::new(op);
            let c = g.input("c", data_type::BOOL, &[]);
            let attrs = attrs
                .iter()
                .map(|a| attr_graph(a, body(&g, a)))
                .collect::<Vec<_>>();
            let o = g.node(op, &[&c], attrs);
            g.output_as(&o, "logits", data_type::FLOAT, &[]);
            let found = scores(&g.to_bytes());
            match op {
                "If" => assert_eq!(found.map(|s| (s.sites, s.heads)), Some((2, Some(4)))),
                _ => assert_eq!(found, None, "a Scan body's scores are one step's"),
            }
        }
    }
}

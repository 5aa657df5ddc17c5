//! How many logits-sized tensors a teacher graph makes. The batch planner's token budget
//! (`--max-batch-tokens`) bounds the logits, batch × tokens × V × 4 bytes; a graph whose
//! head does more after its projection (a bias, a scale, Gemma's soft-capping `Div → Tanh →
//! Mul`, Granite's and Cohere's logit scale) makes one such tensor per op, and ONNX Runtime
//! holds an op's input and output at once. [`logits_chain`] walks back from the `logits`
//! output to the projection (the last `MatMul`/`Gemm`) and returns the ops on the way, so the
//! planner can divide its budget by the tensors live at once.
//!
//! Like [`super::external`], only the graph's structure is decoded
//! ([`decode_structure`]), so the weights of a single-file model are skipped, not copied.

use super::structure::{ALIASES, LiteModel, ModelStructure, Scope, is_constant, producer};

/// The projection onto the vocabulary: where the chain starts.
const PROJECTIONS: &[&str] = &[
    "MatMul",
    "Gemm",
    "FusedMatMul",
    "MatMulNBits",
    "MatMulInteger",
    "QLinearMatMul",
    "Einsum",
];
/// Ops that make a tensor of their input's size (element-wise, or over the last axis).
const SAME_SIZE: &[&str] = &[
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Tanh",
    "Cast",
    "Neg",
    "Clip",
    "Exp",
    "Log",
    "Sigmoid",
    "Relu",
    "Pow",
    "Sqrt",
    "Softmax",
    "LogSoftmax",
    "Slice",
    "Transpose",
];

/// Deepest walk back from the output (a guard against pathological graphs).
const MAX_DEPTH: usize = 64;

/// The ops from the projection to `value` (in that order, aliases left out), or `None` when
/// no projection is reached (a value that does not come from the vocabulary projection).
fn chain<'a>(scopes: &[&Scope<'a>], value: &str, depth: usize) -> Option<Vec<&'a str>> {
    if depth > MAX_DEPTH {
        return None;
    }
    let (visible, node) = producer(scopes, value)?;
    let op = node.op_type.as_deref().unwrap_or("");
    let constant = |name: &str| is_constant(visible, name);
    if ALIASES.contains(&op) {
        return chain(visible, node.input.first()?, depth + 1);
    }
    if PROJECTIONS.contains(&op) {
        return Some(vec![op]);
    }
    if op == "If" {
        let index = node.output.iter().position(|o| o == value)?;
        let mut longest: Option<Vec<&str>> = None;
        for a in &node.attribute {
            let Some(g) = &a.g else { continue };
            if !matches!(a.name.as_deref(), Some("then_branch" | "else_branch")) {
                continue;
            }
            let out = g.output.get(index)?.name.as_deref()?;
            let branch = Scope::new(g);
            let mut inner = visible.to_vec();
            inner.push(&branch);
            if let Some(c) = chain(&inner, out, depth + 1)
                && longest.as_ref().is_none_or(|l| c.len() > l.len())
            {
                longest = Some(c);
            }
        }
        return longest;
    }
    if SAME_SIZE.contains(&op) {
        // Slice and Transpose move their data input; the others combine theirs. Follow the
        // inputs that are not constants and keep the longest chain that reaches the
        // projection (a broadcast mask of another shape reaches none).
        let data: Vec<&str> = match op {
            "Slice" | "Transpose" => node.input.first().map(String::as_str).into_iter().collect(),
            _ => node
                .input
                .iter()
                .map(String::as_str)
                .filter(|i| !i.is_empty() && !constant(i))
                .collect(),
        };
        let mut c = data
            .into_iter()
            .filter_map(|i| chain(visible, i, depth + 1))
            .max_by_key(Vec::len)?;
        c.push(op);
        return Some(c);
    }
    None
}

/// The ops that make logits-sized tensors in `model`, from the vocabulary projection to its
/// `logits` output (e.g. `["MatMul"]` for a plain head, `["MatMul", "Add", "Mul"]` for the
/// toy teachers'). When the walk does not reach a projection (an op it does not know), the
/// logits alone are counted: `["logits"]`.
pub fn logits_chain(model: &ModelStructure) -> Vec<String> {
    chain_in(&model.model)
}

fn chain_in(m: &LiteModel) -> Vec<String> {
    let found = m.graph.as_ref().and_then(|g| {
        let logits = g
            .output
            .iter()
            .find(|o| o.name.as_deref() == Some("logits"))?;
        chain(&[&Scope::new(g)], logits.name.as_deref()?, 0)
    });
    match found {
        Some(ops) => ops.into_iter().map(str::to_string).collect(),
        None => vec!["logits".to_string()],
    }
}

/// How many logits-sized tensors ONNX Runtime holds at once for a head of `chain` (as
/// [`logits_chain`] gives it): each op of the chain reads one and writes the next, and the
/// input is freed after its last use, so at most two.
pub fn live_logits_tensors(chain: &[String]) -> usize {
    chain.len().clamp(1, 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::builder::{Dim, GraphBuilder, attr_graph};
    use crate::onnx::data_type;
    use crate::onnx::{ToyFault, ToyLmSpec, toy_lm};
    use prost::Message;

    fn ops(bytes: &[u8]) -> Vec<String> {
        chain_in(&LiteModel::decode(bytes).unwrap())
    }

    fn dims() -> [Dim; 3] {
        [Dim::sym("b"), Dim::sym("s"), Dim::Fixed(8)]
    }

    /// A graph `x [b, s, 4] → MatMul → then(ops…) → logits`, each op given by a closure.
    fn head(after: impl FnOnce(&mut GraphBuilder, String) -> String) -> Vec<u8> {
        let mut g = GraphBuilder::new("head");
        let x = g.input(
            "x",
            data_type::FLOAT,
            &[Dim::sym("b"), Dim::sym("s"), Dim::Fixed(4)],
        );
        let w = g.init_f32("w", &[4, 8], &[0.5; 32]);
        let logits = g.node("MatMul", &[&x, &w], vec![]);
        let out = after(&mut g, logits);
        g.output_as(&out, "logits", data_type::FLOAT, &dims());
        g.to_bytes()
    }

    #[test]
    fn the_toy_teachers_head_is_three_tensors_and_the_plain_one_one() {
        let toy = toy_lm(&ToyLmSpec::default());
        assert_eq!(ops(&toy), ["MatMul", "Add", "Mul"]);
        let plain = toy_lm(&ToyLmSpec {
            plain_head: true,
            ..ToyLmSpec::default()
        });
        assert_eq!(ops(&plain), ["MatMul"]);
        assert_eq!(live_logits_tensors(&ops(&toy)), 2);
        assert_eq!(live_logits_tensors(&ops(&plain)), 1);
    }

    #[test]
    fn soft_capping_counts_each_op_and_views_none() {
        let capped = head(|g, l| {
            let cap = g.init_f32("cap", &[], &[30.0]);
            let shape = g.init_i64("shape", &[3], &[0, 0, 8]);
            let r = g.node("Reshape", &[&l, &shape], vec![]);
            let d = g.node("Div", &[&r, &cap], vec![]);
            let t = g.node("Tanh", &[&d], vec![]);
            g.node("Mul", &[&t, &cap], vec![])
        });
        assert_eq!(ops(&capped), ["MatMul", "Div", "Tanh", "Mul"]);
    }

    #[test]
    fn a_mask_added_to_the_logits_is_not_a_logits_tensor_of_its_own() {
        // The toy's NaN fault adds a [b, s, 1] tensor computed from the ids: the longest chain
        // that reaches the projection is kept, the mask's ops are not counted.
        let faulty = toy_lm(&ToyLmSpec {
            fault: ToyFault::NanOnToken(3),
            ..ToyLmSpec::default()
        });
        assert_eq!(ops(&faulty), ["MatMul", "Add", "Mul", "Add"]);
    }

    #[test]
    fn if_branches_give_their_longest_chain() {
        let toy = toy_lm(&ToyLmSpec {
            use_cache_branch: true,
            ..ToyLmSpec::default()
        });
        assert_eq!(ops(&toy), ["MatMul", "Add", "Mul", "Mul"]);
        let branchy = head(|g, l| {
            let cond = g.input("c", data_type::BOOL, &[Dim::Fixed(1)]);
            let branch = |name: &str, n: usize| {
                let mut sub = GraphBuilder::new(name);
                let mut v = l.clone();
                for _ in 0..n {
                    v = sub.node("Neg", &[&v], vec![]);
                }
                let out = sub.node("Identity", &[&v], vec![]);
                sub.output_as(&out, &format!("{name}_out"), data_type::FLOAT, &dims());
                sub.finish().graph.unwrap()
            };
            g.node(
                "If",
                &[&cond],
                vec![
                    attr_graph("then_branch", branch("a", 1)),
                    attr_graph("else_branch", branch("b", 2)),
                ],
            )
        });
        assert_eq!(ops(&branchy), ["MatMul", "Neg", "Neg"]);
    }

    #[test]
    fn an_unknown_producer_counts_the_logits_alone() {
        let odd = head(|g, l| g.node("Hardmax", &[&l], vec![]));
        assert_eq!(ops(&odd), ["logits"]);
        assert_eq!(live_logits_tensors(&ops(&odd)), 1);
    }
}

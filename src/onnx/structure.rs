//! The part of an ONNX model's structure the planner's graph walks read
//! ([`super::logits_chain`], [`super::attention`]): nodes, initializers' names, values' types
//! and `If` branches, decoded with [`super::external::decode_structure`] so a single-file
//! model's weights are skipped, not copied.

use super::external::{ExternalError, decode_structure};
use prost::Message;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// A model's structure as the batch planner reads it, decoded once for both of its walks
/// ([`super::logits_chain::logits_chain`], [`super::attention::attention_scores`]).
pub struct ModelStructure {
    pub(super) model: LiteModel,
    /// The model file's directory (where a `config.json` may sit).
    pub(super) dir: PathBuf,
}

impl ModelStructure {
    /// Decodes the structure of the model at `path` (its weights skipped).
    pub fn load(path: &Path) -> Result<Self, ExternalError> {
        Ok(ModelStructure {
            model: decode_structure(path)?,
            dir: path.parent().unwrap_or(Path::new(".")).to_path_buf(),
        })
    }
}

#[derive(Clone, PartialEq, Message)]
pub(super) struct LiteModel {
    #[prost(message, optional, tag = "7")]
    pub(super) graph: Option<LiteGraph>,
}

#[derive(Clone, PartialEq, Message)]
pub(super) struct LiteGraph {
    #[prost(message, repeated, tag = "1")]
    pub(super) node: Vec<LiteNode>,
    #[prost(message, repeated, tag = "5")]
    pub(super) initializer: Vec<LiteTensor>,
    #[prost(message, repeated, tag = "11")]
    pub(super) input: Vec<LiteValue>,
    #[prost(message, repeated, tag = "12")]
    pub(super) output: Vec<LiteValue>,
    #[prost(message, repeated, tag = "13")]
    pub(super) value_info: Vec<LiteValue>,
}

#[derive(Clone, PartialEq, Message)]
pub(super) struct LiteNode {
    #[prost(string, repeated, tag = "1")]
    pub(super) input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    pub(super) output: Vec<String>,
    #[prost(string, optional, tag = "4")]
    pub(super) op_type: Option<String>,
    #[prost(message, repeated, tag = "5")]
    pub(super) attribute: Vec<LiteAttribute>,
    #[prost(string, optional, tag = "7")]
    pub(super) domain: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
pub(super) struct LiteAttribute {
    #[prost(string, optional, tag = "1")]
    pub(super) name: Option<String>,
    #[prost(message, optional, tag = "6")]
    pub(super) g: Option<LiteGraph>,
}

#[derive(Clone, PartialEq, Message)]
pub(super) struct LiteTensor {
    #[prost(string, optional, tag = "8")]
    pub(super) name: Option<String>,
}

#[derive(Clone, PartialEq, Message)]
pub(super) struct LiteValue {
    #[prost(string, optional, tag = "1")]
    pub(super) name: Option<String>,
    #[prost(message, optional, tag = "2")]
    pub(super) r#type: Option<LiteType>,
}

#[derive(Clone, PartialEq, Message)]
pub(super) struct LiteType {
    #[prost(message, optional, tag = "1")]
    pub(super) tensor_type: Option<LiteTensorType>,
}

#[derive(Clone, PartialEq, Message)]
pub(super) struct LiteTensorType {
    #[prost(int32, optional, tag = "1")]
    pub(super) elem_type: Option<i32>,
    #[prost(message, optional, tag = "2")]
    pub(super) shape: Option<LiteShape>,
}

#[derive(Clone, PartialEq, Message)]
pub(super) struct LiteShape {
    #[prost(message, repeated, tag = "1")]
    pub(super) dim: Vec<LiteDim>,
}

#[derive(Clone, PartialEq, Message)]
pub(super) struct LiteDim {
    #[prost(int64, optional, tag = "1")]
    pub(super) dim_value: Option<i64>,
    #[prost(string, optional, tag = "2")]
    pub(super) dim_param: Option<String>,
}

/// Ops whose output shares its input's buffer (a view, no new tensor).
pub(super) const ALIASES: &[&str] = &["Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"];

/// One scope of a walk: a graph, and what its names resolve to.
pub(super) struct Scope<'a> {
    pub(super) producers: HashMap<&'a str, &'a LiteNode>,
    pub(super) consumers: HashMap<&'a str, Vec<&'a LiteNode>>,
    pub(super) constants: HashSet<&'a str>,
    pub(super) types: HashMap<&'a str, &'a LiteTensorType>,
}

impl<'a> Scope<'a> {
    pub(super) fn new(g: &'a LiteGraph) -> Self {
        let mut s = Scope {
            producers: HashMap::new(),
            consumers: HashMap::new(),
            constants: g
                .initializer
                .iter()
                .filter_map(|t| t.name.as_deref())
                .collect(),
            types: HashMap::new(),
        };
        for n in &g.node {
            for o in &n.output {
                s.producers.insert(o.as_str(), n);
                if n.op_type.as_deref() == Some("Constant") {
                    s.constants.insert(o.as_str());
                }
            }
            for i in &n.input {
                s.consumers.entry(i.as_str()).or_default().push(n);
            }
        }
        for v in g.value_info.iter().chain(&g.input).chain(&g.output) {
            if let (Some(name), Some(t)) = (
                v.name.as_deref(),
                v.r#type.as_ref().and_then(|t| t.tensor_type.as_ref()),
            ) {
                s.types.insert(name, t);
            }
        }
        s
    }
}

pub(super) fn op(n: &LiteNode) -> &str {
    n.op_type.as_deref().unwrap_or("")
}

/// Default domain (where ONNX's own `Softmax` and `MatMul` live).
pub(super) fn default_domain(n: &LiteNode) -> bool {
    matches!(n.domain.as_deref(), None | Some("" | "ai.onnx"))
}

/// The node making `value`, searched from the innermost of `scopes` (outermost first) out,
/// with the scopes visible from it (its own and those around it).
pub(super) fn producer<'s, 'a>(
    scopes: &'s [&'s Scope<'a>],
    value: &str,
) -> Option<(&'s [&'s Scope<'a>], &'a LiteNode)> {
    let (level, node) = scopes
        .iter()
        .enumerate()
        .rev()
        .find_map(|(i, s)| s.producers.get(value).map(|n| (i, *n)))?;
    Some((&scopes[..=level], node))
}

/// Whether `name` is a constant (an initializer or a `Constant`'s output) in `scopes`.
pub(super) fn is_constant(scopes: &[&Scope], name: &str) -> bool {
    scopes.iter().any(|s| s.constants.contains(name))
}

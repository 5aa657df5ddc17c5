//! A small ONNX graph builder: named inputs, initializers and nodes in, a serialized
//! `ModelProto` out. Used for the test teachers, the top-k head that runs after a teacher on
//! the device, the pipeline's data model and the student exporter — one builder for all.
//!
//! ```
//! use logitcache::onnx::{GraphBuilder, Dim, data_type};
//! let mut g = GraphBuilder::new("double");
//! let x = g.input("x", data_type::FLOAT, &[Dim::sym("n")]);
//! let two = g.init_f32("two", &[], &[2.0]);
//! let y = g.node("Mul", &[&x, &two], vec![]);
//! g.output_as(&y, "y", data_type::FLOAT, &[Dim::sym("n")]);
//! let bytes = g.to_bytes();
//! assert!(!bytes.is_empty());
//! ```

use super::proto::{
    AttributeProto, Dimension, DimensionValue, GraphProto, ModelProto, NodeProto,
    OperatorSetIdProto, StringStringEntryProto, TensorProto, TensorShapeProto, TypeProto,
    TypeProtoTensor, ValueInfoProto, attribute_type, data_type,
};
use prost::Message;
use std::path::Path;

/// The default opset: 17 keeps `ReduceMean`'s `axes` an attribute and is supported by every
/// ONNX Runtime release ort rc.15 accepts.
pub const DEFAULT_OPSET: i64 = 17;
/// IR version 8 pairs with opset 17.
pub const DEFAULT_IR_VERSION: i64 = 8;

/// One dimension of a graph input or output.
#[derive(Debug, Clone)]
pub enum Dim {
    Fixed(i64),
    Sym(String),
}

impl Dim {
    pub fn sym(name: &str) -> Self {
        Dim::Sym(name.to_string())
    }
}

/// Builds one ONNX graph; see the module docs.
#[derive(Debug, Clone)]
pub struct GraphBuilder {
    graph: GraphProto,
    opset: i64,
    next_id: usize,
    metadata: Vec<(String, String)>,
    /// Prefix of generated value names (a subgraph's differ from its parent's: ONNX names
    /// are unique across scopes).
    prefix: String,
}

fn value_info(name: &str, elem_type: i32, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Fixed(v) => DimensionValue::DimValue(*v),
                Dim::Sym(s) => DimensionValue::DimParam(s.clone()),
            }),
        })
        .collect();
    ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type: Some(elem_type),
                shape: Some(TensorShapeProto { dim }),
            }),
        }),
    }
}

/// An integer attribute.
pub fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        i: Some(v),
        r#type: Some(attribute_type::INT),
        ..Default::default()
    }
}

/// A list-of-integers attribute.
pub fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        ints: v.to_vec(),
        r#type: Some(attribute_type::INTS),
        ..Default::default()
    }
}

/// A float attribute.
pub fn attr_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        f: Some(v),
        r#type: Some(attribute_type::FLOAT),
        ..Default::default()
    }
}

/// A string attribute.
pub fn attr_string(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        s: Some(v.as_bytes().to_vec()),
        r#type: Some(attribute_type::STRING),
        ..Default::default()
    }
}

/// A tensor attribute (e.g. `ConstantOfShape`'s `value`).
pub fn attr_tensor(name: &str, t: TensorProto) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        t: Some(t),
        r#type: Some(attribute_type::TENSOR),
        ..Default::default()
    }
}

/// A tensor with raw little-endian data.
pub fn tensor_raw(name: &str, elem_type: i32, dims: &[i64], raw: Vec<u8>) -> TensorProto {
    TensorProto {
        dims: dims.to_vec(),
        data_type: Some(elem_type),
        name: Some(name.to_string()),
        raw_data: Some(raw),
        ..Default::default()
    }
}

/// A subgraph attribute (an `If` node's `then_branch` / `else_branch`).
pub fn attr_graph(name: &str, g: GraphProto) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        g: Some(g),
        r#type: Some(5), // GRAPH
        ..Default::default()
    }
}

/// An f32 tensor.
pub fn tensor_f32(name: &str, dims: &[i64], data: &[f32]) -> TensorProto {
    assert_eq!(
        dims.iter().product::<i64>() as usize,
        data.len(),
        "tensor {name}: dims do not match data: this is a bug"
    );
    let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    tensor_raw(name, data_type::FLOAT, dims, raw)
}

/// An i64 tensor.
pub fn tensor_i64(name: &str, dims: &[i64], data: &[i64]) -> TensorProto {
    assert_eq!(
        dims.iter().product::<i64>() as usize,
        data.len(),
        "tensor {name}: dims do not match data: this is a bug"
    );
    let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    tensor_raw(name, data_type::INT64, dims, raw)
}

impl GraphBuilder {
    pub fn new(name: &str) -> Self {
        GraphBuilder {
            graph: GraphProto {
                name: Some(name.to_string()),
                ..Default::default()
            },
            opset: DEFAULT_OPSET,
            next_id: 0,
            metadata: Vec::new(),
            prefix: String::new(),
        }
    }

    /// A builder for a subgraph (the body of a `Scan`, `Loop` or `If`) whose generated names
    /// start with `prefix`, so they cannot shadow this graph's; finish it with
    /// [`GraphBuilder::finish_graph`]. Its nodes may read this graph's values by name.
    pub fn subgraph(&self, prefix: &str) -> GraphBuilder {
        let mut g = GraphBuilder::new(prefix).with_opset(self.opset);
        g.prefix = format!("{}{prefix}_", self.prefix);
        g
    }

    /// The finished graph alone (of a [`GraphBuilder::subgraph`]).
    pub fn finish_graph(self) -> GraphProto {
        self.graph
    }

    /// Use another default-domain opset version.
    pub fn with_opset(mut self, opset: i64) -> Self {
        self.opset = opset;
        self
    }

    /// Adds a `metadata_props` entry to the model.
    pub fn metadata(&mut self, key: &str, value: &str) {
        self.metadata.push((key.into(), value.into()));
    }

    fn fresh(&mut self, hint: &str) -> String {
        self.next_id += 1;
        format!("{}{hint}_{}", self.prefix, self.next_id)
    }

    /// Declares a graph input and returns its name.
    pub fn input(&mut self, name: &str, elem_type: i32, dims: &[Dim]) -> String {
        self.graph.input.push(value_info(name, elem_type, dims));
        name.to_string()
    }

    /// Records the type and shape of an intermediate `value` (`value_info`), as exporters do.
    pub fn annotate(&mut self, value: &str, elem_type: i32, dims: &[Dim]) {
        self.graph
            .value_info
            .push(value_info(value, elem_type, dims));
    }

    /// Declares `value` as a graph output called `name` (an `Identity` is added if the names
    /// differ).
    pub fn output_as(&mut self, value: &str, name: &str, elem_type: i32, dims: &[Dim]) {
        if value != name {
            self.graph.node.push(NodeProto {
                input: vec![value.to_string()],
                output: vec![name.to_string()],
                name: Some(format!("out_{name}")),
                op_type: Some("Identity".into()),
                ..Default::default()
            });
        }
        self.graph.output.push(value_info(name, elem_type, dims));
    }

    /// Adds an initializer and returns its (unique) name.
    pub fn init(&mut self, mut t: TensorProto) -> String {
        let base = t.name.clone().unwrap_or_else(|| "init".into());
        let hint = format!("{}{base}", self.prefix);
        let name = if self
            .graph
            .initializer
            .iter()
            .any(|i| i.name.as_ref() == Some(&hint))
        {
            self.fresh(&base)
        } else {
            hint
        };
        t.name = Some(name.clone());
        self.graph.initializer.push(t);
        name
    }

    pub fn init_f32(&mut self, name: &str, dims: &[i64], data: &[f32]) -> String {
        self.init(tensor_f32(name, dims, data))
    }

    pub fn init_i64(&mut self, name: &str, dims: &[i64], data: &[i64]) -> String {
        self.init(tensor_i64(name, dims, data))
    }

    /// Adds a node with one output and returns the output's name.
    pub fn node(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        self.node_n(op, inputs, 1, attrs)
            .pop()
            .expect("one output: this is a bug")
    }

    /// Adds a node with `n_outputs` outputs and returns their names.
    pub fn node_n(
        &mut self,
        op: &str,
        inputs: &[&str],
        n_outputs: usize,
        attrs: Vec<AttributeProto>,
    ) -> Vec<String> {
        let base = self.fresh(&op.to_lowercase());
        let outputs: Vec<String> = (0..n_outputs).map(|i| format!("{base}_o{i}")).collect();
        self.graph.node.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.clone(),
            name: Some(base),
            op_type: Some(op.to_string()),
            attribute: attrs,
            domain: None,
        });
        outputs
    }

    /// The finished model.
    pub fn finish(self) -> ModelProto {
        ModelProto {
            ir_version: Some(DEFAULT_IR_VERSION),
            producer_name: Some("logitcache".into()),
            producer_version: Some(env!("CARGO_PKG_VERSION").into()),
            doc_string: None,
            graph: Some(self.graph),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(self.opset),
            }],
            metadata_props: self
                .metadata
                .into_iter()
                .map(|(k, v)| StringStringEntryProto {
                    key: Some(k),
                    value: Some(v),
                })
                .collect(),
        }
    }

    /// The serialized model.
    pub fn to_bytes(self) -> Vec<u8> {
        self.finish().encode_to_vec()
    }

    /// Writes the serialized model to `path`.
    pub fn write(self, path: &Path) -> std::io::Result<()> {
        std::fs::write(path, self.to_bytes())
    }
}

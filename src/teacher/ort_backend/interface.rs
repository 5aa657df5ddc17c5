//! The teacher interface as ONNX Runtime reports it: which inputs and outputs a model has,
//! their element types and shapes, checked against the Hugging Face Optimum
//! `text-generation` export (shared/DESIGN.md, "Teacher interface"); whatever does not fit is
//! refused with a message naming it.

use super::OrtError;
use crate::cache::manifest::IoInfo;
use ort::session::Session;
use ort::value::{TensorElementType, ValueType};
use std::path::Path;

/// Element type of a teacher's logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsDtype {
    Float32,
    Float16,
}

impl LogitsDtype {
    /// The name recorded in the manifest (`model.logits_dtype`).
    pub fn name(self) -> &'static str {
        match self {
            LogitsDtype::Float32 => "float32",
            LogitsDtype::Float16 => "float16",
        }
    }
}

fn dtype_name(t: &TensorElementType) -> String {
    match t {
        TensorElementType::Float32 => "float32".into(),
        TensorElementType::Float16 => "float16".into(),
        TensorElementType::Int64 => "int64".into(),
        TensorElementType::Bool => "bool".into(),
        other => format!("{other}").to_lowercase(),
    }
}

fn io_info(name: &str, vt: &ValueType) -> IoInfo {
    match vt {
        ValueType::Tensor {
            ty,
            shape,
            dimension_symbols,
        } => IoInfo {
            name: name.to_string(),
            dtype: dtype_name(ty),
            shape: shape
                .iter()
                .zip(dimension_symbols.iter())
                .map(|(d, s)| {
                    if *d >= 0 {
                        d.to_string()
                    } else if s.is_empty() {
                        "?".into()
                    } else {
                        s.clone()
                    }
                })
                .collect(),
        },
        other => IoInfo {
            name: name.to_string(),
            dtype: format!("{other}"),
            shape: vec![],
        },
    }
}

/// An input fed with a constant: empty past key/values, or `use_cache_branch = false`.
#[derive(Debug, Clone)]
pub(super) enum ExtraInput {
    /// Element type and dims; `-1` for batch (dim 0), `0` for other symbolic dims.
    EmptyPast {
        f16: bool,
        dims: Vec<i64>,
    },
    False,
}

/// What the teacher model looks like, as read from the session.
#[derive(Debug, Clone)]
pub struct ModelInterface {
    pub inputs: Vec<IoInfo>,
    pub outputs: Vec<IoInfo>,
    pub has_position_ids: bool,
    /// Element type of the `logits` output.
    pub logits: LogitsDtype,
    /// Static size of the logits' last dimension, if declared.
    pub logits_vocab: Option<usize>,
    pub(super) extras: Vec<(String, ExtraInput)>,
}

pub(super) fn check_interface(session: &Session, path: &Path) -> Result<ModelInterface, OrtError> {
    let bad = |why: String| OrtError::Interface {
        path: path.to_path_buf(),
        why,
    };
    let inputs: Vec<IoInfo> = session
        .inputs()
        .iter()
        .map(|o| io_info(o.name(), o.dtype()))
        .collect();
    let outputs: Vec<IoInfo> = session
        .outputs()
        .iter()
        .map(|o| io_info(o.name(), o.dtype()))
        .collect();
    let names = |v: &[IoInfo]| {
        v.iter()
            .map(|i| format!("{}: {} [{}]", i.name, i.dtype, i.shape.join(", ")))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let mut has_ids = false;
    let mut has_mask = false;
    let mut has_position_ids = false;
    let mut extras = Vec::new();
    for o in session.inputs() {
        let name = o.name();
        let (ty, shape) = match o.dtype() {
            ValueType::Tensor { ty, shape, .. } => (ty, shape),
            other => return Err(bad(format!("input `{name}` is a {other}, not a tensor"))),
        };
        match name {
            "input_ids" | "attention_mask" | "position_ids" => {
                if *ty != TensorElementType::Int64 || shape.len() != 2 {
                    return Err(bad(format!(
                        "input `{name}` must be int64 [batch, sequence], found {} with rank {}",
                        dtype_name(ty),
                        shape.len()
                    )));
                }
                match name {
                    "input_ids" => has_ids = true,
                    "attention_mask" => has_mask = true,
                    _ => has_position_ids = true,
                }
            }
            "use_cache_branch" => extras.push((name.to_string(), ExtraInput::False)),
            n if n.starts_with("past_key_values.") || n.starts_with("past.") => {
                let f16 = match ty {
                    TensorElementType::Float32 => false,
                    TensorElementType::Float16 => true,
                    other => {
                        return Err(bad(format!(
                            "input `{n}` has type {}; past key/values must be float32 or float16",
                            dtype_name(other)
                        )));
                    }
                };
                let dims = shape
                    .iter()
                    .enumerate()
                    .map(|(i, &d)| {
                        if i == 0 {
                            -1
                        } else if d < 0 {
                            0
                        } else {
                            d
                        }
                    })
                    .collect();
                extras.push((n.to_string(), ExtraInput::EmptyPast { f16, dims }));
            }
            other => {
                return Err(bad(format!(
                    "unexpected input `{other}`; logitcache feeds input_ids, attention_mask, position_ids, past_key_values.* and use_cache_branch (model inputs: {})",
                    names(&inputs)
                )));
            }
        }
    }
    if !has_ids {
        return Err(bad(format!(
            "no `input_ids` input (model inputs: {}); export it with Optimum's text-generation task",
            names(&inputs)
        )));
    }
    if !has_mask {
        return Err(bad(format!(
            "no `attention_mask` input (model inputs: {}); logitcache pads batches and needs the mask; export with Optimum's text-generation task",
            names(&inputs)
        )));
    }
    let logits = session
        .outputs()
        .iter()
        .find(|o| o.name() == "logits")
        .ok_or_else(|| bad(format!("no `logits` output (model outputs: {}); export with Optimum's text-generation task", names(&outputs))))?;
    let (ty, shape) = match logits.dtype() {
        ValueType::Tensor { ty, shape, .. } => (ty, shape),
        other => return Err(bad(format!("`logits` is a {other}, not a tensor"))),
    };
    if shape.len() != 3 {
        return Err(bad(format!(
            "`logits` must have rank 3 [batch, sequence, vocab], found rank {} [{}]",
            shape.len(),
            io_info("logits", logits.dtype()).shape.join(", ")
        )));
    }
    let logits_dtype = match ty {
        TensorElementType::Float32 => LogitsDtype::Float32,
        TensorElementType::Float16 => LogitsDtype::Float16,
        other => {
            return Err(bad(format!(
                "`logits` has type {}; float32 or float16 expected",
                dtype_name(other)
            )));
        }
    };
    Ok(ModelInterface {
        inputs,
        outputs,
        has_position_ids,
        logits: logits_dtype,
        logits_vocab: (shape[2] > 0).then_some(shape[2] as usize),
        extras,
    })
}

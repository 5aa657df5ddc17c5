//! Student weights in Hugging Face `LlamaForCausalLM` layout: `model.safetensors` (metadata
//! `format: pt`, names and `[out, in]` shapes as transformers expects) and back.

use super::model::{Llama, hf_name};
use burn::module::{ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// `(shape, values)` of one tensor, in Hugging Face layout.
pub type HfTensor = (Vec<usize>, Vec<f32>);

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(
        "cannot read checkpoint weights {path}: {why}; the checkpoint is damaged or incomplete (train again, or resume from an earlier checkpoint)"
    )]
    Read { path: String, why: String },
    #[error("checkpoint weights {path} do not fit the student: {why}")]
    Mismatch { path: String, why: String },
    #[error("cannot write {path}: {why}")]
    Write { path: String, why: String },
}

struct Collect {
    path: Vec<String>,
    out: BTreeMap<String, HfTensor>,
}

fn transpose(shape: &[usize], v: &[f32]) -> (Vec<usize>, Vec<f32>) {
    let (r, c) = (shape[0], shape[1]);
    let mut t = vec![0f32; v.len()];
    for i in 0..r {
        for j in 0..c {
            t[j * r + i] = v[i * c + j];
        }
    }
    (vec![c, r], t)
}

impl<B: Backend> ModuleVisitor<B> for Collect {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
        let t = p.val();
        let shape = t.dims().to_vec();
        let v = t
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .expect("f32 data: this is a bug");
        let (name, tr) = hf_name(&self.path.join("."));
        let entry = if tr {
            transpose(&shape, &v)
        } else {
            (shape, v)
        };
        self.out.insert(name, entry);
    }
}

/// The student's parameters by Hugging Face name, in Hugging Face layout.
pub fn hf_tensors<B: Backend>(model: &Llama<B>) -> BTreeMap<String, HfTensor> {
    let mut c = Collect {
        path: vec![],
        out: BTreeMap::new(),
    };
    model.visit(&mut c);
    c.out
}

/// Writes `model.safetensors` (f32, metadata `format: pt`).
pub fn save_safetensors<B: Backend>(model: &Llama<B>, path: &Path) -> Result<(), CheckpointError> {
    let tensors = hf_tensors(model);
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, (s, v))| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).expect("valid view: this is a bug"),
            )
        })
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    let buf = safetensors::serialize(views, Some(meta)).map_err(|e| CheckpointError::Write {
        path: path.display().to_string(),
        why: e.to_string(),
    })?;
    crate::util::write_atomic(path, &buf).map_err(|e| CheckpointError::Write {
        path: path.display().to_string(),
        why: e.to_string(),
    })
}

/// Reads an f32 safetensors file into `name → (shape, values)`.
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, HfTensor>, CheckpointError> {
    let err = |why: String| CheckpointError::Read {
        path: path.display().to_string(),
        why,
    };
    let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| err(e.to_string()))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(err(format!(
                "tensor {name} is {:?}; logitcache reads float32 checkpoints",
                view.dtype()
            )));
        }
        let v: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.insert(name, (view.shape().to_vec(), v));
    }
    Ok(out)
}

struct Load<'a> {
    path: Vec<String>,
    src: &'a HashMap<String, HfTensor>,
    error: Option<String>,
}

impl<B: Backend> ModuleMapper<B> for Load<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, p: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, old, mapper) = p.consume();
        let want = old.dims().to_vec();
        let (name, tr) = hf_name(&self.path.join("."));
        let value = match self.src.get(&name) {
            None => Err(format!("missing tensor {name}")),
            Some((shape, v)) => {
                let (shape, v) = if tr {
                    transpose(shape, v)
                } else {
                    (shape.clone(), v.clone())
                };
                if shape != want {
                    Err(format!(
                        "{name} has shape {shape:?}, the student needs {want:?}"
                    ))
                } else {
                    Ok(v)
                }
            }
        };
        match value {
            Ok(v) => {
                let mut t = Tensor::<B, D>::from_data(TensorData::new(v, want), &old.device());
                if old.is_require_grad() {
                    t = t.require_grad();
                }
                Param::from_mapped_value(id, t, mapper)
            }
            Err(e) => {
                self.error.get_or_insert(e);
                Param::from_mapped_value(id, old, mapper)
            }
        }
    }
}

/// Loads Hugging Face named weights into `model` (keeping its parameter ids).
pub fn load_hf<B: Backend>(
    model: Llama<B>,
    weights: &HashMap<String, HfTensor>,
    source: &Path,
) -> Result<Llama<B>, CheckpointError> {
    let mut l = Load {
        path: vec![],
        src: weights,
        error: None,
    };
    let model = model.map(&mut l);
    match l.error {
        Some(why) => Err(CheckpointError::Mismatch {
            path: source.display().to_string(),
            why,
        }),
        None => Ok(model),
    }
}

/// A run directory's checkpoint: where it is, the student and the training config.
#[derive(Debug, Clone)]
pub struct RunCheckpoint {
    /// `RUN_DIR/checkpoint`.
    pub dir: std::path::PathBuf,
    pub student: super::config::StudentConfig,
    pub train: super::train::TrainConfig,
}

impl RunCheckpoint {
    /// Opens `run_dir` (a directory written by `logitcache train`, i.e. `OUT/<student>`).
    pub fn open(run_dir: &Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        let dir = run_dir.join("checkpoint");
        let bytes = std::fs::read(dir.join("train_config.json")).with_context(|| {
            format!(
                "{} is not a run directory written by `logitcache train` (no checkpoint/train_config.json); pass OUT/<student>",
                run_dir.display()
            )
        })?;
        let tc: serde_json::Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("{}/train_config.json is damaged", dir.display()))?;
        let student = serde_json::from_value(tc["student"].clone())
            .context("checkpoint/train_config.json has no valid `student`")?;
        let train = serde_json::from_value(tc["train"].clone())
            .context("checkpoint/train_config.json has no valid `train`")?;
        Ok(RunCheckpoint {
            dir,
            student,
            train,
        })
    }

    /// The student's weights by Hugging Face name.
    pub fn weights(&self) -> Result<HashMap<String, HfTensor>, CheckpointError> {
        read_safetensors(&self.dir.join("model.safetensors"))
    }

    /// The model on backend `B`.
    pub fn model<B: Backend>(&self, dev: &B::Device) -> Result<Llama<B>, CheckpointError> {
        let w = self.weights()?;
        load_hf(
            Llama::<B>::init(&self.student, 0, dev),
            &w,
            &self.dir.join("model.safetensors"),
        )
    }
}

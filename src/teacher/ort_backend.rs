//! The ONNX Runtime teacher backend (`ort` rc.15, ONNX Runtime loaded at run time).
//!
//! The model must have the Hugging Face Optimum `text-generation` interface: inputs
//! `input_ids` and `attention_mask` (int64 [batch, seq]), optionally `position_ids`,
//! `past_key_values.*` (fed empty) and `use_cache_branch` (fed false); output `logits`
//! [batch, seq, vocab] in f32 or f16. Anything else is refused with a message naming it.

use super::backend::{Batch, BatchTopK, Device, TeacherBackend, TeacherError, TopKMode};
use super::topk::{TopK, TopKScratch};
use crate::cache::manifest::IoInfo;
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{DynValue, Tensor, TensorElementType, ValueType};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// File name of the library `make setup` extracts into `.ort/`.
pub const ORT_LIB_NAME: &str = "libonnxruntime.so.1.32.0";

#[derive(Debug, thiserror::Error)]
pub enum OrtError {
    #[error(
        "ONNX Runtime library not found (looked for {tried}); run `make setup`, or set ORT_DYLIB_PATH / pass --ort-lib PATH to a libonnxruntime.so ≥ 1.31"
    )]
    NoLibrary { tried: String },
    #[error(
        "cannot load ONNX Runtime from {path}: {why}; run `make setup`, or point ORT_DYLIB_PATH / --ort-lib at a libonnxruntime.so ≥ 1.31"
    )]
    Load { path: PathBuf, why: String },
    #[error("cannot load teacher model {path}: {why}")]
    Model { path: PathBuf, why: String },
    #[error("teacher model {path} does not fit the text-generation interface: {why}")]
    Interface { path: PathBuf, why: String },
    #[error("{0}")]
    Device(String),
    #[error("ONNX Runtime error: {0}")]
    Runtime(String),
}

fn rt(e: impl std::fmt::Display) -> OrtError {
    OrtError::Runtime(e.to_string())
}

/// Finds the ONNX Runtime library: `explicit` (from `--ort-lib` or `ORT_DYLIB_PATH`), else
/// the `.ort/` folder `make setup` fills (next to the working directory or the source tree).
pub fn resolve_library(explicit: Option<&Path>) -> Result<PathBuf, OrtError> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_path_buf())
        } else {
            Err(OrtError::NoLibrary {
                tried: format!(
                    "{} (given by --ort-lib or ORT_DYLIB_PATH; not a file)",
                    p.display()
                ),
            })
        };
    }
    let candidates = [
        PathBuf::from(".ort").join(ORT_LIB_NAME),
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(".ort")
            .join(ORT_LIB_NAME),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| OrtError::NoLibrary {
            tried: candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

static ENV: OnceLock<(PathBuf, ort::environment::Environment)> = OnceLock::new();

/// The process's one ONNX Runtime environment, loaded from `lib` on first use.
pub fn environment(lib: &Path) -> Result<&'static ort::environment::Environment, OrtError> {
    if let Some((_, env)) = ENV.get() {
        return Ok(env);
    }
    let builder = ort::init_from(lib).map_err(|e| OrtError::Load {
        path: lib.to_path_buf(),
        why: e.to_string(),
    })?;
    let env = builder
        .with_name("logitcache")
        .build()
        .map_err(|e| OrtError::Load {
            path: lib.to_path_buf(),
            why: e.to_string(),
        })?;
    Ok(&ENV.get_or_init(|| (lib.to_path_buf(), env)).1)
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
enum ExtraInput {
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
    pub logits_f16: bool,
    /// Static size of the logits' last dimension, if declared.
    pub logits_vocab: Option<usize>,
    extras: Vec<(String, ExtraInput)>,
}

fn check_interface(session: &Session, path: &Path) -> Result<ModelInterface, OrtError> {
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
    let logits_f16 = match ty {
        TensorElementType::Float32 => false,
        TensorElementType::Float16 => true,
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
        logits_f16,
        logits_vocab: (shape[2] > 0).then_some(shape[2] as usize),
        extras,
    })
}

/// Settings for [`OrtTeacher::open`].
#[derive(Debug, Clone)]
pub struct OrtOptions {
    pub library: PathBuf,
    pub device: Device,
    pub threads: usize,
    pub topk: TopKMode,
    pub k: usize,
    pub temperature: f32,
    /// The cache's vocabulary (the tokenizer's): logits beyond it are dropped.
    pub vocab: usize,
}

fn session_for(
    env: &ort::environment::Environment,
    opts: &OrtOptions,
) -> Result<ort::session::builder::SessionBuilder, OrtError> {
    let b = Session::builder(env)
        .map_err(rt)?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(|e| rt(ort::Error::<()>::from(e)))?
        .with_intra_threads(opts.threads)
        .map_err(|e| rt(ort::Error::<()>::from(e)))?
        // ONNX Runtime's pool threads otherwise keep spinning after each run, on the cores
        // the host top-k needs next: measured on 2 cores, the top-k took 1.6-2x as long.
        .with_config_entry("session.force_spinning_stop", "1")
        .map_err(|e| rt(ort::Error::<()>::from(e)))?;
    match opts.device {
        Device::Cpu => Ok(b),
        #[cfg(feature = "cuda")]
        Device::Cuda(id) => b
            .with_execution_providers([ort::ep::CUDA::default().with_device_id(id).build().error_on_failure()])
            .map_err(|e| OrtError::Device(format!("cannot use CUDA device {id}: {}; check the GPU, the CUDA 13 / cuDNN 9 libraries (LD_LIBRARY_PATH) and that ONNX Runtime comes from the onnxruntime-gpu wheel", ort::Error::<()>::from(e)))),
        #[cfg(feature = "tensorrt")]
        Device::TensorRt(id) => b
            .with_execution_providers([ort::ep::TensorRT::default().with_device_id(id).build().error_on_failure()])
            .map_err(|e| OrtError::Device(format!("cannot use TensorRT on device {id}: {}; check the GPU, TensorRT and CUDA libraries (LD_LIBRARY_PATH) and that ONNX Runtime comes from the onnxruntime-gpu wheel", ort::Error::<()>::from(e)))),
        #[allow(unreachable_patterns)]
        other => Err(OrtError::Device(format!(
            "device {other}: the {} execution provider is not enabled in this build; rebuild with `cargo build --release --features {}`",
            if matches!(other, Device::TensorRt(_)) { "TensorRT" } else { "CUDA" },
            if matches!(other, Device::TensorRt(_)) { "tensorrt" } else { "cuda" },
        ))),
    }
}

/// The teacher: an ONNX Runtime session plus, when top-k runs in ONNX, the head session.
pub struct OrtTeacher {
    session: Session,
    head: Option<Session>,
    interface: ModelInterface,
    opts: OrtOptions,
    device_mem: MemoryInfo<'static>,
    /// Top-k buffers, one per thread.
    scratch: Vec<TopKScratch>,
    /// Seconds in `session.run` and in the host top-k (host path only).
    seconds: (f64, f64),
}

impl OrtTeacher {
    /// Loads the model and checks its interface. Reads `logits_vocab` when declared.
    pub fn open(model: &Path, opts: OrtOptions) -> Result<Self, OrtError> {
        let env = environment(&opts.library)?;
        if !model.is_file() {
            return Err(OrtError::Model {
                path: model.to_path_buf(),
                why: "no such file; check --model".into(),
            });
        }
        let session = session_for(env, &opts)?
            .commit_from_file(model)
            .map_err(|e| OrtError::Model {
                path: model.to_path_buf(),
                why: format!(
                    "{e}; is it an ONNX model? (re-export it, or check the file was copied whole)"
                ),
            })?;
        let interface = check_interface(&session, model)?;
        let device_mem = match opts.device {
            Device::Cpu => MemoryInfo::new(
                AllocationDevice::CPU,
                0,
                AllocatorType::Device,
                MemoryType::Default,
            ),
            Device::Cuda(id) | Device::TensorRt(id) => MemoryInfo::new(
                AllocationDevice::CUDA,
                id,
                AllocatorType::Device,
                MemoryType::Default,
            ),
        }
        .map_err(rt)?;
        let scratch = (0..opts.threads.max(1))
            .map(|_| TopKScratch::default())
            .collect();
        Ok(OrtTeacher {
            session,
            head: None,
            interface,
            opts,
            device_mem,
            scratch,
            seconds: (0.0, 0.0),
        })
    }

    pub fn interface(&self) -> &ModelInterface {
        &self.interface
    }

    /// Fixes the vocabulary once it is known (after the interface check, or after the first
    /// batch for models with a dynamic vocab dim) and builds the top-k head if needed.
    fn ensure_head(&mut self, logits_vocab: usize) -> Result<(), OrtError> {
        if self.opts.topk.uses_onnx(self.opts.device) && self.head.is_none() {
            let env = environment(&self.opts.library)?;
            let bytes = crate::onnx::head::topk_head(
                logits_vocab,
                self.opts.vocab,
                self.opts.k,
                self.opts.temperature,
                self.interface.logits_f16,
            );
            let head = session_for(env, &self.opts)?
                .commit_from_memory(&bytes)
                .map_err(|e| rt(format!("top-k head: {e}")))?;
            self.head = Some(head);
        }
        Ok(())
    }

    fn inputs(&self, batch: &Batch) -> Result<Vec<(String, DynValue)>, OrtError> {
        let shape = [batch.batch, batch.len];
        let mut v: Vec<(String, DynValue)> = vec![
            (
                "input_ids".into(),
                Tensor::from_array((shape, batch.input_ids.clone()))
                    .map_err(rt)?
                    .into_dyn(),
            ),
            (
                "attention_mask".into(),
                Tensor::from_array((shape, batch.attention_mask.clone()))
                    .map_err(rt)?
                    .into_dyn(),
            ),
        ];
        if self.interface.has_position_ids {
            v.push((
                "position_ids".into(),
                Tensor::from_array((shape, batch.position_ids.clone()))
                    .map_err(rt)?
                    .into_dyn(),
            ));
        }
        for (name, extra) in &self.interface.extras {
            let value = match extra {
                ExtraInput::False => Tensor::from_array(([1usize], vec![false]))
                    .map_err(rt)?
                    .into_dyn(),
                ExtraInput::EmptyPast { f16, dims } => {
                    let dims: Vec<usize> = dims
                        .iter()
                        .map(|&d| if d < 0 { batch.batch } else { d as usize })
                        .collect();
                    if *f16 {
                        Tensor::<half::f16>::from_array((dims, Vec::new()))
                            .map_err(rt)?
                            .into_dyn()
                    } else {
                        Tensor::<f32>::from_array((dims, Vec::new()))
                            .map_err(rt)?
                            .into_dyn()
                    }
                }
            };
            v.push((name.clone(), value));
        }
        Ok(v)
    }

    fn run_inner(&mut self, batch: &Batch) -> Result<BatchTopK, TeacherError> {
        let err =
            |e: &dyn std::fmt::Display| TeacherError::Runtime(format!("teacher run failed: {e}"));
        let inputs = self.inputs(batch).map_err(|e| err(&e))?;
        let k = self.opts.k;
        let vocab = self.opts.vocab;
        // The rows of the flattened [batch * len] logits that belong to real positions.
        let rows: Vec<(usize, usize, usize)> = (0..batch.batch)
            .flat_map(|i| (0..batch.lengths[i]).map(move |p| (i, p)))
            .map(|(i, p)| (i, p, batch.row_of(i, p)))
            .collect();
        let mut out = BatchTopK {
            k,
            ids: vec![0; rows.len() * k],
            logprobs: vec![0.0; rows.len() * k],
            tail_logprob: vec![0.0; rows.len()],
        };
        if let Some(head) = self.head.as_mut() {
            // Teacher → head on the device: only k values per position come back.
            let mut binding = self.session.create_binding().map_err(|e| err(&e))?;
            for (name, value) in &inputs {
                binding
                    .bind_input(name.as_str(), value)
                    .map_err(|e| err(&e))?;
            }
            binding
                .bind_output_to_device("logits", &self.device_mem)
                .map_err(|e| err(&e))?;
            let logits = self
                .session
                .run_binding(&binding)
                .map_err(|e| err(&e))?
                .remove("logits")
                .ok_or_else(|| err(&"no `logits` in the outputs"))?;
            check_logits_shape(logits.shape(), batch, vocab)?;
            let mut hb = head.create_binding().map_err(|e| err(&e))?;
            hb.bind_input("logits", &logits).map_err(|e| err(&e))?;
            let cpu = MemoryInfo::new(
                AllocationDevice::CPU,
                0,
                AllocatorType::Device,
                MemoryType::CPUOutput,
            )
            .map_err(|e| err(&e))?;
            for name in ["topk_logprobs", "topk_ids", "tail_logprob"] {
                hb.bind_output_to_device(name, &cpu).map_err(|e| err(&e))?;
            }
            let outs = head.run_binding(&hb).map_err(|e| err(&e))?;
            let (_, lp) = outs["topk_logprobs"]
                .try_extract_tensor::<f32>()
                .map_err(|e| err(&e))?;
            let (_, ids) = outs["topk_ids"]
                .try_extract_tensor::<i64>()
                .map_err(|e| err(&e))?;
            let (_, tail) = outs["tail_logprob"]
                .try_extract_tensor::<f32>()
                .map_err(|e| err(&e))?;
            for (o, &(i, p, r)) in rows.iter().enumerate() {
                let lps = &lp[r * k..(r + 1) * k];
                if let Some(j) = lps.iter().position(|x| !x.is_finite()) {
                    return Err(TeacherError::NonFinite {
                        window: i,
                        position: p,
                        token: ids[r * k + j] as usize,
                        value: lps[j],
                    });
                }
                out.logprobs[o * k..(o + 1) * k].copy_from_slice(lps);
                for (dst, &src) in out.ids[o * k..(o + 1) * k]
                    .iter_mut()
                    .zip(&ids[r * k..(r + 1) * k])
                {
                    *dst = src as u32;
                }
                out.tail_logprob[o] = tail[r];
            }
        } else {
            let t0 = std::time::Instant::now();
            let outputs = self.session.run(inputs).map_err(|e| err(&e))?;
            let t1 = std::time::Instant::now();
            self.seconds.0 += (t1 - t0).as_secs_f64();
            let logits = outputs
                .get("logits")
                .ok_or_else(|| err(&"no `logits` in the outputs"))?;
            let dims = logits.shape().to_vec();
            let v = check_logits_shape(&dims, batch, vocab)?;
            let f16 = self.interface.logits_f16;
            let topk = TopK {
                k,
                inv_temperature: 1.0 / self.opts.temperature,
            };
            // One contiguous range of rows per thread, on scoped threads that end with the
            // batch, so nothing spins or yields on the cores while ONNX Runtime runs the next
            // batch (a rayon pool's idle workers do).
            let per = rows.len().div_ceil(self.opts.threads.max(1)).max(1);
            let reduce_rows = |data_f32: Option<&[f32]>,
                               data_f16: Option<&[half::f16]>,
                               rows: &[(usize, usize, usize)],
                               ids: &mut [u32],
                               lps: &mut [f32],
                               tails: &mut [f32],
                               scratch: &mut TopKScratch|
             -> Result<(), TeacherError> {
                for (j, &(i, p, r)) in rows.iter().enumerate() {
                    let row: &[f32] = match (data_f32, data_f16) {
                        (Some(d), _) => &d[r * v..r * v + vocab],
                        (None, Some(d)) => {
                            let buf = scratch.f32_buffer(vocab);
                            half::slice::HalfFloatSliceExt::convert_to_f32_slice(
                                &d[r * v..r * v + vocab],
                                buf,
                            );
                            // Reborrow through a raw pointer: `buf` lives in `scratch`, which
                            // `row` must not keep borrowed while `scratch` is passed on.
                            let (ptr, len) = (buf.as_ptr(), buf.len());
                            // SAFETY: the buffer is not resized until the next row.
                            unsafe { std::slice::from_raw_parts(ptr, len) }
                        }
                        _ => unreachable!(),
                    };
                    tails[j] = topk
                        .row(
                            row,
                            scratch,
                            &mut ids[j * k..(j + 1) * k],
                            &mut lps[j * k..(j + 1) * k],
                        )
                        .map_err(|nf| TeacherError::NonFinite {
                            window: i,
                            position: p,
                            token: nf.index,
                            value: nf.value,
                        })?;
                }
                Ok(())
            };
            let scratch = &mut self.scratch;
            let mut reduce = |data_f32: Option<&[f32]>, data_f16: Option<&[half::f16]>| {
                std::thread::scope(|scope| {
                    let threads: Vec<_> = rows
                        .chunks(per)
                        .zip(out.ids.chunks_mut(per * k))
                        .zip(out.logprobs.chunks_mut(per * k))
                        .zip(out.tail_logprob.chunks_mut(per))
                        .zip(scratch.iter_mut())
                        .map(|((((rs, ids), lps), tails), sc)| {
                            scope.spawn(move || {
                                reduce_rows(data_f32, data_f16, rs, ids, lps, tails, sc)
                            })
                        })
                        .collect();
                    // Joined in order, so the first error names the earliest bad position.
                    threads
                        .into_iter()
                        .map(|t| t.join().expect("top-k thread panicked: this is a bug"))
                        .fold(Ok(()), Result::and)
                })
            };
            if f16 {
                let (_, d) = logits
                    .try_extract_tensor::<half::f16>()
                    .map_err(|e| err(&e))?;
                reduce(None, Some(d))?;
            } else {
                let (_, d) = logits.try_extract_tensor::<f32>().map_err(|e| err(&e))?;
                reduce(Some(d), None)?;
            }
            self.seconds.1 += t1.elapsed().as_secs_f64();
        }
        Ok(out)
    }
}

fn check_logits_shape(dims: &[i64], batch: &Batch, vocab: usize) -> Result<usize, TeacherError> {
    if dims.len() != 3 || dims[0] as usize != batch.batch || dims[1] as usize != batch.len {
        return Err(TeacherError::Runtime(format!(
            "teacher returned logits of shape {dims:?} for a batch of [{}, {}]; expected [{}, {}, vocab]",
            batch.batch, batch.len, batch.batch, batch.len
        )));
    }
    let v = dims[2] as usize;
    if v < vocab {
        return Err(TeacherError::Runtime(format!(
            "model vocab {v} is smaller than the tokenizer vocab {vocab}: the tokenizer does not belong to this model; pass the teacher's own tokenizer.json"
        )));
    }
    Ok(v)
}

impl TeacherBackend for OrtTeacher {
    fn run(&mut self, batch: &Batch) -> Result<BatchTopK, TeacherError> {
        if let Some(v) = self.interface.logits_vocab {
            self.ensure_head(v)
                .map_err(|e| TeacherError::Runtime(e.to_string()))?;
        } else if self.opts.topk.uses_onnx(self.opts.device) {
            return Err(TeacherError::Runtime(
                "the model's logits have a dynamic vocab dimension; the ONNX top-k head needs it fixed: use --topk host".into(),
            ));
        }
        self.run_inner(batch)
    }

    fn timing(&self) -> Option<(f64, f64)> {
        (self.head.is_none()).then_some(self.seconds)
    }

    fn topk_name(&self) -> &'static str {
        if self.head.is_some() { "onnx" } else { "host" }
    }
}

/// Runs the teacher on `batch` and returns its full logits as f32 [batch, len, V] (the
/// reference path of the tests and the bare-inference benchmark).
pub fn full_logits(
    teacher: &mut OrtTeacher,
    batch: &Batch,
) -> Result<(Vec<usize>, Vec<f32>), OrtError> {
    let inputs = teacher.inputs(batch)?;
    let outputs = teacher.session.run(inputs).map_err(rt)?;
    let logits = &outputs["logits"];
    let dims: Vec<usize> = logits.shape().iter().map(|&d| d as usize).collect();
    let data = if teacher.interface.logits_f16 {
        logits
            .try_extract_tensor::<half::f16>()
            .map_err(rt)?
            .1
            .iter()
            .map(|v| v.to_f32())
            .collect()
    } else {
        logits.try_extract_tensor::<f32>().map_err(rt)?.1.to_vec()
    };
    Ok((dims, data))
}

/// Runs the session only (no reduction), for the overhead benchmark.
pub fn bare_run(teacher: &mut OrtTeacher, batch: &Batch) -> Result<usize, OrtError> {
    let inputs = teacher.inputs(batch)?;
    let outputs = teacher.session.run(inputs).map_err(rt)?;
    Ok(outputs["logits"].shape().iter().product::<i64>() as usize)
}

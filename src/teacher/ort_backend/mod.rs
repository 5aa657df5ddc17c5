//! The ONNX Runtime teacher backend (`ort` rc.15, ONNX Runtime loaded at run time).
//!
//! The model must have the Hugging Face Optimum `text-generation` interface: inputs
//! `input_ids` and `attention_mask` (int64 [batch, seq]), optionally `position_ids`,
//! `past_key_values.*` (fed empty) and `use_cache_branch` (fed false); output `logits`
//! [batch, seq, vocab] in f32 or f16. Anything else is refused with a message naming it.
//!
//! Split by reason to change: `library` (finding and loading ONNX Runtime), `interface`
//! (what the model's inputs and outputs must be), and here the session and the runner (feed
//! a batch, reduce the logits with the host top-k or the device head).

mod interface;
mod library;

pub use interface::{LogitsDtype, ModelInterface};
pub use library::{ORT_LIB_NAME, environment, resolve_library};

use super::backend::{Batch, BatchTopK, Device, TeacherBackend, TeacherError, TopKMode};
use super::host_topk::{HostTopK, Logits, SampleOptions};
use super::sample::uniforms;
use super::topk::entropy_measured_at;
use interface::{ExtraInput, check_interface};
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{DynValue, Tensor};
use std::path::{Path, PathBuf};

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

/// Settings for [`OrtTeacher::open`].
#[derive(Debug, Clone)]
pub struct OrtOptions {
    pub library: PathBuf,
    pub device: Device,
    pub threads: usize,
    pub topk_on: TopKMode,
    pub k: usize,
    pub temperature: f32,
    /// The cache's vocabulary (the tokenizer's): logits beyond it are dropped.
    pub vocab: usize,
    /// Draws for a `sample` or `hybrid` cache (`None`: top-k only).
    pub sampling: Option<SampleOptions>,
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
        .map_err(|e| rt(ort::Error::<()>::from(e)))?
        // Batches change shape (windows × padded length) from one run to the next, and a
        // memory pattern is planned and kept per shape: in a one-off measurement (toy
        // teacher, V = 152064, seq_len 2048, one window per batch) peak RSS was 7.5 GB with
        // it and 3.9 GB without, at the same speed.
        .with_memory_pattern(false)
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

/// The teacher: an ONNX Runtime session plus, when the reduction runs in ONNX, the head
/// session (top-k, entropy and the draws of a sampled cache).
pub struct OrtTeacher {
    session: Session,
    head: Option<Session>,
    interface: ModelInterface,
    opts: OrtOptions,
    device_mem: MemoryInfo<'static>,
    /// The host top-k (used when there is no head).
    host: HostTopK,
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
        let mut host = HostTopK::new(opts.k, opts.temperature, opts.threads);
        if let Some(s) = opts.sampling {
            host = host.with_sampling(s);
        }
        Ok(OrtTeacher {
            session,
            head: None,
            interface,
            opts,
            device_mem,
            host,
            seconds: (0.0, 0.0),
        })
    }

    pub fn interface(&self) -> &ModelInterface {
        &self.interface
    }

    /// Fixes the vocabulary once it is known (after the interface check, or after the first
    /// batch for models with a dynamic vocab dim) and builds the top-k head if needed.
    fn ensure_head(&mut self, logits_vocab: usize) -> Result<(), OrtError> {
        if self.opts.topk_on.uses_onnx(self.opts.device) && self.head.is_none() {
            let env = environment(&self.opts.library)?;
            let bytes = super::head::head(&super::head::HeadSpec {
                logits_vocab,
                vocab: self.opts.vocab,
                k: self.opts.k,
                temperature: self.opts.temperature,
                f16: self.interface.logits == LogitsDtype::Float16,
                samples: self.opts.sampling.map_or(0, |s| s.samples),
                hybrid: self
                    .opts
                    .sampling
                    .is_some_and(|s| s.mode == crate::cache::schema::CacheMode::Hybrid),
                proposal_temperature: self.opts.sampling.map_or(1.0, |s| s.proposal_temperature),
            });
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
            tail_logprob: if k > 0 { vec![0.0; rows.len()] } else { vec![] },
            ..Default::default()
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
            let sampling = self.opts.sampling;
            if let Some(s) = sampling {
                // The host's uniforms of every row (0 at padding), below 1 in f32 too.
                let below_one = 1.0 - f32::EPSILON / 2.0;
                let mut u = vec![0f32; batch.batch * batch.len * s.samples];
                for &(i, p, r) in &rows {
                    for (dst, v) in u[r * s.samples..(r + 1) * s.samples]
                        .iter_mut()
                        .zip(uniforms(
                            s.seed,
                            (batch.seq_ids[i], p as u64),
                            s.samples,
                            s.scheme,
                        ))
                    {
                        *dst = (v as f32).min(below_one);
                    }
                }
                let u = Tensor::from_array(([batch.batch, batch.len, s.samples], u))
                    .map_err(|e| err(&e))?;
                hb.bind_input("uniforms", &u).map_err(|e| err(&e))?;
            }
            let cpu = MemoryInfo::new(
                AllocationDevice::CPU,
                0,
                AllocatorType::Device,
                MemoryType::CPUOutput,
            )
            .map_err(|e| err(&e))?;
            let mut names = vec!["entropy"];
            if k > 0 {
                names.extend(["topk_logprobs", "topk_ids", "tail_logprob"]);
            }
            let weighted = sampling.is_some_and(|s| s.proposal_temperature != 1.0);
            if sampling.is_some() {
                names.extend(["sample_ids", "sample_logprobs"]);
            }
            if weighted {
                names.push("sample_log_weights");
            }
            for name in names {
                hb.bind_output_to_device(name, &cpu).map_err(|e| err(&e))?;
            }
            let outs = head.run_binding(&hb).map_err(|e| err(&e))?;
            let f32s = |name: &str| {
                outs[name]
                    .try_extract_tensor::<f32>()
                    .map(|t| t.1)
                    .map_err(|e| err(&e))
            };
            let i64s = |name: &str| {
                outs[name]
                    .try_extract_tensor::<i64>()
                    .map(|t| t.1)
                    .map_err(|e| err(&e))
            };
            let entropy = f32s("entropy")?;
            out.entropy = rows
                .iter()
                .map(|&(i, p, r)| {
                    if entropy_measured_at(batch.seq_ids[i], p as u64) {
                        entropy[r]
                    } else {
                        f32::NAN
                    }
                })
                .collect();
            if k > 0 {
                let (lp, ids, tail) = (
                    f32s("topk_logprobs")?,
                    i64s("topk_ids")?,
                    f32s("tail_logprob")?,
                );
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
            }
            if let Some(s) = sampling {
                let (ids, lps) = (i64s("sample_ids")?, f32s("sample_logprobs")?);
                let lws = if weighted {
                    Some(f32s("sample_log_weights")?)
                } else {
                    None
                };
                let hybrid = s.mode == crate::cache::schema::CacheMode::Hybrid;
                let mut drawn: Vec<(u32, f32, f32)> = Vec::with_capacity(s.samples);
                for (o, &(_, _, r)) in rows.iter().enumerate() {
                    let before = out.sample_ids.len();
                    // A hybrid without a tail (the top-k is every id) draws nothing.
                    if !(hybrid && out.tail_logprob[o] == f32::NEG_INFINITY) {
                        drawn.clear();
                        let at = r * s.samples..(r + 1) * s.samples;
                        drawn.extend(
                            ids[at.clone()]
                                .iter()
                                .zip(&lps[at.clone()])
                                .enumerate()
                                .map(|(j, (&i, &lp))| {
                                    (i as u32, lp, lws.as_ref().map_or(0.0, |w| w[at.start + j]))
                                }),
                        );
                        drawn.sort_unstable_by_key(|d| d.0);
                        for &(id, lp, lw) in &drawn {
                            if out.sample_ids.len() > before && out.sample_ids.last() == Some(&id) {
                                *out.sample_counts.last_mut().expect("a count per id") += 1;
                            } else {
                                out.sample_ids.push(id);
                                out.sample_counts.push(1);
                                if s.store_logprobs {
                                    out.sample_logprobs.push(lp);
                                }
                                if weighted {
                                    out.sample_log_weights.push(lw);
                                }
                            }
                        }
                    }
                    out.sample_lens.push((out.sample_ids.len() - before) as u32);
                }
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
            let logits = match self.interface.logits {
                LogitsDtype::Float16 => Logits::F16(
                    logits
                        .try_extract_tensor::<half::f16>()
                        .map_err(|e| err(&e))?
                        .1,
                ),
                LogitsDtype::Float32 => {
                    Logits::F32(logits.try_extract_tensor::<f32>().map_err(|e| err(&e))?.1)
                }
            };
            self.host
                .reduce(logits, v, vocab, &rows, &batch.seq_ids, &mut out)?;
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
        } else if self.opts.topk_on.uses_onnx(self.opts.device) {
            return Err(TeacherError::Runtime(
                "the model's logits have a dynamic vocab dimension; the ONNX top-k head needs it fixed: use --topk-on host".into(),
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
/// reference path of the tests and the bare-inference benchmark; not part of the public API).
#[doc(hidden)]
pub fn full_logits(
    teacher: &mut OrtTeacher,
    batch: &Batch,
) -> Result<(Vec<usize>, Vec<f32>), OrtError> {
    let inputs = teacher.inputs(batch)?;
    let outputs = teacher.session.run(inputs).map_err(rt)?;
    let logits = &outputs["logits"];
    let dims: Vec<usize> = logits.shape().iter().map(|&d| d as usize).collect();
    let data = if teacher.interface.logits == LogitsDtype::Float16 {
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

/// Runs the session only (no reduction), for the overhead benchmark (not part of the public
/// API).
#[doc(hidden)]
pub fn bare_run(teacher: &mut OrtTeacher, batch: &Batch) -> Result<usize, OrtError> {
    let inputs = teacher.inputs(batch)?;
    let outputs = teacher.session.run(inputs).map_err(rt)?;
    Ok(outputs["logits"].shape().iter().product::<i64>() as usize)
}

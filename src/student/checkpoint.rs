//! A run's checkpoint: student weights in Hugging Face `LlamaForCausalLM` layout
//! (`model.safetensors`, metadata `format: pt`, names and `[out, in]` shapes as
//! transformers expects) and back, and the whole `RUN_DIR/checkpoint/` directory.
//!
//! `checkpoint/` holds the Hugging Face files (`model.safetensors`, `config.json`,
//! `tokenizer.json`), `train_config.json` ([`super::run_dir::TrainConfigFile`]) and `state/`:
//! the burn records of the model and optimizer and `trainer.json` ([`TrainerState`]: step,
//! data cursor), from which a run resumes exactly. [`save_checkpoint`] writes it all to
//! `checkpoint.tmp/` and renames it into place, so a crash leaves the previous checkpoint;
//! every file error names its path. `checksums.json`, written last, records the sha256 and
//! size of every other file; [`verify_checkpoint`] checks them wherever a checkpoint is read
//! (resume, `eval`, `export-onnx`, the pipeline), so a damaged or half-copied checkpoint is
//! refused, naming the file, instead of training or evaluating from garbage.
//!
//! ```no_run
//! use logitcache::student::checkpoint::RunCheckpoint;
//! # fn main() -> anyhow::Result<()> {
//! let run = RunCheckpoint::open("runs/micro".as_ref())?;
//! let model = run.model::<burn::backend::Flex>(&Default::default())?;
//! println!("{}: {} parameters", run.student.name, run.student.num_params());
//! # Ok(())
//! # }
//! ```

use super::arch::StudentConfig;
use super::config::TrainConfig;
use super::model::{Llama, hf_name};
use super::run_dir::TrainConfigFile;
use crate::cache::stream::Cursor;
use anyhow::{Context, bail};
use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param};
use burn::optim::Optimizer;
use burn::prelude::*;
use burn::record::{BurnRecord, FullPrecisionSettings, NamedMpkFileRecorder, Record, Recorder};
use burn::tensor::backend::AutodiffBackend;
use safetensors::{Dtype, tensor::TensorView};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

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

/// Reads a safetensors file into `name → (shape, values)`: float32 tensors as they are,
/// bfloat16 and float16 ones (as Hugging Face checkpoints often store them) widened to float32.
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, HfTensor>, CheckpointError> {
    use std::io::{Read, Seek, SeekFrom};
    let err = |why: String| CheckpointError::Read {
        path: path.display().to_string(),
        why,
    };
    // Tensor by tensor from the file (not the whole file in memory beside its float32
    // copy: that was twice the checkpoint at once). The format: an 8-byte little-endian
    // header length, a JSON header {name: {dtype, shape, data_offsets}}, then the data.
    let mut f = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let file_len = f.metadata().map_err(|e| err(e.to_string()))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|e| err(format!("not a safetensors file ({e})")))?;
    let n = u64::from_le_bytes(n);
    if n > 100 << 20 || 8 + n > file_len {
        return Err(err(format!(
            "not a safetensors file (its header length {n} does not fit the file's {file_len} bytes)"
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| err(e.to_string()))?;
    // The crate's own header type: it checks that the tensors' offsets tile the data and
    // that each holds its shape's bytes (`SafeTensors::read_metadata` wants the whole file).
    let meta: safetensors::tensor::Metadata = serde_json::from_slice(&header)
        .map_err(|e| err(format!("not a safetensors file (header: {e})")))?;
    let mut entries: Vec<_> = meta.tensors().into_iter().collect();
    entries.sort_by_key(|(_, t)| t.data_offsets.0);
    let data_start = 8 + n;
    let mut out = HashMap::new();
    let mut buf = Vec::new();
    for (name, t) in entries {
        if !matches!(t.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
            return Err(err(format!(
                "tensor {name} is {:?}; logitcache reads float32, bfloat16 and float16 weights",
                t.dtype
            )));
        }
        let (start, end) = t.data_offsets;
        if data_start + end as u64 > file_len {
            return Err(err(format!(
                "tensor {name}: its data ({start}..{end}) ends past the end of the file; the file is damaged or truncated"
            )));
        }
        buf.resize(end - start, 0);
        f.seek(SeekFrom::Start(data_start + start as u64))
            .and_then(|_| f.read_exact(&mut buf))
            .map_err(|e| err(e.to_string()))?;
        let v: Vec<f32> = match t.dtype {
            Dtype::F32 => buf
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::BF16 => buf
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            _ => buf
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        };
        out.insert(name, (t.shape.clone(), v));
    }
    Ok(out)
}

/// A Hugging Face `LlamaForCausalLM` checkpoint directory (`config.json` and
/// `model.safetensors`, or the sharded `model.safetensors.index.json` with its files), as
/// transformers' `save_pretrained` writes it: what `export-onnx` accepts besides run
/// directories, so a student trained elsewhere (e.g. in PyTorch) becomes a teacher.
#[derive(Debug, Clone)]
pub struct HfCheckpoint {
    pub dir: PathBuf,
    pub student: StudentConfig,
}

/// The sharded checkpoint's index: which file holds each tensor.
const HF_INDEX: &str = "model.safetensors.index.json";

impl HfCheckpoint {
    /// Whether `dir` looks like one: a `config.json`, and neither a run directory (with its
    /// `checkpoint/`) nor a run's `checkpoint/` itself (with `train_config.json`, whose
    /// checksums and lock only the run directory's path checks).
    pub fn is_one(dir: &Path) -> bool {
        dir.join("config.json").is_file()
            && !dir.join("checkpoint").exists()
            && !dir.join("checkpoint.old").exists()
            && !dir.join("train_config.json").exists()
            && !dir.join(CHECKSUMS).exists()
    }

    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let student = StudentConfig::from_hf_config(&dir.join("config.json"))?;
        if !dir.join("model.safetensors").is_file() && !dir.join(HF_INDEX).is_file() {
            bail!(
                "{} has a config.json but no model.safetensors (nor {HF_INDEX}); save the model with `save_pretrained(..., safe_serialization=True)`",
                dir.display()
            );
        }
        Ok(HfCheckpoint {
            dir: dir.to_path_buf(),
            student,
        })
    }

    /// The weights by Hugging Face name, from one file or every file the index names.
    pub fn weights(&self) -> Result<HashMap<String, HfTensor>, CheckpointError> {
        let single = self.dir.join("model.safetensors");
        if single.is_file() {
            return read_safetensors(&single);
        }
        let index = self.dir.join(HF_INDEX);
        let err = |why: String| CheckpointError::Read {
            path: index.display().to_string(),
            why,
        };
        let text = std::fs::read_to_string(&index).map_err(|e| err(e.to_string()))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        let map = v["weight_map"]
            .as_object()
            .ok_or_else(|| err("no `weight_map` object".into()))?;
        let mut files: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
        files.sort_unstable();
        files.dedup();
        let mut out = HashMap::new();
        for f in files {
            let mut parts = Path::new(f).components();
            if !matches!(
                (parts.next(), parts.next()),
                (Some(std::path::Component::Normal(_)), None)
            ) {
                return Err(err(format!(
                    "the weight file {f:?} is not a file name in the directory"
                )));
            }
            out.extend(read_safetensors(&self.dir.join(f))?);
        }
        if let Some(name) = map.keys().find(|k| !out.contains_key(*k)) {
            return Err(err(format!(
                "{name} is listed in the index but in none of its files"
            )));
        }
        Ok(out)
    }
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
    pub dir: PathBuf,
    pub student: StudentConfig,
    pub train: TrainConfig,
}

impl RunCheckpoint {
    /// Opens `run_dir` (a directory written by `logitcache train`, i.e. `OUT/<student>`).
    pub fn open(run_dir: &Path) -> anyhow::Result<Self> {
        Self::open_inner(run_dir).map_err(|e| {
            // A save swaps the checkpoint by renames: read while a `train` is running, it
            // can be missing or change under the reader, which is not damage.
            match crate::cache::lock::RunLock::holder(run_dir) {
                Some(holder) => e.context(format!(
                    "a `logitcache train` ({holder}) is writing {} now and its checkpoint changes while it saves; wait for the run to finish (or for its next save) and try again",
                    run_dir.display()
                )),
                None => e,
            }
        })
    }

    fn open_inner(run_dir: &Path) -> anyhow::Result<Self> {
        let dir = run_dir.join("checkpoint");
        if !dir.exists() && run_dir.join("checkpoint.old").exists() {
            bail!(
                "{}: a checkpoint save was interrupted (only checkpoint.old is left); run the same `logitcache train … --resume` to restore it and finish the run",
                run_dir.display()
            );
        }
        if dir.join("train_config.json").exists() || dir.join(CHECKSUMS).exists() {
            verify_checkpoint(&dir)?;
        }
        let bytes = std::fs::read(dir.join("train_config.json")).with_context(|| {
            format!(
                "{} is not a run directory written by `logitcache train` (no checkpoint/train_config.json); pass OUT/<student>",
                run_dir.display()
            )
        })?;
        let TrainConfigFile { train, student } =
            TrainConfigFile::parse(&bytes, &dir.join("train_config.json"))?;
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

/// Trainer state saved in `checkpoint/state/trainer.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    pub step: usize,
    pub cursor: Cursor,
    pub tokens: u64,
    pub seconds: f64,
    /// The checksum of the cache's manifest the run trains on (its identity: model, corpus,
    /// settings and every shard's sha256); absent in checkpoints written before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_manifest: Option<String>,
}

type Rec = NamedMpkFileRecorder<FullPrecisionSettings>;

/// `checkpoint/checksums.json`: the sha256 and size of every other checkpoint file.
pub const CHECKSUMS: &str = "checksums.json";

/// The files of a checkpoint, relative to it; `checksums.json` covers each of them.
pub const CHECKPOINT_FILES: [&str; 7] = [
    "model.safetensors",
    "config.json",
    "tokenizer.json",
    "train_config.json",
    "state/model.mpk",
    "state/optim.mpk",
    "state/trainer.json",
];

/// One file's entry in `checksums.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileSum {
    pub sha256: String,
    pub bytes: u64,
}

/// `checksums.json`: `{"files": {"model.safetensors": {"sha256": …, "bytes": …}, …}}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Checksums {
    pub files: BTreeMap<String, FileSum>,
}

/// Checks every file of checkpoint `dir` (`RUN_DIR/checkpoint`) against its
/// `checksums.json`: a missing, truncated or changed file is refused, naming it. A
/// checkpoint written before checksums were kept (no `checksums.json` but its other files
/// present) is accepted with a warning.
pub fn verify_checkpoint(dir: &Path) -> anyhow::Result<()> {
    let sums_path = dir.join(CHECKSUMS);
    let damaged = |what: String| {
        anyhow::anyhow!(
            "checkpoint {} is damaged: {what}; it cannot be trusted: resume from a copy made before the damage, or delete the run directory and train again",
            dir.display()
        )
    };
    let sums: Checksums = match std::fs::read(&sums_path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| damaged(format!("{CHECKSUMS} does not parse ({e})")))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(f) = CHECKPOINT_FILES.iter().find(|f| !dir.join(f).is_file()) {
                return Err(damaged(format!("{f} and {CHECKSUMS} are missing")));
            }
            tracing::warn!(
                "checkpoint {} has no {CHECKSUMS} (written by an older logitcache): its files are not verified",
                dir.display()
            );
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", sums_path.display())),
    };
    for f in CHECKPOINT_FILES {
        let want = sums
            .files
            .get(f)
            .ok_or_else(|| damaged(format!("{CHECKSUMS} does not list {f}")))?;
        let path = dir.join(f);
        let (sha, bytes) = match crate::util::sha256_file(&path) {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(damaged(format!("{f} is missing")));
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        if bytes != want.bytes {
            return Err(damaged(format!(
                "{f} has {bytes} bytes, {CHECKSUMS} records {}",
                want.bytes
            )));
        }
        if sha != want.sha256 {
            return Err(damaged(format!(
                "{f} has sha256 {sha}, {CHECKSUMS} records {}",
                want.sha256
            )));
        }
    }
    Ok(())
}

/// Puts back the checkpoint of a save that was interrupted between its two renames
/// (`checkpoint` moved to `checkpoint.old`, `checkpoint.tmp` not yet in place): returns
/// whether it did. Called by `train` under the run lock before it looks for a checkpoint.
pub fn recover_interrupted_save(run: &Path) -> anyhow::Result<bool> {
    let (dst, old) = (run.join("checkpoint"), run.join("checkpoint.old"));
    if !old.exists() {
        return Ok(false);
    }
    if dst.exists() {
        // Interrupted after the new checkpoint was in place: the old one is stale.
        std::fs::remove_dir_all(&old).with_context(|| format!("removing {}", old.display()))?;
        return Ok(false);
    }
    std::fs::rename(&old, &dst)
        .with_context(|| format!("moving {} back to {}", old.display(), dst.display()))?;
    crate::util::sync_dir(run).with_context(|| format!("syncing {}", run.display()))?;
    tracing::warn!(
        "{}: a checkpoint save was interrupted; restored the previous checkpoint",
        run.display()
    );
    Ok(true)
}

/// Writes `record` to `path` as [`Rec`] does (and reads back: the same named MessagePack
/// bytes), streamed through a buffer, but keeping the OS error of a failed write (a full
/// disk), which burn's recorder reduces to "error while writing multi-byte MessagePack
/// value" without the file.
fn write_record<B: Backend, R: Record<B>>(record: R, path: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    struct Kept<W> {
        inner: W,
        error: Option<std::io::Error>,
    }
    impl<W: Write> Kept<W> {
        fn keep<T>(&mut self, r: std::io::Result<T>) -> std::io::Result<T> {
            if let Err(e) = &r
                && self.error.is_none()
            {
                self.error = Some(match e.raw_os_error() {
                    Some(code) => std::io::Error::from_raw_os_error(code),
                    None => std::io::Error::new(e.kind(), e.to_string()),
                });
            }
            r
        }
    }
    impl<W: Write> Write for Kept<W> {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let r = self.inner.write(b);
            self.keep(r)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            let r = self.inner.flush();
            self.keep(r)
        }
    }
    let item = BurnRecord::<_, B>::new::<Rec>(record.into_item::<FullPrecisionSettings>());
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = Kept {
        inner: std::io::BufWriter::new(file),
        error: None,
    };
    let encoded = rmp_serde::encode::write_named(&mut w, &item);
    let flushed = w.flush();
    if let Some(e) = w.error.take() {
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    encoded.with_context(|| format!("writing {}", path.display()))?;
    flushed.with_context(|| format!("writing {}", path.display()))
}

fn write_file(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// Writes `run/checkpoint/` (see the module docs) for `model`, `optim` and `state`:
/// everything goes to `run/checkpoint.tmp/`, is fsynced, and replaces the old checkpoint
/// by renames.
pub fn save_checkpoint<B: AutodiffBackend, O: Optimizer<Llama<B>, B>>(
    run: &Path,
    model: &Llama<B>,
    optim: &O,
    student: &StudentConfig,
    cfg: &TrainConfig,
    state: &TrainerState,
) -> anyhow::Result<()> {
    let tmp = run.join("checkpoint.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    let state_dir = tmp.join("state");
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let inner = model.valid();
    save_safetensors(&inner, &tmp.join("model.safetensors"))?;
    let tok = crate::tokenizer::load(&cfg.tokenizer)?;
    let bos = tok.tokenizer.token_to_id("<s>");
    let eos = tok.tokenizer.token_to_id("</s>");
    write_file(
        &tmp.join("config.json"),
        &serde_json::to_vec_pretty(&student.hf_config_json(bos, eos))?,
    )?;
    let tok_dst = tmp.join("tokenizer.json");
    std::fs::copy(&cfg.tokenizer, &tok_dst).with_context(|| {
        format!(
            "copying {} to {}",
            cfg.tokenizer.display(),
            tok_dst.display()
        )
    })?;
    let file = TrainConfigFile {
        train: cfg.clone(),
        student: student.clone(),
    };
    write_file(&tmp.join("train_config.json"), &file.to_json()?)?;
    write_record::<B, _>(model.clone().into_record(), &state_dir.join("model.mpk"))
        .context("saving the model state")?;
    write_record::<B, _>(optim.to_record(), &state_dir.join("optim.mpk"))
        .context("saving the optimizer state")?;
    write_file(
        &state_dir.join("trainer.json"),
        &serde_json::to_vec_pretty(state)?,
    )?;
    let mut files = BTreeMap::new();
    for f in CHECKPOINT_FILES {
        let path = tmp.join(f);
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("syncing {}", path.display()))?;
        let (sha256, bytes) = crate::util::sha256_file(&path)
            .with_context(|| format!("hashing {}", path.display()))?;
        files.insert(f.to_string(), FileSum { sha256, bytes });
    }
    // Last: a checkpoint whose checksums.json exists is complete.
    crate::util::write_atomic(
        &tmp.join(CHECKSUMS),
        &serde_json::to_vec_pretty(&Checksums { files })?,
    )
    .with_context(|| format!("writing {}", tmp.join(CHECKSUMS).display()))?;
    crate::util::sync_dir(&state_dir)
        .with_context(|| format!("syncing {}", state_dir.display()))?;
    let dst = run.join("checkpoint");
    let old = run.join("checkpoint.old");
    let _ = std::fs::remove_dir_all(&old);
    if dst.exists() {
        std::fs::rename(&dst, &old)
            .with_context(|| format!("moving {} to {}", dst.display(), old.display()))?;
    }
    crate::util::failpoint("checkpoint-swap");
    std::fs::rename(&tmp, &dst)
        .with_context(|| format!("moving {} to {}", tmp.display(), dst.display()))?;
    crate::util::sync_dir(run).with_context(|| format!("syncing {}", run.display()))?;
    let _ = std::fs::remove_dir_all(&old);
    crate::util::failpoint("checkpoint-saved");
    Ok(())
}

/// Reads the training state of checkpoint `ckpt` (`RUN_DIR/checkpoint`) into `model` and
/// `optim`, for `--resume`; a damaged file is named, with the way out.
pub fn load_state<B: AutodiffBackend, O: Optimizer<Llama<B>, B>>(
    ckpt: &Path,
    model: Llama<B>,
    optim: O,
    dev: &B::Device,
) -> anyhow::Result<(Llama<B>, O, TrainerState)> {
    let bad = |what: &str, e: String| {
        anyhow::anyhow!(
            "cannot resume from {}: {what} is damaged ({e}); delete the run directory to start over",
            ckpt.display()
        )
    };
    let trainer = ckpt.join("state/trainer.json");
    let state: TrainerState = serde_json::from_slice(
        &std::fs::read(&trainer).with_context(|| format!("reading {}", trainer.display()))?,
    )
    .map_err(|e| bad("state/trainer.json", e.to_string()))?;
    let rec = Rec::new();
    let mrec = Recorder::<B>::load(&rec, ckpt.join("state/model"), dev)
        .map_err(|e| bad("state/model.mpk", e.to_string()))?;
    let model = model.load_record(mrec);
    let orec = Recorder::<B>::load(&rec, ckpt.join("state/optim"), dev)
        .map_err(|e| bad("state/optim.mpk", e.to_string()))?;
    let optim = optim.load_record(orec);
    Ok((model, optim, state))
}

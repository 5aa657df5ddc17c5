//! Training students from a cache: AdamW (PyTorch defaults), warmup + cosine schedule,
//! global-norm gradient clipping, gradient accumulation, a chunked loss, evaluation on the
//! held-out split, `metrics.jsonl`, and checkpoints that resume exactly.
//!
//! A run directory holds `checkpoint/` (Hugging Face files: `model.safetensors`,
//! `config.json`, `tokenizer.json`; plus `train_config.json` and `state/` with the burn
//! records of the model and optimizer and `trainer.json` with the step and data cursor) and
//! `metrics.jsonl`.

use super::checkpoint::save_safetensors;
use super::config::StudentConfig;
use super::device::TrainDevice;
use super::model::Llama;
use crate::cache::reader::Cache;
use crate::cache::stream::{Cursor, Split, Stream, StreamConfig, TrainBatch};
use crate::loss::{KdLoss, LossConfig, Targets, divergence, loss};
use crate::progress::ProgressMode;
use anyhow::{Context, bail};
use burn::backend::{Autodiff, Flex};
use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::prelude::*;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::backend::AutodiffBackend;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The CPU training backend.
pub type CpuBackend = Autodiff<Flex>;

pub const DEFAULT_LR: f64 = 1e-3;
pub const DEFAULT_STEPS: usize = 1000;
pub const DEFAULT_BATCH_SIZE: usize = 8;
pub const DEFAULT_WARMUP: usize = 100;
pub const DEFAULT_GRAD_CLIP: f64 = 1.0;
/// AdamW defaults of PyTorch (burn's differ: eps 1e-5, weight decay 1e-4).
pub const DEFAULT_BETA1: f64 = 0.9;
pub const DEFAULT_BETA2: f64 = 0.999;
pub const DEFAULT_EPS: f64 = 1e-8;
pub const DEFAULT_WEIGHT_DECAY: f64 = 0.01;
pub const DEFAULT_EVAL_FRACTION: f64 = 0.02;
/// Positions per loss chunk (0 = whole batch at once).
pub const DEFAULT_LOSS_CHUNK: usize = 1024;

/// Everything one `train` run needs (per student), saved as `train_config.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    pub cache: PathBuf,
    pub tokenizer: PathBuf,
    pub out: PathBuf,
    pub steps: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup: usize,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub grad_clip: f64,
    pub loss: LossConfig,
    pub seed: u64,
    pub eval_every: usize,
    pub eval_batches: usize,
    pub eval_fraction: f64,
    pub save_every: usize,
    pub log_every: usize,
    pub loss_chunk: usize,
    pub device: String,
    #[serde(skip)]
    pub progress: Option<ProgressMode>,
    /// Stop (with a checkpoint) after this step.
    #[serde(skip)]
    pub stop_after: Option<usize>,
}

impl TrainConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.steps == 0 || self.batch_size == 0 || self.grad_accum == 0 {
            bail!("--steps, --batch-size and --grad-accum must be at least 1");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            bail!("--lr must be a finite number > 0 (got {})", self.lr);
        }
        if self.loss.temperature.is_nan() || self.loss.temperature <= 0.0 {
            bail!("--temperature must be > 0");
        }
        if !(0.0..1.0).contains(&self.eval_fraction) {
            bail!(
                "--eval-fraction must be in [0, 1) (got {})",
                self.eval_fraction
            );
        }
        if self.loss.kind != KdLoss::Ce && self.loss.kd_weight == 0.0 && self.loss.ce_weight == 0.0
        {
            bail!("--kd-weight and --ce-weight are both 0: nothing to train on");
        }
        if !(self.loss.jsd_beta > 0.0 && self.loss.jsd_beta < 1.0) {
            bail!("--jsd-beta must be in (0, 1)");
        }
        TrainDevice::parse(&self.device)?;
        Ok(())
    }

    /// Learning rate at `step` (0-based): linear warmup, then cosine to `min_lr`.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = (self.steps - self.warmup.min(self.steps)).max(1) as f64;
        let t = ((step - self.warmup) as f64 / span).min(1.0);
        self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

/// Trainer state saved in `checkpoint/state/trainer.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    pub step: usize,
    pub cursor: Cursor,
    pub tokens: u64,
    pub seconds: f64,
}

/// Metrics of an evaluation pass.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalMetrics {
    pub eval_loss: f64,
    pub eval_ppl: f64,
    pub eval_kl: f64,
    pub eval_top1: f64,
    pub eval_tokens: u64,
}

fn to_targets<B: Backend>(b: &TrainBatch, dev: &B::Device) -> Targets<B> {
    let n = b.batch * b.len;
    let int1 = |v: &[u32]| {
        Tensor::<B, 1, Int>::from_data(
            TensorData::new(v.iter().map(|&x| x as i64).collect::<Vec<_>>(), [v.len()]),
            dev,
        )
    };
    let f1 = |v: &[f32]| Tensor::<B, 1>::from_data(TensorData::new(v.to_vec(), [v.len()]), dev);
    Targets {
        topk_ids: int1(&b.topk_ids).reshape([n, b.k]),
        topk_logprobs: f1(&b.topk_logprobs).reshape([n, b.k]),
        tail_logprob: f1(&b.tail_logprob),
        mask: f1(&b.mask),
        target_ids: int1(&b.target_ids),
        target_mask: f1(&b.target_mask),
    }
}

fn inputs<B: Backend>(b: &TrainBatch, dev: &B::Device) -> (Tensor<B, 2, Int>, Tensor<B, 2>) {
    let ids = Tensor::<B, 1, Int>::from_data(
        TensorData::new(
            b.input_ids.iter().map(|&x| x as i64).collect::<Vec<_>>(),
            [b.input_ids.len()],
        ),
        dev,
    )
    .reshape([b.batch, b.len]);
    let mask = Tensor::<B, 1>::from_data(TensorData::new(b.mask.clone(), [b.mask.len()]), dev)
        .reshape([b.batch, b.len]);
    (ids, mask)
}

/// Loss and gradients of one batch. With `chunk > 0` the vocabulary projection and the loss
/// run `chunk` positions at a time, each with its own backward pass, so the `[positions,
/// vocab]` logits never exist whole; the trunk then gets the summed gradient of its output
/// through one more backward pass (of `sum(h · dL/dh)`).
pub fn loss_and_grads<B: AutodiffBackend>(
    model: &Llama<B>,
    b: &TrainBatch,
    cfg: &LossConfig,
    chunk: usize,
    scale: f64,
) -> (f64, f64, f64, GradientsParams) {
    let dev = model.embed_tokens.device();
    let (ids, mask) = inputs::<B>(b, &dev);
    let t = to_targets::<B>(b, &dev);
    let n = b.batch * b.len;
    let counts = (
        b.mask.iter().map(|&m| m as f64).sum::<f64>(),
        b.target_mask.iter().map(|&m| m as f64).sum::<f64>(),
    );
    let h = model
        .hidden(ids, mask)
        .reshape([n, model.embed_tokens.dims()[1]]);
    if chunk == 0 || chunk >= n {
        let logits = h.matmul(model.head_weight());
        let parts = loss(logits, &t, cfg, Some(counts));
        let (kd, ce) = (
            parts.kd.into_scalar().elem::<f64>(),
            parts.ce.into_scalar().elem::<f64>(),
        );
        let total = parts.total.clone().into_scalar().elem::<f64>();
        let grads = (parts.total * scale).backward();
        return (total, kd, ce, GradientsParams::from_grads(grads, model));
    }
    let hd = h.clone().detach().require_grad();
    let mut acc = GradientsAccumulator::<Llama<B>>::new();
    let mut dh: Option<Tensor<B::InnerBackend, 2>> = None;
    let (mut total, mut kd, mut ce) = (0.0, 0.0, 0.0);
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let logits = hd.clone().narrow(0, start, len).matmul(model.head_weight());
        let parts = loss(logits, &t.narrow(start, len), cfg, Some(counts));
        total += parts.total.clone().into_scalar().elem::<f64>();
        kd += parts.kd.into_scalar().elem::<f64>();
        ce += parts.ce.into_scalar().elem::<f64>();
        let grads = (parts.total * scale).backward();
        if let Some(g) = hd.grad(&grads) {
            dh = Some(match dh {
                Some(a) => a + g,
                None => g,
            });
        }
        acc.accumulate(model, GradientsParams::from_grads(grads, model));
        start += len;
    }
    if let Some(g) = dh {
        let surrogate = (h * Tensor::<B, 2>::from_inner(g)).sum();
        acc.accumulate(
            model,
            GradientsParams::from_grads(surrogate.backward(), model),
        );
    }
    (total, kd, ce, acc.grads())
}

struct SquaredNorm<'a> {
    grads: &'a GradientsParams,
    sum: f64,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for SquaredNorm<'_> {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.get::<B::InnerBackend, D>(p.id) {
            self.sum += g.square().sum().into_scalar().elem::<f64>();
        }
    }
}

struct ScaleGrads<'a> {
    grads: &'a mut GradientsParams,
    factor: f64,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for ScaleGrads<'_> {
    fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
        if let Some(g) = self.grads.remove::<B::InnerBackend, D>(p.id) {
            self.grads
                .register::<B::InnerBackend, D>(p.id, g.mul_scalar(self.factor));
        }
    }
}

/// Clips the gradients to global L2 norm `max` (PyTorch `clip_grad_norm_`); returns the
/// norm before clipping.
fn clip_global<B: AutodiffBackend>(model: &Llama<B>, grads: &mut GradientsParams, max: f64) -> f64 {
    let mut n = SquaredNorm { grads, sum: 0.0 };
    model.visit(&mut n);
    let norm = n.sum.sqrt();
    if max > 0.0 && norm > max {
        model.visit(&mut ScaleGrads {
            grads,
            factor: max / (norm + 1e-6),
        });
    }
    norm
}

/// Evaluates `model` on up to `max_batches` batches of the eval split.
pub fn evaluate<B: Backend>(
    model: &Llama<B>,
    cache: &Cache,
    eval_fraction: f64,
    batch_size: usize,
    max_batches: usize,
    loss_cfg: &LossConfig,
) -> anyhow::Result<EvalMetrics> {
    let dev = model.embed_tokens.device();
    let (split, frac) = if eval_fraction > 0.0 {
        (Split::Eval, eval_fraction)
    } else {
        (Split::All, 0.0)
    };
    let stream = Stream::start(
        cache,
        StreamConfig {
            batch_size,
            shuffle: false,
            split,
            eval_fraction: frac,
            ..Default::default()
        },
    )?;
    let (mut ce, mut kl, mut top1, mut n_ce, mut n_kd) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for b in stream.take(max_batches.max(1)) {
        let b = b?;
        let (ids, mask) = inputs::<B>(&b, &dev);
        let t = to_targets::<B>(&b, &dev);
        let n = b.batch * b.len;
        let logits = model.forward(ids, mask).reshape([n, model.vocab_size()]);
        let ce_rows = crate::loss::cross_entropy(logits.clone(), t.target_ids.clone()).reshape([n]);
        ce += (ce_rows * t.target_mask.clone())
            .sum()
            .into_scalar()
            .elem::<f64>();
        let kl_cfg = LossConfig {
            kind: KdLoss::Fkl,
            ..*loss_cfg
        };
        let d = divergence(logits.clone(), &t, &kl_cfg).reshape([n]);
        kl += (d * t.mask.clone()).sum().into_scalar().elem::<f64>();
        let arg: Vec<i64> = logits
            .argmax(1)
            .into_data()
            .convert::<i64>()
            .into_vec()
            .expect("int data");
        for (i, &a) in arg.iter().enumerate() {
            if b.mask[i] > 0.0 {
                top1 += (a as u32 == b.topk_ids[i * b.k]) as u64 as f64;
            }
        }
        n_ce += b.target_mask.iter().map(|&m| m as f64).sum::<f64>();
        n_kd += b.mask.iter().map(|&m| m as f64).sum::<f64>();
    }
    if n_kd == 0.0 {
        bail!("the eval split is empty; raise --eval-fraction or use a larger cache");
    }
    let eval_loss = ce / n_ce.max(1.0);
    Ok(EvalMetrics {
        eval_loss,
        eval_ppl: eval_loss.exp(),
        eval_kl: kl / n_kd,
        eval_top1: top1 / n_kd,
        eval_tokens: n_kd as u64,
    })
}

type Rec = NamedMpkFileRecorder<FullPrecisionSettings>;

fn save_checkpoint<B: AutodiffBackend, O: Optimizer<Llama<B>, B>>(
    run: &Path,
    model: &Llama<B>,
    optim: &O,
    student: &StudentConfig,
    cfg: &TrainConfig,
    state: &TrainerState,
) -> anyhow::Result<()> {
    let tmp = run.join("checkpoint.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(tmp.join("state"))?;
    let inner = model.valid();
    save_safetensors(&inner, &tmp.join("model.safetensors"))?;
    let tok = crate::tokenizer::load(&cfg.tokenizer)?;
    let bos = tok.tokenizer.token_to_id("<s>");
    let eos = tok.tokenizer.token_to_id("</s>");
    std::fs::write(
        tmp.join("config.json"),
        serde_json::to_vec_pretty(&student.hf_config_json(bos, eos))?,
    )?;
    std::fs::copy(&cfg.tokenizer, tmp.join("tokenizer.json"))
        .with_context(|| format!("copying {}", cfg.tokenizer.display()))?;
    std::fs::write(
        tmp.join("train_config.json"),
        serde_json::to_vec_pretty(&serde_json::json!({"train": cfg, "student": student}))?,
    )?;
    let rec = Rec::new();
    Recorder::<B>::record(&rec, model.clone().into_record(), tmp.join("state/model"))
        .map_err(|e| anyhow::anyhow!("saving the model state: {e}"))?;
    Recorder::<B>::record(&rec, optim.to_record(), tmp.join("state/optim"))
        .map_err(|e| anyhow::anyhow!("saving the optimizer state: {e}"))?;
    std::fs::write(
        tmp.join("state/trainer.json"),
        serde_json::to_vec_pretty(state)?,
    )?;
    for f in [
        "model.safetensors",
        "state/model.mpk",
        "state/optim.mpk",
        "state/trainer.json",
        "config.json",
    ] {
        std::fs::File::open(tmp.join(f))?.sync_all()?;
    }
    let dst = run.join("checkpoint");
    let old = run.join("checkpoint.old");
    let _ = std::fs::remove_dir_all(&old);
    if dst.exists() {
        std::fs::rename(&dst, &old)?;
    }
    std::fs::rename(&tmp, &dst)?;
    crate::util::sync_dir(run)?;
    let _ = std::fs::remove_dir_all(&old);
    crate::util::failpoint("checkpoint-saved");
    Ok(())
}

/// What a finished run reports.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub student: String,
    pub params: usize,
    pub run_dir: PathBuf,
    pub steps: usize,
    pub tokens: u64,
    pub tokens_per_s: f64,
    pub final_loss: f64,
    pub eval: Option<EvalMetrics>,
    pub peak_rss_mib: f64,
}

/// Peak resident memory of this process, MiB.
pub fn peak_rss_mib() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    u.ru_maxrss as f64 / 1024.0
}

/// Warns when the cache's top-k holds little of the teacher's mass: with the tail as one
/// outcome and no CE term, the student learns nothing about which tail token comes next.
/// Looks at the first shard only.
fn warn_if_tail_heavy(cache: &Cache) {
    let Some(first) = cache.manifest.shards.first() else {
        return;
    };
    let Ok(rows) = cache.read_shard(first) else {
        return;
    };
    if rows.tail_logprob.is_empty() {
        return;
    }
    let mass = rows
        .tail_logprob
        .iter()
        .map(|&t| 1.0 - (t as f64).exp())
        .sum::<f64>()
        / rows.tail_logprob.len() as f64;
    if mass < 0.9 {
        tracing::warn!(
            "the teacher's top-{} holds only {:.0}% of its probability mass on average (first shard); with --ce-weight 0 the student never learns which of the other tokens are likely, and can end up worse than CE alone: add --ce-weight 1 (the usual recipe) or build the cache with a larger --top-k",
            cache.manifest.params.top_k,
            mass * 100.0
        );
    }
}

/// Trains one student from `cache` into `cfg.out/<student name>`, on `cfg.device`.
pub fn train_student(
    cache: &Cache,
    student: &StudentConfig,
    cfg: &TrainConfig,
    resume: bool,
) -> anyhow::Result<RunResult> {
    match TrainDevice::parse(&cfg.device)? {
        TrainDevice::Cpu => {
            train_on::<CpuBackend>(cache, student, cfg, resume, &Default::default())
        }
        TrainDevice::Cuda(index) => {
            #[cfg(feature = "cuda")]
            {
                super::device::check_cuda(index)?;
                train_on::<GpuBackend>(
                    cache,
                    student,
                    cfg,
                    resume,
                    &burn::backend::cuda::CudaDevice::new(index),
                )
            }
            #[cfg(not(feature = "cuda"))]
            bail!(
                "--device cuda:{index}: this build of logitcache has no GPU training; rebuild with `cargo build --release --features cuda`"
            )
        }
    }
}

/// The GPU training backend (CUDA, found at run time).
#[cfg(feature = "cuda")]
pub type GpuBackend = Autodiff<burn::backend::Cuda>;

fn train_on<B: AutodiffBackend>(
    cache: &Cache,
    student: &StudentConfig,
    cfg: &TrainConfig,
    resume: bool,
    dev: &B::Device,
) -> anyhow::Result<RunResult> {
    let m = &cache.manifest;
    cache.check_tokenizer(&cfg.tokenizer)?;
    if student.vocab_size < m.vocab_size {
        bail!(
            "student {} has vocab_size {} but the cache's token ids go up to {} (vocab {}); set vocab_size ≥ {} (or leave it out to use the cache's)",
            student.name,
            student.vocab_size,
            m.vocab_size - 1,
            m.vocab_size,
            m.vocab_size
        );
    }
    if (cfg.loss.temperature as f32 - m.params.temperature).abs() > 1e-6
        && cfg.loss.kind != KdLoss::Ce
    {
        bail!(
            "--temperature {} differs from the cache's {} (its log-probs are at that temperature); pass --temperature {} or build a cache at {}",
            cfg.loss.temperature,
            m.params.temperature,
            m.params.temperature,
            cfg.loss.temperature
        );
    }
    if cfg.loss.kind != KdLoss::Ce && cfg.loss.ce_weight == 0.0 {
        warn_if_tail_heavy(cache);
    }
    let run = cfg.out.join(&student.name);
    let ckpt = run.join("checkpoint");
    let adamw = AdamWConfig::new()
        .with_beta_1(cfg.beta1 as f32)
        .with_beta_2(cfg.beta2 as f32)
        .with_epsilon(cfg.eps as f32)
        .with_weight_decay(cfg.weight_decay as f32);
    let mut optim = adamw.init::<B, Llama<B>>();
    let mut model = Llama::<B>::init(student, cfg.seed, dev);
    let mut state = TrainerState {
        step: 0,
        cursor: Cursor::default(),
        tokens: 0,
        seconds: 0.0,
    };
    if resume {
        if !ckpt.join("state/trainer.json").exists() {
            bail!(
                "--resume: {} has no checkpoint to resume from; drop --resume to start",
                run.display()
            );
        }
        let bad = |what: &str, e: String| {
            anyhow::anyhow!(
                "cannot resume from {}: {what} is damaged ({e}); delete the run directory to start over",
                ckpt.display()
            )
        };
        state = serde_json::from_slice(&std::fs::read(ckpt.join("state/trainer.json"))?)
            .map_err(|e| bad("state/trainer.json", e.to_string()))?;
        let rec = Rec::new();
        let mrec = Recorder::<B>::load(&rec, ckpt.join("state/model"), dev)
            .map_err(|e| bad("state/model.mpk", e.to_string()))?;
        model = model.load_record(mrec);
        let orec = Recorder::<B>::load(&rec, ckpt.join("state/optim"), dev)
            .map_err(|e| bad("state/optim.mpk", e.to_string()))?;
        optim = optim.load_record(orec);
        if state.step > cfg.steps {
            bail!(
                "--resume: the checkpoint is at step {}, beyond --steps {}",
                state.step,
                cfg.steps
            );
        }
    } else if ckpt.exists() {
        bail!(
            "{} already holds a trained checkpoint; pass --resume to continue it, or choose another --out",
            run.display()
        );
    }
    std::fs::create_dir_all(&run).with_context(|| format!("creating {}", run.display()))?;
    // metrics.jsonl: keep what precedes the resumed step.
    let metrics_path = run.join("metrics.jsonl");
    let kept: Vec<String> = std::fs::read_to_string(&metrics_path)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| (s as usize) <= state.step)
        })
        .map(String::from)
        .collect();
    let mut metrics = std::fs::File::create(&metrics_path)?;
    for l in &kept {
        writeln!(metrics, "{l}")?;
    }
    let mut stream = Stream::start(
        cache,
        StreamConfig {
            batch_size: cfg.batch_size,
            seed: cfg.seed,
            epochs: None,
            split: if cfg.eval_fraction > 0.0 {
                Split::Train
            } else {
                Split::All
            },
            eval_fraction: cfg.eval_fraction,
            start: state.cursor,
            ..Default::default()
        },
    )?;
    let progress = cfg.progress.unwrap_or(ProgressMode::Off);
    let bar = (progress == ProgressMode::Bar).then(|| {
        let b = indicatif::ProgressBar::with_draw_target(
            Some(cfg.steps as u64),
            indicatif::ProgressDrawTarget::stderr(),
        );
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} {elapsed_precise} [{bar:30}] step {pos}/{len} {msg}",
            )
            .expect("template"),
        );
        b.set_prefix(student.name.clone());
        b.set_position(state.step as u64);
        b
    });
    let emit = |metrics: &mut std::fs::File, v: serde_json::Value| -> anyhow::Result<()> {
        writeln!(metrics, "{v}")?;
        metrics.flush()?;
        if progress == ProgressMode::Json {
            println!("{v}");
        }
        Ok(())
    };
    let run_eval = |model: &Llama<B>, metrics: &mut std::fs::File, step: usize| {
        let e = evaluate(
            &model.valid(),
            cache,
            cfg.eval_fraction,
            cfg.batch_size,
            cfg.eval_batches,
            &cfg.loss,
        )?;
        let mut line = serde_json::to_value(&e)?;
        line["step"] = step.into();
        emit(metrics, line)?;
        anyhow::Ok(e)
    };
    let t_start = Instant::now();
    let seconds0 = state.seconds;
    let mut last_loss = f64::NAN;
    let mut window = (Instant::now(), 0u64);
    let stop = cfg.stop_after.unwrap_or(cfg.steps).min(cfg.steps);
    while state.step < stop {
        let mut acc = GradientsAccumulator::<Llama<B>>::new();
        let (mut total, mut kd, mut ce) = (0.0, 0.0, 0.0);
        for _ in 0..cfg.grad_accum {
            let b = stream
                .next_batch()
                .context("the training stream ended unexpectedly")??;
            let (l, k, c, g) = loss_and_grads(
                &model,
                &b,
                &cfg.loss,
                cfg.loss_chunk,
                1.0 / cfg.grad_accum as f64,
            );
            total += l / cfg.grad_accum as f64;
            kd += k / cfg.grad_accum as f64;
            ce += c / cfg.grad_accum as f64;
            acc.accumulate(&model, g);
            state.tokens += b.tokens() as u64;
            window.1 += b.tokens() as u64;
            state.cursor = b.cursor;
        }
        if !total.is_finite() {
            bail!(
                "the loss became {total} at step {}; lower --lr (now {}) or check the cache with `logitcache verify`",
                state.step,
                cfg.lr
            );
        }
        let mut grads = acc.grads();
        let gnorm = clip_global(&model, &mut grads, cfg.grad_clip);
        let lr = cfg.lr_at(state.step);
        model = optim.step(lr, model, grads);
        state.step += 1;
        last_loss = total;
        if state.step.is_multiple_of(cfg.log_every.max(1)) || state.step == cfg.steps {
            let secs = window.0.elapsed().as_secs_f64().max(1e-9);
            emit(
                &mut metrics,
                serde_json::json!({
                    "step": state.step, "loss": total, "kd": kd, "ce": ce, "lr": lr, "grad_norm": gnorm,
                    "tokens": state.tokens, "tokens_per_s": window.1 as f64 / secs,
                }),
            )?;
            if let Some(b) = &bar {
                b.set_position(state.step as u64);
                b.set_message(format!(
                    "loss {total:.4}  {:.0} tok/s",
                    window.1 as f64 / secs
                ));
            }
            window = (Instant::now(), 0);
        }
        // (The last step's evaluation is the final one below.)
        if cfg.eval_every > 0
            && state.step.is_multiple_of(cfg.eval_every)
            && cfg.eval_fraction > 0.0
            && state.step < cfg.steps
        {
            run_eval(&model, &mut metrics, state.step)?;
        }
        if cfg.save_every > 0 && state.step.is_multiple_of(cfg.save_every) && state.step < cfg.steps
        {
            state.seconds = seconds0 + t_start.elapsed().as_secs_f64();
            save_checkpoint(&run, &model, &optim, student, cfg, &state)?;
        }
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    state.seconds = seconds0 + t_start.elapsed().as_secs_f64();
    save_checkpoint(&run, &model, &optim, student, cfg, &state)?;
    let eval = if cfg.eval_fraction > 0.0 && state.step == cfg.steps {
        Some(run_eval(&model, &mut metrics, state.step)?)
    } else {
        None
    };
    Ok(RunResult {
        student: student.name.clone(),
        params: student.num_params(),
        run_dir: run,
        steps: state.step,
        tokens: state.tokens,
        tokens_per_s: state.tokens as f64 / state.seconds.max(1e-9),
        final_loss: if last_loss.is_nan() { 0.0 } else { last_loss },
        eval,
        peak_rss_mib: peak_rss_mib(),
    })
}

/// Cross-entropy metrics of a corpus (no teacher).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CorpusEval {
    pub eval_loss: f64,
    pub eval_ppl: f64,
    pub eval_tokens: u64,
}

/// Evaluates next-token cross-entropy on a corpus, in windows of the model's
/// `max_position_embeddings` (at most 512), 8 windows a batch.
pub fn evaluate_corpus<B: Backend>(
    model: &Llama<B>,
    corpus: &[PathBuf],
    text_field: &str,
    tokenizer: &Path,
    max_batches: usize,
) -> anyhow::Result<CorpusEval> {
    let tok = crate::tokenizer::load(tokenizer)?;
    if tok.vocab_size > model.vocab_size() {
        bail!(
            "tokenizer {} has {} tokens, the student only {}",
            tokenizer.display(),
            tok.vocab_size,
            model.vocab_size()
        );
    }
    let files = crate::corpus::discover(corpus)?;
    let mut windows: Vec<Vec<u32>> = Vec::new();
    let need = max_batches.max(1) * 8;
    crate::corpus::for_each_document(&files, text_field, false, |_, text| {
        if windows.len() < need {
            let enc = tok
                .tokenizer
                .encode(text.as_str(), true)
                .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
            windows.extend(
                enc.get_ids()
                    .chunks(512)
                    .filter(|c| c.len() > 1)
                    .map(|c| c.to_vec()),
            );
        }
        Ok(())
    })?;
    windows.truncate(need);
    if windows.is_empty() {
        bail!("the corpus has no text to evaluate on");
    }
    let dev = model.embed_tokens.device();
    let (mut ce, mut n) = (0.0, 0.0);
    for chunk in windows.chunks(8) {
        let len = chunk.iter().map(|w| w.len()).max().unwrap_or(0);
        let mut b = TrainBatch {
            batch: chunk.len(),
            len,
            k: 1,
            input_ids: vec![0; chunk.len() * len],
            target_ids: vec![0; chunk.len() * len],
            target_mask: vec![0.0; chunk.len() * len],
            mask: vec![0.0; chunk.len() * len],
            ..Default::default()
        };
        for (i, w) in chunk.iter().enumerate() {
            let o = i * len;
            b.input_ids[o..o + w.len()].copy_from_slice(w);
            b.target_ids[o..o + w.len() - 1].copy_from_slice(&w[1..]);
            b.target_mask[o..o + w.len() - 1].fill(1.0);
            b.mask[o..o + w.len()].fill(1.0);
        }
        let (ids, mask) = inputs::<B>(&b, &dev);
        let rows = b.batch * b.len;
        let logits = model.forward(ids, mask).reshape([rows, model.vocab_size()]);
        let tgt = Tensor::<B, 1, Int>::from_data(
            TensorData::new(
                b.target_ids.iter().map(|&x| x as i64).collect::<Vec<_>>(),
                [rows],
            ),
            &dev,
        );
        let tm = Tensor::<B, 1>::from_data(TensorData::new(b.target_mask.clone(), [rows]), &dev);
        ce += (crate::loss::cross_entropy(logits, tgt).reshape([rows]) * tm)
            .sum()
            .into_scalar()
            .elem::<f64>();
        n += b.target_mask.iter().map(|&m| m as f64).sum::<f64>();
    }
    let l = ce / n.max(1.0);
    Ok(CorpusEval {
        eval_loss: l,
        eval_ppl: l.exp(),
        eval_tokens: n as u64,
    })
}

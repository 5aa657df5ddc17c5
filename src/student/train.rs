//! Training students from a cache: the loop. AdamW (PyTorch defaults), warmup + cosine
//! schedule, global-norm gradient clipping, gradient accumulation, a chunked loss
//! ([`super::step`]), evaluation on the held-out split ([`super::eval`]), `metrics.jsonl`
//! ([`super::run_dir`]) and checkpoints that resume exactly ([`super::checkpoint`]).
//!
//! ```no_run
//! use logitcache::cache::reader::Cache;
//! use logitcache::student::{arch::StudentConfig, config::TrainConfig, train::train_student};
//! # fn main() -> anyhow::Result<()> {
//! let cache = Cache::open("cache/".as_ref())?;
//! let student = StudentConfig::load("micro", cache.manifest.vocab_size)?;
//! let cfg = TrainConfig {
//!     cache: "cache/".into(),
//!     tokenizer: cache.manifest.tokenizer.path.clone(),
//!     out: "runs/".into(),
//!     ..Default::default()
//! };
//! cfg.validate()?;
//! let r = train_student(&cache, &student, &cfg, false)?; // into runs/micro/
//! println!("{} tokens/s", r.tokens_per_s);
//! # Ok(())
//! # }
//! ```

use super::arch::StudentConfig;
use super::checkpoint::{TrainerState, load_state, save_checkpoint};
use super::config::TrainConfig;
use super::eval::{EvalMetrics, evaluate};
use super::model::Llama;
use super::run_dir::{EvalLine, MetricsWriter, RunDir, TrainLine};
use super::step::{clip_global, loss_and_grads};
use crate::cache::manifest::Manifest;
use crate::cache::reader::Cache;
use crate::cache::schema::CacheMode;
use crate::cache::stream::{Cursor, Split, Stream, StreamConfig};
use crate::device::Device;
use crate::loss::KdLoss;
use crate::progress::{Progress, ProgressMode};
use anyhow::{Context, bail};
use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsAccumulator, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The CPU training backend.
pub type CpuBackend = Autodiff<Flex>;

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
    // SAFETY: `rusage` is a plain C struct of integers, valid when zeroed.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we pass, which lives for the call.
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

/// For `--resume`, before any weights are loaded: refuses a checkpoint made for another
/// student architecture or with another tokenizer than the cache's, naming what differs.
/// (The cache itself is checked once the trainer state, which records it, is read.)
fn check_resume_matches(
    ckpt: &std::path::Path,
    cache: &Cache,
    student: &StudentConfig,
) -> anyhow::Result<()> {
    use super::run_dir::TrainConfigFile;
    super::checkpoint::verify_checkpoint(ckpt)?;
    let path = ckpt.join("train_config.json");
    let bytes = std::fs::read(&path).with_context(|| {
        format!(
            "cannot resume from {}: {} is missing; delete the run directory to start over",
            ckpt.display(),
            path.display()
        )
    })?;
    let was = TrainConfigFile::parse(&bytes, &path)?;
    if was.student != *student {
        let (a, b) = (
            serde_json::to_value(&was.student)?,
            serde_json::to_value(student)?,
        );
        let changed: Vec<String> = b
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, v)| a.get(k.as_str()) != Some(v))
            .map(|(k, v)| format!("{k} {} → {v}", a.get(k.as_str()).unwrap_or(&"none".into())))
            .collect();
        bail!(
            "--resume: student {} changed since its checkpoint in {} ({}); its weights do not fit the new architecture: restore the old config, or train the new one into another --out",
            student.name,
            ckpt.display(),
            changed.join(", ")
        );
    }
    let saved = ckpt.join("tokenizer.json");
    match cache.check_tokenizer(&saved) {
        Err(e @ crate::cache::reader::ReadError::TokenizerMismatch { .. }) => bail!(
            "--resume: the checkpoint's tokenizer {} is not the cache's ({e}); resume with the cache and tokenizer the run was trained with, or train into another --out",
            saved.display()
        ),
        other => Ok(other?),
    }
}

/// Trains one student from `cache` into `cfg.out/<student name>`, on `cfg.device`.
pub fn train_student(
    cache: &Cache,
    student: &StudentConfig,
    cfg: &TrainConfig,
    resume: bool,
) -> anyhow::Result<RunResult> {
    match cfg.device.check_trainable().map_err(anyhow::Error::msg)? {
        Device::Cpu => train_on::<CpuBackend>(cache, student, cfg, resume, &Default::default()),
        Device::Cuda(index) => {
            #[cfg(feature = "cuda")]
            {
                let index = usize::try_from(index).expect("device index ≥ 0: this is a bug");
                crate::device::check_cuda(index)?;
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
        Device::TensorRt(_) => unreachable!("check_trainable refuses TensorRT: this is a bug"),
    }
}

/// Bytes per parameter that training holds at least: f32 weights, gradients and AdamW's two
/// moments (activations come on top).
const TRAIN_BYTES_PER_PARAM: f64 = 16.0;

/// Refuses a student whose weights, gradients and optimizer state alone exceed `available`
/// bytes of memory (when known), naming its parameter count: allocating it would abort the
/// process with a backtrace instead.
fn check_fits_in_memory(student: &StudentConfig, available: Option<u64>) -> anyhow::Result<()> {
    let Some(available) = available else {
        return Ok(());
    };
    let params = student.num_params() as f64;
    let need = params * TRAIN_BYTES_PER_PARAM;
    if need > available as f64 {
        bail!(
            "student {} has {} parameters: training it needs at least {:.1} GiB (f32 weights, gradients and AdamW's two moments, {TRAIN_BYTES_PER_PARAM} bytes per parameter, before activations), more than the {:.1} GiB of memory available; choose a smaller student (hidden_size, num_hidden_layers, intermediate_size)",
            student.name,
            crate::law::human(params),
            need / (1u64 << 30) as f64,
            available as f64 / (1u64 << 30) as f64
        );
    }
    Ok(())
}

/// `MemAvailable` of `/proc/meminfo` in bytes (Linux), or `None` where it cannot be read.
fn available_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The held-out fraction a run uses: `requested`, or 0 (train on every window, no
/// evaluation, with a warning) when no window of a small cache falls in the held-out split
/// (it is chosen by seq_id hash), so the defaults never fail. A split that holds out every
/// window, leaving nothing to train on, is refused.
fn held_out_fraction(m: &Manifest, requested: f64, cache: &Path) -> anyhow::Result<f64> {
    if requested <= 0.0 {
        return Ok(0.0);
    }
    let n = m.totals.sequences;
    let held = (0..n)
        .filter(|&s| crate::rng::is_eval(s, requested))
        .count() as u64;
    if held == 0 {
        tracing::warn!(
            "none of the {n} windows of {} falls in the held-out split (--eval-fraction {requested}): training on all of them without evaluation; raise --eval-fraction (or use a larger cache) to evaluate",
            cache.display()
        );
        return Ok(0.0);
    }
    if held == n {
        bail!(
            "--eval-fraction {requested} holds out all {n} windows of {}, leaving none to train on; lower --eval-fraction",
            cache.display()
        );
    }
    Ok(requested)
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
    if cfg.device == crate::device::Device::Cpu {
        check_fits_in_memory(student, available_memory_bytes())?;
    }
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
    let mode = m.params.mode;
    if mode != CacheMode::Topk
        && matches!(cfg.loss.kind, KdLoss::Rkl | KdLoss::Jsd | KdLoss::FklTopk)
    {
        bail!(
            "--loss {} needs the teacher's probability at ids it did not store, and a --mode {mode} cache stores an estimate of the distribution (draws, not probabilities): train it with --loss fkl (cross-entropy against the estimate over the whole vocabulary, an unbiased gradient) or ce, or build a --mode topk cache for {}",
            cfg.loss.kind.name(),
            cfg.loss.kind.name()
        );
    }
    if mode == CacheMode::Topk && cfg.loss.kind != KdLoss::Ce && cfg.loss.ce_weight == 0.0 {
        warn_if_tail_heavy(cache);
    }
    if student.max_position_embeddings < m.params.seq_len {
        bail!(
            "student {} has max_position_embeddings {} but the cache's windows are up to {} tokens (seq_len); set max_position_embeddings ≥ {} (or leave it out)",
            student.name,
            student.max_position_embeddings,
            m.params.seq_len,
            m.params.seq_len
        );
    }
    let eval_fraction = held_out_fraction(m, cfg.eval_fraction, &cfg.cache)?;
    let run_dir = RunDir::new(cfg.out.join(&student.name));
    let run = run_dir.path.clone();
    let ckpt = run_dir.checkpoint();
    std::fs::create_dir_all(&run).with_context(|| format!("creating {}", run.display()))?;
    // Held until the run returns: a second `train` on this directory is refused.
    let _lock = crate::cache::lock::RunLock::acquire(&run)?;
    super::checkpoint::recover_interrupted_save(&run)?;
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
        cache_manifest: Some(m.checksum.clone()),
    };
    let resumed = resume && ckpt.exists();
    if resume && !resumed {
        tracing::warn!(
            "--resume: {} has no checkpoint yet; starting from step 0",
            run.display()
        );
    } else if resumed {
        check_resume_matches(&ckpt, cache, student)?;
        (model, optim, state) = load_state(&ckpt, model, optim, dev)?;
        if let Some(was) = &state.cache_manifest
            && *was != m.checksum
        {
            bail!(
                "--resume: the checkpoint in {} was trained on a different cache (manifest checksum {was}) than {} (checksum {}, teacher sha256 {}, {} tokens); resume with the cache it was trained on, or train into another --out",
                ckpt.display(),
                cfg.cache.display(),
                m.checksum,
                m.model.sha256,
                m.totals.tokens
            );
        }
        // A checkpoint from before the identity was kept gets it from now on.
        state.cache_manifest = Some(m.checksum.clone());
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
    let start_step = state.step;
    // metrics.jsonl: keep what precedes the resumed step.
    let mut metrics = MetricsWriter::open(&run_dir, state.step)?;
    let mut stream = Stream::start(
        cache,
        StreamConfig {
            batch_size: cfg.batch_size,
            seed: cfg.seed,
            epochs: None,
            split: if eval_fraction > 0.0 {
                Split::Train
            } else {
                Split::All
            },
            eval_fraction,
            start: state.cursor,
            ..Default::default()
        },
    )?;
    let progress = Progress::steps(
        cfg.progress.unwrap_or(ProgressMode::Off),
        &student.name,
        cfg.steps as u64,
        state.step as u64,
    );
    let run_eval = |model: &Llama<B>, metrics: &mut MetricsWriter, step: usize| {
        let e = evaluate(
            &model.valid(),
            cache,
            eval_fraction,
            cfg.batch_size,
            cfg.eval_batches,
            &cfg.loss,
        )?;
        let line = metrics.write(&EvalLine {
            metrics: e.clone(),
            step,
        })?;
        progress.json_line(&line);
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
            stream.recycle(b);
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
            let line = metrics.write(&TrainLine {
                step: state.step,
                loss: total,
                kd,
                ce,
                lr,
                grad_norm: gnorm,
                tokens: state.tokens,
                tokens_per_s: window.1 as f64 / secs,
            })?;
            progress.json_line(&line);
            progress.set(
                state.step as u64,
                format!("loss {total:.4}  {:.0} tok/s", window.1 as f64 / secs),
            );
            window = (Instant::now(), 0);
        }
        // (The last step's evaluation is the final one below.)
        if cfg.eval_every > 0
            && state.step.is_multiple_of(cfg.eval_every)
            && eval_fraction > 0.0
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
    progress.finish();
    // A resumed run that trained no step (it was finished): its checkpoint and final
    // evaluation stand as they are (not rewritten, not evaluated twice), and its final loss
    // is the last one its metrics record (MetricsWriter kept only lines up to this step).
    let untouched = resumed && state.step == start_step;
    if !untouched {
        state.seconds = seconds0 + t_start.elapsed().as_secs_f64();
        save_checkpoint(&run, &model, &optim, student, cfg, &state)?;
    }
    let done_eval = untouched
        .then(|| run_dir.last_eval())
        .flatten()
        .filter(|e| e.step == state.step);
    let eval = match done_eval {
        Some(e) => Some(e.metrics),
        None if eval_fraction > 0.0 && state.step == cfg.steps => {
            Some(run_eval(&model, &mut metrics, state.step)?)
        }
        None => None,
    };
    if untouched {
        last_loss = run_dir.train_lines().pop().map_or(f64::NAN, |l| l.loss);
    }
    Ok(RunResult {
        student: student.name.clone(),
        params: student.num_params(),
        run_dir: run,
        steps: state.step,
        tokens: state.tokens,
        tokens_per_s: state.tokens as f64 / state.seconds.max(1e-9),
        final_loss: last_loss,
        eval,
        peak_rss_mib: peak_rss_mib(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_student_larger_than_memory_is_refused_naming_its_size() {
        let s = StudentConfig::load("preset:nano", 400).unwrap();
        let need = s.num_params() as f64 * TRAIN_BYTES_PER_PARAM;
        assert!(check_fits_in_memory(&s, Some(need as u64 + 1)).is_ok());
        assert!(check_fits_in_memory(&s, None).is_ok());
        let e = check_fits_in_memory(&s, Some(need as u64 / 2))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&crate::law::human(s.num_params() as f64)) && e.contains("smaller student"),
            "{e}"
        );
    }
}

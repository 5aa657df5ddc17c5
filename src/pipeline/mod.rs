//! `logitcache run PIPELINE.toml`: the whole job in order — tokenizer, the token data,
//! each teacher (pretrained with CE and exported when not given as ONNX), one cache per
//! teacher, every student distilled from every cache plus the CE-only baselines, then the
//! results, the law fit and the report.
//!
//! Each step's directory carries a stamp (`.logitcache-step.json`) with the fingerprint of
//! everything the step depends on (input hashes and parameters, including the fingerprints
//! of the steps before it). A step whose stamp says `done` with the same fingerprint, and
//! whose output checks out, is skipped; one whose fingerprint changed is rebuilt, and so is
//! everything downstream of it, but nothing else. A step interrupted midway (`running`)
//! continues: caches resume shard by shard, training resumes from its last checkpoint.
//!
//! CE-only runs (teacher pretraining, baselines) need only tokens: they read them from a
//! k = 1 cache of a tiny generated model (`OUT/data`), built in seconds, so that every run
//! — distilled or not — sees the same windows and is evaluated on the same held-out
//! sequences (the split is by `seq_id`, which depends only on the corpus, the tokenizer and
//! `seq_len`).

pub mod config;
pub mod data_model;
pub mod report;

use crate::cache::reader::Cache;
use crate::cache::schema::{CacheMode, LogprobDtype, Sampling};
use crate::law::{ResultRow, fit, law_rows, read_results};
use crate::loss::{KdLoss, LossConfig};
use crate::onnx::external::model_sha256;
use crate::progress::ProgressMode;
use crate::student::arch::StudentConfig;
use crate::student::checkpoint::RunCheckpoint;
use crate::student::config::TrainConfig;
use crate::student::run_dir::RunDir;
use crate::student::train::train_student;
use crate::teacher::{self, TeacherConfig};
use crate::util::{sha256_bytes, sha256_file, write_atomic};
use anyhow::{Context, bail};
pub use config::{CacheSection, CacheVariant, Pipeline, Recipe, TeacherSource, TrainSection};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

const STAMP: &str = ".logitcache-step.json";

/// Options of `run` that are not in the pipeline file.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub ort_lib: Option<PathBuf>,
    pub progress: ProgressMode,
}

/// What a step found on disk.
#[derive(Debug, PartialEq)]
enum StepState {
    Done,
    Resume,
    Fresh,
}

fn fingerprint(v: &serde_json::Value) -> String {
    sha256_bytes(v.to_string().as_bytes())
}

fn stamp(dir: &Path) -> Option<serde_json::Value> {
    serde_json::from_slice(&std::fs::read(dir.join(STAMP)).ok()?).ok()
}

/// Decides what to do with step directory `dir` for fingerprint `fp`, clearing it when its
/// contents belong to other parameters.
fn state(dir: &Path, fp: &str, what: &str) -> anyhow::Result<StepState> {
    match stamp(dir) {
        Some(s) if s["fingerprint"] == fp && s["state"] == "done" => Ok(StepState::Done),
        Some(s) if s["fingerprint"] == fp && s["state"] == "running" => {
            tracing::info!("{what}: continuing an interrupted run");
            Ok(StepState::Resume)
        }
        other => {
            if dir.exists() {
                tracing::info!(
                    "{what}: {}; rebuilding {}",
                    if other.is_some() {
                        "its inputs or parameters changed"
                    } else {
                        "no record of how it was made"
                    },
                    dir.display()
                );
                std::fs::remove_dir_all(dir)
                    .with_context(|| format!("clearing {}", dir.display()))?;
            }
            Ok(StepState::Fresh)
        }
    }
}

fn mark(dir: &Path, fp: &str, state: &str, inputs: &serde_json::Value) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    write_atomic(
        &dir.join(STAMP),
        serde_json::to_string_pretty(
            &json!({"state": state, "fingerprint": fp, "inputs": inputs}),
        )?
        .as_bytes(),
    )?;
    Ok(())
}

/// A completed step's record for the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TeacherInfo {
    pub name: String,
    pub params: u64,
    pub onnx: PathBuf,
    /// Its caches, one per cache variant, in the pipeline's order.
    pub caches: Vec<CacheInfo>,
    /// Held-out CE of a pretrained teacher (none for given ONNX files).
    pub eval_loss: Option<f64>,
}

/// One cache of a teacher.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CacheInfo {
    /// The `[[cache_variant]]`'s name (none without variants).
    pub variant: Option<String>,
    /// Its directory name under `caches/` and `runs/`.
    pub label: String,
    pub dir: PathBuf,
    pub settings: CacheSection,
    #[serde(skip)]
    fingerprint: String,
}

/// Parameter count of an ONNX model: the elements of its initializers.
pub fn onnx_params(path: &Path) -> anyhow::Result<u64> {
    use prost::Message;
    let bytes = std::fs::read(path)?;
    let m = crate::onnx::proto::ModelProto::decode(bytes.as_slice())
        .with_context(|| format!("{} is not an ONNX model", path.display()))?;
    let g = m.graph.unwrap_or_default();
    Ok(g.initializer
        .iter()
        .map(|t| t.dims.iter().product::<i64>().max(1) as u64)
        .sum())
}

/// Where a student run reads and writes (see [`Runner::student`]).
struct StudentRun<'a> {
    /// Its label in the log (without the seed).
    what: String,
    /// Its output directory (without the seed), holding `<student>/`.
    dir: PathBuf,
    cache: &'a Path,
    /// The fingerprint of the step that made `cache`.
    upstream: &'a str,
    /// CE only (a baseline).
    ce: bool,
    /// The KD temperature: the cache's.
    temperature: f32,
}

struct Runner<'a> {
    p: &'a Pipeline,
    opts: &'a RunOptions,
    threads: usize,
    step: usize,
    steps: usize,
    t0: Instant,
}

impl Runner<'_> {
    fn header(&mut self, what: &str) {
        self.step += 1;
        tracing::info!(
            "[{}/{}] {what}  ({:.0} s)",
            self.step,
            self.steps,
            self.t0.elapsed().as_secs_f64()
        );
    }

    fn train_config(
        &self,
        t: &TrainSection,
        cache: &Path,
        tokenizer: &Path,
        out: &Path,
        ce: bool,
        temperature: f32,
    ) -> TrainConfig {
        let warmup = t.warmup.unwrap_or(t.steps / 10);
        let evals = t.evals.max(1);
        TrainConfig {
            cache: cache.to_path_buf(),
            tokenizer: tokenizer.to_path_buf(),
            out: out.to_path_buf(),
            steps: t.steps,
            batch_size: t.batch_size,
            lr: t.lr,
            min_lr: t
                .min_lr
                .unwrap_or_else(|| TrainConfig::default_min_lr(t.lr)),
            warmup,
            weight_decay: t.weight_decay,
            grad_clip: t.grad_clip,
            loss: LossConfig {
                kind: if ce { KdLoss::Ce } else { t.loss },
                kd_weight: t.kd_weight,
                ce_weight: t.ce_weight,
                temperature: temperature as f64,
                jsd_beta: t.jsd_beta,
            },
            seed: t.seed,
            eval_every: (t.steps / evals).max(1),
            eval_batches: t.eval_batches,
            eval_fraction: self.p.file.data.eval_fraction,
            save_every: (t.steps / 4).max(1),
            log_every: (t.steps / 50).max(1),
            progress: Some(self.opts.progress),
            // grad_accum, AdamW's betas and eps, loss_chunk, device (cpu), stop_after.
            ..Default::default()
        }
    }

    /// Trains `arch` from `cache` into `out/<arch.name>` unless done; returns the run dir.
    fn train(
        &mut self,
        what: &str,
        arch: &StudentConfig,
        cfg: &TrainConfig,
        upstream: &str,
    ) -> anyhow::Result<(PathBuf, String)> {
        let run = cfg.out.join(&arch.name);
        let inputs = json!({"upstream": upstream, "student": arch, "train": cfg});
        let fp = fingerprint(&inputs);
        let st = state(&run, &fp, what)?;
        let valid = st == StepState::Done
            && run.join("checkpoint/model.safetensors").is_file()
            && RunDir::new(&run).last_eval().is_some();
        if valid {
            tracing::info!("{what}: done before, skipped");
            return Ok((run, fp));
        }
        if st == StepState::Done {
            std::fs::remove_dir_all(&run)?;
        }
        if st == StepState::Resume {
            // A kill between a save's two renames left only checkpoint.old: put it back
            // (under the pipeline's lock), or the run below would be deleted and restarted.
            crate::student::checkpoint::recover_interrupted_save(&run)?;
        }
        let resume = st == StepState::Resume && run.join("checkpoint/state/trainer.json").is_file();
        if !resume && run.exists() {
            std::fs::remove_dir_all(&run)?;
        }
        mark(&run, &fp, "running", &inputs)?;
        let cache = Cache::open(&cfg.cache)?;
        // Every run of a pipeline is compared on the held-out split: one with no window
        // there is refused (a plain `train` would go on without evaluation).
        let n = cache.manifest.totals.sequences;
        if !(0..n).any(|s| crate::rng::is_eval(s, cfg.eval_fraction)) {
            bail!(
                "{what}: `[data] eval_fraction` {} holds out none of the {n} windows of {}, and the pipeline compares every run on the held-out split; raise eval_fraction or use a larger corpus",
                cfg.eval_fraction,
                cfg.cache.display()
            );
        }
        tracing::info!(
            "{what}: {} parameters, {} steps",
            arch.num_params(),
            cfg.steps
        );
        let r = train_student(&cache, arch, cfg, resume)?;
        tracing::info!(
            "{what}: {:.0} tokens/s, eval loss {}",
            r.tokens_per_s,
            r.eval
                .as_ref()
                .map(|e| format!("{:.4}", e.eval_loss))
                .unwrap_or("-".into())
        );
        mark(&run, &fp, "done", &inputs)?;
        Ok((run, fp))
    }

    /// Trains student `s` with `train` at `seed` (with `[train] seeds`, the seed's label
    /// and directory `seed-<seed>` are added); returns the run directory and its steps.
    fn student(
        &mut self,
        s: &StudentConfig,
        train: &TrainSection,
        seed: u64,
        run: StudentRun,
        tokenizer: &Path,
    ) -> anyhow::Result<(PathBuf, usize)> {
        let StudentRun {
            mut what,
            mut dir,
            cache,
            upstream,
            ce,
            temperature,
        } = run;
        if self.p.seed_dirs() {
            what += &format!(" seed {seed}");
            dir = dir.join(format!("seed-{seed}"));
        }
        self.header(&format!("student {what}"));
        let mut ts = train.clone();
        ts.seed = seed;
        let cfg = self.train_config(&ts, cache, tokenizer, &dir, ce, temperature);
        let (run, _) = self.train(&what, s, &cfg, upstream)?;
        Ok((run, cfg.steps))
    }

    /// The teacher-stage configuration of one cache (`sampled`: the cache's own mode and
    /// storage; otherwise a plain float16 top-k cache, as the CE runs' token data is).
    fn teacher_config(
        &self,
        model: &Path,
        tokenizer: &Path,
        dir: &Path,
        c: &CacheSection,
        top_k: usize,
        sampled: bool,
    ) -> TeacherConfig {
        let d = &self.p.file.data;
        let mode = if sampled { c.mode } else { CacheMode::Topk };
        let samples = match mode {
            CacheMode::Topk => 0,
            _ => c.samples.unwrap_or(teacher::DEFAULT_SAMPLES),
        };
        let logprob_dtype = if sampled {
            c.logprob_dtype
        } else {
            LogprobDtype::Float16
        };
        TeacherConfig {
            model: model.to_path_buf(),
            tokenizer: tokenizer.to_path_buf(),
            corpus: d.corpus.clone(),
            out: dir.to_path_buf(),
            top_k,
            seq_len: d.seq_len,
            batch_size: c.batch_size,
            max_batch_tokens: c.max_batch_tokens,
            temperature: c.temperature,
            text_field: d.text_field.clone(),
            skip_bad_rows: d.skip_bad_rows,
            threads: self.threads,
            shard_size: c.shard_size,
            mode,
            samples,
            seed: if mode == CacheMode::Topk { 0 } else { c.seed },
            logprob_dtype,
            proposal_temperature: if mode == CacheMode::Topk {
                teacher::DEFAULT_PROPOSAL_TEMPERATURE
            } else {
                c.proposal_temperature
            },
            // A `[cache]` of mode topk with `sampling` set is refused by `validate`; the CE
            // runs' top-1 token data draws nothing.
            sampling_scheme: if sampled { c.sampling } else { Sampling::Iid },
            ort_lib: self.opts.ort_lib.clone(),
            progress: self.opts.progress,
            ..Default::default()
        }
    }

    /// Validates every `[cache]` / `[[cache_variant]]` and `[train]` / `[[recipe]]` section
    /// as the stages will, before anything runs, naming the pipeline file's keys.
    fn check_sections(&self) -> anyhow::Result<()> {
        let path = &self.p.path;
        let nowhere = Path::new("");
        for v in &self.p.caches {
            let section = match &v.name {
                Some(n) => format!("[[cache_variant]] `{n}`"),
                None => "[cache]".into(),
            };
            self.teacher_config(nowhere, nowhere, nowhere, &v.cache, v.cache.top_k, true)
                .validate()
                .map_err(|e| in_pipeline_terms(e, path, &section, &cache_keys()))?;
        }
        let temperature = self.p.caches.first().map_or(1.0, |v| v.cache.temperature);
        for r in &self.p.recipes {
            let section = match &r.name {
                Some(n) => format!("[[recipe]] `{n}`"),
                None => "[train]".into(),
            };
            self.train_config(&r.train, nowhere, nowhere, nowhere, false, temperature)
                .validate()
                .map_err(|e| in_pipeline_terms(e, path, &section, &train_keys(&r.train)))?;
        }
        // The teachers' CE pretraining (with each teacher's own steps and lr).
        if self.p.file.teacher_train.is_some() {
            let tt = self.p.teacher_train();
            self.train_config(&tt, nowhere, nowhere, nowhere, true, temperature)
                .validate()
                .map_err(|e| in_pipeline_terms(e, path, "[teacher_train]", &train_keys(&tt)))?;
        }
        Ok(())
    }

    /// Builds the cache of `model` into `dir` unless done; returns its fingerprint.
    /// `model_id` identifies the model in the fingerprint (its sha256, or the data model's
    /// version and shape).
    #[allow(clippy::too_many_arguments)]
    fn cache(
        &mut self,
        what: &str,
        model: &Path,
        model_id: &str,
        tokenizer: &Path,
        dir: &Path,
        c: &CacheSection,
        top_k: usize,
        sampled: bool,
        upstream: &str,
    ) -> anyhow::Result<String> {
        let d = &self.p.file.data;
        let cfg = self.teacher_config(model, tokenizer, dir, c, top_k, sampled);
        let (mode, samples) = (cfg.mode, cfg.samples);
        let mut inputs = json!({
            "upstream": upstream, "model_sha256": model_id, "top_k": top_k,
            "seq_len": d.seq_len, "batch_size": c.batch_size, "temperature": c.temperature,
            "shard_size": c.shard_size, "text_field": d.text_field, "skip_bad_rows": d.skip_bad_rows,
        });
        // The batches' budget only when set, so existing pipelines keep their fingerprints.
        if let Some(m) = c.max_batch_tokens {
            inputs["max_batch_tokens"] = json!(m);
        }
        // Only sampled caches carry the sample settings, so a top-k pipeline's fingerprints
        // are what they were before the modes existed.
        if mode != CacheMode::Topk {
            inputs["mode"] = json!(mode.name());
            inputs["samples"] = json!(samples);
            inputs["seed"] = json!(c.seed);
            if c.proposal_temperature != teacher::DEFAULT_PROPOSAL_TEMPERATURE {
                inputs["proposal_temperature"] = json!(c.proposal_temperature);
            }
            if cfg.sampling_scheme != Sampling::Iid {
                inputs["sampling"] = json!(cfg.sampling_scheme.name());
            }
        }
        let logprob_dtype = cfg.logprob_dtype;
        if logprob_dtype != LogprobDtype::Float16 {
            inputs["logprob_dtype"] = json!(logprob_dtype.name());
        }
        let fp = fingerprint(&inputs);
        let st = state(dir, &fp, what)?;
        if st == StepState::Done {
            match crate::cache::verify::verify(dir) {
                Ok(r) if r.ok => {
                    tracing::info!("{what}: done before and verified, skipped");
                    return Ok(fp);
                }
                Ok(r) => tracing::warn!(
                    "{what}: the cache fails verification ({}); rebuilding",
                    r.problems.join("; ")
                ),
                Err(e) => tracing::warn!("{what}: the cache cannot be read ({e}); rebuilding"),
            }
            std::fs::remove_dir_all(dir)?;
        }
        mark(dir, &fp, "running", &inputs)?;
        cfg.validate()
            .map_err(|e| in_pipeline_terms(e, &self.p.path, "[cache]", &cache_keys()))?;
        let s = teacher::run(&cfg)?;
        if !s.complete {
            bail!("{what}: the cache in {} is incomplete", dir.display());
        }
        tracing::info!(
            "{what}: {} tokens, {:.0} tokens/s",
            s.tokens,
            s.tokens_per_s
        );
        mark(dir, &fp, "done", &inputs)?;
        Ok(fp)
    }
}

/// The keys a `[cache]` (or `[[cache_variant]]`) section takes.
fn cache_keys() -> Vec<String> {
    section_keys(&CacheSection::default(), &["samples", "max_batch_tokens"])
}

/// The keys a `[train]` (`[[recipe]]`, `[teacher_train]`) section takes.
fn train_keys(t: &crate::pipeline::config::TrainSection) -> Vec<String> {
    section_keys(t, &["seeds"])
}

fn section_keys<T: serde::Serialize>(section: &T, optional: &[&str]) -> Vec<String> {
    let mut keys: Vec<String> = match serde_json::to_value(section) {
        Ok(serde_json::Value::Object(m)) => m.keys().cloned().collect(),
        _ => Vec::new(),
    };
    keys.extend(optional.iter().map(|k| k.to_string()));
    keys
}

/// A stage's validation error in the pipeline file's terms: each `--flag` it names that
/// is a key of `section` (`keys`) becomes that key (`--kd-weight` → `` `[train] kd_weight` ``;
/// the data flags → `[data]`; `--cache-seed` → `seed`); other flags are left as they are.
/// Prefixed with the file's path.
fn in_pipeline_terms(
    e: anyhow::Error,
    path: &Path,
    section: &str,
    keys: &[String],
) -> anyhow::Error {
    let text = format!("{e:#}");
    let mut out = String::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("--") {
        out.push_str(&rest[..i]);
        let tail = &rest[i + 2..];
        let n = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .unwrap_or(tail.len());
        let flag = &tail[..n];
        let key = flag.replace('-', "_");
        // `[train] lr`, or `lr` of [[recipe]] `fast` (a named variant's own backticks).
        let in_section = |key: &str| {
            if section.contains('`') {
                format!("`{key}` of {section}")
            } else {
                format!("`{section} {key}`")
            }
        };
        match flag {
            "cache-seed" => out.push_str(&in_section("seed")),
            "eval-fraction" | "seq-len" | "text-field" | "skip-bad-rows" => {
                out.push_str(&format!("`[data] {key}`"))
            }
            _ if keys.contains(&key) => out.push_str(&in_section(&key)),
            _ => {
                out.push_str("--");
                out.push_str(flag);
            }
        }
        rest = &tail[n..];
    }
    out.push_str(rest);
    anyhow::anyhow!("{}: {out}", path.display())
}

/// Runs the pipeline; returns the path of `report.md`.
pub fn run(p: &Pipeline, opts: &RunOptions) -> anyhow::Result<PathBuf> {
    let f = &p.file;
    let out = &p.out;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(out.join(".logitcache-run.lock"))
        .with_context(|| format!("cannot write in {}", out.display()))?;
    if lock.try_lock().is_err() {
        bail!(
            "another `logitcache run` is using {}; wait for it, or pass another --out",
            out.display()
        );
    }
    // The resolved pipeline (absolute paths, defaults filled in) beside its outputs.
    write_atomic(
        &out.join("pipeline.resolved.json"),
        serde_json::to_string_pretty(&json!({
            "pipeline": p.path, "name": p.name, "out": out, "file": f,
            "logitcache_version": env!("CARGO_PKG_VERSION"),
        }))?
        .as_bytes(),
    )?;
    let threads = f.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global();
    let n_t = f.teachers.len();
    let n_s = f.students.len();
    let (n_c, n_r, n_seeds) = (p.caches.len(), p.recipes.len(), p.seeds.len());
    let trained = f.teachers.iter().filter(|t| t.onnx.is_none()).count();
    let mut r = Runner {
        p,
        opts,
        threads,
        step: 0,
        steps: 2
            + 2 * trained
            + n_t * n_c
            + n_t * n_c * n_r * n_seeds * n_s
            + if f.train.ce_baseline {
                n_s * n_seeds
            } else {
                0
            },
        t0: Instant::now(),
    };
    r.check_sections()?;

    // 1. Tokenizer.
    r.header("tokenizer");
    let corpus_hashes: Vec<(String, String)> = f
        .data
        .corpus
        .iter()
        .map(|c| corpus_sha(c).map(|h| (c.display().to_string(), h)))
        .collect::<anyhow::Result<_>>()?;
    let tok_dir = out.join("tokenizer");
    let tokenizer = tok_dir.join("tokenizer.json");
    let tok_inputs = match &f.data.tokenizer {
        Some(t) => json!({"given": sha256_file(t)?.0}),
        None => {
            json!({"corpus": corpus_hashes, "vocab_size": f.data.tokenizer_vocab_size, "text_field": f.data.text_field})
        }
    };
    let tok_fp = fingerprint(&tok_inputs);
    if state(&tok_dir, &tok_fp, "tokenizer")? == StepState::Done && tokenizer.is_file() {
        tracing::info!("tokenizer: done before, skipped");
    } else {
        mark(&tok_dir, &tok_fp, "running", &tok_inputs)?;
        match &f.data.tokenizer {
            Some(t) => {
                std::fs::copy(t, &tokenizer)?;
            }
            None => {
                let texts = crate::corpus::read_texts(&f.data.corpus, &f.data.text_field)?;
                crate::tokenizer::train_bpe(&texts, f.data.tokenizer_vocab_size, &tokenizer)?;
            }
        }
        mark(&tok_dir, &tok_fp, "done", &tok_inputs)?;
    }
    let vocab = crate::tokenizer::load(&tokenizer)?.vocab_size;
    let data_up = fingerprint(&json!({"tokenizer": tok_fp, "corpus": corpus_hashes}));

    // 2. Token data for CE runs: a k = 1 cache of a tiny generated model.
    r.header("token data for CE runs");
    let data_dir = out.join("data");
    let data_model = out.join("tokenizer/data-model.onnx");
    write_atomic(&data_model, &data_model::data_model(vocab))?;
    let data_fp = r.cache(
        "token data",
        &data_model,
        &format!(
            "logitcache data model v{} (vocab {vocab})",
            data_model::DATA_MODEL_VERSION
        ),
        &tokenizer,
        &data_dir,
        &f.cache,
        1,
        false,
        &data_up,
    )?;

    let teachers = p.teachers(vocab)?;
    let students = p.students(vocab)?;
    let tt = p.teacher_train();

    // 3. Teachers and their caches.
    let mut infos = Vec::new();
    for (name, src) in &teachers {
        let tdir = out.join("teachers").join(name);
        let (onnx, params, eval_loss, up) = match src {
            TeacherSource::Onnx { path, params } => {
                let n = match params {
                    Some(n) => *n,
                    None => onnx_params(path)?,
                };
                (path.clone(), n, None, model_sha256(path)?)
            }
            TeacherSource::Train { arch, steps, lr } => {
                r.header(&format!("teacher {name}: pretraining with CE"));
                let mut t = tt.clone();
                t.steps = *steps;
                t.lr = *lr;
                let cfg = r.train_config(
                    &t,
                    &data_dir,
                    &tokenizer,
                    &tdir.join("run"),
                    true,
                    f.cache.temperature,
                );
                let (run, fp) = r.train(&format!("teacher {name}"), arch, &cfg, &data_fp)?;
                r.header(&format!("teacher {name}: export to ONNX"));
                let onnx = tdir.join("model.onnx");
                let exported = stamp(&tdir)
                    .is_some_and(|s| s["fingerprint"] == fp.as_str() && s["state"] == "done");
                if !(exported && onnx.is_file()) {
                    use crate::student::export::{ExternalData, llama_model, write_onnx};
                    let ck = RunCheckpoint::open(&run)?;
                    let model = llama_model(&ck.student, ck.weights()?, false)?;
                    write_onnx(model, &onnx, ExternalData::Auto)?;
                    mark(&tdir, &fp, "done", &json!({"run": run}))?;
                }
                let e = RunDir::new(&run)
                    .last_eval()
                    .map(|e| e.metrics.eval_loss)
                    .filter(|l| l.is_finite());
                (onnx, arch.num_params() as u64, e, fp)
            }
        };
        let onnx_sha = model_sha256(&onnx)?;
        let mut caches = Vec::new();
        for v in &p.caches {
            let label = v.label(name);
            r.header(&match &v.name {
                Some(n) => format!("cache `{n}` of teacher {name}"),
                None => format!("cache of teacher {name}"),
            });
            let dir = out.join("caches").join(&label);
            let fingerprint = r.cache(
                &format!("cache {label}"),
                &onnx,
                &onnx_sha,
                &tokenizer,
                &dir,
                &v.cache,
                v.cache.top_k,
                true,
                &fingerprint(&json!({"data": data_up, "teacher": up})),
            )?;
            caches.push(CacheInfo {
                variant: v.name.clone(),
                label,
                dir,
                settings: v.cache.clone(),
                fingerprint,
            });
        }
        infos.push(TeacherInfo {
            name: name.clone(),
            params,
            onnx,
            caches,
            eval_loss,
        });
    }

    // 4. Students: distilled from every cache of every teacher (with each recipe and seed),
    // and the CE baseline (with each seed). Run directories:
    // runs/<cache label>[/<recipe>][/seed-<seed>]/<student>, runs/ce[/seed-<seed>]/<student>.
    let mut rows = Vec::new();
    for s in &students {
        for t in &infos {
            for c in &t.caches {
                for rc in &p.recipes {
                    let mut what = format!("{} <- {}", s.name, c.label);
                    let mut dir = out.join("runs").join(&c.label);
                    if let Some(n) = &rc.name {
                        what += &format!(" ({n})");
                        dir = dir.join(n);
                    }
                    for &seed in &p.seeds {
                        let run = StudentRun {
                            what: what.clone(),
                            dir: dir.clone(),
                            cache: &c.dir,
                            upstream: &c.fingerprint,
                            ce: false,
                            temperature: c.settings.temperature,
                        };
                        let (run, steps) = r.student(s, &rc.train, seed, run, &tokenizer)?;
                        let mut rw = row(&t.name, Some(t.params), s, &run, steps)?;
                        rw.cache = c.variant.clone();
                        rw.recipe = rc.name.clone();
                        rw.seed = Some(seed);
                        rows.push(rw);
                    }
                }
            }
        }
        if f.train.ce_baseline {
            for &seed in &p.seeds {
                let run = StudentRun {
                    what: format!("{} (CE)", s.name),
                    dir: out.join("runs/ce"),
                    cache: &data_dir,
                    upstream: &data_fp,
                    ce: true,
                    temperature: f.cache.temperature,
                };
                let (run, steps) = r.student(s, &f.train, seed, run, &tokenizer)?;
                let mut rw = row("ce", None, s, &run, steps)?;
                // KL and top-1 of a CE run are against the data model: meaningless.
                rw.eval_kl = None;
                rw.eval_top1 = None;
                rw.seed = Some(seed);
                rows.push(rw);
            }
        }
    }

    // 5. Results, the law, the report.
    let results = out.join("results.json");
    write_atomic(
        &results,
        serde_json::to_string_pretty(&json!({"rows": rows}))?.as_bytes(),
    )?;
    write_atomic(
        &out.join("results.csv"),
        crate::law::to_csv(&rows).as_bytes(),
    )?;
    let rows = read_results(&results)?;
    let law = fit(&law_rows(&rows), "eval_loss");
    let report = report::write(p, &infos, &rows, &law, out)?;
    tracing::info!(
        "pipeline {} finished in {:.0} s: {}",
        p.name,
        r.t0.elapsed().as_secs_f64(),
        report.display()
    );
    Ok(report)
}

fn row(
    teacher: &str,
    tp: Option<u64>,
    s: &StudentConfig,
    run: &Path,
    steps: usize,
) -> anyhow::Result<ResultRow> {
    let e = RunDir::new(run)
        .last_eval()
        .with_context(|| format!("{} has no evaluation", run.display()))?
        .metrics;
    // A non-finite metric was written as null: absent, as for any JSON reader.
    let num = |x: f64| x.is_finite().then_some(x);
    Ok(ResultRow {
        teacher: teacher.into(),
        teacher_params: tp,
        student: s.name.clone(),
        student_params: s.num_params() as u64,
        eval_loss: num(e.eval_loss).context("eval_loss")?,
        eval_ppl: num(e.eval_ppl).context("eval_ppl")?,
        eval_kl: num(e.eval_kl),
        eval_top1: num(e.eval_top1),
        steps: steps as u64,
        run_dir: run.display().to_string(),
        cache: None,
        recipe: None,
        seed: None,
    })
}

/// sha256 over a corpus path (a file, or every file of a directory in sorted order).
fn corpus_sha(path: &Path) -> anyhow::Result<String> {
    let files = crate::corpus::discover(&[path.to_path_buf()])?;
    let mut all = String::new();
    for f in files {
        all.push_str(&f.sha256);
    }
    Ok(sha256_bytes(all.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_become_the_sections_keys_and_only_those() {
        let e = anyhow::anyhow!(
            "--kd-weight must be ≥ 0; --seq-len too; --cache-seed; --grad-accum is not a key; a -- b"
        );
        let keys = vec!["kd_weight".to_string()];
        let got = in_pipeline_terms(e, Path::new("p.toml"), "[[recipe]] `r`", &keys).to_string();
        assert_eq!(
            got,
            "p.toml: `kd_weight` of [[recipe]] `r` must be ≥ 0; `[data] seq_len` too; `seed` of [[recipe]] `r`; --grad-accum is not a key; a -- b"
        );
        let e = anyhow::anyhow!("--kd-weight must be ≥ 0");
        let got = in_pipeline_terms(e, Path::new("p.toml"), "[train]", &keys).to_string();
        assert_eq!(got, "p.toml: `[train] kd_weight` must be ≥ 0");
        assert!(cache_keys().contains(&"max_batch_tokens".to_string()));
        assert!(cache_keys().contains(&"logprob_dtype".to_string()));
        let e = anyhow::anyhow!("--sampling systematic needs --mode sample or --mode hybrid");
        let got = in_pipeline_terms(e, Path::new("p.toml"), "[cache]", &cache_keys()).to_string();
        assert!(got.contains("`[cache] sampling` systematic"), "{got}");
    }
}

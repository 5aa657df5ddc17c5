//! The pipeline file (`pipelines/*.toml`): corpus and tokenizer, teachers (ONNX files, or
//! architectures trained first with CE and exported), cache parameters, students and their
//! training settings. Paths are relative to the pipeline file. Unknown keys are refused.

use crate::cache::schema::{CacheMode, LogprobDtype, Sampling};
use crate::loss::KdLoss;
use crate::student::arch::{StudentConfig, StudentFile};
use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    /// Shown in the report.
    #[serde(default)]
    pub name: Option<String>,
    /// Output directory (default: `<pipeline file stem>-out` beside the file).
    #[serde(default)]
    pub out: Option<PathBuf>,
    /// Threads for training and the teacher (default: all cores).
    #[serde(default)]
    pub threads: Option<usize>,
    pub data: DataSection,
    #[serde(default)]
    pub cache: CacheSection,
    pub train: TrainSection,
    /// Settings for teachers trained by the pipeline (default: `train`'s, with CE).
    #[serde(default)]
    pub teacher_train: Option<TrainSection>,
    #[serde(rename = "teacher", default)]
    pub teachers: Vec<TeacherEntry>,
    #[serde(rename = "student", default)]
    pub students: Vec<ModelEntry>,
    /// Several caches per teacher (`[[cache_variant]]`: a `name` and any `[cache]` keys,
    /// which override `[cache]`'s); every student is distilled from each, and the report
    /// compares them (cache fidelity). Without any, each teacher has the one `[cache]`.
    #[serde(
        rename = "cache_variant",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub cache_variants: Vec<toml::Table>,
    /// Several ways to train each distilled student (`[[recipe]]`: a `name` and any
    /// `[train]` keys, which override `[train]`'s), e.g. KD only and KD + CE.
    #[serde(rename = "recipe", default, skip_serializing_if = "Vec::is_empty")]
    pub recipes: Vec<toml::Table>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    pub corpus: Vec<PathBuf>,
    #[serde(default = "default_text_field")]
    pub text_field: String,
    /// An existing tokenizer.json; without it a byte-level BPE tokenizer is trained.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
    /// Vocabulary of the trained tokenizer.
    #[serde(default = "default_vocab")]
    pub tokenizer_vocab_size: usize,
    #[serde(default = "default_seq_len")]
    pub seq_len: usize,
    /// Held-out fraction (by seq_id hash); every run is evaluated on the same sequences.
    #[serde(default = "default_eval_fraction")]
    pub eval_fraction: f64,
    #[serde(default)]
    pub skip_bad_rows: bool,
}

// The pipeline's own defaults below (vocabulary 2048, seq_len 128, eval fraction 0.05,
// shard size 512, 5 evaluations of 20 batches) are sized for demo-scale corpora and differ
// from the single-command defaults on purpose; the others are the commands' constants.
fn default_text_field() -> String {
    crate::teacher::DEFAULT_TEXT_FIELD.into()
}
fn default_vocab() -> usize {
    2048
}
fn default_seq_len() -> usize {
    128
}
fn default_eval_fraction() -> f64 {
    0.05
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSection {
    #[serde(default = "default_k")]
    pub top_k: usize,
    #[serde(default = "default_cache_batch")]
    pub batch_size: usize,
    /// Most tokens per teacher batch (`teacher --max-batch-tokens`; default from the
    /// model's vocabulary, logits within 512 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch_tokens: Option<usize>,
    #[serde(default = "default_temperature")]
    pub temperature: f32,
    #[serde(default = "default_shard_size")]
    pub shard_size: usize,
    /// What the teachers' caches store: `topk` (default), `sample` or `hybrid` (the
    /// `teacher --mode` flag); the token-data cache of the CE runs is always top-1.
    #[serde(default)]
    pub mode: CacheMode,
    /// Draws per position for `sample`/`hybrid` (`teacher --samples`; default 50).
    #[serde(default)]
    pub samples: Option<usize>,
    /// Seed of the draws (`teacher --cache-seed`).
    #[serde(default)]
    pub seed: u64,
    /// τ of the sampling proposal q ∝ p^(1/τ) (`teacher --proposal-temperature`; default 1).
    #[serde(default = "default_proposal_temperature")]
    pub proposal_temperature: f32,
    /// Where the draws fall on the cumulative sum: `iid` (default) or `systematic`
    /// (`teacher --sampling`; `sample` and `hybrid` modes).
    #[serde(default)]
    pub sampling: Sampling,
    /// How the teachers' top-k log-probs are stored: `float16` (default) or `q8`
    /// (`teacher --logprob-dtype`; `topk` and `hybrid` modes).
    #[serde(default)]
    pub logprob_dtype: LogprobDtype,
}

fn default_k() -> usize {
    crate::teacher::DEFAULT_TOP_K
}
fn default_cache_batch() -> usize {
    crate::teacher::DEFAULT_BATCH_SIZE
}
fn default_temperature() -> f32 {
    crate::teacher::DEFAULT_TEMPERATURE
}
fn default_proposal_temperature() -> f32 {
    crate::teacher::DEFAULT_PROPOSAL_TEMPERATURE
}
fn default_shard_size() -> usize {
    512
}

impl Default for CacheSection {
    fn default() -> Self {
        CacheSection {
            top_k: default_k(),
            batch_size: default_cache_batch(),
            max_batch_tokens: None,
            temperature: default_temperature(),
            shard_size: default_shard_size(),
            mode: CacheMode::Topk,
            samples: None,
            seed: 0,
            proposal_temperature: default_proposal_temperature(),
            sampling: Sampling::Iid,
            logprob_dtype: LogprobDtype::Float16,
        }
    }
}

/// Training settings shared by every run of a kind (the `train` flags of the same names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    pub steps: usize,
    #[serde(default = "default_train_batch")]
    pub batch_size: usize,
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default)]
    pub min_lr: Option<f64>,
    #[serde(default)]
    pub warmup: Option<usize>,
    #[serde(default = "default_wd")]
    pub weight_decay: f64,
    #[serde(default = "default_clip")]
    pub grad_clip: f64,
    #[serde(default = "default_loss")]
    pub loss: KdLoss,
    #[serde(default = "one")]
    pub kd_weight: f64,
    #[serde(default)]
    pub ce_weight: f64,
    #[serde(default = "half")]
    pub jsd_beta: f64,
    #[serde(default)]
    pub seed: u64,
    /// Train every run once per seed (instead of `seed`): the report gives mean ± sd over
    /// the seeds and compares caches by paired (same-seed) differences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seeds: Option<Vec<u64>>,
    /// Evaluations per run (spread evenly; the last is at the final step).
    #[serde(default = "default_evals")]
    pub evals: usize,
    #[serde(default = "default_eval_batches")]
    pub eval_batches: usize,
    /// Also train every student with CE only (the baseline KD must beat).
    #[serde(default = "yes")]
    pub ce_baseline: bool,
}

fn default_train_batch() -> usize {
    crate::student::config::DEFAULT_BATCH_SIZE
}
fn default_lr() -> f64 {
    crate::student::config::DEFAULT_LR
}
fn default_wd() -> f64 {
    crate::student::config::DEFAULT_WEIGHT_DECAY
}
fn default_clip() -> f64 {
    crate::student::config::DEFAULT_GRAD_CLIP
}
fn default_loss() -> KdLoss {
    crate::loss::DEFAULT_KIND
}
fn one() -> f64 {
    crate::loss::DEFAULT_KD_WEIGHT
}
fn half() -> f64 {
    crate::loss::DEFAULT_JSD_BETA
}
fn default_evals() -> usize {
    5
}
fn default_eval_batches() -> usize {
    20
}
fn yes() -> bool {
    true
}

/// A model architecture: `config = "preset:micro" | "file.toml"`, or inline `arch = {...}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub config: Option<String>,
    #[serde(default)]
    pub arch: Option<StudentFile>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherEntry {
    pub name: String,
    /// An existing ONNX teacher (it must use the pipeline's tokenizer).
    #[serde(default)]
    pub onnx: Option<PathBuf>,
    /// Its parameter count for the law (default: counted from the ONNX initializers).
    #[serde(default)]
    pub params: Option<u64>,
    /// Or an architecture the pipeline pretrains with CE and exports.
    #[serde(default)]
    pub config: Option<String>,
    #[serde(default)]
    pub arch: Option<StudentFile>,
    /// CE pretraining steps (default: `teacher_train.steps`).
    #[serde(default)]
    pub steps: Option<usize>,
    /// Peak learning rate of its pretraining (default: `teacher_train.lr`); larger models
    /// usually want a smaller one.
    #[serde(default)]
    pub lr: Option<f64>,
}

/// What kind of teacher an entry is.
#[derive(Debug, Clone)]
pub enum TeacherSource {
    Onnx {
        path: PathBuf,
        params: Option<u64>,
    },
    Train {
        arch: StudentConfig,
        steps: usize,
        lr: f64,
    },
}

/// One cache setting of every teacher.
#[derive(Debug, Clone)]
pub struct CacheVariant {
    /// `None` for the plain `[cache]` of a pipeline without `[[cache_variant]]`.
    pub name: Option<String>,
    pub cache: CacheSection,
}

impl CacheVariant {
    /// The cache's directory name under `caches/` (and `runs/`): the teacher's name, with
    /// `@variant` when the pipeline has variants.
    pub fn label(&self, teacher: &str) -> String {
        match &self.name {
            Some(v) => format!("{teacher}@{v}"),
            None => teacher.to_string(),
        }
    }
}

/// One way of training the distilled students.
#[derive(Debug, Clone)]
pub struct Recipe {
    /// `None` for the plain `[train]` of a pipeline without `[[recipe]]`.
    pub name: Option<String>,
    pub train: TrainSection,
}

/// A loaded, checked pipeline with absolute paths.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub path: PathBuf,
    pub name: String,
    pub out: PathBuf,
    pub file: PipelineFile,
    /// `[cache]`, or each `[[cache_variant]]` over it (at least one).
    pub caches: Vec<CacheVariant>,
    /// `[train]`, or each `[[recipe]]` over it (at least one).
    pub recipes: Vec<Recipe>,
    /// The training seeds: `[train] seeds`, or the one `seed`.
    pub seeds: Vec<u64>,
}

/// `base` with the keys of `over` (all but `name`) replacing its own, checked as a `T`.
fn overlay<T: Serialize + serde::de::DeserializeOwned>(
    base: &T,
    over: &toml::Table,
    what: &str,
) -> anyhow::Result<T> {
    let mut t = match toml::Value::try_from(base) {
        Ok(toml::Value::Table(t)) => t,
        other => bail!("{what}: cannot merge its keys: {other:?}"),
    };
    for (k, v) in over {
        if k != "name" {
            t.insert(k.clone(), v.clone());
        }
    }
    toml::Value::Table(t)
        .try_into()
        .map_err(|e| anyhow::anyhow!("{what} is not valid: {e}"))
}

/// The `name` of a `[[cache_variant]]` or `[[recipe]]`: present, a plain file name, unique.
fn variant_name(
    t: &toml::Table,
    section: &str,
    i: usize,
    seen: &mut std::collections::BTreeSet<String>,
) -> anyhow::Result<String> {
    let n = match t.get("name") {
        Some(toml::Value::String(n)) => n.clone(),
        Some(_) => bail!("[[{section}]] {}: `name` must be a string", i + 1),
        None => bail!(
            "[[{section}]] {}: no `name`; give each one a name (it names its directories and its row in the report)",
            i + 1
        ),
    };
    if n.is_empty() || n.contains(['/', '\\', '@']) || n.starts_with('.') {
        bail!(
            "[[{section}]] `{n}`: the name must be a plain file name (no `/`, `\\` or `@`, not starting with `.`)"
        );
    }
    if !seen.insert(n.clone()) {
        bail!("[[{section}]] `{n}` is named twice; give each one its own name");
    }
    Ok(n)
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

fn arch_of(
    base: &Path,
    what: &str,
    name: Option<&str>,
    config: &Option<String>,
    arch: &Option<StudentFile>,
    vocab: usize,
) -> anyhow::Result<StudentConfig> {
    let mut c = match (config, arch) {
        (Some(_), Some(_)) => bail!("{what}: give `config` or `arch`, not both"),
        (None, None) => bail!(
            "{what}: no architecture; give `config = \"preset:micro\"` (or a TOML file) or an inline `arch = {{ hidden_size = …, … }}`"
        ),
        (Some(spec), None) => {
            let spec = if spec.ends_with(".toml") {
                resolve(base, Path::new(spec)).display().to_string()
            } else {
                spec.clone()
            };
            StudentConfig::load(&spec, vocab)?
        }
        (None, Some(f)) => StudentConfig::from_file(name.unwrap_or("model"), f.clone(), vocab)?,
    };
    if let Some(n) = name {
        c.name = n.to_string();
    }
    Ok(c)
}

impl Pipeline {
    /// Reads and checks `path`; `out` overrides the file's output directory.
    pub fn load(path: &Path, out: Option<&Path>) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read pipeline file {}", path.display()))?;
        let mut file: PipelineFile = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("pipeline file {} is not valid: {e}", path.display()))?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .canonicalize()?;
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "pipeline".into());
        let out = match (out, &file.out) {
            (Some(o), _) => o.to_path_buf(),
            (None, Some(o)) => resolve(&base, o),
            (None, None) => base.join(format!("{stem}-out")),
        };
        for c in &mut file.data.corpus {
            *c = resolve(&base, c);
        }
        if let Some(t) = &mut file.data.tokenizer {
            *t = resolve(&base, t);
        }
        for t in &mut file.teachers {
            if let Some(o) = &mut t.onnx {
                *o = resolve(&base, o);
            }
            if let Some(c) = &mut t.config
                && c.ends_with(".toml")
            {
                *c = resolve(&base, Path::new(c)).display().to_string();
            }
        }
        for s in &mut file.students {
            if let Some(c) = &mut s.config
                && c.ends_with(".toml")
            {
                *c = resolve(&base, Path::new(c)).display().to_string();
            }
        }
        let what = path.display();
        let mut seen = std::collections::BTreeSet::new();
        let mut caches = Vec::new();
        for (i, v) in file.cache_variants.iter().enumerate() {
            let name = variant_name(v, "cache_variant", i, &mut seen)?;
            let cache = overlay(
                &file.cache,
                v,
                &format!("{what}: [[cache_variant]] `{name}`"),
            )?;
            caches.push(CacheVariant {
                name: Some(name),
                cache,
            });
        }
        if caches.is_empty() {
            caches.push(CacheVariant {
                name: None,
                cache: file.cache.clone(),
            });
        }
        let mut seen = std::collections::BTreeSet::new();
        let mut recipes = Vec::new();
        for (i, r) in file.recipes.iter().enumerate() {
            let name = variant_name(r, "recipe", i, &mut seen)?;
            for key in ["seed", "seeds", "ce_baseline"] {
                if r.contains_key(key) {
                    bail!(
                        "{what}: [[recipe]] `{name}` sets `{key}`: that is one setting for the whole pipeline; set it in [train]"
                    );
                }
            }
            let train = overlay(&file.train, r, &format!("{what}: [[recipe]] `{name}`"))?;
            recipes.push(Recipe {
                name: Some(name),
                train,
            });
        }
        if recipes.is_empty() {
            recipes.push(Recipe {
                name: None,
                train: file.train.clone(),
            });
        }
        let seeds = match &file.train.seeds {
            None => vec![file.train.seed],
            Some(s) if s.is_empty() => {
                bail!("{what}: [train] seeds is empty; list at least one seed, or remove it")
            }
            Some(_) if file.train.seed != 0 => bail!(
                "{what}: [train] sets both `seed` and `seeds`; keep one (`seeds = [0, 1, 2]` trains every run once per seed)"
            ),
            Some(s) => {
                let mut u = s.clone();
                u.sort_unstable();
                u.dedup();
                if u.len() != s.len() {
                    bail!("{what}: [train] seeds lists a seed twice: {s:?}");
                }
                s.clone()
            }
        };
        let p = Pipeline {
            path: path.to_path_buf(),
            name: file.name.clone().unwrap_or(stem),
            out,
            file,
            caches,
            recipes,
            seeds,
        };
        p.check()?;
        Ok(p)
    }

    /// Whether runs are trained with an explicit list of seeds (`[train] seeds`): their
    /// directories then end in `seed-N`.
    pub fn seed_dirs(&self) -> bool {
        self.file.train.seeds.is_some()
    }

    /// Whether the pipeline compares caches, recipes or seeds (the report's fidelity part).
    pub fn is_grid(&self) -> bool {
        self.caches.len() > 1 || self.recipes.len() > 1 || self.seeds.len() > 1
    }

    fn check(&self) -> anyhow::Result<()> {
        let f = &self.file;
        let what = self.path.display();
        if f.data.corpus.is_empty() {
            bail!("{what}: [data] corpus is empty; list the corpus files or directories");
        }
        for c in &f.data.corpus {
            if !c.exists() {
                bail!("{what}: corpus {} does not exist", c.display());
            }
        }
        if let Some(t) = &f.data.tokenizer
            && !t.is_file()
        {
            bail!("{what}: tokenizer {} does not exist", t.display());
        }
        if !(0.0 < f.data.eval_fraction && f.data.eval_fraction < 1.0) {
            bail!(
                "{what}: [data] eval_fraction must be in (0, 1): every run is compared on the held-out split"
            );
        }
        if f.teachers.is_empty() {
            bail!("{what}: no [[teacher]]; add at least one (an `onnx` file or an architecture)");
        }
        if f.students.is_empty() {
            bail!("{what}: no [[student]]; add at least one");
        }
        for r in &self.recipes {
            if r.train.loss == KdLoss::Ce {
                bail!(
                    "{what}: {} loss = \"ce\" would ignore the teachers; use a distillation loss (the CE baseline is `ce_baseline = true`)",
                    r.name
                        .as_ref()
                        .map(|n| format!("[[recipe]] `{n}`"))
                        .unwrap_or("[train]".into())
                );
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for t in &f.teachers {
            if t.name == "ce" || !names.insert(t.name.clone()) {
                bail!(
                    "{what}: teacher name `{}` is used twice or reserved (`ce` names the baselines)",
                    t.name
                );
            }
            if t.name.is_empty() || t.name.contains(['/', '\\']) {
                bail!(
                    "{what}: teacher name `{}` must be a plain file name",
                    t.name
                );
            }
            match (&t.onnx, t.config.is_some() || t.arch.is_some()) {
                (Some(_), true) => bail!(
                    "{what}: teacher {}: give `onnx` or an architecture, not both",
                    t.name
                ),
                (None, false) => bail!(
                    "{what}: teacher {}: give `onnx = \"model.onnx\"` or an architecture to pretrain (`config` or `arch`)",
                    t.name
                ),
                (Some(o), false) if !o.is_file() => {
                    bail!("{what}: teacher {}: {} does not exist", t.name, o.display())
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The teachers, architectures resolved against the tokenizer's vocabulary.
    pub fn teachers(&self, vocab: usize) -> anyhow::Result<Vec<(String, TeacherSource)>> {
        let tt = self.teacher_train();
        self.file
            .teachers
            .iter()
            .map(|t| {
                let src = match &t.onnx {
                    Some(p) => TeacherSource::Onnx {
                        path: p.clone(),
                        params: t.params,
                    },
                    None => TeacherSource::Train {
                        arch: arch_of(
                            &self.path,
                            &format!("teacher {}", t.name),
                            Some(&t.name),
                            &t.config,
                            &t.arch,
                            vocab,
                        )?,
                        steps: t.steps.unwrap_or(tt.steps),
                        lr: t.lr.unwrap_or(tt.lr),
                    },
                };
                Ok((t.name.clone(), src))
            })
            .collect()
    }

    /// The students, named (entry name, else the config's name), names unique.
    pub fn students(&self, vocab: usize) -> anyhow::Result<Vec<StudentConfig>> {
        let mut out: Vec<StudentConfig> = Vec::new();
        for (i, s) in self.file.students.iter().enumerate() {
            let c = arch_of(
                &self.path,
                &format!("student {}", i + 1),
                s.name.as_deref(),
                &s.config,
                &s.arch,
                vocab,
            )?;
            if out.iter().any(|o| o.name == c.name) {
                bail!(
                    "{}: two students are named `{}`; give each a `name`",
                    self.path.display(),
                    c.name
                );
            }
            out.push(c);
        }
        Ok(out)
    }

    /// Settings for pretraining teachers.
    pub fn teacher_train(&self) -> TrainSection {
        self.file
            .teacher_train
            .clone()
            .unwrap_or_else(|| self.file.train.clone())
    }
}

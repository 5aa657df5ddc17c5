//! The files of a run directory (`OUT/<student>/`, written by `logitcache train`) as types:
//! `checkpoint/train_config.json` ([`TrainConfigFile`]) and the lines of `metrics.jsonl`
//! ([`TrainLine`] every `log_every` steps, [`EvalLine`] after each evaluation), with the
//! readers the pipeline and the report use ([`RunDir::evals`], [`RunDir::last_eval`]).
//!
//! Both files are written through `serde_json::Value`, whose maps are sorted (serde_json
//! without `preserve_order`): keys come out in alphabetical order at every level, as they
//! always have, so the bytes of old and new runs agree whatever the field order in Rust.
//!
//! ```no_run
//! use logitcache::student::run_dir::RunDir;
//! let run = RunDir::new("runs/micro");
//! for e in run.evals() {
//!     println!("step {}: held-out loss {:.4}", e.step, e.metrics.eval_loss);
//! }
//! ```

use super::arch::StudentConfig;
use super::config::TrainConfig;
use super::eval::{EvalMetrics, nan_if_null};
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

/// A run directory, `OUT/<student>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir {
    pub path: PathBuf,
}

impl RunDir {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        RunDir { path: path.into() }
    }

    /// `RUN_DIR/checkpoint`: the latest complete checkpoint.
    pub fn checkpoint(&self) -> PathBuf {
        self.path.join("checkpoint")
    }

    /// `RUN_DIR/metrics.jsonl`.
    pub fn metrics(&self) -> PathBuf {
        self.path.join("metrics.jsonl")
    }

    /// The `metrics.jsonl` lines that parse as `T`, in order (none without the file).
    fn lines<T: serde::de::DeserializeOwned>(&self) -> Vec<T> {
        std::fs::read_to_string(self.metrics())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<T>(l).ok())
            .collect()
    }

    /// The run's evaluation records, in order (none when there is no `metrics.jsonl`).
    pub fn evals(&self) -> Vec<EvalLine> {
        self.lines()
    }

    /// The run's training records, in order (none when there is no `metrics.jsonl`).
    pub fn train_lines(&self) -> Vec<TrainLine> {
        self.lines()
    }

    /// The run's final evaluation.
    pub fn last_eval(&self) -> Option<EvalLine> {
        self.evals().pop()
    }
}

/// `checkpoint/train_config.json`: how the run was trained, and what.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfigFile {
    pub train: TrainConfig,
    pub student: StudentConfig,
}

impl TrainConfigFile {
    /// The file's bytes: pretty JSON, keys sorted.
    pub fn to_json(&self) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec_pretty(&serde_json::to_value(self)?)
    }

    /// Parses the file at `path` from `bytes`; errors say which part is damaged.
    pub fn parse(bytes: &[u8], path: &Path) -> anyhow::Result<Self> {
        let tc: serde_json::Value = serde_json::from_slice(bytes)
            .with_context(|| format!("{} is damaged", path.display()))?;
        let student = serde_json::from_value(tc["student"].clone())
            .context("checkpoint/train_config.json has no valid `student`")?;
        let train = serde_json::from_value(tc["train"].clone())
            .context("checkpoint/train_config.json has no valid `train`")?;
        Ok(TrainConfigFile { train, student })
    }
}

/// A `metrics.jsonl` line written every `log_every` steps (and at the last step).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainLine {
    pub step: usize,
    /// The step's loss (what is differentiated).
    #[serde(deserialize_with = "nan_if_null")]
    pub loss: f64,
    /// Its mean divergence, before T² and the weight.
    #[serde(deserialize_with = "nan_if_null")]
    pub kd: f64,
    /// Its mean next-token cross-entropy.
    #[serde(deserialize_with = "nan_if_null")]
    pub ce: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub lr: f64,
    /// Global gradient norm before clipping.
    #[serde(deserialize_with = "nan_if_null")]
    pub grad_norm: f64,
    /// Tokens trained on so far.
    pub tokens: u64,
    /// Tokens per second since the previous train line.
    #[serde(deserialize_with = "nan_if_null")]
    pub tokens_per_s: f64,
}

/// A `metrics.jsonl` line written after each evaluation on the held-out split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalLine {
    #[serde(flatten)]
    pub metrics: EvalMetrics,
    pub step: usize,
}

/// The text of one JSON line: compact, keys sorted.
pub fn json_line<T: Serialize>(line: &T) -> serde_json::Result<String> {
    Ok(serde_json::to_value(line)?.to_string())
}

/// `metrics.jsonl`, open for appending lines.
pub struct MetricsWriter {
    file: std::fs::File,
    path: PathBuf,
}

impl MetricsWriter {
    /// Starts `run`'s `metrics.jsonl` at `step`: keeps the lines of steps up to `step`
    /// (those of the checkpoint a run resumes from) and drops later ones.
    pub fn open(run: &RunDir, step: usize) -> anyhow::Result<Self> {
        #[derive(Deserialize)]
        struct Step {
            step: u64,
        }
        let path = run.metrics();
        let text = match std::fs::read(&path) {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let kept: Vec<String> = text
            .lines()
            .filter(|l| serde_json::from_str::<Step>(l).is_ok_and(|s| (s.step as usize) <= step))
            .map(String::from)
            .collect();
        // Rewritten atomically: a run killed here keeps every line it had.
        let mut text = String::new();
        for l in &kept {
            text.push_str(l);
            text.push('\n');
        }
        crate::util::write_atomic(&path, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok(MetricsWriter { file, path })
    }

    /// Appends `line` and flushes; returns the line's text.
    pub fn write<T: Serialize>(&mut self, line: &T) -> anyhow::Result<String> {
        let text = json_line(line)?;
        writeln!(self.file, "{text}")
            .and_then(|()| self.file.flush())
            .with_context(|| format!("writing {}", self.path.display()))?;
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_keep_their_sorted_keys_and_read_back() {
        let t = TrainLine {
            step: 10,
            loss: 2.5,
            kd: 2.0,
            ce: 0.0,
            lr: 1e-3,
            grad_norm: f64::NAN,
            tokens: 640,
            tokens_per_s: 1234.5,
        };
        // What `serde_json::json!` wrote before these types existed (keys sorted, NaN null).
        let old = serde_json::json!({
            "step": 10usize, "loss": 2.5, "kd": 2.0, "ce": 0.0, "lr": 1e-3, "grad_norm": f64::NAN,
            "tokens": 640u64, "tokens_per_s": 1234.5,
        });
        assert_eq!(json_line(&t).unwrap(), old.to_string());
        let back: TrainLine = serde_json::from_str(&json_line(&t).unwrap()).unwrap();
        assert!(back.grad_norm.is_nan() && back.tokens == 640);
        let e = EvalLine {
            metrics: EvalMetrics {
                eval_loss: 3.0,
                eval_ppl: 3f64.exp(),
                eval_kl: 0.5,
                eval_top1: 0.25,
                eval_tokens: 99,
            },
            step: 10,
        };
        let mut old = serde_json::to_value(&e.metrics).unwrap();
        old["step"] = 10usize.into();
        assert_eq!(json_line(&e).unwrap(), old.to_string());
        assert_eq!(
            serde_json::from_str::<EvalLine>(&json_line(&e).unwrap()).unwrap(),
            e
        );
        // A train line is not an eval line.
        assert!(serde_json::from_str::<EvalLine>(&json_line(&t).unwrap()).is_err());
    }

    #[test]
    fn train_config_json_is_what_json_wrote_before() {
        let file = TrainConfigFile {
            train: TrainConfig {
                cache: "c".into(),
                tokenizer: "t.json".into(),
                out: "o".into(),
                device: crate::device::Device::Cuda(1),
                ..Default::default()
            },
            student: StudentConfig::load("nano", 300).unwrap(),
        };
        let old = serde_json::json!({"train": file.train, "student": file.student});
        let bytes = file.to_json().unwrap();
        assert_eq!(bytes, serde_json::to_vec_pretty(&old).unwrap());
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(text.contains("\"device\": \"cuda:1\""), "{text}");
        let back = TrainConfigFile::parse(&bytes, Path::new("train_config.json")).unwrap();
        assert_eq!(back, file);
    }

    #[test]
    fn metrics_writer_keeps_lines_up_to_the_resumed_step() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::new(dir.path());
        std::fs::write(
            run.metrics(),
            "{\"step\":1}\n{\"step\":2}\nnot json\n{\"step\":3}\n",
        )
        .unwrap();
        let mut w = MetricsWriter::open(&run, 2).unwrap();
        w.write(&serde_json::json!({"step": 3})).unwrap();
        assert_eq!(
            std::fs::read_to_string(run.metrics()).unwrap(),
            "{\"step\":1}\n{\"step\":2}\n{\"step\":3}\n"
        );
    }
}

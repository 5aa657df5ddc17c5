//! How a student is trained: [`TrainConfig`], with every default a `DEFAULT_*` constant
//! (the `train` flags take theirs from here, and so does `logitcache run`).
//!
//! The config is saved in each run directory's `checkpoint/train_config.json` (see
//! [`super::run_dir`]) and hashed into pipeline fingerprints, so its serde form — field
//! names, order and values — is part of the run format.
//!
//! ```
//! use logitcache::student::config::TrainConfig;
//! let cfg = TrainConfig {
//!     cache: "cache/".into(),
//!     tokenizer: "tokenizer.json".into(),
//!     out: "runs/".into(),
//!     steps: 200,
//!     ..Default::default()
//! };
//! cfg.validate().unwrap();
//! assert_eq!(cfg.lr_at(0), cfg.lr / cfg.warmup as f64);
//! ```

use crate::device::Device;
use crate::loss::{KdLoss, LossConfig};
use crate::progress::ProgressMode;
use anyhow::bail;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Optimizer steps.
pub const DEFAULT_STEPS: usize = 1000;
/// Sequences (cache windows) per micro-batch.
pub const DEFAULT_BATCH_SIZE: usize = 8;
/// Micro-batches accumulated per optimizer step.
pub const DEFAULT_GRAD_ACCUM: usize = 1;
/// Peak learning rate (AdamW).
pub const DEFAULT_LR: f64 = 1e-3;
/// The cosine schedule ends at `lr / DEFAULT_MIN_LR_DIVISOR` unless a `min_lr` is given.
pub const DEFAULT_MIN_LR_DIVISOR: f64 = 10.0;
/// Linear warmup steps.
pub const DEFAULT_WARMUP: usize = 100;
/// Global gradient-norm clip (0 = none).
pub const DEFAULT_GRAD_CLIP: f64 = 1.0;
/// AdamW defaults of PyTorch (burn's differ: eps 1e-5, weight decay 1e-4).
pub const DEFAULT_BETA1: f64 = 0.9;
/// AdamW β2 (PyTorch default).
pub const DEFAULT_BETA2: f64 = 0.999;
/// AdamW ε (PyTorch default).
pub const DEFAULT_EPS: f64 = 1e-8;
/// AdamW weight decay (PyTorch default).
pub const DEFAULT_WEIGHT_DECAY: f64 = 0.01;
/// Seed of the initial weights and the data order.
pub const DEFAULT_SEED: u64 = 0;
/// Evaluate every N steps (0 = only at the end).
pub const DEFAULT_EVAL_EVERY: usize = 0;
/// Batches per evaluation.
pub const DEFAULT_EVAL_BATCHES: usize = 50;
/// Fraction of sequences held out for evaluation (chosen by `seq_id` hash).
pub const DEFAULT_EVAL_FRACTION: f64 = 0.02;
/// Save a checkpoint every N steps (0 = only at the end).
pub const DEFAULT_SAVE_EVERY: usize = 0;
/// Write a metrics line every N steps.
pub const DEFAULT_LOG_EVERY: usize = 10;
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
    /// `cpu` or `cuda:N`, saved as that text.
    pub device: Device,
    #[serde(skip)]
    pub progress: Option<ProgressMode>,
    /// Stop (with a checkpoint) after this step.
    #[serde(skip)]
    pub stop_after: Option<usize>,
}

impl Default for TrainConfig {
    /// The `train` defaults, with empty `cache`, `tokenizer` and `out` paths to fill in.
    fn default() -> Self {
        TrainConfig {
            cache: PathBuf::new(),
            tokenizer: PathBuf::new(),
            out: PathBuf::new(),
            steps: DEFAULT_STEPS,
            batch_size: DEFAULT_BATCH_SIZE,
            grad_accum: DEFAULT_GRAD_ACCUM,
            lr: DEFAULT_LR,
            min_lr: TrainConfig::default_min_lr(DEFAULT_LR),
            warmup: DEFAULT_WARMUP,
            weight_decay: DEFAULT_WEIGHT_DECAY,
            beta1: DEFAULT_BETA1,
            beta2: DEFAULT_BETA2,
            eps: DEFAULT_EPS,
            grad_clip: DEFAULT_GRAD_CLIP,
            loss: LossConfig::default(),
            seed: DEFAULT_SEED,
            eval_every: DEFAULT_EVAL_EVERY,
            eval_batches: DEFAULT_EVAL_BATCHES,
            eval_fraction: DEFAULT_EVAL_FRACTION,
            save_every: DEFAULT_SAVE_EVERY,
            log_every: DEFAULT_LOG_EVERY,
            loss_chunk: DEFAULT_LOSS_CHUNK,
            device: Device::Cpu,
            progress: None,
            stop_after: None,
        }
    }
}

impl TrainConfig {
    /// The final learning rate of the cosine schedule when none is given for peak `lr`.
    pub fn default_min_lr(lr: f64) -> f64 {
        lr / DEFAULT_MIN_LR_DIVISOR
    }

    /// Checks the settings before any work starts; errors name the flag to change.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.steps == 0 || self.batch_size == 0 || self.grad_accum == 0 {
            bail!("--steps, --batch-size and --grad-accum must be at least 1");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            bail!("--lr must be a finite number > 0 (got {})", self.lr);
        }
        if !(self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            bail!(
                "--min-lr must be in [0, --lr] (got {} with --lr {}): the cosine schedule decays from --lr down to it",
                self.min_lr,
                self.lr
            );
        }
        for (flag, v) in [("--beta1", self.beta1), ("--beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                bail!("{flag} must be in [0, 1) (got {v}); AdamW's defaults are 0.9 and 0.999");
            }
        }
        for (flag, v, min) in [
            ("--weight-decay", self.weight_decay, "≥ 0"),
            ("--grad-clip", self.grad_clip, "≥ 0 (0 = no clipping)"),
            ("--kd-weight", self.loss.kd_weight, "≥ 0"),
            ("--ce-weight", self.loss.ce_weight, "≥ 0"),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                bail!("{flag} must be a finite number {min} (got {v})");
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            bail!("--eps must be a finite number > 0 (got {})", self.eps);
        }
        if !(self.loss.temperature.is_finite() && self.loss.temperature > 0.0) {
            bail!("--temperature must be a finite number > 0");
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
        self.device.check_trainable().map_err(anyhow::Error::msg)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_documented_constants() {
        let c = TrainConfig::default();
        assert_eq!((c.steps, c.batch_size, c.grad_accum), (1000, 8, 1));
        assert_eq!((c.lr, c.min_lr, c.warmup), (1e-3, 1e-3 / 10.0, 100));
        assert_eq!(
            (c.beta1, c.beta2, c.eps, c.weight_decay),
            (0.9, 0.999, 1e-8, 0.01)
        );
        assert_eq!(
            (c.grad_clip, c.seed, c.eval_every, c.eval_batches),
            (1.0, 0, 0, 50)
        );
        assert_eq!((c.eval_fraction, c.save_every, c.log_every), (0.02, 0, 10));
        assert_eq!((c.loss_chunk, c.device), (1024, Device::Cpu));
        assert_eq!(c.loss, LossConfig::default());
    }

    #[test]
    fn bad_values_are_refused_naming_their_flag() {
        type Edit = fn(&mut TrainConfig);
        let cases: [(Edit, &str); 11] = [
            (
                |c| c.loss.kd_weight = -1.0,
                "--kd-weight must be a finite number ≥ 0",
            ),
            (|c| c.loss.ce_weight = f64::NAN, "--ce-weight must be"),
            (|c| c.beta1 = 1.0, "--beta1 must be in [0, 1) (got 1)"),
            (|c| c.beta2 = -0.1, "--beta2 must be in [0, 1)"),
            (
                |c| c.grad_clip = -1.0,
                "--grad-clip must be a finite number ≥ 0",
            ),
            (
                |c| c.min_lr = 1.0,
                "--min-lr must be in [0, --lr] (got 1 with --lr 0.001)",
            ),
            (|c| c.min_lr = -1e-4, "--min-lr must be in [0, --lr]"),
            (
                |c| c.weight_decay = f64::NAN,
                "--weight-decay must be a finite number ≥ 0 (got NaN)",
            ),
            (|c| c.eps = 0.0, "--eps must be a finite number > 0"),
            (
                |c| c.loss.temperature = f64::INFINITY,
                "--temperature must be a finite number > 0",
            ),
            (|c| c.lr = f64::NAN, "--lr must be a finite number > 0"),
        ];
        TrainConfig::default().validate().unwrap();
        for (edit, want) in cases {
            let mut c = TrainConfig::default();
            edit(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(want), "expected `{want}`, got `{e}`");
        }
    }

    #[test]
    fn the_schedule_warms_up_linearly_then_follows_a_cosine_to_min_lr() {
        let c = TrainConfig {
            lr: 1.0,
            min_lr: 0.1,
            warmup: 4,
            steps: 14,
            ..Default::default()
        };
        // Values worked out by hand: warmup (s + 1) / 4; then 0.1 + 0.45 (1 + cos(π t)),
        // t = (s − 4) / 10.
        for (step, want) in [
            (0, 0.25),
            (1, 0.5),
            (3, 1.0),
            (4, 1.0),
            (9, 0.55),
            (14, 0.1),
            (20, 0.1),
        ] {
            let got = c.lr_at(step);
            assert!((got - want).abs() < 1e-12, "step {step}: {got} vs {want}");
        }
        let after: Vec<f64> = (4..=14).map(|s| c.lr_at(s)).collect();
        assert!(after.windows(2).all(|w| w[1] <= w[0]), "{after:?}");
        // No warmup: the first step is at the peak.
        let c = TrainConfig { warmup: 0, ..c };
        assert_eq!(c.lr_at(0), 1.0);
    }

    #[test]
    fn tensorrt_is_refused_for_training() {
        let c = TrainConfig {
            device: Device::TensorRt(0),
            ..Default::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("--device tensorrt:0") && e.contains("cuda:N"),
            "{e}"
        );
    }

    #[test]
    fn serde_form_keeps_the_device_as_text() {
        let c = TrainConfig {
            device: Device::Cuda(1),
            ..Default::default()
        };
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["device"], "cuda:1");
        assert_eq!(serde_json::from_value::<TrainConfig>(v).unwrap(), c);
    }
}

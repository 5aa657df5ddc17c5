//! Distillation losses over a cached sparse teacher distribution.
//!
//! The teacher at each position is p = (top-k ids, their log-probs `lp` [N, k], the log of the
//! tail mass `lpt` [N]); the student gives full-vocabulary logits z [N, V]. At temperature T
//! the student's distribution is q = softmax(z / T); `log q` of the top-k ids is gathered, and
//! the student's own tail is `log(1 − Σ q_top)`, floored at 1e-6 (f32 cancellation makes
//! smaller tails meaningless anyway; the k + 1 outcome losses then stay finite).
//!
//! - `fkl` (default): KL(p ‖ q) over k + 1 outcomes (the tail is one outcome): a proper
//!   divergence between two distributions.
//! - `fkl-topk`: KL after renormalising both over the top-k ids only.
//! - `rkl`: KL(q ‖ p) over the k + 1 outcomes.
//! - `jsd`: generalised Jensen-Shannon, β KL(p ‖ m) + (1-β) KL(q ‖ m), m = β p + (1-β) q.
//! - `ce`: cross-entropy with the next token only (no teacher).
//!
//! The KD term is scaled by T² (Hinton et al.) and mixed with CE: `kd_weight · T² · KD +
//! ce_weight · CE`, each averaged over its positions (`mask` for KD, `target_mask` for CE;
//! empty masks give 0, not NaN). Shapes: logits [N, V], ids [N, k], log-probs [N, k],
//! tail [N], masks [N], targets [N]; N is positions (batch × sequence, flattened).

use burn::prelude::*;
use serde::{Deserialize, Serialize};

/// Teacher log-probabilities below this count as zero probability (finite, so `0 · log 0`
/// terms stay 0 instead of NaN).
const LOG_ZERO: f64 = -1e4;
/// Smallest student tail mass used in `log q_tail` (below it the log is clamped).
const TAIL_FLOOR: f64 = 1e-6;

/// Which distillation divergence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum KdLoss {
    Fkl,
    FklTopk,
    Rkl,
    Jsd,
    Ce,
}

/// Loss settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossConfig {
    pub kind: KdLoss,
    pub kd_weight: f64,
    pub ce_weight: f64,
    pub temperature: f64,
    /// β of the generalised JSD.
    pub jsd_beta: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig {
            kind: KdLoss::Fkl,
            kd_weight: 1.0,
            ce_weight: 0.0,
            temperature: 1.0,
            jsd_beta: 0.5,
        }
    }
}

/// The teacher side of a batch, flattened to positions.
#[derive(Debug, Clone)]
pub struct Targets<B: Backend> {
    pub topk_ids: Tensor<B, 2, Int>,
    pub topk_logprobs: Tensor<B, 2>,
    pub tail_logprob: Tensor<B, 1>,
    pub mask: Tensor<B, 1>,
    pub target_ids: Tensor<B, 1, Int>,
    pub target_mask: Tensor<B, 1>,
}

impl<B: Backend> Targets<B> {
    /// Rows `start..start + len`.
    pub fn narrow(&self, start: usize, len: usize) -> Self {
        Targets {
            topk_ids: self.topk_ids.clone().narrow(0, start, len),
            topk_logprobs: self.topk_logprobs.clone().narrow(0, start, len),
            tail_logprob: self.tail_logprob.clone().narrow(0, start, len),
            mask: self.mask.clone().narrow(0, start, len),
            target_ids: self.target_ids.clone().narrow(0, start, len),
            target_mask: self.target_mask.clone().narrow(0, start, len),
        }
    }
}

/// Loss terms (each a `[1]` tensor): `total` is what to differentiate.
#[derive(Debug, Clone)]
pub struct LossParts<B: Backend> {
    pub total: Tensor<B, 1>,
    /// Mean divergence (before T² and the weight).
    pub kd: Tensor<B, 1>,
    pub ce: Tensor<B, 1>,
}

fn logsumexp<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let m = x.clone().max_dim(1).detach();
    (x - m.clone()).exp().sum_dim(1).log() + m
}

/// Per-position divergence `[N, 1]` between the teacher and the student logits at T.
pub fn divergence<B: Backend>(
    logits: Tensor<B, 2>,
    t: &Targets<B>,
    cfg: &LossConfig,
) -> Tensor<B, 2> {
    let n = logits.dims()[0];
    // At T = 1 skip the division: it is a full [N, V] pass forward and backward.
    let z = if cfg.temperature == 1.0 {
        logits
    } else {
        logits / cfg.temperature
    };
    let lse = logsumexp(z.clone());
    let lq = z.clone().gather(1, t.topk_ids.clone()) - lse.clone();
    let lp = t.topk_logprobs.clone().clamp_min(LOG_ZERO);
    let lpt = t.tail_logprob.clone().clamp_min(LOG_ZERO).reshape([n, 1]);
    if cfg.kind == KdLoss::FklTopk {
        let lpn = lp.clone() - logsumexp(lp);
        let lqn = lq.clone() - logsumexp(lq);
        return (lpn.clone().exp() * (lpn - lqn)).sum_dim(1);
    }
    // The student's tail: log(1 − Σ q_top). Only [N, k] work (a masked log-sum-exp over
    // [N, V] costs several full-vocabulary passes forward and backward); the floor keeps it
    // finite when the student puts (almost) all its mass on the teacher's top-k.
    let lqt = (lq.clone().exp().sum_dim(1).neg() + 1.0)
        .clamp_min(TAIL_FLOOR)
        .log();
    let (p, pt) = (lp.clone().exp(), lpt.clone().exp());
    // Positions whose teacher has no tail (k = V, or an underflowed tail) have no tail
    // outcome: there the student's floored tail must not count.
    let has_tail = lpt.clone().greater_elem(LOG_ZERO / 2.0).float();
    let (qt, lqt) = (lqt.clone().exp() * has_tail.clone(), lqt);
    match cfg.kind {
        KdLoss::Fkl => (p * (lp - lq)).sum_dim(1) + pt * (lpt - lqt),
        KdLoss::Rkl => {
            let q = lq.clone().exp();
            (q * (lq - lp)).sum_dim(1) + qt * (lqt - lpt)
        }
        KdLoss::Jsd => {
            let b = cfg.jsd_beta;
            let q = lq.clone().exp();
            let lm = (p.clone() * b + q.clone() * (1.0 - b))
                .clamp_min(1e-30)
                .log();
            let lmt = (pt.clone() * b + qt.clone() * (1.0 - b))
                .clamp_min(1e-30)
                .log();
            let kl_pm = (p * (lp - lm.clone())).sum_dim(1) + pt * (lpt - lmt.clone());
            let kl_qm = (q * (lq - lm)).sum_dim(1) + qt * (lqt - lmt);
            kl_pm * b + kl_qm * (1.0 - b)
        }
        KdLoss::FklTopk | KdLoss::Ce => unreachable!("handled above"),
    }
}

/// Per-position next-token cross-entropy `[N, 1]` at temperature 1.
pub fn cross_entropy<B: Backend>(
    logits: Tensor<B, 2>,
    target_ids: Tensor<B, 1, Int>,
) -> Tensor<B, 2> {
    let n = target_ids.dims()[0];
    let lse = logsumexp(logits.clone());
    lse - logits.gather(1, target_ids.reshape([n, 1]))
}

/// The loss over `logits` [N, V]. `kd_count` / `ce_count` are the numbers of KD and CE
/// positions of the whole batch (so the losses of chunks of a batch add up to the batch's
/// mean); pass `None` to average over this call's own masks.
pub fn loss<B: Backend>(
    logits: Tensor<B, 2>,
    t: &Targets<B>,
    cfg: &LossConfig,
    counts: Option<(f64, f64)>,
) -> LossParts<B> {
    let n = logits.dims()[0];
    let (kd_count, ce_count) = counts.unwrap_or_else(|| {
        (
            t.mask.clone().sum().into_scalar().elem::<f64>(),
            t.target_mask.clone().sum().into_scalar().elem::<f64>(),
        )
    });
    let dev = logits.device();
    let zero = || Tensor::<B, 1>::zeros([1], &dev);
    let use_kd = cfg.kind != KdLoss::Ce && cfg.kd_weight != 0.0;
    let use_ce = cfg.kind == KdLoss::Ce || cfg.ce_weight != 0.0;
    let kd = if use_kd {
        let d = divergence(logits.clone(), t, cfg).reshape([n]);
        (d * t.mask.clone()).sum() / kd_count.max(1.0)
    } else {
        zero()
    };
    let ce = if use_ce {
        let c = cross_entropy(logits, t.target_ids.clone()).reshape([n]);
        (c * t.target_mask.clone()).sum() / ce_count.max(1.0)
    } else {
        zero()
    };
    let ce_weight = if cfg.kind == KdLoss::Ce {
        1.0
    } else {
        cfg.ce_weight
    };
    let kd_scale = cfg.kd_weight * cfg.temperature * cfg.temperature;
    let total = kd.clone() * if use_kd { kd_scale } else { 0.0 } + ce.clone() * ce_weight;
    LossParts { total, kd, ce }
}

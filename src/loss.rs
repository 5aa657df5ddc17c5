//! Distillation losses over a cached sparse teacher distribution.
//!
//! The teacher at each position is p = (top-k ids, their log-probs `lp` [N, k], the log of the
//! tail mass `lpt` [N]); the student gives full-vocabulary logits z [N, V]. At temperature T
//! the student's distribution is q = softmax(z / T); `log q` of the top-k ids is gathered, and
//! the student's own tail is a log-sum-exp over its logits outside the top-k (log space, so
//! it stays exact when the student puts almost all its mass on the top-k).
//!
//! A `sample` or `hybrid` cache arrives as a sparse estimate p̂ of the whole distribution
//! (`cache::stream`): its entries sum to 1 (on average, for importance-weighted draws from a
//! proposal other than p) and there is no tail outcome, so `fkl` is
//! Σ p̂ (log p̂ − log q) with q over the full vocabulary: cross-entropy against the estimate
//! (plus its constant entropy), whose gradient (q − p̂)/T is unbiased for the full-KD one.
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
//!
//! [`loss`] is what training differentiates; [`divergence`] is the per-position KD term
//! alone, for a [`Divergence`] (the teacher-based kinds: `ce` has none, so asking for its
//! divergence cannot be written).
//!
//! ```
//! use logitcache::loss::{Divergence, KdLoss, LossConfig};
//! let cfg = LossConfig { kind: KdLoss::Jsd, ..Default::default() };
//! assert_eq!(cfg.divergence(), Some(Divergence::Jsd { beta: 0.5 }));
//! assert_eq!(LossConfig { kind: KdLoss::Ce, ..cfg }.divergence(), None);
//! ```

use burn::prelude::*;
use serde::{Deserialize, Serialize};

/// Teacher log-probabilities below this count as zero probability (finite, so `0 · log 0`
/// terms stay 0 instead of NaN).
const LOG_ZERO: f64 = -1e4;

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

/// The distillation loss when none is given: KL with the tail as one outcome.
pub const DEFAULT_KIND: KdLoss = KdLoss::Fkl;
/// Weight of the KD term (before T²): distillation only, by default.
pub const DEFAULT_KD_WEIGHT: f64 = 1.0;
/// Weight of the next-token CE term: off by default (`--ce-weight 1` is the usual mix).
pub const DEFAULT_CE_WEIGHT: f64 = 0.0;
/// Distillation temperature; `train` uses the cache's instead when none is given.
pub const DEFAULT_TEMPERATURE: f64 = 1.0;
/// β of the generalised JSD: 0.5 is the symmetric Jensen-Shannon divergence.
pub const DEFAULT_JSD_BETA: f64 = 0.5;

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
            kind: DEFAULT_KIND,
            kd_weight: DEFAULT_KD_WEIGHT,
            ce_weight: DEFAULT_CE_WEIGHT,
            temperature: DEFAULT_TEMPERATURE,
            jsd_beta: DEFAULT_JSD_BETA,
        }
    }
}

/// A divergence between the teacher's and the student's distributions: the [`KdLoss`]
/// kinds that use the teacher (`ce` does not, so it has no value here).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Divergence {
    /// KL(p ‖ q) over the k + 1 outcomes.
    Fkl,
    /// KL(p ‖ q) renormalised over the top-k ids.
    FklTopk,
    /// KL(q ‖ p) over the k + 1 outcomes.
    Rkl,
    /// β KL(p ‖ m) + (1-β) KL(q ‖ m), m = β p + (1-β) q.
    Jsd { beta: f64 },
}

impl KdLoss {
    /// The flag value (`--loss NAME`).
    pub fn name(self) -> &'static str {
        match self {
            KdLoss::Fkl => "fkl",
            KdLoss::FklTopk => "fkl-topk",
            KdLoss::Rkl => "rkl",
            KdLoss::Jsd => "jsd",
            KdLoss::Ce => "ce",
        }
    }
}

impl LossConfig {
    /// The divergence of the KD term, `None` for `ce` (no teacher term).
    pub fn divergence(&self) -> Option<Divergence> {
        match self.kind {
            KdLoss::Fkl => Some(Divergence::Fkl),
            KdLoss::FklTopk => Some(Divergence::FklTopk),
            KdLoss::Rkl => Some(Divergence::Rkl),
            KdLoss::Jsd => Some(Divergence::Jsd {
                beta: self.jsd_beta,
            }),
            KdLoss::Ce => None,
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

/// Per-position divergence `kind` `[N, 1]` between the teacher (`t`) and the student
/// `logits` [N, V] at `temperature` (not scaled by T²). Every [`Divergence`] is defined, so
/// this never panics; get one from a config with [`LossConfig::divergence`].
pub fn divergence<B: Backend>(
    logits: Tensor<B, 2>,
    t: &Targets<B>,
    kind: Divergence,
    temperature: f64,
) -> Tensor<B, 2> {
    let n = logits.dims()[0];
    // At T = 1 skip the division: it is a full [N, V] pass forward and backward.
    let z = if temperature == 1.0 {
        logits
    } else {
        logits / temperature
    };
    let lse = logsumexp(z.clone());
    let lq = z.clone().gather(1, t.topk_ids.clone()) - lse.clone();
    let lp = t.topk_logprobs.clone().clamp_min(LOG_ZERO);
    let lpt = t.tail_logprob.clone().clamp_min(LOG_ZERO).reshape([n, 1]);
    // The tail terms, for the kinds that have the tail as an outcome. The student's tail is
    // a log-sum-exp over its logits outside the teacher's top-k, in log space: exact however
    // much mass the student puts on the top-k (`log(1 − Σ q_top)` cancels in f32 exactly
    // when k is large, and needed a floor). The masked ids get a large negative logit
    // rather than −inf, so a row whose top-k is the whole vocabulary stays finite. Positions
    // whose teacher has no tail (k = V, an underflowed tail, or a sampled cache's estimate)
    // have no tail outcome: there the student's tail must not count (`qt` is 0, `pt` is 0).
    let tail = || {
        let v = z.dims()[1];
        let k = t.topk_ids.dims()[1];
        let in_top = Tensor::<B, 2>::zeros([n, v], &z.device())
            .scatter(
                1,
                t.topk_ids.clone(),
                Tensor::<B, 2>::ones([n, k], &z.device()),
                burn::tensor::IndexingUpdateOp::Add,
            )
            .greater_elem(0.5);
        let lqt =
            (logsumexp(z.clone().mask_fill(in_top, LOG_ZERO)) - lse.clone()).clamp_min(LOG_ZERO);
        let (p, pt) = (lp.clone().exp(), lpt.clone().exp());
        let has_tail = lpt.clone().greater_elem(LOG_ZERO / 2.0).float();
        let qt = lqt.clone().exp() * has_tail;
        (p, pt, qt, lqt)
    };
    match kind {
        Divergence::FklTopk => {
            let lpn = lp.clone() - logsumexp(lp);
            let lqn = lq.clone() - logsumexp(lq);
            (lpn.clone().exp() * (lpn - lqn)).sum_dim(1)
        }
        Divergence::Fkl => {
            let (p, pt, _, lqt) = tail();
            (p * (lp - lq)).sum_dim(1) + pt * (lpt - lqt)
        }
        Divergence::Rkl => {
            let (_, _, qt, lqt) = tail();
            let q = lq.clone().exp();
            (q * (lq - lp)).sum_dim(1) + qt * (lqt - lpt)
        }
        Divergence::Jsd { beta: b } => {
            let (p, pt, qt, lqt) = tail();
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
    let kd_kind = cfg.divergence().filter(|_| cfg.kd_weight != 0.0);
    let use_kd = kd_kind.is_some();
    let use_ce = cfg.kind == KdLoss::Ce || cfg.ce_weight != 0.0;
    let kd = match kd_kind {
        Some(kind) => {
            let d = divergence(logits.clone(), t, kind, cfg.temperature).reshape([n]);
            (d * t.mask.clone()).sum() / kd_count.max(1.0)
        }
        None => zero(),
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

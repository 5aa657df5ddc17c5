//! One optimizer step's arithmetic: the loss and gradients of a batch (optionally in
//! chunks of positions, so `[positions, vocab]` logits never exist whole) and global-norm
//! gradient clipping. The loop that calls them is in [`super::train`].
//!
//! ```ignore
//! let (loss, kd, ce, grads) = loss_and_grads(&model, &batch, &cfg.loss, cfg.loss_chunk, 1.0);
//! let mut grads = grads;
//! let norm = clip_global(&model, &mut grads, cfg.grad_clip);
//! let model = optim.step(cfg.lr_at(step), model, grads);
//! ```

use super::data::{inputs, targets};
use super::model::Llama;
use crate::cache::stream::TrainBatch;
use crate::loss::{LossConfig, loss};
use burn::module::{ModuleVisitor, Param};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;

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
    let t = targets::<B>(b, &dev);
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
pub fn clip_global<B: AutodiffBackend>(
    model: &Llama<B>,
    grads: &mut GradientsParams,
    max: f64,
) -> f64 {
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

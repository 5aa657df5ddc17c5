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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::stream::{Cursor, collate};
    use crate::loss::KdLoss;
    use crate::student::arch::{StudentConfig, StudentFile};
    use burn::backend::{Autodiff, Flex};

    type Ad = Autodiff<Flex>;
    const V: usize = 64;
    const K: usize = 4;

    fn student() -> StudentConfig {
        let f = StudentFile {
            hidden_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: Some(1),
            intermediate_size: 32,
            vocab_size: None,
            max_position_embeddings: None,
            rope_theta: None,
            rms_norm_eps: None,
            tie_word_embeddings: Some(false),
        };
        StudentConfig::from_file("t", f, V).unwrap()
    }

    /// Windows `seqs` with a made-up teacher: K distinct top-k ids per position, log-probs
    /// -0.7·(j+1) and the exact tail mass.
    fn batch(seqs: &[Vec<u32>]) -> TrainBatch {
        let w: Vec<(u64, &[u32])> = seqs
            .iter()
            .enumerate()
            .map(|(i, s)| (i as u64, s.as_slice()))
            .collect();
        let mut b = collate(&w, K, Cursor::default());
        for p in 0..b.batch * b.len {
            let mut mass = 0f32;
            for j in 0..K {
                // From the window's token and position only, so a window's targets do not
                // depend on the batch it is in.
                let key = b.input_ids[p] as usize * 7 + (p % b.len) * 3;
                b.topk_ids[p * K + j] = ((key + j * 13 + 1) % V) as u32;
                let lp = -0.7 * (j + 1) as f32;
                b.topk_logprobs[p * K + j] = lp;
                mass += lp.exp();
            }
            b.tail_logprob[p] = (1.0 - mass).ln();
        }
        b
    }

    fn seqs(n: usize, len: usize, salt: u32) -> Vec<Vec<u32>> {
        (0..n)
            .map(|i| {
                (0..len)
                    .map(|t| (i as u32 * 31 + t as u32 * 17 + salt) % V as u32)
                    .collect()
            })
            .collect()
    }

    fn cfg() -> LossConfig {
        LossConfig {
            kind: KdLoss::Fkl,
            kd_weight: 1.0,
            ce_weight: 0.5,
            temperature: 1.0,
            jsd_beta: 0.5,
        }
    }

    /// Every parameter's gradient, flattened, in the model's visiting order.
    fn flat(model: &Llama<Ad>, grads: &GradientsParams) -> Vec<Vec<f32>> {
        struct Collect<'a> {
            grads: &'a GradientsParams,
            out: Vec<Vec<f32>>,
        }
        impl<B: AutodiffBackend> ModuleVisitor<B> for Collect<'_> {
            fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<B, D>>) {
                let g = self
                    .grads
                    .get::<B::InnerBackend, D>(p.id)
                    .expect("a gradient");
                self.out
                    .push(g.into_data().convert::<f32>().into_vec().unwrap());
            }
        }
        let mut c = Collect {
            grads,
            out: Vec::new(),
        };
        model.visit(&mut c);
        c.out
    }

    #[track_caller]
    fn assert_close(a: &[Vec<f32>], b: &[Vec<f32>], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            let scale = x.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
            let diff = x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
            assert!(
                diff <= tol * scale,
                "parameter {i}: max diff {diff} (scale {scale})"
            );
        }
    }

    #[test]
    fn the_chunked_backward_pass_equals_the_whole_one() {
        let dev = Default::default();
        let model = Llama::<Ad>::init(&student(), 3, &dev);
        // Ragged windows, so chunks cross window boundaries and padding.
        let mut s = seqs(3, 11, 5);
        s[1].truncate(6);
        let b = batch(&s);
        let (l0, kd0, ce0, g0) = loss_and_grads(&model, &b, &cfg(), 0, 1.0);
        let whole = flat(&model, &g0);
        for chunk in [1, 5, 7, 32] {
            let (l, kd, ce, g) = loss_and_grads(&model, &b, &cfg(), chunk, 1.0);
            for (x, y) in [(l, l0), (kd, kd0), (ce, ce0)] {
                assert!(
                    (x - y).abs() < 1e-5 * y.abs().max(1.0),
                    "chunk {chunk}: {x} vs {y}"
                );
            }
            assert_close(&flat(&model, &g), &whole, 1e-4);
        }
    }

    #[test]
    fn accumulated_half_batches_equal_the_whole_batch() {
        let dev = Default::default();
        let model = Llama::<Ad>::init(&student(), 4, &dev);
        // Equal lengths: each half has as many positions as the other, so the mean of the
        // two halves' means is the whole batch's mean.
        let s = seqs(4, 9, 2);
        let (_, _, _, g) = loss_and_grads(&model, &batch(&s), &cfg(), 0, 1.0);
        let mut acc = GradientsAccumulator::<Llama<Ad>>::new();
        for half in s.chunks(2) {
            let (_, _, _, g) = loss_and_grads(&model, &batch(half), &cfg(), 0, 0.5);
            acc.accumulate(&model, g);
        }
        assert_close(&flat(&model, &acc.grads()), &flat(&model, &g), 1e-4);
    }

    #[test]
    fn clipping_scales_to_the_global_norm() {
        let dev = Default::default();
        let model = Llama::<Ad>::init(&student(), 5, &dev);
        let b = batch(&seqs(2, 8, 1));
        let (_, _, _, mut g) = loss_and_grads(&model, &b, &cfg(), 0, 1.0);
        let before = flat(&model, &g);
        let norm: f64 = before
            .iter()
            .flatten()
            .map(|&v| (v as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        // Above the norm: nothing changes.
        let reported = clip_global(&model, &mut g, norm * 2.0);
        assert!(
            (reported - norm).abs() < 1e-4 * norm,
            "{reported} vs {norm}"
        );
        assert_close(&flat(&model, &g), &before, 0.0);
        // Below it: every gradient is scaled by max / norm, so the new norm is max.
        let max = norm / 4.0;
        clip_global(&model, &mut g, max);
        let after = flat(&model, &g);
        let new_norm: f64 = after
            .iter()
            .flatten()
            .map(|&v| (v as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        assert!((new_norm - max).abs() < 1e-4 * max, "{new_norm} vs {max}");
        let scaled: Vec<Vec<f32>> = before
            .iter()
            .map(|v| v.iter().map(|x| x * (max / norm) as f32).collect())
            .collect();
        assert_close(&after, &scaled, 1e-4);
    }
}

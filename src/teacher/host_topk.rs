//! The host top-k of a whole batch: the real positions' rows of the teacher's logits
//! reduced by [`TopK::row`] on `threads` scoped threads, each over one contiguous range of
//! rows with its own buffers. One row in 16 has its exact entropy measured too (the
//! manifest's `mean_entropy`; [`super::topk::entropy_measured_at`]).
//!
//! Scoped threads that end with the batch, not a pool: nothing spins or yields on the cores
//! while ONNX Runtime runs the next batch (a rayon pool's idle workers did, measured).
//!
//! ```
//! use logitcache::teacher::backend::BatchTopK;
//! use logitcache::teacher::host_topk::{HostTopK, Logits};
//! // Two positions of a 4-token vocabulary, k = 1.
//! let logits = [0.0f32, 3.0, 1.0, 0.0, 5.0, 0.0, 0.0, 0.0];
//! let mut h = HostTopK::new(1, 1.0, 2);
//! let mut out = BatchTopK {
//!     k: 1, ids: vec![0; 2], logprobs: vec![0.0; 2], tail_logprob: vec![0.0; 2],
//!     ..Default::default()
//! };
//! h.reduce(Logits::F32(&logits), 4, 4, &[(0, 0, 0), (0, 1, 1)], &[0], &mut out).unwrap();
//! assert_eq!(out.ids, [1, 0]);
//! ```

use super::backend::{BatchTopK, TeacherError};
use super::sample::{SampleScratch, Sampler, log_sum_exp};
use super::topk::{TailBlocks, TopK, TopKScratch, entropy_measured_at, row_entropy};
use crate::cache::schema::{CacheMode, Sampling};
use half::f16;

/// The teacher's logits for a batch, `[rows, stride]` row-major, in the model's element type.
#[derive(Debug, Clone, Copy)]
pub enum Logits<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

/// One real position of a batch: (window in the batch, position in the window, row of the
/// flattened `[batch * len]` logits).
pub type RowRef = (usize, usize, usize);

/// What is drawn besides (or instead of) the top-k.
#[derive(Debug, Clone, Copy)]
pub struct SampleOptions {
    pub mode: CacheMode,
    /// Draws per position.
    pub samples: usize,
    /// The cache seed.
    pub seed: u64,
    /// Also return the teacher's log-prob of each sampled id.
    pub store_logprobs: bool,
    /// τ of the proposal q ∝ p^(1/τ) the draws come from; other than 1, each draw's
    /// ln p/q is returned too (what makes the estimate unbiased).
    pub proposal_temperature: f32,
    /// Where the draws fall on the cumulative sum.
    pub scheme: Sampling,
}

/// One thread's buffers.
#[derive(Debug, Default)]
struct Worker {
    scratch: TopKScratch,
    sample: SampleScratch,
    /// A hybrid's tail sums, from the top-k pass to the draws.
    tail: TailBlocks,
    /// An f16 row converted to f32.
    row_f32: Vec<f32>,
}

/// One thread's sampled entries and entropies, in its rows' order.
#[derive(Debug, Default)]
struct Drawn {
    entropy: Vec<f32>,
    lens: Vec<u32>,
    ids: Vec<u32>,
    counts: Vec<u16>,
    logprobs: Vec<f32>,
    log_weights: Vec<f32>,
}

/// The first non-finite value of a row, if any (8 poison lanes: x · 0 is NaN exactly for
/// NaN and ±inf, so the loop vectorises and only a bad row is searched).
fn first_non_finite(row: &[f32]) -> Option<(usize, f32)> {
    let mut lanes = [0.0f32; 8];
    let mut chunks = row.chunks_exact(8);
    for c in &mut chunks {
        for j in 0..8 {
            lanes[j] += c[j] * 0.0;
        }
    }
    let tail: f32 = chunks.remainder().iter().map(|&x| x * 0.0).sum();
    if (lanes.iter().sum::<f32>() + tail).is_nan() {
        row.iter().position(|x| !x.is_finite()).map(|i| (i, row[i]))
    } else {
        None
    }
}

/// Top-k + log-softmax (and the draws of a `sample`/`hybrid` cache) of a batch on the host.
#[derive(Debug)]
pub struct HostTopK {
    topk: TopK,
    /// 1 / temperature.
    scale: f32,
    sampling: Option<SampleOptions>,
    workers: Vec<Worker>,
}

impl HostTopK {
    /// A reducer for top-`k` at `temperature` on `threads` threads (at least 1).
    pub fn new(k: usize, temperature: f32, threads: usize) -> Self {
        HostTopK {
            topk: TopK {
                k,
                inv_temperature: 1.0 / temperature,
            },
            scale: 1.0 / temperature,
            sampling: None,
            workers: (0..threads.max(1)).map(|_| Worker::default()).collect(),
        }
    }

    /// Also draws samples (`sample` mode: instead of the top-k, whose `k` must then be 0;
    /// `hybrid`: from the distribution outside the top-k).
    pub fn with_sampling(mut self, sampling: SampleOptions) -> Self {
        self.sampling = Some(sampling);
        self
    }

    /// Reduces `rows` of `logits` (`stride` values per row, of which the first `vocab` are
    /// the distribution's) into `out` (`out.k` values per row, in the order of `rows`; the
    /// draws appended to `out.sample_*`). `seq_ids[i]` is window i's `seq_id` (the draws'
    /// seed). A non-finite logit is an error naming the earliest such position.
    pub fn reduce(
        &mut self,
        logits: Logits<'_>,
        stride: usize,
        vocab: usize,
        rows: &[RowRef],
        seq_ids: &[u64],
        out: &mut BatchTopK,
    ) -> Result<(), TeacherError> {
        let k = self.topk.k;
        let topk = self.topk;
        let sampling = self.sampling;
        let scale = self.scale;
        // The proposal q ∝ p^(1/τ) is the teacher's softmax at temperature T·τ.
        let sampler = sampling.map(|o| Sampler {
            samples: o.samples,
            scale: self.scale / o.proposal_temperature,
            seed: o.seed,
            scheme: o.scheme,
        });
        // A hybrid at τ = 1 draws from the tail the top-k pass summed (one pass over the row
        // less; at another τ the proposal's weights are not the top-k's).
        let fused = k > 0
            && sampling
                .is_some_and(|o| o.mode == CacheMode::Hybrid && o.proposal_temperature == 1.0);
        let per = rows.len().div_ceil(self.workers.len()).max(1);
        // Threads get disjoint ranges of rows; with k = 0 (a `sample` cache) the top-k
        // outputs are empty.
        let kk = k.max(1);
        let mut empty: (Vec<u32>, Vec<f32>, Vec<f32>) = (vec![], vec![], vec![]);
        let (ids_out, lps_out, tails_out) = if k == 0 {
            empty.2 = vec![0.0; rows.len()];
            (&mut empty.0, &mut empty.1, &mut empty.2)
        } else {
            (&mut out.ids, &mut out.logprobs, &mut out.tail_logprob)
        };
        let drawn: Vec<Drawn> = std::thread::scope(|scope| {
            let threads: Vec<_> = rows
                .chunks(per)
                .zip(
                    ids_out
                        .chunks_mut(per * kk)
                        .chain(std::iter::repeat_with(|| &mut [][..])),
                )
                .zip(
                    lps_out
                        .chunks_mut(per * kk)
                        .chain(std::iter::repeat_with(|| &mut [][..])),
                )
                .zip(tails_out.chunks_mut(per))
                .zip(self.workers.iter_mut())
                .map(|((((rows, ids), lps), tails), worker)| {
                    scope.spawn(move || -> Result<Drawn, TeacherError> {
                        let Worker {
                            scratch,
                            sample,
                            tail,
                            row_f32,
                        } = worker;
                        let mut drawn = Drawn::default();
                        for (j, &(i, p, r)) in rows.iter().enumerate() {
                            let row: &[f32] = match logits {
                                Logits::F32(d) => &d[r * stride..r * stride + vocab],
                                Logits::F16(d) => {
                                    row_f32.resize(vocab, 0.0);
                                    half::slice::HalfFloatSliceExt::convert_to_f32_slice(
                                        &d[r * stride..r * stride + vocab],
                                        row_f32,
                                    );
                                    row_f32
                                }
                            };
                            let non_finite = |index: usize, value: f32| TeacherError::NonFinite {
                                window: i,
                                position: p,
                                token: index,
                                value,
                            };
                            let top: &[u32] = if k > 0 {
                                let (row_ids, row_lps) =
                                    (&mut ids[j * k..(j + 1) * k], &mut lps[j * k..(j + 1) * k]);
                                tails[j] = if fused {
                                    topk.row_and_tail_blocks(row, scratch, row_ids, row_lps, tail)
                                } else {
                                    topk.row(row, scratch, row_ids, row_lps)
                                }
                                .map_err(|nf| non_finite(nf.index, nf.value))?;
                                &ids[j * k..(j + 1) * k]
                            } else {
                                if let Some((index, value)) = first_non_finite(row) {
                                    return Err(non_finite(index, value));
                                }
                                &[]
                            };
                            drawn
                                .entropy
                                .push(if entropy_measured_at(seq_ids[i], p as u64) {
                                    row_entropy(row, scale) as f32
                                } else {
                                    f32::NAN
                                });
                            if let (Some(s), Some(o)) = (sampler, sampling) {
                                let before = drawn.ids.len();
                                let exclude = if o.mode == CacheMode::Hybrid {
                                    top
                                } else {
                                    &[]
                                };
                                let key = (seq_ids[i], p as u64);
                                let (out_ids, out_counts) = (&mut drawn.ids, &mut drawn.counts);
                                let info = if fused && !tail.ties {
                                    s.draw_tail(row, tail, key, sample, out_ids, out_counts)
                                } else {
                                    s.draw(row, exclude, key, sample, out_ids, out_counts)
                                };
                                drawn.lens.push((drawn.ids.len() - before) as u32);
                                let weighted = o.proposal_temperature != 1.0;
                                // ln Σ exp((x − max)/T): the teacher's own normaliser. At
                                // τ = 1 the sampler's; in a hybrid, from the top-1's log-prob
                                // (the top-k pass summed the row already); else one more pass.
                                let lz_p = if !weighted {
                                    info.log_z_all
                                } else if k > 0 {
                                    ((row[top[0] as usize] - info.max) * scale) as f64
                                        - lps[j * k] as f64
                                } else {
                                    log_sum_exp(row, info.max, scale)
                                };
                                let logp =
                                    |id: u32| ((row[id as usize] - info.max) * scale) as f64 - lz_p;
                                if o.store_logprobs {
                                    drawn.logprobs.extend(
                                        drawn.ids[before..].iter().map(|&id| logp(id) as f32),
                                    );
                                }
                                if weighted {
                                    // ln p − ln q, q the proposal over the draws' support
                                    // (the tail's, in a hybrid).
                                    drawn.log_weights.extend(drawn.ids[before..].iter().map(
                                        |&id| {
                                            let logq = ((row[id as usize] - info.max) * s.scale)
                                                as f64
                                                - info.log_z_support;
                                            (logp(id) - logq) as f32
                                        },
                                    ));
                                }
                            }
                        }
                        Ok(drawn)
                    })
                })
                .collect();
            // Joined in order, so the first error names the earliest bad position.
            threads
                .into_iter()
                .map(|t| t.join().expect("top-k thread panicked: this is a bug"))
                .collect::<Result<Vec<_>, _>>()
        })?;
        for d in drawn {
            out.entropy.extend(d.entropy);
            out.sample_lens.extend(d.lens);
            out.sample_ids.extend(d.ids);
            out.sample_counts.extend(d.counts);
            out.sample_logprobs.extend(d.logprobs);
            out.sample_log_weights.extend(d.log_weights);
        }
        Ok(())
    }
}

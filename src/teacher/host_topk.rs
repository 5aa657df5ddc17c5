//! The host top-k of a whole batch: the real positions' rows of the teacher's logits
//! reduced by [`TopK::row`] on `threads` scoped threads, each over one contiguous range of
//! rows with its own buffers.
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
//! let mut out = BatchTopK { k: 1, ids: vec![0; 2], logprobs: vec![0.0; 2], tail_logprob: vec![0.0; 2] };
//! h.reduce(Logits::F32(&logits), 4, 4, &[(0, 0, 0), (0, 1, 1)], &mut out).unwrap();
//! assert_eq!(out.ids, [1, 0]);
//! ```

use super::backend::{BatchTopK, TeacherError};
use super::topk::{TopK, TopKScratch};
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

/// One thread's buffers.
#[derive(Debug, Default)]
struct Worker {
    scratch: TopKScratch,
    /// An f16 row converted to f32.
    row_f32: Vec<f32>,
}

/// Top-k + log-softmax of a batch on the host.
#[derive(Debug)]
pub struct HostTopK {
    topk: TopK,
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
            workers: (0..threads.max(1)).map(|_| Worker::default()).collect(),
        }
    }

    /// Reduces `rows` of `logits` (`stride` values per row, of which the first `vocab` are
    /// the distribution's) into `out` (`out.k` values per row, in the order of `rows`).
    /// A non-finite logit is an error naming the earliest such position.
    pub fn reduce(
        &mut self,
        logits: Logits<'_>,
        stride: usize,
        vocab: usize,
        rows: &[RowRef],
        out: &mut BatchTopK,
    ) -> Result<(), TeacherError> {
        let k = self.topk.k;
        let topk = self.topk;
        let per = rows.len().div_ceil(self.workers.len()).max(1);
        std::thread::scope(|scope| {
            let threads: Vec<_> = rows
                .chunks(per)
                .zip(out.ids.chunks_mut(per * k))
                .zip(out.logprobs.chunks_mut(per * k))
                .zip(out.tail_logprob.chunks_mut(per))
                .zip(self.workers.iter_mut())
                .map(|((((rows, ids), lps), tails), worker)| {
                    scope.spawn(move || {
                        let Worker { scratch, row_f32 } = worker;
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
                            tails[j] = topk
                                .row(
                                    row,
                                    scratch,
                                    &mut ids[j * k..(j + 1) * k],
                                    &mut lps[j * k..(j + 1) * k],
                                )
                                .map_err(|nf| TeacherError::NonFinite {
                                    window: i,
                                    position: p,
                                    token: nf.index,
                                    value: nf.value,
                                })?;
                        }
                        Ok(())
                    })
                })
                .collect();
            // Joined in order, so the first error names the earliest bad position.
            threads
                .into_iter()
                .map(|t| t.join().expect("top-k thread panicked: this is a bug"))
                .fold(Ok(()), Result::and)
        })
    }
}

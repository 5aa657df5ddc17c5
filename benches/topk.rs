//! Top-k + log-softmax throughput (rows/s) of the host reduction, one thread, at the vocab
//! sizes of common teachers, for each kernel this CPU runs (the teacher uses the last one
//! listed). Run: `cargo bench --bench topk`.
//!
//! Two groups: `topk_log_softmax` reduces the same 64 rows again and again (they stay in the
//! caches: the cost of the arithmetic), `topk_from_dram` walks a 256 MiB buffer, 8x a 32 MiB
//! L3, so every row comes from main memory, as a teacher's logits do (a batch of 8 x 128
//! positions at V = 32000 is 131 MB). `sample_vs_topk` compares, on the same in-cache rows,
//! the top-64 with the draws of a `sample` cache (N = 50) and of a `hybrid` one (top-8 + 42
//! tail draws; `hybrid8+42-fused` is the teacher stage's hybrid, drawing from the tail sums of
//! its top-k pass): the teacher-stage cost of each cache mode per row.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use logitcache::teacher::sample::{SampleScratch, Sampler};
use logitcache::teacher::topk::{Kernel, TailBlocks, TopK, TopKScratch, row_entropy};

/// Logits shaped like a language model's: a few large values over a Gaussian bulk.
fn logits(rows: usize, vocab: usize) -> Vec<f32> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    (0..rows * vocab)
        .map(|_| {
            // Sum of uniforms ~ Gaussian; rare large boosts make peaked rows.
            let g = (next() + next() + next() + next() - 2.0) * 3.0;
            if next() < 0.0005 { g + 12.0 } else { g }
        })
        .collect()
}

/// One thread's reduction: the top-k, the kernel, and the buffers it reuses row to row.
struct Reducer {
    t: TopK,
    kernel: Kernel,
    scratch: TopKScratch,
    ids: Vec<u32>,
    lp: Vec<f32>,
}

impl Reducer {
    fn new(k: usize, kernel: Kernel) -> Reducer {
        Reducer {
            t: TopK {
                k,
                inv_temperature: 1.0,
            },
            kernel,
            scratch: TopKScratch::default(),
            ids: vec![0; k],
            lp: vec![0.0; k],
        }
    }

    /// Reduces every row of `rows` (`vocab` values each); returns the sum of the tails, so
    /// the work cannot be optimised away.
    fn rows(&mut self, rows: &[f32], vocab: usize) -> f32 {
        rows.chunks(vocab)
            .map(|row| {
                self.t
                    .row_with(
                        self.kernel,
                        row,
                        &mut self.scratch,
                        &mut self.ids,
                        &mut self.lp,
                    )
                    .unwrap()
            })
            .sum()
    }
}

/// Walks `data` (rows of `vocab` values) `batch` rows at a time, wrapping at the end: in a
/// buffer far larger than L3, each batch is rows the caches have long dropped.
struct Walk<'a> {
    data: &'a [f32],
    vocab: usize,
    batch: usize,
    next: usize,
}

impl<'a> Walk<'a> {
    fn next_batch(&mut self) -> &'a [f32] {
        let total = self.data.len() / self.vocab / self.batch * self.batch;
        let rows = &self.data[self.next * self.vocab..(self.next + self.batch) * self.vocab];
        self.next = (self.next + self.batch) % total;
        rows
    }
}

/// Runs `f` on each half of `rows` on its own scoped thread with its own state, as the
/// teacher splits a batch; returns the sum of the two results.
fn on_two_threads<S: Send>(
    rows: &[f32],
    vocab: usize,
    state: &mut [S; 2],
    f: impl Fn(&[f32], &mut S) -> f32 + Sync,
) -> f32 {
    let half = rows.len() / vocab / 2 * vocab;
    let f = &f;
    std::thread::scope(|scope| {
        let threads: Vec<_> = [&rows[..half], &rows[half..]]
            .into_iter()
            .zip(state.iter_mut())
            .map(|(rows, s)| scope.spawn(move || f(rows, s)))
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).sum()
    })
}

fn bench(c: &mut Criterion) {
    const ROWS: usize = 64;
    let mut group = c.benchmark_group("topk_log_softmax");
    group.sample_size(20);
    for vocab in [32_000usize, 152_064] {
        let data = logits(ROWS, vocab);
        for k in [32usize, 64, 128] {
            for kernel in Kernel::available() {
                group.throughput(Throughput::Elements(ROWS as u64));
                group.bench_function(
                    BenchmarkId::new(format!("V{vocab}"), format!("k{k}/{}", kernel.name())),
                    |b| {
                        let mut r = Reducer::new(k, kernel);
                        b.iter(|| r.rows(&data, vocab))
                    },
                );
            }
        }
    }
    group.finish();

    let mut group = c.benchmark_group("sample_vs_topk");
    group.sample_size(20);
    for vocab in [32_000usize, 152_064] {
        let data = logits(ROWS, vocab);
        group.throughput(Throughput::Elements(ROWS as u64));
        let kernel = Kernel::best();
        group.bench_function(BenchmarkId::new(format!("V{vocab}"), "topk64"), |b| {
            let mut r = Reducer::new(64, kernel);
            b.iter(|| r.rows(&data, vocab))
        });
        // The exact entropy the teacher stage records per row, beside either.
        group.bench_function(BenchmarkId::new(format!("V{vocab}"), "entropy"), |b| {
            b.iter(|| {
                data.chunks(vocab)
                    .map(|row| row_entropy(row, 1.0))
                    .sum::<f64>()
            })
        });
        // N draws per row, after a top-`head` (hybrid, draws from the rest) or alone.
        for (name, head, samples) in [("sample50", 0, 50), ("hybrid8+42", 8, 42)] {
            group.bench_function(BenchmarkId::new(format!("V{vocab}"), name), |b| {
                let mut r = (head > 0).then(|| Reducer::new(head, kernel));
                let s = Sampler {
                    samples,
                    scale: 1.0,
                    seed: 0,
                    scheme: Default::default(),
                };
                let mut sc = SampleScratch::default();
                let (mut ids, mut counts) = (Vec::new(), Vec::new());
                b.iter(|| {
                    ids.clear();
                    counts.clear();
                    for (p, row) in data.chunks(vocab).enumerate() {
                        let exclude: &[u32] = match &mut r {
                            Some(r) => {
                                r.t.row_with(kernel, row, &mut r.scratch, &mut r.ids, &mut r.lp)
                                    .unwrap();
                                &r.ids
                            }
                            None => &[],
                        };
                        s.draw(row, exclude, (0, p as u64), &mut sc, &mut ids, &mut counts);
                    }
                    ids.len()
                })
            });
        }
        // The hybrid as the teacher stage runs it: the draws come from the tail sums the
        // top-k pass leaves (`row_and_tail_blocks` + `draw_tail`), one pass over the row less
        // than the top-k followed by `draw` above.
        group.bench_function(
            BenchmarkId::new(format!("V{vocab}"), "hybrid8+42-fused"),
            |b| {
                let mut r = Reducer::new(8, kernel);
                let s = Sampler {
                    samples: 42,
                    scale: 1.0,
                    seed: 0,
                    scheme: Default::default(),
                };
                let (mut sc, mut tail) = (SampleScratch::default(), TailBlocks::default());
                let (mut ids, mut counts) = (Vec::new(), Vec::new());
                b.iter(|| {
                    ids.clear();
                    counts.clear();
                    for (p, row) in data.chunks(vocab).enumerate() {
                        r.t.row_and_tail_blocks(
                            row,
                            &mut r.scratch,
                            &mut r.ids,
                            &mut r.lp,
                            &mut tail,
                        )
                        .unwrap();
                        if tail.ties {
                            s.draw(row, &r.ids, (0, p as u64), &mut sc, &mut ids, &mut counts);
                        } else {
                            s.draw_tail(row, &tail, (0, p as u64), &mut sc, &mut ids, &mut counts);
                        }
                    }
                    ids.len()
                })
            },
        );
    }
    group.finish();

    let mut group = c.benchmark_group("topk_from_dram");
    group.sample_size(20);
    for vocab in [32_000usize, 152_064] {
        let rows = (256 << 20) / (4 * vocab);
        // The same 64 rows over and over: their values do not matter to the caches.
        let data = logits(ROWS, vocab).repeat(rows.div_ceil(ROWS));
        let walk = |batch| Walk {
            data: &data,
            vocab,
            batch,
            next: 0,
        };
        let k = 64;
        for kernel in Kernel::available() {
            group.throughput(Throughput::Elements(ROWS as u64));
            group.bench_function(
                BenchmarkId::new(format!("V{vocab}"), format!("k{k}/{}", kernel.name())),
                |b| {
                    let (mut r, mut w) = (Reducer::new(k, kernel), walk(ROWS));
                    b.iter(|| r.rows(w.next_batch(), vocab))
                },
            );
        }
        // Two threads on disjoint rows, as the teacher splits a batch (256 rows, 128 each, on
        // scoped threads spawned per batch): the rows/s both get out of one memory system.
        let kernel = Kernel::best();
        const BATCH: usize = 256;
        group.throughput(Throughput::Elements(BATCH as u64));
        group.bench_function(
            BenchmarkId::new(
                format!("V{vocab}"),
                format!("k{k}/{}/2threads", kernel.name()),
            ),
            |b| {
                let mut reducers = [Reducer::new(k, kernel), Reducer::new(k, kernel)];
                let mut w = walk(BATCH);
                b.iter(|| {
                    on_two_threads(w.next_batch(), vocab, &mut reducers, |rows, r| {
                        r.rows(rows, vocab)
                    })
                })
            },
        );
        // The floor under that: the same two threads only summing their rows (each value
        // read once, nothing else), what any reader of the logits pays to stream them in.
        group.bench_function(
            BenchmarkId::new(format!("V{vocab}"), "read_only/2threads"),
            |b| {
                let mut w = walk(BATCH);
                b.iter(|| on_two_threads(w.next_batch(), vocab, &mut [(), ()], |rows, _| sum(rows)))
            },
        );
    }
    group.finish();
}

/// A plain sum in 16 lanes (vectorised; far faster than memory delivers the values).
fn sum(v: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let mut chunks = v.chunks_exact(16);
    for c in &mut chunks {
        for j in 0..16 {
            lanes[j] += c[j];
        }
    }
    lanes.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

criterion_group!(benches, bench);
criterion_main!(benches);

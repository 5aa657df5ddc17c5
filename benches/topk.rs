//! Top-k + log-softmax throughput (rows/s) of the host reduction, one thread, at the vocab
//! sizes of common teachers, for each kernel this CPU runs (the teacher uses the last one
//! listed). Run: `cargo bench --bench topk`.
//!
//! Two groups: `topk_log_softmax` reduces the same 64 rows again and again (they stay in the
//! caches: the cost of the arithmetic), `topk_from_dram` walks a 256 MiB buffer, 8x a 32 MiB
//! L3, so every row comes from main memory, as a teacher's logits do (a batch of 8 x 128
//! positions at V = 32000 is 131 MB).

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use logitcache::teacher::topk::{Kernel, TopK, TopKScratch};

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

fn bench(c: &mut Criterion) {
    const ROWS: usize = 64;
    let mut group = c.benchmark_group("topk_log_softmax");
    group.sample_size(20);
    for vocab in [32_000usize, 152_064] {
        let data = logits(ROWS, vocab);
        for k in [32usize, 64, 128] {
            for kernel in Kernel::available() {
                group.throughput(Throughput::Elements(ROWS as u64));
                group.bench_with_input(
                    BenchmarkId::new(format!("V{vocab}"), format!("k{k}/{}", kernel.name())),
                    &k,
                    |b, &k| {
                        let t = TopK {
                            k,
                            inv_temperature: 1.0,
                        };
                        let mut s = TopKScratch::default();
                        let (mut ids, mut lp) = (vec![0u32; k], vec![0f32; k]);
                        b.iter(|| {
                            let mut acc = 0f32;
                            for row in data.chunks(vocab) {
                                acc += t.row_with(kernel, row, &mut s, &mut ids, &mut lp).unwrap();
                            }
                            acc
                        })
                    },
                );
            }
        }
    }
    group.finish();

    let mut group = c.benchmark_group("topk_from_dram");
    group.sample_size(20);
    for vocab in [32_000usize, 152_064] {
        let rows = (256 << 20) / (4 * vocab);
        // The same 64 rows over and over: their values do not matter to the caches.
        let data = logits(ROWS, vocab).repeat(rows.div_ceil(ROWS));
        let k = 64;
        for kernel in Kernel::available() {
            group.throughput(Throughput::Elements(ROWS as u64));
            group.bench_function(
                BenchmarkId::new(format!("V{vocab}"), format!("k{k}/{}", kernel.name())),
                |b| {
                    let t = TopK {
                        k,
                        inv_temperature: 1.0,
                    };
                    let mut s = TopKScratch::default();
                    let (mut ids, mut lp) = (vec![0u32; k], vec![0f32; k]);
                    let mut next = 0usize;
                    b.iter(|| {
                        let mut acc = 0f32;
                        let start = next * vocab;
                        for row in data[start..start + ROWS * vocab].chunks(vocab) {
                            acc += t.row_with(kernel, row, &mut s, &mut ids, &mut lp).unwrap();
                        }
                        next = (next + ROWS) % (data.len() / vocab);
                        acc
                    })
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
                let t = TopK {
                    k,
                    inv_temperature: 1.0,
                };
                let mut scratch = [TopKScratch::default(), TopKScratch::default()];
                let total = data.len() / vocab / BATCH * BATCH;
                let mut next = 0usize;
                b.iter(|| {
                    let rows = &data[next * vocab..(next + BATCH) * vocab];
                    next = (next + BATCH) % total;
                    std::thread::scope(|scope| {
                        let hs: Vec<_> = rows
                            .chunks(BATCH / 2 * vocab)
                            .zip(scratch.iter_mut())
                            .map(|(half, s)| {
                                scope.spawn(move || {
                                    let (mut ids, mut lp) = (vec![0u32; k], vec![0f32; k]);
                                    let mut acc = 0f32;
                                    for row in half.chunks(vocab) {
                                        acc +=
                                            t.row_with(kernel, row, s, &mut ids, &mut lp).unwrap();
                                    }
                                    acc
                                })
                            })
                            .collect();
                        hs.into_iter().map(|h| h.join().unwrap()).sum::<f32>()
                    })
                })
            },
        );
        // The floor under that: the same two threads only summing their rows (each value
        // read once, nothing else), what any reader of the logits pays to stream them in.
        group.bench_function(
            BenchmarkId::new(format!("V{vocab}"), "read_only/2threads"),
            |b| {
                let total = data.len() / vocab / BATCH * BATCH;
                let mut next = 0usize;
                b.iter(|| {
                    let rows = &data[next * vocab..(next + BATCH) * vocab];
                    next = (next + BATCH) % total;
                    std::thread::scope(|scope| {
                        let hs: Vec<_> = rows
                            .chunks(BATCH / 2 * vocab)
                            .map(|half| scope.spawn(move || sum(half)))
                            .collect();
                        hs.into_iter().map(|h| h.join().unwrap()).sum::<f32>()
                    })
                })
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

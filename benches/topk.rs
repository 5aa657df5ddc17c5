//! Top-k + log-softmax throughput (rows/s) of the host reduction, one thread, at the vocab
//! sizes of common teachers, for each kernel this CPU runs (the teacher uses the last one
//! listed). Run: `cargo bench --bench topk`.

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
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! Shard write throughput: 128 windows x 512 tokens at k = 64 (65,536 positions), zstd
//! Parquet, durable write (fsync + rename). Reported per uncompressed byte and per row
//! (position). Run: `cargo bench --bench shard_write`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use logitcache::cache::rows::{ShardRows, WindowTopK};
use logitcache::cache::writer::{
    DEFAULT_ROW_GROUP_ROWS, DEFAULT_ZSTD_LEVEL, ShardWriteOptions, write_shard,
};

fn rows(windows: usize, len: usize, k: usize, vocab: u32) -> ShardRows {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut r = ShardRows::new(k);
    for w in 0..windows {
        let input: Vec<u32> = (0..len).map(|_| (next() % vocab as u64) as u32).collect();
        let ids: Vec<u32> = (0..len * k)
            .map(|_| (next() % vocab as u64) as u32)
            .collect();
        let mut lps = Vec::with_capacity(len * k);
        for _ in 0..len {
            let mut v = -((next() % 1000) as f32) / 500.0;
            for _ in 0..k {
                lps.push(v);
                v -= (next() % 1000) as f32 / 4000.0;
            }
        }
        let tail: Vec<f32> = (0..len)
            .map(|_| -((next() % 5000) as f32) / 1000.0)
            .collect();
        r.push(&WindowTopK {
            seq_id: w as u64,
            doc_id: w as u64,
            window_index: 0,
            input_ids: &input,
            topk_ids: &ids,
            topk_logprobs: &lps,
            tail_logprob: &tail,
            ..Default::default()
        });
    }
    r
}

fn bench(c: &mut Criterion) {
    let (windows, len, k) = (128, 512, 64);
    let data = rows(windows, len, k, 32_000);
    let positions = (windows * len) as u64;
    // ids u32 + input id u32 + f16 log-probs + f32 tail.
    let raw_bytes = positions * (4 + 4 * k as u64 + 2 * k as u64 + 4);
    let dir = tempfile::tempdir().unwrap();
    let opts = ShardWriteOptions {
        vocab_size: 32_000,
        tokenizer_sha256: "0".repeat(64),
        zstd_level: DEFAULT_ZSTD_LEVEL,
        row_group_rows: DEFAULT_ROW_GROUP_ROWS,
    };
    let path = dir.path().join("shard.parquet");
    let mut group = c.benchmark_group("shard_write");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(raw_bytes));
    group.bench_function("bytes_k64_128x512", |b| {
        b.iter(|| write_shard(&path, 0, &data, &opts).unwrap())
    });
    group.throughput(Throughput::Elements(positions));
    group.bench_function("positions_k64_128x512", |b| {
        b.iter(|| write_shard(&path, 0, &data, &opts).unwrap())
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

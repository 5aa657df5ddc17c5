//! The training stream: coverage, order determinism, epochs, rank partitioning, the eval
//! split, exact resumption from a cursor, and refusal of damaged caches.

use crate::util::*;
use logitcache::cache::reader::Cache;
use logitcache::cache::stream::{Cursor, Split, Stream, StreamConfig, TrainBatch};
use logitcache::rng::is_eval;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn cache_dir() -> &'static PathBuf {
    static C: OnceLock<PathBuf> = OnceLock::new();
    C.get_or_init(|| stream_cache("stream-cache", &[]))
}

/// [`cache_dir`]'s windows with q8 log-probs.
fn q8_cache_dir() -> &'static PathBuf {
    static C: OnceLock<PathBuf> = OnceLock::new();
    C.get_or_init(|| stream_cache("stream-cache-q8", &["--logprob-dtype", "q8"]))
}

/// A cache of 200 windows in shards of 24 (many units), with `extra` teacher flags.
fn stream_cache(name: &str, extra: &[&str]) -> PathBuf {
    let out = shared_dir().join(name);
    let mut a = teacher_args(&plain_model(), &out, 200);
    // Small shards with several row groups would need > 128 rows; shards of 24 windows
    // give many units instead.
    let p = a.iter().position(|x| x == "--shard-size").unwrap();
    a[p + 1] = "24".into();
    a.extend(extra.iter().map(|x| x.to_string()));
    assert_ok(&run_strings(&a));
    out
}

fn collect(cfg: StreamConfig) -> Vec<TrainBatch> {
    collect_from(cache_dir(), cfg, false)
}

/// The stream's batches; with `recycle`, each batch's buffers also go back to the stream
/// (the copy kept is what the consumer saw).
fn collect_from(dir: &Path, cfg: StreamConfig, recycle: bool) -> Vec<TrainBatch> {
    let cache = Cache::open(dir).unwrap();
    let mut s = Stream::start(&cache, cfg).unwrap();
    let mut out = Vec::new();
    while let Some(b) = s.next_batch() {
        let b = b.unwrap();
        out.push(b.clone());
        if recycle {
            s.recycle(b);
        }
    }
    out
}

fn seqs(batches: &[TrainBatch]) -> Vec<u64> {
    batches.iter().flat_map(|b| b.seq_ids.clone()).collect()
}

#[test]
fn one_unshuffled_epoch_is_the_cache_in_order_with_targets_and_masks() {
    let unshuffled = |batch_size| StreamConfig {
        batch_size,
        shuffle: false,
        ..Default::default()
    };
    in_order(cache_dir(), unshuffled(5), false);
    // One row group per group, so later groups are decoded into the buffers of earlier
    // ones, and batches filled into recycled ones: the same values, float16 and q8 log-probs.
    for dir in [cache_dir(), q8_cache_dir()] {
        let cfg = StreamConfig {
            shuffle_units: 1,
            ..unshuffled(3)
        };
        in_order(dir, cfg, true);
    }
}

/// One epoch of `dir` read with `cfg` (unshuffled) equals its rows in order.
fn in_order(dir: &Path, cfg: StreamConfig, recycle: bool) {
    assert!(!cfg.shuffle);
    let (rows, batch_size) = (all_rows(dir), cfg.batch_size);
    let batches = collect_from(dir, cfg, recycle);
    assert_eq!(seqs(&batches), rows.seq_ids);
    let by_seq: BTreeMap<u64, usize> = rows
        .seq_ids
        .iter()
        .enumerate()
        .map(|(i, &s)| (s, i))
        .collect();
    let k = rows.k;
    for b in &batches {
        assert!(b.batch <= batch_size);
        for (bi, s) in b.seq_ids.iter().enumerate() {
            let r = by_seq[s];
            let (st, en) = (rows.offsets[r] as usize, rows.offsets[r + 1] as usize);
            let n = en - st;
            let o = bi * b.len;
            assert_eq!(&b.input_ids[o..o + n], &rows.input_ids[st..en]);
            assert_eq!(&b.target_ids[o..o + n - 1], &rows.input_ids[st + 1..en]);
            assert!(
                b.mask[o..o + n].iter().all(|&m| m == 1.0)
                    && b.mask[o + n..o + b.len].iter().all(|&m| m == 0.0)
            );
            assert!(
                b.target_mask[o..o + n - 1].iter().all(|&m| m == 1.0)
                    && b.target_mask[o + n - 1] == 0.0
            );
            assert_eq!(
                &b.topk_ids[o * k..(o + n) * k],
                &rows.topk_ids[st * k..en * k]
            );
            for (x, y) in b.topk_logprobs[o * k..(o + n) * k]
                .iter()
                .zip(&rows.topk_logprobs[st * k..en * k])
            {
                assert_eq!(*x, y.to_f32());
            }
            assert_eq!(&b.tail_logprob[o..o + n], &rows.tail_logprob[st..en]);
        }
    }
}

#[test]
fn shuffling_is_deterministic_and_every_epoch_covers_everything() {
    let all: BTreeSet<u64> = all_rows(cache_dir()).seq_ids.into_iter().collect();
    let cfg = |seed| StreamConfig {
        batch_size: 7,
        seed,
        epochs: Some(2),
        ..Default::default()
    };
    let a = seqs(&collect(cfg(1)));
    assert_eq!(a, seqs(&collect(cfg(1))));
    assert_ne!(a, seqs(&collect(cfg(2))));
    assert_eq!(a.len(), 2 * all.len());
    let (e0, e1) = a.split_at(all.len());
    assert_eq!(e0.iter().copied().collect::<BTreeSet<_>>(), all);
    assert_eq!(e1.iter().copied().collect::<BTreeSet<_>>(), all);
    assert_ne!(e0, e1, "epochs are shuffled differently");
    let unshuffled: Vec<u64> = all.iter().copied().collect();
    assert_ne!(e0, unshuffled.as_slice());
}

#[test]
fn ranks_are_disjoint_and_cover_the_split() {
    let all: BTreeSet<u64> = all_rows(cache_dir()).seq_ids.into_iter().collect();
    let mut seen = BTreeSet::new();
    let mut counts = vec![];
    for rank in 0..3 {
        let s = seqs(&collect(StreamConfig {
            batch_size: 4,
            seed: 9,
            rank,
            world_size: 3,
            ..Default::default()
        }));
        counts.push(s.len());
        for x in s {
            assert!(seen.insert(x), "seq {x} read by two ranks");
        }
    }
    assert_eq!(seen, all);
    let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
    assert!(hi - lo <= 24, "ranks unbalanced: {counts:?}");
}

#[test]
fn eval_split_is_held_out_by_seq_id_hash() {
    let all: BTreeSet<u64> = all_rows(cache_dir()).seq_ids.into_iter().collect();
    let cfg = |split| StreamConfig {
        batch_size: 8,
        split,
        eval_fraction: 0.2,
        ..Default::default()
    };
    let train: BTreeSet<u64> = seqs(&collect(cfg(Split::Train))).into_iter().collect();
    let eval: BTreeSet<u64> = seqs(&collect(cfg(Split::Eval))).into_iter().collect();
    assert!(train.is_disjoint(&eval));
    assert_eq!(train.union(&eval).copied().collect::<BTreeSet<_>>(), all);
    let frac = eval.len() as f64 / all.len() as f64;
    assert!((0.1..0.3).contains(&frac), "eval fraction {frac}");
    assert!(eval.iter().all(|&s| is_eval(s, 0.2)));
}

#[test]
fn resuming_from_a_cursor_continues_exactly() {
    let cfg = StreamConfig {
        batch_size: 6,
        seed: 4,
        epochs: Some(2),
        shuffle_units: 3,
        rank: 1,
        world_size: 2,
        split: Split::Train,
        eval_fraction: 0.1,
        ..Default::default()
    };
    let full = collect(cfg.clone());
    for cut in [1, full.len() / 3, full.len() / 2 + 1] {
        let cursor: Cursor = full[cut - 1].cursor;
        let rest = collect(StreamConfig {
            start: cursor,
            ..cfg.clone()
        });
        assert_eq!(
            seqs(&rest),
            seqs(&full[cut..]),
            "resume after batch {cut} at {cursor:?}"
        );
    }
}

#[test]
fn damaged_or_incomplete_caches_are_refused_naming_the_shard() {
    let src = cache_dir();
    let dir = shared_dir().join("stream-damaged");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("shards")).unwrap();
    for e in std::fs::read_dir(src.join("shards")).unwrap().flatten() {
        std::fs::copy(e.path(), dir.join("shards").join(e.file_name())).unwrap();
    }
    std::fs::copy(src.join("manifest.json"), dir.join("manifest.json")).unwrap();
    let cache = Cache::open(&dir).unwrap();
    // Read once intact: the shards are hashed and remembered by this process...
    let cfg = StreamConfig {
        shuffle: false,
        epochs: Some(1),
        ..Default::default()
    };
    assert!(
        Stream::start(&cache, cfg.clone())
            .unwrap()
            .all(|b| b.is_ok())
    );
    // ...and a shard changed afterwards (same inode, new mtime) is hashed again.
    let victim = dir.join(&cache.manifest.shards[2].file);
    let before = std::fs::metadata(&victim).unwrap().modified().unwrap();
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&victim, &bytes).unwrap();
    // A later mtime whatever the filesystem's timestamp granularity (a 50 ms sleep relied
    // on it).
    std::fs::File::options()
        .write(true)
        .open(&victim)
        .unwrap()
        .set_modified(before + std::time::Duration::from_secs(10))
        .unwrap();
    let errs: Vec<String> = Stream::start(
        &cache,
        StreamConfig {
            shuffle: false,
            ..Default::default()
        },
    )
    .unwrap()
    .filter_map(|b| b.err().map(|e| e.to_string()))
    .collect();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].contains("shard-000002.parquet") && errs[0].contains("does not match"),
        "{}",
        errs[0]
    );
    bytes.truncate(mid);
    std::fs::write(&victim, &bytes).unwrap();
    let err = Stream::start(&cache, StreamConfig::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("shard-000002.parquet") && err.contains("manifest says"),
        "{err}"
    );

    // An incomplete cache (worker 1 of 2 only) is refused.
    let half = shared_dir().join("stream-half");
    let _ = std::fs::remove_dir_all(&half);
    let mut a = teacher_args(&plain_model(), &half, 200);
    a.extend([
        "--worker-index".into(),
        "1".into(),
        "--num-workers".into(),
        "2".into(),
    ]);
    assert_ok(&run_strings(&a));
    let err = Stream::start(&Cache::open(&half).unwrap(), StreamConfig::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("is incomplete (")
            && err.contains("shards written)")
            && err.contains("same `logitcache teacher` command")
            && !err.contains("damaged")
            && !err.contains("delete"),
        "{err}"
    );
}

/// A missing shard is named as missing (it was reported as "18446744073709551615 bytes on
/// disk"), and a manifest forged to another vocabulary (its checksum recomputed) is caught by
/// the shards' own metadata, by the stream and by `verify`; a shard path outside the cache is
/// refused when the manifest is read.
#[test]
fn missing_shards_and_forged_manifests_are_named() {
    use logitcache::cache::manifest::Manifest;
    let dir = shared_dir().join("stream-forged");
    let _ = std::fs::remove_dir_all(&dir);
    assert_ok(&run_strings(&teacher_args(&plain_model(), &dir, 60)));
    let good = Manifest::load(&dir).unwrap();
    // Sealed as logitcache seals it: the checksum is recomputed, so only the values lie.
    let write = |m: &Manifest| m.clone().store(&dir).unwrap();
    let mut m = good.clone();
    m.vocab_size = 100;
    write(&m);
    let err = Stream::start(&Cache::open(&dir).unwrap(), StreamConfig::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("logitcache.vocab_size = 400 but the manifest says 100")
            && err.contains("and the manifest disagree"),
        "{err}"
    );
    let v = run(&["verify", dir.to_str().unwrap()]);
    assert_eq!(v.status.code(), Some(1), "{}", stdout(&v));
    assert!(
        stdout(&v).contains("the manifest says 100"),
        "{}",
        stdout(&v)
    );
    for bad in [
        "../elsewhere.parquet",
        "/tmp/x.parquet",
        "shards/../../x.parquet",
    ] {
        let mut m = good.clone();
        m.shards[0].file = bad.into();
        write(&m);
        let err = Manifest::load(&dir).unwrap_err().to_string();
        assert!(
            err.contains(bad) && err.contains("outside the cache directory"),
            "{err}"
        );
        assert_fails(
            &run(&["verify", dir.to_str().unwrap()]),
            &["outside the cache directory"],
        );
    }
    write(&good);
    let shard = dir.join(&good.shards[1].file);
    std::fs::remove_file(&shard).unwrap();
    let err = Stream::start(&Cache::open(&dir).unwrap(), StreamConfig::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains(shard.to_str().unwrap())
            && err.contains("is missing")
            && !err.contains("18446744073709551615"),
        "{err}"
    );
}

#[test]
fn an_empty_split_is_an_error_not_a_hang() {
    let cache = Cache::open(cache_dir()).unwrap();
    // A rank beyond the number of rows per group gets nothing from an eval split this small.
    let cfg = StreamConfig {
        split: Split::Eval,
        eval_fraction: 1e-9,
        epochs: None,
        ..Default::default()
    };
    let first = Stream::start(&cache, cfg).unwrap().next().unwrap();
    let err = first.expect_err("an error").to_string();
    assert!(
        err.contains("holds no sequences") && err.contains("--eval-fraction"),
        "{err}"
    );
}

//! Cache format 2: `sample` and `hybrid` caches (draws from the teacher's distribution),
//! their determinism across runs and workers, what pyarrow reads, training from them, bad
//! flags, and reading format-1 caches.

use crate::util::*;
use logitcache::cache::manifest::Manifest;
use logitcache::cache::reader::Cache;
use logitcache::cache::schema::CacheMode;
use std::path::{Path, PathBuf};

fn with(args: Vec<String>, extra: &[&str]) -> Vec<String> {
    args.into_iter()
        .chain(extra.iter().map(|s| s.to_string()))
        .collect()
}

fn build(name: &str, docs: usize, extra: &[&str]) -> PathBuf {
    let out = shared_dir().join(format!("v2-{name}-{}", unique()));
    assert_ok(&run_strings(&with(
        teacher_args(&plain_model(), &out, docs),
        extra,
    )));
    out
}

fn shard_shas(dir: &Path) -> Vec<(String, String)> {
    let m = Manifest::load(dir).unwrap();
    m.shards
        .iter()
        .map(|s| (s.file.clone(), s.sha256.clone()))
        .collect()
}

#[test]
fn sample_cache_stores_n_draws_per_position_deterministically() {
    let a = build("sample-a", 40, &["--mode", "sample", "--samples", "24"]);
    let m = Manifest::load(&a).unwrap();
    assert_eq!(m.format_version, 2);
    assert_eq!(m.params.mode, CacheMode::Sample);
    assert_eq!(m.params.samples, 24);
    assert_eq!(m.params.top_k, 0);
    let rows = all_rows(&a);
    assert!(rows.topk_ids.is_empty() && rows.tail_logprob.is_empty());
    let mut distinct = 0usize;
    for p in 0..rows.positions() {
        let (ids, counts) = rows.samples_at(p);
        assert_eq!(
            counts.iter().map(|&c| c as usize).sum::<usize>(),
            24,
            "position {p}"
        );
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ascending ids");
        assert!(ids.iter().all(|&i| (i as usize) < VOCAB));
        distinct += ids.len();
    }
    let mean = distinct as f64 / rows.positions() as f64;
    assert!(mean > 1.0 && mean <= 24.0, "mean distinct ids {mean}");
    // The same command again, and two workers into one directory: the same bytes.
    let b = build("sample-b", 40, &["--mode", "sample", "--samples", "24"]);
    assert_eq!(shard_shas(&a), shard_shas(&b));
    let w = shared_dir().join(format!("v2-sample-w-{}", unique()));
    for i in ["0", "1"] {
        assert_ok(&run_strings(&with(
            teacher_args(&plain_model(), &w, 40),
            &[
                "--mode",
                "sample",
                "--samples",
                "24",
                "--worker-index",
                i,
                "--num-workers",
                "2",
            ],
        )));
    }
    assert_eq!(shard_shas(&a), shard_shas(&w));
    // Another seed draws other values.
    let c = build(
        "sample-c",
        40,
        &["--mode", "sample", "--samples", "24", "--cache-seed", "5"],
    );
    assert_ne!(all_rows(&c).sample_ids, rows.sample_ids);
    let o = run(&["verify", a.to_str().unwrap()]);
    assert_ok(&o);
}

/// `--sampling systematic`: every stored id's count is ⌊N·p⌋ or ⌈N·p⌉ of its probability
/// (in a hybrid, of its share of the tail), read off the teacher's stored log-probs; the
/// manifest records the scheme, workers write the same bytes as one run, and it draws other
/// values than the i.i.d. scheme.
#[test]
fn systematic_draws_count_floor_or_ceil_of_n_p() {
    for (name, extra, n) in [
        ("sample", &["--mode", "sample", "--samples", "32"][..], 32.0),
        ("hybrid", &["--mode", "hybrid", "--samples", "24"][..], 24.0),
    ] {
        let args = [extra, &["--sampling", "systematic", "--store-logprobs"]].concat();
        let dir = build(&format!("sys-{name}"), 30, &args);
        let m = Manifest::load(&dir).unwrap();
        assert_eq!(
            m.params.sampling,
            logitcache::cache::schema::Sampling::Systematic
        );
        let rows = all_rows(&dir);
        let mut checked = 0usize;
        for p in 0..rows.positions() {
            let (ids, counts) = rows.samples_at(p);
            let s = rows.sample_offsets[p] as usize;
            // Draws from p itself, or from the tail renormalised.
            let support = if rows.tail_logprob.is_empty() {
                0.0
            } else {
                rows.tail_logprob[p] as f64
            };
            assert_eq!(counts.iter().map(|&c| c as f64).sum::<f64>(), n);
            for (j, &c) in counts.iter().enumerate() {
                let lp = rows.sample_logprobs[s + j].to_f64();
                let np = n * (lp - support).exp();
                // The stored log-probs are float16 (≤ ~0.1% of p, here < 0.05 of N·p).
                assert!(
                    c as f64 >= (np - 0.05).floor() && c as f64 <= (np + 0.05).ceil(),
                    "{name} position {p}: id {} drawn {c} times, N·p = {np}",
                    ids[j]
                );
                checked += 1;
            }
        }
        assert!(checked > 500, "{name}: {checked} entries");
        let w = shared_dir().join(format!("v2-sys-{name}-w-{}", unique()));
        for i in ["0", "1"] {
            let a = [&args[..], &["--worker-index", i, "--num-workers", "2"]].concat();
            assert_ok(&run_strings(&with(
                teacher_args(&plain_model(), &w, 30),
                &a,
            )));
        }
        assert_eq!(shard_shas(&dir), shard_shas(&w), "{name}: two workers");
        let iid = build(
            &format!("iid-{name}"),
            30,
            &[extra, &["--store-logprobs"]].concat(),
        );
        assert_ne!(all_rows(&iid).sample_counts, rows.sample_counts, "{name}");
    }
}

#[test]
fn hybrid_cache_has_the_exact_top_k_and_draws_from_the_tail_only() {
    let top = build("topk", 30, &[]);
    let hy = build("hybrid", 30, &["--mode", "hybrid", "--samples", "16"]);
    let (t, h) = (all_rows(&top), all_rows(&hy));
    // What the teacher stage measured while writing: the float16 rounding of the log-probs
    // (at most 2^-11 relative) and the top-k mass, which `inspect` recomputes from the
    // stored values.
    let o = run(&["inspect", hy.to_str().unwrap(), "--json"]);
    assert_ok(&o);
    let ins: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let err = ins["max_logprob_error"].as_f64().unwrap();
    assert!(err > 0.0 && err < 0.02, "max_logprob_error {err}");
    let m = Manifest::load(&hy).unwrap();
    let stats: Vec<_> = m.shards.iter().map(|s| s.stats.clone().unwrap()).collect();
    let weighted = |f: &dyn Fn(&logitcache::cache::manifest::ShardStats) -> f64| {
        m.shards
            .iter()
            .zip(&stats)
            .map(|(s, st)| f(st) * s.tokens as f64)
            .sum::<f64>()
            / m.totals.tokens as f64
    };
    let mass = weighted(&|s| s.mean_topk_mass.unwrap());
    assert!(
        (mass - ins["mean_topk_mass"].as_f64().unwrap()).abs() < 1e-3,
        "{mass} vs {ins}"
    );
    let distinct = weighted(&|s| s.mean_distinct_ids.unwrap());
    assert!((distinct - ins["mean_distinct_ids"].as_f64().unwrap()).abs() < 1e-9);
    assert_eq!(ins["mode"], "hybrid");
    assert_eq!(ins["samples"], 16);
    // The exact entropy, measured at one position in 16, lies between the stored head's
    // bounds at those positions (tail as one outcome; tail spread evenly over the other
    // ids), and inspect shows the shards' token-weighted mean.
    let ent = ins["mean_entropy"].as_f64().unwrap();
    let (k, v) = (h.k, VOCAB as f64);
    let (mut lo, mut hi, mut n) = (0f64, 0f64, 0usize);
    let mut p = 0usize;
    for r in 0..h.rows() {
        for pos in 0..(h.offsets[r + 1] - h.offsets[r]) as u64 {
            if logitcache::teacher::topk::entropy_measured_at(h.seq_ids[r], pos) {
                let head: f64 = h.topk_logprobs[p * k..(p + 1) * k]
                    .iter()
                    .map(|l| -(l.to_f32() as f64).exp() * l.to_f32() as f64)
                    .sum();
                let t = h.tail_logprob[p] as f64;
                let tail = -t.exp() * t;
                lo += head + tail;
                hi += head + tail + t.exp() * (v - k as f64).ln();
                n += 1;
            }
            p += 1;
        }
    }
    let (lo, hi) = (lo / n as f64, hi / n as f64);
    assert!(n > 0 && p == h.positions());
    let shard_mean = {
        let (s, t): (f64, f64) = m
            .shards
            .iter()
            .zip(&stats)
            .map(|(s, st)| (st.mean_entropy.unwrap() * s.tokens as f64, s.tokens as f64))
            .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
        s / t
    };
    assert!(
        lo <= shard_mean + 2e-3 && shard_mean <= hi + 2e-3 && hi > lo,
        "{lo} ≤ {shard_mean} ≤ {hi}"
    );
    assert!((weighted(&|s| s.mean_entropy.unwrap()) - ent).abs() < 1e-9);
    // The head is the top-k cache's: ids and float16 log-probs bit for bit, the tail mass
    // to f32 rounding (the hybrid's top-k pass sums the tail block by block, for the draws).
    assert_eq!(t.topk_ids, h.topk_ids);
    assert_eq!(t.topk_logprobs, h.topk_logprobs);
    assert_eq!(t.tail_logprob.len(), h.tail_logprob.len());
    for (a, b) in t.tail_logprob.iter().zip(&h.tail_logprob) {
        assert!((a - b).abs() <= 1e-6 * a.abs().max(1.0), "tail {a} vs {b}");
    }
    let k = h.k;
    for p in 0..h.positions() {
        let (ids, counts) = h.samples_at(p);
        let head = &h.topk_ids[p * k..(p + 1) * k];
        assert!(
            ids.iter().all(|i| !head.contains(i)),
            "position {p} drew a top-k id"
        );
        let n: usize = counts.iter().map(|&c| c as usize).sum();
        if h.tail_logprob[p] > -80.0 {
            assert_eq!(n, 16, "position {p}");
        }
    }
}

#[test]
fn pyarrow_decodes_sampled_caches_into_proper_distributions() {
    for (name, extra) in [
        (
            "py-sample",
            &["--mode", "sample", "--samples", "20", "--store-logprobs"][..],
        ),
        ("py-hybrid", &["--mode", "hybrid", "--samples", "20"][..]),
        (
            "py-hybrid-q8",
            &[
                "--mode",
                "hybrid",
                "--samples",
                "20",
                "--logprob-dtype",
                "q8",
            ][..],
        ),
    ] {
        let dir = build(name, 20, extra);
        let v = python_check("pyarrow_sample_check.py", &dir);
        let rows = all_rows(&dir);
        assert_eq!(v["positions"].as_u64().unwrap() as usize, rows.positions());
        assert_eq!(
            v["sample_ids_sum"].as_u64().unwrap(),
            rows.sample_ids.iter().map(|&i| i as u64).sum::<u64>()
        );
        assert_eq!(
            v["entries"].as_u64().unwrap() as usize,
            rows.sample_ids.len(),
            "{name}"
        );
        // The schemas/README.md recipe makes each position a distribution over the vocab
        // (within the storage's error: float16 rounding, or the q8 error recorded at write
        // time, which moves each head probability by a factor of at most e^±error).
        let recorded = Manifest::load(&dir)
            .unwrap()
            .shards
            .iter()
            .map(|s| s.stats.as_ref().unwrap().max_logprob_error as f64)
            .fold(0.0, f64::max);
        let bound = 2e-3f64.max(recorded.exp_m1());
        assert!(v["max_mass_error"].as_f64().unwrap() < bound, "{name}: {v}");
        if rows.layout.has_topk() {
            // The recipe decodes the log-probs logitcache's reader holds (its float16 copy of
            // the q8 values rounds by ≤ 2^-11 relative).
            let ours: f64 = rows
                .topk_logprobs
                .iter()
                .map(|x| x.to_f64())
                .filter(|x| x.is_finite())
                .sum();
            let got = v["topk_logprobs_sum"].as_f64().unwrap();
            assert!(
                (got - ours).abs() < 1e-3 * ours.abs(),
                "{name}: recipe {got} vs reader {ours}"
            );
        }
        if name == "py-hybrid-q8" {
            assert!(recorded > 0.0 && recorded < 0.05, "q8 error {recorded}");
        }
        if name == "py-sample" {
            // Stored log-probs are the teacher's: a top-k cache of the same teacher has the
            // same value for its most likely id (within f16).
            assert!(v["has_logprobs"].as_bool().unwrap());
        }
    }
}

#[test]
fn students_train_from_sampled_caches_with_fkl_and_refuse_what_needs_probabilities() {
    let dir = build("train", 60, &["--mode", "sample", "--samples", "16"]);
    let student = shared_dir().join(format!("v2-student-{}.toml", unique()));
    std::fs::write(
        &student,
        "hidden_size = 16\nnum_hidden_layers = 1\nnum_attention_heads = 2\nintermediate_size = 32\ntie_word_embeddings = true\n",
    )
    .unwrap();
    let out = shared_dir().join(format!("v2-runs-{}", unique()));
    let args = |loss: &str| {
        vec![
            "train".to_string(),
            "--cache".into(),
            dir.display().to_string(),
            "--student".into(),
            student.display().to_string(),
            "--out".into(),
            out.join(loss).display().to_string(),
            "--steps".into(),
            "12".into(),
            "--batch-size".into(),
            "4".into(),
            "--warmup".into(),
            "2".into(),
            "--eval-fraction".into(),
            "0.1".into(),
            "--eval-batches".into(),
            "2".into(),
            "--progress".into(),
            "off".into(),
            "--log-every".into(),
            "1".into(),
            "--lr".into(),
            "1e-2".into(),
            "--loss".into(),
            loss.into(),
        ]
    };
    let o = run_strings(&args("fkl"));
    assert_ok(&o);
    let name = student.file_stem().unwrap().to_str().unwrap();
    let metrics =
        std::fs::read_to_string(out.join("fkl").join(name).join("metrics.jsonl")).unwrap();
    let kd: Vec<f64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["kd"].as_f64())
        .collect();
    assert!(
        kd.iter().all(|v| v.is_finite()) && !kd.is_empty(),
        "{metrics}"
    );
    assert!(kd.last().unwrap() < kd.first().unwrap(), "KD fell: {kd:?}");
    for loss in ["rkl", "jsd", "fkl-topk"] {
        assert_fails(
            &run_strings(&args(loss)),
            &[&format!("--loss {loss}"), "--mode sample", "--loss fkl"],
        );
    }
}

#[test]
fn bad_sampling_flags_and_changed_parameters_are_refused() {
    let out = shared_dir().join(format!("v2-bad-{}", unique()));
    // Without teacher_args' `--top-k 8`, so a case can give its own.
    let base = || {
        let mut a = teacher_args(&plain_model(), &out, 10);
        let i = a.iter().position(|s| s == "--top-k").unwrap();
        a.drain(i..i + 2);
        a
    };
    let cases: [(&[&str], &[&str]); 6] = [
        (
            &["--mode", "sample", "--samples", "0"],
            &["--samples must be at least 1"],
        ),
        (&["--samples", "8"], &["--samples 8 needs --mode sample"]),
        (
            &["--sampling", "systematic"],
            &["--sampling systematic needs --mode sample"],
        ),
        (
            &["--mode", "hybrid", "--top-k", "400"],
            &["--mode hybrid leaves no tail", "choose k < 400"],
        ),
        (
            &["--mode", "sample", "--proposal-temperature", "0"],
            &["--proposal-temperature must be a finite number > 0"],
        ),
        (
            &["--mode", "sample", "--proposal-temperature", "-1"],
            &["--proposal-temperature must be a finite number > 0"],
        ),
    ];
    for (extra, want) in cases {
        assert_fails(&run_strings(&with(base(), extra)), want);
    }
    // Resuming into a cache with another mode, N or seed names the parameter.
    let dir = build("resume", 10, &["--mode", "sample", "--samples", "8"]);
    let again = |extra: &[&str]| run_strings(&with(teacher_args(&plain_model(), &dir, 10), extra));
    assert_ok(&again(&["--mode", "sample", "--samples", "8"]));
    assert_fails(
        &again(&["--mode", "sample", "--samples", "9"]),
        &["--samples"],
    );
    assert_fails(&again(&["--mode", "hybrid", "--samples", "8"]), &["--mode"]);
    assert_fails(
        &again(&["--mode", "sample", "--samples", "8", "--cache-seed", "1"]),
        &["--cache-seed"],
    );
    assert_fails(
        &again(&[
            "--mode",
            "sample",
            "--samples",
            "8",
            "--sampling",
            "systematic",
        ]),
        &["--sampling"],
    );
}

#[test]
fn format_1_caches_still_read_and_future_versions_are_refused() {
    let dir = build("v1", 20, &[]);
    let mut m = Manifest::load(&dir).unwrap();
    // A format-1 manifest is a top-k manifest with version 1 (the sample settings are
    // written only when they differ from their defaults).
    let text = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
    assert!(!text.contains("\"mode\"") && !text.contains("\"samples\""));
    m.format_version = 1;
    m.store(&dir).unwrap();
    let c = Cache::open(&dir).unwrap();
    assert_eq!(c.manifest.params.mode, CacheMode::Topk);
    assert_ok(&run(&["verify", dir.to_str().unwrap()]));
    assert_eq!(all_rows(&dir).positions() as u64, c.manifest.totals.tokens);
    m.format_version = 3;
    m.store(&dir).unwrap();
    let o = run(&["verify", dir.to_str().unwrap()]);
    assert_fails(&o, &["format version 3", "reads versions 1 to 2"]);
}

/// DuckDB, Polars and Hugging Face `datasets` read a cache of every mode and decode the same
/// values as logitcache (DuckDB could not read top-k caches before format 2 wrote float16
/// log-probs PLAIN).
#[test]
fn duckdb_polars_and_datasets_read_every_mode() {
    for (name, extra) in [
        ("ix-topk", &[][..]),
        ("ix-sample", &["--mode", "sample", "--samples", "12"][..]),
        ("ix-hybrid", &["--mode", "hybrid", "--samples", "12"][..]),
        ("ix-topk-q8", &["--logprob-dtype", "q8"][..]),
    ] {
        let dir = build(name, 20, extra);
        let v = python_check("interop_check.py", &dir);
        let r = all_rows(&dir);
        let sum = |x: &[u32]| x.iter().map(|&i| i as u64).sum::<u64>();
        let lp_sum: f64 = r.topk_logprobs.iter().map(|x| x.to_f64()).sum();
        for engine in ["duckdb", "polars", "datasets"] {
            let e = &v[engine];
            assert_eq!(
                e["rows"].as_u64().unwrap() as usize,
                r.rows(),
                "{name} {engine}"
            );
            assert_eq!(
                e["positions"].as_u64().unwrap() as usize,
                r.positions(),
                "{name} {engine}"
            );
            assert_eq!(
                e["input_ids_sum"].as_u64().unwrap(),
                sum(&r.input_ids),
                "{name} {engine}"
            );
            if r.layout.q8() {
                let deltas = logitcache::cache::rows::q8_deltas(&r.topk_logprob_codes, r.k);
                assert_eq!(
                    e["topk_logprob_deltas_sum"].as_u64().unwrap(),
                    deltas.iter().map(|&c| c as u64).sum::<u64>(),
                    "{name} {engine}"
                );
                for (key, ours) in [
                    ("topk_logprob_max_sum", &r.topk_logprob_max),
                    ("topk_logprob_step_sum", &r.topk_logprob_step),
                ] {
                    let want: f64 = ours.iter().map(|x| x.to_f64()).sum();
                    let got = e[key].as_f64().unwrap();
                    assert!(
                        (got - want).abs() < 1e-9 * want.abs().max(1.0),
                        "{name} {engine} {key}: {got} vs {want}"
                    );
                }
            } else if r.layout.has_topk() {
                let got = e["topk_logprobs_sum"].as_f64().unwrap();
                assert!(
                    (got - lp_sum).abs() < 1e-6 * lp_sum.abs().max(1.0),
                    "{name} {engine}: {got} vs {lp_sum}"
                );
            }
            if r.layout.has_samples() {
                assert_eq!(
                    e["sample_ids_sum"].as_u64().unwrap(),
                    sum(&r.sample_ids),
                    "{name} {engine}"
                );
                assert_eq!(
                    e["sample_counts_sum"].as_u64().unwrap(),
                    r.sample_counts.iter().map(|&c| c as u64).sum::<u64>(),
                    "{name} {engine}"
                );
            }
        }
    }
}

/// Draws that differ between two caches of the same positions: ½ Σ |count difference| over
/// every position's ids, and the total of draws.
fn moved_draws(
    a: &logitcache::cache::rows::ShardRows,
    b: &logitcache::cache::rows::ShardRows,
) -> (usize, usize) {
    let (mut moved, mut total) = (0usize, 0usize);
    for p in 0..a.positions() {
        let mut m = std::collections::BTreeMap::<u32, i64>::new();
        let ((ia, ca), (ib, cb)) = (a.samples_at(p), b.samples_at(p));
        for (i, c) in ia.iter().zip(ca) {
            *m.entry(*i).or_default() += *c as i64;
        }
        for (i, c) in ib.iter().zip(cb) {
            *m.entry(*i).or_default() -= *c as i64;
        }
        moved += m.values().map(|d| d.unsigned_abs() as usize).sum::<usize>() / 2;
        total += ca.iter().map(|&c| c as usize).sum::<usize>();
    }
    (moved, total)
}

#[test]
fn device_head_draws_what_the_host_draws() {
    // The GPU path (teacher → head chained with IoBinding; the host sends each position's
    // uniforms) run on the CPU provider, against the host sampler, for both sampled modes.
    // And on a float16 teacher whose logits are wider than the vocabulary (the head slices).
    let wide_f16 = logitcache::onnx::ToyLmSpec {
        vocab: VOCAB + 48,
        f16_logits: true,
        seed: 13,
        ..Default::default()
    };
    let cases = [
        (
            "sample",
            plain_model(),
            &["--mode", "sample", "--samples", "32", "--store-logprobs"][..],
        ),
        (
            "hybrid",
            plain_model(),
            &["--mode", "hybrid", "--samples", "24", "--store-logprobs"][..],
        ),
        (
            "hybrid-f16-wide",
            model("wide-f16", &wide_f16),
            &["--mode", "hybrid", "--samples", "24"][..],
        ),
        // A proposal q ∝ p^(1/τ): the same draws, and the same ln p/q per stored id.
        (
            "sample-tau",
            plain_model(),
            &[
                "--mode",
                "sample",
                "--samples",
                "32",
                "--proposal-temperature",
                "1.5",
                "--store-logprobs",
            ][..],
        ),
        (
            "hybrid-tau",
            plain_model(),
            &[
                "--mode",
                "hybrid",
                "--samples",
                "24",
                "--proposal-temperature",
                "0.75",
            ][..],
        ),
        // Systematic draws: the host sends the stratified points instead.
        (
            "sample-systematic",
            plain_model(),
            &[
                "--mode",
                "sample",
                "--samples",
                "32",
                "--sampling",
                "systematic",
            ][..],
        ),
        (
            "hybrid-systematic",
            plain_model(),
            &[
                "--mode",
                "hybrid",
                "--samples",
                "24",
                "--sampling",
                "systematic",
            ][..],
        ),
    ];
    for (name, model, extra) in cases {
        let build = |side: &str| {
            let out = shared_dir().join(format!("v2-{name}-{side}-{}", unique()));
            let args = [extra, &["--topk-on", side, "--temperature", "1.3"]].concat();
            assert_ok(&run_strings(&with(teacher_args(&model, &out, 30), &args)));
            out
        };
        let (host, dev) = (build("host"), build("onnx"));
        let m = Manifest::load(&dev).unwrap();
        assert!(m.shards.iter().all(|s| s.topk == "onnx"), "{name}");
        let (h, d) = (all_rows(&host), all_rows(&dev));
        assert_eq!(h.positions(), d.positions());
        assert_eq!(h.topk_ids, d.topk_ids, "{name}: the head's ids");
        for (a, b) in h.topk_logprobs.iter().zip(&d.topk_logprobs) {
            assert!((a.to_f32() - b.to_f32()).abs() < 2e-3, "{name}: {a} vs {b}");
        }
        for (a, b) in h.tail_logprob.iter().zip(&d.tail_logprob) {
            assert!(
                (a - b).abs() < 1e-3 * a.abs().max(1.0),
                "{name}: tail {a} vs {b}"
            );
        }
        // Both locate the same uniforms by the same inverse CDF; only the sums differ (f32
        // in three levels vs f64 block by block), which moves a draw lying within ~1e-6 of a
        // boundary (measured: 0 of 27936 sample draws, 1 of 20952 in each hybrid case).
        let (moved, total) = moved_draws(&h, &d);
        assert!(total > 10_000, "{name}: {total} draws");
        assert!(
            moved * 1000 <= total,
            "{name}: {moved} of {total} draws differ"
        );
        // Importance weights are stored exactly when τ ≠ 1, by both paths.
        for r in [&h, &d] {
            assert_eq!(
                r.sample_log_weights.len(),
                if name.ends_with("-tau") {
                    r.sample_ids.len()
                } else {
                    0
                },
                "{name}"
            );
        }
        // Where a position drew the same ids, their stored log-probs (and weights) agree.
        for p in 0..h.positions() {
            let (s, e) = (
                h.sample_offsets[p] as usize,
                h.sample_offsets[p + 1] as usize,
            );
            let (sd, ed) = (
                d.sample_offsets[p] as usize,
                d.sample_offsets[p + 1] as usize,
            );
            if h.sample_ids[s..e] == d.sample_ids[sd..ed] && !h.sample_logprobs.is_empty() {
                for (a, b) in h.sample_logprobs[s..e]
                    .iter()
                    .zip(&d.sample_logprobs[sd..ed])
                {
                    assert!(
                        (a.to_f32() - b.to_f32()).abs() < 2e-3 * a.to_f32().abs().max(1.0),
                        "{name}: {a} vs {b}"
                    );
                }
            }
            if h.sample_ids[s..e] == d.sample_ids[sd..ed] && !h.sample_log_weights.is_empty() {
                for (a, b) in h.sample_log_weights[s..e]
                    .iter()
                    .zip(&d.sample_log_weights[sd..ed])
                {
                    assert!(
                        (a - b).abs() < 1e-3 * a.abs().max(1.0),
                        "{name}: log weight {a} vs {b}"
                    );
                }
            }
        }
        let ent = |dir: &Path| {
            let o = run(&["inspect", dir.to_str().unwrap(), "--json"]);
            assert_ok(&o);
            let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
            v["mean_entropy"].as_f64().unwrap()
        };
        let (eh, ed) = (ent(&host), ent(&dev));
        assert!((eh - ed).abs() < 1e-4 * eh, "{name}: entropy {eh} vs {ed}");
        eprintln!("{name}: {moved} of {total} draws differ; entropy {eh:.6} / {ed:.6}");
    }
}

/// `--logprob-dtype q8`: the top-k log-probs as 8-bit codes on a per-position scale. Each
/// value is within the error the manifest records (and that error is q8's, not float16's),
/// ids and tail are the float16 cache's, the shards are smaller, a student trains from it as
/// from the float16 cache, and the setting is part of the cache's identity.
#[test]
fn q8_caches_hold_the_topk_within_the_recorded_error() {
    use logitcache::cache::rows::q8_value;
    use logitcache::cache::schema::LogprobDtype;
    // k = 32: at k = 8 the per-position scale costs what the codes save.
    let build32 = |name: &str, extra: &[&str]| {
        let out = shared_dir().join(format!("v2-{name}-{}", unique()));
        let mut args = teacher_args(&plain_model(), &out, 60);
        let at = args.iter().position(|a| a == "--top-k").unwrap();
        args[at + 1] = "32".into();
        assert_ok(&run_strings(&with(args, extra)));
        out
    };
    let f = build32("q8-f16", &[]);
    let q = build32("q8", &["--logprob-dtype", "q8"]);
    let (mf, mq) = (Manifest::load(&f).unwrap(), Manifest::load(&q).unwrap());
    assert_eq!(mf.params.logprob_dtype, LogprobDtype::Float16);
    assert_eq!(mq.params.logprob_dtype, LogprobDtype::Q8);
    assert_ok(&run(&["verify", q.to_str().unwrap()]));
    let (rf, rq) = (all_rows(&f), all_rows(&q));
    assert_eq!(rf.topk_ids, rq.topk_ids);
    assert_eq!(rf.tail_logprob, rq.tail_logprob);
    let recorded = |m: &Manifest| {
        m.shards
            .iter()
            .map(|s| s.stats.as_ref().unwrap().max_logprob_error)
            .fold(0.0, f32::max)
    };
    let (ef, eq) = (recorded(&mf), recorded(&mq));
    let k = rq.k;
    let (mut worst, mut half_step) = (0f32, 0f32);
    for p in 0..rq.positions() {
        let (max, step) = (rq.topk_logprob_max[p], rq.topk_logprob_step[p]);
        // The widest gap between neighbouring codes is the last one, step · (2·254 + 1).
        half_step = half_step.max(step.to_f32() * 509.0 / 2.0);
        let codes = &rq.topk_logprob_codes[p * k..(p + 1) * k];
        for (j, &c) in codes.iter().enumerate() {
            let v = q8_value(max, step, c);
            assert_eq!(rq.topk_logprobs[p * k + j], half::f16::from_f32(v));
            // The float16 cache is within `ef` of the exact value, the q8 one within `eq`.
            worst = worst.max((v - rf.topk_logprobs[p * k + j].to_f32()).abs());
        }
    }
    // float16 rounds `max` by at most 2^-11 of it (|max| ≤ ln V).
    let bound = half_step * 1.0001 + (VOCAB as f32).ln() / 2048.0;
    assert!(eq > ef && eq <= bound, "{ef} < {eq} ≤ {bound}");
    assert!(worst <= eq + ef + 1e-6, "{worst} vs {eq} + {ef}");
    assert!(
        (mq.totals.bytes as f64) < 0.9 * mf.totals.bytes as f64,
        "q8 {} vs float16 {} bytes",
        mq.totals.bytes,
        mf.totals.bytes
    );
    let ins: serde_json::Value =
        serde_json::from_slice(&run(&["inspect", q.to_str().unwrap(), "--json"]).stdout).unwrap();
    assert_eq!(ins["logprob_dtype"], "q8");
    assert!((ins["max_logprob_error"].as_f64().unwrap() - eq as f64).abs() < 1e-6);
    // The error a loss sees: every stored probability within the recorded one, which is
    // small (the quadratic scale is finest where the probability is).
    let ep = ins["max_prob_error"].as_f64().unwrap();
    assert!(ep > 0.0 && ep < 0.01, "max_prob_error {ep}");
    let worst_p = (0..rq.topk_logprobs.len())
        .map(|i| (rq.topk_logprobs[i].to_f64().exp() - rf.topk_logprobs[i].to_f64().exp()).abs())
        .fold(0.0, f64::max);
    assert!(worst_p <= 2.0 * ep + 2e-3, "{worst_p} vs {ep}");
    // The same student, seed and steps from each cache: the same losses within q8's error.
    let student = shared_dir().join(format!("q8-student-{}.toml", unique()));
    std::fs::write(
        &student,
        "hidden_size = 16\nnum_hidden_layers = 1\nnum_attention_heads = 2\nintermediate_size = 32\ntie_word_embeddings = true\n",
    )
    .unwrap();
    let kd = |cache: &Path| -> Vec<f64> {
        let out = shared_dir().join(format!("q8-runs-{}", unique()));
        let args: Vec<String> = [
            "train",
            "--cache",
            cache.to_str().unwrap(),
            "--student",
            student.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--steps",
            "8",
            "--batch-size",
            "4",
            "--warmup",
            "2",
            "--eval-fraction",
            "0.1",
            "--eval-batches",
            "2",
            "--progress",
            "off",
            "--log-every",
            "1",
            "--lr",
            "1e-2",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_ok(&run_strings(&args));
        let name = student.file_stem().unwrap().to_str().unwrap();
        std::fs::read_to_string(out.join(name).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v["kd"].as_f64())
            .collect()
    };
    let (kf, kq) = (kd(&f), kd(&q));
    assert_eq!(kf.len(), kq.len());
    assert!(!kf.is_empty());
    for (a, b) in kf.iter().zip(&kq) {
        assert!(
            (a - b).abs() < 0.02 * a.abs().max(0.1),
            "KD {kf:?} vs {kq:?}"
        );
    }
    // The encoding is part of the cache's identity; a sample cache has no top-k to encode.
    let mut again = with(
        teacher_args(&plain_model(), &q, 60),
        &["--logprob-dtype", "float16"],
    );
    let at = again.iter().position(|a| a == "--top-k").unwrap();
    again[at + 1] = "32".into();
    assert_fails(&run_strings(&again), &["--logprob-dtype"]);
    let sample = with(
        teacher_args(&plain_model(), &shared_dir().join("q8-sample"), 20),
        &["--mode", "sample", "--logprob-dtype", "q8"],
    );
    assert_fails(
        &run_strings(&sample),
        &["--logprob-dtype q8", "--mode hybrid"],
    );
}

/// `--proposal-temperature τ ≠ 1`: the draws come from q ∝ p^(1/τ) (a flatter proposal
/// at τ > 1 reaches more of the tail) and each stored id carries ln p/q in
/// `sample_log_weights`, consistent with the teacher's own log-probs; the recipe's estimate
/// sums to 1 on average; resuming with another τ is refused. (The device head's weights are
/// checked against the host's in `device_head_draws_what_the_host_draws`.)
#[test]
fn proposal_temperature_stores_importance_weights() {
    let one = build("tau-1", 40, &["--mode", "sample", "--samples", "24"]);
    let tau = build(
        "tau-2",
        40,
        &[
            "--mode",
            "sample",
            "--samples",
            "24",
            "--proposal-temperature",
            "2",
            "--store-logprobs",
        ],
    );
    let m = Manifest::load(&tau).unwrap();
    assert_eq!(m.params.proposal_temperature, 2.0);
    assert!(m.params.layout().sample_log_weights);
    assert_ok(&run(&["verify", tau.to_str().unwrap()]));
    let (r1, r2) = (all_rows(&one), all_rows(&tau));
    assert!(r1.sample_log_weights.is_empty());
    assert_eq!(r2.sample_log_weights.len(), r2.sample_ids.len());
    // Flatter: more distinct ids per position.
    assert!(
        r2.sample_ids.len() as f64 > 1.2 * r1.sample_ids.len() as f64,
        "{} vs {}",
        r2.sample_ids.len(),
        r1.sample_ids.len()
    );
    // ln p/q = ln p − (ln p / τ − c) with c = ln Σ p^(1/τ) one number per position: so
    // w − (1 − 1/τ) ln p is the same for every id of a position (up to float16's rounding
    // of the stored ln p).
    for p in 0..r2.positions() {
        let (s, e) = (
            r2.sample_offsets[p] as usize,
            r2.sample_offsets[p + 1] as usize,
        );
        let c: Vec<f32> = (s..e)
            .map(|i| r2.sample_log_weights[i] - 0.5 * r2.sample_logprobs[i].to_f32())
            .collect();
        let tol = 1e-3
            * (s..e)
                .map(|i| r2.sample_logprobs[i].to_f32().abs())
                .fold(1.0, f32::max);
        assert!(
            c.iter().all(|x| (x - c[0]).abs() < tol),
            "position {p}: {c:?}"
        );
    }
    // The recipe (pyarrow, schemas/README.md): count/N · e^w sums to 1 on average.
    let v = python_check("pyarrow_sample_check.py", &tau);
    let mean = v["mass_sum"].as_f64().unwrap() / v["positions"].as_f64().unwrap();
    assert!((mean - 1.0).abs() < 0.05, "mean estimated mass {mean}");
    // Resuming with another τ is refused.
    let again = with(
        teacher_args(&plain_model(), &tau, 40),
        &[
            "--mode",
            "sample",
            "--samples",
            "24",
            "--proposal-temperature",
            "1.5",
            "--store-logprobs",
        ],
    );
    assert_fails(&run_strings(&again), &["--proposal-temperature"]);
}

//! The stored top-k equals an independent computation: ONNX Runtime's full logits for each
//! window run alone (batch of one, no padding), reduced by a full sort in f64
//! (`reference_topk`). Covers right and left padding, f16 logits, position_ids, a padded
//! vocab, empty past key/values, a temperature, the ONNX top-k head, and last windows.

use crate::util::*;
use logitcache::cache::reader::Cache;
use logitcache::onnx::ToyLmSpec;
use logitcache::teacher::backend::{Batch, PaddingSide};
use logitcache::teacher::ort_backend::full_logits;
use logitcache::teacher::topk::reference_topk;
use std::path::Path;

/// Every position of the cache against the model's own logits, with short last windows of
/// documents among them (the corpus is made to have them).
fn check_cache_against_reference(model: &Path, cache_dir: &Path, temperature: f64) {
    let last_windows = check_rows_against_reference(model, cache_dir, temperature);
    assert!(
        last_windows > 0,
        "the corpus should produce short last windows"
    );
}

/// Every position of the cache against the model's own logits; returns how many windows are
/// short last windows of their documents.
fn check_rows_against_reference(model: &Path, cache_dir: &Path, temperature: f64) -> usize {
    let cache = Cache::open(cache_dir).unwrap();
    let m = &cache.manifest;
    assert!(m.totals.complete);
    let k = m.params.top_k;
    let mut teacher = host_teacher(model, k, temperature as f32, VOCAB);
    let rows = all_rows(cache_dir);
    assert_eq!(rows.rows() as u64, m.plan.sequences);
    assert!(
        m.totals.computed_tokens > m.totals.tokens,
        "batches should include padding"
    );
    let (mut positions, mut exact, mut last_windows) = (0usize, 0usize, 0usize);
    for r in 0..rows.rows() {
        let (s, e) = (rows.offsets[r] as usize, rows.offsets[r + 1] as usize);
        let window = &rows.input_ids[s..e];
        if rows.window_index[r] > 0 && window.len() < m.params.seq_len {
            last_windows += 1;
        }
        let batch = Batch::pad(&[window], PaddingSide::Right, 0);
        let (dims, logits) = full_logits(&mut teacher, &batch).unwrap();
        let v = dims[2];
        for p in 0..window.len() {
            let row = &logits[p * v..p * v + VOCAB];
            let (rids, rlps, rtail) = reference_topk(row, k, temperature);
            let at = (s + p) * k;
            let ids = &rows.topk_ids[at..at + k];
            // Reference log-prob of every id, to judge the cached ids even across near-ties.
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lz = row
                .iter()
                .map(|&x| ((x as f64 - max) / temperature).exp())
                .sum::<f64>()
                .ln();
            let ref_lp = |id: u32| (row[id as usize] as f64 - max) / temperature - lz;
            let kth = rlps[k - 1];
            for (j, &id) in ids.iter().enumerate() {
                let lp = rows.topk_logprobs[at + j].to_f32() as f64;
                let want = ref_lp(id);
                assert!(
                    (lp - want).abs() <= 2e-3 + 1e-3 * want.abs(),
                    "seq {} pos {p} rank {j}: stored {lp} vs reference {want}",
                    rows.seq_ids[r]
                );
                assert!(
                    want >= kth - 1e-4,
                    "seq {} pos {p}: id {} is not in the reference top-k",
                    rows.seq_ids[r],
                    ids[j]
                );
            }
            let tail = rows.tail_logprob[s + p] as f64;
            assert!(
                (tail - rtail).abs() <= 1e-3 * (1.0 + rtail.abs()),
                "seq {} pos {p}: tail {tail} vs {rtail}",
                rows.seq_ids[r]
            );
            positions += 1;
            exact += (ids == rids.as_slice()) as usize;
        }
    }
    // Ties may reorder a pair, but almost every position must match the full sort exactly.
    assert!(
        exact * 100 >= positions * 99,
        "{exact} of {positions} positions match exactly"
    );
    last_windows
}

fn make_cache(name: &str, model: &Path, extra: &[&str]) -> std::path::PathBuf {
    let out = shared_dir().join(format!("cache-{name}"));
    let mut args = teacher_args(model, &out, 60);
    args.extend(extra.iter().map(|s| s.to_string()));
    assert_ok(&run_strings(&args));
    let v = run(&["verify", out.to_str().unwrap()]);
    assert_ok(&v);
    out
}

#[test]
fn plain_f32_right_padding() {
    let model = plain_model();
    let out = make_cache("plain", &model, &[]);
    check_cache_against_reference(&model, &out, 1.0);
}

#[test]
fn position_ids_left_padding_and_temperature() {
    let model = model(
        "posids",
        &ToyLmSpec {
            vocab: VOCAB,
            position_ids_input: true,
            seed: 3,
            ..Default::default()
        },
    );
    let out = make_cache(
        "left",
        &model,
        &["--padding-side", "left", "--temperature", "0.7"],
    );
    check_cache_against_reference(&model, &out, 0.7);
}

#[test]
fn f16_logits() {
    let model = model(
        "f16",
        &ToyLmSpec {
            vocab: VOCAB,
            f16_logits: true,
            seed: 5,
            ..Default::default()
        },
    );
    let out = make_cache("f16", &model, &[]);
    check_cache_against_reference(&model, &out, 1.0);
    let m = Cache::open(&out).unwrap().manifest;
    assert_eq!(m.model.logits_dtype, "float16");
}

#[test]
fn padded_vocab_is_dropped_and_renormalised() {
    let model = model(
        "padded",
        &ToyLmSpec {
            vocab: VOCAB + 48,
            seed: 7,
            ..Default::default()
        },
    );
    let out = make_cache("padded", &model, &[]);
    check_cache_against_reference(&model, &out, 1.0);
    let m = Cache::open(&out).unwrap().manifest;
    assert_eq!((m.vocab_size, m.model.logits_vocab), (VOCAB, VOCAB + 48));
}

#[test]
fn empty_past_key_values_are_fed() {
    let model = model(
        "pkv",
        &ToyLmSpec {
            vocab: VOCAB,
            past_key_values: true,
            seed: 9,
            ..Default::default()
        },
    );
    let out = make_cache("pkv", &model, &[]);
    check_cache_against_reference(&model, &out, 1.0);
}

/// KV-cache exports as Optimum writes them: past keys/values that really feed `Concat`
/// nodes into `present.*` outputs (`…with_past`), and a merged decoder whose
/// `use_cache_branch` selects an `If` branch (the wrong branch halves every logit). Fed empty
/// pasts and `use_cache_branch = false`, the cache equals the reference computation.
#[test]
fn kv_cache_exports_give_the_plain_models_cache() {
    let plain = model(
        "pkv-plain",
        &ToyLmSpec {
            vocab: VOCAB,
            seed: 9,
            ..Default::default()
        },
    );
    let want = all_rows(&make_cache("pkv-plain", &plain, &[]));
    for (name, branch) in [("pkv-present", false), ("pkv-merged", true)] {
        let model = model(
            name,
            &ToyLmSpec {
                vocab: VOCAB,
                past_key_values: true,
                present_outputs: true,
                use_cache_branch: branch,
                seed: 9,
                ..Default::default()
            },
        );
        let out = make_cache(name, &model, &[]);
        check_cache_against_reference(&model, &out, 1.0);
        let m = Cache::open(&out).unwrap().manifest;
        let outputs: Vec<&str> = m.model.outputs.iter().map(|o| o.name.as_str()).collect();
        assert!(outputs.contains(&"present.0.key"), "{outputs:?}");
        // The same logits as the model without a KV cache (same weights).
        let got = all_rows(&out);
        assert_eq!(got.topk_ids, want.topk_ids, "{name}");
        assert_eq!(got.topk_logprobs, want.topk_logprobs, "{name}");
    }
}

#[test]
fn onnx_topk_head_matches_host_topk() {
    // The GPU path (teacher → top-k head chained with IoBinding) run on the CPU provider.
    let model = plain_model();
    let out = make_cache("head", &model, &["--topk", "onnx", "--temperature", "1.5"]);
    check_cache_against_reference(&model, &out, 1.5);
    let m = Cache::open(&out).unwrap().manifest;
    assert!(m.shards.iter().all(|s| s.topk == "onnx"));
}

/// A one-layer language model whose attention is unfused (`MatMul(q, kᵀ) → Softmax →
/// MatMul(·, v)`, queries as keys and values, no mask: only the planner reads it), `heads`
/// heads of 2 dimensions; with `shapes` the scores' shape is recorded as exporters do.
fn unfused_attention_model(name: &str, heads: i64, shapes: bool) -> std::path::PathBuf {
    use logitcache::onnx::builder::{Dim, GraphBuilder, attr_int, attr_ints};
    use logitcache::onnx::data_type::{FLOAT, INT64};
    let d = heads * 2;
    let mut g = GraphBuilder::new(name);
    let bl = [Dim::sym("batch_size"), Dim::sym("sequence_length")];
    let ids = g.input("input_ids", INT64, &bl);
    g.input("attention_mask", INT64, &bl);
    let fill = |n: usize, seed: f32| -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 * 0.37 + seed).sin()) * 0.5)
            .collect()
    };
    let emb = g.init_f32("emb", &[VOCAB as i64, d], &fill(VOCAB * d as usize, 1.0));
    let x = g.node("Gather", &[&emb, &ids], vec![attr_int("axis", 0)]);
    let split = g.init_i64("split", &[4], &[0, 0, heads, 2]);
    let r = g.node("Reshape", &[&x, &split], vec![]);
    let q = g.node("Transpose", &[&r], vec![attr_ints("perm", &[0, 2, 1, 3])]);
    let kt = g.node("Transpose", &[&r], vec![attr_ints("perm", &[0, 2, 3, 1])]);
    let s = g.node("MatMul", &[&q, &kt], vec![]);
    if shapes {
        let seq = Dim::sym("sequence_length");
        let dims = [Dim::sym("batch_size"), Dim::Fixed(heads), seq.clone(), seq];
        g.annotate(&s, FLOAT, &dims);
    }
    let p = g.node("Softmax", &[&s], vec![attr_int("axis", -1)]);
    let o = g.node("MatMul", &[&p, &q], vec![]);
    let o = g.node("Transpose", &[&o], vec![attr_ints("perm", &[0, 2, 1, 3])]);
    let merge = g.init_i64("merge", &[3], &[0, 0, d]);
    let o = g.node("Reshape", &[&o, &merge], vec![]);
    let w = g.init_f32(
        "lm_head",
        &[d, VOCAB as i64],
        &fill(VOCAB * d as usize, 2.0),
    );
    let logits = g.node("MatMul", &[&o, &w], vec![]);
    let v = Dim::Fixed(VOCAB as i64);
    g.output_as(&logits, "logits", FLOAT, &[bl[0].clone(), bl[1].clone(), v]);
    let path = shared_dir().join(format!("{name}.onnx"));
    g.write(&path).unwrap();
    path
}

#[test]
fn unfused_attention_scores_are_in_the_default_budget() {
    // 16 heads at 24 tokens: 16 × 24 × 4 bytes × 2 score-sized tensors (the MatMul's and the
    // Softmax's) = 3072 bytes per token, more than the plain head's 4 × 400: the scores set
    // the budget. Without recorded shapes the heads are unknown: one window per batch.
    for (name, shapes, want) in [
        ("attn-shapes", true, (512usize << 20) / (16 * 24 * 4 * 2)),
        ("attn-no-shapes", false, 24),
    ] {
        let model = unfused_attention_model(name, 16, shapes);
        let s = logitcache::onnx::attention::attention_scores(
            &logitcache::onnx::structure::ModelStructure::load(&model).unwrap(),
        )
        .expect("the planner finds the attention");
        assert_eq!(s.ops, ["MatMul", "Softmax"]);
        let out = shared_dir().join(format!("cache-{name}"));
        let args = teacher_args(&model, &out, 20);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = run_env(&args, &[("RUST_LOG", "info")]);
        assert_ok(&o);
        let m = Cache::open(&out).unwrap().manifest;
        assert!(
            m.shards.iter().all(|s| s.max_batch_tokens == Some(want)),
            "{name}: {:?}",
            m.shards
                .iter()
                .map(|s| s.max_batch_tokens)
                .collect::<Vec<_>>()
        );
        let log = String::from_utf8_lossy(&o.stderr);
        let said = if shapes {
            "16 heads"
        } else {
            "one window per batch"
        };
        assert!(log.contains(said), "{name}: {log}");
    }
}

#[test]
fn token_budget_batches_give_the_same_cache() {
    // Windows are at most 24 tokens: a budget of 30 puts every full window in a batch of its
    // own and pairs only short ones (the default budget keeps --batch-size 4).
    let model = plain_model();
    let small = make_cache("budget-30", &model, &["--max-batch-tokens", "30"]);
    let default = make_cache("budget-default", &model, &[]);
    check_cache_against_reference(&model, &small, 1.0);
    let (a, b) = (all_rows(&small), all_rows(&default));
    assert_eq!(a.seq_ids, b.seq_ids);
    assert_eq!(a.input_ids, b.input_ids);
    assert_eq!(a.topk_ids, b.topk_ids);
    let worst = a
        .topk_logprobs
        .iter()
        .zip(&b.topk_logprobs)
        .map(|(x, y)| (x.to_f32() - y.to_f32()).abs())
        .fold(0f32, f32::max);
    // Any misplaced row would differ by far more than a float16 step.
    assert!(worst <= 1e-2, "largest log-prob difference {worst}");
    let ms = Cache::open(&small).unwrap().manifest;
    let md = Cache::open(&default).unwrap().manifest;
    assert!(ms.shards.iter().all(|s| s.max_batch_tokens == Some(30)));
    // The toy's head (MatMul → Add → Mul) holds two logits-sized tensors at once, so the
    // default budget is half what the logits alone would get.
    let structure = logitcache::onnx::structure::ModelStructure::load(&model).unwrap();
    let chain = logitcache::onnx::logits_chain::logits_chain(&structure);
    assert_eq!(chain, ["MatMul", "Add", "Mul"]);
    let live = logitcache::onnx::logits_chain::live_logits_tensors(&chain);
    assert_eq!(
        logitcache::onnx::attention::attention_scores(&structure),
        None
    );
    let want = logitcache::teacher::default_max_batch_tokens(VOCAB, 24, live, 0);
    assert_eq!(want, (512 << 20) / (4 * VOCAB * 2));
    assert!(md.shards.iter().all(|s| s.max_batch_tokens == Some(want)));
    // Smaller batches pad less: full windows now run unpadded.
    assert!(ms.totals.computed_tokens < md.totals.computed_tokens);

    // One shard of more windows than two compute groups (at --seq-len 2048 a group is 64
    // windows, whatever their length: these documents are shorter, one window each): its
    // rows, computed group by group and written part by part (parts ending inside the
    // 128-row row groups), equal those of 16-window shards.
    let (one, many) = (
        fresh_dir("budget-one-shard"),
        fresh_dir("budget-many-shards"),
    );
    for (dir, shard) in [(&one, "1024"), (&many, "16")] {
        let mut args = teacher_args(&model, dir, 300);
        let s = args.iter().position(|a| a == "--shard-size").unwrap();
        args[s + 1] = shard.into();
        let s = args.iter().position(|a| a == "--seq-len").unwrap();
        args[s + 1] = "2048".into();
        assert_ok(&run_strings(&args));
    }
    let m = Cache::open(&one).unwrap().manifest;
    assert!(
        m.shards.len() == 1 && m.totals.sequences > 2 * 64 + 8,
        "{:?}",
        m.totals
    );
    let (a, b) = (all_rows(&one), all_rows(&many));
    assert_eq!(a.seq_ids, b.seq_ids);
    assert_eq!(a.input_ids, b.input_ids);
    assert_eq!(a.topk_ids, b.topk_ids);
    assert_eq!(a.topk_logprobs, b.topk_logprobs);
    assert_eq!(a.tail_logprob, b.tail_logprob);
    // At --seq-len 2048 every document is one window: no short last windows to require.
    check_rows_against_reference(&model, &one, 1.0);
    // The recorded size and sha256 are the file's.
    assert_ok(&run(&["verify", one.to_str().unwrap()]));

    let mut args = teacher_args(&model, &shared_dir().join("budget-bad"), 10);
    args.extend(["--max-batch-tokens".into(), "10".into()]);
    assert_fails(
        &run_strings(&args),
        &[
            "--max-batch-tokens 10 is below --seq-len 24",
            "pass at least 24",
        ],
    );
}

#[test]
fn a_one_matmul_head_gives_the_reference_cache() {
    // The memory benchmark's teacher (`toy-teacher --plain-head`): no bias, scale folded in.
    let spec = |plain_head| ToyLmSpec {
        vocab: VOCAB,
        plain_head,
        seed: 5,
        ..Default::default()
    };
    let plain = model("plain-head", &spec(true));
    let full = model("full-head", &spec(false));
    let out = make_cache("plain-head", &plain, &[]);
    check_cache_against_reference(&plain, &out, 1.0);
    // Same weights, head without its bias: the logits differ from the default head's by
    // scale × bias, the same vector at every position.
    let logits = |m: &Path| {
        let mut t = host_teacher(m, 8, 1.0, VOCAB);
        let a: Vec<u32> = (5..25).collect();
        full_logits(&mut t, &Batch::pad(&[&a], PaddingSide::Right, 0))
            .unwrap()
            .1
    };
    let (p, f) = (logits(&plain), logits(&full));
    let diff: Vec<f32> = f.iter().zip(&p).map(|(f, p)| f - p).collect();
    let first = &diff[..VOCAB];
    assert!(first.iter().any(|d| d.abs() > 0.1), "no bias removed");
    for pos in diff.chunks(VOCAB) {
        for (d, d0) in pos.iter().zip(first) {
            assert!((d - d0).abs() < 1e-3, "{d} vs {d0}");
        }
    }
}

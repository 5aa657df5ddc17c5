//! `logitcache run` on a tiny pipeline (a given toy ONNX teacher, two teachers pretrained and
//! exported by the pipeline, three students, CE baselines): everything is produced, a rerun
//! skips everything, a changed parameter rebuilds exactly what depends on it, and a run
//! killed midway (twice) continues to the same results as a straight run. Also `law` on
//! the results and the pipeline file's errors.

use crate::util::*;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn pipeline_text(steps: usize, top_k: usize) -> String {
    format!(
        r#"
name = "tiny"
threads = 2
[data]
corpus = ["{corpus}"]
tokenizer = "{tok}"
seq_len = 32
eval_fraction = 0.1
[cache]
top_k = {top_k}
shard_size = 64
[train]
steps = {steps}
batch_size = 4
lr = 3e-3
evals = 2
eval_batches = 3
[teacher_train]
steps = 10
batch_size = 4
lr = 3e-3
evals = 1
eval_batches = 3
[[teacher]]
name = "toy"
onnx = "{toy}"
[[teacher]]
name = "ta"
arch = {{ hidden_size = 32, num_hidden_layers = 1, num_attention_heads = 4, intermediate_size = 64, tie_word_embeddings = true }}
[[teacher]]
name = "tb"
config = "tb.toml"
[[student]]
name = "s1"
arch = {{ hidden_size = 16, num_hidden_layers = 1, num_attention_heads = 2, intermediate_size = 32, tie_word_embeddings = true }}
[[student]]
name = "s2"
arch = {{ hidden_size = 24, num_hidden_layers = 1, num_attention_heads = 2, intermediate_size = 48, tie_word_embeddings = true }}
[[student]]
config = "preset:nano"
"#,
        corpus = corpus(300).display(),
        tok = tokenizer().display(),
        toy = plain_model().display(),
    )
}

/// A pipeline file in `dir` (with its `tb.toml` beside it).
fn write_pipeline(dir: &Path, steps: usize, top_k: usize) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("tb.toml"),
        "hidden_size = 48\nnum_hidden_layers = 2\nnum_attention_heads = 4\nintermediate_size = 96\ntie_word_embeddings = true\n",
    )
    .unwrap();
    let p = dir.join("tiny.toml");
    std::fs::write(&p, pipeline_text(steps, top_k)).unwrap();
    p
}

fn run_pipeline(p: &Path, out: &Path, env: &[(&str, &str)]) -> std::process::Output {
    let mut e = vec![("RUST_LOG", "info")];
    e.extend_from_slice(env);
    run_env(
        &["run", p.to_str().unwrap(), "--out", out.to_str().unwrap()],
        &e,
    )
}

/// The straight run every other test compares with: (out dir, its first results.csv).
pub(crate) fn baseline() -> &'static (PathBuf, String) {
    static B: OnceLock<(PathBuf, String)> = OnceLock::new();
    B.get_or_init(|| {
        let dir = shared_dir().join("pl-base");
        let p = write_pipeline(&dir, 6, 8);
        let out = dir.join("out");
        assert_ok(&run_pipeline(&p, &out, &[]));
        let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
        (out, csv)
    })
}

/// `results.csv` without the run_dir column (which names the output directory).
fn results_without_dirs(csv: &str) -> Vec<String> {
    let col = csv
        .lines()
        .next()
        .unwrap()
        .split(',')
        .position(|h| h == "run_dir")
        .unwrap();
    csv.lines()
        .map(|l| {
            let mut f: Vec<&str> = l.split(',').collect();
            f.remove(col);
            f.join(",")
        })
        .collect()
}

fn count(s: &str, what: &str) -> usize {
    s.matches(what).count()
}

#[test]
fn run_produces_everything_and_reruns_only_what_changed() {
    let (out, csv) = baseline();
    let resolved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("pipeline.resolved.json")).unwrap())
            .unwrap();
    assert_eq!(resolved["name"], "tiny");
    assert_eq!(resolved["file"]["cache"]["temperature"], 1.0, "{resolved}");
    assert_eq!(
        resolved["file"]["teacher"][2]["config"],
        out.parent().unwrap().join("tb.toml").display().to_string()
    );
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 1 + 3 * 4, "{csv}");
    for s in ["s1", "s2", "nano"] {
        for t in ["toy", "ta", "tb", "ce"] {
            assert!(
                lines
                    .iter()
                    .any(|l| l.starts_with(&format!("{t},")) && l.contains(&format!(",{s},"))),
                "no row for {s} <- {t}:\n{csv}"
            );
        }
    }
    // The exported teachers were the teacher stage's models, and every cache verifies.
    for t in ["toy", "ta", "tb"] {
        let cache = out.join("caches").join(t);
        assert_ok(&run(&["verify", cache.to_str().unwrap()]));
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(cache.join("manifest.json")).unwrap()).unwrap();
        let model = if t == "toy" {
            plain_model()
        } else {
            out.join("teachers").join(t).join("model.onnx")
        };
        let (sha, _) = logitcache::util::sha256_file(&model).unwrap();
        assert_eq!(m["model"]["sha256"], sha.as_str(), "{t}");
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for s in [
        "# logitcache report: tiny",
        "## Student eval loss by teacher",
        "## Does this family show a capacity gap?",
        "## The law of capacity gap",
        "KD beat the CE-only baseline in",
        "plots/loss_vs_teacher.png",
    ] {
        assert!(report.contains(s), "report lacks {s:?}:\n{report}");
    }
    for png in ["loss_vs_teacher.png", "curves.png"] {
        let b = std::fs::read(out.join("plots").join(png)).unwrap();
        assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "{png}");
    }
    // `law` agrees with the report: the same fit, or the same refusal.
    let law = run(&["law", out.join("results.csv").to_str().unwrap()]);
    if report.contains("No fit:") {
        assert_eq!(law.status.code(), Some(2));
    } else {
        assert_ok(&law);
        let fit_line = stdout(&law)
            .lines()
            .find(|l| l.starts_with("fit: T*"))
            .unwrap()
            .to_string();
        assert!(report.contains(&fit_line), "{fit_line}\n{report}");
    }

    // A rerun does nothing: 19 steps skipped (tokenizer, data, 2 teachers, 3 caches, 12 runs).
    let p = out.parent().unwrap().join("tiny.toml");
    let ckpt = out.join("runs/ta/s1/checkpoint/model.safetensors");
    let before = std::fs::metadata(&ckpt).unwrap().modified().unwrap();
    let o = run_pipeline(&p, out, &[]);
    assert_ok(&o);
    let err = stderr(&o);
    assert_eq!(count(&err, "skipped"), 19, "{err}");
    assert_eq!(count(&err, "rebuilding"), 0, "{err}");
    assert_eq!(
        std::fs::metadata(&ckpt).unwrap().modified().unwrap(),
        before
    );
    assert_eq!(
        std::fs::read_to_string(out.join("results.csv")).unwrap(),
        *csv
    );

    // More student steps: only the 12 student runs are redone.
    write_pipeline(out.parent().unwrap(), 7, 8);
    let o = run_pipeline(&p, out, &[]);
    assert_ok(&o);
    let err = stderr(&o);
    assert_eq!(count(&err, "skipped"), 7, "{err}");
    assert_eq!(count(&err, "rebuilding"), 12, "{err}");

    // Another k: the 3 caches and the 9 distilled runs; teachers and CE baselines stay.
    write_pipeline(out.parent().unwrap(), 7, 6);
    let o = run_pipeline(&p, out, &[]);
    assert_ok(&o);
    let err = stderr(&o);
    assert_eq!(count(&err, "rebuilding"), 12, "{err}");
    assert_eq!(count(&err, "skipped"), 7, "{err}");
    for s in [
        "s1 (CE): done before",
        "teacher ta: done before",
        "token data: done before",
    ] {
        assert!(err.contains(s), "{s}: {err}");
    }
    // Teacher ta's cache manifest and the report.
    let outputs = || {
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("caches/ta/manifest.json")).unwrap())
                .unwrap();
        (m, std::fs::read_to_string(out.join("report.md")).unwrap())
    };
    assert_eq!(outputs().0["params"]["top_k"], 6);
    // Other `[cache]` settings, each a rerun of the 3 caches and the 9 distilled runs only.
    let rerun_with = |cache_keys: &str| {
        let text = pipeline_text(7, 6).replace("top_k = 6\n", &format!("top_k = 6\n{cache_keys}"));
        std::fs::write(&p, text).unwrap();
        let o = run_pipeline(&p, out, &[]);
        assert_ok(&o);
        let err = stderr(&o);
        assert_eq!(count(&err, "rebuilding"), 12, "{err}");
        assert_eq!(count(&err, "skipped"), 7, "{err}");
        outputs()
    };

    // A sampled cache mode from a flatter proposal.
    let (m, report) = rerun_with("mode = \"sample\"\nsamples = 8\nproposal_temperature = 1.5\n");
    assert_eq!(m["params"]["mode"], "sample");
    assert_eq!(m["params"]["samples"], 8);
    assert_eq!(m["params"]["proposal_temperature"], 1.5);
    assert!(
        report.contains("8 draws per position (sample) from the proposal p^(1/1.5)"),
        "{report}"
    );

    // A hybrid with q8 log-probs.
    let (m, report) = rerun_with("mode = \"hybrid\"\nsamples = 8\nlogprob_dtype = \"q8\"\n");
    assert_eq!(m["params"]["mode"], "hybrid");
    assert_eq!(m["params"]["logprob_dtype"], "q8");
    assert!(
        report.contains("top-6 + 8 tail draws (hybrid), q8 log-probs"),
        "{report}"
    );
}

#[test]
fn a_run_killed_midway_continues_to_the_same_results() {
    let (_, want) = baseline();
    let dir = shared_dir().join("pl-killed");
    let p = write_pipeline(&dir, 6, 8);
    let out = dir.join("out");
    // Killed after teacher ta's third checkpoint (step 6 of 10); then, resumed, after the
    // second checkpoint of the first student run.
    for fp in ["checkpoint-saved:3", "checkpoint-saved:9"] {
        let o = run_pipeline(&p, &out, &[("LOGITCACHE_FAILPOINT", fp)]);
        assert_eq!(
            o.status.code(),
            None,
            "{fp}: expected SIGKILL\n{}",
            stderr(&o)
        );
    }
    assert!(!out.join("results.csv").exists());
    let o = run_pipeline(&p, &out, &[]);
    assert_ok(&o);
    assert!(
        stderr(&o).contains("continuing an interrupted run"),
        "{}",
        stderr(&o)
    );
    let got = std::fs::read_to_string(out.join("results.csv")).unwrap();
    assert_eq!(results_without_dirs(&got), results_without_dirs(want));
}

/// `run` on pipeline `text` (written to `dir/<name>.toml`, output `dir/o`) fails naming `frags`.
fn assert_refused(dir: &Path, name: &str, text: &str, frags: &[&str]) {
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).unwrap();
    let o = run(&[
        "run",
        p.to_str().unwrap(),
        "--out",
        dir.join("o").to_str().unwrap(),
    ]);
    assert_fails(&o, frags);
}

#[test]
fn law_and_pipeline_errors_are_clear() {
    let dir = shared_dir().join("pl-errors");
    std::fs::create_dir_all(&dir).unwrap();
    let base = pipeline_text(6, 8);
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "unknown-key",
            "\n[extra]\nx = 1\n",
            &["is not valid", "unknown field `extra`"],
        ),
        ("no-teacher", "", &["no [[teacher]]"]),
        (
            "both",
            "\n[[teacher]]\nname = \"tc\"\nonnx = \"x.onnx\"\nconfig = \"preset:nano\"\n",
            &["teacher tc: give `onnx` or an architecture, not both"],
        ),
        (
            "dup",
            "\n[[teacher]]\nname = \"ta\"\nconfig = \"preset:nano\"\n",
            &["teacher name `ta` is used twice"],
        ),
        (
            "missing-onnx",
            "\n[[teacher]]\nname = \"tz\"\nonnx = \"nowhere.onnx\"\n",
            &["teacher tz", "nowhere.onnx does not exist"],
        ),
    ];
    for (name, extra, frags) in cases {
        let text = if *name == "no-teacher" {
            base.split("[[teacher]]").next().unwrap().to_string()
                + "[[student]]\nconfig = \"preset:nano\"\n"
        } else {
            base.clone() + extra
        };
        assert_refused(&dir, name, &text, frags);
    }
    // Bad values in [train] / [cache] are refused before anything runs, naming the file's
    // keys (they were named as CLI flags, and [train] values were not checked at all).
    for (name, from, to, frags) in [
        (
            "kd-weight",
            "lr = 3e-3\nevals = 2",
            "lr = 3e-3\nkd_weight = -1.0\nevals = 2",
            &["`[train] kd_weight` must be", "pl-errors/kd-weight.toml"][..],
        ),
        (
            "min-lr",
            "lr = 3e-3\nevals = 2",
            "lr = 3e-3\nmin_lr = 1.0\nevals = 2",
            &["`[train] min_lr` must be in [0, `[train] lr`]"][..],
        ),
        (
            "cache-temperature",
            "top_k = 8\n",
            "top_k = 8\ntemperature = 1e-30\n",
            &["`[cache] temperature`"][..],
        ),
        (
            "teacher-train",
            "steps = 10\nbatch_size = 4\nlr = 3e-3",
            "steps = 10\nbatch_size = 4\nlr = 3e-3\nweight_decay = -1.0",
            &["`[teacher_train] weight_decay`"][..],
        ),
    ] {
        assert!(base.contains(from), "{from}");
        let text = base.replacen(from, to, 1);
        assert_refused(&dir, name, &text, frags);
        let o = dir.join("o");
        assert!(
            !o.join("tokenizer").exists(),
            "{name}: a stage ran before the check"
        );
    }
    // law: too few student sizes, bad --predict, unreadable file.
    let csv = dir.join("two.csv");
    std::fs::write(
        &csv,
        "teacher,teacher_params,student,student_params,eval_loss\na,10,s,5,3.0\nb,20,s,5,2.9\na,10,u,7,3.0\nb,20,u,7,3.1\n",
    )
    .unwrap();
    assert_fails(
        &run(&["law", csv.to_str().unwrap()]),
        &["at least 3 student sizes", "have 2"],
    );
    std::fs::write(
        &csv,
        "teacher,teacher_params,student,student_params,eval_loss\na,10,s,5,3.0\nb,20,s,5,2.9\na,10,u,7,3.0\nb,20,u,7,3.1\na,10,v,9,3.0\nb,20,v,9,3.1\n",
    )
    .unwrap();
    let o = run(&["law", csv.to_str().unwrap(), "--predict", "8"]);
    assert_ok(&o);
    assert!(
        stdout(&o).contains("predicted optimal teacher for a 8 student"),
        "{}",
        stdout(&o)
    );
    assert_fails(
        &run(&["law", csv.to_str().unwrap(), "--predict", "big"]),
        &["--predict big: not a parameter count"],
    );
    assert_fails(
        &run(&["law", dir.join("none.csv").to_str().unwrap()]),
        &["cannot read results", "none.csv"],
    );
    // Sizes ≤ 0, in CSV and JSON results, and as --predict.
    for (bad, frag) in [("-5", "student_params -5"), ("0", "student_params 0")] {
        std::fs::write(
            &csv,
            format!("teacher,teacher_params,student,student_params,eval_loss\na,10,s,{bad},3.0\n"),
        )
        .unwrap();
        assert_fails(
            &run(&["law", csv.to_str().unwrap()]),
            &["line 2", frag, "not a parameter count"],
        );
    }
    std::fs::write(
        &csv,
        "teacher,teacher_params,student,student_params,eval_loss\na,-10,s,5,3.0\n",
    )
    .unwrap();
    assert_fails(
        &run(&["law", csv.to_str().unwrap()]),
        &["teacher_params -10"],
    );
    let json = dir.join("zero.json");
    std::fs::write(
        &json,
        r#"[{"teacher":"a","teacher_params":0,"student":"s","student_params":5,"eval_loss":3.0,"eval_ppl":20.0,"steps":1,"run_dir":""}]"#,
    )
    .unwrap();
    assert_fails(
        &run(&["law", json.to_str().unwrap()]),
        &["a parameter count of 0"],
    );
    for bad in ["--predict=0", "--predict=-3M"] {
        assert_fails(
            &run(&["law", csv.to_str().unwrap(), bad]),
            &["not a parameter count"],
        );
    }
}

/// A pipeline comparing three caches of one teacher, two recipes and two seeds.
fn grid_text(extra: &str) -> String {
    format!(
        r#"
name = "grid"
threads = 2
[data]
corpus = ["{corpus}"]
tokenizer = "{tok}"
seq_len = 32
eval_fraction = 0.1
[cache]
shard_size = 64
[[cache_variant]]
name = "exact"
top_k = {vocab}
[[cache_variant]]
name = "top-2"
top_k = 2
[[cache_variant]]
name = "hyb"
mode = "hybrid"
top_k = 2
samples = 6
[train]
steps = 4
batch_size = 4
evals = 1
eval_batches = 3
seeds = [0, 1]
[[recipe]]
name = "kd"
[[recipe]]
name = "kd+ce"
ce_weight = 1.0
[[teacher]]
name = "toy"
onnx = "{toy}"
[[student]]
name = "s1"
arch = {{ hidden_size = 16, num_hidden_layers = 1, num_attention_heads = 2, intermediate_size = 32, tie_word_embeddings = true }}
{extra}"#,
        corpus = corpus(300).display(),
        tok = tokenizer().display(),
        toy = plain_model().display(),
        vocab = VOCAB,
    )
}

#[test]
fn a_grid_of_caches_recipes_and_seeds_is_trained_and_compared() {
    let dir = shared_dir().join("pl-grid");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("grid.toml");
    std::fs::write(&p, grid_text("")).unwrap();
    let out = dir.join("out");
    let o = run_pipeline(&p, &out, &[]);
    assert_ok(&o);

    // One cache per variant, as each variant says.
    for (v, mode, k) in [
        ("exact", "topk", VOCAB),
        ("top-2", "topk", 2),
        ("hyb", "hybrid", 2),
    ] {
        let m: serde_json::Value = serde_json::from_slice(
            &std::fs::read(out.join(format!("caches/toy@{v}/manifest.json"))).unwrap(),
        )
        .unwrap();
        // (`topk` is the mode a manifest without one has)
        assert_eq!(m["params"]["mode"].as_str().unwrap_or("topk"), mode, "{v}");
        assert_eq!(m["params"]["top_k"], k, "{v}");
    }
    // 3 caches x 2 recipes x 2 seeds distilled, 2 CE baselines: one row each.
    let rows: Vec<logitcache::law::ResultRow> =
        logitcache::law::read_results(&out.join("results.csv")).unwrap();
    assert_eq!(rows.len(), 14);
    let loss = |cache: Option<&str>, recipe: Option<&str>, seed: u64| {
        let r: Vec<_> = rows
            .iter()
            .filter(|r| {
                r.cache.as_deref() == cache && r.recipe.as_deref() == recipe && r.seed == Some(seed)
            })
            .collect();
        assert_eq!(r.len(), 1, "{cache:?} {recipe:?} {seed}: {rows:?}");
        assert!(
            Path::new(&r[0].run_dir)
                .join("checkpoint/model.safetensors")
                .is_file()
        );
        r[0].eval_loss
    };
    for c in ["exact", "top-2", "hyb"] {
        for rc in ["kd", "kd+ce"] {
            for seed in [0, 1] {
                loss(Some(c), Some(rc), seed);
            }
        }
    }
    assert!(
        out.join("runs/toy@hyb/kd+ce/seed-1/s1/metrics.jsonl")
            .is_file()
    );
    assert!(out.join("runs/ce/seed-0/s1/metrics.jsonl").is_file());
    // The seeds differ, and so do the recipes.
    assert_ne!(
        loss(Some("exact"), Some("kd"), 0),
        loss(Some("exact"), Some("kd"), 1)
    );
    assert_ne!(
        loss(Some("exact"), Some("kd"), 0),
        loss(Some("exact"), Some("kd+ce"), 0)
    );

    // The report's fidelity table: the paired gap of each cache to the exact one, computed
    // here from the rows.
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    for s in [
        "## Cache fidelity",
        "### Student s1 from teacher toy",
        "| exact | top-400 | kd | ",
        " | reference | ",
        "| CE only | tokens | CE | ",
        "over 2 seeds (0, 1)",
        "Best cache after the exact one (recipe `kd`)",
        "`exact`: top-400; `top-2`: top-2; `hyb`: top-2 + 6 tail draws (hybrid)",
        "`kd` (fkl, 1 x KD + 0 x CE), `kd+ce` (fkl, 1 x KD + 1 x CE)",
    ] {
        assert!(report.contains(s), "report lacks {s:?}:\n{report}");
    }
    for (c, rc) in [("top-2", "kd"), ("hyb", "kd+ce"), ("exact", "kd+ce")] {
        let d: Vec<f64> = [0, 1]
            .iter()
            .map(|&s| loss(Some(c), Some(rc), s) - loss(Some("exact"), Some("kd"), s))
            .collect();
        let mean = (d[0] + d[1]) / 2.0;
        let sd = ((d[0] - mean).powi(2) + (d[1] - mean).powi(2)).sqrt();
        let line = report
            .lines()
            .find(|l| l.starts_with(&format!("| {c} ")) && l.contains(&format!("| {rc} |")))
            .unwrap_or_else(|| panic!("no row for {c} {rc}:\n{report}"));
        assert!(
            line.contains(&format!("| {mean:+.4} ± {sd:.4} |")),
            "{c} {rc}: want {mean:+.4} ± {sd:.4}: {line}"
        );
    }
    // The student table above it holds the mean over the seeds of the first cache and recipe.
    let mean0 = (loss(Some("exact"), Some("kd"), 0) + loss(Some("exact"), Some("kd"), 1)) / 2.0;
    let student_line = report.lines().find(|l| l.starts_with("| s1 | ")).unwrap();
    assert!(
        student_line.contains(&format!("{mean0:.4}")),
        "{mean0}: {student_line}"
    );

    // A rerun skips all 19 steps (tokenizer, token data, 3 caches, 14 runs).
    let o = run_pipeline(&p, &out, &[]);
    assert_ok(&o);
    assert_eq!(count(&stderr(&o), "skipped"), 19, "{}", stderr(&o));
    // A changed variant rebuilds its cache and its 4 runs only.
    std::fs::write(&p, grid_text("").replace("samples = 6", "samples = 7")).unwrap();
    let o = run_pipeline(&p, &out, &[]);
    assert_ok(&o);
    assert_eq!(count(&stderr(&o), "rebuilding"), 5, "{}", stderr(&o));
    assert_eq!(count(&stderr(&o), "skipped"), 14, "{}", stderr(&o));
}

#[test]
fn grid_settings_are_checked() {
    let dir = shared_dir().join("pl-grid-errors");
    std::fs::create_dir_all(&dir).unwrap();
    let base = grid_text("");
    let cases: &[(&str, String, &[&str])] = &[
        (
            "no-name",
            base.replace("name = \"top-2\"\n", ""),
            &["[[cache_variant]] 2: no `name`"],
        ),
        (
            "twice",
            base.replace("name = \"top-2\"", "name = \"exact\""),
            &["[[cache_variant]] `exact` is named twice"],
        ),
        (
            "slash",
            base.replace("name = \"top-2\"", "name = \"a/b\""),
            &["`a/b`: the name must be a plain file name"],
        ),
        (
            "unknown-key",
            base.replace(
                "top_k = 2\n[[cache_variant]]",
                "top_kk = 2\n[[cache_variant]]",
            ),
            &[
                "[[cache_variant]] `top-2` is not valid",
                "unknown field `top_kk`",
            ],
        ),
        (
            "bad-mode",
            base.replace("mode = \"hybrid\"", "mode = \"hybird\""),
            &["[[cache_variant]] `hyb` is not valid", "hybird"],
        ),
        (
            "recipe-seed",
            base.replace("ce_weight = 1.0", "ce_weight = 1.0\nseeds = [3]"),
            &["[[recipe]] `kd+ce` sets `seeds`", "set it in [train]"],
        ),
        (
            "recipe-ce",
            base.replace("ce_weight = 1.0", "loss = \"ce\""),
            &["[[recipe]] `kd+ce` loss = \"ce\" would ignore the teachers"],
        ),
        (
            "seed-and-seeds",
            base.replace("seeds = [0, 1]", "seeds = [0, 1]\nseed = 4"),
            &["sets both `seed` and `seeds`"],
        ),
        (
            "seed-twice",
            base.replace("seeds = [0, 1]", "seeds = [1, 1]"),
            &["seeds lists a seed twice"],
        ),
        (
            "no-seeds",
            base.replace("seeds = [0, 1]", "seeds = []"),
            &["seeds is empty"],
        ),
    ];
    for (name, text, frags) in cases {
        assert_ne!(*text, base, "{name}: the edit did not apply");
        assert_refused(&dir, name, text, frags);
        assert!(!dir.join("o").exists(), "{name}: wrote output");
    }
}

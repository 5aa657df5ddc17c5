//! The trainer end to end through the CLI: loss goes down on a cache made by the teacher
//! stage, resuming is exact, one cache serves several students, `eval` reports the same
//! metrics, and bad inputs are refused clearly.

use crate::util::*;
use logitcache::student::checkpoint::read_safetensors;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn cache() -> &'static PathBuf {
    static C: OnceLock<PathBuf> = OnceLock::new();
    C.get_or_init(|| {
        let out = shared_dir().join("train-cache");
        assert_ok(&run_strings(&teacher_args(&plain_model(), &out, 300)));
        out
    })
}

fn student_toml(name: &str, body: &str) -> PathBuf {
    // Tests run in parallel and children read these files: write each atomically (a
    // temporary file renamed into place), so no reader ever sees a half-written one.
    let p = shared_dir().join(format!("{name}.toml"));
    let tmp = p.with_extension(format!("part-{}", unique()));
    std::fs::write(&tmp, body).unwrap();
    std::fs::rename(tmp, &p).unwrap();
    p
}

fn tiny_student() -> PathBuf {
    student_toml(
        "tiny",
        "hidden_size = 32\nnum_hidden_layers = 2\nnum_attention_heads = 4\nnum_key_value_heads = 2\nintermediate_size = 64\ntie_word_embeddings = true\n",
    )
}

fn train_args(out: &Path, students: &[&str], steps: usize, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "train",
        "--cache",
        cache().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--steps",
        &steps.to_string(),
        "--batch-size",
        "4",
        "--warmup",
        "2",
        "--lr",
        "3e-3",
        "--log-every",
        "1",
        "--eval-batches",
        "4",
        "--progress",
        "off",
        "--threads",
        "1",
        "--student",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(students.iter().map(|s| s.to_string()));
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn loss_goes_down_and_eval_matches_the_eval_command() {
    let out = shared_dir().join("train-down");
    let _ = std::fs::remove_dir_all(&out);
    let t = tiny_student();
    assert_ok(&run_strings(&train_args(
        &out,
        &[t.to_str().unwrap()],
        40,
        &["--eval-every", "20"],
    )));
    let m = metrics(&out.join("tiny"));
    let losses: Vec<f64> = m.iter().filter_map(|v| v["loss"].as_f64()).collect();
    assert_eq!(losses.len(), 40);
    let first: f64 = losses[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = losses[35..].iter().sum::<f64>() / 5.0;
    assert!(
        last < 0.9 * first,
        "KD loss should fall: first {first:.3}, last {last:.3}"
    );
    for v in m.iter().filter(|v| v["loss"].is_number()) {
        for key in ["step", "loss", "lr", "tokens_per_s"] {
            assert!(v[key].is_number(), "metrics line lacks {key}: {v}");
        }
    }
    let evals: Vec<&serde_json::Value> = m.iter().filter(|v| v["eval_loss"].is_number()).collect();
    assert_eq!(evals.len(), 2);
    for key in ["eval_loss", "eval_ppl", "eval_kl", "eval_top1"] {
        assert!(evals[1][key].is_number());
    }
    assert!(evals[1]["eval_kl"].as_f64().unwrap() < evals[0]["eval_kl"].as_f64().unwrap());
    // `eval` on the same cache reproduces the final evaluation.
    let o = run(&[
        "eval",
        "--checkpoint",
        out.join("tiny").to_str().unwrap(),
        "--cache",
        cache().to_str().unwrap(),
        "--batches",
        "4",
        "--json",
    ]);
    assert_ok(&o);
    let e: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    for key in ["eval_loss", "eval_kl", "eval_top1"] {
        let (a, b) = (e[key].as_f64().unwrap(), evals[1][key].as_f64().unwrap());
        assert!(
            (a - b).abs() < 1e-4 * (1.0 + b.abs()),
            "{key}: eval command {a} vs training {b}"
        );
    }
    // And on a corpus (CE only).
    let o = run(&[
        "eval",
        "--checkpoint",
        out.join("tiny").to_str().unwrap(),
        "--corpus",
        corpus(30).to_str().unwrap(),
        "--batches",
        "2",
        "--json",
    ]);
    assert_ok(&o);
    let e: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(e["eval_ppl"].as_f64().unwrap() > 1.0);
    // Its windows are the teacher's (the cache's seq_len, 24): over the cache's whole corpus
    // the CE positions are the cache's positions minus one per window.
    let o = run(&[
        "eval",
        "--checkpoint",
        out.join("tiny").to_str().unwrap(),
        "--corpus",
        corpus(300).to_str().unwrap(),
        "--batches",
        "100000",
        "--json",
    ]);
    assert_ok(&o);
    let e: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let rows = all_rows(cache());
    assert_eq!(
        e["eval_tokens"].as_u64().unwrap(),
        (rows.positions() - rows.rows()) as u64
    );
    // The checkpoint is a Hugging Face LlamaForCausalLM directory.
    let ck = out.join("tiny/checkpoint");
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ck.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert_eq!(cfg["vocab_size"], VOCAB);
    assert!(ck.join("tokenizer.json").is_file());
    assert!(
        read_safetensors(&ck.join("model.safetensors"))
            .unwrap()
            .contains_key("model.layers.1.mlp.down_proj.weight")
    );
}

#[test]
fn resuming_gives_the_same_weights_as_training_straight() {
    let t = tiny_student();
    let straight = shared_dir().join("train-straight");
    let split = shared_dir().join("train-split");
    for d in [&straight, &split] {
        let _ = std::fs::remove_dir_all(d);
    }
    let extra = [
        "--grad-accum",
        "2",
        "--ce-weight",
        "0.5",
        "--loss-chunk",
        "40",
    ];
    assert_ok(&run_strings(&train_args(
        &straight,
        &[t.to_str().unwrap()],
        12,
        &extra,
    )));
    // Interrupted after step 6 (as a time-limited job would be), then resumed.
    let mut first = train_args(&split, &[t.to_str().unwrap()], 12, &extra);
    first.extend(["--stop-after".into(), "6".into()]);
    assert_ok(&run_strings(&first));
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(split.join("tiny/checkpoint/state/trainer.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(state["step"], 6);
    let mut cont = train_args(&split, &[t.to_str().unwrap()], 12, &extra);
    cont.push("--resume".into());
    assert_ok(&run_strings(&cont));
    let a = read_safetensors(&straight.join("tiny/checkpoint/model.safetensors")).unwrap();
    let b = read_safetensors(&split.join("tiny/checkpoint/model.safetensors")).unwrap();
    assert_eq!(a.len(), b.len());
    for (name, (shape, va)) in &a {
        let (sb, vb) = &b[name];
        assert_eq!(shape, sb);
        assert_eq!(
            va, vb,
            "{name} differs between straight and resumed training"
        );
    }
    // The metrics of the resumed run continue the first half's.
    let steps: Vec<u64> = metrics(&split.join("tiny"))
        .iter()
        .filter_map(|v| v["loss"].as_f64().and(v["step"].as_u64()))
        .collect();
    assert_eq!(steps, (1..=12).collect::<Vec<u64>>());
}

#[test]
fn one_cache_many_students_and_bad_inputs() {
    let out = shared_dir().join("train-many");
    let _ = std::fs::remove_dir_all(&out);
    let t = tiny_student();
    let before = std::fs::read(cache().join("manifest.json")).unwrap();
    assert_ok(&run_strings(&train_args(
        &out,
        &[t.to_str().unwrap(), "nano"],
        3,
        &["--eval-fraction", "0.1"],
    )));
    assert!(
        out.join("tiny/checkpoint/model.safetensors").is_file()
            && out.join("nano/checkpoint/model.safetensors").is_file()
    );
    assert_eq!(
        std::fs::read(cache().join("manifest.json")).unwrap(),
        before,
        "the cache is never rewritten"
    );

    // A second run into the same directory without --resume is refused.
    assert_fails(
        &run_strings(&train_args(&out, &["nano"], 3, &[])),
        &["already holds a trained checkpoint", "--resume"],
    );
    // --resume without a checkpoint starts fresh (a requeued job's first attempt) and says so.
    let fresh = shared_dir().join("train-fresh");
    let _ = std::fs::remove_dir_all(&fresh);
    let o = run_strings(&train_args(&fresh, &["nano"], 3, &["--resume"]));
    assert_ok(&o);
    assert!(
        stderr(&o).contains("has no checkpoint yet; starting from step 0"),
        "{}",
        stderr(&o)
    );
    assert!(fresh.join("nano/checkpoint/model.safetensors").is_file());
    // A finished run resumed reports its real final loss, keeps its checkpoint untouched
    // and does not evaluate twice.
    let weights = std::fs::read(fresh.join("nano/checkpoint/model.safetensors")).unwrap();
    let lines = metrics(&fresh.join("nano"));
    let last_loss = lines.iter().rev().find_map(|v| v["loss"].as_f64()).unwrap();
    let mut a = train_args(&fresh, &["nano"], 3, &["--resume"]);
    let p = a.iter().position(|x| x == "--progress").unwrap();
    a[p + 1] = "json".into();
    let o = run_strings(&a);
    assert_ok(&o);
    let done: serde_json::Value = stdout(&o)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "student_done")
        .expect("a student_done line");
    assert_eq!(done["result"]["final_loss"].as_f64(), Some(last_loss));
    assert_eq!(metrics(&fresh.join("nano")), lines);
    assert_eq!(
        std::fs::read(fresh.join("nano/checkpoint/model.safetensors")).unwrap(),
        weights
    );
    // Resuming with another student architecture is refused, naming what changed.
    let grown = student_toml(
        "nano",
        "hidden_size = 32\nnum_hidden_layers = 1\nnum_attention_heads = 4\nintermediate_size = 64\n",
    );
    let o = run_strings(&train_args(
        &fresh,
        &[grown.to_str().unwrap()],
        6,
        &["--resume"],
    ));
    assert_fails(
        &o,
        &[
            "--resume: student nano changed since its checkpoint",
            "→",
            "another --out",
        ],
    );
    // A checkpoint made from another cache (its recorded manifest checksum differs).
    let trainer = fresh.join("nano/checkpoint/state/trainer.json");
    let good = std::fs::read(&trainer).unwrap();
    let mut st: serde_json::Value = serde_json::from_slice(&good).unwrap();
    assert!(st["cache_manifest"].is_string(), "{st}");
    st["cache_manifest"] = "0".repeat(64).into();
    std::fs::write(&trainer, serde_json::to_vec(&st).unwrap()).unwrap();
    assert_fails(
        &run_strings(&train_args(&fresh, &["nano"], 6, &["--resume"])),
        &[
            "was trained on a different cache (manifest checksum 0000",
            "teacher sha256",
        ],
    );
    std::fs::write(&trainer, &good).unwrap();
    // A checkpoint whose tokenizer is not the cache's.
    let tok = fresh.join("nano/checkpoint/tokenizer.json");
    let good_tok = std::fs::read(&tok).unwrap();
    std::fs::write(&tok, b"{}").unwrap();
    assert_fails(
        &run_strings(&train_args(&fresh, &["nano"], 6, &["--resume"])),
        &["the checkpoint's tokenizer", "is not the cache's"],
    );
    std::fs::write(&tok, &good_tok).unwrap();
    // A run directory another process is training is refused, naming the holder.
    {
        let _held = logitcache::cache::lock::RunLock::acquire(&fresh.join("nano")).unwrap();
        assert_fails(
            &run_strings(&train_args(&fresh, &["nano"], 6, &["--resume"])),
            &[
                &format!("another logitcache process (pid {})", std::process::id()),
                "is training",
                "train.lock",
            ],
        );
    }
    // Once released, the same resume continues to step 6.
    assert_ok(&run_strings(&train_args(
        &fresh,
        &["nano"],
        6,
        &["--resume"],
    )));
    // Values no run can use are refused before anything is written.
    for (flag, value, fragment) in [
        ("--threads", "0", "--threads must be at least 1"),
        (
            "--kd-weight",
            "-1",
            "--kd-weight must be a finite number ≥ 0",
        ),
        ("--beta2", "1", "--beta2 must be in [0, 1)"),
        ("--min-lr", "1", "--min-lr must be in [0, --lr]"),
        (
            "--weight-decay",
            "NaN",
            "--weight-decay must be a finite number ≥ 0",
        ),
        ("--grad-clip", "-1", "--grad-clip must be"),
    ] {
        let dir = shared_dir().join(format!("train-bad-{}", unique()));
        let mut a = train_args(&dir, &["nano"], 1, &[]);
        match a.iter().position(|x| x == flag) {
            Some(p) => a[p + 1] = value.into(),
            None => a.push(format!("{flag}={value}")),
        }
        let o = run_strings(&a);
        assert_fails(&o, &[fragment]);
        assert!(!dir.exists(), "{flag} {value} wrote {}", dir.display());
    }
    // A corrupt checkpoint on resume.
    let st = out.join("nano/checkpoint/state/optim.mpk");
    std::fs::write(&st, b"garbage").unwrap();
    assert_fails(
        &run_strings(&train_args(&out, &["nano"], 6, &["--resume"])),
        &["cannot resume from", "optim.mpk is damaged"],
    );
    // Student TOMLs.
    for (name, body, fragment) in [
        (
            "unknown",
            "hidden_size = 32\nnum_hidden_layers = 1\nnum_attention_heads = 4\nintermediate_size = 64\nhidden_dim = 3\n",
            "unknown field `hidden_dim`",
        ),
        (
            "heads",
            "hidden_size = 30\nnum_hidden_layers = 1\nnum_attention_heads = 4\nintermediate_size = 64\n",
            "hidden_size 30 is not divisible by num_attention_heads 4",
        ),
        (
            "shortctx",
            "hidden_size = 32\nnum_hidden_layers = 1\nnum_attention_heads = 4\nintermediate_size = 64\nmax_position_embeddings = 8\n",
            "has max_position_embeddings 8 but the cache's windows are up to 24 tokens",
        ),
        (
            "smallvocab",
            "hidden_size = 32\nnum_hidden_layers = 1\nnum_attention_heads = 4\nintermediate_size = 64\nvocab_size = 100\n",
            "has vocab_size 100 but the cache's token ids go up to 399",
        ),
    ] {
        let toml = student_toml(name, body);
        assert_fails(
            &run_strings(&train_args(&fresh, &[toml.to_str().unwrap()], 1, &[])),
            &[fragment],
        );
    }
    // Another tokenizer than the cache's.
    let other = shared_dir().join("train-other-tokenizer.json");
    let mut tj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tokenizer()).unwrap()).unwrap();
    tj["truncation"] = serde_json::json!({"direction": "Right", "max_length": 64, "strategy": "LongestFirst", "stride": 0});
    std::fs::write(&other, serde_json::to_string(&tj).unwrap()).unwrap();
    assert_fails(
        &run_strings(&train_args(
            &fresh,
            &["nano"],
            1,
            &["--tokenizer", other.to_str().unwrap()],
        )),
        &[
            "was built with tokenizer sha256",
            "pass the tokenizer the cache was built with",
        ],
    );
    // `eval --corpus` with a tokenizer other than the checkpoint's.
    assert_fails(
        &run(&[
            "eval",
            "--checkpoint",
            out.join(t.file_stem().unwrap()).to_str().unwrap(),
            "--corpus",
            corpus(30).to_str().unwrap(),
            "--tokenizer",
            other.to_str().unwrap(),
        ]),
        &[
            "is not the tokenizer the student was trained with",
            "leave --tokenizer out",
        ],
    );
    assert_fails(
        &run_strings(&train_args(&fresh, &["nano"], 1, &["--temperature", "2"])),
        &["--temperature 2 differs from the cache's 1"],
    );
    // A GPU: without the `cuda` feature the build says how to get one; with it, this
    // GPU-less machine's missing driver is named (src/device.rs).
    let gpu_error = if cfg!(feature = "cuda") {
        "libcuda.so.1 cannot be loaded"
    } else {
        "rebuild with `cargo build --release --features cuda`"
    };
    assert_fails(
        &run_strings(&train_args(&fresh, &["nano"], 1, &["--device", "cuda:0"])),
        &["--device cuda:0", gpu_error],
    );
    assert_fails(
        &run_strings(&train_args(&fresh, &["nano"], 1, &["--device", "gpu"])),
        &["--device gpu: expected cpu, cuda or cuda:N"],
    );
}

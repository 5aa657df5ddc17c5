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
    reseal(&fresh.join("nano/checkpoint"));
    assert_fails(
        &run_strings(&train_args(&fresh, &["nano"], 6, &["--resume"])),
        &[
            "was trained on a different cache (manifest checksum 0000",
            "teacher sha256",
        ],
    );
    std::fs::write(&trainer, &good).unwrap();
    reseal(&fresh.join("nano/checkpoint"));
    // A checkpoint whose tokenizer is not the cache's.
    let tok = fresh.join("nano/checkpoint/tokenizer.json");
    let good_tok = std::fs::read(&tok).unwrap();
    std::fs::write(&tok, b"{}").unwrap();
    reseal(&fresh.join("nano/checkpoint"));
    assert_fails(
        &run_strings(&train_args(&fresh, &["nano"], 6, &["--resume"])),
        &["the checkpoint's tokenizer", "is not the cache's"],
    );
    std::fs::write(&tok, &good_tok).unwrap();
    reseal(&fresh.join("nano/checkpoint"));
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
    // An undecodable optimizer state on resume (its checksum recomputed, so the decoder's
    // own check is what refuses it; mismatches: damaged_checkpoints_are_refused_…).
    let st = out.join("nano/checkpoint/state/optim.mpk");
    std::fs::write(&st, b"garbage").unwrap();
    reseal(&out.join("nano/checkpoint"));
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
        (
            // 4.4 trillion parameters: refused before allocating (it aborted with a backtrace).
            "huge",
            "hidden_size = 65536\nnum_hidden_layers = 64\nnum_attention_heads = 64\nintermediate_size = 262144\n",
            "student huge has 4398.",
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

/// Rewrites a checkpoint's `checksums.json` for its files as they are now: what a checkpoint
/// written that way by logitcache would hold (for tests that forge one file's content).
fn reseal(ckpt: &Path) {
    use logitcache::student::checkpoint::{CHECKPOINT_FILES, CHECKSUMS, Checksums, FileSum};
    let files = CHECKPOINT_FILES
        .iter()
        .map(|f| {
            let (sha256, bytes) = logitcache::util::sha256_file(&ckpt.join(f)).unwrap();
            (f.to_string(), FileSum { sha256, bytes })
        })
        .collect();
    std::fs::write(
        ckpt.join(CHECKSUMS),
        serde_json::to_vec(&Checksums { files }).unwrap(),
    )
    .unwrap();
}

#[track_caller]
fn assert_same_weights(a: &Path, b: &Path) {
    let a = read_safetensors(&a.join("checkpoint/model.safetensors")).unwrap();
    let b = read_safetensors(&b.join("checkpoint/model.safetensors")).unwrap();
    assert_eq!(a.len(), b.len());
    for (name, (shape, va)) in &a {
        let (sb, vb) = &b[name];
        assert_eq!((shape, va), (sb, vb), "{name} differs");
    }
}

#[test]
fn damaged_checkpoints_are_refused_wherever_they_are_read() {
    use logitcache::student::checkpoint::{CHECKPOINT_FILES, CHECKSUMS};
    let t = tiny_student();
    let base = shared_dir().join("ckpt-damage");
    let _ = std::fs::remove_dir_all(&base);
    let good = base.join("good");
    assert_ok(&run_strings(&train_args(
        &good,
        &[t.to_str().unwrap()],
        4,
        &[],
    )));
    assert!(good.join("tiny/checkpoint").join(CHECKSUMS).is_file());
    for (i, f) in CHECKPOINT_FILES.iter().enumerate() {
        let out = base.join(format!("flip-{i}"));
        copy_tree(&good, &out);
        let path = out.join("tiny/checkpoint").join(f);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let mut resume = train_args(&out, &[t.to_str().unwrap()], 6, &[]);
        resume.push("--resume".into());
        assert_fails(&run_strings(&resume), &["is damaged", f, "sha256"]);
        let run_dir = out.join("tiny");
        let run_dir = run_dir.to_str().unwrap();
        assert_fails(
            &run(&[
                "eval",
                "--checkpoint",
                run_dir,
                "--cache",
                cache().to_str().unwrap(),
                "--batches",
                "2",
            ]),
            &["is damaged", f],
        );
        let onnx = out.join("s.onnx");
        assert_fails(
            &run(&[
                "export-onnx",
                "--checkpoint",
                run_dir,
                "--out",
                onnx.to_str().unwrap(),
            ]),
            &["is damaged", f],
        );
        assert!(!onnx.exists(), "{f}: an ONNX file was written");
        // Nothing was trained or saved over the damaged checkpoint.
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "{f} was rewritten");
    }
    // A missing file is named too.
    let out = base.join("missing");
    copy_tree(&good, &out);
    std::fs::remove_file(out.join("tiny/checkpoint/state/optim.mpk")).unwrap();
    let mut resume = train_args(&out, &[t.to_str().unwrap()], 6, &[]);
    resume.push("--resume".into());
    assert_fails(
        &run_strings(&resume),
        &["is damaged", "state/optim.mpk is missing"],
    );
    // A checkpoint from before checksums were kept resumes, with a warning, and its next
    // save has them.
    let out = base.join("old");
    copy_tree(&good, &out);
    std::fs::remove_file(out.join("tiny/checkpoint").join(CHECKSUMS)).unwrap();
    let o = run_strings(
        &resume
            .iter()
            .map(|a| a.replace("missing", "old"))
            .collect::<Vec<_>>(),
    );
    assert_ok(&o);
    assert!(
        stderr(&o).contains("has no checksums.json"),
        "{}",
        stderr(&o)
    );
    assert!(out.join("tiny/checkpoint").join(CHECKSUMS).is_file());
}

/// Kills `train --resume` (SIGKILL) at pseudo-random moments until it has been killed ten
/// times, then lets it finish: the weights equal those of one uninterrupted run and the
/// metrics run through every step once. Includes a kill between the two renames of a
/// checkpoint save (`checkpoint` moved aside, the new one not yet in place).
#[test]
fn training_killed_at_random_moments_resumes_exactly() {
    use std::io::BufRead;
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    let t = tiny_student();
    let straight = shared_dir().join("train-kill-straight");
    let killed = shared_dir().join("train-kill-resumed");
    for d in [&straight, &killed] {
        let _ = std::fs::remove_dir_all(d);
    }
    // Enough steps that ten kills (each after at most 5 logged steps and 15 ms) come
    // before the end: ten kills reached step 15 of 40 here.
    const STEPS: usize = 60;
    let extra = ["--save-every", "3", "--grad-accum", "2"];
    assert_ok(&run_strings(&train_args(
        &straight,
        &[t.to_str().unwrap()],
        STEPS,
        &extra,
    )));
    let mut args = train_args(&killed, &[t.to_str().unwrap()], STEPS, &extra);
    args.push("--resume".into());

    // Killed inside the second save, between its renames: only checkpoint.old is left.
    let refs: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let o = run_env(&refs, &[("LOGITCACHE_FAILPOINT", "checkpoint-swap:2")]);
    assert_eq!(o.status.signal(), Some(9), "{:?}: {}", o.status, stderr(&o));
    let run_dir = killed.join("tiny");
    assert!(!run_dir.join("checkpoint").exists() && run_dir.join("checkpoint.old").exists());
    assert_fails(
        &run(&[
            "eval",
            "--checkpoint",
            run_dir.to_str().unwrap(),
            "--cache",
            cache().to_str().unwrap(),
        ]),
        &["interrupted", "--resume"],
    );

    let mut progress = args.clone();
    let p = progress.iter().position(|a| a == "off").unwrap();
    progress[p] = "json".into();
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = |n: u64| {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (rng >> 33) % n
    };
    let mut at = std::collections::BTreeSet::new();
    for _ in 0..10 {
        let lines_before_kill = next(6);
        let delay_ms = next(15);
        let mut child = command()
            .args(&progress)
            .env("RUST_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        for _ in 0..lines_before_kill {
            if lines.next().is_none() {
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill();
        let status = child.wait().unwrap();
        assert_eq!(
            status.signal(),
            Some(9),
            "train ended ({status:?}) before it was killed 10 times: give it more steps"
        );
        let state = run_dir.join("checkpoint/state/trainer.json");
        if let Ok(bytes) = std::fs::read(&state) {
            let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            at.insert(v["step"].as_u64().unwrap());
        }
    }
    // The kills fell at several points of the run, not all before its first step.
    assert!(at.len() >= 4, "checkpoints seen after the kills: {at:?}");
    assert_ok(&run_strings(&args));
    assert!(!run_dir.join("checkpoint.old").exists());
    assert!(!run_dir.join("checkpoint.tmp").exists());
    assert_same_weights(&straight.join("tiny"), &run_dir);
    let steps: Vec<u64> = metrics(&run_dir)
        .iter()
        .filter_map(|v| v["loss"].as_f64().and(v["step"].as_u64()))
        .collect();
    assert_eq!(steps, (1..=STEPS as u64).collect::<Vec<u64>>());
    let a = metrics(&straight.join("tiny"));
    let b = metrics(&run_dir);
    let losses = |m: &[serde_json::Value]| -> Vec<f64> {
        m.iter().filter_map(|v| v["loss"].as_f64()).collect()
    };
    assert_eq!(losses(&a), losses(&b), "the logged losses differ");
}

/// A cache of a few windows, none of which falls in the default 2% held-out split, trains
/// with the default flags (all windows, no evaluation, a warning); a split that would hold
/// out every window is refused.
#[test]
fn a_small_cache_trains_with_the_defaults() {
    use logitcache::cache::manifest::Manifest;
    let small = shared_dir().join("train-small-cache");
    let _ = std::fs::remove_dir_all(&small);
    assert_ok(&run_strings(&teacher_args(&plain_model(), &small, 6)));
    let n = Manifest::load(&small).unwrap().totals.sequences;
    assert!(
        (0..n).all(|s| !logitcache::rng::is_eval(s, 0.02)),
        "the fixture should have no held-out window at 2%"
    );
    let t = tiny_student();
    let out = shared_dir().join("train-small-out");
    let _ = std::fs::remove_dir_all(&out);
    let mut args = train_args(&out, &[t.to_str().unwrap()], 3, &[]);
    let c = args.iter().position(|a| a == "--cache").unwrap();
    args[c + 1] = small.to_str().unwrap().into();
    let e = args.iter().position(|a| a == "--eval-batches").unwrap();
    args.drain(e..e + 2);
    let o = run_strings(&args);
    assert_ok(&o);
    assert!(
        stderr(&o).contains("held-out split (--eval-fraction 0.02)"),
        "{}",
        stderr(&o)
    );
    let m = metrics(&out.join("tiny"));
    assert_eq!(m.iter().filter(|v| v["loss"].is_number()).count(), 3);
    assert!(m.iter().all(|v| v.get("eval_loss").is_none()));
    let mut all = args.clone();
    all.extend([
        "--eval-fraction".into(),
        "0.999999".into(),
        "--resume".into(),
    ]);
    assert_fails(
        &run_strings(&all),
        &["holds out all", "lower --eval-fraction"],
    );
}

/// A cache made with relative paths (as `logitcache run` and people in a shell do) records
/// them absolute, so `train` started in another directory finds its tokenizer.
#[test]
fn manifest_paths_resolve_from_anywhere() {
    use logitcache::cache::manifest::Manifest;
    let work = shared_dir().join("rel-paths");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    std::fs::copy(tokenizer(), work.join("tok.json")).unwrap();
    std::fs::copy(corpus(20), work.join("c.jsonl")).unwrap();
    std::fs::copy(plain_model(), work.join("m.onnx")).unwrap();
    let mut a = teacher_args(Path::new("m.onnx"), Path::new("cache"), 20);
    for (flag, v) in [("--tokenizer", "tok.json"), ("--corpus", "c.jsonl")] {
        let i = a.iter().position(|x| x == flag).unwrap();
        a[i + 1] = v.into();
    }
    let o = command().args(&a).current_dir(&work).output().unwrap();
    assert_ok(&o);
    let m = Manifest::load(&work.join("cache")).unwrap();
    for p in [&m.tokenizer.path, &m.model.path, &m.corpus[0].path] {
        assert!(p.is_absolute() && p.is_file(), "{}", p.display());
    }
    let t = tiny_student();
    let out = work.join("runs");
    let mut args = train_args(&out, &[t.to_str().unwrap()], 1, &[]);
    let c = args.iter().position(|x| x == "--cache").unwrap();
    args[c + 1] = work.join("cache").to_str().unwrap().into();
    let o = command().args(&args).current_dir("/").output().unwrap();
    assert_ok(&o);
}

/// `eval`'s metrics against an independent computation: the f64 reference Llama
/// (`llama_ref.rs`) on the checkpoint's weights over every window of the held-out split,
/// with cross-entropy, the tail-as-an-outcome KL and top-1 agreement written out here.
#[test]
fn eval_metrics_equal_an_independent_computation() {
    use crate::llama_ref::{RefConfig, forward};
    use logitcache::cache::reader::Cache;
    use logitcache::cache::stream::{Split, Stream, StreamConfig};
    let t = tiny_student();
    let out = shared_dir().join("train-eval-ref");
    let _ = std::fs::remove_dir_all(&out);
    assert_ok(&run_strings(&train_args(
        &out,
        &[t.to_str().unwrap()],
        8,
        &["--eval-fraction", "0.1"],
    )));
    let run_dir = out.join("tiny");
    let o = run(&[
        "eval",
        "--checkpoint",
        run_dir.to_str().unwrap(),
        "--cache",
        cache().to_str().unwrap(),
        "--batches",
        "100000",
        "--json",
    ]);
    assert_ok(&o);
    let e: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();

    let ckpt = run_dir.join("checkpoint");
    let c: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ckpt.join("config.json")).unwrap()).unwrap();
    let u = |k: &str| c[k].as_u64().unwrap() as usize;
    let rc = RefConfig {
        hidden: u("hidden_size"),
        layers: u("num_hidden_layers"),
        heads: u("num_attention_heads"),
        kv_heads: u("num_key_value_heads"),
        intermediate: u("intermediate_size"),
        vocab: u("vocab_size"),
        theta: c["rope_theta"].as_f64().unwrap(),
        eps: c["rms_norm_eps"].as_f64().unwrap(),
        tied: c["tie_word_embeddings"].as_bool().unwrap(),
    };
    let w: std::collections::HashMap<String, Vec<f64>> =
        read_safetensors(&ckpt.join("model.safetensors"))
            .unwrap()
            .into_iter()
            .map(|(n, (_, v))| (n, v.into_iter().map(f64::from).collect()))
            .collect();
    let cache = Cache::open(cache()).unwrap();
    let stream = Stream::start(
        &cache,
        StreamConfig {
            batch_size: 4,
            shuffle: false,
            split: Split::Eval,
            eval_fraction: 0.1,
            ..Default::default()
        },
    )
    .unwrap();
    let (mut ce, mut n_ce, mut kl, mut top1, mut n_kd) = (0f64, 0f64, 0f64, 0f64, 0f64);
    for b in stream {
        let b = b.unwrap();
        for r in 0..b.batch {
            let o = r * b.len;
            let mask: Vec<bool> = (0..b.len).map(|i| b.mask[o + i] > 0.0).collect();
            let logits = forward(&rc, &w, &b.input_ids[o..o + b.len], &mask);
            for (i, z) in logits.iter().enumerate().filter(|(i, _)| mask[*i]) {
                let p = o + i;
                let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
                let lq = |id: u32| z[id as usize] - lse;
                if b.target_mask[p] > 0.0 {
                    ce -= lq(b.target_ids[p]);
                    n_ce += 1.0;
                }
                let ids = &b.topk_ids[p * b.k..(p + 1) * b.k];
                let lps = &b.topk_logprobs[p * b.k..(p + 1) * b.k];
                let mut d = 0f64;
                let mut q_top = 0f64;
                for (&id, &lp) in ids.iter().zip(lps) {
                    let lp = lp as f64;
                    d += lp.exp() * (lp - lq(id));
                    q_top += lq(id).exp();
                }
                let lpt = b.tail_logprob[p] as f64;
                if lpt.is_finite() {
                    d += lpt.exp() * (lpt - (1.0 - q_top).ln());
                }
                kl += d;
                n_kd += 1.0;
                let argmax = (0..z.len()).max_by(|&a, &b| z[a].total_cmp(&z[b])).unwrap();
                top1 += (argmax as u32 == ids[0]) as u64 as f64;
            }
        }
    }
    assert!(
        n_kd > 20.0,
        "the held-out split is too small to test: {n_kd}"
    );
    let (ce, kl, top1) = (ce / n_ce, kl / n_kd, top1 / n_kd);
    for (key, want, tol) in [
        ("eval_loss", ce, 1e-4),
        ("eval_ppl", ce.exp(), 1e-3),
        ("eval_kl", kl, 1e-4),
        // f32 against f64: one near-tie argmax may differ.
        ("eval_top1", top1, 1.01 / n_kd),
    ] {
        let got = e[key].as_f64().unwrap();
        assert!(
            (got - want).abs() <= tol * want.abs().max(1.0),
            "{key}: eval says {got}, the independent computation {want}"
        );
    }
}

/// A disk that fills while a checkpoint is saved (here a file-size limit, which fails the
/// write the same way, with EFBIG instead of ENOSPC) stops the run naming the file; no
/// checkpoint that looks complete is left, and `--resume` then trains to the same weights as
/// a run that never failed.
#[test]
fn a_checkpoint_that_cannot_be_written_is_named_and_leaves_nothing_complete() {
    use std::os::unix::process::CommandExt;
    let t = tiny_student();
    let (straight, failed) = (
        fresh_dir("train-full-straight"),
        fresh_dir("train-full-failed"),
    );
    let extra = ["--save-every", "2"];
    assert_ok(&run_strings(&train_args(
        &straight,
        &[t.to_str().unwrap()],
        4,
        &extra,
    )));
    let ck = straight.join("tiny/checkpoint");
    let size = |p: &str| std::fs::metadata(ck.join(p)).unwrap().len();
    let (weights, model, optim) = (
        size("model.safetensors"),
        size("state/model.mpk"),
        size("state/optim.mpk"),
    );
    // Room for every file but the optimizer state (Adam's two moments per weight).
    let limit = (weights.max(model) + optim) / 2;
    assert!(
        weights.max(model) < limit && limit < optim,
        "{weights} {model} {optim}"
    );
    let mut args = train_args(&failed, &[t.to_str().unwrap()], 4, &extra);
    args.push("--resume".into());
    let mut c = command();
    c.args(&args);
    // SAFETY: the closure runs between fork and exec and calls only setrlimit and signal,
    // which are async-signal-safe; it touches no memory shared with the parent's threads.
    unsafe {
        c.pre_exec(move || {
            let r = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // A write past the limit then fails with EFBIG instead of killing the process.
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let o = c.output().unwrap();
    assert_fails(&o, &["optim.mpk", "File too large"]);
    let run_dir = failed.join("tiny");
    assert!(!run_dir.join("checkpoint").exists(), "{}", stderr(&o));
    assert_fails(
        &run(&[
            "eval",
            "--checkpoint",
            run_dir.to_str().unwrap(),
            "--cache",
            cache().to_str().unwrap(),
        ]),
        &["checkpoint"],
    );
    assert_ok(&run_strings(&args));
    assert!(!run_dir.join("checkpoint.tmp").exists());
    assert_same_weights(&straight.join("tiny"), &run_dir);
}

/// eval/export reading a run while `train` saves it (the checkpoint is swapped by renames)
/// say that a training process is writing it, naming its pid, not that it is damaged.
#[test]
fn reading_a_run_that_is_being_trained_names_the_trainer() {
    let t = tiny_student();
    let out = fresh_dir("train-busy");
    assert_ok(&run_strings(&train_args(
        &out,
        &[t.to_str().unwrap()],
        2,
        &[],
    )));
    let run_dir = out.join("tiny");
    let eval = || {
        run(&[
            "eval",
            "--checkpoint",
            run_dir.to_str().unwrap(),
            "--cache",
            cache().to_str().unwrap(),
        ])
    };
    // The moment between a save's two renames, with this process holding the run's lock
    // as a running `train` does.
    std::fs::rename(run_dir.join("checkpoint"), run_dir.join("checkpoint.old")).unwrap();
    let lock = logitcache::cache::lock::RunLock::acquire(&run_dir).unwrap();
    let me = format!("pid {}", std::process::id());
    assert_fails(&eval(), &["is writing", &me, "wait for the run to finish"]);
    drop(lock);
    let o = eval();
    assert_fails(&o, &["interrupted", "--resume"]);
    assert!(!stderr(&o).contains("is writing"), "{}", stderr(&o));
    std::fs::rename(run_dir.join("checkpoint.old"), run_dir.join("checkpoint")).unwrap();
    assert_ok(&eval());
}

//! The Python package (`python/`, installed into the test venv by `make python`): its stream
//! yields the Rust stream's batches byte for byte (every cache mode, splits, ranks, resume),
//! its errors are Python exceptions naming the problem, and `logitcache.torch.kd_loss`
//! equals the Rust loss and its gradient (golden values computed here by `src/loss.rs`).

use crate::util::*;
use burn::backend::{Autodiff, Flex};
use burn::prelude::*;
use logitcache::cache::reader::Cache;
use logitcache::cache::stream::{Split, Stream, StreamConfig, TrainBatch};
use logitcache::loss::{KdLoss, LossConfig, loss};
use logitcache::rng::SplitMix;
use logitcache::student::checkpoint::read_safetensors;
use logitcache::student::data::targets;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

type AB = Autodiff<Flex>;

fn cache(name: &str, extra: &[&str]) -> PathBuf {
    let out = shared_dir().join(format!("py-{name}-{}", unique()));
    let mut args = teacher_args(&plain_model(), &out, 30);
    args.extend(extra.iter().map(|s| s.to_string()));
    assert_ok(&run_strings(&args));
    out
}

fn sha<T: Copy>(v: &[T]) -> String {
    // SAFETY: T is u32, u64 or f32: plain values, `size_of_val(v)` initialised bytes.
    let raw = unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), size_of_val(v)) };
    hex::encode(Sha256::digest(raw))
}

fn batch_json(b: &TrainBatch) -> Value {
    json!({
        "seq_ids": b.seq_ids,
        "cursor": [b.cursor.epoch, b.cursor.group, b.cursor.offset],
        "shape": [b.batch, b.len, b.k],
        "sha256": {
            "seq_ids": sha(&b.seq_ids), "input_ids": sha(&b.input_ids),
            "target_ids": sha(&b.target_ids), "target_mask": sha(&b.target_mask),
            "mask": sha(&b.mask), "topk_ids": sha(&b.topk_ids),
            "topk_logprobs": sha(&b.topk_logprobs), "tail_logprob": sha(&b.tail_logprob),
        },
    })
}

/// (split, eval_fraction, seed, rank, world_size, batch_size, shuffle, epochs)
type Conf = (
    &'static str,
    f64,
    u64,
    usize,
    usize,
    usize,
    bool,
    Option<u64>,
);

const CONFS: [Conf; 5] = [
    ("train", 0.25, 7, 0, 1, 3, true, Some(1)),
    ("train", 0.25, 7, 1, 2, 2, true, Some(2)),
    ("eval", 0.25, 7, 0, 1, 2, false, Some(1)),
    ("all", 0.0, 1, 0, 1, 5, true, Some(1)),
    // The trainer's own stream: endless (the check takes the first 12 batches).
    ("train", 0.02, 3, 0, 1, 4, true, None),
];

fn rust_batches(dir: &Path, c: &Conf) -> Vec<TrainBatch> {
    let split = match c.0 {
        "train" => Split::Train,
        "eval" => Split::Eval,
        _ => Split::All,
    };
    let cfg = StreamConfig {
        batch_size: c.5,
        seed: c.2,
        shuffle: c.6,
        epochs: c.7,
        rank: c.3,
        world_size: c.4,
        split,
        eval_fraction: c.1,
        ..Default::default()
    };
    let s = Stream::start(&Cache::open(dir).unwrap(), cfg).unwrap();
    s.take(12).map(|b| b.unwrap()).collect()
}

fn python(script: &str, spec: &Value) -> Value {
    let python = std::env::var("LOGITCACHE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    let spec_path = shared_dir().join(format!("py-spec-{}.json", unique()));
    std::fs::write(&spec_path, serde_json::to_vec(spec).unwrap()).unwrap();
    let o = Command::new(&python)
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests")
                .join(script),
        )
        .arg(&spec_path)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{script} failed (is the package installed? `make python`):\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn python_stream_yields_the_rust_streams_batches_and_python_errors() {
    let mut caches = vec![];
    for (name, extra) in [
        ("topk", &[][..]),
        ("sample", &["--mode", "sample", "--samples", "12"][..]),
        ("hybrid", &["--mode", "hybrid", "--samples", "12"][..]),
        ("q8", &["--logprob-dtype", "q8"][..]),
    ] {
        let dir = cache(name, extra);
        let confs: Vec<Value> = CONFS
            .iter()
            .map(|c| {
                let batches: Vec<Value> = rust_batches(&dir, c).iter().map(batch_json).collect();
                json!({
                    "split": c.0, "eval_fraction": c.1, "seed": c.2, "rank": c.3,
                    "world_size": c.4, "batch_size": c.5, "shuffle": c.6, "epochs": c.7,
                    "batches": batches,
                })
            })
            .collect();
        caches.push(json!({"name": name, "path": dir, "confs": confs}));
    }
    let tokenizer = tokenizer();
    let v = python(
        "python_stream_check.py",
        &json!({"caches": caches, "tokenizer": tokenizer, "scratch": shared_dir()}),
    );
    let mismatches = v["mismatches"].as_array().unwrap();
    assert!(mismatches.is_empty(), "python vs rust: {mismatches:?}");
    assert_eq!(v["compared"].as_u64().unwrap(), 4 * CONFS.len() as u64);
    assert!(v["batches"].as_u64().unwrap() > 100, "{v}");
    assert_eq!(v["resumed_equal"], json!(true), "{v}");
    assert_eq!(v["ranks_disjoint_and_cover"], json!(true), "{v}");
    assert_eq!(v["metadata"]["mode"], json!("hybrid"));
    assert_eq!(v["metadata"]["k"], json!(8));
    assert_eq!(v["metadata"]["verify_ok"], json!(true));
    // Each bad input: the exception type and the fragments of its message.
    for (case, ty, fragments) in [
        (
            "rank_ge_world",
            "ValueError",
            &["rank 2", "world_size 2"][..],
        ),
        ("empty_split", "CacheError", &["holds no sequences"][..]),
        (
            "tokenizer",
            "CacheError",
            &["sha256", "pass the tokenizer the cache was built with"][..],
        ),
        (
            "missing_shard",
            "CacheError",
            &["is missing", "run the teacher again"][..],
        ),
        ("corrupt_shard", "CacheError", &["sha256"][..]),
        ("edited_manifest", "CacheError", &["checksum"][..]),
        (
            "not_a_cache",
            "CacheError",
            &["manifest.json is missing"][..],
        ),
        (
            "other_stream_state",
            "ValueError",
            &["different stream", "seed"][..],
        ),
        ("bad_split", "ValueError", &["split must be"][..]),
    ] {
        let e = &v["errors"][case];
        assert_eq!(e["type"], json!(ty), "{case}: {e}");
        let msg = e["message"].as_str().unwrap();
        for f in fragments {
            assert!(msg.contains(f), "{case}: {msg:?} lacks {f:?}");
        }
    }
}

/// The loss and its gradient for every kind, on a batch of each cache mode, against the
/// torch implementation.
#[test]
fn torch_kd_loss_equals_the_rust_loss_and_gradient() {
    let mut cases = vec![];
    for (name, extra) in [
        ("loss-topk", &[][..]),
        ("loss-hybrid", &["--mode", "hybrid", "--samples", "12"][..]),
        ("loss-sample", &["--mode", "sample", "--samples", "12"][..]),
    ] {
        let dir = cache(name, extra);
        let c = CONFS[0];
        let b = rust_batches(&dir, &c).remove(0);
        let v = Cache::open(&dir).unwrap().manifest.vocab_size;
        let n = b.batch * b.len;
        let logits = SplitMix::new(11).vec(n * v, 4.0);
        let logits_path = shared_dir().join(format!("py-logits-{}.f32", unique()));
        write_f32(&logits_path, &logits);
        let dev = Default::default();
        let t = targets::<AB>(&b, &dev);
        let mut runs = vec![];
        for (kind, temperature, kd_weight, ce_weight) in [
            (KdLoss::Fkl, 1.0, 1.0, 0.0),
            (KdLoss::Fkl, 2.0, 0.7, 0.3),
            // T = 1 with CE: the written-out backward shares one softmax between the two.
            (KdLoss::Fkl, 1.0, 0.6, 0.4),
            (KdLoss::FklTopk, 1.5, 1.0, 0.5),
            (KdLoss::Rkl, 1.0, 1.0, 0.0),
            (KdLoss::Jsd, 2.0, 1.0, 0.2),
            (KdLoss::Ce, 1.0, 1.0, 0.0),
        ] {
            let cfg = LossConfig {
                kind,
                kd_weight,
                ce_weight,
                temperature,
                ..Default::default()
            };
            let z = Tensor::<AB, 1>::from_data(TensorData::new(logits.clone(), [n * v]), &dev)
                .reshape([n, v])
                .require_grad();
            let parts = loss(z.clone(), &t, &cfg, None);
            let grads = parts.total.backward();
            let g: Vec<f32> = z.grad(&grads).unwrap().into_data().to_vec().unwrap();
            let grad_path = shared_dir().join(format!("py-grad-{}.f32", unique()));
            write_f32(&grad_path, &g);
            let scalar = |x: Tensor<AB, 1>| x.into_scalar().elem::<f64>();
            runs.push(json!({
                "loss": kind.name(), "temperature": temperature, "kd_weight": kd_weight,
                "ce_weight": ce_weight, "total": scalar(parts.total), "kd": scalar(parts.kd),
                "ce": scalar(parts.ce), "grad": grad_path,
            }));
        }
        cases.push(json!({
            "name": name, "path": dir, "vocab": v, "logits": logits_path, "runs": runs,
            "conf": {"split": c.0, "eval_fraction": c.1, "seed": c.2, "rank": c.3,
                     "world_size": c.4, "batch_size": c.5, "shuffle": c.6, "epochs": c.7},
        }));
    }
    let v = python("python_loss_check.py", &json!({"cases": cases}));
    let results = v["results"].as_array().unwrap();
    assert_eq!(results.len(), 3 * 7);
    let worst = |key: &str| {
        results
            .iter()
            .map(|r| r[key].as_f64().unwrap())
            .fold(0.0, f64::max)
    };
    eprintln!(
        "torch vs rust, worst of {} runs: total {:.2e}, gradient {:.2e} (chunked {:.2e})",
        results.len(),
        worst("total_abs_diff"),
        worst("grad_max_abs_diff"),
        worst("grad_chunked_max_abs_diff")
    );
    for r in results {
        for key in ["total", "kd", "ce"] {
            let d = r[format!("{key}_abs_diff")].as_f64().unwrap();
            assert!(d <= 1e-5, "{r}");
        }
        // The gradient, unchunked and in chunks of 7 positions.
        for key in ["grad_max_abs_diff", "grad_chunked_max_abs_diff"] {
            assert!(r[key].as_f64().unwrap() <= 1e-5, "{r}");
        }
        assert!(
            r["grad_max_abs"].as_f64().unwrap() > 1e-4,
            "a zero gradient proves nothing: {r}"
        );
    }
}

fn write_f32(path: &Path, v: &[f32]) {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

fn python_bin() -> PathBuf {
    std::env::var("LOGITCACHE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"))
}

/// `torchrun --nproc_per_node PROCS examples/distill_torch.py ARGS` (CPU, gloo).
fn distill_torch(procs: usize, args: &[String]) -> Output {
    distill_torch_with(procs, args, &[])
}

/// [`distill_torch`] with more environment variables.
fn distill_torch_with(procs: usize, args: &[String], env: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(python_bin());
    c.envs(env.iter().copied());
    c.args(["-m", "torch.distributed.run", "--standalone"])
        .arg(format!("--nproc_per_node={procs}"))
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/distill_torch.py"))
        .args(args)
        // Deterministic CPU runs on any machine: no GPU, one thread per process.
        .env("CUDA_VISIBLE_DEVICES", "")
        .env("OMP_NUM_THREADS", "1")
        // A rank that aborts prints every thread's Python stack.
        .env("PYTHONFAULTHANDLER", "1")
        // torchrun's scratch directories go with the test's, not into /tmp.
        .env("TMPDIR", shared_dir());
    c.output().unwrap()
}

/// Asserts checkpoint `ckpt`'s sha256.json lists a sha256 for each of `files`.
fn assert_checksums_list(ckpt: &Path, files: &[&str]) {
    let sums: Value =
        serde_json::from_slice(&std::fs::read(ckpt.join("sha256.json")).unwrap()).unwrap();
    for f in files {
        assert!(sums["files"][f]["sha256"].is_string(), "{f}: {sums}");
    }
}

/// Flips one bit of the byte in the middle of `path`; returns the file as it was, to put back.
fn flip_middle_byte(path: &Path) -> Vec<u8> {
    let good = std::fs::read(path).unwrap();
    let mut bad = good.clone();
    bad[good.len() / 2] ^= 0x10;
    std::fs::write(path, &bad).unwrap();
    good
}

fn metrics_lines(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Asserts a torchrun run failed (torchrun's own exit status, not the script's 2) with an
/// error containing `fragment`.
#[track_caller]
fn assert_torchrun_fails(o: &Output, fragment: &str) {
    assert!(
        !o.status.success(),
        "expected a failure; stderr:\n{}",
        stderr(o)
    );
    assert!(stderr(o).contains(fragment), "{}", stderr(o));
}

/// The torch tests' student: a 2-layer Llama of hidden 32, as a `--student` JSON file.
fn tiny_torch_student(name: &str) -> PathBuf {
    tiny_torch_student_with(name, "")
}

/// [`tiny_torch_student`] with more keys (`extra`: `, "key": value` pairs).
fn tiny_torch_student_with(name: &str, extra: &str) -> PathBuf {
    let student = shared_dir().join(format!("{name}-student-{}.json", unique()));
    std::fs::write(
        &student,
        format!(
            r#"{{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 64{extra}}}"#
        ),
    )
    .unwrap();
    student
}

/// `examples/distill_torch.py`'s arguments for a run from `cache` into `out`: the tests'
/// shared settings (lr 5e-3, warmup 2, a metrics line per step, loss chunks of 16, one
/// thread per process), then `settings` and `extra`.
fn example_args(
    cache: &Path,
    student: &Path,
    out: &Path,
    settings: &[String],
    extra: &[&str],
) -> Vec<String> {
    let mut a: Vec<String> = [
        "--cache",
        cache.to_str().unwrap(),
        "--student",
        student.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--lr",
        "5e-3",
        "--warmup",
        "2",
        "--log-every",
        "1",
        "--loss-chunk",
        "16",
        "--threads",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(settings.iter().cloned());
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

#[test]
fn torchrun_example_distils_on_two_ranks_resumes_exactly_and_exports_a_teacher() {
    let dir = cache("torchrun", &[]);
    let student = tiny_torch_student("torch");
    let (steps, batch, seed, eval_fraction) = (14, 3, 5, 0.25);
    let settings = [
        "--steps".to_string(),
        steps.to_string(),
        "--batch-size".into(),
        batch.to_string(),
        "--seed".into(),
        seed.to_string(),
        "--eval-fraction".into(),
        eval_fraction.to_string(),
        "--eval-every".into(),
        "7".into(),
        "--log-windows".into(),
    ];
    let args = |out: &Path, extra: &[&str]| example_args(&dir, &student, out, &settings, extra);
    let run_dir = shared_dir().join(format!("torch-run-{}", unique()));
    let o = distill_torch(2, &args(&run_dir, &[]));
    assert_ok(&o);

    // metrics.jsonl: logitcache train's keys, one train line per step, eval lines at 7 and 14,
    // and the loss goes down.
    let lines = metrics_lines(&run_dir);
    let train: Vec<&Value> = lines.iter().filter(|l| l.get("loss").is_some()).collect();
    let evals: Vec<&Value> = lines
        .iter()
        .filter(|l| l.get("eval_loss").is_some())
        .collect();
    let keys = |l: &Value| -> Vec<String> { l.as_object().unwrap().keys().cloned().collect() };
    assert_eq!(
        keys(train[0]),
        [
            "ce",
            "grad_norm",
            "kd",
            "loss",
            "lr",
            "step",
            "tokens",
            "tokens_per_s"
        ]
    );
    assert_eq!(
        keys(evals[0]),
        [
            "eval_kl",
            "eval_loss",
            "eval_ppl",
            "eval_tokens",
            "eval_top1",
            "step"
        ]
    );
    assert_eq!(train.len(), steps);
    assert_eq!(
        evals
            .iter()
            .map(|l| l["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [7, 14]
    );
    let loss = |l: &Value| l["loss"].as_f64().unwrap();
    let first = loss(train[0]);
    let last = train[steps - 3..].iter().map(|l| loss(l)).sum::<f64>() / 3.0;
    assert!(last < first - 0.1, "loss {first} -> {last}");
    assert!(evals[1]["eval_kl"].as_f64().unwrap() < evals[0]["eval_kl"].as_f64().unwrap() + 0.05);

    // Interrupted after step 6 (its --resume finds no checkpoint: a fresh start), then resumed.
    let resumed = shared_dir().join(format!("torch-resumed-{}", unique()));
    let o = distill_torch(2, &args(&resumed, &["--stop-after", "6", "--resume"]));
    assert_ok(&o);
    assert!(
        stderr(&o).contains("no checkpoint yet; starting fresh"),
        "{}",
        stderr(&o)
    );
    let o = distill_torch(2, &args(&resumed, &["--resume"]));
    assert_ok(&o);
    assert!(stderr(&o).contains("resuming"), "{}", stderr(&o));
    let both = |l: &Vec<Value>| -> Vec<(u64, f64)> {
        l.iter()
            .filter(|l| l.get("loss").is_some())
            .map(|l| (l["step"].as_u64().unwrap(), loss(l)))
            .collect()
    };
    assert_eq!(both(&metrics_lines(&resumed)), both(&lines));

    // A checkpoint of another run is refused, naming what differs.
    let o = distill_torch(1, &args(&resumed, &["--resume"]));
    assert_torchrun_fails(&o, "world_size: 2 there, 1 here");
    // The checkpoint's files are what it recorded: sha256.json lists each, and one flipped
    // byte in the optimizer state is refused, naming the file (then put back).
    assert_checksums_list(
        &resumed.join("checkpoint"),
        &[
            "config.json",
            "model.safetensors",
            "optimizer.pt",
            "tokenizer.json",
            "trainer_state.json",
        ],
    );
    let opt = resumed.join("checkpoint/optimizer.pt");
    let good = flip_middle_byte(&opt);
    let o = distill_torch(2, &args(&resumed, &["--resume"]));
    assert_torchrun_fails(&o, "is damaged: optimizer.pt has sha256");
    std::fs::write(&opt, &good).unwrap();
    // A file gone from a checkpoint is damage too, not a reason to start afresh.
    let state = resumed.join("checkpoint/trainer_state.json");
    let kept = std::fs::read(&state).unwrap();
    std::fs::remove_file(&state).unwrap();
    let o = distill_torch(2, &args(&resumed, &["--resume"]));
    assert_torchrun_fails(&o, "is damaged: trainer_state.json is missing");
    std::fs::write(&state, kept).unwrap();

    let v = python(
        "torch_example_check.py",
        &json!({
            "cache": dir, "run": run_dir, "resumed": resumed, "world_size": 2,
            "stream": {"batch_size": batch, "seed": seed, "eval_fraction": eval_fraction},
        }),
    );
    for k in [
        "rank_matches_stream",
        "disjoint",
        "union_is_split",
        "from_pretrained_equal",
        "forward_finite",
        "resume_same_keys",
    ] {
        assert_eq!(v[k], json!(true), "{k}: {v}");
    }
    assert_eq!(v["resume_max_abs_diff"], json!(0.0), "{v}");
    // The run covered each rank's first epoch (the check needs it).
    let logged = v["logged_windows"].as_array().unwrap();
    let epoch = v["epoch_windows"].as_array().unwrap();
    assert!(
        logged
            .iter()
            .zip(epoch)
            .all(|(l, e)| l.as_u64() >= e.as_u64()),
        "{v}"
    );

    // The torch-trained student becomes a teacher.
    let onnx = shared_dir().join(format!("torch-teacher-{}.onnx", unique()));
    assert_ok(&run_strings(&[
        "export-onnx".into(),
        "--checkpoint".into(),
        run_dir.join("checkpoint").display().to_string(),
        "--out".into(),
        onnx.display().to_string(),
    ]));
    let next = shared_dir().join(format!("torch-next-cache-{}", unique()));
    assert_ok(&run_strings(&teacher_args(&onnx, &next, 8)));
    assert_ok(&run(&["verify", next.to_str().unwrap()]));
    // The teacher computes what transformers computes for the checkpoint it saved: every
    // window's top-k is transformers' top-k, each log-prob within one float16 step.
    let v = python(
        "hf_teacher_check.py",
        &json!({"cache": next, "checkpoint": run_dir.join("checkpoint")}),
    );
    let agrees = |v: &Value| {
        assert!(v["rows"].as_u64().unwrap() > 0, "{v}");
        assert!(v["max_err_in_f16_steps"].as_f64().unwrap() <= 1.0, "{v}");
        assert!(v["topk_set_err"].as_f64().unwrap() < 1e-4, "{v}");
        assert!(
            v["top1_agree"].as_u64().unwrap() * 100 >= v["positions"].as_u64().unwrap() * 99,
            "{v}"
        );
    };
    agrees(&v);
    // The same checkpoint exported by PyTorch's own exporter (torch.onnx, dynamo; weights as
    // external data, its own attention and masks): a teacher computing the same values.
    let torch_onnx = shared_dir().join(format!("torch-onnx-{}/model.onnx", unique()));
    let e = python(
        "torch_onnx_export.py",
        &json!({"checkpoint": run_dir.join("checkpoint"), "out": torch_onnx}),
    );
    assert_eq!(e["files"], json!(["model.onnx", "model.onnx.data"]), "{e}");
    // Its attention is unfused: the planner finds both layers' scores, with the 4 query heads
    // from the shapes the exporter records (the 2 kv heads' keys are repeated to 4).
    let s = logitcache::onnx::attention::attention_scores(
        &logitcache::onnx::structure::ModelStructure::load(&torch_onnx).unwrap(),
    )
    .expect("the exporter's attention is found");
    assert_eq!((s.sites, s.heads, s.elem_bytes), (2, Some(4), 4), "{s:?}");
    assert_eq!(s.ops[..3], ["MatMul", "Add", "Softmax"], "{s:?}");
    let from_torch = shared_dir().join(format!("torch-onnx-cache-{}", unique()));
    assert_ok(&run_strings(&teacher_args(&torch_onnx, &from_torch, 8)));
    let m = logitcache::cache::manifest::Manifest::load(&from_torch).unwrap();
    assert_eq!(m.model.external_data.len(), 1);
    agrees(&python(
        "hf_teacher_check.py",
        &json!({"cache": from_torch, "checkpoint": run_dir.join("checkpoint")}),
    ));
}

/// The largest weight difference between two runs' checkpoints (same tensor names).
fn max_weight_diff(a: &Path, b: &Path) -> f32 {
    let read = |run: &Path| {
        let t = read_safetensors(&run.join("checkpoint/model.safetensors")).unwrap();
        t.into_iter().collect::<std::collections::BTreeMap<_, _>>()
    };
    let (a, b) = (read(a), read(b));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter()
        .flat_map(|(k, (_, x))| x.iter().zip(&b[k].1).map(|(x, y)| (x - y).abs()))
        .fold(0.0, f32::max)
}

/// `--fsdp` shards the student over the ranks (FSDP2) and trains what DDP trains, with
/// gradient accumulation: the same losses, evaluations and weights up to float rounding,
/// checkpoints in the same files; interrupted and resumed it ends bit-identical to a straight
/// run (rank 0 alone builds the whole student and sends the others their shards, the
/// rotary buffers included, or the weights would differ); a damaged checkpoint stops every
/// rank; a DDP checkpoint is not resumed sharded, and `--fsdp` without torchrun is refused.
#[test]
fn torchrun_example_shards_with_fsdp_and_trains_what_ddp_trains() {
    let dir = cache("fsdp", &[]);
    // Tied embeddings: the head and the embeddings stay one sharded parameter.
    let student = tiny_torch_student_with("fsdp", r#", "tie_word_embeddings": true"#);
    let settings = [
        "--steps",
        "6",
        "--batch-size",
        "3",
        "--grad-accum",
        "2",
        "--seed",
        "3",
        "--eval-fraction",
        "0.25",
        "--eval-every",
        "3",
    ]
    .map(String::from);
    let args = |out: &Path, extra: &[&str]| example_args(&dir, &student, out, &settings, extra);
    let ddp = shared_dir().join(format!("fsdp-ddp-{}", unique()));
    assert_ok(&distill_torch(2, &args(&ddp, &[])));
    let fsdp = shared_dir().join(format!("fsdp-run-{}", unique()));
    let o = distill_torch(2, &args(&fsdp, &["--fsdp"]));
    assert_ok(&o);
    // Each save says what it cost, hashing included, per rank for the sharded state.
    assert!(
        stderr(&o).contains("on its optimizer shards)")
            && stderr(&o).contains("saved ")
            && stderr(&o).contains("at step 6 in "),
        "{}",
        stderr(&o)
    );
    assert!(
        stderr(&o).contains("2 decoder layers and its root sharded over 2 ranks; rank 0 built it whole on the CPU, the other ranks only their shards"),
        "{}",
        stderr(&o)
    );

    let diff = max_weight_diff(&ddp, &fsdp);
    assert!(diff < 1e-5, "FSDP and DDP weights differ by {diff}");
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(fsdp.join("checkpoint/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["architectures"], json!(["LlamaForCausalLM"]));
    let (a, b) = (metrics_lines(&ddp), metrics_lines(&fsdp));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x["step"], y["step"]);
        for k in ["loss", "grad_norm", "eval_loss", "eval_kl"] {
            if let Some(v) = x.get(k) {
                let (v, w) = (v.as_f64().unwrap(), y[k].as_f64().unwrap());
                assert!((v - w).abs() < 1e-5, "step {}: {k} {v} vs {w}", x["step"]);
            }
        }
    }
    let evals: Vec<u64> = b
        .iter()
        .filter(|l| l.get("eval_loss").is_some())
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(evals, [3, 6]);

    // Interrupted after step 2, then resumed: the straight run's weights exactly.
    let resumed = shared_dir().join(format!("fsdp-resumed-{}", unique()));
    assert_ok(&distill_torch(
        2,
        &args(&resumed, &["--fsdp", "--stop-after", "2", "--resume"]),
    ));
    let o = distill_torch(2, &args(&resumed, &["--fsdp", "--resume"]));
    assert_ok(&o);
    assert!(stderr(&o).contains("resuming"), "{}", stderr(&o));
    assert_eq!(max_weight_diff(&fsdp, &resumed), 0.0);
    // The optimizer state is saved sharded (each rank wrote its own part; none gathered the
    // whole), every part listed in sha256.json.
    let ckpt = resumed.join("checkpoint");
    assert!(!ckpt.join("optimizer.pt").exists());
    assert_checksums_list(
        &ckpt,
        &[
            "optimizer/.metadata",
            "optimizer/__0_0.distcp",
            "optimizer/__1_0.distcp",
            "model.safetensors",
        ],
    );
    // One flipped byte in rank 1's part (which rank 1 hashes) stops every rank, naming it.
    let part = ckpt.join("optimizer/__1_0.distcp");
    let good = flip_middle_byte(&part);
    let o = distill_torch(2, &args(&resumed, &["--fsdp", "--resume"]));
    assert_torchrun_fails(&o, "is damaged: optimizer/__1_0.distcp has sha256");
    // Rank 1 found it: rank 0 of 2 does not hash that part, rank 1 of 2 (and a lone rank) do.
    let split = Command::new(python_bin())
        .args([
            "-c",
            "import importlib.util as u, json, sys; s = u.spec_from_file_location('ex', sys.argv[1]); ex = u.module_from_spec(s); s.loader.exec_module(ex); print(json.dumps([ex.verify_checkpoint(sys.argv[2], print, r, w) for r, w in ((0, 2), (1, 2), (0, 1))]))",
        ])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/distill_torch.py"))
        .arg(&ckpt)
        .output()
        .unwrap();
    assert!(split.status.success(), "{}", stderr(&split));
    let found: Vec<Option<String>> = serde_json::from_slice(&split.stdout).unwrap();
    assert!(found[0].is_none(), "{found:?}");
    for f in &found[1..] {
        assert!(
            f.as_ref()
                .unwrap()
                .contains("optimizer/__1_0.distcp has sha256"),
            "{found:?}"
        );
    }
    std::fs::write(&part, &good).unwrap();

    // A checkpoint of the earlier layout (the whole optimizer state in optimizer.pt, no
    // sha256.json) still resumes, bit-identical: made from a sharded one here.
    let legacy = shared_dir().join(format!("fsdp-legacy-{}", unique()));
    assert_ok(&distill_torch(
        2,
        &args(&legacy, &["--fsdp", "--stop-after", "2"]),
    ));
    let c = legacy.join("checkpoint");
    let convert = Command::new(python_bin())
        .args(["-c", "import sys, torch; from torch.distributed.checkpoint.format_utils import dcp_to_torch_save as f; f(sys.argv[1] + '/optimizer', sys.argv[1] + '/whole.pt'); torch.save(torch.load(sys.argv[1] + '/whole.pt', weights_only=True)['optimizer'], sys.argv[1] + '/optimizer.pt')"])
        .arg(&c)
        .output()
        .unwrap();
    assert!(convert.status.success(), "{}", stderr(&convert));
    std::fs::remove_file(c.join("whole.pt")).unwrap();
    std::fs::remove_dir_all(c.join("optimizer")).unwrap();
    std::fs::remove_file(c.join("sha256.json")).unwrap();
    // Without sha256.json (a checkpoint of an older version: a warning, not verified) only
    // rank 0 reads the weights: when it cannot, every rank stops with its reason.
    let weights = c.join("model.safetensors");
    let whole = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &whole[..whole.len() / 2]).unwrap();
    let o = distill_torch(2, &args(&legacy, &["--fsdp", "--resume"]));
    assert_torchrun_fails(&o, "cannot read the checkpoint");
    assert!(stderr(&o).contains("has no sha256.json"), "{}", stderr(&o));
    std::fs::write(&weights, &whole).unwrap();
    // A save that cannot be made (here a file where its directory goes) stops every rank,
    // naming the checkpoint, and leaves the one before it as it was.
    std::fs::write(legacy.join("checkpoint.tmp"), b"").unwrap();
    let o = distill_torch(2, &args(&legacy, &["--fsdp", "--resume"]));
    assert_torchrun_fails(
        &o,
        &format!("cannot save the checkpoint into {}", c.display()),
    );
    assert!(c.join("optimizer.pt").is_file());
    std::fs::remove_file(legacy.join("checkpoint.tmp")).unwrap();
    // So does a failure inside torch.distributed.checkpoint on one rank (rank 1's disk full,
    // made by a sitecustomize that breaks its writer).
    let site = shared_dir().join(format!("fsdp-site-{}", unique()));
    std::fs::create_dir_all(&site).unwrap();
    std::fs::write(
        site.join("sitecustomize.py"),
        "import os\nif os.environ.get('RANK') == '1':\n    import torch.distributed.checkpoint.filesystem as f\n    def full(*a, **k):\n        raise OSError(28, 'No space left on device')\n    f.FileSystemWriter.write_data = full\n",
    )
    .unwrap();
    let o = distill_torch_with(
        2,
        &args(&legacy, &["--fsdp", "--resume"]),
        &[("PYTHONPATH", &site)],
    );
    assert_torchrun_fails(
        &o,
        &format!("cannot save the checkpoint into {}", c.display()),
    );
    assert!(
        stderr(&o).contains("No space left on device"),
        "{}",
        stderr(&o)
    );
    assert!(c.join("optimizer.pt").is_file());
    let o = distill_torch(2, &args(&legacy, &["--fsdp", "--resume"]));
    assert_ok(&o);
    assert!(stderr(&o).contains("has no sha256.json"), "{}", stderr(&o));
    assert_eq!(max_weight_diff(&fsdp, &legacy), 0.0);
    assert!(legacy.join("checkpoint/optimizer/.metadata").is_file());

    // Weights cut in half: refused against sha256.json, naming the file, on every rank.
    let weights = resumed.join("checkpoint/model.safetensors");
    let len = std::fs::metadata(&weights).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let o = distill_torch(2, &args(&resumed, &["--fsdp", "--resume"]));
    assert_torchrun_fails(
        &o,
        &format!(
            "is damaged: model.safetensors has {} bytes, sha256.json records {len}",
            len / 2
        ),
    );
    // A sharded checkpoint has always had sha256.json: without it, it is damaged.
    std::fs::remove_file(resumed.join("checkpoint/sha256.json")).unwrap();
    let o = distill_torch(2, &args(&resumed, &["--fsdp", "--resume"]));
    assert_torchrun_fails(
        &o,
        "is damaged: sha256.json is missing (every checkpoint with a sharded optimizer/ has one)",
    );

    // A DDP checkpoint is not resumed sharded (its optimizer state is another layout).
    let o = distill_torch(2, &args(&ddp, &["--fsdp", "--resume"]));
    assert_torchrun_fails(&o, "sharding: 'ddp' there, 'fsdp' here");
    // Without torchrun there is nothing to shard over.
    let o = Command::new(python_bin())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/distill_torch.py"))
        .args(args(
            &shared_dir().join(format!("fsdp-plain-{}", unique())),
            &["--fsdp"],
        ))
        .env("CUDA_VISIBLE_DEVICES", "")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("--fsdp shards the student over torchrun"),
        "{}",
        stderr(&o)
    );
}

/// The FSDP optimizer state's save and load (`save_optimizer_shards`, `load_optimizer_shards`
/// and, for checkpoints of the earlier layout, `load_optimizer_state` of the torch example, run
/// by `benches/fsdp_resume_memory.py` at a small size on 2 gloo ranks): sharded, mapped or read
/// whole, each rank ends with exactly the shard it had before the save, and no file is still
/// mapped once the load returns (no scalar left a view into it).
#[test]
fn fsdp_resume_loads_each_ranks_shard_and_unmaps_the_file() {
    let o = Command::new(python_bin())
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/fsdp_resume_memory.py"))
        .args(["2", "256"])
        .env("TMPDIR", shared_dir())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mut ways: Vec<&str> = lines.iter().map(|l| l["way"].as_str().unwrap()).collect();
    ways.sort();
    assert_eq!(
        ways,
        [
            "mmap",
            "mmap",
            "save-gathered",
            "save-gathered",
            "save-sharded",
            "save-sharded",
            "sharded",
            "sharded",
            "whole",
            "whole"
        ],
        "two saves and three loads x two ranks: {lines:?}"
    );
    for l in lines
        .iter()
        .filter(|l| !l["way"].as_str().unwrap().starts_with("save"))
    {
        assert_eq!(l["equal"], json!(true), "{l}");
        assert_eq!(l["still_mapped"], json!(false), "{l}");
    }
}

#[test]
fn cache_dataset_splits_ranks_and_dataloader_workers_and_resumes() {
    let dir = cache("dataset", &[]);
    let v = python(
        "python_dataset_check.py",
        &json!({"cache": dir, "batch_size": 3, "seed": 4, "eval_fraction": 0.25}),
    );
    for k in ["ranks1_workers2", "ranks2_workers2", "ranks3_workers0"] {
        for f in ["no_repeats", "union_is_split", "every_rank_got_windows"] {
            assert_eq!(v[k][f], json!(true), "{k} {f}: {v}");
        }
        assert_eq!(v[k]["types"], json!(["Tensor:torch.int64"]), "{v}");
    }
    assert!(v["split_windows"].as_u64().unwrap() > 20, "{v}");
    for k in [
        "resume_equal",
        "resume_with_workers_refused",
        "bad_rank_refused",
    ] {
        assert_eq!(v[k], json!(true), "{k}: {v}");
    }
    assert!(v["resume_batches"].as_u64().unwrap() > 3, "{v}");
}

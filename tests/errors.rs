//! Every bad input a user can give gets a clear error (naming the problem and the fix) and
//! a non-zero exit.

use crate::util::*;
use logitcache::onnx::{ToyFault, ToyLmSpec};
use std::path::{Path, PathBuf};

fn fresh_out(name: &str) -> PathBuf {
    fresh_dir(&format!("err-{name}"))
}

/// Teacher args with one flag's value replaced (or appended).
fn with(args: &[String], flag: &str, value: &str) -> Vec<String> {
    let mut a = args.to_vec();
    match a.iter().position(|x| x == flag) {
        Some(i) => a[i + 1] = value.to_string(),
        None => {
            a.push(flag.into());
            a.push(value.into());
        }
    }
    a
}

fn base(name: &str) -> Vec<String> {
    teacher_args(&plain_model(), &fresh_out(name), 20)
}

#[test]
fn missing_files() {
    let a = base("missing");
    assert_fails(
        &run_strings(&with(&a, "--model", "/nonexistent/m.onnx")),
        &["/nonexistent/m.onnx", "does not exist", "--model"],
    );
    assert_fails(
        &run_strings(&with(&a, "--tokenizer", "/nonexistent/t.json")),
        &[
            "tokenizer /nonexistent/t.json does not exist",
            "--tokenizer",
        ],
    );
    assert_fails(
        &run_strings(&with(&a, "--corpus", "/nonexistent/c.jsonl")),
        &["corpus path /nonexistent/c.jsonl does not exist"],
    );
    let dangling = shared_dir().join("dangling.jsonl");
    let _ = std::os::unix::fs::symlink("/nonexistent/target", &dangling);
    assert_fails(
        &run_strings(&with(&a, "--corpus", dangling.to_str().unwrap())),
        &["does not exist"],
    );
    let odd = shared_dir().join("corpus.csv");
    std::fs::write(&odd, "a,b\n").unwrap();
    assert_fails(
        &run_strings(&with(&a, "--corpus", odd.to_str().unwrap())),
        &["unsupported extension", ".jsonl", ".parquet", ".txt"],
    );
    assert_fails(
        &run_strings(&with(&a, "--ort-lib", "/nonexistent/libonnxruntime.so")),
        &["ONNX Runtime library not found", "make setup"],
    );
}

#[test]
fn unreadable_model_and_tokenizer() {
    let a = base("garbage");
    let junk = shared_dir().join("junk.onnx");
    std::fs::write(&junk, b"this is not an onnx model").unwrap();
    assert_fails(
        &run_strings(&with(&a, "--model", junk.to_str().unwrap())),
        &["cannot load teacher model", "junk.onnx"],
    );
    let bad_tok = shared_dir().join("bad-tokenizer.json");
    std::fs::write(&bad_tok, b"{\"not\": \"a tokenizer\"}").unwrap();
    assert_fails(
        &run_strings(&with(&a, "--tokenizer", bad_tok.to_str().unwrap())),
        &[
            "cannot load tokenizer",
            "it is JSON but not a tokenizer.json (no `model` key; its keys: not)",
        ],
    );
    // Directories given where a file belongs are named as directories.
    let model_dir = shared_dir().join("model-dir");
    std::fs::create_dir_all(&model_dir).unwrap();
    std::fs::copy(plain_model(), model_dir.join("model.onnx")).unwrap();
    assert_fails(
        &run_strings(&with(&a, "--model", model_dir.to_str().unwrap())),
        &[
            "is a directory",
            "--model PATH to the .onnx file",
            "it holds model.onnx",
        ],
    );
    assert_fails(
        &run_strings(&with(&a, "--tokenizer", model_dir.to_str().unwrap())),
        &["cannot load tokenizer", "it is a directory"],
    );
}

#[test]
fn empty_corpus() {
    let empty = shared_dir().join("empty.jsonl");
    std::fs::write(&empty, "\n\n{\"text\": \"\"}\n").unwrap();
    let a = with(&base("empty"), "--corpus", empty.to_str().unwrap());
    assert_fails(
        &run_strings(&a),
        &["the corpus has no text", "--text-field"],
    );
    let dir = shared_dir().join("empty-dir");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("README.md"), "no corpus here").unwrap();
    assert_fails(
        &run_strings(&with(&a, "--corpus", dir.to_str().unwrap())),
        &["contains no .jsonl, .parquet or .txt files"],
    );
}

#[test]
fn bad_numbers() {
    let a = base("numbers");
    assert_fails(
        &run_strings(&with(&a, "--top-k", "0")),
        &["--top-k must be at least 1"],
    );
    assert_fails(
        &run_strings(&with(&a, "--top-k", "401")),
        &["--top-k 401 exceeds the vocabulary (400 tokens"],
    );
    assert_fails(
        &run_strings(&with(&a, "--seq-len", "0")),
        &["--seq-len must be at least 2 (got 0)"],
    );
    assert_fails(
        &run_strings(&with(&a, "--seq-len", "1")),
        &["--seq-len must be at least 2 (got 1)"],
    );
    assert_fails(
        &run_strings(&with(&a, "--temperature", "0")),
        &["--temperature must be a finite number ≥ 0.001 (got 0)"],
    );
    // So small that the scaled logits overflow float32 (it wrote −inf caches and exit 0).
    assert_fails(
        &run_strings(&with(&a, "--temperature", "1e-30")),
        &[
            "--temperature must be a finite number ≥ 0.001 (got 0.000000000000000000000000000001)",
            "overflow float32",
        ],
    );
    assert_fails(
        &run_strings(&with(&a, "--temperature", "-1")),
        &["--temperature must be a finite number ≥ 0.001 (got -1)"],
    );
    assert_fails(
        &run_strings(&with(&a, "--batch-size", "0")),
        &["--batch-size must be at least 1"],
    );
    let w = with(&with(&a, "--worker-index", "2"), "--num-workers", "2");
    assert_fails(
        &run_strings(&w),
        &["--worker-index 2 is not below --num-workers 2"],
    );
    assert_fails(
        &run_strings(&with(&a, "--device", "gpu")),
        &["unknown device `gpu`", "cpu, cuda[:N] or tensorrt[:N]"],
    );
    // Nothing half-made was left behind by refused runs.
    assert!(
        !Path::new(&a[a.iter().position(|x| x == "--out").unwrap() + 1])
            .join("manifest.json")
            .exists()
    );
}

#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_without_the_feature_is_an_error_not_a_fallback() {
    let a = with(&base("gpu"), "--device", "cuda:0");
    assert_fails(
        &run_strings(&a),
        &[
            "CUDA execution provider is not enabled in this build",
            "--features cuda",
        ],
    );
}

#[test]
fn vocab_mismatch_and_interface() {
    let a = base("iface");
    let small = model(
        "small-vocab",
        &ToyLmSpec {
            vocab: 300,
            ..Default::default()
        },
    );
    assert_fails(
        &run_strings(&with(&a, "--model", small.to_str().unwrap())),
        &[
            "model vocab 300",
            "smaller than the tokenizer vocab 400",
            "pass the teacher's own tokenizer.json",
        ],
    );
    let cases: [(&str, ToyFault, &[&str]); 3] = [
        (
            "no-logits",
            ToyFault::NoLogits,
            &["no `logits` output", "scores"],
        ),
        (
            "wrong-rank",
            ToyFault::WrongRank,
            &["`logits` must have rank 3", "found rank 2"],
        ),
        (
            "no-mask",
            ToyFault::NoAttentionMask,
            &["no `attention_mask` input"],
        ),
    ];
    for (name, fault, frags) in cases {
        let m = model(
            name,
            &ToyLmSpec {
                vocab: VOCAB,
                fault,
                ..Default::default()
            },
        );
        let o = run_strings(&with(&a, "--model", m.to_str().unwrap()));
        assert_fails(&o, frags);
        assert!(stderr(&o).contains("does not fit the text-generation interface"));
    }
    let m = plain_model();
    assert_fails(
        &run_strings(&with(
            &with(&a, "--model", m.to_str().unwrap()),
            "--padding-side",
            "left",
        )),
        &["--padding-side left needs a model with a `position_ids` input"],
    );
}

#[test]
fn nan_logits_stop_the_job_naming_the_sequence() {
    // Token id 5 is common in the test tokenizer's output; NaN wherever it is the input.
    let tok = logitcache::tokenizer::load(&tokenizer()).unwrap();
    let text = std::fs::read_to_string(corpus(20)).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let ids = tok
        .tokenizer
        .encode(first["text"].as_str().unwrap(), true)
        .unwrap()
        .get_ids()
        .to_vec();
    let bad = ids[3] as i64;
    let m = model(
        "nan",
        &ToyLmSpec {
            vocab: VOCAB,
            fault: ToyFault::NanOnToken(bad),
            ..Default::default()
        },
    );
    let out = fresh_out("nan");
    let a = with(&base("nan"), "--model", m.to_str().unwrap());
    let a = with(&a, "--out", out.to_str().unwrap());
    assert_fails(
        &run_strings(&a),
        &[
            "non-finite logit (NaN",
            "for seq_id 0 (document 0, window 0) at position 3",
            "check the export",
        ],
    );
    let v = run(&["verify", out.to_str().unwrap()]);
    assert_eq!(
        v.status.code(),
        Some(1),
        "a cache stopped by NaN must not verify: {}",
        stdout(&v)
    );
    assert!(stdout(&v).contains("incomplete"));
}

#[test]
fn a_teacher_failing_mid_shard_leaves_no_partial_shard() {
    // The corpus's documents, then one whose text only it has: its bytes are tokens no other
    // window holds, and the model's logits are NaN there, so the teacher fails in the
    // shard's last group, after the first groups went to the writer.
    let tok = logitcache::tokenizer::load(&tokenizer()).unwrap();
    let text = std::fs::read_to_string(corpus(800)).unwrap();
    let odd = "\u{00a7}\u{00b6}\u{00a7}";
    let bad = tok.tokenizer.encode(odd, false).unwrap().get_ids()[0];
    let all: Vec<u32> = text
        .lines()
        .flat_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            tok.tokenizer
                .encode(v["text"].as_str().unwrap(), true)
                .unwrap()
                .get_ids()
                .to_vec()
        })
        .collect();
    assert!(!all.contains(&bad), "token {bad} occurs in the corpus");
    let path = shared_dir().join("corpus-800-odd.jsonl");
    std::fs::write(
        &path,
        text + &serde_json::json!({ "text": format!("a {odd} b") }).to_string() + "\n",
    )
    .unwrap();
    let m = model(
        "nan-late",
        &ToyLmSpec {
            vocab: VOCAB,
            fault: ToyFault::NanOnToken(bad as i64),
            ..Default::default()
        },
    );
    let out = fresh_out("nan-late");
    // One shard of every window: the teacher hands it to the writer 256 windows at a time.
    let a = with(&base("nan-late"), "--model", m.to_str().unwrap());
    let a = with(&a, "--corpus", path.to_str().unwrap());
    let a = with(&a, "--shard-size", "100000");
    assert_fails(
        &run_strings(&with(&a, "--out", out.to_str().unwrap())),
        &["non-finite logit (NaN"],
    );
    let left: Vec<_> = std::fs::read_dir(out.join("shards"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "files left in shards/: {left:?}");
    let v = run(&["verify", out.to_str().unwrap()]);
    assert_eq!(v.status.code(), Some(1), "{}", stdout(&v));
    assert!(stdout(&v).contains("incomplete"), "{}", stdout(&v));
}

#[test]
fn bad_rows_are_named_or_skipped_and_counted() {
    let path = shared_dir().join("bad-rows.jsonl");
    let good = std::fs::read_to_string(corpus(20)).unwrap();
    let mut lines: Vec<String> = good.lines().map(String::from).collect();
    lines.insert(3, "{not json".into());
    lines.insert(6, "{\"body\": \"text in another field\"}".into());
    lines.insert(9, "{\"text\": 17}".into());
    let mut bytes = (lines.join("\n") + "\n").into_bytes();
    bytes.extend_from_slice(b"{\"text\": \"\xff\xfe\"}\n");
    std::fs::write(&path, bytes).unwrap();
    let a = with(&base("badrows"), "--corpus", path.to_str().unwrap());
    assert_fails(
        &run_strings(&a),
        &["bad-rows.jsonl:4: not valid JSON", "--skip-bad-rows"],
    );
    let out = fresh_out("badrows-skip");
    let mut s = with(&a, "--out", out.to_str().unwrap());
    s.push("--skip-bad-rows".into());
    let o = run_strings(&s);
    assert_ok(&o);
    assert!(
        stderr(&o).contains("skipped 4 bad corpus rows")
            && stderr(&o).contains(":4: not valid JSON"),
        "{}",
        stderr(&o)
    );
    let i = run(&["inspect", out.to_str().unwrap()]);
    assert_ok(&i);
    assert!(stdout(&i).contains("bad rows skipped 4"), "{}", stdout(&i));
    let j: serde_json::Value =
        serde_json::from_str(&stdout(&run(&["inspect", out.to_str().unwrap(), "--json"]))).unwrap();
    assert_eq!(j["bad_rows_skipped"], 4);
    assert_eq!(j["bad_row_examples"].as_array().unwrap().len(), 4);
    let m = logitcache::cache::manifest::Manifest::load(&out).unwrap();
    assert_eq!(m.plan.bad_rows_skipped, 4);
    assert_eq!(m.plan.documents, 20);
    assert!(
        m.plan
            .bad_row_examples
            .iter()
            .any(|e| e.contains(":7: no field `text` (fields: body)")),
        "{:?}",
        m.plan.bad_row_examples
    );
    assert!(
        m.plan
            .bad_row_examples
            .iter()
            .any(|e| e.contains(":10: field `text` is not a string (found a number)"))
    );
    assert!(
        m.plan
            .bad_row_examples
            .iter()
            .any(|e| e.contains(":24: line is not UTF-8"))
    );
}

#[test]
fn parquet_corpus_and_wrong_text_field() {
    use arrow_array::{RecordBatch, StringArray, UInt32Array};
    use std::sync::Arc;
    let texts = logitcache::corpus::read_texts(&[corpus(20)], "text").unwrap();
    let schema = Arc::new(arrow_schema::Schema::new(vec![
        arrow_schema::Field::new("id", arrow_schema::DataType::UInt32, false),
        arrow_schema::Field::new("content", arrow_schema::DataType::Utf8, false),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(UInt32Array::from_iter_values(0..texts.len() as u32)),
            Arc::new(StringArray::from(texts)),
        ],
    )
    .unwrap();
    let path = shared_dir().join("corpus.parquet");
    // Snappy, as Hugging Face datasets writes it.
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .build();
    let mut w = parquet::arrow::ArrowWriter::try_new(
        std::fs::File::create(&path).unwrap(),
        schema,
        Some(props),
    )
    .unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let a = with(&base("parquet"), "--corpus", path.to_str().unwrap());
    assert_fails(
        &run_strings(&a),
        &[
            "has no string column `text`",
            "id: UInt32, content: Utf8",
            "--text-field",
        ],
    );
    let out = fresh_out("parquet-ok");
    let ok = with(
        &with(&a, "--text-field", "content"),
        "--out",
        out.to_str().unwrap(),
    );
    assert_ok(&run_strings(&ok));
    // Same documents as the JSONL corpus, so the same windows.
    let jsonl = fresh_out("parquet-jsonl");
    assert_ok(&run_strings(&with(
        &base("x"),
        "--out",
        jsonl.to_str().unwrap(),
    )));
    assert_eq!(all_rows(&out).input_ids, all_rows(&jsonl).input_ids);
}

#[test]
fn read_only_output_directory() {
    // root ignores permission bits, so as root use a directory on a filesystem that refuses
    // writes (/sys); otherwise a directory without write permission.
    // SAFETY: geteuid has no preconditions and cannot fail.
    let target = if unsafe { libc::geteuid() } == 0 {
        PathBuf::from("/sys/logitcache-test-cache")
    } else {
        let d = shared_dir().join("readonly");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o555)).unwrap();
        d.join("cache")
    };
    let a = with(&base("ro"), "--out", target.to_str().unwrap());
    assert_fails(
        &run_strings(&a),
        &[
            "cannot create the cache directory",
            "choose a writable --out",
        ],
    );
}

#[test]
fn changed_parameters_are_refused_by_name() {
    let out = fresh_out("params");
    let a = with(&base("params"), "--out", out.to_str().unwrap());
    assert_ok(&run_strings(&a));
    assert_fails(
        &run_strings(&with(&a, "--top-k", "4")),
        &[
            "different --top-k: cache has 8, this run has 4",
            "use another --out",
        ],
    );
    assert_fails(
        &run_strings(&with(&a, "--temperature", "2")),
        &["different --temperature"],
    );
    let other = model(
        "other",
        &ToyLmSpec {
            vocab: VOCAB,
            seed: 42,
            ..Default::default()
        },
    );
    assert_fails(
        &run_strings(&with(&a, "--model", other.to_str().unwrap())),
        &["different --model (sha256)"],
    );
    assert_fails(
        &run_strings(&with(&a, "--corpus", corpus(21).to_str().unwrap())),
        &["different --corpus"],
    );
    // The same command again is a no-op resume.
    assert_ok(&run_strings(&a));
    // A cache written when a corpus file given twice was read twice lists it twice (and holds
    // its documents twice): resuming it now, which reads the file once, is refused and says
    // why.
    let mut m = logitcache::cache::manifest::Manifest::load(&out).unwrap();
    m.corpus.push(m.corpus[0].clone());
    m.store(&out).unwrap();
    assert_fails(
        &run_strings(&a),
        &[
            "different --corpus",
            "twice: it was written when a file given twice was read twice",
        ],
    );
}

#[test]
fn second_writer_for_the_same_worker_is_refused() {
    let a = base("lock");
    let out = PathBuf::from(&a[a.iter().position(|x| x == "--out").unwrap() + 1]);
    std::fs::create_dir_all(&out).unwrap();
    let _held = logitcache::cache::lock::CacheLock::acquire(&out, 0, 1).unwrap();
    assert_fails(
        &run_strings(&a),
        &["another logitcache process is writing worker 0/1", "lock"],
    );
    // Another worker slot is free.
    let b = with(&with(&a, "--worker-index", "1"), "--num-workers", "2");
    assert_ok(&run_strings(&b));
}

#[test]
fn damaged_caches_fail_verification() {
    let out = fresh_out("damage");
    assert_ok(&run_strings(&with(
        &base("damage"),
        "--out",
        out.to_str().unwrap(),
    )));
    assert_ok(&run(&["verify", out.to_str().unwrap()]));
    let m = logitcache::cache::manifest::Manifest::load(&out).unwrap();
    assert!(m.shards.len() >= 2);

    // Every single flipped byte of a shard is detected.
    let shard = out.join(&m.shards[0].file);
    let orig = std::fs::read(&shard).unwrap();
    for at in [0, orig.len() / 3, orig.len() / 2, orig.len() - 1] {
        let mut b = orig.clone();
        b[at] ^= 0x01;
        std::fs::write(&shard, &b).unwrap();
        let v = run(&["verify", out.to_str().unwrap()]);
        assert_eq!(v.status.code(), Some(1), "flip at {at} not detected");
        assert!(
            stdout(&v).contains("does not match the manifest's"),
            "{}",
            stdout(&v)
        );
    }
    // Truncated.
    std::fs::write(&shard, &orig[..orig.len() / 2]).unwrap();
    let v = run(&["verify", out.to_str().unwrap()]);
    assert_eq!(v.status.code(), Some(1));
    assert!(stdout(&v).contains("truncated or replaced"));
    // Missing.
    std::fs::remove_file(&shard).unwrap();
    let v = run(&["verify", out.to_str().unwrap()]);
    assert_eq!(v.status.code(), Some(1));
    assert!(stdout(&v).contains("cannot read"));
    std::fs::write(&shard, &orig).unwrap();
    assert_ok(&run(&["verify", out.to_str().unwrap()]));

    // A manifest edited by hand, even with a plausible value, is refused by every reader.
    let mpath = out.join("manifest.json");
    let text = std::fs::read_to_string(&mpath).unwrap();
    let edited = text.replacen("\"temperature\": 1.0", "\"temperature\": 2.0", 1);
    assert_ne!(edited, text);
    std::fs::write(&mpath, edited).unwrap();
    for cmd in [vec!["verify"], vec!["inspect"]] {
        let mut args = cmd.clone();
        args.push(out.to_str().unwrap());
        assert_fails(
            &run(&args),
            &[
                "manifest.json was modified after logitcache wrote it",
                "restore the file",
            ],
        );
    }
    std::fs::write(&mpath, "{ not json").unwrap();
    assert_fails(
        &run(&["verify", out.to_str().unwrap()]),
        &["is not a valid logitcache manifest"],
    );
    assert_fails(
        &run(&["verify", "/nonexistent/cache"]),
        &["manifest.json is missing", "not a logitcache cache"],
    );
}

#[test]
fn inspect_refuses_another_tokenizer_naming_both_hashes() {
    let out = fresh_out("inspect-tok");
    assert_ok(&run_strings(&with(
        &base("inspect-tok"),
        "--out",
        out.to_str().unwrap(),
    )));
    let shown = run(&[
        "inspect",
        out.to_str().unwrap(),
        "--show",
        "2:3",
        "--tokenizer",
        tokenizer().to_str().unwrap(),
    ]);
    assert_ok(&shown);
    assert!(stdout(&shown).contains("seq_id 2") && stdout(&shown).contains("tail (all other ids)"));
    let other = shared_dir().join("other-tokenizer.json");
    let mut t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tokenizer()).unwrap()).unwrap();
    t["truncation"] = serde_json::json!(null);
    t["padding"] = serde_json::json!({"strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": null, "pad_id": 3, "pad_type_id": 0, "pad_token": "<pad>"});
    std::fs::write(&other, serde_json::to_string(&t).unwrap()).unwrap();
    let (want, _) = logitcache::util::sha256_file(&tokenizer()).unwrap();
    let (given, _) = logitcache::util::sha256_file(&other).unwrap();
    let o = run(&[
        "inspect",
        out.to_str().unwrap(),
        "--show",
        "2:3",
        "--tokenizer",
        other.to_str().unwrap(),
    ]);
    assert_fails(
        &o,
        &[&want, &given, "pass the tokenizer the cache was built with"],
    );
    assert_fails(
        &run(&[
            "inspect",
            out.to_str().unwrap(),
            "--show",
            "2-3",
            "--tokenizer",
            tokenizer().to_str().unwrap(),
        ]),
        &["expected SEQ_ID:POS"],
    );
    assert_fails(
        &run(&[
            "inspect",
            out.to_str().unwrap(),
            "--show",
            "2:999",
            "--tokenizer",
            tokenizer().to_str().unwrap(),
        ]),
        &["position 999 is outside seq_id 2"],
    );
}

/// Compressed corpora (.jsonl.gz, .jsonl.zst), a UTF-8 byte-order mark, a file given twice
/// and a directory with other files in it all give the cache of the plain corpus; what was
/// skipped or deduplicated is said in a warning; a compressed Parquet file is refused.
#[test]
fn corpus_forms_give_the_same_cache() {
    use std::io::Write;
    let plain = corpus(20);
    let text = std::fs::read(&plain).unwrap();
    let dir = shared_dir().join("corpus-forms");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("mixed")).unwrap();
    let gz = dir.join("c.jsonl.gz");
    let mut e = flate2::write::GzEncoder::new(
        std::fs::File::create(&gz).unwrap(),
        flate2::Compression::default(),
    );
    e.write_all(&text).unwrap();
    e.finish().unwrap();
    let zst = dir.join("c.jsonl.zst");
    std::fs::write(&zst, zstd::stream::encode_all(&text[..], 3).unwrap()).unwrap();
    let bom = dir.join("bom.jsonl");
    std::fs::write(&bom, [b"\xef\xbb\xbf".as_slice(), &text].concat()).unwrap();
    let mixed = dir.join("mixed");
    std::fs::copy(&plain, mixed.join("a.jsonl")).unwrap();
    std::fs::write(mixed.join("notes.csv"), "a,b\n").unwrap();
    std::fs::write(mixed.join("blob.bin"), [0u8; 4]).unwrap();
    std::fs::write(mixed.join(".hidden"), "x").unwrap();
    // A hidden directory (a git or Hugging Face checkout) is not walked, its files not listed.
    std::fs::create_dir_all(mixed.join(".git")).unwrap();
    std::fs::write(mixed.join(".git/config"), "x").unwrap();

    let mixed_a = mixed.join("a.jsonl");
    let reference = fresh_out("forms-plain");
    assert_ok(&run_strings(&with(
        &teacher_args(&plain_model(), &reference, 20),
        "--corpus",
        plain.to_str().unwrap(),
    )));
    let want = all_rows(&reference);
    let cases: Vec<(&str, Vec<&Path>, Vec<&str>)> = vec![
        ("gz", vec![&gz], vec![]),
        ("zst", vec![&zst], vec![]),
        ("bom", vec![&bom], vec![]),
        (
            "twice",
            vec![&plain, &plain],
            vec!["is given more than once", "reading it once"],
        ),
        (
            "file-and-dir",
            vec![&mixed, &mixed_a],
            vec!["given more than once"],
        ),
        (
            "mixed-dir",
            vec![&mixed],
            vec!["skipped 2 file(s)", "notes.csv", "blob.bin"],
        ),
    ];
    for (name, paths, warnings) in cases {
        let out = fresh_out(&format!("forms-{name}"));
        let mut a = teacher_args(&plain_model(), &out, 20);
        let c = a.iter().position(|x| x == "--corpus").unwrap();
        a.remove(c + 1);
        for (i, p) in paths.iter().enumerate() {
            a.insert(c + 1 + i, p.to_str().unwrap().to_string());
        }
        let o = run_strings(&a);
        assert_ok(&o);
        for w in warnings {
            assert!(
                stderr(&o).contains(w),
                "{name}: no {w:?} in\n{}",
                stderr(&o)
            );
        }
        assert!(
            !stderr(&o).contains(".hidden") && !stderr(&o).contains(".git"),
            "{name}: {}",
            stderr(&o)
        );
        let got = all_rows(&out);
        assert_eq!(got.seq_ids, want.seq_ids, "{name}");
        assert_eq!(got.input_ids, want.input_ids, "{name}");
    }
    let pq_gz = dir.join("c.parquet.gz");
    std::fs::write(&pq_gz, b"x").unwrap();
    assert_fails(
        &run_strings(&with(
            &base("forms-pqgz"),
            "--corpus",
            pq_gz.to_str().unwrap(),
        )),
        &["is a compressed Parquet file", "decompress it"],
    );
}

/// A teacher saved with external data (weights in a file beside the .onnx, as every export
/// over 2 GB is) gives the plain model's cache, records the data file's sha256, and a cache
/// made from other weights under the same graph file is not taken for the same teacher. A
/// missing data file is named before anything is written.
#[test]
fn external_data_is_hashed_into_the_provenance() {
    use logitcache::cache::manifest::Manifest;
    use logitcache::onnx::external::move_to_external;
    let dir = shared_dir().join("external-data");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (graph, data) =
        move_to_external(&std::fs::read(plain_model()).unwrap(), "teacher.onnx.data").unwrap();
    assert!(
        graph.len() < 4096 && data.len() > 10_000,
        "{} {}",
        graph.len(),
        data.len()
    );
    let onnx = dir.join("teacher.onnx");
    std::fs::write(&onnx, &graph).unwrap();
    std::fs::write(dir.join("teacher.onnx.data"), &data).unwrap();

    let reference = fresh_out("ext-plain");
    assert_ok(&run_strings(&teacher_args(&plain_model(), &reference, 20)));
    let out = fresh_out("ext");
    let args = teacher_args(&onnx, &out, 20);
    assert_ok(&run_strings(&args));
    let (a, b) = (all_rows(&reference), all_rows(&out));
    assert_eq!(a.topk_ids, b.topk_ids);
    assert_eq!(a.topk_logprobs, b.topk_logprobs);
    let m = Manifest::load(&out).unwrap();
    assert_eq!(m.model.external_data.len(), 1);
    let e = &m.model.external_data[0];
    assert_eq!(
        (e.location.as_str(), e.bytes),
        ("teacher.onnx.data", data.len() as u64)
    );
    assert_eq!(
        e.sha256,
        logitcache::util::sha256_file(&dir.join("teacher.onnx.data"))
            .unwrap()
            .0
    );

    // The identity pipelines fingerprint a teacher by: a single file's own sha256, and for
    // a graph with external data one that covers the data too.
    use logitcache::onnx::external::model_sha256;
    assert_eq!(
        model_sha256(&plain_model()).unwrap(),
        logitcache::util::sha256_file(&plain_model()).unwrap().0
    );
    let id = model_sha256(&onnx).unwrap();
    assert_ne!(id, logitcache::util::sha256_file(&onnx).unwrap().0);

    // Other weights, same graph file: resuming into the cache is refused.
    let mut other = data.clone();
    let mid = other.len() / 2;
    other[mid] ^= 0x40;
    std::fs::write(dir.join("teacher.onnx.data"), &other).unwrap();
    assert_ne!(model_sha256(&onnx).unwrap(), id);
    assert_fails(
        &run_strings(&args),
        &["different --model (external data sha256)"],
    );
    // A missing data file is named, and no cache is started.
    std::fs::remove_file(dir.join("teacher.onnx.data")).unwrap();
    let out2 = fresh_out("ext-missing");
    assert_fails(
        &run_strings(&teacher_args(&onnx, &out2, 20)),
        &[
            "external file `teacher.onnx.data`",
            "does not exist",
            "beside the .onnx",
        ],
    );
    assert!(!out2.join("manifest.json").exists());
}

//! `export-onnx`: ONNX Runtime's logits for an exported student equal burn's forward for the
//! same weights (f32, padded left, right and not at all; tied and untied; grouped-query and
//! plain attention), float16 export stays close, and an exported student works as a teacher.

use crate::student::{random_weights, to_f32};
use crate::util::*;
use burn::backend::Flex;
use burn::prelude::*;
use logitcache::student::arch::StudentConfig;
use logitcache::student::checkpoint::load_hf;
use logitcache::student::export::{ATTENTION_BLOCK, llama_onnx};
use logitcache::student::model::Llama;
use logitcache::teacher::backend::{Batch, PaddingSide};
use logitcache::teacher::ort_backend::full_logits;

fn cfg(tied: bool, kv_heads: usize) -> StudentConfig {
    StudentConfig {
        name: "exp".into(),
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: kv_heads,
        intermediate_size: 40,
        vocab_size: 53,
        max_position_embeddings: 64,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: tied,
    }
}

/// Max |ORT − burn| over the real positions of `batch`.
fn max_diff(cfg: &StudentConfig, fp16: bool, batch: &Batch, seed: u64) -> f64 {
    let w = to_f32(&random_weights(cfg, seed));
    let onnx = shared_dir().join(format!(
        "export-{}-{}-{fp16}-{seed}.onnx",
        cfg.tie_word_embeddings, cfg.num_key_value_heads
    ));
    std::fs::write(&onnx, llama_onnx(cfg, &w, fp16).unwrap()).unwrap();
    let mut t = host_teacher(&onnx, 4, 1.0, cfg.vocab_size);
    let (dims, got) = full_logits(&mut t, batch).unwrap();
    assert_eq!(dims, vec![batch.batch, batch.len, cfg.vocab_size]);
    let dev = Default::default();
    let model = load_hf(
        Llama::<Flex>::init(cfg, 0, &dev),
        &w,
        std::path::Path::new("test"),
    )
    .unwrap();
    let n = batch.batch * batch.len;
    let ids =
        Tensor::<Flex, 1, Int>::from_data(TensorData::new(batch.input_ids.clone(), [n]), &dev)
            .reshape([batch.batch, batch.len]);
    let mask: Vec<f32> = batch.attention_mask.iter().map(|&m| m as f32).collect();
    let mask = Tensor::<Flex, 1>::from_data(TensorData::new(mask, [n]), &dev)
        .reshape([batch.batch, batch.len]);
    let want: Vec<f32> = model
        .forward(ids, mask)
        .into_data()
        .convert::<f32>()
        .into_vec()
        .unwrap();
    let v = cfg.vocab_size;
    let mut d = 0f64;
    for i in 0..batch.batch {
        for p in 0..batch.lengths[i] {
            let r = batch.row_of(i, p);
            for j in 0..v {
                d = d.max((got[r * v + j] - want[r * v + j]).abs() as f64);
            }
        }
    }
    d
}

#[test]
fn exported_logits_equal_burns_forward() {
    let a: Vec<u32> = vec![1, 5, 9, 2, 30, 7, 7, 3, 52, 0, 11];
    let b: Vec<u32> = vec![4, 36, 8];
    let c: Vec<u32> = vec![12, 13, 14, 15, 16, 17];
    for (tied, kv) in [(false, 2), (true, 2), (true, 4)] {
        let cfg = cfg(tied, kv);
        for (what, batch) in [
            ("unpadded", Batch::pad(&[&a, &a[..]], PaddingSide::Right, 0)),
            (
                "right-padded",
                Batch::pad(&[&a, &b, &c], PaddingSide::Right, 0),
            ),
            (
                "left-padded",
                Batch::pad(&[&b, &a, &c], PaddingSide::Left, 0),
            ),
        ] {
            let d = max_diff(&cfg, false, &batch, 7);
            assert!(
                d <= 1e-4,
                "tied={tied} kv={kv} {what}: max |ORT - burn| = {d}"
            );
        }
    }
    // Longer than one attention block: several blocks of queries, the last one partly
    // padding, with the batch right- and left-padded.
    let long: Vec<u32> = (0..ATTENTION_BLOCK * 2 + 37)
        .map(|i| (i * 7 % 53) as u32)
        .collect();
    let mut long_cfg = cfg(true, 2);
    long_cfg.max_position_embeddings = 1024;
    for side in [PaddingSide::Right, PaddingSide::Left] {
        let batch = Batch::pad(&[&long, &long[..300]], side, 0);
        let d = max_diff(&long_cfg, false, &batch, 7);
        assert!(
            d <= 1e-4,
            "{} tokens, {side:?}-padded: max |ORT - burn| = {d}",
            long.len()
        );
    }
    // float16 weights: the rounding of the weights shows, but only that.
    let batch = Batch::pad(&[&a, &b], PaddingSide::Right, 0);
    let d = max_diff(&cfg(false, 2), true, &batch, 7);
    assert!(d > 0.0 && d < 0.05, "fp16 export: max |ORT - burn| = {d}");
}

#[test]
fn export_onnx_cli_writes_a_teacher_the_teacher_stage_accepts() {
    // A copy of teacher ta's pretraining run: the pipeline test reruns the shared baseline
    // (rebuilding its student runs) concurrently, so nothing here reads the baseline after
    // this copy.
    let (out, _) = crate::pipeline::baseline();
    let dir = shared_dir().join("export-cli");
    std::fs::create_dir_all(&dir).unwrap();
    let run_dir = dir.join("ta-run");
    copy_tree(&out.join("teachers/ta/run/ta"), &run_dir);
    let f32_path = dir.join("ta.onnx");
    let f16_path = dir.join("ta-fp16.onnx");
    for (p, extra) in [(&f32_path, None), (&f16_path, Some("--fp16"))] {
        let mut a = vec![
            "export-onnx",
            "--checkpoint",
            run_dir.to_str().unwrap(),
            "--out",
            p.to_str().unwrap(),
        ];
        a.extend(extra);
        assert_ok(&run(&a));
    }
    let (a, b) = (
        std::fs::metadata(&f32_path).unwrap().len(),
        std::fs::metadata(&f16_path).unwrap().len(),
    );
    assert!(b * 10 < a * 6, "fp16 file {b} bytes vs f32 {a}");
    // The exported student as a teacher (its tokenizer is the test tokenizer).
    let cache = dir.join("cache");
    assert_ok(&run_strings(&teacher_args(&f32_path, &cache, 40)));
    assert_ok(&run(&["verify", cache.to_str().unwrap()]));
    // Its attention is blocked (a Scan over blocks of queries): no whole-sequence scores for
    // the batch planner to count.
    assert_eq!(
        logitcache::onnx::attention::attention_scores(
            &logitcache::onnx::structure::ModelStructure::load(&f32_path).unwrap()
        ),
        None
    );

    // `--external-data always` (what `auto` does above 1 GiB): the weights go to OUT.data,
    // the graph file keeps only small constants, the teacher computes the same cache, and the
    // manifest hashes the data file. `never` is the single file of the default.
    let ext_path = dir.join("ta-ext.onnx");
    let never_path = dir.join("ta-never.onnx");
    for (p, how) in [(&ext_path, "always"), (&never_path, "never")] {
        assert_ok(&run(&[
            "export-onnx",
            "--checkpoint",
            run_dir.to_str().unwrap(),
            "--out",
            p.to_str().unwrap(),
            "--external-data",
            how,
        ]));
    }
    assert_eq!(
        std::fs::read(&never_path).unwrap(),
        std::fs::read(&f32_path).unwrap()
    );
    assert!(!dir.join("ta-never.onnx.data").exists());
    let data_path = dir.join("ta-ext.onnx.data");
    let (graph, data) = (
        std::fs::metadata(&ext_path).unwrap().len(),
        std::fs::metadata(&data_path).unwrap().len(),
    );
    assert!(
        graph < 64 * 1024 && data + graph > a,
        "graph {graph}, data {data}, one file {a}"
    );
    let ext_cache = dir.join("cache-ext");
    assert_ok(&run_strings(&teacher_args(&ext_path, &ext_cache, 40)));
    let (x, y) = (all_rows(&cache), all_rows(&ext_cache));
    assert_eq!(x.topk_ids, y.topk_ids);
    assert_eq!(x.topk_logprobs, y.topk_logprobs);
    let m = logitcache::cache::manifest::Manifest::load(&ext_cache).unwrap();
    assert_eq!(m.model.external_data.len(), 1);
    assert_eq!(
        (
            m.model.external_data[0].location.as_str(),
            m.model.external_data[0].bytes
        ),
        ("ta-ext.onnx.data", data)
    );
    // `--out` a bare file name (in the current directory), with its data beside it.
    let o = command()
        .args([
            "export-onnx",
            "--checkpoint",
            run_dir.to_str().unwrap(),
            "--out",
            "bare.onnx",
            "--external-data",
            "always",
        ])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert_ok(&o);
    assert_eq!(
        std::fs::read(dir.join("bare.onnx.data")).unwrap(),
        std::fs::read(&data_path).unwrap()
    );
    assert!(dir.join("bare.onnx").is_file());
    // Not a run directory: a clear error.
    assert_fails(
        &run(&[
            "export-onnx",
            "--checkpoint",
            dir.to_str().unwrap(),
            "--out",
            dir.join("x.onnx").to_str().unwrap(),
        ]),
        &["is not a run directory written by `logitcache train`"],
    );
    assert!(!dir.join("x.onnx").exists());
}

/// `export-onnx` takes a Hugging Face Llama checkpoint directory as `save_pretrained` writes
/// it (transformers 4 and 5 configs), not only run directories: the same weights export to
/// the same bytes; bfloat16 weights in a sharded checkpoint with an untied head give the
/// cache of the same (rounded) values stored as float32, and the head is the untied one;
/// configurations the student model does not compute are refused by key.
#[test]
fn export_onnx_takes_a_hugging_face_llama_checkpoint_directory() {
    use logitcache::student::checkpoint::read_safetensors;
    use safetensors::{Dtype, tensor::TensorView};
    let (out, _) = crate::pipeline::baseline();
    let dir = shared_dir().join("export-hf");
    std::fs::create_dir_all(&dir).unwrap();
    let run_dir = dir.join("ta-run");
    copy_tree(&out.join("teachers/ta/run/ta"), &run_dir);
    let ckpt = run_dir.join("checkpoint");
    let export = |from: &std::path::Path, to: &std::path::Path| {
        run(&[
            "export-onnx",
            "--checkpoint",
            from.to_str().unwrap(),
            "--out",
            to.to_str().unwrap(),
        ])
    };
    let run_onnx = dir.join("run.onnx");
    assert_ok(&export(&run_dir, &run_onnx));
    // The config as transformers writes it (keys the student has no use for included).
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ckpt.join("config.json")).unwrap()).unwrap();
    config["transformers_version"] = "4.57.1".into();
    config["rope_scaling"] = serde_json::Value::Null;
    config["pretraining_tp"] = 1.into();
    let hf_dir = |name: &str, config: &serde_json::Value| {
        let d = dir.join(name);
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("config.json"), serde_json::to_vec(config).unwrap()).unwrap();
        d
    };
    // 1. The run's own weights: the same graph, byte for byte (the directory named as the
    // run, whose name the model's metadata records).
    let a = hf_dir("hf-f32/ta", &config);
    std::fs::copy(ckpt.join("model.safetensors"), a.join("model.safetensors")).unwrap();
    assert_ok(&export(&a, &dir.join("a.onnx")));
    assert!(
        std::fs::read(dir.join("a.onnx")).unwrap() == std::fs::read(&run_onnx).unwrap(),
        "the Hugging Face directory's export differs from the run's"
    );
    // The same in transformers 5's layout (rope_theta inside rope_parameters).
    let mut v5 = config.clone();
    let theta = v5["rope_theta"].take();
    v5.as_object_mut().unwrap().remove("rope_scaling");
    v5["rope_parameters"] = serde_json::json!({"rope_type": "default", "rope_theta": theta});
    let a5 = hf_dir("hf-v5/ta", &v5);
    std::fs::copy(ckpt.join("model.safetensors"), a5.join("model.safetensors")).unwrap();
    assert_ok(&export(&a5, &dir.join("a5.onnx")));
    assert!(
        std::fs::read(dir.join("a5.onnx")).unwrap() == std::fs::read(&run_onnx).unwrap(),
        "the transformers 5 config's export differs from the run's"
    );
    // 2. The weights rounded to bfloat16, with an untied head (`lm_head.weight`: half the
    // embeddings, so a head taken from the embeddings would show): stored as bfloat16 in two
    // shards, and as float32 in one file; and the tied head for comparison.
    let w = read_safetensors(&ckpt.join("model.safetensors")).unwrap();
    assert_eq!(config["tie_word_embeddings"], true);
    let (shape, embed) = &w["model.embed_tokens.weight"];
    let head = (
        shape.clone(),
        embed.iter().map(|x| x * 0.5).collect::<Vec<f32>>(),
    );
    let bf16: Vec<(String, Vec<usize>, Vec<u8>)> = w
        .iter()
        .chain(std::iter::once((&"lm_head.weight".to_string(), &head)))
        .map(|(name, (shape, v))| {
            let bytes = v
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                .collect();
            (name.clone(), shape.clone(), bytes)
        })
        .collect();
    let write = |path: &std::path::Path, tensors: &[&(String, Vec<usize>, Vec<u8>)], dtype| {
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .map(|(n, s, b)| (n.clone(), TensorView::new(dtype, s.clone(), b).unwrap()))
            .collect();
        std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
    };
    let mut untied = config.clone();
    untied["tie_word_embeddings"] = false.into();
    untied["torch_dtype"] = "bfloat16".into();
    let b = hf_dir("hf-bf16-sharded", &untied);
    let (first, second): (Vec<_>, Vec<_>) = bf16.iter().partition(|t| t.0.contains("layers.0."));
    assert!(!first.is_empty() && !second.is_empty());
    let mut weight_map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", &first),
        ("model-00002-of-00002.safetensors", &second),
    ] {
        write(&b.join(file), part, Dtype::BF16);
        for t in part.iter() {
            weight_map.insert(t.0.clone(), file.into());
        }
    }
    std::fs::write(
        b.join("model.safetensors.index.json"),
        serde_json::to_vec(&serde_json::json!({"metadata": {}, "weight_map": weight_map})).unwrap(),
    )
    .unwrap();
    let c = hf_dir("hf-rounded-f32", &untied);
    let t = hf_dir("hf-rounded-f32-tied", &config);
    let rounded: Vec<(String, Vec<usize>, Vec<u8>)> = bf16
        .iter()
        .map(|(n, s, bytes)| {
            let f32s = bytes
                .chunks_exact(2)
                .flat_map(|p| {
                    half::bf16::from_le_bytes([p[0], p[1]])
                        .to_f32()
                        .to_le_bytes()
                })
                .collect();
            (n.clone(), s.clone(), f32s)
        })
        .collect();
    write(
        &c.join("model.safetensors"),
        &rounded.iter().collect::<Vec<_>>(),
        Dtype::F32,
    );
    write(
        &t.join("model.safetensors"),
        &rounded
            .iter()
            .filter(|t| t.0 != "lm_head.weight")
            .collect::<Vec<_>>(),
        Dtype::F32,
    );
    let cache = |onnx: &std::path::Path, name: &str| {
        let out = dir.join(name);
        assert_ok(&run_strings(&teacher_args(onnx, &out, 30)));
        assert_ok(&run(&["verify", out.to_str().unwrap()]));
        all_rows(&out)
    };
    assert_ok(&export(&b, &dir.join("b.onnx")));
    assert_ok(&export(&c, &dir.join("c.onnx")));
    let (rb, rc) = (
        cache(&dir.join("b.onnx"), "cache-b"),
        cache(&dir.join("c.onnx"), "cache-c"),
    );
    assert_eq!(rb.topk_ids, rc.topk_ids);
    for (x, y) in rb.topk_logprobs.iter().zip(&rc.topk_logprobs) {
        assert!((x.to_f32() - y.to_f32()).abs() < 2e-3, "{x} vs {y}");
    }
    assert_ok(&export(&t, &dir.join("t.onnx")));
    let rt = cache(&dir.join("t.onnx"), "cache-t");
    let moved = rb
        .topk_logprobs
        .iter()
        .zip(&rt.topk_logprobs)
        .filter(|(x, y)| (x.to_f32() - y.to_f32()).abs() > 0.01)
        .count();
    assert!(
        moved * 2 > rb.topk_logprobs.len(),
        "the untied head's logits should be half the tied head's ({moved} differ)"
    );
    // 3. Refused, naming the key (and nothing written).
    let refused = |name: &str, edit: &dyn Fn(&mut serde_json::Value), want: &[&str]| {
        let mut cfg = config.clone();
        edit(&mut cfg);
        let d = hf_dir(name, &cfg);
        std::fs::copy(ckpt.join("model.safetensors"), d.join("model.safetensors")).unwrap();
        let to = dir.join(format!("{name}.onnx"));
        assert_fails(&export(&d, &to), want);
        assert!(!to.exists(), "{name}");
    };
    refused(
        "hf-rope-scaling",
        &|c| c["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0}),
        &["rope_scaling", "plain rotary embeddings"],
    );
    refused(
        "hf-v5-rope-llama3",
        &|c| {
            c["rope_parameters"] =
                serde_json::json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0})
        },
        &["rope_parameters", "plain rotary embeddings"],
    );
    refused(
        "hf-mistral",
        &|c| c["model_type"] = "mistral".into(),
        &["model_type is \"mistral\"", "Llama checkpoints"],
    );
    refused(
        "hf-bias",
        &|c| c["attention_bias"] = true.into(),
        &["attention_bias", "no biases"],
    );
    refused(
        "hf-head-dim",
        &|c| c["head_dim"] = 3.into(),
        &["head_dim is 3"],
    );
    // A run's checkpoint/ folder is not taken for a Hugging Face directory (its checksums
    // and lock are the run directory's): the run directory is asked for, as before.
    assert_fails(
        &export(&ckpt, &dir.join("ckpt.onnx")),
        &[
            "is not a run directory written by `logitcache train`",
            "pass OUT/<student>",
        ],
    );
    let no_weights = hf_dir("hf-no-weights", &config);
    assert_fails(
        &export(&no_weights, &dir.join("nw.onnx")),
        &["no model.safetensors"],
    );
}

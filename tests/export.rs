//! `export-onnx`: ONNX Runtime's logits for an exported student equal burn's forward for the
//! same weights (f32, padded left, right and not at all; tied and untied; grouped-query and
//! plain attention), float16 export stays close, and an exported student works as a teacher.

use crate::student::{random_weights, to_f32};
use crate::util::*;
use burn::backend::Flex;
use burn::prelude::*;
use logitcache::student::arch::StudentConfig;
use logitcache::student::checkpoint::load_hf;
use logitcache::student::export::llama_onnx;
use logitcache::student::model::Llama;
use logitcache::teacher::backend::{Batch, Device, PaddingSide, TopKMode};
use logitcache::teacher::ort_backend::{OrtOptions, OrtTeacher, full_logits};

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
    let mut t = OrtTeacher::open(
        &onnx,
        OrtOptions {
            library: ort_lib(),
            device: Device::Cpu,
            threads: 1,
            topk_on: TopKMode::Host,
            sampling: None,
            k: 4,
            temperature: 1.0,
            vocab: cfg.vocab_size,
        },
    )
    .unwrap();
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

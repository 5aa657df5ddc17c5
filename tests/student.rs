//! The student model: forward pass against the independent f64 reference (`llama_ref.rs`),
//! a finite-difference gradient check through the whole model, and the Hugging Face
//! checkpoint layout.

use crate::llama_ref::{RefConfig, forward as ref_forward};
use crate::util::*;
use burn::backend::{Autodiff, Flex};
use burn::module::AutodiffModule;
use burn::prelude::*;
use logitcache::student::arch::StudentConfig;
use logitcache::student::checkpoint::{hf_tensors, load_hf, read_safetensors, save_safetensors};
use logitcache::student::model::Llama;
use std::collections::HashMap;

type B = Flex;
type AB = Autodiff<Flex>;

fn tiny(tied: bool) -> StudentConfig {
    StudentConfig {
        name: "tiny".into(),
        hidden_size: 16,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        intermediate_size: 24,
        vocab_size: 37,
        max_position_embeddings: 64,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: tied,
    }
}

/// Random HF weights (f64) for `cfg`, with names and shapes from the model itself.
pub(crate) fn random_weights(
    cfg: &StudentConfig,
    seed: u64,
) -> HashMap<String, (Vec<usize>, Vec<f64>)> {
    let model = Llama::<B>::init(cfg, 0, &Default::default());
    let mut s = seed | 1;
    let mut r = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    };
    hf_tensors(&model)
        .into_iter()
        .map(|(n, (shape, v))| {
            let vals = if n.ends_with("layernorm.weight") || n == "model.norm.weight" {
                v.iter().map(|_| 1.0 + 0.3 * r()).collect()
            } else {
                v.iter().map(|_| 0.4 * r()).collect()
            };
            (n, (shape, vals))
        })
        .collect()
}

pub(crate) fn to_f32(
    w: &HashMap<String, (Vec<usize>, Vec<f64>)>,
) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    w.iter()
        .map(|(n, (s, v))| {
            (
                n.clone(),
                (s.clone(), v.iter().map(|&x| x as f32).collect()),
            )
        })
        .collect()
}

#[test]
fn checkpoint_names_and_shapes_follow_the_hf_layout() {
    for tied in [false, true] {
        let cfg = tiny(tied);
        let model = Llama::<B>::init(&cfg, 3, &Default::default());
        let t = hf_tensors(&model);
        let mut want: Vec<(String, Vec<usize>)> = vec![
            ("model.embed_tokens.weight".into(), vec![37, 16]),
            ("model.norm.weight".into(), vec![16]),
        ];
        if !tied {
            want.push(("lm_head.weight".into(), vec![37, 16]));
        }
        for i in 0..2 {
            let p = |n: &str| format!("model.layers.{i}.{n}");
            want.extend([
                (p("input_layernorm.weight"), vec![16]),
                (p("post_attention_layernorm.weight"), vec![16]),
                (p("self_attn.q_proj.weight"), vec![16, 16]),
                (p("self_attn.k_proj.weight"), vec![8, 16]),
                (p("self_attn.v_proj.weight"), vec![8, 16]),
                (p("self_attn.o_proj.weight"), vec![16, 16]),
                (p("mlp.gate_proj.weight"), vec![24, 16]),
                (p("mlp.up_proj.weight"), vec![24, 16]),
                (p("mlp.down_proj.weight"), vec![16, 24]),
            ]);
        }
        want.sort();
        let got: Vec<(String, Vec<usize>)> =
            t.iter().map(|(n, (s, _))| (n.clone(), s.clone())).collect();
        assert_eq!(got, want);
        assert_eq!(
            t.values().map(|(_, v)| v.len()).sum::<usize>(),
            cfg.num_params()
        );
        // safetensors round trip, with the metadata transformers requires.
        let path = shared_dir().join(format!("tiny-{tied}.safetensors"));
        save_safetensors(&model, &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(
            meta.metadata()
                .as_ref()
                .unwrap()
                .get("format")
                .map(String::as_str),
            Some("pt")
        );
        let back = read_safetensors(&path).unwrap();
        let reloaded = load_hf(
            Llama::<B>::init(&cfg, 99, &Default::default()),
            &back,
            &path,
        )
        .unwrap();
        assert_eq!(hf_tensors(&reloaded), t);
        // Read tensor by tensor from the file: a truncated or foreign file is named, with why.
        let cut = shared_dir().join(format!("tiny-{tied}-cut.safetensors"));
        std::fs::write(&cut, &bytes[..bytes.len() - 3]).unwrap();
        let e = read_safetensors(&cut).unwrap_err().to_string();
        assert!(
            e.contains("tiny-") && e.contains("damaged or truncated"),
            "{e}"
        );
        std::fs::write(&cut, b"{\"not\": \"safetensors\"}").unwrap();
        let e = read_safetensors(&cut).unwrap_err().to_string();
        assert!(e.contains("not a safetensors file"), "{e}");
    }
}

#[test]
fn forward_matches_the_f64_reference_with_and_without_padding() {
    for tied in [false, true] {
        let cfg = tiny(tied);
        let w = random_weights(&cfg, 11 + tied as u64);
        let model = load_hf(
            Llama::<B>::init(&cfg, 0, &Default::default()),
            &to_f32(&w),
            std::path::Path::new("test"),
        )
        .unwrap();
        let rc = RefConfig {
            hidden: 16,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            intermediate: 24,
            vocab: 37,
            theta: 10_000.0,
            eps: 1e-5,
            tied,
        };
        let wr: HashMap<String, Vec<f64>> =
            w.iter().map(|(n, (_, v))| (n.clone(), v.clone())).collect();
        // Two sequences, the second right-padded.
        let seqs: [&[u32]; 2] = [&[1, 5, 9, 2, 30, 7, 7, 3], &[4, 36, 8, 0, 0, 0, 0, 0]];
        let lens = [8usize, 3];
        let ids: Vec<i64> = seqs
            .iter()
            .flat_map(|s| s.iter().map(|&t| t as i64))
            .collect();
        let mask: Vec<f32> = lens
            .iter()
            .flat_map(|&n| (0..8).map(move |j| if j < n { 1.0 } else { 0.0 }))
            .collect();
        let dev = Default::default();
        let logits = model.forward(
            Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [16]), &dev).reshape([2, 8]),
            Tensor::<B, 1>::from_data(TensorData::new(mask, [16]), &dev).reshape([2, 8]),
        );
        let got: Vec<f32> = logits.into_data().convert::<f32>().into_vec().unwrap();
        let mut max_diff = 0f64;
        for (b, s) in seqs.iter().enumerate() {
            let m: Vec<bool> = (0..8).map(|j| j < lens[b]).collect();
            let want = ref_forward(&rc, &wr, s, &m);
            for t in 0..lens[b] {
                for v in 0..37 {
                    max_diff = max_diff.max((got[(b * 8 + t) * 37 + v] as f64 - want[t][v]).abs());
                }
            }
        }
        assert!(
            max_diff <= 1e-4,
            "tied={tied}: max |burn - f64 reference| = {max_diff}"
        );
    }
}

#[test]
fn gradients_through_the_whole_model_match_finite_differences() {
    let cfg = tiny(false);
    let w = to_f32(&random_weights(&cfg, 5));
    let dev = Default::default();
    let ids =
        Tensor::<AB, 1, Int>::from_data(TensorData::new(vec![1i64, 5, 9, 2, 30, 7], [6]), &dev)
            .reshape([1, 6]);
    let mask = Tensor::<AB, 2>::ones([1, 6], &dev);
    let targets: Vec<usize> = vec![5, 9, 2, 30, 7, 1];
    // Loss: mean next-token cross-entropy, computed by the model's own ops.
    let loss_of = |w: &HashMap<String, (Vec<usize>, Vec<f32>)>| -> f64 {
        let m = load_hf(
            Llama::<B>::init(&cfg, 0, &Default::default()),
            w,
            std::path::Path::new("t"),
        )
        .unwrap();
        let l = m.forward(ids.clone().inner(), mask.clone().inner());
        let v: Vec<f32> = l.into_data().convert::<f32>().into_vec().unwrap();
        let mut total = 0f64;
        for (t, &y) in targets.iter().enumerate() {
            let row: Vec<f64> = v[t * 37..(t + 1) * 37].iter().map(|&x| x as f64).collect();
            let mx = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = mx + row.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
            total += lse - row[y];
        }
        total / targets.len() as f64
    };
    let model = load_hf(
        Llama::<AB>::init(&cfg, 0, &dev),
        &w,
        std::path::Path::new("t"),
    )
    .unwrap();
    let logits = model.forward(ids.clone(), mask.clone()).reshape([6, 37]);
    let tgt = Tensor::<AB, 1, Int>::from_data(
        TensorData::new(targets.iter().map(|&t| t as i64).collect::<Vec<_>>(), [6]),
        &dev,
    );
    let loss = logitcache::loss::cross_entropy(logits, tgt).mean();
    let grads = loss.backward();
    let gp = burn::optim::GradientsParams::from_grads(grads, &model);
    let analytic = |name: &str, model: &Llama<AB>| -> Vec<f32> {
        // Read gradients in HF layout through a model whose params hold the gradients.
        let gm = model.clone().map(&mut GradSwap { grads: &gp });
        hf_tensors(&gm.valid())[name].1.clone()
    };
    for (name, idx) in [
        ("model.layers.0.self_attn.q_proj.weight", 17usize),
        ("model.layers.1.self_attn.k_proj.weight", 40),
        ("model.layers.0.mlp.down_proj.weight", 100),
        ("model.layers.1.input_layernorm.weight", 3),
        ("model.embed_tokens.weight", 5 * 16 + 2),
        ("lm_head.weight", 9 * 16 + 4),
        ("model.norm.weight", 7),
    ] {
        let g = analytic(name, &model)[idx] as f64;
        let h = 1e-2f32;
        let mut plus = w.clone();
        plus.get_mut(name).unwrap().1[idx] += h;
        let mut minus = w.clone();
        minus.get_mut(name).unwrap().1[idx] -= h;
        let fd = (loss_of(&plus) - loss_of(&minus)) / (2.0 * h as f64);
        assert!(
            (g - fd).abs() <= 2e-3 + 3e-2 * fd.abs(),
            "{name}[{idx}]: autodiff {g} vs finite difference {fd}"
        );
        assert!(g != 0.0, "{name}[{idx}] got no gradient");
    }
}

/// Replaces every parameter's value with its gradient (for reading gradients by HF name).
struct GradSwap<'a> {
    grads: &'a burn::optim::GradientsParams,
}

impl burn::module::ModuleMapper<AB> for GradSwap<'_> {
    fn map_float<const D: usize>(
        &mut self,
        p: burn::module::Param<Tensor<AB, D>>,
    ) -> burn::module::Param<Tensor<AB, D>> {
        let (id, old, mapper) = p.consume();
        let g = self
            .grads
            .get::<Flex, D>(id)
            .map(Tensor::<AB, D>::from_inner)
            .unwrap_or_else(|| old.zeros_like());
        burn::module::Param::from_mapped_value(id, g, mapper)
    }
}

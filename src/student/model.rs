//! The student: a Llama-style decoder (RMSNorm, rotary embeddings with Hugging Face's
//! `rotate_half` layout, grouped-query causal attention, SwiGLU MLP, optional tied
//! embeddings), generic over the burn backend so CPU tests and GPU runs share all code.
//!
//! Projection weights are stored `[in, out]` (burn's `x @ W`); the checkpoint writer
//! transposes them to Hugging Face's `[out, in]`. Parameter paths map one to one onto HF
//! names (see [`hf_name`]).

use super::arch::StudentConfig;
use crate::rng::SplitMix;
use burn::module::Param;
use burn::prelude::*;
use burn::tensor::activation::{silu, softmax};

/// Standard deviation of the initial weights (HF `initializer_range`).
pub const INIT_STD: f64 = 0.02;

#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let ms = x.clone().powi_scalar(2).mean_dim(2);
        x * (ms + self.eps).sqrt().recip() * self.weight.val().unsqueeze::<3>()
    }
}

#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    pub q_proj: Param<Tensor<B, 2>>,
    pub k_proj: Param<Tensor<B, 2>>,
    pub v_proj: Param<Tensor<B, 2>>,
    pub o_proj: Param<Tensor<B, 2>>,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    pub gate_proj: Param<Tensor<B, 2>>,
    pub up_proj: Param<Tensor<B, 2>>,
    pub down_proj: Param<Tensor<B, 2>>,
}

#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    pub input_layernorm: RmsNorm<B>,
    pub self_attn: Attention<B>,
    pub post_attention_layernorm: RmsNorm<B>,
    pub mlp: Mlp<B>,
}

#[derive(Module, Debug)]
pub struct Llama<B: Backend> {
    pub embed_tokens: Param<Tensor<B, 2>>,
    pub layers: Vec<DecoderLayer<B>>,
    pub norm: RmsNorm<B>,
    /// `[hidden, vocab]`; absent when the embeddings are tied.
    pub lm_head: Option<Param<Tensor<B, 2>>>,
    pub rope_theta: f64,
}

fn mm<B: Backend>(x: Tensor<B, 3>, w: &Param<Tensor<B, 2>>) -> Tensor<B, 3> {
    x.matmul(w.val().unsqueeze::<3>())
}

/// Deterministic normal draws (Box-Muller over SplitMix), so initial weights depend only on
/// the seed, not on the backend's RNG.
fn normal(rng: &mut SplitMix, n: usize, std: f64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u1 = ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            let u2 = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * std) as f32
        })
        .collect()
}

fn param2<B: Backend>(v: Vec<f32>, shape: [usize; 2], dev: &B::Device) -> Param<Tensor<B, 2>> {
    Param::from_tensor(Tensor::from_data(TensorData::new(v, shape), dev))
}

fn norm<B: Backend>(d: usize, eps: f64, dev: &B::Device) -> RmsNorm<B> {
    RmsNorm {
        weight: Param::from_tensor(Tensor::ones([d], dev)),
        eps,
    }
}

impl<B: Backend> Llama<B> {
    /// A freshly initialised student (HF initialisation: normal(0, 0.02), norms at 1).
    pub fn init(cfg: &StudentConfig, seed: u64, dev: &B::Device) -> Self {
        let mut rng = SplitMix::new(seed);
        let (d, v, i) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
        let hd = cfg.head_dim();
        let kv = cfg.num_key_value_heads * hd;
        let mut w = |shape: [usize; 2]| {
            param2::<B>(normal(&mut rng, shape[0] * shape[1], INIT_STD), shape, dev)
        };
        let embed_tokens = w([v, d]);
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| DecoderLayer {
                input_layernorm: norm(d, cfg.rms_norm_eps, dev),
                self_attn: Attention {
                    q_proj: w([d, d]),
                    k_proj: w([d, kv]),
                    v_proj: w([d, kv]),
                    o_proj: w([d, d]),
                    heads: cfg.num_attention_heads,
                    kv_heads: cfg.num_key_value_heads,
                    head_dim: hd,
                },
                post_attention_layernorm: norm(d, cfg.rms_norm_eps, dev),
                mlp: Mlp {
                    gate_proj: w([d, i]),
                    up_proj: w([d, i]),
                    down_proj: w([i, d]),
                },
            })
            .collect();
        let lm_head = (!cfg.tie_word_embeddings).then(|| w([d, v]));
        Llama {
            embed_tokens,
            layers,
            norm: norm(d, cfg.rms_norm_eps, dev),
            lm_head,
            rope_theta: cfg.rope_theta,
        }
    }

    /// cos and sin tables `[batch, 1, len, head_dim]` for `positions` `[batch, len]`, in the
    /// `rotate_half` layout (frequencies repeated over the two halves).
    fn rope_tables(
        &self,
        positions: &Tensor<B, 2, Int>,
        head_dim: usize,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let [b, l] = positions.dims();
        let dev = positions.device();
        let half = head_dim / 2;
        let inv: Vec<f32> = (0..head_dim)
            .map(|j| {
                (1.0 / self
                    .rope_theta
                    .powf(2.0 * (j % half) as f64 / head_dim as f64)) as f32
            })
            .collect();
        let inv = Tensor::<B, 1>::from_data(TensorData::new(inv, [head_dim]), &dev);
        let ang = positions.clone().float().reshape([b, l, 1]) * inv.reshape([1, 1, head_dim]);
        (
            ang.clone().cos().unsqueeze_dim::<4>(1),
            ang.sin().unsqueeze_dim::<4>(1),
        )
    }

    /// Hidden states after the final norm, `[batch, len, hidden]`. `attention_mask` is 1 at
    /// real tokens, 0 at padding; positions follow HF (`cumsum(mask) - 1`).
    pub fn hidden(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Tensor<B, 2>,
    ) -> Tensor<B, 3> {
        let [b, l] = input_ids.dims();
        let dev = input_ids.device();
        let d = self.embed_tokens.dims()[1];
        let mut x = self
            .embed_tokens
            .val()
            .select(0, input_ids.reshape([b * l]))
            .reshape([b, l, d]);
        let positions = (attention_mask.clone().cumsum(1) - 1.0)
            .clamp_min(0.0)
            .int();
        let att = &self.layers.first().map(|layer| &layer.self_attn);
        let head_dim = att.map(|a| a.head_dim).unwrap_or(2);
        let (cos, sin) = self.rope_tables(&positions, head_dim);
        // true = masked: future keys and padding keys.
        let causal = Tensor::<B, 2, Bool>::tril_mask([l, l], 0, &dev)
            .unsqueeze::<4>()
            .expand([b, 1, l, l]);
        let pad = attention_mask
            .lower_elem(0.5)
            .reshape([b, 1, 1, l])
            .expand([b, 1, l, l]);
        let mask = causal.bool_or(pad);
        for layer in &self.layers {
            let h = layer.input_layernorm.forward(x.clone());
            x = x + layer.self_attn.forward(h, &cos, &sin, &mask);
            let h = layer.post_attention_layernorm.forward(x.clone());
            x = x + layer.mlp.forward(h);
        }
        self.norm.forward(x)
    }

    /// The output projection as `[hidden, vocab]`.
    pub fn head_weight(&self) -> Tensor<B, 2> {
        match &self.lm_head {
            Some(w) => w.val(),
            None => self.embed_tokens.val().transpose(),
        }
    }

    /// Logits `[batch, len, vocab]`.
    pub fn forward(
        &self,
        input_ids: Tensor<B, 2, Int>,
        attention_mask: Tensor<B, 2>,
    ) -> Tensor<B, 3> {
        let h = self.hidden(input_ids, attention_mask);
        h.matmul(self.head_weight().unsqueeze::<3>())
    }

    pub fn vocab_size(&self) -> usize {
        self.embed_tokens.dims()[0]
    }
}

fn rotate_half<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let hd = x.dims()[3];
    let x1 = x.clone().narrow(3, 0, hd / 2);
    let x2 = x.narrow(3, hd / 2, hd / 2);
    Tensor::cat(vec![x2.neg(), x1], 3)
}

impl<B: Backend> Attention<B> {
    fn forward(
        &self,
        h: Tensor<B, 3>,
        cos: &Tensor<B, 4>,
        sin: &Tensor<B, 4>,
        mask: &Tensor<B, 4, Bool>,
    ) -> Tensor<B, 3> {
        let [b, l, d] = h.dims();
        let (nh, nkv, hd) = (self.heads, self.kv_heads, self.head_dim);
        let split = |x: Tensor<B, 3>, n: usize| x.reshape([b, l, n, hd]).swap_dims(1, 2);
        let q = split(mm(h.clone(), &self.q_proj), nh);
        let k = split(mm(h.clone(), &self.k_proj), nkv);
        let v = split(mm(h, &self.v_proj), nkv);
        let q = q.clone() * cos.clone() + rotate_half(q) * sin.clone();
        let k = k.clone() * cos.clone() + rotate_half(k) * sin.clone();
        let rep = nh / nkv;
        let expand = |x: Tensor<B, 4>| {
            if rep == 1 {
                x
            } else {
                x.unsqueeze_dim::<5>(2)
                    .expand([b, nkv, rep, l, hd])
                    .reshape([b, nh, l, hd])
            }
        };
        let (k, v) = (expand(k), expand(v));
        let scores = q.matmul(k.swap_dims(2, 3)) / (hd as f64).sqrt();
        let scores = scores.mask_fill(mask.clone().expand([b, nh, l, l]), -1e9);
        let att = softmax(scores, 3).matmul(v);
        mm(att.swap_dims(1, 2).reshape([b, l, d]), &self.o_proj)
    }
}

impl<B: Backend> Mlp<B> {
    fn forward(&self, h: Tensor<B, 3>) -> Tensor<B, 3> {
        let g = silu(mm(h.clone(), &self.gate_proj));
        mm(g * mm(h, &self.up_proj), &self.down_proj)
    }
}

/// The Hugging Face name of a parameter path (`layers.0.self_attn.q_proj`) and whether its
/// layout must be transposed (`[in, out]` → `[out, in]`).
pub fn hf_name(path: &str) -> (String, bool) {
    match path {
        "embed_tokens" => ("model.embed_tokens.weight".into(), false),
        "lm_head" => ("lm_head.weight".into(), true),
        p if p.ends_with(".weight") => (format!("model.{p}"), false),
        p => (format!("model.{p}.weight"), true),
    }
}

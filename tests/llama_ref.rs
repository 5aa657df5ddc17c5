//! An independent f64 implementation of the Hugging Face Llama forward pass
//! (`transformers/models/llama/modeling_llama.py`: RMSNorm, rotary embeddings with
//! `rotate_half`, grouped-query causal attention, SwiGLU MLP), written from the equations for
//! the tests. Weights use the Hugging Face names and layouts (`[out, in]` for projections).

use std::collections::HashMap;

pub struct RefConfig {
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub theta: f64,
    pub eps: f64,
    pub tied: bool,
}

fn rmsnorm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(a, b)| a * r * b).collect()
}

/// y = W x for W stored [out, in].
fn linear(w: &[f64], x: &[f64], out: usize) -> Vec<f64> {
    let n = x.len();
    (0..out)
        .map(|o| (0..n).map(|i| w[o * n + i] * x[i]).sum())
        .collect()
}

fn rope(x: &mut [f64], pos: usize, theta: f64) {
    let hd = x.len();
    let half = hd / 2;
    let orig = x.to_vec();
    for j in 0..hd {
        let f = (j % half) as f64;
        let inv = 1.0 / theta.powf(2.0 * f / hd as f64);
        let (s, c) = (pos as f64 * inv).sin_cos();
        // rotate_half(x) = cat(-x[half..], x[..half])
        let rot = if j < half {
            -orig[j + half]
        } else {
            orig[j - half]
        };
        x[j] = orig[j] * c + rot * s;
    }
}

/// Logits [len, vocab] for one sequence; `mask[j]` false marks padding keys; positions are
/// `cumsum(mask) - 1` (HF's convention for padded batches).
pub fn forward(
    cfg: &RefConfig,
    w: &HashMap<String, Vec<f64>>,
    ids: &[u32],
    mask: &[bool],
) -> Vec<Vec<f64>> {
    let (d, h, kvh) = (cfg.hidden, cfg.heads, cfg.kv_heads);
    let hd = d / h;
    let len = ids.len();
    let mut pos = vec![0usize; len];
    let mut c = 0usize;
    for t in 0..len {
        if mask[t] {
            c += 1;
        }
        pos[t] = c.saturating_sub(1);
    }
    let emb = &w["model.embed_tokens.weight"];
    let mut x: Vec<Vec<f64>> = ids
        .iter()
        .map(|&t| emb[t as usize * d..(t as usize + 1) * d].to_vec())
        .collect();
    for l in 0..cfg.layers {
        let p = |n: &str| &w[&format!("model.layers.{l}.{n}")];
        let hs: Vec<Vec<f64>> = x
            .iter()
            .map(|v| rmsnorm(v, p("input_layernorm.weight"), cfg.eps))
            .collect();
        let q: Vec<Vec<f64>> = hs
            .iter()
            .map(|v| linear(p("self_attn.q_proj.weight"), v, h * hd))
            .collect();
        let k: Vec<Vec<f64>> = hs
            .iter()
            .map(|v| linear(p("self_attn.k_proj.weight"), v, kvh * hd))
            .collect();
        let vv: Vec<Vec<f64>> = hs
            .iter()
            .map(|v| linear(p("self_attn.v_proj.weight"), v, kvh * hd))
            .collect();
        let mut q = q;
        let mut k = k;
        for t in 0..len {
            for hh in 0..h {
                rope(&mut q[t][hh * hd..(hh + 1) * hd], pos[t], cfg.theta);
            }
            for hh in 0..kvh {
                rope(&mut k[t][hh * hd..(hh + 1) * hd], pos[t], cfg.theta);
            }
        }
        let mut attn = vec![vec![0.0; h * hd]; len];
        for t in 0..len {
            for hh in 0..h {
                let g = hh / (h / kvh);
                let qv = &q[t][hh * hd..(hh + 1) * hd];
                let scores: Vec<Option<f64>> = (0..len)
                    .map(|s| {
                        (s <= t && mask[s]).then(|| {
                            let kv = &k[s][g * hd..(g + 1) * hd];
                            qv.iter().zip(kv).map(|(a, b)| a * b).sum::<f64>() / (hd as f64).sqrt()
                        })
                    })
                    .collect();
                let m = scores
                    .iter()
                    .flatten()
                    .cloned()
                    .fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().flatten().map(|s| (s - m).exp()).sum();
                for (s, sc) in scores.iter().enumerate() {
                    if let Some(sc) = sc {
                        let a = (sc - m).exp() / z;
                        for j in 0..hd {
                            attn[t][hh * hd + j] += a * vv[s][g * hd + j];
                        }
                    }
                }
            }
        }
        for t in 0..len {
            let o = linear(p("self_attn.o_proj.weight"), &attn[t], d);
            for j in 0..d {
                x[t][j] += o[j];
            }
            let hn = rmsnorm(&x[t], p("post_attention_layernorm.weight"), cfg.eps);
            let gate = linear(p("mlp.gate_proj.weight"), &hn, cfg.intermediate);
            let up = linear(p("mlp.up_proj.weight"), &hn, cfg.intermediate);
            let act: Vec<f64> = gate
                .iter()
                .zip(&up)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let down = linear(p("mlp.down_proj.weight"), &act, d);
            for j in 0..d {
                x[t][j] += down[j];
            }
        }
    }
    let head = if cfg.tied {
        &w["model.embed_tokens.weight"]
    } else {
        &w["lm_head.weight"]
    };
    x.iter()
        .map(|v| {
            linear(
                head,
                &rmsnorm(v, &w["model.norm.weight"], cfg.eps),
                cfg.vocab,
            )
        })
        .collect()
}

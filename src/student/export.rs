//! A trained student as an ONNX model with the interface the teacher stage consumes
//! (`input_ids`, `attention_mask` → `logits` f32 `[batch, seq, vocab]`), built from its
//! Hugging Face weights with the same [`GraphBuilder`] as the toy teachers and the top-k head.
//! It lives with the student (it reads student types) and uses [`crate::onnx`] only as a
//! graph-writing library, so `onnx` knows nothing of students.
//!
//! ```no_run
//! use logitcache::student::{checkpoint::RunCheckpoint, export::llama_onnx};
//! # fn main() -> anyhow::Result<()> {
//! let run = RunCheckpoint::open("runs/micro".as_ref())?;
//! let bytes = llama_onnx(&run.student, &run.weights()?, false)?;
//! std::fs::write("micro.onnx", bytes)?;
//! # Ok(())
//! # }
//! ```
//!
//! The graph follows [`super::model::Llama`] op for op: position ids are derived
//! from the mask as Hugging Face does (`cumsum(mask) - 1`, clipped at 0), rotary embeddings
//! use the `rotate_half` layout, masked attention scores are *replaced* by -1e9 (as burn's
//! `mask_fill`), grouped-query heads are repeated, the MLP is SwiGLU. Attention runs over
//! blocks of [`ATTENTION_BLOCK`] queries (a `Scan` per layer), so only one block's scores
//! exist at a time; each row's softmax is the same computation as over the whole matrix. With `fp16` the
//! weights are stored as float16 (half the file) and cast to float32 inside the graph, so
//! the CPU execution provider runs it and the logits stay float32.

use super::arch::StudentConfig;
use super::checkpoint::HfTensor;
use crate::onnx::builder::{Dim, GraphBuilder, attr_graph, attr_int, attr_ints, tensor_raw};
use crate::onnx::proto::data_type;
use anyhow::Context;
use prost::Message;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("the checkpoint has no tensor {0}; it does not match its config.json")]
    Missing(String),
    #[error("tensor {name} has shape {got:?}, the config says {want:?}")]
    Shape {
        name: String,
        got: Vec<usize>,
        want: Vec<usize>,
    },
}

/// The checkpoint's tensors, each taken out (and freed once in the graph) as the graph is
/// built, so the export holds about one copy of the weights rather than two.
struct Weights {
    src: HashMap<String, HfTensor>,
    fp16: bool,
}

impl Weights {
    fn take(&mut self, name: &str, want: &[usize]) -> Result<Vec<f32>, ExportError> {
        let (shape, values) = self
            .src
            .remove(name)
            .ok_or_else(|| ExportError::Missing(name.into()))?;
        if shape != want {
            return Err(ExportError::Shape {
                name: name.into(),
                got: shape,
                want: want.to_vec(),
            });
        }
        Ok(values)
    }

    /// Adds `values` (shape `dims`) as an initializer, float16 + Cast when asked.
    fn add(&self, g: &mut GraphBuilder, name: &str, dims: &[usize], values: &[f32]) -> String {
        let d: Vec<i64> = dims.iter().map(|&x| x as i64).collect();
        if self.fp16 {
            let raw = values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect();
            let h = g.init(tensor_raw(name, data_type::FLOAT16, &d, raw));
            g.node("Cast", &[&h], vec![attr_int("to", data_type::FLOAT as i64)])
        } else {
            g.init_f32(name, &d, values)
        }
    }

    /// A vector (norm weight) as is.
    fn vector(
        &mut self,
        g: &mut GraphBuilder,
        name: &str,
        n: usize,
    ) -> Result<String, ExportError> {
        let v = self.take(name, &[n])?;
        Ok(self.add(g, name, &[n], &v))
    }

    /// A Hugging Face `[out, in]` projection as an `[in, out]` MatMul operand.
    fn proj(
        &mut self,
        g: &mut GraphBuilder,
        name: &str,
        out: usize,
        inp: usize,
    ) -> Result<String, ExportError> {
        let v = self.take(name, &[out, inp])?;
        let mut t = vec![0f32; v.len()];
        for o in 0..out {
            for i in 0..inp {
                t[i * out + o] = v[o * inp + i];
            }
        }
        drop(v);
        Ok(self.add(g, name, &[inp, out], &t))
    }
}

/// RMSNorm over the last axis: `x / sqrt(mean(x²) + eps) * w`.
fn rms_norm(g: &mut GraphBuilder, x: &str, w: &str, eps: &str) -> String {
    let sq = g.node("Mul", &[x, x], vec![]);
    let ms = g.node(
        "ReduceMean",
        &[&sq],
        vec![attr_ints("axes", &[-1]), attr_int("keepdims", 1)],
    );
    let ms = g.node("Add", &[&ms, eps], vec![]);
    let r = g.node("Sqrt", &[&ms], vec![]);
    let r = g.node("Reciprocal", &[&r], vec![]);
    let y = g.node("Mul", &[x, &r], vec![]);
    g.node("Mul", &[&y, w], vec![])
}

/// `[b, l, n·hd]` → `[b, n, l, hd]`.
fn heads(g: &mut GraphBuilder, x: &str, n: usize, hd: usize) -> String {
    let shape = g.init_i64("heads_shape", &[4], &[0, 0, n as i64, hd as i64]);
    let r = g.node("Reshape", &[x, &shape], vec![]);
    g.node("Transpose", &[&r], vec![attr_ints("perm", &[0, 2, 1, 3])])
}

/// `x·cos + rotate_half(x)·sin` on `[b, h, l, hd]`.
fn rope(g: &mut GraphBuilder, x: &str, cos: &str, sin: &str, hd: usize) -> String {
    let split = g.init_i64("rope_split", &[2], &[hd as i64 / 2; 2]);
    let halves = g.node_n("Split", &[x, &split], 2, vec![attr_int("axis", -1)]);
    let neg = g.node("Neg", &[&halves[1]], vec![]);
    let rot = g.node("Concat", &[&neg, &halves[0]], vec![attr_int("axis", -1)]);
    let a = g.node("Mul", &[x, cos], vec![]);
    let b = g.node("Mul", &[&rot, sin], vec![]);
    g.node("Add", &[&a, &b], vec![])
}

/// Queries per attention block: scores take `batch × heads × ATTENTION_BLOCK × seq_len × 4`
/// bytes at a time (134 MB for two 2048-token windows of a 32-head model, where the whole
/// `[l, l]` scores took 1 GB per tensor).
pub const ATTENTION_BLOCK: usize = 256;

/// One block of queries' attention, the body of the per-layer `Scan`: inputs one block of
/// queries `[b, h, block, hd]` and their positions `[block]`, output `[b, h, block, hd]`;
/// keys, values and masks are the layer's (outer-scope values).
struct AttentionBlock<'a> {
    kt: &'a str,
    v: &'a str,
    cols: &'a str,
    pad: &'a str,
    scale: &'a str,
    neg_big: &'a str,
    axes_last: &'a str,
    heads: usize,
    head_dim: usize,
}

impl AttentionBlock<'_> {
    fn body(&self, parent: &GraphBuilder, layer: usize) -> crate::onnx::proto::GraphProto {
        let name = format!("attn{layer}");
        let mut b = parent.subgraph(&name);
        let dims = [
            Dim::sym("batch_size"),
            Dim::Fixed(self.heads as i64),
            Dim::sym("block"),
            Dim::Fixed(self.head_dim as i64),
        ];
        let q = b.input(&format!("{name}_q"), data_type::FLOAT, &dims);
        let rows = b.input(
            &format!("{name}_rows"),
            data_type::INT64,
            &[Dim::sym("block")],
        );
        // True where the key is in the future or padding: [b, 1, block, l].
        let r = b.node("Unsqueeze", &[&rows, self.axes_last], vec![]);
        let future = b.node("Greater", &[self.cols, &r], vec![]);
        let blocked = b.node("Or", &[&future, self.pad], vec![]);
        let s = b.node("MatMul", &[&q, self.kt], vec![]);
        let s = b.node("Mul", &[&s, self.scale], vec![]);
        let s = b.node("Where", &[&blocked, self.neg_big, &s], vec![]);
        let a = b.node("Softmax", &[&s], vec![attr_int("axis", -1)]);
        let o = b.node("MatMul", &[&a, self.v], vec![]);
        b.output_as(&o, &format!("{name}_out"), data_type::FLOAT, &dims);
        b.finish_graph()
    }
}

/// Builds the ONNX model of a student from its Hugging Face weights (as
/// [`super::checkpoint::read_safetensors`] returns them), serialized as one file.
pub fn llama_onnx(
    cfg: &StudentConfig,
    weights: &HashMap<String, HfTensor>,
    fp16: bool,
) -> Result<Vec<u8>, ExportError> {
    Ok(llama_model(cfg, weights.clone(), fp16)?.encode_to_vec())
}

/// [`llama_onnx`]'s model before serialization (to move its weights to external data, see
/// [`write_onnx`]). It consumes the weights, freeing each tensor once it is in the graph.
pub fn llama_model(
    cfg: &StudentConfig,
    weights: HashMap<String, HfTensor>,
    fp16: bool,
) -> Result<crate::onnx::proto::ModelProto, ExportError> {
    let mut w = Weights { src: weights, fp16 };
    let (d, v, im) = (cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size);
    let (nh, nkv, hd) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim(),
    );
    let kv = nkv * hd;
    let mut g = GraphBuilder::new("logitcache_student");
    g.metadata("logitcache.student", &cfg.name);
    g.metadata("logitcache.params", &cfg.num_params().to_string());
    g.metadata(
        "logitcache.weights",
        if fp16 { "float16" } else { "float32" },
    );
    let bs = [Dim::sym("batch_size"), Dim::sym("sequence_length")];
    let ids = g.input("input_ids", data_type::INT64, &bs);
    let mask = g.input("attention_mask", data_type::INT64, &bs);

    let emb_v = w.take("model.embed_tokens.weight", &[v, d])?;
    let embed = w.add(&mut g, "model.embed_tokens.weight", &[v, d], &emb_v);
    drop(emb_v);
    let mut x = g.node("Gather", &[&embed, &ids], vec![attr_int("axis", 0)]);

    // Positions (HF): cumsum(mask) - 1, clipped at 0.
    let axis1 = g.init_i64("axis1", &[], &[1]);
    let one_i = g.init_i64("one_i", &[], &[1]);
    let zero_i = g.init_i64("zero_i", &[], &[0]);
    let pos = g.node("CumSum", &[&mask, &axis1], vec![]);
    let pos = g.node("Sub", &[&pos, &one_i], vec![]);
    let pos = g.node("Max", &[&pos, &zero_i], vec![]);
    let pos = g.node(
        "Cast",
        &[&pos],
        vec![attr_int("to", data_type::FLOAT as i64)],
    );
    let axes_last = g.init_i64("axes_last", &[1], &[-1]);
    let pos = g.node("Unsqueeze", &[&pos, &axes_last], vec![]);
    let half = hd / 2;
    let inv: Vec<f32> = (0..hd)
        .map(|j| (1.0 / cfg.rope_theta.powf(2.0 * (j % half) as f64 / hd as f64)) as f32)
        .collect();
    let inv = g.init_f32("rope_inv_freq", &[hd as i64], &inv);
    let ang = g.node("Mul", &[&pos, &inv], vec![]);
    let axes1 = g.init_i64("axes1", &[1], &[1]);
    let cos = g.node("Cos", &[&ang], vec![]);
    let cos = g.node("Unsqueeze", &[&cos, &axes1], vec![]);
    let sin = g.node("Sin", &[&ang], vec![]);
    let sin = g.node("Unsqueeze", &[&sin, &axes1], vec![]);

    // Attention runs over blocks of at most ATTENTION_BLOCK queries (a Scan over the
    // blocks), so one block's scores [b, heads, block, l] exist at a time instead of all
    // [b, heads, l, l]. The queries are padded to whole blocks; the padded rows are dropped.
    let shape = g.node("Shape", &[&ids], vec![]);
    let len = g.node("Gather", &[&shape, &one_i], vec![attr_int("axis", 0)]);
    let block_max = g.init_i64("attn_block", &[], &[ATTENTION_BLOCK as i64]);
    let block = g.node("Min", &[&len, &block_max], vec![]);
    let blocks = g.node("Add", &[&len, &block], vec![]);
    let blocks = g.node("Sub", &[&blocks, &one_i], vec![]);
    let blocks = g.node("Div", &[&blocks, &block], vec![]);
    let padded = g.node("Mul", &[&blocks, &block], vec![]);
    let extra = g.node("Sub", &[&padded, &len], vec![]);
    let axes0 = g.init_i64("axes0", &[1], &[0]);
    let (len1, block1, blocks1, extra1) = (
        g.node("Unsqueeze", &[&len, &axes0], vec![]),
        g.node("Unsqueeze", &[&block, &axes0], vec![]),
        g.node("Unsqueeze", &[&blocks, &axes0], vec![]),
        g.node("Unsqueeze", &[&extra, &axes0], vec![]),
    );
    // Each block's query positions [blocks, block], scanned with the queries.
    let rows = g.node("Range", &[&zero_i, &padded, &one_i], vec![]);
    let rows_shape = g.node("Concat", &[&blocks1, &block1], vec![attr_int("axis", 0)]);
    let rows = g.node("Reshape", &[&rows, &rows_shape], vec![]);
    // Key positions [1, l] and padded keys [b, 1, 1, l]: a block's mask is built from them.
    let range = g.node("Range", &[&zero_i, &len, &one_i], vec![]);
    let cols = g.node("Unsqueeze", &[&range, &axes0], vec![]);
    let pad = g.node("Equal", &[&mask, &zero_i], vec![]);
    let axes12 = g.init_i64("axes12", &[2], &[1, 2]);
    let pad = g.node("Unsqueeze", &[&pad, &axes12], vec![]);
    let zeros6 = g.init_i64("pads_lead", &[6], &[0; 6]);
    let zero1 = g.init_i64("zero1", &[1], &[0]);
    let q_pads = g.node(
        "Concat",
        &[&zeros6, &extra1, &zero1],
        vec![attr_int("axis", 0)],
    );
    let lead = g.init_i64("lead_dims", &[2], &[0, 0]);
    let hd1 = g.init_i64("head_dim1", &[1], &[hd as i64]);
    let q_blocks_shape = g.node(
        "Concat",
        &[&lead, &blocks1, &block1, &hd1],
        vec![attr_int("axis", 0)],
    );
    let heads_back = g.init_i64("heads_back", &[4], &[0, 0, -1, hd as i64]);
    let neg_big = g.init_f32("neg_big", &[], &[-1e9]);
    let scale = g.init_f32("attn_scale", &[], &[1.0 / (hd as f32).sqrt()]);
    let merge = g.init_i64("merge_shape", &[3], &[0, 0, d as i64]);
    let rep = nh / nkv;
    let rep_shape = g.init_i64("rep_shape", &[4], &[0, nh as i64, -1, hd as i64]);
    let axes2 = g.init_i64("axes2", &[1], &[2]);
    let eps = g.init_f32("rms_eps", &[], &[cfg.rms_norm_eps as f32]);

    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let ln1 = w.vector(&mut g, &format!("{p}.input_layernorm.weight"), d)?;
        let ln2 = w.vector(&mut g, &format!("{p}.post_attention_layernorm.weight"), d)?;
        let wq = w.proj(&mut g, &format!("{p}.self_attn.q_proj.weight"), d, d)?;
        let wk = w.proj(&mut g, &format!("{p}.self_attn.k_proj.weight"), kv, d)?;
        let wv = w.proj(&mut g, &format!("{p}.self_attn.v_proj.weight"), kv, d)?;
        let wo = w.proj(&mut g, &format!("{p}.self_attn.o_proj.weight"), d, d)?;
        let wg = w.proj(&mut g, &format!("{p}.mlp.gate_proj.weight"), im, d)?;
        let wu = w.proj(&mut g, &format!("{p}.mlp.up_proj.weight"), im, d)?;
        let wd = w.proj(&mut g, &format!("{p}.mlp.down_proj.weight"), d, im)?;

        let h = rms_norm(&mut g, &x, &ln1, &eps);
        let q = g.node("MatMul", &[&h, &wq], vec![]);
        let k = g.node("MatMul", &[&h, &wk], vec![]);
        let vv = g.node("MatMul", &[&h, &wv], vec![]);
        let q = heads(&mut g, &q, nh, hd);
        let mut k = heads(&mut g, &k, nkv, hd);
        let mut vv = heads(&mut g, &vv, nkv, hd);
        let q = rope(&mut g, &q, &cos, &sin, hd);
        k = rope(&mut g, &k, &cos, &sin, hd);
        if rep > 1 {
            // [b, kv, l, hd] → [b, kv, rep, l, hd] → [b, heads, l, hd]
            for t in [&mut k, &mut vv] {
                let u = g.node("Unsqueeze", &[t.as_str(), &axes2], vec![]);
                let copies: Vec<&str> = (0..rep).map(|_| u.as_str()).collect();
                let c = g.node("Concat", &copies, vec![attr_int("axis", 2)]);
                *t = g.node("Reshape", &[&c, &rep_shape], vec![]);
            }
        }
        let kt = g.node("Transpose", &[&k], vec![attr_ints("perm", &[0, 1, 3, 2])]);
        // [b, h, l, hd] → [blocks, b, h, block, hd], attention per block, and back.
        let qb = g.node("Pad", &[&q, &q_pads], vec![]);
        let qb = g.node("Reshape", &[&qb, &q_blocks_shape], vec![]);
        let qb = g.node(
            "Transpose",
            &[&qb],
            vec![attr_ints("perm", &[2, 0, 1, 3, 4])],
        );
        let body = AttentionBlock {
            kt: &kt,
            v: &vv,
            cols: &cols,
            pad: &pad,
            scale: &scale,
            neg_big: &neg_big,
            axes_last: &axes_last,
            heads: nh,
            head_dim: hd,
        }
        .body(&g, i);
        let o = g.node(
            "Scan",
            &[&qb, &rows],
            vec![attr_graph("body", body), attr_int("num_scan_inputs", 2)],
        );
        let o = g.node(
            "Transpose",
            &[&o],
            vec![attr_ints("perm", &[1, 2, 0, 3, 4])],
        );
        let o = g.node("Reshape", &[&o, &heads_back], vec![]);
        let o = g.node("Slice", &[&o, &zero1, &len1, &axes2], vec![]);
        let o = g.node("Transpose", &[&o], vec![attr_ints("perm", &[0, 2, 1, 3])]);
        let o = g.node("Reshape", &[&o, &merge], vec![]);
        let o = g.node("MatMul", &[&o, &wo], vec![]);
        x = g.node("Add", &[&x, &o], vec![]);

        let h = rms_norm(&mut g, &x, &ln2, &eps);
        let gate = g.node("MatMul", &[&h, &wg], vec![]);
        let sg = g.node("Sigmoid", &[&gate], vec![]);
        let gate = g.node("Mul", &[&gate, &sg], vec![]);
        let up = g.node("MatMul", &[&h, &wu], vec![]);
        let m = g.node("Mul", &[&gate, &up], vec![]);
        let m = g.node("MatMul", &[&m, &wd], vec![]);
        x = g.node("Add", &[&x, &m], vec![]);
    }
    let nw = w.vector(&mut g, "model.norm.weight", d)?;
    let x = rms_norm(&mut g, &x, &nw, &eps);
    let head = if cfg.tie_word_embeddings {
        g.node("Transpose", &[&embed], vec![attr_ints("perm", &[1, 0])])
    } else {
        w.proj(&mut g, "lm_head.weight", v, d)?
    };
    let logits = g.node("MatMul", &[&x, &head], vec![]);
    g.output_as(
        &logits,
        "logits",
        data_type::FLOAT,
        &[
            Dim::sym("batch_size"),
            Dim::sym("sequence_length"),
            Dim::Fixed(v as i64),
        ],
    );
    Ok(g.finish())
}

/// Where an export's weights go (`export-onnx --external-data`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExternalData {
    /// In the .onnx file up to [`EXTERNAL_DATA_ABOVE`] bytes of weights, above that in
    /// `OUT.data`.
    Auto,
    /// Always in `OUT.data`.
    Always,
    /// Always in the .onnx file (refused above [`ONE_FILE_LIMIT`]).
    Never,
}

/// Initializer bytes above which [`ExternalData::Auto`] moves the weights out of the .onnx
/// file: 1 GiB, since ONNX Runtime loads external data without a second copy of the
/// weights (measured, 1.9 GB model: peak RSS at load 3.1 -> 2.5 GiB, 30 -> 10 s).
pub const EXTERNAL_DATA_ABOVE: u64 = 1 << 30;

/// The most initializer bytes one .onnx file holds (protobuf refuses messages of 2 GiB or
/// more; this leaves room for the graph).
pub const ONE_FILE_LIMIT: u64 = 2_000_000_000;

/// What [`write_onnx`] wrote.
#[derive(Debug)]
pub struct WrittenOnnx {
    /// The external data file beside the .onnx, when the weights went there.
    pub data: Option<PathBuf>,
    /// Bytes written, both files.
    pub bytes: u64,
}

/// Writes `model` to `out`, its weights to `OUT.data` beside it when `how` says so, each
/// file atomically and the data first, so an `.onnx` that names a data file appears only
/// once that file is whole. Warns about an `OUT.data` left from an earlier export that the
/// new model does not read.
pub fn write_onnx(
    mut model: crate::onnx::proto::ModelProto,
    out: &Path,
    how: ExternalData,
) -> anyhow::Result<WrittenOnnx> {
    let inline = crate::onnx::external::inline_bytes(&model);
    let external = match how {
        ExternalData::Always => true,
        ExternalData::Never if inline > ONE_FILE_LIMIT => anyhow::bail!(
            "the model's weights take {inline} bytes, more than one .onnx file can hold (2 GB, protobuf's limit); drop --external-data never (auto writes them to {}.data beside it) or export with --fp16",
            out.display()
        ),
        ExternalData::Never => false,
        ExternalData::Auto => inline > EXTERNAL_DATA_ABOVE,
    };
    // OUT.data beside OUT: the name the graph records as its external data's location.
    let name = out
        .file_name()
        .with_context(|| format!("{} names no file", out.display()))?;
    if external && name.to_str().is_none() {
        anyhow::bail!("{}: external data needs a UTF-8 file name", out.display());
    }
    let location = format!("{}.data", name.to_string_lossy());
    let data_path = out.with_file_name(&location);
    let mut bytes = 0u64;
    if external {
        // Streamed: each tensor leaves memory as it reaches the file.
        crate::util::write_atomic_with(&data_path, |w| {
            bytes += crate::onnx::external::split_external_to(&mut model, &location, w)?;
            Ok(())
        })
        .with_context(|| format!("writing {}", data_path.display()))?;
    }
    let graph = model.encode_to_vec();
    drop(model);
    crate::util::write_atomic(out, &graph).with_context(|| format!("writing {}", out.display()))?;
    bytes += graph.len() as u64;
    if !external && data_path.is_file() {
        tracing::warn!(
            "{} is left from an earlier export; this model does not read it",
            data_path.display()
        );
    }
    Ok(WrittenOnnx {
        data: external.then_some(data_path),
        bytes,
    })
}

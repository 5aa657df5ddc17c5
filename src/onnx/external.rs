//! ONNX external data: models over 2 GB keep their weights in files beside the `.onnx`
//! (`TensorProto.data_location = EXTERNAL`, with `location`, `offset`, `length` entries).
//! [`references`] lists the files a model reads, so the teacher stage can hash them into the
//! cache's provenance (the graph file alone does not say which weights ran), and
//! [`move_to_external`] writes such a model (the tests' fixture).
//!
//! Reading decodes only the graph's structure: the messages below declare no `raw_data`, so
//! prost skips the weight bytes of a single-file model without copying them.

use super::proto::{ModelProto, StringStringEntryProto};
use prost::Message;
use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

/// `TensorProto.DataLocation.EXTERNAL`.
pub const EXTERNAL: i32 = 1;

#[derive(Clone, PartialEq, Message)]
struct LiteModel {
    #[prost(message, optional, tag = "7")]
    graph: Option<LiteGraph>,
    #[prost(message, repeated, tag = "25")]
    functions: Vec<LiteFunction>,
}

#[derive(Clone, PartialEq, Message)]
struct LiteFunction {
    #[prost(message, repeated, tag = "7")]
    node: Vec<LiteNode>,
}

#[derive(Clone, PartialEq, Message)]
struct LiteGraph {
    #[prost(message, repeated, tag = "1")]
    node: Vec<LiteNode>,
    #[prost(message, repeated, tag = "5")]
    initializer: Vec<LiteTensor>,
    #[prost(message, repeated, tag = "15")]
    sparse_initializer: Vec<LiteSparseTensor>,
}

#[derive(Clone, PartialEq, Message)]
struct LiteNode {
    #[prost(message, repeated, tag = "5")]
    attribute: Vec<LiteAttribute>,
}

#[derive(Clone, PartialEq, Message)]
struct LiteAttribute {
    #[prost(message, optional, tag = "5")]
    t: Option<LiteTensor>,
    #[prost(message, optional, tag = "6")]
    g: Option<LiteGraph>,
    #[prost(message, repeated, tag = "10")]
    tensors: Vec<LiteTensor>,
    #[prost(message, repeated, tag = "11")]
    graphs: Vec<LiteGraph>,
    #[prost(message, optional, tag = "22")]
    sparse_tensor: Option<LiteSparseTensor>,
    #[prost(message, repeated, tag = "23")]
    sparse_tensors: Vec<LiteSparseTensor>,
}

#[derive(Clone, PartialEq, Message)]
struct LiteSparseTensor {
    #[prost(message, optional, tag = "1")]
    values: Option<LiteTensor>,
    #[prost(message, optional, tag = "2")]
    indices: Option<LiteTensor>,
}

#[derive(Clone, PartialEq, Message)]
struct LiteTensor {
    #[prost(string, optional, tag = "8")]
    name: Option<String>,
    #[prost(message, repeated, tag = "13")]
    external_data: Vec<StringStringEntryProto>,
    #[prost(int32, optional, tag = "14")]
    data_location: Option<i32>,
}

/// Why a model's external data cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ExternalError {
    #[error("cannot read ONNX model {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a readable ONNX model ({why}); pass the .onnx file of an export")]
    Decode { path: PathBuf, why: String },
    #[error(
        "ONNX model {model}: initializer `{tensor}` keeps its data in external file `{location}`, {why}; external data files must sit beside the .onnx file, as the exporter wrote them (copy the whole export directory)"
    )]
    Bad {
        model: PathBuf,
        tensor: String,
        location: String,
        why: String,
    },
}

/// The external data files `model` reads, as written in it (relative to its directory),
/// sorted and without repeats. Each must exist beside the model and stay inside its
/// directory.
pub fn references(model: &Path) -> Result<Vec<String>, ExternalError> {
    let m: LiteModel = decode_structure(model)?;
    let mut found = Vec::new();
    if let Some(g) = &m.graph {
        graph_tensors(g, &mut found);
    }
    for f in &m.functions {
        nodes_tensors(&f.node, &mut found);
    }
    let dir = model.parent().unwrap_or(Path::new("."));
    let mut files = BTreeSet::new();
    for t in found {
        if t.data_location != Some(EXTERNAL) {
            continue;
        }
        let tensor = t.name.clone().unwrap_or_default();
        let location = t
            .external_data
            .iter()
            .find(|e| e.key.as_deref() == Some("location"))
            .and_then(|e| e.value.clone())
            .unwrap_or_default();
        let bad = |why: &str| ExternalError::Bad {
            model: model.to_path_buf(),
            tensor: tensor.clone(),
            location: location.clone(),
            why: why.to_string(),
        };
        if location.is_empty() {
            return Err(bad("but names no location"));
        }
        if !Path::new(&location)
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(bad("which is outside the model's directory"));
        }
        if !dir.join(&location).is_file() {
            return Err(bad("which does not exist"));
        }
        files.insert(location);
    }
    Ok(files.into_iter().collect())
}

/// Decodes the model file at `path` into `M`, a message that declares only the fields it
/// reads (no `raw_data`), so a single-file model's weights are skipped, not copied.
pub(super) fn decode_structure<M: Message + Default>(path: &Path) -> Result<M, ExternalError> {
    let file = std::fs::File::open(path).map_err(|source| ExternalError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    // SAFETY: the map is read once, here, while the file is open; a teacher file changed
    // under a running job would already break ONNX Runtime's own read of it.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| ExternalError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    M::decode(&map[..]).map_err(|e| ExternalError::Decode {
        path: path.to_path_buf(),
        why: e.to_string(),
    })
}

/// The sha256 and size of each external data file `model` reads (`locations` as
/// [`references`] lists them), as the manifest records them.
pub fn hash_files(
    model: &Path,
    locations: &[String],
) -> anyhow::Result<Vec<crate::cache::manifest::ExternalDataFile>> {
    use anyhow::Context;
    let dir = model.parent().unwrap_or(Path::new("."));
    locations
        .iter()
        .map(|location| {
            let path = dir.join(location);
            let (sha256, bytes) = crate::util::sha256_file(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            Ok(crate::cache::manifest::ExternalDataFile {
                location: location.clone(),
                sha256,
                bytes,
            })
        })
        .collect()
}

/// One identity for a model and the external data it reads: the graph file's sha256 when it
/// reads none (so a single-file model keeps the hash it always had), otherwise the sha256 of
/// the graph's sha256 and each data file's location and sha256. Changing any file changes it.
pub fn model_sha256(model: &Path) -> anyhow::Result<String> {
    use anyhow::Context;
    let graph = crate::util::sha256_file(model)
        .with_context(|| format!("reading {}", model.display()))?
        .0;
    let files = hash_files(model, &references(model)?)?;
    if files.is_empty() {
        return Ok(graph);
    }
    let mut id = format!("{graph}\n");
    for f in files {
        id.push_str(&format!("{} {}\n", f.location, f.sha256));
    }
    Ok(crate::util::sha256_bytes(id.as_bytes()))
}

fn graph_tensors<'a>(g: &'a LiteGraph, out: &mut Vec<&'a LiteTensor>) {
    out.extend(&g.initializer);
    for s in &g.sparse_initializer {
        out.extend(s.values.iter().chain(&s.indices));
    }
    nodes_tensors(&g.node, out);
}

fn nodes_tensors<'a>(nodes: &'a [LiteNode], out: &mut Vec<&'a LiteTensor>) {
    for a in nodes.iter().flat_map(|n| &n.attribute) {
        out.extend(a.t.iter().chain(&a.tensors));
        for s in a.sparse_tensor.iter().chain(&a.sparse_tensors) {
            out.extend(s.values.iter().chain(&s.indices));
        }
        for g in a.g.iter().chain(&a.graphs) {
            graph_tensors(g, out);
        }
    }
}

/// Rewrites the ONNX model `bytes` with the data of every initializer of 1 KiB or more moved
/// to one external file named `location` (as `onnx.save(..., save_as_external_data=True)`
/// does, with its default `size_threshold`: small constants such as shape inputs stay
/// inline, where shape inference needs them); returns the new model and the data file.
pub fn move_to_external(
    bytes: &[u8],
    location: &str,
) -> Result<(Vec<u8>, Vec<u8>), prost::DecodeError> {
    let mut m = ModelProto::decode(bytes)?;
    let data = split_external(&mut m, location);
    Ok((m.encode_to_vec(), data))
}

/// [`move_to_external`] on a model in memory: moves the data of every initializer of 1 KiB
/// or more out of `m` into the returned bytes (64-byte aligned), to be written as the file
/// `location` beside the `.onnx`.
pub fn split_external(m: &mut ModelProto, location: &str) -> Vec<u8> {
    let mut data = Vec::new();
    split_external_to(m, location, &mut data).expect("writing to a Vec does not fail");
    data
}

/// [`split_external`] writing the data file's bytes to `out` as it goes, each tensor's bytes
/// freed once written (so the weights are never in memory twice); returns the bytes written.
pub fn split_external_to(
    m: &mut ModelProto,
    location: &str,
    out: &mut dyn std::io::Write,
) -> std::io::Result<u64> {
    let mut at = 0u64;
    if let Some(g) = m.graph.as_mut() {
        for t in &mut g.initializer {
            if t.raw_data.as_ref().is_none_or(|r| r.len() < 1024) {
                continue;
            }
            let raw = t.raw_data.take().unwrap_or_default();
            // Aligned as the onnx package aligns large tensors.
            let pad = at.next_multiple_of(64) - at;
            out.write_all(&[0u8; 64][..pad as usize])?;
            at += pad;
            let entry = |k: &str, v: String| StringStringEntryProto {
                key: Some(k.into()),
                value: Some(v),
            };
            t.external_data = vec![
                entry("location", location.into()),
                entry("offset", at.to_string()),
                entry("length", raw.len().to_string()),
            ];
            t.data_location = Some(EXTERNAL);
            out.write_all(&raw)?;
            at += raw.len() as u64;
        }
    }
    Ok(at)
}

/// Bytes of initializer data held inline in `m` (what decides whether a model fits one
/// protobuf file: 2 GiB at most).
pub fn inline_bytes(m: &ModelProto) -> u64 {
    m.graph.as_ref().map_or(0, |g| {
        g.initializer
            .iter()
            .map(|t| t.raw_data.as_ref().map_or(0, |r| r.len() as u64))
            .sum()
    })
}

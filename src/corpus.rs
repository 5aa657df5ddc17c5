//! Reading a text corpus: JSONL (one JSON object per line, text in a named field), Parquet
//! (a string column of that name, the Hugging Face datasets layout) and `.txt` (one document
//! per file), each optionally compressed (`.gz`, `.zst`: `corpus.jsonl.gz`). Paths may be
//! files or directories (searched recursively, in sorted order), so the document order — and
//! with it every `seq_id` — is deterministic. Files a directory holds that are not corpus
//! files are listed in a warning, not read; a file given twice (or a file and a directory
//! holding it) is read once, with a warning. A UTF-8 byte-order mark is ignored.

use crate::util::sha256_file;
use arrow_array::{Array, cast::AsArray};
use arrow_schema::DataType;
use parquet::arrow::{ProjectionMask, arrow_reader::ParquetRecordBatchReaderBuilder};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

/// Corpus errors: each names the file (and line or row) and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    #[error("corpus path {0} does not exist; check the --corpus argument")]
    Missing(PathBuf),
    #[error("cannot read corpus path {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "corpus file {0} has an unsupported extension; use .jsonl (or .json lines), .parquet or .txt (.jsonl and .txt may be compressed as .gz or .zst, e.g. .jsonl.gz)"
    )]
    Unsupported(PathBuf),
    #[error(
        "corpus file {0} is a compressed Parquet file; Parquet compresses its own pages, so decompress it (or write it with zstd/snappy page compression)"
    )]
    CompressedParquet(PathBuf),
    #[error(
        "corpus directory {0} contains no .jsonl, .parquet or .txt files (nor .gz/.zst of them)"
    )]
    EmptyDir(PathBuf),
    #[error("no corpus given; pass --corpus PATH (files or directories)")]
    NoPaths,
    #[error(
        "{path}:{line}: {what}; fix the row or pass --skip-bad-rows to skip and count such rows"
    )]
    BadRow {
        path: PathBuf,
        line: u64,
        what: String,
    },
    #[error(
        "Parquet corpus {path} has no string column `{field}` (columns: {columns}); pass --text-field NAME"
    )]
    NoColumn {
        path: PathBuf,
        field: String,
        columns: String,
    },
    #[error("cannot read Parquet corpus {path}: {source}")]
    Parquet {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The kind of a corpus file, from its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CorpusKind {
    Jsonl,
    Parquet,
    Text,
}

/// How a corpus file is compressed, from its last extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// The compression of `name` (lowercase) and the name without its extension.
    fn of(name: &str) -> (Self, &str) {
        if let Some(n) = name.strip_suffix(".gz") {
            (Compression::Gzip, n)
        } else if let Some(n) = name.strip_suffix(".zst") {
            (Compression::Zstd, n)
        } else {
            (Compression::None, name)
        }
    }

    /// A reader of `path`'s decompressed bytes.
    fn open(path: &Path) -> std::io::Result<Box<dyn std::io::Read>> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        let file = std::fs::File::open(path)?;
        Ok(match Compression::of(&name).0 {
            Compression::None => Box::new(file),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(file))),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(file)?),
        })
    }
}

impl CorpusKind {
    fn of(path: &Path) -> Option<Self> {
        let lower = path.file_name()?.to_str()?.to_ascii_lowercase();
        let (compression, name) = Compression::of(&lower);
        if name.ends_with(".parquet") {
            // Parquet compresses its own pages; a compressed Parquet file is not readable.
            return (compression == Compression::None).then_some(CorpusKind::Parquet);
        }
        if name.ends_with(".jsonl") || name.ends_with(".ndjson") || name.ends_with(".json") {
            Some(CorpusKind::Jsonl)
        } else if name.ends_with(".txt") {
            Some(CorpusKind::Text)
        } else {
            None
        }
    }
}

/// One corpus file with its provenance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CorpusFile {
    pub path: PathBuf,
    pub kind: CorpusKind,
    pub bytes: u64,
    pub sha256: String,
}

/// Expands `paths` into the sorted list of corpus files and hashes each.
pub fn discover(paths: &[PathBuf]) -> Result<Vec<CorpusFile>, CorpusError> {
    if paths.is_empty() {
        return Err(CorpusError::NoPaths);
    }
    let mut files = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                CorpusError::Missing(p.clone())
            } else {
                CorpusError::Io {
                    path: p.clone(),
                    source: e,
                }
            }
        })?;
        if meta.is_dir() {
            let before = files.len();
            let mut skipped = Vec::new();
            walk(p, &mut files, &mut skipped)?;
            if files.len() == before {
                return Err(CorpusError::EmptyDir(p.clone()));
            }
            if !skipped.is_empty() {
                const SHOWN: usize = 10;
                let mut names: Vec<String> = skipped
                    .iter()
                    .take(SHOWN)
                    .map(|f| f.display().to_string())
                    .collect();
                if skipped.len() > SHOWN {
                    names.push(format!("and {} more", skipped.len() - SHOWN));
                }
                tracing::warn!(
                    "corpus directory {}: skipped {} file(s) that are not corpus files (.jsonl, .parquet, .txt, or .gz/.zst of them): {}",
                    p.display(),
                    skipped.len(),
                    names.join(", ")
                );
            }
        } else {
            let kind = CorpusKind::of(p).ok_or_else(|| {
                let name = p.to_string_lossy().to_ascii_lowercase();
                if name.ends_with(".parquet.gz") || name.ends_with(".parquet.zst") {
                    CorpusError::CompressedParquet(p.clone())
                } else {
                    CorpusError::Unsupported(p.clone())
                }
            })?;
            files.push((p.clone(), kind));
        }
    }
    // The same file twice (given twice, or as a file and inside a directory) would double
    // its documents: it is read once, where it first appears.
    let mut seen: std::collections::HashMap<PathBuf, PathBuf> = std::collections::HashMap::new();
    let mut unique = Vec::with_capacity(files.len());
    for (path, kind) in files {
        let key = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
        match seen.get(&key) {
            Some(first) => tracing::warn!(
                "corpus file {} is given more than once (also as {}): reading it once",
                path.display(),
                first.display()
            ),
            None => {
                seen.insert(key, path.clone());
                unique.push((path, kind));
            }
        }
    }
    unique
        .into_iter()
        .map(|(path, kind)| {
            let (sha256, bytes) = sha256_file(&path).map_err(|e| CorpusError::Io {
                path: path.clone(),
                source: e,
            })?;
            Ok(CorpusFile {
                path,
                kind,
                bytes,
                sha256,
            })
        })
        .collect()
}

fn walk(
    dir: &Path,
    out: &mut Vec<(PathBuf, CorpusKind)>,
    skipped: &mut Vec<PathBuf>,
) -> Result<(), CorpusError> {
    let io = |e| CorpusError::Io {
        path: dir.to_path_buf(),
        source: e,
    };
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(io)?;
    entries.sort();
    for p in entries {
        let hidden = p
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if p.is_dir() && hidden {
            // `.git`, `.cache/huggingface`: never corpus data.
            tracing::debug!("skipping hidden directory {}", p.display());
        } else if p.is_dir() {
            walk(&p, out, skipped)?;
        } else if let Some(kind) = CorpusKind::of(&p) {
            out.push((p, kind));
        } else if hidden {
            tracing::debug!("skipping hidden file {}", p.display());
        } else {
            skipped.push(p);
        }
    }
    Ok(())
}

/// The UTF-8 byte-order mark some editors write at the start of a file.
const BOM: &str = "\u{feff}";

/// Where a document came from: a file and a 1-based line (JSONL) or row (Parquet) number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DocSource {
    pub file: usize,
    pub line: u64,
}

/// Counts of what reading skipped.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkipCounts {
    /// Rows that were not valid (only with `--skip-bad-rows`).
    pub bad_rows: u64,
    /// Documents with empty text.
    pub empty_documents: u64,
    /// The first few bad rows, as `path:line: problem`.
    pub examples: Vec<String>,
}

/// Calls `f` with every non-empty document of `files` in order.
pub fn for_each_document(
    files: &[CorpusFile],
    text_field: &str,
    skip_bad_rows: bool,
    mut f: impl FnMut(DocSource, String) -> anyhow::Result<()>,
) -> anyhow::Result<SkipCounts> {
    let mut skips = SkipCounts::default();
    let bad = |skips: &mut SkipCounts, path: &Path, line: u64, what: String| {
        let err = CorpusError::BadRow {
            path: path.to_path_buf(),
            line,
            what,
        };
        if !skip_bad_rows {
            return Err(err);
        }
        skips.bad_rows += 1;
        if skips.examples.len() < 10 {
            let s = err.to_string();
            skips
                .examples
                .push(s.split("; fix the row").next().unwrap_or(&s).to_string());
        }
        Ok(())
    };
    for (fi, file) in files.iter().enumerate() {
        let path = &file.path;
        let io = |e| CorpusError::Io {
            path: path.clone(),
            source: e,
        };
        let mut emit = |skips: &mut SkipCounts, line: u64, text: String| {
            if text.is_empty() {
                skips.empty_documents += 1;
                Ok(())
            } else {
                f(DocSource { file: fi, line }, text)
            }
        };
        match file.kind {
            CorpusKind::Text => {
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut Compression::open(path).map_err(io)?, &mut bytes)
                    .map_err(io)?;
                match String::from_utf8(bytes) {
                    Ok(text) => {
                        let text = match text.strip_prefix(BOM) {
                            Some(t) => t.to_string(),
                            None => text,
                        };
                        emit(&mut skips, 1, text)?
                    }
                    Err(e) => bad(&mut skips, path, 1, format!("text file is not UTF-8 ({e})"))?,
                }
            }
            CorpusKind::Jsonl => {
                let mut reader =
                    BufReader::with_capacity(1 << 20, Compression::open(path).map_err(io)?);
                let mut buf = Vec::new();
                let mut line = 0u64;
                loop {
                    buf.clear();
                    if reader.read_until(b'\n', &mut buf).map_err(io)? == 0 {
                        break;
                    }
                    line += 1;
                    let Ok(mut s) = std::str::from_utf8(&buf) else {
                        bad(&mut skips, path, line, "line is not UTF-8".into())?;
                        continue;
                    };
                    if line == 1 {
                        s = s.strip_prefix(BOM).unwrap_or(s);
                    }
                    if s.trim().is_empty() {
                        continue;
                    }
                    match serde_json::from_str::<serde_json::Value>(s) {
                        Err(e) => bad(&mut skips, path, line, format!("not valid JSON ({e})"))?,
                        Ok(serde_json::Value::Object(mut m)) => match m.remove(text_field) {
                            Some(serde_json::Value::String(t)) => emit(&mut skips, line, t)?,
                            Some(other) => bad(
                                &mut skips,
                                path,
                                line,
                                format!(
                                    "field `{text_field}` is not a string (found {})",
                                    json_kind(&other)
                                ),
                            )?,
                            None => bad(
                                &mut skips,
                                path,
                                line,
                                format!(
                                    "no field `{text_field}` (fields: {}); pass --text-field NAME if the text is elsewhere",
                                    m.keys().cloned().collect::<Vec<_>>().join(", ")
                                ),
                            )?,
                        },
                        Ok(other) => bad(
                            &mut skips,
                            path,
                            line,
                            format!("expected a JSON object, found {}", json_kind(&other)),
                        )?,
                    }
                }
            }
            CorpusKind::Parquet => read_parquet(path, text_field, &mut |row, text| match text {
                Some(t) => emit(&mut skips, row, t),
                None => Ok(bad(
                    &mut skips,
                    path,
                    row,
                    format!("`{text_field}` is null"),
                )?),
            })?,
        }
    }
    Ok(skips)
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn read_parquet(
    path: &Path,
    field: &str,
    f: &mut dyn FnMut(u64, Option<String>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let pq = |e: parquet::errors::ParquetError| CorpusError::Parquet {
        path: path.to_path_buf(),
        source: Box::new(e),
    };
    let file = std::fs::File::open(path).map_err(|e| CorpusError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(pq)?;
    let schema = builder.schema().clone();
    let idx = schema
        .fields()
        .iter()
        .position(|f| {
            f.name() == field
                && matches!(
                    f.data_type(),
                    DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
                )
        })
        .ok_or_else(|| CorpusError::NoColumn {
            path: path.to_path_buf(),
            field: field.to_string(),
            columns: schema
                .fields()
                .iter()
                .map(|f| format!("{}: {}", f.name(), f.data_type()))
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let mask = ProjectionMask::roots(builder.parquet_schema(), [idx]);
    let reader = builder
        .with_projection(mask)
        .with_batch_size(4096)
        .build()
        .map_err(pq)?;
    let mut row = 0u64;
    for batch in reader {
        let batch = batch.map_err(|e| CorpusError::Parquet {
            path: path.to_path_buf(),
            source: Box::new(e),
        })?;
        let col = batch.column(0);
        let mut each = |s: Option<&str>| {
            row += 1;
            f(row, s.map(str::to_string))
        };
        match col.data_type() {
            DataType::Utf8 => col.as_string::<i32>().iter().try_for_each(&mut each)?,
            DataType::LargeUtf8 => col.as_string::<i64>().iter().try_for_each(&mut each)?,
            DataType::Utf8View => col.as_string_view().iter().try_for_each(&mut each)?,
            _ => unreachable!("column type checked above"),
        }
    }
    Ok(())
}

/// Every non-empty document of `paths` (files or directories), in order.
pub fn read_texts(paths: &[PathBuf], text_field: &str) -> anyhow::Result<Vec<String>> {
    let files = discover(paths)?;
    let mut texts = Vec::new();
    for_each_document(&files, text_field, false, |_, t| {
        texts.push(t);
        Ok(())
    })?;
    Ok(texts)
}

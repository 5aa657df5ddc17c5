//! The files match the documented schemas in `schemas/`, and pyarrow reads the same values.

use crate::util::*;
use logitcache::cache::manifest::Manifest;
use logitcache::cache::schema::{Layout, check_schema, shard_schema};
use serde_json::Value;
use std::path::Path;

fn small_cache() -> std::path::PathBuf {
    static C: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    C.get_or_init(|| {
        let out = shared_dir().join("format-cache");
        assert_ok(&run_strings(&teacher_args(&plain_model(), &out, 40)));
        out
    })
    .clone()
}

/// The sampled layouts are documented beside the top-k one: `shard.sample.arrow.json` (N = 50,
/// with `--store-logprobs`) and `shard.hybrid.arrow.json` (k = 64, N = 50). Run with
/// `LOGITCACHE_BLESS_SCHEMAS=1` to rewrite them after a deliberate format change.
#[test]
fn sampled_shard_schemas_match_the_committed_arrow_json() {
    use logitcache::cache::schema::CacheMode;
    let layouts = [
        (
            "schemas/shard.sample.arrow.json",
            Layout::of(CacheMode::Sample, 0, 50, true),
        ),
        (
            "schemas/shard.hybrid.arrow.json",
            Layout::of(CacheMode::Hybrid, 64, 50, false),
        ),
        (
            "schemas/shard.q8.arrow.json",
            Layout::topk(64).with_logprobs(logitcache::cache::schema::LogprobDtype::Q8),
        ),
    ];
    for (file, layout) in layouts {
        let path = Path::new(ROOT).join(file);
        let code = shard_schema(&layout);
        if std::env::var_os("LOGITCACHE_BLESS_SCHEMAS").is_some() {
            std::fs::write(&path, serde_json::to_string_pretty(&code).unwrap() + "\n").unwrap();
        }
        let documented: arrow_schema::Schema =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(documented, code, "{file} is out of date");
    }
}

#[test]
fn shard_schema_matches_the_committed_arrow_json() {
    let text = std::fs::read_to_string(Path::new(ROOT).join("schemas/shard.arrow.json")).unwrap();
    let documented: arrow_schema::Schema = serde_json::from_str(&text).unwrap();
    let code = shard_schema(&Layout::topk(64));
    assert_eq!(
        documented,
        code,
        "schemas/shard.arrow.json is out of date; the code's schema is:\n{}",
        serde_json::to_string_pretty(&code).unwrap()
    );
    // And the files written have it (top_k 8 here).
    let out = small_cache();
    let m = Manifest::load(&out).unwrap();
    for s in &m.shards {
        let f = std::fs::File::open(out.join(&s.file)).unwrap();
        let b = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f).unwrap();
        check_schema(b.schema(), &Layout::topk(8)).unwrap();
        assert!(check_schema(b.schema(), &Layout::topk(16)).is_err());
        let meta = b.schema().metadata();
        assert_eq!(meta.get("logitcache.top_k").map(String::as_str), Some("8"));
        assert_eq!(
            meta.get("logitcache.shard_index")
                .map(|s| s.parse::<u64>().unwrap()),
            Some(s.index)
        );
    }
}

/// Checks `v` against the subset of JSON Schema used in `schemas/manifest.schema.json`
/// (type, const, enum, pattern-free string checks, properties, required,
/// additionalProperties: false, items, $ref to $defs).
/// The JSON-schema keywords [`validate`] checks (or that carry no constraint); a schema
/// using another one fails the test instead of passing unchecked.
const KNOWN_KEYWORDS: [&str; 17] = [
    "$schema",
    "$id",
    "$ref",
    "$defs",
    "title",
    "description",
    "type",
    "const",
    "enum",
    "minimum",
    "exclusiveMinimum",
    "maximum",
    "pattern",
    "properties",
    "required",
    "additionalProperties",
    "items",
];

fn validate(v: &Value, schema: &Value, root: &Value, path: &str, errors: &mut Vec<String>) {
    let schema = match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => &root["$defs"][r.trim_start_matches("#/$defs/")],
        None => schema,
    };
    if let Some(t) = schema.get("type").and_then(Value::as_str) {
        let ok = match t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "integer" => v.is_u64() || v.is_i64(),
            "number" => v.is_number(),
            "boolean" => v.is_boolean(),
            _ => false,
        };
        if !ok {
            errors.push(format!("{path}: expected {t}, found {v}"));
            return;
        }
    }
    if let Some(c) = schema.get("const")
        && c != v
    {
        errors.push(format!("{path}: expected {c}, found {v}"));
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array)
        && !e.contains(v)
    {
        errors.push(format!("{path}: {v} not in {e:?}"));
    }
    if let (Some(x), Some(min)) = (v.as_f64(), schema.get("minimum").and_then(Value::as_f64))
        && x < min
    {
        errors.push(format!("{path}: {x} < minimum {min}"));
    }
    if let (Some(x), Some(min)) = (
        v.as_f64(),
        schema.get("exclusiveMinimum").and_then(Value::as_f64),
    ) && x <= min
    {
        errors.push(format!("{path}: {x} ≤ exclusiveMinimum {min}"));
    }
    if let (Some(x), Some(max)) = (v.as_f64(), schema.get("maximum").and_then(Value::as_f64))
        && x > max
    {
        errors.push(format!("{path}: {x} > maximum {max}"));
    }
    if let (Some(x), Some(p)) = (v.as_str(), schema.get("pattern").and_then(Value::as_str))
        && !regex::Regex::new(p).unwrap().is_match(x)
    {
        errors.push(format!("{path}: {x:?} does not match {p}"));
    }
    for k in schema.as_object().into_iter().flat_map(|o| o.keys()) {
        assert!(
            KNOWN_KEYWORDS.contains(&k.as_str()),
            "{path}: the schema uses `{k}`, which this validator does not check: add it"
        );
    }
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        let obj = v.as_object().unwrap();
        for r in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if !obj.contains_key(r.as_str().unwrap()) {
                errors.push(format!("{path}: missing {r}"));
            }
        }
        for (k, val) in obj {
            match props.get(k) {
                Some(s) => validate(val, s, root, &format!("{path}.{k}"), errors),
                None if schema.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    errors.push(format!("{path}: unexpected key {k}"))
                }
                None => {}
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), v.as_array()) {
        for (i, x) in arr.iter().enumerate() {
            validate(x, items, root, &format!("{path}[{i}]"), errors);
        }
    }
}

#[test]
fn manifest_matches_its_json_schema() {
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(ROOT).join("schemas/manifest.schema.json")).unwrap(),
    )
    .unwrap();
    let out = small_cache();
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    let mut errors = vec![];
    validate(&manifest, &schema, &schema, "$", &mut errors);
    assert!(errors.is_empty(), "{errors:#?}");
    // The validator is not vacuous.
    let mut broken = manifest.clone();
    broken["params"]["top_k"] = Value::String("8".into());
    broken["extra"] = Value::Bool(true);
    broken["shards"][0]
        .as_object_mut()
        .unwrap()
        .remove("sha256");
    broken["model"]["sha256"] = Value::String("not-a-sha".into());
    broken["totals"]["bytes"] = serde_json::json!(-1);
    let mut errors = vec![];
    validate(&broken, &schema, &schema, "$", &mut errors);
    assert_eq!(errors.len(), 5, "{errors:#?}");
}

#[test]
fn pyarrow_reads_the_same_values() {
    let out = small_cache();
    let py = python_check("pyarrow_check.py", &out);
    let rows = all_rows(&out);
    assert_eq!(py["rows"].as_u64().unwrap(), rows.rows() as u64);
    assert_eq!(py["positions"].as_u64().unwrap(), rows.positions() as u64);
    let sum_u = |v: &[u32]| v.iter().map(|&x| x as u64).sum::<u64>();
    assert_eq!(
        py["seq_id_sum"].as_u64().unwrap(),
        rows.seq_ids.iter().sum::<u64>()
    );
    assert_eq!(
        py["input_ids_sum"].as_u64().unwrap(),
        sum_u(&rows.input_ids)
    );
    assert_eq!(py["topk_ids_sum"].as_u64().unwrap(), sum_u(&rows.topk_ids));
    let lp: f64 = rows.topk_logprobs.iter().map(|x| x.to_f32() as f64).sum();
    let tail: f64 = rows
        .tail_logprob
        .iter()
        .filter(|x| x.is_finite())
        .map(|&x| x as f64)
        .sum();
    assert!((py["topk_logprobs_sum"].as_f64().unwrap() - lp).abs() < 1e-6 * lp.abs());
    assert!((py["tail_logprob_sum"].as_f64().unwrap() - tail).abs() < 1e-6 * tail.abs());
    // pyarrow sees the nested fixed-size lists and float16 as written.
    assert_eq!(
        py["topk_logprobs_type"].as_str().unwrap(),
        "list<item: fixed_size_list<item: halffloat not null>[8] not null>"
    );
    // Every row, element by element: ids, list lengths and order, values.
    let full = py["rows_full"].as_array().unwrap();
    assert_eq!(full.len(), rows.rows());
    let k = 8;
    for (r, row) in full.iter().enumerate() {
        assert_eq!(row["seq_id"].as_u64().unwrap(), rows.seq_ids[r], "row {r}");
        assert_eq!(row["doc_id"].as_u64().unwrap(), rows.doc_ids[r], "row {r}");
        assert_eq!(
            row["window_index"].as_u64().unwrap(),
            rows.window_index[r] as u64,
            "row {r}"
        );
        let (a, b) = (rows.offsets[r] as usize, rows.offsets[r + 1] as usize);
        let ids: Vec<u32> = serde_json::from_value(row["input_ids"].clone()).unwrap();
        assert_eq!(ids, rows.input_ids[a..b], "row {r}: input_ids");
        let topk: Vec<Vec<u32>> = serde_json::from_value(row["topk_ids"].clone()).unwrap();
        let lps: Vec<Vec<f64>> = serde_json::from_value(row["topk_logprobs"].clone()).unwrap();
        let tails: Vec<Option<f64>> = serde_json::from_value(row["tail_logprob"].clone()).unwrap();
        assert_eq!(
            (topk.len(), lps.len(), tails.len()),
            (b - a, b - a, b - a),
            "row {r}"
        );
        for (i, p) in (a..b).enumerate() {
            assert_eq!(
                topk[i],
                rows.topk_ids[p * k..(p + 1) * k],
                "row {r} position {i}"
            );
            let want: Vec<f32> = rows.topk_logprobs[p * k..(p + 1) * k]
                .iter()
                .map(|x| x.to_f32())
                .collect();
            let got: Vec<f32> = lps[i].iter().map(|&x| x as f32).collect();
            assert_eq!(got, want, "row {r} position {i}: topk_logprobs");
            let t = rows.tail_logprob[p];
            assert_eq!(
                tails[i].map(|x| x as f32),
                t.is_finite().then_some(t),
                "row {r} position {i}"
            );
        }
    }
    // A spot check of one position, element by element.
    let first = &py["first_position"];
    for j in 0..8 {
        assert_eq!(first["ids"][j].as_u64().unwrap(), rows.topk_ids[j] as u64);
        assert_eq!(
            first["logprobs"][j].as_f64().unwrap() as f32,
            rows.topk_logprobs[j].to_f32()
        );
    }
}

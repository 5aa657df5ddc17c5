//! The law of capacity gap (Zhang et al., ACL 2025): for each student size, the teacher
//! whose distilled student scores best, and a least-squares line through those optima,
//! `T* = slope · S + intercept`. The paper finds the line close to `T* ≈ 2.5 · S`.
//!
//! A worked example: a grid whose optima follow the paper's reported ratio (this is a grid
//! *built from* the reported law, not the paper's raw table). Students of 0.5B, 1B and 2B
//! parameters, each distilled from teachers of 0.8B to 7B; the best teachers are 1.25B, 2.5B
//! and 5B, so the fit recovers the slope 2.5 and predicts 7.5B for a 3B student.
//!
//! ```
//! use logitcache::law::{ResultRow, fit};
//! let teachers = [0.8e9, 1.25e9, 2.5e9, 5e9, 7e9];
//! let mut rows = Vec::new();
//! for s in [0.5e9, 1e9, 2e9] {
//!     for t in teachers {
//!         // Student loss is lowest at t = 2.5 s and grows with the log-distance from it.
//!         let loss = 3.0 - 0.1 * (s / 1e9f64).ln() + 0.2 * (t / (2.5 * s)).ln().powi(2);
//!         rows.push(ResultRow::kd(&format!("T{t}"), t as u64, &format!("S{s}"), s as u64, loss));
//!     }
//! }
//! let f = fit(&rows, "eval_loss").unwrap();
//! assert_eq!(f.best.iter().map(|b| b.teacher_params).collect::<Vec<_>>(),
//!            vec![1_250_000_000, 2_500_000_000, 5_000_000_000]);
//! assert!((f.slope - 2.5).abs() < 1e-9 && f.intercept.abs() < 1e-3 && f.r2 > 0.999_999);
//! let (t, se) = f.predict(3e9);
//! assert!((t - 7.5e9).abs() < 1e3 && se < 1e3);
//! ```

use serde::{Deserialize, Serialize};
use std::path::Path;

/// One (teacher, student) result as `logitcache run` writes it to `results.json` and
/// `results.csv`. A CE-only baseline has `teacher = "ce"` and no teacher params.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultRow {
    pub teacher: String,
    pub teacher_params: Option<u64>,
    pub student: String,
    pub student_params: u64,
    pub eval_loss: f64,
    pub eval_ppl: f64,
    pub eval_kl: Option<f64>,
    pub eval_top1: Option<f64>,
    #[serde(default)]
    pub steps: u64,
    #[serde(default)]
    pub run_dir: String,
    /// The `[[cache_variant]]` the student was distilled from (none without variants, and
    /// for CE baselines).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<String>,
    /// The `[[recipe]]` it was trained with (none without recipes, and for CE baselines).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipe: Option<String>,
    /// Its training seed (none for a row averaged over seeds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

impl ResultRow {
    /// A distilled student's row (tests and examples).
    pub fn kd(teacher: &str, tp: u64, student: &str, sp: u64, eval_loss: f64) -> Self {
        ResultRow {
            teacher: teacher.into(),
            teacher_params: Some(tp),
            student: student.into(),
            student_params: sp,
            eval_loss,
            eval_ppl: eval_loss.exp(),
            eval_kl: None,
            eval_top1: None,
            steps: 0,
            run_dir: String::new(),
            cache: None,
            recipe: None,
            seed: None,
        }
    }

    fn metric(&self, name: &str) -> Option<f64> {
        match name {
            "eval_loss" => Some(self.eval_loss),
            "eval_ppl" => Some(self.eval_ppl),
            "eval_kl" => self.eval_kl,
            "eval_top1" => self.eval_top1,
            _ => None,
        }
    }
}

/// Metrics `law` can rank by, and whether higher is better.
pub const METRICS: &[(&str, bool)] = &[
    ("eval_loss", false),
    ("eval_ppl", false),
    ("eval_kl", false),
    ("eval_top1", true),
];

#[derive(Debug, thiserror::Error)]
pub enum LawError {
    #[error("cannot read results {path}: {why}")]
    Read { path: String, why: String },
    #[error("unknown metric `{0}`; use one of eval_loss, eval_ppl, eval_kl, eval_top1")]
    Metric(String),
    #[error(
        "the law needs at least 3 student sizes with distilled results; the results have {0} ({1}): add student sizes to the pipeline"
    )]
    TooFewStudents(usize, String),
    #[error(
        "student {0} was distilled from fewer than 2 teachers; there is no choice of teacher to fit"
    )]
    TooFewTeachers(String),
    #[error(
        "every student is best with the largest teacher ({0}, {1} params): there is no optimum inside the grid, so no law can be fitted; add larger teachers"
    )]
    NoInteriorOptimum(String, u64),
    #[error("row {0}: metric {1} is missing or not a finite number")]
    BadValue(usize, String),
    #[error(
        "all optimal teachers have the same student size; the fit needs distinct student sizes"
    )]
    Degenerate,
}

/// The best teacher of one student size.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Best {
    pub student: String,
    pub student_params: u64,
    pub teacher: String,
    pub teacher_params: u64,
    pub value: f64,
    /// The best teacher is the grid's largest (the true optimum may lie beyond it).
    pub at_largest: bool,
    /// The best teacher is the grid's smallest.
    pub at_smallest: bool,
    /// The same student's CE-only result, when the results have one.
    pub ce_value: Option<f64>,
    /// How many teachers this student was distilled from.
    pub teachers: usize,
}

/// The fitted law.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LawFit {
    pub metric: String,
    pub best: Vec<Best>,
    pub slope: f64,
    pub intercept: f64,
    pub r2: f64,
    /// Mean of `T*/S` over the student sizes.
    pub ratio: f64,
    /// Residual standard deviation (0 with 2 points).
    pub sigma: f64,
    mean_s: f64,
    sxx: f64,
}

impl LawFit {
    /// Predicted optimal teacher params for `student_params`, and its standard error
    /// (`σ·sqrt(1/n + (S − mean S)²/Sxx)`, the usual least-squares prediction error).
    pub fn predict(&self, student_params: f64) -> (f64, f64) {
        let n = self.best.len() as f64;
        let t = self.slope * student_params + self.intercept;
        let se = self.sigma * (1.0 / n + (student_params - self.mean_s).powi(2) / self.sxx).sqrt();
        (t, se)
    }

    /// Two-sided 95% Student-t quantile for the fit's residual degrees of freedom.
    pub fn t95(&self) -> f64 {
        t95(self.best.len().saturating_sub(2))
    }
}

/// Two-sided 95% Student-t quantile for `df` degrees of freedom (infinite for none).
pub fn t95(df: usize) -> f64 {
    const T: [f64; 10] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    ];
    match df {
        0 => f64::INFINITY,
        1..=10 => T[df - 1],
        11..=30 => 2.1,
        _ => 1.96,
    }
}

/// The rows the law is fitted to. A pipeline that compares caches or recipes
/// (`[[cache_variant]]`, `[[recipe]]`) fits the law on the first of each (the first
/// distilled row's), with the CE baselines; a (teacher, student) cell trained with several
/// seeds becomes one row holding the mean of each metric over its seeds (its `seed` none,
/// its `run_dir` the first seed's). Rows from a plain grid come back unchanged.
pub fn law_rows(rows: &[ResultRow]) -> Vec<ResultRow> {
    let first = rows.iter().find(|r| r.teacher_params.is_some());
    let keep = |r: &ResultRow| {
        r.teacher_params.is_none()
            || first.is_none_or(|f| f.cache == r.cache && f.recipe == r.recipe)
    };
    let mut cells: Vec<(ResultRow, Vec<&ResultRow>)> = Vec::new();
    for r in rows.iter().filter(|r| keep(r)) {
        match cells
            .iter_mut()
            .find(|(c, _)| c.teacher == r.teacher && c.student == r.student)
        {
            Some((_, all)) => all.push(r),
            None => cells.push((r.clone(), vec![r])),
        }
    }
    cells
        .into_iter()
        .map(|(mut c, all)| {
            if all.len() > 1 {
                let n = all.len() as f64;
                let mean = |f: fn(&ResultRow) -> f64| all.iter().map(|r| f(r)).sum::<f64>() / n;
                let mean_opt = |f: fn(&ResultRow) -> Option<f64>| {
                    let v: Option<Vec<f64>> = all.iter().map(|r| f(r)).collect();
                    v.map(|v| v.iter().sum::<f64>() / n)
                };
                c.eval_loss = mean(|r| r.eval_loss);
                c.eval_ppl = mean(|r| r.eval_ppl);
                c.eval_kl = mean_opt(|r| r.eval_kl);
                c.eval_top1 = mean_opt(|r| r.eval_top1);
                c.seed = None;
            }
            c
        })
        .collect()
}

/// Reads `results.json` (an array of rows, or `{"rows": [...]}`) or `results.csv`.
pub fn read_results(path: &Path) -> Result<Vec<ResultRow>, LawError> {
    let err = |why: String| LawError::Read {
        path: path.display().to_string(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let is_csv = path.extension().is_some_and(|e| e == "csv");
    if !is_csv {
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            err(format!(
                "not JSON ({e}); pass the results.json or results.csv that `logitcache run` writes"
            ))
        })?;
        let rows = v.get("rows").cloned().unwrap_or(v);
        let rows: Vec<ResultRow> =
            serde_json::from_value(rows).map_err(|e| err(format!("not a list of results: {e}")))?;
        for (i, r) in rows.iter().enumerate() {
            if r.student_params == 0 || r.teacher_params == Some(0) {
                return Err(err(format!(
                    "row {i} ({} from {}): a parameter count of 0; sizes must be ≥ 1",
                    r.student, r.teacher
                )));
            }
        }
        return Ok(rows);
    }
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines
        .next()
        .ok_or_else(|| err("empty file".into()))?
        .split(',')
        .map(str::trim)
        .collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    for need in [
        "teacher",
        "teacher_params",
        "student",
        "student_params",
        "eval_loss",
    ] {
        if col(need).is_none() {
            return Err(err(format!(
                "no `{need}` column (header: {})",
                header.join(",")
            )));
        }
    }
    let mut rows = Vec::new();
    for (i, line) in lines.enumerate() {
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let get = |name: &str| {
            col(name)
                .and_then(|c| f.get(c).copied())
                .filter(|s| !s.is_empty())
        };
        let num = |name: &str| -> Result<Option<f64>, LawError> {
            get(name)
                .map(|s| {
                    s.parse::<f64>()
                        .map_err(|_| err(format!("line {}: {name} `{s}` is not a number", i + 2)))
                })
                .transpose()
        };
        let eval_loss =
            num("eval_loss")?.ok_or_else(|| err(format!("line {}: no eval_loss", i + 2)))?;
        // A size ≤ 0 (or a fraction of a parameter) would become 0 params and a log of 0.
        for name in ["teacher_params", "student_params"] {
            if let Some(v) = num(name)?
                && !(v >= 1.0 && v.is_finite())
            {
                return Err(err(format!(
                    "line {}: {name} {v} is not a parameter count (must be ≥ 1)",
                    i + 2
                )));
            }
        }
        rows.push(ResultRow {
            teacher: get("teacher").unwrap_or("").to_string(),
            teacher_params: num("teacher_params")?.map(|v| v as u64),
            student: get("student").unwrap_or("").to_string(),
            student_params: num("student_params")?
                .ok_or_else(|| err(format!("line {}: no student_params", i + 2)))?
                as u64,
            eval_loss,
            eval_ppl: num("eval_ppl")?.unwrap_or(eval_loss.exp()),
            eval_kl: num("eval_kl")?,
            eval_top1: num("eval_top1")?,
            steps: num("steps")?.unwrap_or(0.0) as u64,
            run_dir: get("run_dir").unwrap_or("").to_string(),
            cache: get("cache").map(str::to_string),
            recipe: get("recipe").map(str::to_string),
            seed: num("seed")?.map(|v| v as u64),
        });
    }
    Ok(rows)
}

/// Writes rows as CSV (the columns of [`ResultRow`]).
pub fn to_csv(rows: &[ResultRow]) -> String {
    let mut s = String::from(
        "teacher,teacher_params,student,student_params,eval_loss,eval_ppl,eval_kl,eval_top1,steps,run_dir,cache,recipe,seed\n",
    );
    let opt = |v: Option<f64>| v.map(|x| x.to_string()).unwrap_or_default();
    for r in rows {
        s.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
            r.teacher,
            r.teacher_params.map(|v| v.to_string()).unwrap_or_default(),
            r.student,
            r.student_params,
            r.eval_loss,
            r.eval_ppl,
            opt(r.eval_kl),
            opt(r.eval_top1),
            r.steps,
            r.run_dir,
            r.cache.as_deref().unwrap_or(""),
            r.recipe.as_deref().unwrap_or(""),
            r.seed.map(|v| v.to_string()).unwrap_or_default(),
        ));
    }
    s
}

/// Each student's best teacher by `metric` (students in order of size). Needs one teacher
/// per student, not a fit's worth: the report uses it for any grid.
pub fn best_per_student(rows: &[ResultRow], metric: &str) -> Result<Vec<Best>, LawError> {
    let higher = METRICS
        .iter()
        .find(|m| m.0 == metric)
        .ok_or_else(|| LawError::Metric(metric.into()))?
        .1;
    let better = |a: f64, b: f64| if higher { a > b } else { a < b };
    let mut students: Vec<(u64, String)> = rows
        .iter()
        .filter(|r| r.teacher_params.is_some())
        .map(|r| (r.student_params, r.student.clone()))
        .collect();
    students.sort();
    students.dedup();
    let teacher_params = || rows.iter().filter_map(|r| r.teacher_params);
    let largest = teacher_params().max().unwrap_or(0);
    let smallest = teacher_params().min().unwrap_or(0);
    let mut best = Vec::new();
    for (sp, name) in students {
        let mine = || {
            rows.iter()
                .enumerate()
                .filter(|(_, r)| r.student_params == sp && r.student == name)
        };
        let mut top: Option<(f64, &ResultRow)> = None;
        let mut teachers = std::collections::BTreeSet::new();
        for (i, r) in mine().filter(|(_, r)| r.teacher_params.is_some()) {
            let v = r
                .metric(metric)
                .filter(|v| v.is_finite())
                .ok_or_else(|| LawError::BadValue(i, metric.into()))?;
            teachers.insert(r.teacher_params);
            if top.is_none_or(|(b, _)| better(v, b)) {
                top = Some((v, r));
            }
        }
        let (value, r) = top.expect("the student has a distilled row: this is a bug");
        let tp = r.teacher_params.expect("a distilled row: this is a bug");
        best.push(Best {
            student: name.clone(),
            student_params: sp,
            teacher: r.teacher.clone(),
            teacher_params: tp,
            value,
            at_largest: tp == largest,
            at_smallest: tp == smallest,
            ce_value: mine()
                .find(|(_, r)| r.teacher_params.is_none())
                .and_then(|(_, r)| r.metric(metric)),
            teachers: teachers.len(),
        });
    }
    Ok(best)
}

/// Finds each student size's best teacher by `metric` and fits the line through them.
pub fn fit(rows: &[ResultRow], metric: &str) -> Result<LawFit, LawError> {
    let best = best_per_student(rows, metric)?;
    let sizes: std::collections::BTreeSet<u64> = best.iter().map(|b| b.student_params).collect();
    if sizes.len() < 3 {
        return Err(LawError::TooFewStudents(
            sizes.len(),
            best.iter()
                .map(|b| b.student.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        ));
    }
    if let Some(b) = best.iter().find(|b| b.teachers < 2) {
        return Err(LawError::TooFewTeachers(b.student.clone()));
    }
    if best.iter().all(|b| b.at_largest) {
        return Err(LawError::NoInteriorOptimum(
            best[0].teacher.clone(),
            best[0].teacher_params,
        ));
    }
    let n = best.len() as f64;
    let xs: Vec<f64> = best.iter().map(|b| b.student_params as f64).collect();
    let ys: Vec<f64> = best.iter().map(|b| b.teacher_params as f64).collect();
    let mx = xs.iter().sum::<f64>() / n;
    let my = ys.iter().sum::<f64>() / n;
    let sxx: f64 = xs.iter().map(|x| (x - mx).powi(2)).sum();
    let sxy: f64 = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let syy: f64 = ys.iter().map(|y| (y - my).powi(2)).sum();
    if sxx <= 0.0 {
        return Err(LawError::Degenerate);
    }
    let slope = sxy / sxx;
    let intercept = my - slope * mx;
    let ssr: f64 = xs
        .iter()
        .zip(&ys)
        .map(|(x, y)| (y - slope * x - intercept).powi(2))
        .sum();
    // All optima equal: the line is flat and explains everything there is to explain.
    let r2 = if syy > 0.0 { 1.0 - ssr / syy } else { 1.0 };
    let sigma = if best.len() > 2 {
        (ssr / (n - 2.0)).sqrt()
    } else {
        0.0
    };
    let ratio = xs.iter().zip(&ys).map(|(x, y)| y / x).sum::<f64>() / n;
    Ok(LawFit {
        metric: metric.into(),
        best,
        slope,
        intercept,
        r2,
        ratio,
        sigma,
        mean_s: mx,
        sxx,
    })
}

/// `1234567` → `1.23M`.
pub fn human(n: f64) -> String {
    let a = n.abs();
    if a >= 1e9 {
        format!("{:.2}B", n / 1e9)
    } else if a >= 1e6 {
        format!("{:.2}M", n / 1e6)
    } else if a >= 1e3 {
        format!("{:.1}k", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}

/// The fit as text (what `logitcache law` prints and the report embeds).
pub fn describe(f: &LawFit) -> String {
    let mut s = format!("best teacher per student size (by {}):\n", f.metric);
    s.push_str("| student | params | best teacher | params | T*/S | value | CE-only |\n|---|---|---|---|---|---|---|\n");
    for b in &f.best {
        s.push_str(&format!(
            "| {} | {} | {}{} | {} | {:.2} | {:.4} | {} |\n",
            b.student,
            human(b.student_params as f64),
            b.teacher,
            if b.at_largest {
                " (largest in grid)"
            } else if b.at_smallest {
                " (smallest in grid)"
            } else {
                ""
            },
            human(b.teacher_params as f64),
            b.teacher_params as f64 / b.student_params as f64,
            b.value,
            b.ce_value.map(|v| format!("{v:.4}")).unwrap_or("-".into()),
        ));
    }
    s.push_str(&format!(
        "\nfit: T* = {:.3} · S {} {}   (R² = {:.3}, n = {}, mean T*/S = {:.2})\n",
        f.slope,
        if f.intercept < 0.0 { "-" } else { "+" },
        human(f.intercept.abs()),
        f.r2,
        f.best.len(),
        f.ratio
    ));
    if f.best.iter().any(|b| b.at_largest) {
        s.push_str("note: some students are best with the largest teacher; their true optimum may lie beyond the grid.\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A grid whose loss is minimised exactly at teacher = `opt(s)`.
    fn grid(students: &[u64], teachers: &[u64], opt: impl Fn(f64) -> f64) -> Vec<ResultRow> {
        let mut rows = Vec::new();
        for &s in students {
            for &t in teachers {
                let loss = 2.0 + (t as f64 / opt(s as f64)).ln().powi(2);
                rows.push(ResultRow::kd(
                    &format!("t{t}"),
                    t,
                    &format!("s{s}"),
                    s,
                    loss,
                ));
            }
            rows.push(ResultRow {
                teacher: "ce".into(),
                teacher_params: None,
                ..ResultRow::kd("", 0, &format!("s{s}"), s, 9.0)
            });
        }
        rows
    }

    #[test]
    fn law_rows_keep_the_first_cache_and_recipe_and_average_the_seeds() {
        let row = |t: &str, tp: Option<u64>, cache: Option<&str>, recipe: Option<&str>, seed, l| {
            ResultRow {
                teacher_params: tp,
                cache: cache.map(String::from),
                recipe: recipe.map(String::from),
                seed: Some(seed),
                eval_kl: tp.map(|_| l / 10.0),
                ..ResultRow::kd(t, 0, "s", 5, l)
            }
        };
        let mut rows = Vec::new();
        for seed in [0, 1] {
            for (c, r, l) in [("a", "kd", 3.0), ("a", "ce", 4.0), ("b", "kd", 5.0)] {
                rows.push(row("t", Some(10), Some(c), Some(r), seed, l + seed as f64));
            }
            rows.push(row("ce", None, None, None, seed, 7.0 + seed as f64));
        }
        let got = law_rows(&rows);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!((got[0].teacher.as_str(), got[0].eval_loss), ("t", 3.5));
        assert_eq!(got[0].cache.as_deref(), Some("a"));
        assert_eq!(got[0].recipe.as_deref(), Some("kd"));
        assert_eq!(got[0].seed, None);
        assert!((got[0].eval_kl.unwrap() - 0.35).abs() < 1e-12);
        assert!((got[0].eval_ppl - (3f64.exp() + 4f64.exp()) / 2.0).abs() < 1e-9);
        assert_eq!((got[1].teacher.as_str(), got[1].eval_loss), ("ce", 7.5));
        // A plain grid (one row per cell) comes back as it was.
        let plain = grid(&[10, 20], &[20, 40], |s| s);
        assert_eq!(law_rows(&plain), plain);
    }

    #[test]
    fn recovers_a_known_linear_optimum() {
        // Optimum T* = 3 S + 10: the teachers include exactly those points.
        let rows = grid(&[10, 20, 40, 80], &[20, 40, 70, 130, 250, 400], |s| {
            3.0 * s + 10.0
        });
        let f = fit(&rows, "eval_loss").unwrap();
        let tp: Vec<u64> = f.best.iter().map(|b| b.teacher_params).collect();
        assert_eq!(tp, vec![40, 70, 130, 250]);
        assert!((f.slope - 3.0).abs() < 1e-12, "{}", f.slope);
        assert!((f.intercept - 10.0).abs() < 1e-9);
        assert!((f.r2 - 1.0).abs() < 1e-12);
        assert_eq!(f.best[0].ce_value, Some(9.0));
        let (t, se) = f.predict(100.0);
        assert!((t - 310.0).abs() < 1e-9 && se < 1e-9);
    }

    #[test]
    fn noisy_optima_give_a_fit_with_uncertainty() {
        // Optima off the line: 20→50, 40→110, 60→140, 80→210.
        let mut rows = Vec::new();
        for (s, best) in [(20u64, 50u64), (40, 110), (60, 140), (80, 210)] {
            for t in [50u64, 110, 140, 210, 300] {
                let loss = if t == best {
                    1.0
                } else {
                    2.0 + t as f64 * 1e-3
                };
                rows.push(ResultRow::kd(
                    &format!("t{t}"),
                    t,
                    &format!("s{s}"),
                    s,
                    loss,
                ));
            }
        }
        let f = fit(&rows, "eval_loss").unwrap();
        // Closed form: x̄ = 50, ȳ = 127.5, Sxx = 2000, Sxy = 5100 → slope 2.55, b = 0.
        assert!((f.slope - 2.55).abs() < 1e-12 && f.intercept.abs() < 1e-9);
        assert!(f.r2 > 0.9 && f.r2 < 1.0);
        let (t, se) = f.predict(50.0);
        assert!((t - 127.5).abs() < 1e-9);
        // Residuals -1, 8, -13, 6 → SSR = 270, σ² = 270 / 2; se at the mean = sqrt(σ²/4).
        assert!((se - (135.0f64 / 4.0).sqrt()).abs() < 1e-9, "{se}");
        // Higher-is-better metrics pick the maximum.
        let mut rows = grid(&[1, 2, 3], &[2, 4, 6, 100], |s| 2.0 * s);
        for r in &mut rows {
            r.eval_top1 = Some(-r.eval_loss);
        }
        let f = fit(&rows, "eval_top1").unwrap();
        assert_eq!(
            f.best.iter().map(|b| b.teacher_params).collect::<Vec<_>>(),
            vec![2, 4, 6]
        );
    }

    #[test]
    fn refuses_what_cannot_be_fitted() {
        let two = grid(&[10, 20], &[20, 40, 80], |s| 2.0 * s);
        let e = fit(&two, "eval_loss").unwrap_err().to_string();
        assert!(
            e.contains("at least 3 student sizes") && e.contains("have 2"),
            "{e}"
        );
        // Every optimum beyond the grid: all best with the largest teacher.
        let edge = grid(&[10, 20, 30], &[5, 8, 12], |s| 10.0 * s);
        let e = fit(&edge, "eval_loss").unwrap_err().to_string();
        assert!(
            e.contains("no optimum inside the grid") && e.contains("t12"),
            "{e}"
        );
        let e = fit(&edge, "accuracy").unwrap_err().to_string();
        assert!(e.contains("unknown metric `accuracy`"), "{e}");
        let one_teacher = grid(&[10, 20, 30], &[20], |s| 2.0 * s);
        let e = fit(&one_teacher, "eval_loss").unwrap_err().to_string();
        assert!(e.contains("fewer than 2 teachers"), "{e}");
    }

    #[test]
    fn csv_and_json_round_trip() {
        let rows = grid(&[10, 20, 30], &[20, 40, 60], |s| 2.0 * s);
        let dir = tempfile::tempdir().unwrap();
        let csv = dir.path().join("r.csv");
        std::fs::write(&csv, to_csv(&rows)).unwrap();
        assert_eq!(read_results(&csv).unwrap(), rows);
        let json = dir.path().join("r.json");
        std::fs::write(
            &json,
            serde_json::to_string(&serde_json::json!({"rows": rows})).unwrap(),
        )
        .unwrap();
        assert_eq!(read_results(&json).unwrap(), rows);
        std::fs::write(&csv, "teacher,student\nx,y\n").unwrap();
        let e = read_results(&csv).unwrap_err().to_string();
        assert!(e.contains("no `teacher_params` column"), "{e}");
    }
}

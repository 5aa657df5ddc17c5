//! `report.md` and its pictures (PNG via plotters; text drawn with the committed DejaVu
//! Sans Mono, so no system font library is needed): student eval loss vs teacher size per
//! student, held-out loss curves, and the law fit.

use super::{CacheInfo, CacheSection};
use super::{Pipeline, TeacherInfo};
use crate::cache::reader::Cache;
use crate::cache::schema::{CacheMode, LogprobDtype};
use crate::law::{LawError, LawFit, ResultRow, describe, human, law_rows};
use crate::student::run_dir::RunDir;
use anyhow::anyhow;
use plotters::prelude::*;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

static FONT: &[u8] = include_bytes!("DejaVuSansMono.ttf");

/// Differences in held-out loss below this (nats) are not called a capacity gap: one run
/// per cell with one seed cannot separate them from noise. Measured on the demo: the same
/// (teacher, student) cell moved by up to 0.07 nats across seeds 0-2, and the difference
/// between two teachers for one student at a fixed seed ranged over 0.03 nats.
pub const NOISE_NATS: f64 = 0.03;

fn fonts() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT)
            .map_err(|_| ())
            .expect("the committed font parses");
    });
}

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing the report: {e}")
}

fn color(i: usize) -> RGBColor {
    const C: [RGBColor; 8] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
    ];
    C[i % C.len()]
}

/// The students of the results, smallest first.
fn students(rows: &[ResultRow]) -> Vec<String> {
    let mut s: Vec<(u64, &str)> = rows
        .iter()
        .map(|r| (r.student_params, r.student.as_str()))
        .collect();
    s.sort();
    s.dedup();
    s.into_iter().map(|(_, n)| n.to_string()).collect()
}

fn range(vals: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in vals {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.08).max(1e-3);
    (lo - pad, hi + pad)
}

/// Student eval loss vs teacher params (log axis), one line per student, CE-only level as
/// a horizontal line of the same colour.
fn plot_loss_vs_teacher(
    path: &Path,
    teachers: &[TeacherInfo],
    rows: &[ResultRow],
) -> anyhow::Result<()> {
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let tp: Vec<f64> = teachers.iter().map(|t| t.params as f64).collect();
    let (xlo, xhi) = (
        tp.iter().cloned().fold(f64::INFINITY, f64::min) / 1.3,
        tp.iter().cloned().fold(0.0, f64::max) * 1.3,
    );
    let (ylo, yhi) = range(rows.iter().map(|r| r.eval_loss));
    let mut chart = ChartBuilder::on(&root)
        .caption("student held-out loss vs teacher size", ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((xlo..xhi).log_scale(), ylo..yhi)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("teacher parameters")
        .y_desc("student eval loss (CE, nats)")
        .x_label_formatter(&|v| human(*v))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(err)?;
    let students = students(rows);
    for (i, s) in students.iter().enumerate() {
        let c = color(i);
        let mut pts: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| &r.student == s)
            .filter_map(|r| Some((r.teacher_params? as f64, r.eval_loss)))
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(pts.clone(), c.stroke_width(2)))
            .map_err(err)?
            .label(format!("{s} (KD)"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart
            .draw_series(pts.iter().map(|p| Circle::new(*p, 4, c.filled())))
            .map_err(err)?;
        if let Some(ce) = rows
            .iter()
            .find(|r| &r.student == s && r.teacher_params.is_none())
        {
            chart
                .draw_series(LineSeries::new(
                    vec![(xlo, ce.eval_loss), (xhi, ce.eval_loss)],
                    c.mix(0.5).stroke_width(1),
                ))
                .map_err(err)?
                .label(format!("{s} (CE only)"))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.mix(0.5).stroke_width(1))
                });
        }
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Held-out loss over training steps, one panel per student, one line per teacher (+ CE).
fn plot_curves(path: &Path, teachers: &[TeacherInfo], rows: &[ResultRow]) -> anyhow::Result<()> {
    let students = students(rows);
    let n = students.len().max(1);
    let root = BitMapBackend::new(path, (420 * n as u32, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let panels = root.split_evenly((1, n));
    let mut order: Vec<String> = teachers.iter().map(|t| t.name.clone()).collect();
    order.push("ce".into());
    for (s, area) in students.iter().zip(panels.iter()) {
        let curves: Vec<(usize, Vec<(f64, f64)>)> = rows
            .iter()
            .filter(|r| &r.student == s)
            .map(|r| {
                let idx = order.iter().position(|t| *t == r.teacher).unwrap_or(0);
                let pts = RunDir::new(&r.run_dir)
                    .evals()
                    .iter()
                    .map(|e| (e.step as f64, e.metrics.eval_loss))
                    .filter(|p| p.1.is_finite())
                    .collect();
                (idx, pts)
            })
            .collect();
        let (ylo, yhi) = range(curves.iter().flat_map(|c| c.1.iter().map(|p| p.1)));
        let xhi = curves
            .iter()
            .flat_map(|c| c.1.iter().map(|p| p.0))
            .fold(1.0, f64::max);
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{s}: held-out loss"), ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(55)
            .build_cartesian_2d(0.0..xhi, ylo..yhi)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(err)?;
        for (idx, pts) in curves {
            let c = if order[idx] == "ce" {
                BLACK
            } else {
                color(idx)
            };
            let name = order[idx].clone();
            chart
                .draw_series(LineSeries::new(pts, c.stroke_width(2)))
                .map_err(err)?
                .label(if name == "ce" {
                    "CE only".to_string()
                } else {
                    format!("teacher {name}")
                })
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .label_font(("sans-serif", 12))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Optimal teacher vs student params with the fitted line and the paper's 2.5·S.
fn plot_law(path: &Path, f: &LawFit) -> anyhow::Result<()> {
    let root = BitMapBackend::new(path, (800, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let xs: Vec<f64> = f.best.iter().map(|b| b.student_params as f64).collect();
    let ys: Vec<f64> = f.best.iter().map(|b| b.teacher_params as f64).collect();
    let xhi = xs.iter().cloned().fold(0.0, f64::max) * 1.15;
    let yhi = ys
        .iter()
        .cloned()
        .fold(0.0, f64::max)
        .max(f.slope * xhi + f.intercept)
        .max(2.5 * xhi)
        * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "optimal teacher vs student: T* = {:.2}·S {} {} (R² {:.2})",
                f.slope,
                if f.intercept < 0.0 { "-" } else { "+" },
                human(f.intercept.abs()),
                f.r2
            ),
            ("sans-serif", 18),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..xhi, 0.0..yhi)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("student parameters")
        .y_desc("best teacher parameters")
        .x_label_formatter(&|v| human(*v))
        .y_label_formatter(&|v| human(*v))
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(err)?;
    let c = color(0);
    chart
        .draw_series(
            xs.iter()
                .zip(&ys)
                .map(|(x, y)| Circle::new((*x, *y), 6, c.filled())),
        )
        .map_err(err)?
        .label("best teacher in the grid")
        .legend(move |(x, y)| Circle::new((x + 10, y), 5, c.filled()));
    let r = color(3);
    chart
        .draw_series(LineSeries::new(
            vec![(0.0, f.intercept), (xhi, f.slope * xhi + f.intercept)],
            r.stroke_width(2),
        ))
        .map_err(err)?
        .label("least-squares fit")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], r.stroke_width(2)));
    let g = RGBColor(120, 120, 120);
    chart
        .draw_series(LineSeries::new(
            vec![(0.0, 0.0), (xhi, 2.5 * xhi)],
            g.stroke_width(1),
        ))
        .map_err(err)?
        .label("paper: T* = 2.5·S")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], g.stroke_width(1)));
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// What a cache setting stores, in words.
fn describe_cache(c: &CacheSection) -> String {
    let samples = c.samples.unwrap_or(crate::teacher::DEFAULT_SAMPLES);
    let mut d = match c.mode {
        CacheMode::Topk => format!("top-{}", c.top_k),
        CacheMode::Sample => format!("{samples} draws per position (sample)"),
        CacheMode::Hybrid => format!("top-{} + {samples} tail draws (hybrid)", c.top_k),
    };
    if c.mode != CacheMode::Topk && c.proposal_temperature != 1.0 {
        d += &format!(" from the proposal p^(1/{})", c.proposal_temperature);
    }
    if c.mode != CacheMode::Topk && c.sampling != crate::cache::schema::Sampling::Iid {
        d += &format!(", {} draws", c.sampling);
    }
    if c.mode != CacheMode::Sample && c.logprob_dtype != LogprobDtype::Float16 {
        d += &format!(", {} log-probs", c.logprob_dtype);
    }
    d
}

/// Mean and sample standard deviation (0 for one value).
fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = if v.len() > 1 {
        v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (m, var.sqrt())
}

/// What the report says of a paired difference `d` (same-seed, over seeds): a change is
/// only called one when the 95% interval of its mean excludes 0.
fn verdict(d: &[f64]) -> &'static str {
    let (m, sd) = mean_sd(d);
    if d.len() < 2 {
        return "one seed: cannot tell";
    }
    let half = crate::law::t95(d.len() - 1) * sd / (d.len() as f64).sqrt();
    if m.abs() <= half {
        "no difference (within the seed noise)"
    } else if m > 0.0 {
        "worse"
    } else {
        "better"
    }
}

/// `l` against `reference`, seed by seed: the mean and sd of the paired differences, the
/// mean as % of the reference's, and the verdict.
struct Paired {
    mean: f64,
    sd: f64,
    pct: f64,
    verdict: &'static str,
}

fn paired(l: &[f64], reference: &[f64]) -> Paired {
    let d: Vec<f64> = l.iter().zip(reference).map(|(a, b)| a - b).collect();
    let (mean, sd) = mean_sd(&d);
    Paired {
        mean,
        sd,
        pct: 100.0 * mean / mean_sd(reference).0,
        verdict: verdict(&d),
    }
}

/// The fidelity table's three gap cells (gap ± sd | % | verdict).
fn gap_cells(gap: Option<&Paired>, is_reference: bool) -> String {
    match gap {
        _ if is_reference => "reference | - | -".into(),
        Some(g) => format!(
            "{:+.4} ± {:.4} | {:+.2}% | {}",
            g.mean, g.sd, g.pct, g.verdict
        ),
        None => "- | - | -".into(),
    }
}

/// A cache's bytes per token and ids stored per position (top-k plus distinct sampled ids),
/// as table cells ("-" when the cache cannot be read).
fn size_cells(dir: &Path) -> (String, String) {
    let Ok(cache) = Cache::open(dir) else {
        return ("-".into(), "-".into());
    };
    let m = &cache.manifest;
    let head = if m.params.mode == CacheMode::Sample {
        0.0
    } else {
        m.params.top_k as f64
    };
    let sampled = m.token_mean(|s| s.mean_distinct_ids).unwrap_or(0.0);
    (
        format!(
            "{:.1}",
            m.totals.bytes as f64 / m.totals.tokens.max(1) as f64
        ),
        format!("{:.1}", head + sampled),
    )
}

/// The section comparing caches, recipes and seeds (pipelines with `[[cache_variant]]`,
/// `[[recipe]]` or `[train] seeds`): per teacher and student, held-out CE mean ± sd over
/// the seeds, bytes per token, and the paired gap to the exact cache.
fn fidelity(
    md: &mut String,
    p: &Pipeline,
    teachers: &[TeacherInfo],
    rows: &[ResultRow],
) -> anyhow::Result<()> {
    let seeds = &p.seeds;
    let first_recipe = &p.recipes[0];
    let recipe_name = |r: &super::Recipe| r.name.clone().unwrap_or("[train]".into());
    writeln!(md, "## Cache fidelity\n")?;
    writeln!(
        md,
        "Every distilled student, per cache and recipe, over {} seed{} ({}); held-out CE in nats as mean ± sd over the seeds. The *exact* cache stores the whole distribution (top-k with k = V: full-logit KD); gap = mean of the paired same-seed differences to it (with the first recipe, `{}`), ± their sd, and as % of its loss; a gap is called a difference only when its 95% interval (Student t over the seeds) excludes 0. B/token: the cache's bytes on disk per token; ids/pos: distinct ids stored per position.\n",
        seeds.len(),
        if seeds.len() == 1 { "" } else { "s" },
        seeds
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        recipe_name(first_recipe),
    )?;
    let students = students(rows);
    for t in teachers {
        let vocab = t
            .caches
            .first()
            .and_then(|c| Cache::open(&c.dir).ok())
            .map(|c| c.manifest.vocab_size);
        let exact = t.caches.iter().find(|c| {
            c.settings.mode == CacheMode::Topk && vocab.is_some_and(|v| c.settings.top_k >= v)
        });
        // The reference: the first exact cache.
        let is_ref = |c: &CacheInfo| exact.is_some_and(|e| e.variant == c.variant);
        let name = |c: &CacheInfo| c.variant.clone().unwrap_or(c.label.clone());
        let sizes: Vec<(String, String)> = t.caches.iter().map(|c| size_cells(&c.dir)).collect();
        for s in &students {
            // The losses over the seeds of the rows `keep` selects (none unless every seed ran).
            let losses = |keep: &dyn Fn(&ResultRow) -> bool| {
                seeds
                    .iter()
                    .map(|&seed| {
                        rows.iter()
                            .find(|r| &r.student == s && r.seed == Some(seed) && keep(r))
                            .map(|r| r.eval_loss)
                    })
                    .collect::<Option<Vec<f64>>>()
            };
            let distilled = |c: &CacheInfo, rc: &super::Recipe| {
                losses(&|r: &ResultRow| {
                    r.teacher == t.name && r.cache == c.variant && r.recipe == rc.name
                })
            };
            let reference = exact.and_then(|e| distilled(e, first_recipe));
            writeln!(
                md,
                "### Student {s} from teacher {}\n\n| cache | stores | recipe | held-out CE | gap to exact | gap % | vs exact | B/token | ids/pos |\n|---|---|---|---|---|---|---|---|---|",
                t.name
            )?;
            // Each cache's losses with the first recipe, for the comparison below the table.
            let mut firsts: Vec<(String, Vec<f64>)> = Vec::new();
            for (c, (bpt, ids)) in t.caches.iter().zip(&sizes) {
                for (i, rc) in p.recipes.iter().enumerate() {
                    let Some(l) = distilled(c, rc) else {
                        continue;
                    };
                    let (m, sd) = mean_sd(&l);
                    let gap = reference.as_ref().map(|e| paired(&l, e));
                    let tag = if is_ref(c) && c.variant.as_deref() != Some("exact") {
                        " (exact)"
                    } else {
                        ""
                    };
                    writeln!(
                        md,
                        "| {}{tag} | {} | {} | {m:.4} ± {sd:.4} | {} | {bpt} | {ids} |",
                        name(c),
                        describe_cache(&c.settings),
                        recipe_name(rc),
                        gap_cells(gap.as_ref(), is_ref(c) && i == 0),
                    )?;
                    if i == 0 {
                        firsts.push((name(c), l));
                    }
                }
            }
            if p.file.train.ce_baseline
                && let Some(l) = losses(&|r: &ResultRow| r.teacher_params.is_none())
            {
                let (m, sd) = mean_sd(&l);
                let gap = reference.as_ref().map(|e| paired(&l, e));
                writeln!(
                    md,
                    "| CE only | tokens | CE | {m:.4} ± {sd:.4} | {} | - | - |",
                    gap_cells(gap.as_ref(), false)
                )?;
            }
            writeln!(md)?;
            if exact.is_none() {
                writeln!(
                    md,
                    "No exact cache in this grid (a `topk` variant with `top_k` ≥ the vocabulary): gaps need one.\n"
                )?;
            }
            // The best non-exact cache (first recipe) against each other one, seed by seed.
            let exact_name = exact.map(name);
            let others: Vec<&(String, Vec<f64>)> = firsts
                .iter()
                .filter(|(n, _)| exact_name.as_ref() != Some(n))
                .collect();
            let Some((bn, bl)) = others
                .iter()
                .min_by(|a, b| mean_sd(&a.1).0.total_cmp(&mean_sd(&b.1).0))
                .copied()
            else {
                continue;
            };
            let cmp: Vec<String> = others
                .iter()
                .filter(|(n, _)| n != bn)
                .map(|(n, l)| {
                    let wins = bl.iter().zip(l).filter(|(a, b)| a < b).count();
                    let g = paired(bl, l);
                    format!(
                        "lower than `{n}` in {wins} of {} seeds ({:+.4}: {})",
                        l.len(),
                        g.mean,
                        g.verdict
                    )
                })
                .collect();
            if !cmp.is_empty() {
                writeln!(
                    md,
                    "Best cache after the exact one (recipe `{}`): `{bn}`, {}.\n",
                    recipe_name(first_recipe),
                    cmp.join("; ")
                )?;
            }
        }
    }
    Ok(())
}

/// Writes `report.md` and `plots/*.png` into `out`; returns the report's path. `rows` are
/// every run's; the tables before the fidelity part and the law use [`law_rows`] of them.
pub fn write(
    p: &Pipeline,
    teachers: &[TeacherInfo],
    rows: &[ResultRow],
    law: &Result<LawFit, LawError>,
    out: &Path,
) -> anyhow::Result<PathBuf> {
    let all = rows;
    let rows = &law_rows(all)[..];
    fonts();
    let plots = out.join("plots");
    std::fs::create_dir_all(&plots)?;
    plot_loss_vs_teacher(&plots.join("loss_vs_teacher.png"), teachers, rows)?;
    plot_curves(&plots.join("curves.png"), teachers, rows)?;
    let law_png = plots.join("law.png");
    let _ = std::fs::remove_file(&law_png);
    if let Ok(f) = law {
        plot_law(&law_png, f)?;
    }

    let students = students(rows);
    let mut ts: Vec<&TeacherInfo> = teachers.iter().collect();
    ts.sort_by_key(|t| t.params);
    let get = |s: &str, t: Option<&str>| {
        rows.iter().find(|r| {
            r.student == s
                && t.map_or(r.teacher_params.is_none(), |t| {
                    r.teacher == t && r.teacher_params.is_some()
                })
        })
    };
    let f = &p.file;
    let mut md = String::new();
    writeln!(md, "# logitcache report: {}\n", p.name)?;
    writeln!(
        md,
        "Corpus: {}. Windows of {} tokens, {:.0}% held out (by `seq_id`): every number below is the next-token cross-entropy (nats) on the same held-out tokens. Caches: {} at T = {}. Students: {} steps of {} windows, {}.\n",
        f.data
            .corpus
            .iter()
            .map(|c| c
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned())
            .collect::<Vec<_>>()
            .join(", "),
        f.data.seq_len,
        f.data.eval_fraction * 100.0,
        if p.caches.len() > 1 {
            format!(
                "{} per teacher ({})",
                p.caches.len(),
                p.caches
                    .iter()
                    .map(|v| format!(
                        "`{}`: {}",
                        v.name.as_deref().unwrap_or(""),
                        describe_cache(&v.cache)
                    ))
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        } else {
            describe_cache(&f.cache)
        },
        f.cache.temperature,
        f.train.steps,
        f.train.batch_size,
        if p.recipes.len() > 1 {
            p.recipes
                .iter()
                .map(|r| {
                    let t = &r.train;
                    format!(
                        "`{}` ({}, {} x KD + {} x CE)",
                        r.name.as_deref().unwrap_or(""),
                        t.loss.name(),
                        t.kd_weight,
                        t.ce_weight
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        } else {
            format!("loss `{}`", f.train.loss.name())
        },
    )?;
    writeln!(
        md,
        "## Teachers\n\n| teacher | params | held-out loss | source |\n|---|---|---|---|"
    )?;
    for t in &ts {
        writeln!(
            md,
            "| {} | {} | {} | {} |",
            t.name,
            human(t.params as f64),
            t.eval_loss.map(|v| format!("{v:.4}")).unwrap_or("-".into()),
            if t.eval_loss.is_some() {
                "pretrained with CE by this pipeline"
            } else {
                "given ONNX file"
            }
        )?;
    }
    writeln!(
        md,
        "\n## Student eval loss by teacher (lower is better; **bold** = best teacher for that student)\n"
    )?;
    let mut head = "| student | params |".to_string();
    let mut rule = "|---|---|".to_string();
    for t in &ts {
        head += &format!(" {} ({}) |", t.name, human(t.params as f64));
        rule += "---|";
    }
    head += " CE only |";
    rule += "---|";
    writeln!(md, "{head}\n{rule}")?;
    let (mut gap, mut close) = (Vec::new(), Vec::new());
    let (mut kd_wins, mut kd_pairs) = (0, 0);
    let mut best_vs_ce = Vec::new();
    for best in &crate::law::best_per_student(rows, "eval_loss")? {
        let (s, bl, bt) = (&best.student, best.value, &best.teacher);
        let mut line = format!("| {s} | {} |", human(best.student_params as f64));
        let ce = best.ce_value;
        for t in &ts {
            match get(s, Some(&t.name)) {
                Some(r) => {
                    let bold = *bt == t.name;
                    line += &if bold {
                        format!(" **{:.4}** |", r.eval_loss)
                    } else {
                        format!(" {:.4} |", r.eval_loss)
                    };
                    if let Some(c) = ce {
                        kd_pairs += 1;
                        kd_wins += (r.eval_loss < c) as usize;
                    }
                }
                None => line += " - |",
            }
        }
        line += &ce.map(|c| format!(" {c:.4} |")).unwrap_or(" - |".into());
        writeln!(md, "{line}")?;
        if let Some(largest) = ts.last().filter(|l| l.name != *bt)
            && let Some(lr) = get(s, Some(&largest.name))
        {
            let margin = lr.eval_loss - bl;
            if margin >= NOISE_NATS {
                gap.push(format!(
                    "{s} is best with {bt} ({margin:.4} nats better than with the largest, {})",
                    largest.name
                ));
            } else {
                close.push(format!(
                    "{s} is best with {bt}, but only {margin:.4} nats ahead of the largest ({})",
                    largest.name
                ));
            }
        }
        if let Some(c) = ce {
            best_vs_ce.push(format!(
                "{s}: best KD {bl:.4} ({bt}) vs CE {c:.4} ({:+.4})",
                bl - c
            ));
        }
    }
    writeln!(
        md,
        "\n![student loss vs teacher size](plots/loss_vs_teacher.png)\n"
    )?;
    writeln!(md, "## Does this family show a capacity gap?\n")?;
    let n = students.len();
    if !gap.is_empty() {
        writeln!(
            md,
            "Yes, for {} of {n} student sizes: a smaller teacher gave a clearly better student ({}).",
            gap.len(),
            gap.join("; ")
        )?;
    } else if !close.is_empty() {
        writeln!(
            md,
            "Not clearly. {}: a margin under {NOISE_NATS} nats, within what one seed can move. The other student sizes are best with the largest teacher. Within this grid a larger teacher helped or made no measurable difference; an optimum, if there is one, lies at or beyond the largest teacher.",
            close.join("; ")
        )?;
    } else {
        writeln!(
            md,
            "No: every student size is best with the largest teacher of the grid. Within this grid a larger teacher always helped; the optimum, if there is one, lies beyond it."
        )?;
    }
    let pretrained: Vec<&&TeacherInfo> = ts.iter().filter(|t| t.eval_loss.is_some()).collect();
    if pretrained
        .windows(2)
        .any(|w| w[1].eval_loss.unwrap_or(0.0) >= w[0].eval_loss.unwrap_or(0.0))
    {
        writeln!(
            md,
            "\nCaution: the pretrained teachers' own held-out losses do not fall with size (table above), so a larger teacher here is not simply a stronger one — it is under-trained for its size. A \"capacity gap\" read from this grid mixes size with teacher quality; train the teachers longer to separate them."
        )?;
    }
    let which = if p.caches.len() > 1 || p.recipes.len() > 1 {
        " of the first cache and recipe (all of them are compared under Cache fidelity)"
    } else {
        ""
    };
    if p.seeds.len() > 1 {
        writeln!(
            md,
            "\nEach cell is the mean over {} seeds{which}; the law below is fitted to the best cell regardless.",
            p.seeds.len(),
        )?;
    } else {
        writeln!(
            md,
            "\nEach cell is one run with one seed{}; differences of a few hundredths of a nat can be noise (the law below is fitted to the best cell regardless).",
            if which.is_empty() { "" } else { "," }.to_string() + which
        )?;
    }
    writeln!(md, "\n## The law of capacity gap\n")?;
    match law {
        Ok(fit) => {
            writeln!(md, "{}", describe(fit))?;
            let (t, se) = fit.predict(
                fit.best
                    .last()
                    .map(|b| b.student_params as f64 * 2.0)
                    .unwrap_or(0.0),
            );
            writeln!(
                md,
                "For comparison the paper reports T* ≈ 2.5·S. Prediction for a student twice the largest here: {} ± {} (1 s.e.; 95% interval ± {}).\n\n![law fit](plots/law.png)\n",
                human(t),
                human(se),
                human(se * fit.t95())
            )?;
        }
        Err(e) => writeln!(md, "No fit: {e}.\n")?,
    }
    writeln!(
        md,
        "## Distillation vs CE only (same student, steps and data)\n"
    )?;
    if kd_pairs > 0 {
        writeln!(
            md,
            "Distilled runs minimise {} x KD (`{}`) + {} x CE; the baseline minimises CE alone. KD beat the CE-only baseline in {kd_wins} of {kd_pairs} (teacher, student) pairs.\n",
            p.recipes[0].train.kd_weight,
            p.recipes[0].train.loss.name(),
            p.recipes[0].train.ce_weight
        )?;
        for l in best_vs_ce {
            writeln!(md, "- {l}")?;
        }
    } else {
        writeln!(md, "No CE baseline was trained (`ce_baseline = false`).")?;
    }
    if p.is_grid() {
        writeln!(md)?;
        fidelity(&mut md, p, teachers, all)?;
    }
    writeln!(
        md,
        "{}## Training curves\n\n![held-out loss during training](plots/curves.png)\n",
        if p.is_grid() { "" } else { "\n" }
    )?;
    writeln!(
        md,
        "Files: `results.csv` / `results.json` (one row per run; `logitcache law {}` refits), `pipeline.resolved.json` (the pipeline with every default filled in), `{}` (checkpoints, metrics.jsonl), `{}`, `teachers/<name>/model.onnx`.",
        out.join("results.csv").display(),
        match (p.caches.len() > 1, p.recipes.len() > 1, p.seed_dirs()) {
            (false, false, false) => "runs/<teacher>/<student>/".to_string(),
            (c, r, sd) => format!(
                "runs/<teacher>{}{}{}/<student>/",
                if c { "@<cache>" } else { "" },
                if r { "/<recipe>" } else { "" },
                if sd { "/seed-<seed>" } else { "" }
            ),
        },
        if p.caches.len() > 1 {
            "caches/<teacher>@<cache>/"
        } else {
            "caches/<teacher>/"
        }
    )?;
    let path = out.join("report.md");
    crate::util::write_atomic(&path, md.as_bytes())?;
    Ok(path)
}

//! The run report: `report.md` with the run's key facts and the `loss_curve.svg` it embeds.
//!
//! The SVG is written by hand (no plotting dependency): train loss (raw, plus a smoothed line when
//! there are enough points) and eval loss against the optimizer step, with "nice" axis ticks, grid,
//! axis labels and a legend.

use crate::config::{LoraTargets, TrainConfig};
use crate::metrics::MetricsRecord;
use std::fmt::Write as _;
use std::path::Path;

/// The file name of the report in the run directory.
pub const REPORT_FILE: &str = "report.md";
/// The file name of the loss curve in the run directory.
pub const LOSS_CURVE_FILE: &str = "loss_curve.svg";

/// The facts about a run that the metrics log does not hold.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunFacts {
    /// How the run ended, e.g. `completed`, `stopped by SIGINT at step 120`.
    pub status: String,
    /// Model path or hub id.
    pub model: String,
    /// What was trained, e.g. `SFT, LoRA r=16, alpha=32, dropout=0.05, targets all-linear`.
    pub method: String,
    /// Training data files or folders as configured.
    pub data_files: Vec<String>,
    /// SHA-256 over the training data.
    pub data_hash: String,
    /// Trainable parameters, when known.
    pub trainable_params: Option<u64>,
    /// Optimizer steps completed.
    pub steps: u64,
    /// Optimizer steps planned.
    pub total_steps: u64,
    /// Trained tokens.
    pub tokens_seen: u64,
    /// Seconds of training (summed over resumed sessions).
    pub wall_time_s: f64,
    /// The resolved config as TOML.
    pub config_toml: String,
}

impl RunFacts {
    /// Facts taken from a resolved config (model, method, data, config text); the caller fills in
    /// status, hash and counts.
    pub fn from_config(cfg: &TrainConfig) -> Self {
        let method = if cfg.uses_lora() {
            let l = &cfg.lora;
            let targets = match &l.targets {
                LoraTargets::AllLinear => "all-linear".to_string(),
                LoraTargets::Modules(m) => m.join(", "),
            };
            format!(
                "SFT, LoRA r={}, alpha={}, dropout={}{}, targets {targets}",
                l.r,
                l.alpha,
                l.dropout,
                if l.rslora { ", rsLoRA" } else { "" }
            )
        } else {
            "SFT, full fine-tuning".to_string()
        };
        RunFacts {
            model: cfg.model.path.clone(),
            method,
            data_files: cfg.data.train.clone(),
            config_toml: cfg.to_toml(),
            ..Default::default()
        }
    }
}

fn format_duration(s: f64) -> String {
    let total = s.max(0.0).round() as u64;
    let (h, m, sec) = (total / 3600, (total % 3600) / 60, total % 60);
    if h > 0 {
        format!("{h}h {m:02}m {sec:02}s")
    } else if m > 0 {
        format!("{m}m {sec:02}s")
    } else {
        format!("{s:.1}s")
    }
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn md_escape(s: &str) -> String {
    s.replace('|', "\\|").replace('`', "'")
}

/// The Markdown report for a run: key facts, the loss curve (as `loss_curve.svg` beside it) and the
/// resolved config.
pub fn render_report(facts: &RunFacts, records: &[MetricsRecord]) -> String {
    let train_points: Vec<(u64, f64)> = records
        .iter()
        .filter_map(|r| r.loss.filter(|v| v.is_finite()).map(|l| (r.step, l)))
        .collect();
    // A logged train loss is the mean over the steps since the previous log line.
    let last_window = train_points.last().map(|&(step, l)| {
        let from = train_points
            .len()
            .checked_sub(2)
            .map_or(1, |i| train_points[i].0 + 1);
        (from, step, l)
    });
    let evals: Vec<(u64, f64)> = records
        .iter()
        .filter_map(|r| r.eval_loss.filter(|v| v.is_finite()).map(|l| (r.step, l)))
        .collect();
    let best_eval = evals.iter().copied().min_by(|a, b| a.1.total_cmp(&b.1));
    let mut md = String::from("# graft run report\n\n| | |\n|---|---|\n");
    let mut row = |k: &str, v: String| {
        let _ = writeln!(md, "| {k} | {v} |");
    };
    if !facts.status.is_empty() {
        row("Status", md_escape(&facts.status));
    }
    row("Model", format!("`{}`", md_escape(&facts.model)));
    row("Method", md_escape(&facts.method));
    if let Some(p) = facts.trainable_params {
        row("Trainable parameters", thousands(p));
    }
    let files: Vec<String> = facts
        .data_files
        .iter()
        .map(|f| format!("`{}`", md_escape(f)))
        .collect();
    row(
        "Training data",
        if files.is_empty() {
            "—".into()
        } else {
            files.join(", ")
        },
    );
    if !facts.data_hash.is_empty() {
        row("Data SHA-256", format!("`{}`", md_escape(&facts.data_hash)));
    }
    row(
        "Steps",
        if facts.total_steps > 0 {
            format!("{} / {}", facts.steps, facts.total_steps)
        } else {
            facts.steps.to_string()
        },
    );
    row("Tokens trained", thousands(facts.tokens_seen));
    row("Training time", format_duration(facts.wall_time_s));
    if facts.wall_time_s > 0.0 {
        row(
            "Throughput",
            format!("{:.1} tokens/s", facts.tokens_seen as f64 / facts.wall_time_s),
        );
    }
    let loss = |x: Option<(u64, f64)>| {
        x.map(|(s, l)| format!("{l:.4} (step {s})"))
            .unwrap_or_else(|| "—".into())
    };
    row(
        "Final train loss (mean over the last logged steps)",
        last_window
            .map(|(from, to, l)| {
                if from >= to {
                    format!("{l:.4} (step {to})")
                } else {
                    format!("{l:.4} (steps {from}–{to})")
                }
            })
            .unwrap_or_else(|| "—".into()),
    );
    row("Final eval loss", loss(evals.last().copied()));
    row("Best eval loss", loss(best_eval));
    md.push_str("\n## Loss curve\n\n![Training and evaluation loss](");
    md.push_str(LOSS_CURVE_FILE);
    md.push_str(")\n");
    for (metric, file) in METRIC_CURVES {
        if records.iter().any(|r| r.extra.contains_key(metric)) {
            let _ = write!(md, "\n## {metric}\n\n![{metric}]({file})\n");
        }
    }
    if !facts.config_toml.is_empty() {
        md.push_str("\n## Config\n\n```toml\n");
        md.push_str(facts.config_toml.trim_end());
        md.push_str("\n```\n");
    }
    md
}

/// Writes `loss_curve.svg` and `report.md` into `run_dir`.
pub fn write_report(run_dir: &Path, facts: &RunFacts, records: &[MetricsRecord]) -> std::io::Result<()> {
    std::fs::write(run_dir.join(LOSS_CURVE_FILE), loss_curve_svg(records))?;
    for (metric, file) in METRIC_CURVES {
        if records.iter().any(|r| r.extra.contains_key(metric)) {
            std::fs::write(run_dir.join(file), metric_curve_svg(records, metric))?;
        }
    }
    std::fs::write(run_dir.join(REPORT_FILE), render_report(facts, records))
}

/// A "nice" step (1, 2 or 5 × 10ᵏ) giving about `target` intervals over `span`.
fn nice_step(span: f64, target: usize) -> f64 {
    let raw = span / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let nice = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 2.5 {
        2.5
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

/// An axis: the range `[lo, hi]` rounded out to ticks, and the ticks.
struct Axis {
    lo: f64,
    hi: f64,
    ticks: Vec<f64>,
    decimals: usize,
}

fn axis(min: f64, max: f64, target: usize, integer: bool) -> Axis {
    let (mut min, mut max) = (min, max);
    if max - min < 1e-12 {
        let pad = if min.abs() > 1e-12 { min.abs() * 0.1 } else { 1.0 };
        min -= pad;
        max += pad;
    }
    let mut step = nice_step(max - min, target);
    if integer {
        step = step.max(1.0).round();
    }
    let lo = (min / step).floor() * step;
    let hi = (max / step).ceil() * step;
    let n = ((hi - lo) / step).round() as usize;
    let ticks = (0..=n).map(|i| lo + i as f64 * step).collect();
    let decimals = if integer {
        0
    } else {
        (-step.log10().floor()).max(0.0) as usize
            + usize::from(step / 10f64.powf(step.log10().floor()) == 2.5)
    };
    Axis {
        lo,
        hi,
        ticks,
        decimals,
    }
}

/// TensorBoard-style smoothing: an exponential moving average, debiased at the start.
fn smooth(values: &[f64], weight: f64) -> Vec<f64> {
    let mut ema = 0.0;
    let mut out = Vec::with_capacity(values.len());
    for (i, &v) in values.iter().enumerate() {
        ema = ema * weight + (1.0 - weight) * v;
        out.push(ema / (1.0 - weight.powi(i as i32 + 1)));
    }
    out
}

const TRAIN_COLOR: &str = "#1f6fb4";
const EVAL_COLOR: &str = "#d9480f";

/// The loss curve as an SVG document: train loss and eval loss against step.
pub fn loss_curve_svg(records: &[MetricsRecord]) -> String {
    let train: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| r.loss.filter(|v| v.is_finite()).map(|l| (r.step as f64, l)))
        .collect();
    let eval: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| r.eval_loss.filter(|v| v.is_finite()).map(|l| (r.step as f64, l)))
        .collect();
    curve_svg("loss", "loss (per token)", &train, &eval)
}

/// The objective metrics plotted besides the loss (when a run logs them), with their files.
pub const METRIC_CURVES: [(&str, &str); 6] = [
    ("rewards/margins", "rewards_margins.svg"),
    ("rewards/accuracies", "rewards_accuracies.svg"),
    // Reward models (TRL's RewardTrainer names).
    ("margin", "margin.svg"),
    ("accuracy", "accuracy.svg"),
    // GRPO / RLOO.
    ("reward", "reward.svg"),
    ("completions/mean_length", "completion_length.svg"),
];

/// The curve of an objective metric (`rewards/margins`): train values and the `eval_` ones.
pub fn metric_curve_svg(records: &[MetricsRecord], metric: &str) -> String {
    let series = |key: &str| -> Vec<(f64, f64)> {
        records
            .iter()
            .filter_map(|r| r.extra.get(key).map(|&v| (r.step as f64, v)))
            .collect()
    };
    curve_svg(
        metric,
        metric,
        &series(metric),
        &series(&format!("eval_{metric}")),
    )
}

/// A train/eval curve against the optimizer step.
fn curve_svg(metric: &str, y_label: &str, train: &[(f64, f64)], eval: &[(f64, f64)]) -> String {
    let (train, eval) = (train.to_vec(), eval.to_vec());
    let (w, h) = (820.0, 460.0);
    let (left, right, top, bottom) = (72.0, 24.0, 48.0, 58.0);
    let (pw, ph) = (w - left - right, h - top - bottom);

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="Helvetica, Arial, sans-serif">"#
    );
    let _ = writeln!(svg, r##"<rect width="{w}" height="{h}" fill="#ffffff"/>"##);
    let _ = writeln!(
        svg,
        r##"<text x="{}" y="28" font-size="17" font-weight="bold" fill="#222" text-anchor="middle">{}</text>"##,
        left + pw / 2.0,
        if eval.is_empty() {
            format!("Training {metric}")
        } else {
            format!("Training and evaluation {metric}")
        }
    );

    let all_y: Vec<f64> = train.iter().chain(&eval).map(|p| p.1).collect();
    let all_x: Vec<f64> = train.iter().chain(&eval).map(|p| p.0).collect();
    if all_y.is_empty() {
        let _ = writeln!(
            svg,
            r##"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/><text x="{}" y="{}" font-size="14" fill="#666" text-anchor="middle">no {metric} recorded yet</text>"##,
            left + pw / 2.0,
            top + ph / 2.0
        );
        svg.push_str("</svg>\n");
        return svg;
    }
    let x_max = all_x.iter().copied().fold(f64::MIN, f64::max);
    let x_min = all_x.iter().copied().fold(f64::MAX, f64::min).min(0.0);
    let xa = axis(x_min, x_max.max(1.0), 8, true);
    let (y_min, y_max) = all_y
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &y| (a.min(y), b.max(y)));
    let ya = axis(y_min, y_max, 6, false);
    let px = |x: f64| left + (x - xa.lo) / (xa.hi - xa.lo) * pw;
    let py = |y: f64| top + ph - (y - ya.lo) / (ya.hi - ya.lo) * ph;

    // Grid and tick labels.
    svg.push_str(r##"<g stroke="#e6e6e6" stroke-width="1">"##);
    for &t in &ya.ticks {
        let _ = write!(
            svg,
            r#"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}"/>"#,
            left + pw,
            y = py(t)
        );
    }
    for &t in &xa.ticks {
        let _ = write!(
            svg,
            r#"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{:.1}"/>"#,
            top + ph,
            x = px(t)
        );
    }
    svg.push_str("</g>\n");
    svg.push_str(r##"<g font-size="12" fill="#444">"##);
    for &t in &ya.ticks {
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{:.*}</text>"#,
            left - 8.0,
            py(t) + 4.0,
            ya.decimals,
            t
        );
    }
    for &t in &xa.ticks {
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            px(t),
            top + ph + 18.0,
            t as i64
        );
    }
    svg.push_str("</g>\n");
    let _ = writeln!(
        svg,
        r##"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#888" stroke-width="1"/>"##
    );
    let _ = writeln!(
        svg,
        r##"<text x="{:.1}" y="{:.1}" font-size="13" fill="#333" text-anchor="middle">optimizer step</text>"##,
        left + pw / 2.0,
        h - 16.0
    );
    let _ = writeln!(
        svg,
        r##"<text x="18" y="{:.1}" font-size="13" fill="#333" text-anchor="middle" transform="rotate(-90 18 {:.1})">{y_label}</text>"##,
        top + ph / 2.0,
        top + ph / 2.0
    );

    let polyline = |pts: &[(f64, f64)], color: &str, width: f64, opacity: f64| {
        let coords: Vec<String> = pts
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        format!(
            r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="{width}" stroke-opacity="{opacity}" stroke-linejoin="round" stroke-linecap="round"/>"#,
            coords.join(" ")
        )
    };
    let mut legend: Vec<(String, &str, f64, bool)> = Vec::new();
    let smoothed = train.len() >= 20;
    if !train.is_empty() {
        if smoothed {
            let _ = writeln!(svg, "{}", polyline(&train, TRAIN_COLOR, 1.2, 0.35));
            let ys: Vec<f64> = train.iter().map(|p| p.1).collect();
            let s: Vec<(f64, f64)> = train.iter().map(|p| p.0).zip(smooth(&ys, 0.8)).collect();
            let _ = writeln!(svg, "{}", polyline(&s, TRAIN_COLOR, 2.2, 1.0));
            legend.push((format!("train {metric}"), TRAIN_COLOR, 0.35, false));
            legend.push((format!("train {metric} (smoothed)"), TRAIN_COLOR, 1.0, false));
        } else {
            let _ = writeln!(svg, "{}", polyline(&train, TRAIN_COLOR, 2.0, 1.0));
            if train.len() < 2 {
                let (x, y) = train[0];
                let _ = writeln!(
                    svg,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{TRAIN_COLOR}"/>"#,
                    px(x),
                    py(y)
                );
            }
            legend.push((format!("train {metric}"), TRAIN_COLOR, 1.0, false));
        }
    }
    if !eval.is_empty() {
        let _ = writeln!(svg, "{}", polyline(&eval, EVAL_COLOR, 2.0, 1.0));
        for &(x, y) in &eval {
            let _ = writeln!(
                svg,
                r##"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{EVAL_COLOR}" stroke="#fff" stroke-width="1.2"/>"##,
                px(x),
                py(y)
            );
        }
        legend.push((format!("eval {metric}"), EVAL_COLOR, 1.0, true));
    }

    // Legend, top right inside the plot.
    let lw = 190.0;
    let lh = 12.0 + 20.0 * legend.len() as f64;
    let lx = left + pw - lw - 10.0;
    let ly = top + 10.0;
    let _ = writeln!(
        svg,
        r##"<rect x="{lx:.1}" y="{ly:.1}" width="{lw}" height="{lh}" rx="4" fill="#ffffff" fill-opacity="0.9" stroke="#cccccc"/>"##
    );
    for (i, (label, color, opacity, marker)) in legend.iter().enumerate() {
        let y = ly + 16.0 + 20.0 * i as f64;
        let _ = writeln!(
            svg,
            r#"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{color}" stroke-width="2.2" stroke-opacity="{opacity}"/>"#,
            lx + 10.0,
            lx + 38.0
        );
        if *marker {
            let _ = writeln!(
                svg,
                r#"<circle cx="{:.1}" cy="{y:.1}" r="4" fill="{color}"/>"#,
                lx + 24.0
            );
        }
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" font-size="12.5" fill="#333">{label}</text>"##,
            lx + 46.0,
            y + 4.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(n: u64) -> Vec<MetricsRecord> {
        let mut rng = crate::rng::Rng::new(5);
        (1..=n)
            .map(|s| MetricsRecord {
                step: s * 10,
                loss: Some(2.0 + 1.5 * (-(s as f64) / 25.0).exp() + 0.15 * (rng.next_f64() - 0.5)),
                eval_loss: (s % 10 == 0).then(|| 2.1 + 1.4 * (-(s as f64) / 25.0).exp()),
                elapsed_s: s as f64,
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn svg_has_axes_legend_and_series() {
        let svg = loss_curve_svg(&records(100));
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        for want in [
            "optimizer step",
            "loss (per token)",
            "train loss (smoothed)",
            "eval loss",
            "<polyline",
        ] {
            assert!(svg.contains(want), "missing {want}");
        }
        assert_eq!(svg.matches("<circle").count(), 10 + 1);
        // Degenerate inputs still give a valid picture.
        assert!(loss_curve_svg(&[]).contains("no loss recorded yet"));
        let one = [
            MetricsRecord {
                step: 1,
                loss: Some(2.0),
                ..Default::default()
            },
            MetricsRecord {
                step: 2,
                loss: Some(f64::NAN),
                eval_loss: Some(f64::INFINITY),
                ..Default::default()
            },
        ];
        let svg = loss_curve_svg(&one);
        assert!(svg.contains("<circle") && !svg.contains("NaN") && !svg.contains("inf"));
    }

    #[test]
    fn nice_axes() {
        let a = axis(0.0, 1000.0, 8, true);
        assert_eq!((a.lo, a.hi), (0.0, 1000.0));
        assert_eq!(a.ticks, vec![0.0, 200.0, 400.0, 600.0, 800.0, 1000.0]);
        let a = axis(1.93, 3.61, 6, false);
        assert!(a.lo <= 1.93 && a.hi >= 3.61);
        assert!(a.ticks.len() >= 4 && a.ticks.len() <= 10);
        let a = axis(2.0, 2.0, 6, false);
        assert!(a.lo < 2.0 && a.hi > 2.0);
    }

    #[test]
    fn report_lists_key_facts() {
        let text = "[model]\npath = \"org/m\"\n[data]\ntrain = [\"a.jsonl\", \"b.jsonl\"]\n";
        let cfg = TrainConfig::from_toml_str(text, "t.toml", &[]).unwrap();
        let mut facts = RunFacts::from_config(&cfg);
        facts.status = "completed".into();
        facts.data_hash = "abc123".into();
        facts.steps = 1000;
        facts.total_steps = 1000;
        facts.tokens_seen = 1_234_567;
        facts.wall_time_s = 3725.0;
        let md = render_report(&facts, &records(100));
        for want in [
            "`org/m`",
            "LoRA r=16",
            "`a.jsonl`, `b.jsonl`",
            "`abc123`",
            "1000 / 1000",
            "1,234,567",
            "1h 02m 05s",
            "331.4 tokens/s",
            "Best eval loss",
            "![Training and evaluation loss](loss_curve.svg)",
            "```toml\n",
        ] {
            assert!(md.contains(want), "missing {want}\n{md}");
        }
        let dir = std::env::temp_dir().join(format!("graft-report-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        write_report(&dir, &facts, &records(100)).unwrap();
        assert!(dir.join(REPORT_FILE).exists() && dir.join(LOSS_CURVE_FILE).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

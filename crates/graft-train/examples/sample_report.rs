//! Writes a report for a synthetic run, to look at the loss curve:
//! `cargo run -p graft-train --example sample_report -- OUT_DIR [STEPS]`
//! then e.g. `rsvg-convert OUT_DIR/loss_curve.svg -o curve.png`. With `PRINT_CONFIG=1` it prints
//! the documented example config instead.

use graft_train::config::TrainConfig;
use graft_train::metrics::MetricsRecord;
use graft_train::report::{RunFacts, write_report};
use graft_train::rng::Rng;

fn main() {
    if std::env::var_os("PRINT_CONFIG").is_some() {
        print!("{}", TrainConfig::documented_example());
        return;
    }
    let mut args = std::env::args().skip(1);
    let out = std::path::PathBuf::from(args.next().unwrap_or_else(|| "sample-report".into()));
    let steps: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(600);
    std::fs::create_dir_all(&out).expect("create output dir");
    let cfg = TrainConfig::from_toml_str(&TrainConfig::documented_example(), "example", &[])
        .expect("example parses");
    let mut rng = Rng::new(1);
    let log_every = (steps / 100).max(1);
    let records: Vec<MetricsRecord> = (1..=steps / log_every)
        .map(|i| {
            let step = i * log_every;
            let t = step as f64 / steps as f64;
            let base = 1.15 + 1.6 * (-6.0 * t).exp();
            MetricsRecord {
                step,
                loss: Some(base + 0.12 * (rng.next_f64() - 0.5)),
                eval_loss: i
                    .is_multiple_of((steps / log_every / 6).max(1))
                    .then_some(base + 0.08 + 0.1 * t),
                lr: Some(2e-4),
                elapsed_s: step as f64 * 1.5,
                ..Default::default()
            }
        })
        .collect();
    let mut facts = RunFacts::from_config(&cfg);
    facts.status = "completed".into();
    facts.steps = steps;
    facts.total_steps = steps;
    facts.tokens_seen = steps * 16384;
    facts.wall_time_s = steps as f64 * 1.5;
    facts.data_hash = "0123456789abcdef".into();
    write_report(&out, &facts, &records).expect("write report");
    println!("wrote {}", out.display());
}

//! Learning-rate schedules, as pure functions of the optimizer step.
//!
//! They match transformers' `get_cosine_schedule_with_warmup`, `get_linear_schedule_with_warmup`,
//! `get_constant_schedule_with_warmup` and `get_cosine_with_min_lr_schedule_with_warmup` (with
//! `min_lr_rate`). As there, step `k` (0-based) is the step whose update uses `lr_at(k)`, so with
//! warmup the first update uses lr 0. Being a function of the step, the schedule needs no state in a
//! checkpoint beyond the step itself.

use serde::{Deserialize, Serialize};

/// The shape of the decay after warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// Half a cosine from the peak down to the floor (`get_cosine_schedule_with_warmup`).
    Cosine,
    /// A straight line from the peak down to the floor (`get_linear_schedule_with_warmup`).
    Linear,
    /// The peak, constant after warmup (`get_constant_schedule_with_warmup`).
    Constant,
}

impl ScheduleKind {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            ScheduleKind::Cosine => "cosine",
            ScheduleKind::Linear => "linear",
            ScheduleKind::Constant => "constant",
        }
    }
}

/// A learning-rate schedule over `total_steps` optimizer steps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrSchedule {
    /// Decay shape after warmup.
    pub kind: ScheduleKind,
    /// The learning rate reached at the end of warmup.
    pub peak_lr: f64,
    /// Steps of linear warmup from 0 to `peak_lr`.
    pub warmup_steps: u64,
    /// Total optimizer steps of the run (the decay ends here).
    pub total_steps: u64,
    /// The floor of the decay as a fraction of `peak_lr` (transformers' `min_lr_rate`); 0 decays to
    /// 0. Applies to cosine and linear; constant ignores it.
    pub min_lr_ratio: f64,
}

/// Warmup steps for a run of `total_steps`: `warmup_steps` when given, else
/// `ceil(total_steps * warmup_ratio)` (transformers' `TrainingArguments.get_warmup_steps`).
pub fn warmup_steps_for(total_steps: u64, warmup_steps: Option<u64>, warmup_ratio: f64) -> u64 {
    match warmup_steps {
        Some(n) => n,
        None => (total_steps as f64 * warmup_ratio).ceil() as u64,
    }
}

impl LrSchedule {
    /// The schedule a resolved [`ScheduleConfig`](crate::config::ScheduleConfig) describes for a run
    /// of `total_steps` steps at peak learning rate `peak_lr`.
    pub fn from_config(cfg: &crate::config::ScheduleConfig, peak_lr: f64, total_steps: u64) -> Self {
        LrSchedule {
            kind: cfg.kind,
            peak_lr,
            warmup_steps: warmup_steps_for(total_steps, cfg.warmup_steps, cfg.warmup_ratio),
            total_steps,
            min_lr_ratio: cfg.min_lr_ratio,
        }
    }

    /// The multiplier of `peak_lr` at `step` (transformers' `lr_lambda`). Past `total_steps` the
    /// decay stays at its end value.
    pub fn factor_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return step as f64 / self.warmup_steps.max(1) as f64;
        }
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / decay_steps).min(1.0);
        let floor = self.min_lr_ratio;
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Cosine => {
                let num_cycles = 0.5;
                let factor = 0.5 * (1.0 + (std::f64::consts::PI * num_cycles * 2.0 * progress).cos());
                if floor == 0.0 {
                    factor.max(0.0)
                } else {
                    (factor * (1.0 - floor) + floor).max(0.0)
                }
            }
            ScheduleKind::Linear => {
                let remaining = self.total_steps.saturating_sub(step) as f64;
                let factor = (remaining / decay_steps).max(0.0);
                if floor == 0.0 {
                    factor
                } else {
                    factor * (1.0 - floor) + floor
                }
            }
        }
    }

    /// The learning rate for the update of `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        self.peak_lr * self.factor_at(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: ScheduleKind, warmup: u64, total: u64, floor: f64) -> LrSchedule {
        LrSchedule {
            kind,
            peak_lr: 1e-3,
            warmup_steps: warmup,
            total_steps: total,
            min_lr_ratio: floor,
        }
    }

    #[derive(serde::Deserialize)]
    struct Case {
        kind: ScheduleKind,
        warmup_steps: u64,
        total_steps: u64,
        min_lr_ratio: f64,
        factors: Vec<f64>,
    }

    #[derive(serde::Deserialize)]
    struct Fixture {
        cases: Vec<Case>,
    }

    #[test]
    fn matches_transformers_schedules() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/fixtures/optim/schedules.json"
        );
        let fx: Fixture = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert!(fx.cases.len() >= 15);
        for c in fx.cases {
            let s = LrSchedule {
                kind: c.kind,
                peak_lr: 1.0,
                warmup_steps: c.warmup_steps,
                total_steps: c.total_steps,
                min_lr_ratio: c.min_lr_ratio,
            };
            for (step, &want) in c.factors.iter().enumerate() {
                let got = s.lr_at(step as u64);
                assert!(
                    (got - want).abs() <= 1e-12,
                    "{s:?} step {step}: {got} vs transformers {want}"
                );
            }
        }
    }

    #[test]
    fn warmup_is_linear_from_zero() {
        let s = sched(ScheduleKind::Cosine, 10, 100, 0.0);
        assert_eq!(s.lr_at(0), 0.0);
        assert!((s.lr_at(5) - 5e-4).abs() < 1e-18);
        assert_eq!(s.lr_at(10), 1e-3);
    }

    #[test]
    fn cosine_reaches_zero_or_floor_at_the_end() {
        assert!(sched(ScheduleKind::Cosine, 0, 100, 0.0).lr_at(100).abs() < 1e-18);
        assert!((sched(ScheduleKind::Cosine, 0, 100, 0.1).lr_at(100) - 1e-4).abs() < 1e-15);
        assert!((sched(ScheduleKind::Cosine, 0, 100, 0.0).lr_at(50) - 5e-4).abs() < 1e-15);
        // Past the end the lr stays at the floor rather than rising again.
        assert!(sched(ScheduleKind::Cosine, 0, 100, 0.0).lr_at(150).abs() < 1e-18);
    }

    #[test]
    fn linear_and_constant() {
        let lin = sched(ScheduleKind::Linear, 0, 10, 0.0);
        assert!((lin.lr_at(5) - 5e-4).abs() < 1e-18);
        assert_eq!(lin.lr_at(10), 0.0);
        assert_eq!(lin.lr_at(20), 0.0);
        let floored = sched(ScheduleKind::Linear, 0, 10, 0.5);
        assert!((floored.lr_at(10) - 5e-4).abs() < 1e-18);
        let c = sched(ScheduleKind::Constant, 4, 10, 0.5);
        assert_eq!(c.lr_at(2), 5e-4);
        assert_eq!(c.lr_at(9), 1e-3);
    }

    #[test]
    fn warmup_from_ratio_rounds_up() {
        assert_eq!(warmup_steps_for(100, None, 0.03), 3);
        assert_eq!(warmup_steps_for(10, None, 0.05), 1);
        assert_eq!(warmup_steps_for(10, Some(7), 0.5), 7);
        assert_eq!(warmup_steps_for(10, None, 0.0), 0);
    }

    #[test]
    fn degenerate_runs_do_not_divide_by_zero() {
        for kind in [ScheduleKind::Cosine, ScheduleKind::Linear, ScheduleKind::Constant] {
            for (w, t) in [(0, 0), (0, 1), (1, 1), (5, 3)] {
                for step in 0..6 {
                    assert!(sched(kind, w, t, 0.0).lr_at(step).is_finite());
                }
            }
        }
    }
}

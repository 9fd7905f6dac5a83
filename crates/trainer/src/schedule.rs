//! Learning-rate schedules: constant, linear or cosine decay, each after a linear warmup.
use crate::config::{ScheduleKind, TrainConfig};

/// The learning rate for optimizer step `step` (0-based) of `total` steps.
pub fn lr_at(cfg: &TrainConfig, step: u64, total: u64) -> f64 {
    let base = cfg.lr;
    if cfg.warmup_steps > 0 && step < cfg.warmup_steps {
        return base * (step + 1) as f64 / cfg.warmup_steps as f64;
    }
    let min = base * cfg.min_lr_ratio;
    let span = total.saturating_sub(cfg.warmup_steps).max(1) as f64;
    let progress = ((step - cfg.warmup_steps.min(step)) as f64 / span).clamp(0.0, 1.0);
    match cfg.schedule {
        ScheduleKind::Constant => base,
        ScheduleKind::Linear => min + (base - min) * (1.0 - progress),
        ScheduleKind::Cosine => {
            min + (base - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(kind: ScheduleKind) -> TrainConfig {
        TrainConfig {
            lr: 1.0,
            warmup_steps: 4,
            min_lr_ratio: 0.1,
            schedule: kind,
            ..Default::default()
        }
    }

    #[test]
    fn warmup_is_linear_from_the_first_step() {
        let c = cfg(ScheduleKind::Constant);
        let lrs: Vec<f64> = (0..6).map(|s| lr_at(&c, s, 100)).collect();
        assert_eq!(lrs, vec![0.25, 0.5, 0.75, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn cosine_and_linear_end_at_the_floor() {
        for kind in [ScheduleKind::Cosine, ScheduleKind::Linear] {
            let c = cfg(kind);
            assert!((lr_at(&c, 4, 104) - 1.0).abs() < 1e-12);
            assert!((lr_at(&c, 104, 104) - 0.1).abs() < 1e-12);
            let mid = lr_at(&c, 54, 104);
            assert!((mid - 0.55).abs() < 1e-12, "{kind:?} {mid}");
        }
    }

    /// After warmup, against transformers' schedules (`optimization.py`), computed with their
    /// formula `0.5 * (1 + cos(pi * 2 * num_cycles * progress))`, num_cycles = 0.5, in Python:
    /// `get_cosine_with_min_lr_schedule_with_warmup(num_warmup_steps=4, num_training_steps=104,
    /// min_lr_rate=0.1)` and `get_cosine_schedule_with_warmup(4, 104)` (min_lr_rate 0), the same
    /// values as torch's `CosineAnnealingLR(T_max=100, eta_min=0.1)` closed form. At these
    /// steps cosine and linear differ (linear: 0.91, 0.775, 0.325, 0.19).
    #[test]
    fn cosine_matches_transformers_where_it_differs_from_linear() {
        let reference = [
            (14, 0.9779754323328191, 0.9755282581475768),
            (29, 0.8681980515339464, 0.8535533905932737),
            (79, 0.23180194846605365, 0.14644660940672627),
            (94, 0.12202456766718092, 0.024471741852423234),
        ];
        let floor = cfg(ScheduleKind::Cosine);
        let zero = TrainConfig {
            min_lr_ratio: 0.0,
            ..cfg(ScheduleKind::Cosine)
        };
        let linear = cfg(ScheduleKind::Linear);
        for (step, with_floor, without) in reference {
            let got = lr_at(&floor, step, 104);
            assert!((got - with_floor).abs() < 1e-12, "step {step}: {got}");
            let got = lr_at(&zero, step, 104);
            assert!((got - without).abs() < 1e-12, "step {step}: {got}");
            assert!((lr_at(&linear, step, 104) - with_floor).abs() > 0.05);
        }
    }
}

//! Learning-rate schedules, as transformers' `get_{constant,linear,cosine}_schedule_with_warmup`:
//! the multiplier for optimizer step `k` (0-based; `LambdaLR` is stepped after each update, so the
//! first update uses `k = 0`, i.e. lr 0 when there is warmup).

use finetune_crds::training::Scheduler;

/// Warmup steps: `warmupSteps`, else `ceil(total · warmupRatio)` (transformers' `get_warmup_steps`).
pub fn warmup_steps(steps: Option<i64>, ratio: Option<f64>, total: i64) -> i64 {
    match (steps, ratio) {
        (Some(s), _) => s,
        (None, Some(r)) => (total as f64 * r).ceil() as i64,
        (None, None) => 0,
    }
}

/// The multiplier of the peak learning rate at step `k`.
pub fn lr_lambda(kind: Scheduler, k: i64, warmup: i64, total: i64) -> f64 {
    if k < warmup {
        return k as f64 / warmup.max(1) as f64;
    }
    match kind {
        Scheduler::Constant => 1.0,
        Scheduler::Linear => (0.0f64).max((total - k) as f64 / (total - warmup).max(1) as f64),
        Scheduler::Cosine => {
            let progress = (k - warmup) as f64 / (total - warmup).max(1) as f64;
            // num_cycles = 0.5
            (0.0f64).max(0.5 * (1.0 + (std::f64::consts::PI * 0.5 * 2.0 * progress).cos()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_transformers_shapes() {
        // warmup 2 of 10
        assert_eq!(lr_lambda(Scheduler::Linear, 0, 2, 10), 0.0);
        assert_eq!(lr_lambda(Scheduler::Linear, 1, 2, 10), 0.5);
        assert_eq!(lr_lambda(Scheduler::Linear, 2, 2, 10), 1.0);
        assert_eq!(lr_lambda(Scheduler::Linear, 6, 2, 10), 0.5);
        assert!((lr_lambda(Scheduler::Cosine, 6, 2, 10) - 0.5).abs() < 1e-12);
        assert_eq!(lr_lambda(Scheduler::Constant, 9, 2, 10), 1.0);
        assert_eq!(warmup_steps(None, Some(0.05), 30), 2);
    }
}

//! Schedules given as factors of the base lr: Noam (Vaswani et al.) and the
//! transformers-style warm-up schedules.

use std::f64::consts::PI;

use super::py_mod;

/// Vaswani et al.'s schedule, `d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)` with
/// `step = last_epoch + 1`.
pub fn noam(last_epoch: i64, d_model: f64, warmup: i64) -> f64 {
    let step = (last_epoch + 1) as f64;
    d_model.powf(-0.5) * f64::min(step.powf(-0.5), step * (warmup as f64).powf(-1.5))
}

/// The lambdas of Hugging Face transformers' `get_*_schedule_with_warmup`, at `step`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum HfSchedule {
    Constant {
        warmup: i64,
    },
    Linear {
        warmup: i64,
        total: i64,
    },
    Cosine {
        warmup: i64,
        total: i64,
        num_cycles: f64,
    },
    CosineHardRestarts {
        warmup: i64,
        total: i64,
        num_cycles: i64,
    },
    Polynomial {
        warmup: i64,
        total: i64,
        lr_end: f64,
        power: f64,
        lr_init: f64,
    },
    InverseSqrt {
        warmup: i64,
        timescale: i64,
    },
    CosineMinLr {
        warmup: i64,
        total: i64,
        num_cycles: f64,
        min_lr_rate: f64,
    },
    Wsd {
        warmup: i64,
        stable: i64,
        decay: i64,
        min_lr_ratio: f64,
        num_cycles: f64,
        warmup_shape: Shape,
        decay_shape: Shape,
    },
}

/// The ramp shapes of the warmup-stable-decay schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    Linear,
    Cosine,
    OneMinusSqrt,
}

impl Shape {
    pub fn parse(name: &str) -> Option<Shape> {
        match name {
            "linear" => Some(Shape::Linear),
            "cosine" => Some(Shape::Cosine),
            "1-sqrt" => Some(Shape::OneMinusSqrt),
            _ => None,
        }
    }
}

fn ratio(a: i64, b: i64) -> f64 {
    a as f64 / (b.max(1)) as f64
}

impl HfSchedule {
    pub fn factor(&self, step: i64) -> f64 {
        match *self {
            HfSchedule::Constant { warmup } => {
                if step < warmup {
                    step as f64 / f64::max(1.0, warmup as f64)
                } else {
                    1.0
                }
            }
            HfSchedule::Linear { warmup, total } => {
                if step < warmup {
                    return ratio(step, warmup);
                }
                f64::max(0.0, (total - step) as f64 / (total - warmup).max(1) as f64)
            }
            HfSchedule::Cosine {
                warmup,
                total,
                num_cycles,
            } => {
                if step < warmup {
                    return ratio(step, warmup);
                }
                let progress = (step - warmup) as f64 / (total - warmup).max(1) as f64;
                f64::max(0.0, 0.5 * (1.0 + (PI * num_cycles * 2.0 * progress).cos()))
            }
            HfSchedule::CosineHardRestarts {
                warmup,
                total,
                num_cycles,
            } => {
                if step < warmup {
                    return ratio(step, warmup);
                }
                let progress = (step - warmup) as f64 / (total - warmup).max(1) as f64;
                if progress >= 1.0 {
                    return 0.0;
                }
                f64::max(
                    0.0,
                    0.5 * (1.0 + (PI * py_mod(num_cycles as f64 * progress, 1.0)).cos()),
                )
            }
            HfSchedule::Polynomial {
                warmup,
                total,
                lr_end,
                power,
                lr_init,
            } => {
                if step < warmup {
                    ratio(step, warmup)
                } else if step > total {
                    lr_end / lr_init
                } else {
                    let lr_range = lr_init - lr_end;
                    let decay_steps = total - warmup;
                    let pct_remaining = 1.0 - (step - warmup) as f64 / decay_steps as f64;
                    let decay = lr_range * pct_remaining.powf(power) + lr_end;
                    decay / lr_init
                }
            }
            HfSchedule::InverseSqrt { warmup, timescale } => {
                if step < warmup {
                    return step as f64 / f64::max(1.0, warmup as f64);
                }
                let shift = timescale - warmup;
                1.0 / (((step + shift) as f64 / timescale as f64).sqrt())
            }
            HfSchedule::CosineMinLr {
                warmup,
                total,
                num_cycles,
                min_lr_rate,
            } => {
                if step < warmup {
                    return ratio(step, warmup);
                }
                let progress = (step - warmup) as f64 / (total - warmup).max(1) as f64;
                let factor = 0.5 * (1.0 + (PI * num_cycles * 2.0 * progress).cos());
                let factor = factor * (1.0 - min_lr_rate) + min_lr_rate;
                f64::max(0.0, factor)
            }
            HfSchedule::Wsd {
                warmup,
                stable,
                decay,
                min_lr_ratio,
                num_cycles,
                warmup_shape,
                decay_shape,
            } => {
                if step < warmup {
                    let p = ratio(step, warmup);
                    let factor = match warmup_shape {
                        Shape::Linear => p,
                        Shape::Cosine => 0.5 * (1.0 - (PI * p).cos()),
                        Shape::OneMinusSqrt => 1.0 - (1.0 - p).sqrt(),
                    };
                    return f64::max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio);
                }
                if step < warmup + stable {
                    return 1.0;
                }
                if step < warmup + stable + decay {
                    let p = ratio(step - warmup - stable, decay);
                    let factor = match decay_shape {
                        Shape::Linear => 1.0 - p,
                        Shape::Cosine => 0.5 * (1.0 + (PI * num_cycles * 2.0 * p).cos()),
                        Shape::OneMinusSqrt => 1.0 - p.sqrt(),
                    };
                    return f64::max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio);
                }
                min_lr_ratio
            }
        }
    }
}

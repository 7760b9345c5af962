//! Learning-rate schedule math, written to reproduce torch.optim.lr_scheduler and
//! pytorch_warmup to the last bit: the same f64 operations in the same order (Python floats
//! are f64 and `math.cos`/`**` call the same libm as `cos`/`powf` here).
//!
//! Functions named `*_chain` are torch's recursive ("chainable") `get_lr` forms, which
//! update the current lr; `*_closed` are the closed forms (`step(epoch)`); the rest are
//! factors or state machines.

use std::f64::consts::PI;

/// Python's `a % b` for floats (the result takes the sign of `b`).
pub fn py_mod(a: f64, b: f64) -> f64 {
    let r = a % b;
    if r != 0.0 && ((r < 0.0) != (b < 0.0)) {
        r + b
    } else {
        r
    }
}

/// Python's `a // b` for integers.
pub fn py_floordiv(a: i64, b: i64) -> i64 {
    a.div_euclid(b) - if b < 0 && a.rem_euclid(b) != 0 { 1 } else { 0 }
}

// ---- StepLR, MultiStepLR, ExponentialLR ------------------------------------------------

pub fn step_chain(lr: f64, last_epoch: i64, step_size: i64, gamma: f64) -> f64 {
    if last_epoch == 0 || py_mod(last_epoch as f64, step_size as f64) != 0.0 {
        lr
    } else {
        lr * gamma
    }
}

pub fn step_closed(base_lr: f64, last_epoch: i64, step_size: i64, gamma: f64) -> f64 {
    base_lr * gamma.powf(py_floordiv(last_epoch, step_size) as f64)
}

/// `milestones` may repeat a value (torch keeps a Counter): each repeat multiplies again.
pub fn multistep_chain(lr: f64, last_epoch: i64, milestones: &[i64], gamma: f64) -> f64 {
    let count = milestones.iter().filter(|&&m| m == last_epoch).count();
    if count == 0 {
        lr
    } else {
        lr * gamma.powf(count as f64)
    }
}

pub fn multistep_closed(base_lr: f64, last_epoch: i64, milestones: &[i64], gamma: f64) -> f64 {
    // bisect_right over the sorted milestones: how many are <= last_epoch.
    let passed = milestones.iter().filter(|&&m| m <= last_epoch).count();
    base_lr * gamma.powf(passed as f64)
}

pub fn exponential_chain(lr: f64, is_initial: bool, gamma: f64) -> f64 {
    if is_initial {
        lr
    } else {
        lr * gamma
    }
}

pub fn exponential_closed(base_lr: f64, last_epoch: i64, gamma: f64) -> f64 {
    base_lr * gamma.powf(last_epoch as f64)
}

// ---- ConstantLR, LinearLR, PolynomialLR -------------------------------------------------

pub fn constant_chain(lr: f64, last_epoch: i64, factor: f64, total_iters: i64) -> f64 {
    if last_epoch == 0 {
        lr * factor
    } else if last_epoch != total_iters {
        lr
    } else {
        lr * (1.0 / factor)
    }
}

pub fn constant_closed(base_lr: f64, last_epoch: i64, factor: f64, total_iters: i64) -> f64 {
    let done = if last_epoch >= total_iters { 1.0 } else { 0.0 };
    base_lr * (factor + done * (1.0 - factor))
}

pub fn linear_chain(
    lr: f64,
    last_epoch: i64,
    is_initial: bool,
    start: f64,
    end: f64,
    total_iters: i64,
) -> f64 {
    if last_epoch == 0 {
        return lr * start;
    }
    if is_initial || last_epoch > total_iters {
        return lr;
    }
    lr * (1.0
        + (end - start) / (total_iters as f64 * start + (last_epoch - 1) as f64 * (end - start)))
}

pub fn linear_closed(base_lr: f64, last_epoch: i64, start: f64, end: f64, total_iters: i64) -> f64 {
    base_lr * (start + (end - start) * total_iters.min(last_epoch) as f64 / total_iters as f64)
}

pub fn polynomial_chain(
    lr: f64,
    last_epoch: i64,
    is_initial: bool,
    total_iters: i64,
    power: f64,
) -> f64 {
    if is_initial || last_epoch > total_iters {
        return lr;
    }
    let t = total_iters as f64;
    let decay = ((1.0 - last_epoch as f64 / t) / (1.0 - (last_epoch - 1) as f64 / t)).powf(power);
    lr * decay
}

pub fn polynomial_closed(base_lr: f64, last_epoch: i64, total_iters: i64, power: f64) -> f64 {
    base_lr * (1.0 - total_iters.min(last_epoch) as f64 / total_iters as f64).powf(power)
}

// ---- CosineAnnealingLR, CosineAnnealingWarmRestarts -------------------------------------

#[allow(clippy::too_many_arguments)]
pub fn cosine_chain(
    lr: f64,
    base_lr: f64,
    last_epoch: i64,
    is_initial: bool,
    step_count: i64,
    t_max: f64,
    eta_min: f64,
) -> f64 {
    let e = last_epoch as f64;
    if is_initial {
        lr
    } else if step_count == 1 && last_epoch > 0 {
        eta_min + (base_lr - eta_min) * (1.0 + (e * PI / t_max).cos()) / 2.0
    } else if py_mod(e - 1.0 - t_max, 2.0 * t_max) == 0.0 {
        lr + (base_lr - eta_min) * (1.0 - (PI / t_max).cos()) / 2.0
    } else {
        (1.0 + (PI * e / t_max).cos()) / (1.0 + (PI * (e - 1.0) / t_max).cos()) * (lr - eta_min)
            + eta_min
    }
}

pub fn cosine_closed(base_lr: f64, last_epoch: i64, t_max: f64, eta_min: f64) -> f64 {
    eta_min + (base_lr - eta_min) * (1.0 + (PI * last_epoch as f64 / t_max).cos()) / 2.0
}

pub fn warm_restarts_lr(base_lr: f64, t_cur: f64, t_i: f64, eta_min: f64) -> f64 {
    eta_min + (base_lr - eta_min) * (1.0 + (PI * t_cur / t_i).cos()) / 2.0
}

/// `CosineAnnealingWarmRestarts.step(epoch)`'s bookkeeping: the new `(T_cur, T_i,
/// last_epoch)`. `epoch` None advances by one; fractional epochs are allowed.
pub fn warm_restarts_advance(
    t_cur: f64,
    t_i: f64,
    last_epoch: i64,
    epoch: Option<f64>,
    t_0: i64,
    t_mult: i64,
) -> Result<(f64, f64, i64), String> {
    let epoch = match epoch {
        None if last_epoch < 0 => Some(0.0),
        e => e,
    };
    match epoch {
        None => {
            let mut t_cur = t_cur + 1.0;
            let mut t_i = t_i;
            if t_cur >= t_i {
                t_cur = py_mod(t_cur, t_i);
                t_i *= t_mult as f64;
            }
            Ok((t_cur, t_i, last_epoch + 1))
        }
        Some(epoch) => {
            if epoch < 0.0 {
                return Err(format!("Expected non-negative epoch, but got {epoch}"));
            }
            let t0 = t_0 as f64;
            let (t_cur, t_i) = if epoch >= t0 {
                if t_mult == 1 {
                    (py_mod(epoch, t0), t_i)
                } else {
                    let m = t_mult as f64;
                    let n = ((epoch / t0 * (m - 1.0) + 1.0).ln() / m.ln()) as i64;
                    let pow = (t_mult as i128).pow(n as u32) as f64;
                    (epoch - (t_0 as f64 * (pow - 1.0)) / (m - 1.0), t0 * pow)
                }
            } else {
                (epoch, t0)
            };
            Ok((t_cur, t_i, epoch.floor() as i64))
        }
    }
}

// ---- CyclicLR -------------------------------------------------------------------------

/// Position in the cycle: `(cycle, scale_factor)`.
pub fn cyclic_position(last_epoch: i64, total_size: f64, step_ratio: f64) -> (f64, f64) {
    let e = last_epoch as f64;
    let cycle = (1.0 + e / total_size).floor();
    let x = 1.0 + e / total_size - cycle;
    let scale_factor = if x <= step_ratio {
        x / step_ratio
    } else {
        (x - 1.0) / (step_ratio - 1.0)
    };
    (cycle, scale_factor)
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CyclicMode {
    Triangular,
    Triangular2,
    ExpRange { gamma: f64 },
}

impl CyclicMode {
    /// The built-in `scale_fn` and whether it is applied per cycle (else per iteration).
    pub fn scale(self, cycle: f64, last_epoch: i64) -> f64 {
        match self {
            CyclicMode::Triangular => 1.0,
            CyclicMode::Triangular2 => 1.0 / 2.0f64.powf(cycle - 1.0),
            CyclicMode::ExpRange { gamma } => gamma.powf(last_epoch as f64),
        }
    }
}

pub fn cyclic_lr(base_lr: f64, max_lr: f64, scale_factor: f64, scale: f64) -> f64 {
    let base_height = (max_lr - base_lr) * scale_factor;
    base_lr + base_height * scale
}

pub fn cyclic_momentum(base_m: f64, max_m: f64, scale_factor: f64, scale: f64) -> f64 {
    let base_height = (max_m - base_m) * scale_factor;
    max_m - base_height * scale
}

// ---- OneCycleLR -----------------------------------------------------------------------

pub fn anneal(cos: bool, start: f64, end: f64, pct: f64) -> f64 {
    if cos {
        let cos_out = (PI * pct).cos() + 1.0;
        end + (start - end) / 2.0 * cos_out
    } else {
        (end - start) * pct + start
    }
}

/// One phase of OneCycleLR: its end step and the start/end lr and momentum values.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Phase {
    pub end_step: f64,
    pub start_lr: f64,
    pub end_lr: f64,
    pub start_momentum: f64,
    pub end_momentum: f64,
}

/// `(lr, momentum)` at `step_num`, or torch's error past `total_steps`.
pub fn one_cycle(
    step_num: i64,
    total_steps: i64,
    phases: &[Phase],
    cos: bool,
) -> Result<(f64, f64), String> {
    if step_num > total_steps {
        return Err(format!(
            "Tried to step {step_num} times. The specified number of total steps is {total_steps}"
        ));
    }
    let s = step_num as f64;
    let mut start_step = 0.0;
    for (i, ph) in phases.iter().enumerate() {
        if s <= ph.end_step || i == phases.len() - 1 {
            let pct = (s - start_step) / (ph.end_step - start_step);
            return Ok((
                anneal(cos, ph.start_lr, ph.end_lr, pct),
                anneal(cos, ph.start_momentum, ph.end_momentum, pct),
            ));
        }
        start_step = ph.end_step;
    }
    Err("OneCycleLR has no phases".to_string())
}

// ---- ReduceLROnPlateau ----------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Plateau {
    pub mode_max: bool,
    pub threshold_abs: bool,
    pub threshold: f64,
    pub patience: i64,
    pub cooldown: i64,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PlateauState {
    pub best: f64,
    pub num_bad_epochs: i64,
    pub cooldown_counter: i64,
}

impl Plateau {
    pub fn is_better(&self, a: f64, best: f64) -> bool {
        match (self.mode_max, self.threshold_abs) {
            (false, false) => a < best * (1.0 - self.threshold),
            (false, true) => a < best - self.threshold,
            (true, false) => a > best * (self.threshold + 1.0),
            (true, true) => a > best + self.threshold,
        }
    }

    /// One `step(metrics)`: the new state and whether the lrs must be reduced now.
    pub fn step(&self, mut s: PlateauState, current: f64) -> (PlateauState, bool) {
        if self.is_better(current, s.best) {
            s.best = current;
            s.num_bad_epochs = 0;
        } else {
            s.num_bad_epochs += 1;
        }
        if s.cooldown_counter > 0 {
            s.cooldown_counter -= 1;
            s.num_bad_epochs = 0;
        }
        let reduce = s.num_bad_epochs > self.patience;
        if reduce {
            s.cooldown_counter = self.cooldown;
            s.num_bad_epochs = 0;
        }
        (s, reduce)
    }
}

/// The reduced lr, or None when the change would be below `eps`.
pub fn plateau_reduce(old_lr: f64, factor: f64, min_lr: f64, eps: f64) -> Option<f64> {
    let new_lr = f64::max(old_lr * factor, min_lr);
    if old_lr - new_lr > eps {
        Some(new_lr)
    } else {
        None
    }
}

// ---- Warm-up (pytorch_warmup) ---------------------------------------------------------

pub fn linear_warmup(step: i64, period: i64) -> f64 {
    f64::min(1.0, (step + 1) as f64 / period as f64)
}

pub fn exponential_warmup(step: i64, period: i64) -> f64 {
    1.0 - (-((step + 1) as f64) / period as f64).exp()
}

pub fn untuned_linear_period(beta2: f64) -> i64 {
    (2.0 / (1.0 - beta2)) as i64
}

pub fn untuned_exponential_period(beta2: f64) -> i64 {
    (1.0 / (1.0 - beta2)) as i64
}

pub fn rho_inf(beta2: f64) -> f64 {
    2.0 / (1.0 - beta2) - 1.0
}

pub fn rho(t: f64, beta2: f64, rho_inf: f64) -> f64 {
    let b2t = beta2.powf(t);
    rho_inf - 2.0 * t * b2t / (1.0 - b2t)
}

pub fn radam_offset(beta2: f64, rho_inf: f64) -> Result<i64, String> {
    #[allow(clippy::neg_cmp_op_on_partial_ord)] // a NaN beta2 must be rejected too
    if !(beta2 > 0.6) {
        return Err(format!("beta2 ({beta2}) must be greater than 0.6"));
    }
    let mut offset = 1i64;
    while rho(offset as f64, beta2, rho_inf) <= 4.0 {
        offset += 1;
    }
    Ok(offset)
}

pub fn radam_warmup(step: i64, beta2: f64, rho_inf: f64, offset: i64) -> f64 {
    let r = rho((step + offset) as f64, beta2, rho_inf);
    let numerator = (r - 4.0) * (r - 2.0) * rho_inf;
    let denominator = (rho_inf - 4.0) * (rho_inf - 2.0) * r;
    (numerator / denominator).sqrt()
}

/// A linear warm-up as a scheduler factor: `start` at step 0, 1 from `warmup` on.
pub fn warmup_ramp(step: i64, warmup: i64, start: f64) -> f64 {
    if step >= warmup {
        1.0
    } else {
        start + (1.0 - start) * step as f64 / warmup as f64
    }
}

// ---- LR range test (torch-lr-finder) -----------------------------------------------

/// The lr of iteration `i` of an `num_iter`-step range test from `start` to `end`.
pub fn range_test_lr(exponential: bool, start: f64, end: f64, i: i64, num_iter: i64) -> f64 {
    let r = i as f64 / (num_iter - 1) as f64;
    if exponential {
        start * (end / start).powf(r)
    } else {
        start + r * (end - start)
    }
}

/// One range-test observation: `(recorded loss, best loss, diverged)`. The first loss is
/// kept raw; later ones are exponentially smoothed with the previous recorded value.
pub fn range_test_update(
    first: bool,
    loss: f64,
    prev: f64,
    best: f64,
    smooth_f: f64,
    diverge_th: f64,
) -> (f64, f64, bool) {
    if first {
        return (loss, loss, loss > diverge_th * loss);
    }
    let loss = if smooth_f > 0.0 {
        smooth_f * loss + (1.0 - smooth_f) * prev
    } else {
        loss
    };
    let best = if loss < best { loss } else { best };
    (loss, best, loss > diverge_th * best)
}

/// Index of the steepest descent of `losses`: argmin of numpy.gradient (unit spacing,
/// central differences inside, one-sided at the ends); None for fewer than 2 points.
pub fn steepest_descent(losses: &[f64]) -> Option<usize> {
    let n = losses.len();
    if n < 2 {
        return None;
    }
    let grad = |i: usize| -> f64 {
        if i == 0 {
            losses[1] - losses[0]
        } else if i == n - 1 {
            losses[n - 1] - losses[n - 2]
        } else {
            (losses[i + 1] - losses[i - 1]) / 2.0
        }
    };
    let mut best = 0;
    for i in 1..n {
        // numpy's argmin: the first minimum wins; NaN wins over numbers.
        let (g, b) = (grad(i), grad(best));
        if (g < b && !b.is_nan()) || (g.is_nan() && !b.is_nan()) {
            best = i;
        }
    }
    Some(best)
}

// ---- Transformer / transformers-style schedules (factors of the base lr) -------------

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_modulo_and_floor_division() {
        assert_eq!(py_mod(-3.0, 4.0), 1.0);
        assert_eq!(py_mod(3.0, -4.0), -1.0);
        assert_eq!(py_mod(8.0, 4.0), 0.0);
        assert_eq!(py_floordiv(-7, 2), -4);
        assert_eq!(py_floordiv(7, 2), 3);
    }

    #[test]
    fn step_lr_decays_every_step_size_epochs() {
        let mut lr = 1.0;
        let mut seen = vec![];
        for e in 0..7 {
            lr = step_chain(lr, e, 3, 0.5);
            seen.push(lr);
        }
        assert_eq!(seen, vec![1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25]);
        assert_eq!(step_closed(1.0, 6, 3, 0.5), 0.25);
    }

    #[test]
    fn chained_cosine_equals_closed_form_closely() {
        let (base, t_max, eta_min) = (0.1, 10.0, 0.001);
        let mut lr = base;
        for e in 0..=40 {
            lr = cosine_chain(lr, base, e, e == 0, e + 1, t_max, eta_min);
            assert!(
                (lr - cosine_closed(base, e, t_max, eta_min)).abs() < 1e-12,
                "epoch {e}"
            );
        }
    }

    #[test]
    fn warm_restarts_fractional_epochs() {
        // T_0 = 10, T_mult = 2: epoch 25 lies 15 into the second cycle of length 20.
        let (t_cur, t_i, last) = warm_restarts_advance(0.0, 10.0, 0, Some(25.5), 10, 2).unwrap();
        assert_eq!((t_cur, t_i, last), (15.5, 20.0, 25));
        assert!(warm_restarts_advance(0.0, 10.0, 0, Some(-1.0), 10, 2).is_err());
    }

    #[test]
    fn one_cycle_endpoints_and_overrun() {
        let phases = [
            Phase {
                end_step: 29.0,
                start_lr: 0.004,
                end_lr: 0.1,
                start_momentum: 0.95,
                end_momentum: 0.85,
            },
            Phase {
                end_step: 99.0,
                start_lr: 0.1,
                end_lr: 4e-7,
                start_momentum: 0.85,
                end_momentum: 0.95,
            },
        ];
        let (lr0, m0) = one_cycle(0, 100, &phases, true).unwrap();
        assert!((lr0 - 0.004).abs() < 1e-15 && (m0 - 0.95).abs() < 1e-15);
        assert!((one_cycle(29, 100, &phases, true).unwrap().0 - 0.1).abs() < 1e-15);
        assert!(one_cycle(101, 100, &phases, true)
            .unwrap_err()
            .contains("Tried to step 101 times"));
    }

    #[test]
    fn plateau_waits_patience_then_cools_down() {
        let p = Plateau {
            mode_max: false,
            threshold_abs: false,
            threshold: 1e-4,
            patience: 2,
            cooldown: 1,
        };
        let mut s = PlateauState {
            best: f64::INFINITY,
            num_bad_epochs: 0,
            cooldown_counter: 0,
        };
        let mut reductions = vec![];
        for _ in 0..8 {
            let (n, r) = p.step(s, 1.0);
            s = n;
            reductions.push(r);
        }
        // epoch 0 sets best; bad epochs 1,2,3 -> reduce at 3; cooldown 1 eats epoch 4.
        assert_eq!(
            reductions,
            vec![false, false, false, true, false, false, false, true]
        );
        assert_eq!(plateau_reduce(0.1, 0.1, 0.0, 1e-8), Some(0.1 * 0.1));
        assert_eq!(plateau_reduce(1e-9, 0.1, 0.0, 1e-8), None);
    }

    #[test]
    fn warmup_factors() {
        assert_eq!(linear_warmup(0, 4), 0.25);
        assert_eq!(linear_warmup(10, 4), 1.0);
        assert!((exponential_warmup(0, 1) - (1.0 - (-1.0f64).exp())).abs() < 1e-16);
        assert_eq!(untuned_linear_period(0.999), 1999);
        let ri = rho_inf(0.999);
        let off = radam_offset(0.999, ri).unwrap();
        assert!(rho(off as f64, 0.999, ri) > 4.0 && rho((off - 1) as f64, 0.999, ri) <= 4.0);
        assert!(radam_offset(0.5, rho_inf(0.5)).is_err());
    }

    #[test]
    fn range_test_ramp_smoothing_and_suggestion() {
        assert_eq!(range_test_lr(true, 1e-5, 1.0, 0, 11), 1e-5);
        assert!((range_test_lr(true, 1e-5, 1.0, 10, 11) - 1.0).abs() < 1e-12);
        assert_eq!(range_test_lr(false, 0.0, 1.0, 5, 11), 0.5);
        let (l, b, d) = range_test_update(false, 2.0, 1.0, 1.0, 0.5, 5.0);
        assert_eq!((l, b, d), (1.5, 1.0, false));
        assert!(range_test_update(false, 100.0, 1.0, 1.0, 0.0, 5.0).2);
        assert_eq!(steepest_descent(&[3.0, 2.9, 2.0, 1.0, 1.1, 5.0]), Some(2));
        assert_eq!(steepest_descent(&[1.0]), None);
    }

    #[test]
    fn noam_peaks_at_warmup() {
        let w = 100;
        let peak = noam(w - 1, 512.0, w);
        assert!(noam(w - 2, 512.0, w) < peak && noam(w, 512.0, w) < peak);
    }
}

//! Learning-rate schedule math, written to reproduce torch.optim.lr_scheduler and
//! pytorch_warmup to the last bit: the same f64 operations in the same order (Python floats
//! are f64 and `math.cos`/`**` call the same libm as `cos`/`powf` here).
//!
//! Functions named `*_chain` are torch's recursive ("chainable") `get_lr` forms, which
//! update the current lr; `*_closed` are the closed forms (`step(epoch)`); the rest are
//! factors or state machines.
//!
//! This module holds torch.optim.lr_scheduler's and swa_utils' math; [`warmup`]
//! (pytorch_warmup), [`range_test`] (torch-lr-finder) and [`factor`] (Noam and the
//! transformers-style schedules) hold the rest, re-exported here.

use std::f64::consts::PI;

mod factor;
mod range_test;
#[cfg(test)]
mod tests;
mod warmup;

pub use factor::{noam, HfSchedule, Shape};
pub use range_test::{range_test_lr, range_test_update, steepest_descent};
pub use warmup::{
    exponential_warmup, linear_warmup, radam_offset, radam_warmup, rho, rho_inf,
    untuned_exponential_period, untuned_linear_period, warmup_ramp,
};

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

// ---- Stochastic weight averaging (torch.optim.swa_utils.SWALR) -----------------------

/// SWALR's lr for a group at optimizer step `step_count` (torch's `_step_count`): anneals
/// from the group's lr to `swa_lr` over `anneal_epochs` steps, cosine or linear. As torch
/// does, it first recovers the lr the anneal started from (undoing the previous step's
/// mix), then mixes for this step.
pub fn swalr(lr: f64, swa_lr: f64, step_count: i64, anneal_epochs: i64, cosine: bool) -> f64 {
    let mut step = step_count - 1;
    if anneal_epochs == 0 {
        step = step.max(1);
    }
    let span = anneal_epochs.max(1) as f64;
    let alpha_at = |t: f64| {
        let t = t.clamp(0.0, 1.0);
        if cosine {
            (1.0 - (PI * t).cos()) / 2.0
        } else {
            t
        }
    };
    let prev_alpha = alpha_at((step - 1) as f64 / span);
    let start = if prev_alpha == 1.0 {
        swa_lr
    } else {
        (lr - prev_alpha * swa_lr) / (1.0 - prev_alpha)
    };
    let alpha = alpha_at(step as f64 / span);
    swa_lr * alpha + start * (1.0 - alpha)
}

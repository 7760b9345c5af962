//! pytorch_warmup's warm-up factors, and the linear ramp of `WarmupLR`.

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

//! The LR range test (torch-lr-finder): lr sweep, smoothed loss, and the suggestion.

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

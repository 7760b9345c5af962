//! Element-wise pieces every optimizer kernel shares, in torch's operation order.

use crate::elem::{Elem, OpFloat};

/// How every algorithm prepares a gradient as it reads it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct GradIn {
    /// GradScaler's scale: grads are divided by it and stored back unscaled.
    pub grad_scale: Option<f64>,
    /// `clip_grad_norm_`'s coefficient: grads are multiplied by it (and rounded to their
    /// dtype) as they are read; the stored grads are left as they are.
    pub clip_coef: Option<f64>,
}

/// A Python scalar as torch's single-tensor ops use it on a tensor of element type `E`:
/// rounded to `E` first (an `add(..., alpha=x)` alpha, a value stored into the tensor, a
/// one-element tensor of the parameter's dtype), then computed with in `E::Op`.
#[inline(always)]
pub fn in_dtype<E: Elem>(x: f64) -> E::Op {
    E::store(<E::Op as OpFloat>::of(x)).load()
}

/// torch's `lerp(self, end, weight)` for a scalar weight, in its vectorized (fmadd) form.
#[inline(always)]
pub fn lerp<O: OpFloat>(start: O, end: O, weight: O) -> O {
    let half = O::of(0.5);
    if weight.abs() < half {
        weight.mul_add(end - start, start)
    } else {
        (weight - O::of(1.0)).mul_add(end - start, end)
    }
}

/// The gradient as every algorithm first sees it: unscaled (stored back, as torch's fused
/// kernels do) and negated for `maximize`.
#[inline(always)]
pub fn load_grad<E: Elem>(
    g: &mut E,
    inv_scale: Option<E::Op>,
    clip: Option<E::Op>,
    maximize: bool,
) -> E::Op {
    let mut v = g.load();
    if let Some(s) = inv_scale {
        v = v / s;
        *g = E::store(v);
    }
    if let Some(c) = clip {
        // `grad.mul_(clip_coef)` rounds to the grad's dtype before the optimizer reads it.
        v = E::store(v * c).load();
    }
    if maximize {
        -v
    } else {
        v
    }
}

/// The gradient with L2 weight decay added (`grad.add(param, alpha=weight_decay)`, an
/// fmadd in torch's vectorized kernels); `weight_decay` None when it is 0.
#[inline(always)]
pub fn l2_grad<E: Elem>(
    g: &mut E,
    param: E::Op,
    inv_scale: Option<E::Op>,
    clip: Option<E::Op>,
    maximize: bool,
    weight_decay: Option<E::Op>,
) -> E::Op {
    let grad = load_grad(g, inv_scale, clip, maximize);
    match weight_decay {
        Some(wd) => param.mul_add(wd, grad),
        None => grad,
    }
}

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
fn load_grad<E: Elem>(
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
fn l2_grad<E: Elem>(
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

/// Reads one gradient element as [`l2_grad`] does, with the settings fixed for a whole kernel
/// call. The driver compiles every kernel twice, for [`PlainGrad`] (no unscaling, clipping,
/// maximize or L2 term: a bare load, the common case) and for [`PreparedGrad`], so that
/// neither loop tests the settings per element.
pub trait ReadGrad<E: Elem>: Copy {
    fn read(self, g: &mut E, param: E::Op) -> E::Op;
}

/// The gradient as stored.
#[derive(Clone, Copy, Debug)]
pub struct PlainGrad;

impl<E: Elem> ReadGrad<E> for PlainGrad {
    #[inline(always)]
    fn read(self, g: &mut E, _param: E::Op) -> E::Op {
        g.load()
    }
}

/// The gradient unscaled, clipped, negated and/or with L2 weight decay added.
#[derive(Clone, Copy, Debug)]
pub struct PreparedGrad<O> {
    inv_scale: Option<O>,
    clip: Option<O>,
    maximize: bool,
    weight_decay: Option<O>,
}

impl<O: OpFloat> PreparedGrad<O> {
    /// None when reading the gradient is a bare load.
    pub fn new(grad: GradIn, maximize: bool, weight_decay: Option<O>) -> Option<Self> {
        let read = Self {
            inv_scale: grad.grad_scale.map(O::of),
            clip: grad.clip_coef.map(O::of),
            maximize,
            weight_decay,
        };
        let plain =
            read.inv_scale.is_none() && read.clip.is_none() && !maximize && weight_decay.is_none();
        (!plain).then_some(read)
    }
}

impl<E: Elem> ReadGrad<E> for PreparedGrad<E::Op> {
    #[inline(always)]
    fn read(self, g: &mut E, param: E::Op) -> E::Op {
        l2_grad(
            g,
            param,
            self.inv_scale,
            self.clip,
            self.maximize,
            self.weight_decay,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain reader is chosen exactly when every setting is the identity, and the
    /// prepared one reads what `l2_grad` does.
    #[test]
    fn grad_reader_choice_and_values() {
        let none = GradIn::default();
        assert!(PreparedGrad::<f32>::new(none, false, None).is_none());
        let cases = [
            (
                GradIn {
                    grad_scale: Some(4.0),
                    clip_coef: None,
                },
                false,
                None,
            ),
            (
                GradIn {
                    grad_scale: None,
                    clip_coef: Some(0.5),
                },
                false,
                None,
            ),
            (none, true, None),
            (none, false, Some(0.1f32)),
            (
                GradIn {
                    grad_scale: Some(2.0),
                    clip_coef: Some(0.25),
                },
                true,
                Some(0.01),
            ),
        ];
        for (grad, maximize, wd) in cases {
            let r = PreparedGrad::<f32>::new(grad, maximize, wd).expect("not plain");
            let (mut a, mut b) = (3.0f32, 3.0f32);
            let got = ReadGrad::<f32>::read(r, &mut a, 2.0);
            let want = l2_grad(
                &mut b,
                2.0,
                grad.grad_scale.map(|s| s as f32),
                grad.clip_coef.map(|c| c as f32),
                maximize,
                wd,
            );
            assert_eq!((got, a), (want, b));
        }
        let mut g = 3.0f32;
        assert_eq!(ReadGrad::<f32>::read(PlainGrad, &mut g, 2.0), 3.0);
    }
}

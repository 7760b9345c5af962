//! Exact-erf GELU (with the dropout that follows it) and its backward.

use super::*;

#[inline(always)]
fn gelu<T: Act>(x: T) -> T {
    x * T::of(0.5) * (T::of(1.0) + (x * T::of(std::f64::consts::FRAC_1_SQRT_2)).erf())
}

/// `y = gelu(x) * mask` (exact erf GELU, then dropout).
pub struct GeluFwd {
    pub x: Ptr,
    pub y: Ptr,
    pub dropout: Dropout,
}

impl RowOp for GeluFwd {
    #[inline(always)]
    fn rows<E: VElem>(&self, r0: usize, r1: usize) -> Vec<f64> {
        // SAFETY: `gelu`'s contract (rows of one element).
        let (x, y) = unsafe { (self.x.rows::<E>(r0, r1, 1), self.y.rows::<E>(r0, r1, 1)) };
        let mask = Mask::<E::Op>::of(self.dropout);
        if mask.on {
            for (j, (o, v)) in y.iter_mut().zip(x.iter()).enumerate() {
                *o = E::store(gelu(v.load()) * mask.at(r0 + j));
            }
        } else {
            for (o, v) in y.iter_mut().zip(x.iter()) {
                *o = E::store(gelu(v.load()));
            }
        }
        Vec::new()
    }
}

/// GELU backward, in place on `g`: `g = g * mask * gelu'(x)`. When `y` is not null it also
/// recomputes the forward output `y = gelu(x) * mask` (needed for the next weight gradient).
pub struct GeluBwd {
    pub x: Ptr,
    pub g: Ptr,
    pub y: Ptr,
    pub dropout: Dropout,
}

impl RowOp for GeluBwd {
    #[inline(always)]
    fn rows<E: VElem>(&self, r0: usize, r1: usize) -> Vec<f64> {
        // SAFETY: `gelu_backward`'s contract.
        let (x, g) = unsafe { (self.x.rows::<E>(r0, r1, 1), self.g.rows::<E>(r0, r1, 1)) };
        let mask = Mask::<E::Op>::of(self.dropout);
        let half = E::Op::of(0.5);
        let one = E::Op::of(1.0);
        let k = E::Op::of(std::f64::consts::FRAC_1_SQRT_2);
        let kp =
            E::Op::of(0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2);
        let y: &mut [E] = if self.y.0.is_null() {
            &mut []
        } else {
            // SAFETY: same length as `x`.
            unsafe { self.y.rows::<E>(r0, r1, 1) }
        };
        // A plain inline(always) fn, not a closure: a closure LLVM declines to inline would
        // be compiled without the caller's AVX/FMA features (and `mul_add` becomes a call).
        #[inline(always)]
        fn grad<T: Act>(v: T, gv: T, m: T, half: T, one: T, k: T, kp: T) -> (T, T) {
            let cdf = half * (one + (v * k).erf());
            let pdf = (-half * v * v).exp() * kp;
            (gv * m * (cdf + v * pdf), v * cdf * m)
        }
        match (y.is_empty(), mask.on) {
            (false, false) => {
                for ((gv, yv), xv) in g.iter_mut().zip(y.iter_mut()).zip(x.iter()) {
                    let (gg, yy) = grad(xv.load(), gv.load(), one, half, one, k, kp);
                    *gv = E::store(gg);
                    *yv = E::store(yy);
                }
            }
            (true, false) => {
                for (gv, xv) in g.iter_mut().zip(x.iter()) {
                    *gv = E::store(grad(xv.load(), gv.load(), one, half, one, k, kp).0);
                }
            }
            (_, true) => {
                for (j, (gv, xv)) in g.iter_mut().zip(x.iter()).enumerate() {
                    let (gg, yy) = grad(xv.load(), gv.load(), mask.at(r0 + j), half, one, k, kp);
                    *gv = E::store(gg);
                    if let Some(yv) = y.get_mut(j) {
                        *yv = E::store(yy);
                    }
                }
            }
        }
        Vec::new()
    }
}

/// # Safety
/// `x`, `y`: `numel` elements of `dtype`, not overlapping.
pub unsafe fn gelu_forward(
    op: &GeluFwd,
    dtype: DType,
    numel: usize,
    threads: usize,
    exec: &dyn Executor,
) {
    par_rows(op, dtype, numel, 1, threads, exec);
}

/// # Safety
/// `x`, `g` (and `y` unless null): `numel` elements of `dtype`, not overlapping.
pub unsafe fn gelu_backward(
    op: &GeluBwd,
    dtype: DType,
    numel: usize,
    threads: usize,
    exec: &dyn Executor,
) {
    par_rows(op, dtype, numel, 1, threads, exec);
}

//! LayerNorm forward and backward over rows.

use super::*;

/// LayerNorm over rows of `d`: `y = (x - mean) * rstd * w + b`; `mean`/`rstd` (one per row,
/// in `E::Op`) are written when not null.
pub struct LnFwd {
    pub x: Ptr,
    pub w: Ptr,
    pub b: Ptr,
    pub y: Ptr,
    pub mean: Ptr,
    pub rstd: Ptr,
    pub d: usize,
    pub eps: f64,
}

impl RowOp for LnFwd {
    #[inline(always)]
    fn rows<E: VElem>(&self, r0: usize, r1: usize) -> Vec<f64> {
        let d = self.d;
        // SAFETY: `layer_norm` 's contract.
        let (x, y) = unsafe { (self.x.rows::<E>(r0, r1, d), self.y.rows::<E>(r0, r1, d)) };
        let (w, b) = unsafe { (self.w.all::<E>(d), self.b.all::<E>(d)) };
        let inv_d = E::Op::of(1.0 / d as f64);
        // Narrow elements (bf16, fp16) are widened into a row of the arithmetic type first:
        // the sums then vectorize fully (over bf16 elements they ran 4 lanes wide).
        let widen = std::mem::size_of::<E>() < std::mem::size_of::<E::Op>();
        let mut xf = vec![E::Op::of(0.0); if widen { d } else { 0 }];
        for (k, (xr, yr)) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)).enumerate() {
            let xr = &xr[..d];
            let (mean, var) = if widen {
                for (o, v) in xf.iter_mut().zip(xr) {
                    *o = v.load();
                }
                let mean = lane_sum_of(&xf, |v| v) * inv_d;
                (mean, lane_sum_of(&xf, |v| (v - mean) * (v - mean)) * inv_d)
            } else {
                let mean = lane_sum_of(xr, |v| v.load()) * inv_d;
                (
                    mean,
                    lane_sum_of(xr, |v| (v.load() - mean) * (v.load() - mean)) * inv_d,
                )
            };
            let rstd = E::Op::of(1.0) / (var + E::Op::of(self.eps)).sqrt();
            for (((o, v), wi), bi) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                *o = E::store(((v.load() - mean) * rstd).mul_add(wi.load(), bi.load()));
            }
            if !self.mean.0.is_null() {
                // SAFETY: one stat per row.
                unsafe {
                    *(self.mean.0 as *mut E::Op).add(r0 + k) = mean;
                    *(self.rstd.0 as *mut E::Op).add(r0 + k) = rstd;
                }
            }
        }
        Vec::new()
    }
}

/// LayerNorm backward. Writes (or, with `accumulate`, adds) the input gradient into `gx`
/// and returns `[grad w (d values), grad b (d values)]`.
pub struct LnBwd {
    pub gy: Ptr,
    pub x: Ptr,
    pub mean: Ptr,
    pub rstd: Ptr,
    pub w: Ptr,
    pub gx: Ptr,
    pub accumulate: bool,
    pub d: usize,
}

impl RowOp for LnBwd {
    #[inline(always)]
    fn rows<E: VElem>(&self, r0: usize, r1: usize) -> Vec<f64> {
        let d = self.d;
        // SAFETY: `layer_norm_backward`'s contract.
        let (gy, x, gx) = unsafe {
            (
                self.gy.rows::<E>(r0, r1, d),
                self.x.rows::<E>(r0, r1, d),
                self.gx.rows::<E>(r0, r1, d),
            )
        };
        let w = unsafe { self.w.all::<E>(d) };
        let mut gw = vec![E::Op::of(0.0); d];
        let mut gb = vec![E::Op::of(0.0); d];
        let mut xhat = vec![E::Op::of(0.0); d];
        let mut gxhat = vec![E::Op::of(0.0); d];
        let inv_d = E::Op::of(1.0 / d as f64);
        for (k, ((gyr, xr), gxr)) in gy
            .chunks_exact(d)
            .zip(x.chunks_exact(d))
            .zip(gx.chunks_exact_mut(d))
            .enumerate()
        {
            // SAFETY: one stat per row.
            let (mean, rstd) = unsafe {
                (
                    *(self.mean.0 as *const E::Op).add(r0 + k),
                    *(self.rstd.0 as *const E::Op).add(r0 + k),
                )
            };
            let (gyr, xr) = (&gyr[..d], &xr[..d]);
            for (((((gwj, gbj), xhj), ghj), g), (xv, wv)) in gw
                .iter_mut()
                .zip(gb.iter_mut())
                .zip(xhat.iter_mut())
                .zip(gxhat.iter_mut())
                .zip(gyr)
                .zip(xr.iter().zip(w))
            {
                let g = g.load();
                let xh = (xv.load() - mean) * rstd;
                *gwj = g.mul_add(xh, *gwj);
                *gbj = *gbj + g;
                *xhj = xh;
                *ghj = g * wv.load();
            }
            let m1 = lane_sum_of(&gxhat, |g| g) * inv_d;
            let m2 = lane_sum_pairs(&gxhat, &xhat, |g, x| g * x) * inv_d;
            if self.accumulate {
                for ((o, gh), xh) in gxr.iter_mut().zip(&gxhat).zip(&xhat) {
                    *o = E::store(o.load() + (*gh - m1 - *xh * m2) * rstd);
                }
            } else {
                for ((o, gh), xh) in gxr.iter_mut().zip(&gxhat).zip(&xhat) {
                    *o = E::store((*gh - m1 - *xh * m2) * rstd);
                }
            }
        }
        gw.iter().chain(&gb).map(|v| v.to_f64()).collect()
    }
}

/// LayerNorm forward over `rows` rows of `d`.
///
/// # Safety
/// `x`, `y`: `rows * d` elements of `dtype`; `w`, `b`: `d`; `mean`, `rstd`: null or `rows`
/// elements of the arithmetic type (f64 for F64, else f32). `y` must not overlap the others.
pub unsafe fn layer_norm(
    op: &LnFwd,
    dtype: DType,
    rows: usize,
    threads: usize,
    exec: &dyn Executor,
) {
    par_rows(op, dtype, rows, op.d, threads, exec);
}

/// LayerNorm backward; returns grad w then grad b (`d` values each).
///
/// # Safety
/// As [`layer_norm`], with `gy`, `gx` of `rows * d` elements; `gx` overlaps nothing else.
pub unsafe fn layer_norm_backward(
    op: &LnBwd,
    dtype: DType,
    rows: usize,
    threads: usize,
    exec: &dyn Executor,
) -> Vec<f64> {
    let mut r = par_rows(op, dtype, rows, op.d, threads, exec);
    r.resize(2 * op.d, 0.0);
    r
}

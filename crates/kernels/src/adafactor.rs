//! Adafactor (torch.optim.Adafactor): Adam-like steps with a factored second moment.
//!
//! For a parameter of two or more dims, viewed as `batch × rows × cols`, the second moment
//! is kept as per-row and per-column means of `g²` (`row_var`, `col_var`) and estimated as
//! `row_var ⊗ col_var / mean(row_var)`; vectors and scalars keep a full `variance`. The
//! step follows torch's `_single_tensor_adafactor`:
//!
//! ```text
//! w = step^beta2_decay;  rho = min(lr, 1/sqrt(step))
//! alpha = max(eps2, ||p|| / sqrt(n)) * rho;  p *= 1 - lr * weight_decay
//! row_var.lerp_(mean_c g², w);  col_var.lerp_(mean_r g², w)      (or variance.lerp_(g², w))
//! u = g / sqrt(max(var_estimate, eps1²));  p += u * (-alpha / max(1, ||u|| / (sqrt(n) d)))
//! ```
//!
//! Norms and means are summed in f64 (torch sums in the element type), so results agree
//! with torch to rounding, not bit for bit.

use crate::common::lerp;
use crate::driver::{map_pieces, with_simd, Executor, SimdWork};
use crate::elem::OpFloat;

/// One Adafactor step's hyper-parameters (`eps1` resolved: torch's default is the dtype's
/// machine epsilon).
#[derive(Clone, Copy, Debug)]
pub struct Adafactor {
    pub lr: f64,
    pub beta2_decay: f64,
    pub eps1: f64,
    pub eps2: f64,
    pub d: f64,
    pub weight_decay: f64,
    pub maximize: bool,
}

/// The second-moment state of one parameter.
pub enum Second<'a, T> {
    /// `row_var`: `batch * rows`, `col_var`: `batch * cols` elements.
    Factored {
        row_var: &'a mut [T],
        col_var: &'a mut [T],
        rows: usize,
        cols: usize,
    },
    /// `variance`: one element per parameter element.
    Full { variance: &'a mut [T] },
}

/// The element types Adafactor runs natively, widened exactly to f64 for its sums.
pub trait Wide: OpFloat {
    fn wide(self) -> f64;
}

impl Wide for f32 {
    fn wide(self) -> f64 {
        self as f64
    }
}

impl Wide for f64 {
    fn wide(self) -> f64 {
        self
    }
}

/// Squares summed in f64 over independent lanes, so the loop vectorizes (the lane sums are
/// added in a fixed order: results do not depend on the machine).
#[inline(always)]
fn sum_sq<T: Wide>(x: &[T]) -> f64 {
    const LANES: usize = 8;
    let mut acc = [0f64; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            let v = c[l].wide();
            acc[l] += v * v;
        }
    }
    let mut s: f64 = acc.iter().sum();
    for v in rest {
        s += v.wide() * v.wide();
    }
    s
}

/// One pass over units `lo..hi` (elements or rows) returning a partial sum of squares.
trait Pass: Sync {
    fn run(&self, lo: usize, hi: usize) -> f64;
}

/// Units `lo..hi` of a pass, as [`SimdWork`].
struct Piece<'a, P>(&'a P, usize, usize);

impl<P: Pass> SimdWork for Piece<'_, P> {
    type Out = f64;
    #[inline(always)]
    fn run(self) -> f64 {
        self.0.run(self.1, self.2)
    }
}

/// Runs `pass` over `units` in pieces of `per` on up to `threads` workers; the partial sums
/// are added in piece order (independent of the thread count).
fn par<P: Pass>(pass: &P, units: usize, per: usize, threads: usize, exec: &dyn Executor) -> f64 {
    let per = per.max(1);
    let pieces: Vec<(usize, usize, usize)> = (0..units)
        .step_by(per)
        .map(|u| (0, u, (u + per).min(units)))
        .collect();
    map_pieces(&pieces, threads, exec, 0.0, &|_, lo, hi| {
        with_simd(Piece(pass, lo, hi))
    })
    .into_iter()
    .sum()
}

/// Elements per piece of parallel work.
const PIECE: usize = 1 << 15;

/// Raw buffers of one parameter (the caller guarantees they are valid and disjoint, and
/// pieces write disjoint ranges).
#[derive(Clone, Copy)]
struct Bufs<T> {
    param: *mut T,
    grad: *const T,
    /// `variance` (full), or `row_var` then `col_var` (factored).
    a: *mut T,
    b: *mut T,
}
// SAFETY: see `Bufs`.
unsafe impl<T> Send for Bufs<T> {}
unsafe impl<T> Sync for Bufs<T> {}

/// The scalars of the two update passes.
#[derive(Clone, Copy)]
struct Scal<T> {
    w: T,
    floor: T,
    sign: T,
    /// `1 - lr * weight_decay` (1 when no decay) and `-alpha / denom`.
    decay: T,
    scale: T,
}

impl<T: OpFloat> Scal<T> {
    /// torch's `var_estimate.clamp_(min=eps1²).rsqrt_().mul_(grad)` for one element.
    #[inline(always)]
    fn update(&self, est: T, g: T) -> T {
        let est = if est < self.floor { self.floor } else { est };
        T::of(1.0) / est.sqrt() * (g * self.sign)
    }
}

/// `||p||²` over elements.
struct ParamNorm<T>(Bufs<T>);

impl<T: Wide> Pass for ParamNorm<T> {
    #[inline(always)]
    fn run(&self, lo: usize, hi: usize) -> f64 {
        // SAFETY: `adafactor`'s contract; read only.
        sum_sq(unsafe { std::slice::from_raw_parts(self.0.param.add(lo), hi - lo) })
    }
}

/// Full variance: with `apply` false, `variance.lerp_(g², w)` and `Σu²`; with `apply`,
/// `p = u * scale + p * decay`.
struct FullPass<T> {
    b: Bufs<T>,
    k: Scal<T>,
    apply: bool,
}

impl<T: Wide> Pass for FullPass<T> {
    #[inline(always)]
    fn run(&self, lo: usize, hi: usize) -> f64 {
        let n = hi - lo;
        let Scal {
            w,
            sign,
            decay,
            scale,
            ..
        } = self.k;
        // SAFETY: `adafactor`'s contract; pieces cover disjoint `lo..hi`.
        let (g, v) = unsafe {
            (
                std::slice::from_raw_parts(self.b.grad.add(lo), n),
                std::slice::from_raw_parts_mut(self.b.a.add(lo), n),
            )
        };
        if self.apply {
            let p = unsafe { std::slice::from_raw_parts_mut(self.b.param.add(lo), n) };
            for ((p, &g), &v) in p.iter_mut().zip(g).zip(v.iter()) {
                let u = self.k.update(v, g);
                *p = u.mul_add(scale, *p * decay);
            }
            return 0.0;
        }
        let mut buf = [T::of(0.0); 256];
        let mut total = 0.0;
        for (gc, vc) in g.chunks(256).zip(v.chunks_mut(256)) {
            for ((u, &g), v) in buf.iter_mut().zip(gc).zip(vc.iter_mut()) {
                let gs = g * sign;
                *v = lerp(*v, gs * gs, w);
                *u = self.k.update(*v, g);
            }
            total += sum_sq(&buf[..gc.len()]);
        }
        total
    }
}

/// Factored estimate over whole rows: `est = row_var[r] * col_var[c] / row_mean[b]`, then as
/// [`FullPass`] (`Σu²`, or the parameter update with `apply`).
struct FactoredPass<'a, T> {
    b: Bufs<T>,
    k: Scal<T>,
    row_means: &'a [T],
    rows: usize,
    cols: usize,
    apply: bool,
}

impl<T: Wide> Pass for FactoredPass<'_, T> {
    #[inline(always)]
    fn run(&self, r0: usize, r1: usize) -> f64 {
        let Scal { decay, scale, .. } = self.k;
        let (rows, cols) = (self.rows, self.cols);
        let mut buf = vec![T::of(0.0); if self.apply { 0 } else { cols }];
        let mut total = 0.0;
        for row in r0..r1 {
            let batch = row / rows;
            // SAFETY: `adafactor`'s contract; pieces cover disjoint rows.
            let (g, rv, cv) = unsafe {
                (
                    std::slice::from_raw_parts(self.b.grad.add(row * cols), cols),
                    *self.b.a.add(row),
                    std::slice::from_raw_parts(self.b.b.add(batch * cols), cols),
                )
            };
            let rm = self.row_means[batch];
            if self.apply {
                let p =
                    unsafe { std::slice::from_raw_parts_mut(self.b.param.add(row * cols), cols) };
                for ((p, &g), &c) in p.iter_mut().zip(g).zip(cv) {
                    let est = rv * c / rm;
                    let u = self.k.update(est, g);
                    *p = u.mul_add(scale, *p * decay);
                }
            } else {
                for ((u, &g), &c) in buf.iter_mut().zip(g).zip(cv) {
                    let est = rv * c / rm;
                    *u = self.k.update(est, g);
                }
                total += sum_sq(&buf);
            }
        }
        total
    }
}

/// One Adafactor step of one parameter; `step` is the count after this step's increment.
/// `param` and `grad` have the same length `n > 0` (`batch * rows * cols` when factored);
/// the work runs on up to `threads` workers of `exec`.
pub fn adafactor<T: Wide>(
    h: &Adafactor,
    step: f64,
    param: &mut [T],
    grad: &[T],
    second: Second<'_, T>,
    threads: usize,
    exec: &dyn Executor,
) {
    let n = param.len();
    let root_n = (n as f64).powf(0.5);
    let rho = h.lr.min(1.0 / step.powf(0.5));
    let mut bufs = Bufs {
        param: param.as_mut_ptr(),
        grad: grad.as_ptr(),
        a: std::ptr::null_mut(),
        b: std::ptr::null_mut(),
    };
    let pnorm = par(&ParamNorm(bufs), n, PIECE, threads, exec).sqrt();
    let alpha = h.eps2.max(pnorm / root_n) * rho;
    let mut k = Scal {
        w: T::of(step.powf(h.beta2_decay)),
        floor: T::of(h.eps1 * h.eps1),
        sign: T::of(if h.maximize { -1.0 } else { 1.0 }),
        decay: T::of(if h.weight_decay != 0.0 {
            1.0 - h.lr * h.weight_decay
        } else {
            1.0
        }),
        scale: T::of(0.0),
    };
    match second {
        Second::Full { variance } => {
            bufs.a = variance.as_mut_ptr();
            let stats = FullPass {
                b: bufs,
                k,
                apply: false,
            };
            let unorm = par(&stats, n, PIECE, threads, exec).sqrt();
            k.scale = T::of(-alpha / 1f64.max(unorm / (root_n * h.d)));
            par(
                &FullPass {
                    b: bufs,
                    k,
                    apply: true,
                },
                n,
                PIECE,
                threads,
                exec,
            );
        }
        Second::Factored {
            row_var,
            col_var,
            rows,
            cols,
        } => {
            let batch = n / (rows * cols);
            // Row means of g² (each row contiguous; the sign of g does not matter), then
            // column means (rows accumulated).
            for (r, v) in row_var.iter_mut().enumerate() {
                let row = &grad[r * cols..(r + 1) * cols];
                *v = lerp(*v, T::of(sum_sq(row) / cols as f64), k.w);
            }
            let mut acc = vec![0f64; cols];
            for b in 0..batch {
                acc.iter_mut().for_each(|a| *a = 0.0);
                for r in 0..rows {
                    let row = &grad[(b * rows + r) * cols..(b * rows + r + 1) * cols];
                    for (a, &x) in acc.iter_mut().zip(row) {
                        *a += x.wide() * x.wide();
                    }
                }
                for (v, a) in col_var[b * cols..(b + 1) * cols].iter_mut().zip(&acc) {
                    *v = lerp(*v, T::of(a / rows as f64), k.w);
                }
            }
            let eps1 = T::of(h.eps1);
            let row_means: Vec<T> = (0..batch)
                .map(|b| {
                    let s: f64 = row_var[b * rows..(b + 1) * rows]
                        .iter()
                        .map(|&v| v.wide())
                        .sum();
                    let m = T::of(s / rows as f64);
                    if m < eps1 {
                        eps1
                    } else {
                        m
                    }
                })
                .collect();
            bufs.a = row_var.as_mut_ptr();
            bufs.b = col_var.as_mut_ptr();
            let per = PIECE / cols.max(1);
            let pass = |k: Scal<T>, apply: bool| FactoredPass {
                b: bufs,
                k,
                row_means: &row_means,
                rows,
                cols,
                apply,
            };
            let unorm = par(&pass(k, false), batch * rows, per, threads, exec).sqrt();
            k.scale = T::of(-alpha / 1f64.max(unorm / (root_n * h.d)));
            par(&pass(k, true), batch * rows, per, threads, exec);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::Serial;

    fn hyper() -> Adafactor {
        Adafactor {
            lr: 1e-2,
            beta2_decay: -0.8,
            eps1: 1e-30,
            eps2: 1e-3,
            d: 1.0,
            weight_decay: 0.0,
            maximize: false,
        }
    }

    #[test]
    fn first_factored_step_of_a_rank_one_square_is_exact() {
        // g = u v^T with |u_i| = |v_j| = 1: every row/col mean of g² is 1, so the estimate
        // is 1 and the update is g itself; ||g|| / sqrt(n) = 1 gives denom 1.
        let mut p = vec![1.0f64; 6];
        let g = [1.0, -1.0, 1.0, -1.0, 1.0, -1.0];
        let (mut rv, mut cv) = (vec![0.0; 2], vec![0.0; 3]);
        let second = Second::Factored {
            row_var: &mut rv,
            col_var: &mut cv,
            rows: 2,
            cols: 3,
        };
        adafactor(&hyper(), 1.0, &mut p, &g, second, 1, &Serial);
        // step 1: w = 1 (the means replace the state), rho = min(lr, 1) = lr, alpha = lr.
        assert_eq!(rv, vec![1.0, 1.0]);
        assert_eq!(cv, vec![1.0, 1.0, 1.0]);
        for (pi, gi) in p.iter().zip(g) {
            assert!((pi - (1.0 - 0.01 * gi)).abs() < 1e-15, "{p:?}");
        }
    }

    #[test]
    fn vector_path_clips_large_updates() {
        let mut p = vec![0.0f32; 4];
        let g = [3.0f32, 0.0, 0.0, 0.0];
        let mut var = vec![0.0f32; 4];
        let h = Adafactor {
            eps1: 1e-3,
            ..hyper()
        };
        adafactor(
            &h,
            1.0,
            &mut p,
            &g,
            Second::Full { variance: &mut var },
            1,
            &Serial,
        );
        assert_eq!(var, vec![9.0, 0.0, 0.0, 0.0]);
        // u = (1, 0, 0, 0), ||u|| / sqrt(4) = 0.5 -> denom 1; alpha = eps2 * lr (p = 0).
        assert!((p[0] + 1e-5).abs() < 1e-12, "{p:?}");
        assert_eq!(&p[1..], &[0.0, 0.0, 0.0]);
    }
}

//! L-BFGS (torch.optim.LBFGS): the two-loop recursion that turns the gradient and the
//! stored curvature pairs `(y_i, s_i)` into the search direction, on flat vectors.
//!
//! ```text
//! q = -g
//! for i = k-1 .. 0:  al_i = (s_i . q) * ro_i;   q = q + (-al_i) * y_i
//! r = q * H_diag
//! for i = 0 .. k-1:  be_i = (y_i . r) * ro_i;   r = r + (al_i - be_i) * s_i
//! d = r
//! ```
//!
//! As in torch, every scalar is rounded to the element type (torch keeps them in 0-dim
//! tensors of the parameters' dtype) and each update is one fused multiply-add. Dot
//! products are summed in f64 and rounded once, so they match torch's (which sums in the
//! element type, in its BLAS's order) to the rounding of the element type. Each update of
//! `q`/`r` and the dot product that follows it share one pass over the vector.

use crate::driver::{with_simd, SimdWork};
use crate::elem::OpFloat;

/// An element type of the recursion (f32 or f64).
pub trait Real: OpFloat + Into<f64> {}
impl Real for f32 {}
impl Real for f64 {}

/// Lanes of the f64 sums: fixed, so the sums (and every result) are the same whichever
/// SIMD width the loop is compiled for; enough of them to keep AVX-512 busy.
const LANES: usize = 32;

/// Sums the lanes in a fixed pairwise order.
#[inline(always)]
fn reduce(acc: [f64; LANES]) -> f64 {
    let mut v = acc;
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            v[l] += v[l + w];
        }
    }
    v[0]
}

/// `a . b`, summed in f64 in [`LANES`] lanes and rounded to `T`.
pub fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    T::of(with_simd(Dot(a, b)))
}

struct Dot<'a, T>(&'a [T], &'a [T]);

impl<T: Real> SimdWork for Dot<'_, T> {
    type Out = f64;
    #[inline(always)]
    fn run(self) -> f64 {
        dot_f64(self.0, self.1)
    }
}

#[inline(always)]
fn dot_f64<T: Real>(a: &[T], b: &[T]) -> f64 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f64; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            acc[l] += x[l].into() * y[l].into();
        }
    }
    for (l, (x, y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
        acc[l] += (*x).into() * (*y).into();
    }
    reduce(acc)
}

/// `x = x + alpha * v` (one rounding per element, torch's `add_(v, alpha=alpha)`), then
/// returns `w . x` over the updated `x` when `w` is given.
#[inline(always)]
fn axpy_then_dot<T: Real>(x: &mut [T], alpha: T, v: &[T], w: Option<&[T]>) -> f64 {
    let n = x.len();
    let v = &v[..n];
    match w {
        None => {
            for (xi, &vi) in x.iter_mut().zip(v) {
                *xi = vi.mul_add(alpha, *xi);
            }
            0.0
        }
        Some(w) => {
            let w = &w[..n];
            let mut acc = [0.0f64; LANES];
            let full = n - n % LANES;
            for ((xc, vc), wc) in x[..full]
                .chunks_exact_mut(LANES)
                .zip(v.chunks_exact(LANES))
                .zip(w.chunks_exact(LANES))
            {
                for l in 0..LANES {
                    let xi = vc[l].mul_add(alpha, xc[l]);
                    xc[l] = xi;
                    acc[l] += wc[l].into() * xi.into();
                }
            }
            for (l, i) in (full..n).enumerate() {
                let xi = v[i].mul_add(alpha, x[i]);
                x[i] = xi;
                acc[l] += w[i].into() * xi.into();
            }
            reduce(acc)
        }
    }
}

/// `x = x + alpha * v`, one rounding per element: torch's `x.add_(v, alpha=alpha)`.
pub fn add_scaled<T: Real>(x: &mut [T], alpha: T, v: &[T]) {
    with_simd(AddScaled(x, alpha, v))
}

struct AddScaled<'a, T>(&'a mut [T], T, &'a [T]);

impl<T: Real> SimdWork for AddScaled<'_, T> {
    type Out = ();
    #[inline(always)]
    fn run(self) {
        axpy_then_dot(self.0, self.1, self.2, None);
    }
}

/// The stored curvature pairs, oldest first: `dirs[i] = y_i` (gradient change), `stps[i] =
/// s_i` (step), `ro[i] = 1 / (y_i . s_i)`.
pub struct History<'a, T> {
    pub dirs: Vec<&'a [T]>,
    pub stps: Vec<&'a [T]>,
    pub ro: Vec<T>,
}

/// Writes the L-BFGS direction for gradient `grad` into `d`, and the first-loop
/// coefficients into `al[..k]`. `h_diag` scales the initial Hessian approximation.
///
/// # Panics
/// If the lengths disagree (every vector must have `grad.len()` elements, `al` at least `k`).
pub fn two_loop<T: Real>(grad: &[T], h: &History<'_, T>, h_diag: T, al: &mut [T], d: &mut [T]) {
    with_simd(TwoLoop {
        grad,
        h,
        h_diag,
        al,
        d,
    })
}

struct TwoLoop<'a, 'h, T> {
    grad: &'a [T],
    h: &'a History<'h, T>,
    h_diag: T,
    al: &'a mut [T],
    d: &'a mut [T],
}

impl<T: Real> SimdWork for TwoLoop<'_, '_, T> {
    type Out = ();
    #[inline(always)]
    fn run(self) {
        let TwoLoop {
            grad,
            h,
            h_diag,
            al,
            d,
        } = self;
        run_two_loop(grad, h, h_diag, al, d)
    }
}

#[inline(always)]
fn run_two_loop<T: Real>(grad: &[T], h: &History<'_, T>, h_diag: T, al: &mut [T], d: &mut [T]) {
    let n = grad.len();
    let k = h.dirs.len();
    assert!(h.stps.len() == k && h.ro.len() == k && al.len() >= k && d.len() == n);
    assert!(h.dirs.iter().chain(&h.stps).all(|v| v.len() == n));
    // q lives in `d` until it becomes r (torch's `d = r = q * H_diag` makes a new tensor;
    // nothing reads q afterwards, so one buffer serves).
    for (di, &gi) in d.iter_mut().zip(grad) {
        *di = -gi;
    }
    if k > 0 {
        let mut sq = dot_f64(h.stps[k - 1], d);
        for i in (0..k).rev() {
            al[i] = T::of(sq) * h.ro[i];
            let next = if i > 0 { Some(h.stps[i - 1]) } else { None };
            sq = axpy_then_dot(d, -al[i], h.dirs[i], next);
        }
    }
    for di in d.iter_mut() {
        *di = *di * h_diag;
    }
    if k > 0 {
        let mut yr = dot_f64(h.dirs[0], d);
        for (i, (&al_i, &ro_i)) in al[..k].iter().zip(&h.ro).enumerate() {
            let be = T::of(yr) * ro_i;
            let next = h.dirs.get(i + 1).copied();
            yr = axpy_then_dot(d, al_i - be, h.stps[i], next);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 11) as f64 / (1u64 << 53) as f64) - 0.5
    }

    /// The recursion written plainly, all in f64, as the reference.
    fn reference(
        grad: &[f64],
        dirs: &[Vec<f64>],
        stps: &[Vec<f64>],
        ro: &[f64],
        h_diag: f64,
    ) -> Vec<f64> {
        let k = dirs.len();
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        let mut q: Vec<f64> = grad.iter().map(|g| -g).collect();
        let mut al = vec![0.0; k];
        for i in (0..k).rev() {
            al[i] = dot(&stps[i], &q) * ro[i];
            for j in 0..q.len() {
                q[j] -= al[i] * dirs[i][j];
            }
        }
        let mut r: Vec<f64> = q.iter().map(|x| x * h_diag).collect();
        for i in 0..k {
            let be = dot(&dirs[i], &r) * ro[i];
            for j in 0..r.len() {
                r[j] += (al[i] - be) * stps[i][j];
            }
        }
        r
    }

    #[test]
    fn matches_the_plain_recursion() {
        let mut seed = 7;
        for &(n, k) in &[(1usize, 0usize), (5, 1), (37, 3), (1000, 10)] {
            let grad: Vec<f64> = (0..n).map(|_| lcg(&mut seed)).collect();
            let dirs: Vec<Vec<f64>> = (0..k)
                .map(|_| (0..n).map(|_| lcg(&mut seed)).collect())
                .collect();
            let stps: Vec<Vec<f64>> = dirs
                .iter()
                .map(|y| y.iter().map(|v| v * 0.5 + 0.01 * lcg(&mut seed)).collect())
                .collect();
            let ro: Vec<f64> = dirs
                .iter()
                .zip(&stps)
                .map(|(y, s)| 1.0 / y.iter().zip(s).map(|(a, b)| a * b).sum::<f64>())
                .collect();
            let want = reference(&grad, &dirs, &stps, &ro, 0.7);
            let h = History {
                dirs: dirs.iter().map(|v| v.as_slice()).collect(),
                stps: stps.iter().map(|v| v.as_slice()).collect(),
                ro: ro.clone(),
            };
            let (mut al, mut d) = (vec![0.0; k], vec![0.0; n]);
            two_loop(&grad, &h, 0.7, &mut al, &mut d);
            let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
            for (a, b) in d.iter().zip(&want) {
                assert!((a - b).abs() <= 1e-12 * scale, "n={n} k={k}: {a} vs {b}");
            }
            // f32: the same recursion to f32 rounding.
            let g32: Vec<f32> = grad.iter().map(|&v| v as f32).collect();
            let d32s: Vec<Vec<f32>> = dirs
                .iter()
                .map(|v| v.iter().map(|&x| x as f32).collect())
                .collect();
            let s32s: Vec<Vec<f32>> = stps
                .iter()
                .map(|v| v.iter().map(|&x| x as f32).collect())
                .collect();
            let h32 = History {
                dirs: d32s.iter().map(|v| v.as_slice()).collect(),
                stps: s32s.iter().map(|v| v.as_slice()).collect(),
                ro: ro.iter().map(|&v| v as f32).collect(),
            };
            let (mut al32, mut d32) = (vec![0.0f32; k], vec![0.0f32; n]);
            two_loop(&g32, &h32, 0.7, &mut al32, &mut d32);
            for (a, b) in d32.iter().zip(&want) {
                assert!(
                    (*a as f64 - b).abs() <= 1e-4 * scale,
                    "f32 n={n} k={k}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn dot_sums_in_f64() {
        let a = [1e8f32, 1.0, -1e8, 1.0];
        let b = [1.0f32; 4];
        assert_eq!(dot(&a, &b), 2.0);
    }
}

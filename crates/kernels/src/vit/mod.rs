//! Row-wise CPU kernels of the Vision Transformer (`ferrotorch.nn.ViT`).
//!
//! Everything between the matmuls: LayerNorm forward and backward (the backward adds into
//! the residual stream's gradient), the scaled softmax of attention and its backward,
//! exact-erf GELU and its backward, inverted dropout and residual adds. Each is one pass
//! over rows held in cache, run on the caller's threads. Dropout masks are never stored:
//! `keep(seed, i)` is a counter-based hash, so the backward pass recomputes them.
//! Buffers are `E: Elem` (f32, f64, bf16, f16); arithmetic runs in `E::Op` (f32 for the
//! 16-bit types), as torch's CPU kernels do.
//!
//! One module per operation: [`layer_norm`], [`gelu`], [`dropout`] (the masks and the
//! residual add), [`attention`] and [`patches`]; this file holds what they share: the float
//! operations ([`Act`]), raw buffers ([`Ptr`]) and the row-parallel driver.

use half::{bf16, f16};

use crate::driver::{map_pieces, with_simd, DType, Executor, SimdWork};
use crate::elem::{Elem, OpFloat};

mod attention;
mod dropout;
mod gelu;
mod layer_norm;
mod patches;
#[cfg(test)]
mod tests;

pub use attention::{attention, attention_backward, gemm, Attention};
use dropout::Mask;
pub use dropout::{add_dropout, keep, AddDropout, Dropout};
pub use gelu::{gelu_backward, gelu_forward, GeluBwd, GeluFwd};
pub use layer_norm::{layer_norm, layer_norm_backward, LnBwd, LnFwd};
pub use patches::{patches, Patches};

/// Elements per unit of parallel work.
const CHUNK: usize = 1 << 14;

/// The float operations the ViT kernels need beyond [`OpFloat`].
pub trait Act: OpFloat {
    fn exp(self) -> Self;
    fn erf(self) -> Self;
    fn fmax(self, o: Self) -> Self;
    fn to_f64(self) -> f64;
}

impl Act for f32 {
    /// Cephes' `expf`, written branch-free so loops over it vectorize (≤ 2 ulp).
    #[inline(always)]
    #[allow(clippy::excessive_precision)] // Cephes' coefficients, as published
    fn exp(self) -> f32 {
        let x = self.clamp(-87.0, 88.0);
        let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
        let r = n.mul_add(-0.693_359_4, x);
        let r = n.mul_add(2.121_944_4e-4, r);
        let mut p = 1.987_569_1e-4f32;
        p = p.mul_add(r, 1.398_199_9e-3);
        p = p.mul_add(r, 8.333_452e-3);
        p = p.mul_add(r, 4.166_579_6e-2);
        p = p.mul_add(r, 1.666_666_5e-1);
        p = p.mul_add(r, 5.000_000_1e-1);
        let y = p.mul_add(r * r, r + 1.0);
        // 2^n from the bits of n + 1.5 * 2^23 (integer-only, so it vectorizes)
        let ni = (n + 12_582_912.0).to_bits().wrapping_sub(0x4b40_0000);
        let scale = f32::from_bits(ni.wrapping_add(127) << 23);
        // NaN in, NaN out (the clamp keeps NaN; the cast does not).
        if self.is_nan() {
            self
        } else {
            y * scale
        }
    }
    /// Abramowitz–Stegun 7.1.26 (|error| ≤ 1.5e-7), the formula of torch's own vectorized
    /// fp32 `erf` on AVX2/AVX-512.
    #[inline(always)]
    fn erf(self) -> f32 {
        let a = self.abs();
        let t = 1.0 / 0.327_591_1f32.mul_add(a, 1.0);
        let mut r = 1.061_405_4f32.mul_add(t, -1.453_152);
        r = r.mul_add(t, 1.421_413_8);
        r = r.mul_add(t, -0.284_496_74);
        r = r.mul_add(t, 0.254_829_6);
        let e = Act::exp(-(a * a));
        let y = (-e * t).mul_add(r, 1.0);
        y.copysign(self)
    }
    #[inline(always)]
    fn fmax(self, o: f32) -> f32 {
        if self > o {
            self
        } else {
            o
        }
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
}

impl Act for f64 {
    #[inline(always)]
    fn exp(self) -> f64 {
        f64::exp(self)
    }
    #[inline(always)]
    fn erf(self) -> f64 {
        libm::erf(self)
    }
    #[inline(always)]
    fn fmax(self, o: f64) -> f64 {
        if self > o {
            self
        } else {
            o
        }
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
}

/// An element type whose arithmetic type has [`Act`].
pub trait VElem: Elem<Op: Act> {}
impl<E: Elem<Op: Act>> VElem for E {}

/// Independent accumulators per reduction, so strict-order float sums still vectorize.
const LANES: usize = 16;

#[inline(always)]
fn hsum<T: Act>(a: [T; LANES]) -> T {
    tree(a, |x, y| x + y)
}

/// `a` reduced pairwise, halves at a time: 4 vector steps instead of 15 dependent scalar ones.
#[inline(always)]
fn tree<T: Act>(mut a: [T; LANES], f: impl Fn(T, T) -> T) -> T {
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            a[i] = f(a[i], a[i + w]);
        }
    }
    a[0]
}

/// `sum(f(x))` over `xs` (buffer elements or arithmetic values; `f` loads and maps one), in
/// lanes: lane `l` takes elements `l, l + 16, ...` of the whole chunks, the lanes are added
/// pairwise, then the tail in order. Written over chunks of the slice: an index closure
/// (`|j| f(xs[j])`) left the loads scalar, and LayerNorm's forward took twice as long.
#[inline(always)]
fn lane_sum_of<X: Copy, T: Act>(xs: &[X], f: impl Fn(X) -> T) -> T {
    let mut acc = [T::of(0.0); LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a = *a + f(*x);
        }
    }
    let mut s = hsum(acc);
    for x in chunks.remainder() {
        s = s + f(*x);
    }
    s
}

/// [`lane_sum_of`] over pairs of elements of two slices of the arithmetic type.
#[inline(always)]
fn lane_sum_pairs<T: Act>(xs: &[T], ys: &[T], f: impl Fn(T, T) -> T) -> T {
    let mut acc = [T::of(0.0); LANES];
    let (mut cx, mut cy) = (xs.chunks_exact(LANES), ys.chunks_exact(LANES));
    for (x, y) in (&mut cx).zip(&mut cy) {
        for ((a, x), y) in acc.iter_mut().zip(x).zip(y) {
            *a = *a + f(*x, *y);
        }
    }
    let mut s = hsum(acc);
    for (x, y) in cx.remainder().iter().zip(cy.remainder()) {
        s = s + f(*x, *y);
    }
    s
}

/// A raw buffer of some dtype (the bindings check size, dtype and contiguity).
#[derive(Clone, Copy, Debug)]
pub struct Ptr(pub *mut u8);
// SAFETY: the kernels' contracts make every pointer valid and the written ranges disjoint.
unsafe impl Send for Ptr {}
unsafe impl Sync for Ptr {}

impl Ptr {
    pub const NULL: Ptr = Ptr(std::ptr::null_mut());
    #[inline(always)]
    unsafe fn rows<'a, T>(self, r0: usize, r1: usize, d: usize) -> &'a mut [T] {
        std::slice::from_raw_parts_mut((self.0 as *mut T).add(r0 * d), (r1 - r0) * d)
    }
    #[inline(always)]
    unsafe fn all<'a, T>(self, n: usize) -> &'a [T] {
        std::slice::from_raw_parts(self.0 as *const T, n)
    }
}

/// A row-wise operation: `rows::<E>(r0, r1)` handles rows `r0..r1` and returns a partial
/// result (reductions over rows are summed by the caller in row order).
trait RowOp: Sync {
    fn rows<E: VElem>(&self, r0: usize, r1: usize) -> Vec<f64>;
}

/// Rows `r0..r1` of an op for element type `E`, as [`SimdWork`].
struct Rows<'a, O, E>(&'a O, usize, usize, std::marker::PhantomData<E>);

impl<O: RowOp, E: VElem> SimdWork for Rows<'_, O, E> {
    type Out = Vec<f64>;
    #[inline(always)]
    fn run(self) -> Vec<f64> {
        self.0.rows::<E>(self.1, self.2)
    }
}

fn rows_dispatch<O: RowOp, E: VElem>(op: &O, r0: usize, r1: usize) -> Vec<f64> {
    with_simd(Rows::<O, E>(op, r0, r1, std::marker::PhantomData))
}

/// Runs `op` over `n_rows` rows of `row_len` elements on up to `threads` workers; returns the
/// element-wise sum of the partial results, added in row order (thread-count independent).
fn par_rows<O: RowOp>(
    op: &O,
    dtype: DType,
    n_rows: usize,
    row_len: usize,
    threads: usize,
    exec: &dyn Executor,
) -> Vec<f64> {
    let per = (CHUNK / row_len.max(1)).max(1);
    let pieces: Vec<(usize, usize, usize)> = (0..n_rows)
        .step_by(per)
        .map(|r| (0, r, (r + per).min(n_rows)))
        .collect();
    let parts = map_pieces(
        &pieces,
        threads,
        exec,
        Vec::new(),
        &|_, r0, r1| match dtype {
            DType::F32 => rows_dispatch::<O, f32>(op, r0, r1),
            DType::F64 => rows_dispatch::<O, f64>(op, r0, r1),
            DType::BF16 => rows_dispatch::<O, bf16>(op, r0, r1),
            DType::F16 => rows_dispatch::<O, f16>(op, r0, r1),
        },
    );
    let mut total: Vec<f64> = Vec::new();
    for p in parts {
        if total.is_empty() {
            total = p;
        } else {
            for (t, v) in total.iter_mut().zip(p) {
                *t += v;
            }
        }
    }
    total
}

/// Like [`par_rows`] for (batch, head) units: about 8 pieces per thread, so the per-piece
/// scratch buffers (a few KB per head) are allocated a few times per call, not per head.
fn par_units<O: RowOp>(op: &O, dtype: DType, units: usize, threads: usize, exec: &dyn Executor) {
    let per = (units / (threads.max(1) * 8)).max(1);
    par_rows(op, dtype, units, CHUNK / per.min(CHUNK), threads, exec);
}

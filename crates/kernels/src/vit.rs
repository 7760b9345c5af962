//! Row-wise CPU kernels of the Vision Transformer (`ferrotorch.nn.ViT`).
//!
//! Everything between the matmuls: LayerNorm forward and backward (the backward adds into
//! the residual stream's gradient), the scaled softmax of attention and its backward,
//! exact-erf GELU and its backward, inverted dropout and residual adds. Each is one pass
//! over rows held in cache, run on the caller's threads. Dropout masks are never stored:
//! `keep(seed, i)` is a counter-based hash, so the backward pass recomputes them.
//! Buffers are `E: Elem` (f32, f64, bf16, f16); arithmetic runs in `E::Op` (f32 for the
//! 16-bit types), as torch's CPU kernels do.

use half::{bf16, f16};

use crate::driver::{map_pieces, DType, Executor};
use crate::elem::{Elem, OpFloat};

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
        let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
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
        let e = (-(a * a)).exp();
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

/// Inverted dropout with probability `p`: element `i` of a tensor is kept when the hash of
/// `(seed, i)` falls under the threshold, and then scaled by `1 / (1 - p)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    pub p: f64,
    pub seed: u64,
}

impl Dropout {
    pub const OFF: Dropout = Dropout { p: 0.0, seed: 0 };

    pub fn active(&self) -> bool {
        self.p > 0.0
    }
    /// Keep-threshold on 24 hash bits.
    fn threshold(&self) -> u32 {
        ((1.0 - self.p.clamp(0.0, 1.0)) * (1u32 << 24) as f64).round() as u32
    }
    fn scale(&self) -> f64 {
        if self.p >= 1.0 {
            0.0
        } else {
            1.0 / (1.0 - self.p)
        }
    }
}

/// Wellons' `lowbias32` integer mix.
#[inline(always)]
fn mix(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

/// Whether element `i` survives dropout (24 uniform bits against `threshold`).
#[inline(always)]
pub fn keep(seed: u64, i: u64, threshold: u32) -> bool {
    let x = mix((i as u32) ^ (seed as u32));
    let x = mix(x ^ (seed >> 32) as u32 ^ ((i >> 32) as u32).wrapping_mul(0x9e37_79b9));
    (x >> 8) < threshold
}

/// A mask factor for one dropout site: `scale` or 0 per element.
#[derive(Clone, Copy)]
struct Mask<T> {
    on: bool,
    seed: u64,
    threshold: u32,
    scale: T,
}

impl<T: Act> Mask<T> {
    fn of(d: Dropout) -> Self {
        Mask {
            on: d.active(),
            seed: d.seed,
            threshold: d.threshold(),
            scale: T::of(d.scale()),
        }
    }
    #[inline(always)]
    fn at(&self, i: usize) -> T {
        if keep(self.seed, i as u64, self.threshold) {
            self.scale
        } else {
            T::of(0.0)
        }
    }
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

fn simd_level() -> u8 {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::atomic::{AtomicU8, Ordering};
        static HAS: AtomicU8 = AtomicU8::new(0);
        let mut has = HAS.load(Ordering::Relaxed);
        if has == 0 {
            has = if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
                3
            } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                2
            } else {
                1
            };
            HAS.store(has, Ordering::Relaxed);
        }
        has
    }
    #[cfg(not(target_arch = "x86_64"))]
    1
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn rows_avx512<O: RowOp, E: VElem>(op: &O, r0: usize, r1: usize) -> Vec<f64> {
    op.rows::<E>(r0, r1)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2<O: RowOp, E: VElem>(op: &O, r0: usize, r1: usize) -> Vec<f64> {
    op.rows::<E>(r0, r1)
}

fn rows_dispatch<O: RowOp, E: VElem>(op: &O, r0: usize, r1: usize) -> Vec<f64> {
    #[cfg(target_arch = "x86_64")]
    {
        let level = simd_level();
        // SAFETY: the CPU has the features (checked above).
        if level == 3 {
            return unsafe { rows_avx512::<O, E>(op, r0, r1) };
        }
        if level == 2 {
            return unsafe { rows_avx2::<O, E>(op, r0, r1) };
        }
    }
    op.rows::<E>(r0, r1)
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
    let parts = map_pieces(&pieces, threads, exec, Vec::new(), &|_, r0, r1| match dtype {
        DType::F32 => rows_dispatch::<O, f32>(op, r0, r1),
        DType::F64 => rows_dispatch::<O, f64>(op, r0, r1),
        DType::BF16 => rows_dispatch::<O, bf16>(op, r0, r1),
        DType::F16 => rows_dispatch::<O, f16>(op, r0, r1),
    });
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
        for (k, (xr, yr)) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)).enumerate() {
            let mut s = E::Op::of(0.0);
            for v in xr {
                s = s + v.load();
            }
            let mean = s * inv_d;
            let mut ss = E::Op::of(0.0);
            for v in xr {
                let c = v.load() - mean;
                ss = c.mul_add(c, ss);
            }
            let rstd = E::Op::of(1.0) / (ss * inv_d + E::Op::of(self.eps)).sqrt();
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
            let (mut m1, mut m2) = (E::Op::of(0.0), E::Op::of(0.0));
            for j in 0..d {
                let g = gyr[j].load();
                let xh = (xr[j].load() - mean) * rstd;
                gw[j] = g.mul_add(xh, gw[j]);
                gb[j] = gb[j] + g;
                let gh = g * w[j].load();
                xhat[j] = xh;
                gxhat[j] = gh;
                m1 = m1 + gh;
                m2 = gh.mul_add(xh, m2);
            }
            let (m1, m2) = (m1 * inv_d, m2 * inv_d);
            for j in 0..d {
                let v = (gxhat[j] - m1 - xhat[j] * m2) * rstd;
                gxr[j] = E::store(if self.accumulate { gxr[j].load() + v } else { v });
            }
        }
        gw.iter().chain(&gb).map(|v| v.to_f64()).collect()
    }
}

/// Attention's `softmax(dots * scale)` over rows of `n`, in place. With dropout, `dropped`
/// receives `softmax * mask` (the operand of `attn @ v`).
pub struct SoftmaxFwd {
    pub x: Ptr,
    pub dropped: Ptr,
    pub n: usize,
    pub scale: f64,
    pub dropout: Dropout,
}

impl RowOp for SoftmaxFwd {
    #[inline(always)]
    fn rows<E: VElem>(&self, r0: usize, r1: usize) -> Vec<f64> {
        let n = self.n;
        // SAFETY: `softmax`'s contract.
        let x = unsafe { self.x.rows::<E>(r0, r1, n) };
        let scale = E::Op::of(self.scale);
        let mask = Mask::<E::Op>::of(self.dropout);
        let mut tmp = vec![E::Op::of(0.0); n];
        for (k, row) in x.chunks_exact_mut(n).enumerate() {
            let mut m = E::Op::of(f64::NEG_INFINITY);
            for (t, v) in tmp.iter_mut().zip(row.iter()) {
                *t = v.load() * scale;
                m = m.fmax(*t);
            }
            let mut s = E::Op::of(0.0);
            for t in tmp.iter_mut() {
                *t = (*t - m).exp();
                s = s + *t;
            }
            let inv = E::Op::of(1.0) / s;
            for (o, t) in row.iter_mut().zip(&tmp) {
                *o = E::store(*t * inv);
            }
            if mask.on {
                // SAFETY: same shape as `x`.
                let dr = unsafe { self.dropped.rows::<E>(r0 + k, r0 + k + 1, n) };
                let base = (r0 + k) * n;
                for (j, (o, v)) in dr.iter_mut().zip(row.iter()).enumerate() {
                    *o = E::store(v.load() * mask.at(base + j));
                }
            }
        }
        Vec::new()
    }
}

/// Softmax backward, in place on `g` (the gradient of the dropped attention):
/// `g = scale * attn * (gm - sum(gm * attn))` with `gm = g * mask`.
pub struct SoftmaxBwd {
    pub g: Ptr,
    pub attn: Ptr,
    pub n: usize,
    pub scale: f64,
    pub dropout: Dropout,
}

impl RowOp for SoftmaxBwd {
    #[inline(always)]
    fn rows<E: VElem>(&self, r0: usize, r1: usize) -> Vec<f64> {
        let n = self.n;
        // SAFETY: `softmax_backward`'s contract.
        let (g, a) = unsafe { (self.g.rows::<E>(r0, r1, n), self.attn.rows::<E>(r0, r1, n)) };
        let scale = E::Op::of(self.scale);
        let mask = Mask::<E::Op>::of(self.dropout);
        for (k, (gr, ar)) in g.chunks_exact_mut(n).zip(a.chunks_exact(n)).enumerate() {
            let base = (r0 + k) * n;
            let mut s = E::Op::of(0.0);
            if mask.on {
                for (j, (gv, av)) in gr.iter_mut().zip(ar).enumerate() {
                    let gm = gv.load() * mask.at(base + j);
                    *gv = E::store(gm);
                    s = gm.mul_add(av.load(), s);
                }
            } else {
                for (gv, av) in gr.iter().zip(ar) {
                    s = gv.load().mul_add(av.load(), s);
                }
            }
            for (gv, av) in gr.iter_mut().zip(ar) {
                *gv = E::store(av.load() * (gv.load() - s) * scale);
            }
        }
        Vec::new()
    }
}

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
        let kp = E::Op::of(0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2);
        let y: &mut [E] = if self.y.0.is_null() {
            &mut []
        } else {
            // SAFETY: same length as `x`.
            unsafe { self.y.rows::<E>(r0, r1, 1) }
        };
        let write_y = !y.is_empty();
        for j in 0..x.len() {
            let v = x[j].load();
            let m = if mask.on { mask.at(r0 + j) } else { one };
            let cdf = half * (one + (v * k).erf());
            let pdf = (-half * v * v).exp() * kp;
            g[j] = E::store(g[j].load() * m * (cdf + v * pdf));
            if write_y {
                y[j] = E::store(v * cdf * m);
            }
        }
        Vec::new()
    }
}

/// `out = h + y * mask` (a residual add after dropout), or with `y` null `out = h * mask`.
pub struct AddDropout {
    pub h: Ptr,
    pub y: Ptr,
    pub out: Ptr,
    pub dropout: Dropout,
}

impl RowOp for AddDropout {
    #[inline(always)]
    fn rows<E: VElem>(&self, r0: usize, r1: usize) -> Vec<f64> {
        // SAFETY: `add_dropout`'s contract.
        let (h, out) = unsafe { (self.h.rows::<E>(r0, r1, 1), self.out.rows::<E>(r0, r1, 1)) };
        let mask = Mask::<E::Op>::of(self.dropout);
        if self.y.0.is_null() {
            for (j, (o, a)) in out.iter_mut().zip(h.iter()).enumerate() {
                let m = if mask.on { mask.at(r0 + j) } else { E::Op::of(1.0) };
                *o = E::store(a.load() * m);
            }
            return Vec::new();
        }
        // SAFETY: same length as `h`.
        let y = unsafe { self.y.rows::<E>(r0, r1, 1) };
        if mask.on {
            for (j, ((o, a), b)) in out.iter_mut().zip(h.iter()).zip(y.iter()).enumerate() {
                *o = E::store(b.load().mul_add(mask.at(r0 + j), a.load()));
            }
        } else {
            for ((o, a), b) in out.iter_mut().zip(h.iter()).zip(y.iter()) {
                *o = E::store(a.load() + b.load());
            }
        }
        Vec::new()
    }
}

/// LayerNorm forward over `rows` rows of `d`.
///
/// # Safety
/// `x`, `y`: `rows * d` elements of `dtype`; `w`, `b`: `d`; `mean`, `rstd`: null or `rows`
/// elements of the arithmetic type (f64 for F64, else f32). `y` must not overlap the others.
pub unsafe fn layer_norm(op: &LnFwd, dtype: DType, rows: usize, threads: usize, exec: &dyn Executor) {
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

/// # Safety
/// `x` (and `dropped` when dropout is on): `rows * n` elements of `dtype`, not overlapping.
pub unsafe fn softmax(op: &SoftmaxFwd, dtype: DType, rows: usize, threads: usize, exec: &dyn Executor) {
    par_rows(op, dtype, rows, op.n, threads, exec);
}

/// # Safety
/// `g`, `attn`: `rows * n` elements of `dtype`, not overlapping.
pub unsafe fn softmax_backward(
    op: &SoftmaxBwd,
    dtype: DType,
    rows: usize,
    threads: usize,
    exec: &dyn Executor,
) {
    par_rows(op, dtype, rows, op.n, threads, exec);
}

/// # Safety
/// `x`, `y`: `numel` elements of `dtype`, not overlapping.
pub unsafe fn gelu_forward(op: &GeluFwd, dtype: DType, numel: usize, threads: usize, exec: &dyn Executor) {
    par_rows(op, dtype, numel, 1, threads, exec);
}

/// # Safety
/// `x`, `g` (and `y` unless null): `numel` elements of `dtype`, not overlapping.
pub unsafe fn gelu_backward(op: &GeluBwd, dtype: DType, numel: usize, threads: usize, exec: &dyn Executor) {
    par_rows(op, dtype, numel, 1, threads, exec);
}

/// # Safety
/// `h`, `out` (and `y` unless null): `numel` elements of `dtype`; `out` may equal `h` but
/// overlaps nothing else.
pub unsafe fn add_dropout(op: &AddDropout, dtype: DType, numel: usize, threads: usize, exec: &dyn Executor) {
    par_rows(op, dtype, numel, 1, threads, exec);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::Serial;

    fn p<T>(v: &mut [T]) -> Ptr {
        Ptr(v.as_mut_ptr() as *mut u8)
    }

    #[test]
    fn fast_exp_and_erf_are_accurate() {
        let mut worst_exp = 0f64;
        let mut worst_erf = 0f64;
        for i in -80000..=20000 {
            let x = i as f32 * 1e-3;
            let e = Act::exp(x) as f64;
            let want = (x as f64).exp();
            worst_exp = worst_exp.max(((e - want) / want).abs());
            let y = Act::erf(x / 8.0) as f64;
            worst_erf = worst_erf.max((y - libm::erf((x / 8.0) as f64)).abs());
        }
        assert!(worst_exp < 3e-7, "exp rel error {worst_exp}");
        assert!(worst_erf < 5e-7, "erf abs error {worst_erf}");
        assert!(Act::exp(f32::NAN).is_nan());
        assert_eq!(Act::exp(-1000f32), Act::exp(-87f32));
    }

    #[test]
    fn dropout_keeps_about_1_minus_p_and_is_reproducible() {
        let d = Dropout { p: 0.3, seed: 12345 };
        let t = d.threshold();
        let kept = (0..200_000u64).filter(|&i| keep(d.seed, i, t)).count();
        let frac = kept as f64 / 200_000.0;
        assert!((frac - 0.7).abs() < 0.005, "{frac}");
        let again = (0..200_000u64).filter(|&i| keep(d.seed, i, t)).count();
        assert_eq!(kept, again);
        let other = (0..200_000u64).filter(|&i| keep(d.seed + 1, i, t) != keep(d.seed, i, t)).count();
        assert!(other > 50_000);
    }

    #[test]
    fn layer_norm_forward_and_backward_match_finite_differences() {
        let (rows, d) = (3usize, 7usize);
        let mut x: Vec<f64> = (0..rows * d).map(|i| ((i * 37 % 11) as f64 - 5.0) * 0.3).collect();
        let mut w: Vec<f64> = (0..d).map(|i| 1.0 + 0.1 * i as f64).collect();
        let mut b: Vec<f64> = (0..d).map(|i| 0.05 * i as f64).collect();
        let gy: Vec<f64> = (0..rows * d).map(|i| ((i * 13 % 7) as f64 - 3.0) * 0.2).collect();
        let fwd = |x: &mut Vec<f64>, w: &mut Vec<f64>, b: &mut Vec<f64>| -> (Vec<f64>, Vec<f64>, Vec<f64>) {
            let mut y = vec![0.0; rows * d];
            let mut mean = vec![0.0; rows];
            let mut rstd = vec![0.0; rows];
            let op = LnFwd { x: p(x), w: p(w), b: p(b), y: p(&mut y), mean: p(&mut mean), rstd: p(&mut rstd), d, eps: 1e-5 };
            unsafe { layer_norm(&op, DType::F64, rows, 1, &Serial) };
            (y, mean, rstd)
        };
        let loss = |x: &mut Vec<f64>, w: &mut Vec<f64>, b: &mut Vec<f64>| -> f64 {
            fwd(x, w, b).0.iter().zip(&gy).map(|(a, g)| a * g).sum()
        };
        let (_, mut mean, mut rstd) = fwd(&mut x, &mut w, &mut b);
        let mut gy2 = gy.clone();
        let mut gx = vec![1.0; rows * d]; // accumulate onto ones
        let op = LnBwd { gy: p(&mut gy2), x: p(&mut x), mean: p(&mut mean), rstd: p(&mut rstd), w: p(&mut w), gx: p(&mut gx), accumulate: true, d };
        let gwb = unsafe { layer_norm_backward(&op, DType::F64, rows, 2, &Serial) };
        let h = 1e-6;
        for i in 0..rows * d {
            let mut xp = x.clone();
            xp[i] += h;
            let mut xm = x.clone();
            xm[i] -= h;
            let num = (loss(&mut xp, &mut w.clone(), &mut b.clone()) - loss(&mut xm, &mut w.clone(), &mut b.clone())) / (2.0 * h);
            assert!((gx[i] - 1.0 - num).abs() < 1e-7, "x {i}: {} vs {num}", gx[i] - 1.0);
        }
        for j in 0..d {
            let mut wp = w.clone();
            wp[j] += h;
            let mut wm = w.clone();
            wm[j] -= h;
            let num = (loss(&mut x.clone(), &mut wp, &mut b.clone()) - loss(&mut x.clone(), &mut wm, &mut b.clone())) / (2.0 * h);
            assert!((gwb[j] - num).abs() < 1e-7);
            let gb: f64 = (0..rows).map(|r| gy[r * d + j]).sum();
            assert!((gwb[d + j] - gb).abs() < 1e-12);
        }
    }

    #[test]
    fn softmax_and_gelu_backward_match_finite_differences() {
        let n = 5usize;
        let x0: Vec<f64> = (0..2 * n).map(|i| ((i * 7 % 5) as f64 - 2.0) * 0.7).collect();
        let go: Vec<f64> = (0..2 * n).map(|i| ((i * 3 % 4) as f64 - 1.5) * 0.4).collect();
        let drop = Dropout { p: 0.25, seed: 7 };
        // loss = sum(go * dropout(softmax(scale * x)))
        let loss = |x: &[f64]| -> f64 {
            let mut a = x.to_vec();
            let mut dr = vec![0.0; 2 * n];
            let op = SoftmaxFwd { x: p(&mut a), dropped: p(&mut dr), n, scale: 0.5, dropout: drop };
            unsafe { softmax(&op, DType::F64, 2, 1, &Serial) };
            dr.iter().zip(&go).map(|(a, g)| a * g).sum()
        };
        let mut a = x0.clone();
        let mut dr = vec![0.0; 2 * n];
        let op = SoftmaxFwd { x: p(&mut a), dropped: p(&mut dr), n, scale: 0.5, dropout: drop };
        unsafe { softmax(&op, DType::F64, 2, 1, &Serial) };
        assert!((a[..n].iter().sum::<f64>() - 1.0).abs() < 1e-15);
        let mut g = go.clone();
        let op = SoftmaxBwd { g: p(&mut g), attn: p(&mut a), n, scale: 0.5, dropout: drop };
        unsafe { softmax_backward(&op, DType::F64, 2, 1, &Serial) };
        let h = 1e-6;
        for i in 0..2 * n {
            let (mut xp, mut xm) = (x0.clone(), x0.clone());
            xp[i] += h;
            xm[i] -= h;
            let num = (loss(&xp) - loss(&xm)) / (2.0 * h);
            assert!((g[i] - num).abs() < 1e-8, "softmax {i}: {} vs {num}", g[i]);
        }
        // GELU with dropout
        let gl = |x: &[f64]| -> f64 {
            let mut xs = x.to_vec();
            let mut y = vec![0.0; x.len()];
            let op = GeluFwd { x: p(&mut xs), y: p(&mut y), dropout: drop };
            unsafe { gelu_forward(&op, DType::F64, x.len(), 1, &Serial) };
            y.iter().zip(&go).map(|(a, g)| a * g).sum()
        };
        let mut xs = x0.clone();
        let mut g = go.clone();
        let mut y = vec![0.0; 2 * n];
        let op = GeluBwd { x: p(&mut xs), g: p(&mut g), y: p(&mut y), dropout: drop };
        unsafe { gelu_backward(&op, DType::F64, 2 * n, 1, &Serial) };
        for i in 0..2 * n {
            let (mut xp, mut xm) = (x0.clone(), x0.clone());
            xp[i] += h;
            xm[i] -= h;
            let num = (gl(&xp) - gl(&xm)) / (2.0 * h);
            assert!((g[i] - num).abs() < 1e-8, "gelu {i}: {} vs {num}", g[i]);
            let want = 0.5 * x0[i] * (1.0 + libm::erf(x0[i] / 2f64.sqrt()));
            let m = if keep(drop.seed, i as u64, drop.threshold()) { 1.0 / 0.75 } else { 0.0 };
            assert!((y[i] - want * m).abs() < 1e-15);
        }
    }
}

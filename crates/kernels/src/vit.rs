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

use crate::driver::{map_pieces, simd_level, DType, Executor};
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
    let mut w = LANES;
    let mut a = a;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            a[i] = a[i] + a[i + w];
        }
    }
    a[0]
}

/// `sum(f(i))` over `0..n` in lanes.
#[inline(always)]
fn lane_sum<T: Act>(n: usize, f: impl Fn(usize) -> T) -> T {
    let mut acc = [T::of(0.0); LANES];
    let full = n / LANES * LANES;
    let mut i = 0;
    while i < full {
        for (l, a) in acc.iter_mut().enumerate() {
            *a = *a + f(i + l);
        }
        i += LANES;
    }
    let mut s = hsum(acc);
    for j in full..n {
        s = s + f(j);
    }
    s
}

/// `max(x)` over a slice in lanes.
#[inline(always)]
fn slice_max<T: Act>(x: &[T]) -> T {
    let mut acc = [T::of(f64::NEG_INFINITY); LANES];
    let mut it = x.chunks_exact(LANES);
    for c in &mut it {
        for (a, v) in acc.iter_mut().zip(c) {
            *a = a.fmax(*v);
        }
    }
    let mut m = acc[0];
    for a in &acc[1..] {
        m = m.fmax(*a);
    }
    for v in it.remainder() {
        m = m.fmax(*v);
    }
    m
}

/// In-place softmax of a row: a max pass, then exp and sum in one pass, then the scaling.
#[inline(always)]
fn softmax_row<T: Act>(row: &mut [T]) {
    let m = slice_max(row);
    let mut acc = [T::of(0.0); LANES];
    let mut it = row.chunks_exact_mut(LANES);
    for c in &mut it {
        for (a, x) in acc.iter_mut().zip(c.iter_mut()) {
            *x = (*x - m).exp();
            *a = *a + *x;
        }
    }
    let mut s = hsum(acc);
    for x in it.into_remainder() {
        *x = (*x - m).exp();
        s = s + *x;
    }
    let inv = T::of(1.0) / s;
    for x in row.iter_mut() {
        *x = *x * inv;
    }
}

/// `dst (cols × ld_dst) = src (rows × cols, row stride ld_src)` transposed.
#[inline(always)]
fn transpose<T: Copy>(
    src: &[T],
    rows: usize,
    cols: usize,
    ld_src: usize,
    dst: &mut [T],
    ld_dst: usize,
) {
    for (c, drow) in dst.chunks_exact_mut(ld_dst).take(cols).enumerate() {
        for (r, x) in drow[..rows].iter_mut().enumerate() {
            *x = src[r * ld_src + c];
        }
    }
}

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
    pub fn threshold(&self) -> u32 {
        ((1.0 - self.p.clamp(0.0, 1.0)) * (1u32 << 24) as f64).round() as u32
    }
    /// The factor a kept element is multiplied by (0 when everything is dropped).
    pub fn scale(&self) -> f64 {
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
            let xr = &xr[..d];
            let mean = lane_sum(d, |j| xr[j].load()) * inv_d;
            let var = lane_sum(d, |j| {
                let c = xr[j].load() - mean;
                c * c
            }) * inv_d;
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
            let m1 = lane_sum(d, |j| gxhat[j]) * inv_d;
            let m2 = lane_sum(d, |j| gxhat[j] * xhat[j]) * inv_d;
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
                let m = if mask.on {
                    mask.at(r0 + j)
                } else {
                    E::Op::of(1.0)
                };
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

/// Multi-head self-attention on one `qkv` activation, one (batch, head) pair at a time with
/// everything in cache: `o = dropout(softmax(scale * q k^T)) v`. `qkv` is the qkv Linear's
/// output as it comes, `(B, N, 3, H, dh)`; `o` is written merged, `(B, N, H * dh)`, ready
/// for the output projection, so no permute copies are needed. The attention matrix is
/// never stored: the backward pass recomputes it from `q` and `k`. Dropout element
/// `((b * H + h) * N + i) * N + j` matches a mask over the `(B, H, N, N)` attention.
#[derive(Clone, Copy)]
pub struct Attention {
    pub qkv: Ptr,
    pub b: usize,
    pub n: usize,
    pub heads: usize,
    pub dh: usize,
    pub scale: f64,
    pub dropout: Dropout,
}

/// Register-blocked small matmul: `c (m × np) = a (m × kd) · b (kd × np)`. `b` and `c` are
/// row-major with strides `ldb`, `ldc`; `a` is row-major with stride `lda`, or with `AT`
/// its transpose (element `(i, k)` at `a[k * lda + i]`). `np` must be a multiple of 16
/// (callers zero-pad). Blocks of 4 rows × 32 (or 16) columns stay in registers across the
/// whole `k` loop.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn gemm<T: Act, const AT: bool>(
    m: usize,
    np: usize,
    kd: usize,
    a: &[T],
    lda: usize,
    b: &[T],
    ldb: usize,
    c: &mut [T],
    ldc: usize,
) {
    let mut i = 0;
    while i + 4 <= m {
        gemm_rows::<T, AT, 4>(i, np, kd, a, lda, b, ldb, c, ldc);
        i += 4;
    }
    while i < m {
        gemm_rows::<T, AT, 1>(i, np, kd, a, lda, b, ldb, c, ldc);
        i += 1;
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gemm_rows<T: Act, const AT: bool, const MR: usize>(
    i0: usize,
    np: usize,
    kd: usize,
    a: &[T],
    lda: usize,
    b: &[T],
    ldb: usize,
    c: &mut [T],
    ldc: usize,
) {
    let mut j0 = 0;
    while j0 < np {
        gemm_block::<T, AT, MR, 16>(i0, j0, kd, a, lda, b, ldb, c, ldc);
        j0 += 16;
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gemm_block<T: Act, const AT: bool, const MR: usize, const NR: usize>(
    i0: usize,
    j0: usize,
    kd: usize,
    a: &[T],
    lda: usize,
    b: &[T],
    ldb: usize,
    c: &mut [T],
    ldc: usize,
) {
    let mut acc = [[T::of(0.0); NR]; MR];
    if kd == 0 {
        for (r, accr) in acc.iter().enumerate() {
            c[(i0 + r) * ldc + j0..][..NR].copy_from_slice(accr);
        }
        return;
    }
    // Bounds are checked once here, so the k loop runs without per-element checks.
    let b_last = (kd - 1) * ldb + j0 + NR;
    let a_last = if AT {
        (kd - 1) * lda + i0 + MR
    } else {
        (i0 + MR - 1) * lda + kd
    };
    assert!(
        b_last <= b.len() && a_last <= a.len(),
        "gemm: operand too short"
    );
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    for k in 0..kd {
        // SAFETY: k < kd, r < MR and the asserts above bound every index.
        unsafe {
            let brow = &*(bp.add(k * ldb + j0) as *const [T; NR]);
            for (r, accr) in acc.iter_mut().enumerate() {
                let av = if AT {
                    *ap.add(k * lda + i0 + r)
                } else {
                    *ap.add((i0 + r) * lda + k)
                };
                for (x, &bv) in accr.iter_mut().zip(brow) {
                    *x = av.mul_add(bv, *x);
                }
            }
        }
    }
    for (r, accr) in acc.iter().enumerate() {
        c[(i0 + r) * ldc + j0..][..NR].copy_from_slice(accr);
    }
}

fn pad16(x: usize) -> usize {
    x.div_ceil(16) * 16
}

/// Per-(batch, head) buffers in the arithmetic type; rows padded to `np` (tokens) or `dp`
/// (head dim) columns, both multiples of 16, with zeros in the padding.
struct Head<T> {
    np: usize,
    dp: usize,
    /// q, k, v as rows `(N, dp)`.
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    /// k and v transposed, `(dh, np)`.
    kt: Vec<T>,
    vt: Vec<T>,
    /// `(N, np)` scratch: probabilities, dropped probabilities, their gradients.
    p: Vec<T>,
    pd: Vec<T>,
    dp_: Vec<T>,
    /// `(N, dp)` scratch: output / output gradient and the q, k, v gradients.
    o: Vec<T>,
    dq: Vec<T>,
    dk: Vec<T>,
    dv: Vec<T>,
}

impl Attention {
    /// Offset of head `h` of token `i` in a merged `(B, N, H * dh)` buffer (`o`, `g_o`).
    fn merged(&self, b: usize, i: usize, h: usize) -> usize {
        (b * self.n + i) * self.heads * self.dh + h * self.dh
    }

    /// Elements of `qkv` and of its gradient, `(B, N, 3, H, dh)`.
    fn qkv_len(&self) -> usize {
        self.b * self.n * 3 * self.heads * self.dh
    }

    fn at(&self, b: usize, i: usize, part: usize, h: usize) -> usize {
        ((b * self.n + i) * 3 + part) * self.heads * self.dh + h * self.dh
    }

    fn head_buffers<T: Act>(&self) -> Head<T> {
        let (np, dp) = (pad16(self.n), pad16(self.dh));
        let z = T::of(0.0);
        Head {
            np,
            dp,
            q: vec![z; self.n * dp],
            k: vec![z; self.n * dp],
            v: vec![z; self.n * dp],
            kt: vec![z; self.dh * np],
            vt: vec![z; self.dh * np],
            p: vec![z; self.n * np],
            pd: vec![z; self.n * np],
            dp_: vec![z; self.n * np],
            o: vec![z; self.n * dp],
            dq: vec![z; self.n * dp],
            dk: vec![z; self.n * dp],
            dv: vec![z; self.n * dp],
        }
    }

    /// Loads one head: q (pre-multiplied by the scale, so `q k^T` is already scaled), k, v as
    /// rows, and k (and v) transposed.
    #[inline(always)]
    fn load_head<E: VElem>(
        &self,
        qkv: &[E],
        b: usize,
        h: usize,
        hd: &mut Head<E::Op>,
        need_vt: bool,
    ) {
        let (n, dh, np, dp) = (self.n, self.dh, hd.np, hd.dp);
        let scale = E::Op::of(self.scale);
        let tok = 3 * self.heads * dh;
        let base = &qkv[b * n * tok + h * dh..];
        for (i, ((qr, kr), vr)) in
            hd.q.chunks_exact_mut(dp)
                .zip(hd.k.chunks_exact_mut(dp))
                .zip(hd.v.chunks_exact_mut(dp))
                .enumerate()
                .take(n)
        {
            let src = &base[i * tok..];
            let stride = self.heads * dh;
            for (x, e) in qr[..dh].iter_mut().zip(&src[..dh]) {
                *x = e.load() * scale;
            }
            for (x, e) in kr[..dh].iter_mut().zip(&src[stride..stride + dh]) {
                *x = e.load();
            }
            for (x, e) in vr[..dh].iter_mut().zip(&src[2 * stride..2 * stride + dh]) {
                *x = e.load();
            }
        }
        transpose(&hd.k, n, dh, dp, &mut hd.kt, np);
        if need_vt {
            transpose(&hd.v, n, dh, dp, &mut hd.vt, np);
        }
    }

    /// `p = softmax(scale * q k^T)` row by row (padding columns 0), and `pd = p * mask`
    /// when dropout is on.
    #[inline(always)]
    fn probs<T: Act>(&self, hd: &mut Head<T>, u: usize, mask: &Mask<T>) {
        let (n, dh, np, dp) = (self.n, self.dh, hd.np, hd.dp);
        gemm::<T, false>(n, np, dh, &hd.q, dp, &hd.kt, np, &mut hd.p, np);
        let ninf = T::of(f64::NEG_INFINITY);
        for (i, row) in hd.p.chunks_exact_mut(np).enumerate() {
            // Whole padded rows (multiples of 16): padding is -inf before the max and 0 after.
            row[n..].iter_mut().for_each(|x| *x = ninf);
            softmax_row(row);
            row[n..].iter_mut().for_each(|x| *x = T::of(0.0));
            let row = &row[..n];
            if mask.on {
                let base = (u * n + i) * n;
                let drow = &mut hd.pd[i * np..][..n];
                for (j, (d, x)) in drow.iter_mut().zip(row.iter()).enumerate() {
                    *d = *x * mask.at(base + j);
                }
            }
        }
    }
}

/// The forward pass over heads `u0..u1` (u = b * H + h).
struct AttnFwd {
    a: Attention,
    o: Ptr,
}

impl RowOp for AttnFwd {
    #[inline(always)]
    fn rows<E: VElem>(&self, u0: usize, u1: usize) -> Vec<f64> {
        let a = &self.a;
        let (n, dh, heads) = (a.n, a.dh, a.heads);
        // SAFETY: `attention`'s contract; heads write disjoint column blocks of `o`.
        let qkv = unsafe { a.qkv.all::<E>(a.qkv_len()) };
        let o_all = unsafe { a.o_all::<E>(self.o) };
        let mask = Mask::<E::Op>::of(a.dropout);
        let mut hd = a.head_buffers::<E::Op>();
        let (np, dp) = (hd.np, hd.dp);
        for u in u0..u1 {
            let (b, h) = (u / heads, u % heads);
            a.load_head::<E>(qkv, b, h, &mut hd, false);
            a.probs(&mut hd, u, &mask);
            let p = if mask.on { &hd.pd } else { &hd.p };
            gemm::<E::Op, false>(n, dp, n, p, np, &hd.v, dp, &mut hd.o, dp);
            for i in 0..n {
                let out = &mut o_all[a.merged(b, i, h)..][..dh];
                for (o, x) in out.iter_mut().zip(&hd.o[i * dp..][..dh]) {
                    *o = E::store(*x);
                }
            }
        }
        Vec::new()
    }
}

impl Attention {
    /// `(B, N, H * dh)` output or output-gradient buffer.
    #[allow(clippy::mut_from_ref)]
    unsafe fn o_all<'a, E>(&self, o: Ptr) -> &'a mut [E] {
        std::slice::from_raw_parts_mut(o.0 as *mut E, self.b * self.n * self.heads * self.dh)
    }
}

/// The backward pass over heads `u0..u1`: reads `g_o`, writes `g_qkv` (same layout as qkv).
struct AttnBwd {
    a: Attention,
    g_o: Ptr,
    g_qkv: Ptr,
}

impl RowOp for AttnBwd {
    #[inline(always)]
    fn rows<E: VElem>(&self, u0: usize, u1: usize) -> Vec<f64> {
        let a = &self.a;
        let (n, dh, heads) = (a.n, a.dh, a.heads);
        // SAFETY: `attention_backward`'s contract; heads write disjoint blocks of `g_qkv`.
        let qkv = unsafe { a.qkv.all::<E>(a.qkv_len()) };
        let g_o = unsafe { a.o_all::<E>(self.g_o) };
        let g_qkv = unsafe { std::slice::from_raw_parts_mut(self.g_qkv.0 as *mut E, a.qkv_len()) };
        let mask = Mask::<E::Op>::of(a.dropout);
        let scale = E::Op::of(a.scale);
        let mut hd = a.head_buffers::<E::Op>();
        let (np, dp) = (hd.np, hd.dp);
        for u in u0..u1 {
            let (b, h) = (u / heads, u % heads);
            a.load_head::<E>(qkv, b, h, &mut hd, true);
            a.probs(&mut hd, u, &mask);
            // dO into hd.o (rows of dp)
            for i in 0..n {
                let src = &g_o[a.merged(b, i, h)..][..dh];
                for (x, g) in hd.o[i * dp..][..dh].iter_mut().zip(src) {
                    *x = g.load();
                }
            }
            // d(dropped p) = dO v^T ; dV = (dropped p)^T dO
            gemm::<E::Op, false>(n, np, dh, &hd.o, dp, &hd.vt, np, &mut hd.dp_, np);
            let pd = if mask.on { &hd.pd } else { &hd.p };
            gemm::<E::Op, true>(n, dp, n, pd, np, &hd.o, dp, &mut hd.dv, dp);
            // dS = scale * p * (dp - sum(dp * p)), dp = d(dropped p) * mask
            for (i, (drow, prow)) in hd
                .dp_
                .chunks_exact_mut(np)
                .zip(hd.p.chunks_exact(np))
                .enumerate()
            {
                let (drow, prow) = (&mut drow[..n], &prow[..n]);
                if mask.on {
                    let base = (u * n + i) * n;
                    for (j, x) in drow.iter_mut().enumerate() {
                        *x = *x * mask.at(base + j);
                    }
                }
                let mut s = E::Op::of(0.0);
                let mut acc = [E::Op::of(0.0); LANES];
                let (mut dc, mut pc) = (drow.chunks_exact(LANES), prow.chunks_exact(LANES));
                for (d16, p16) in (&mut dc).zip(&mut pc) {
                    for ((a, dv), pv) in acc.iter_mut().zip(d16).zip(p16) {
                        *a = dv.mul_add(*pv, *a);
                    }
                }
                for (dv, pv) in dc.remainder().iter().zip(pc.remainder()) {
                    s = dv.mul_add(*pv, s);
                }
                let s = s + hsum(acc);
                // (the scale sits in q: dK = dS^T (scale q), dQ = scale dS k)
                for (x, &pj) in drow.iter_mut().zip(prow) {
                    *x = pj * (*x - s);
                }
            }
            // dQ = dS k ; dK = dS^T q
            gemm::<E::Op, false>(n, dp, n, &hd.dp_, np, &hd.k, dp, &mut hd.dq, dp);
            gemm::<E::Op, true>(n, dp, n, &hd.dp_, np, &hd.q, dp, &mut hd.dk, dp);
            for i in 0..n {
                for (o, x) in g_qkv[a.at(b, i, 0, h)..][..dh]
                    .iter_mut()
                    .zip(&hd.dq[i * dp..][..dh])
                {
                    *o = E::store(*x * scale);
                }
                for (part, src) in [(1, &hd.dk), (2, &hd.dv)] {
                    for (o, x) in g_qkv[a.at(b, i, part, h)..][..dh]
                        .iter_mut()
                        .zip(&src[i * dp..][..dh])
                    {
                        *o = E::store(*x);
                    }
                }
            }
        }
        Vec::new()
    }
}

/// Attention forward: writes `o` (`B * N * H * dh` elements).
///
/// # Safety
/// `a.qkv`: `B * N * 3 * H * dh` elements of `dtype`; `o` as said; no overlap.
pub unsafe fn attention(a: &Attention, o: Ptr, dtype: DType, threads: usize, exec: &dyn Executor) {
    let op = AttnFwd { a: *a, o };
    par_units(&op, dtype, a.b * a.heads, threads, exec);
}

/// Attention backward: writes `g_qkv` (shaped like qkv) from `g_o` (shaped like `o`).
///
/// # Safety
/// As [`attention`]; `g_o` shaped like `o`, `g_qkv` like `qkv`; no overlap.
pub unsafe fn attention_backward(
    a: &Attention,
    g_o: Ptr,
    g_qkv: Ptr,
    dtype: DType,
    threads: usize,
    exec: &dyn Executor,
) {
    let op = AttnBwd { a: *a, g_o, g_qkv };
    par_units(&op, dtype, a.b * a.heads, threads, exec);
}

/// Like [`par_rows`] for (batch, head) units: about 8 pieces per thread, so the per-piece
/// scratch buffers (a few KB per head) are allocated a few times per call, not per head.
fn par_units<O: RowOp>(op: &O, dtype: DType, units: usize, threads: usize, exec: &dyn Executor) {
    let per = (units / (threads.max(1) * 8)).max(1);
    par_rows(op, dtype, units, CHUNK / per.min(CHUNK), threads, exec);
}

/// Patch extraction, vit-pytorch's `b c (h p1) (w p2) -> b (h w) (p1 p2 c)`: one row of
/// `patches` per (image, patch). With `backward`, the same map scatters a patch gradient
/// back into the image gradient (each pixel belongs to exactly one patch).
pub struct Patches {
    pub img: Ptr,
    pub patches: Ptr,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub ph: usize,
    pub pw: usize,
    pub backward: bool,
}

impl RowOp for Patches {
    #[inline(always)]
    fn rows<E: VElem>(&self, r0: usize, r1: usize) -> Vec<f64> {
        let (c, h, w, ph, pw) = (self.c, self.h, self.w, self.ph, self.pw);
        let (gw, np, pd) = (w / pw, (h / ph) * (w / pw), ph * pw * c);
        // SAFETY: `patches`'s contract; rows r0..r1 own disjoint pixels and patch rows.
        let rows = unsafe { self.patches.rows::<E>(r0, r1, pd) };
        for (k, row) in rows.chunks_exact_mut(pd).enumerate() {
            let (bi, pi) = ((r0 + k) / np, (r0 + k) % np);
            let (y0, x0) = ((pi / gw) * ph, (pi % gw) * pw);
            for p1 in 0..ph {
                for ch in 0..c {
                    let start = ((bi * c + ch) * h + y0 + p1) * w + x0;
                    let slots = (0..pw).map(|p2| (p1 * pw + p2) * c + ch);
                    // SAFETY: start + pw <= B * C * H * W by the caller's shape checks; the
                    // image is only written in backward, where each row owns its pixels.
                    unsafe {
                        let px = (self.img.0 as *mut E).add(start);
                        for (p2, slot) in slots.enumerate() {
                            if self.backward {
                                *px.add(p2) = row[slot];
                            } else {
                                row[slot] = *px.add(p2);
                            }
                        }
                    }
                }
            }
        }
        Vec::new()
    }
}

/// Gathers patches from images (or, with `op.backward`, scatters their gradient back).
///
/// # Safety
/// `img`: `b * c * h * w` elements of `dtype`, `patches`: `b * (h / ph) * (w / pw) * ph * pw * c`,
/// not overlapping; `h % ph == 0`, `w % pw == 0`.
pub unsafe fn patches(op: &Patches, dtype: DType, b: usize, threads: usize, exec: &dyn Executor) {
    let rows = b * (op.h / op.ph.max(1)) * (op.w / op.pw.max(1));
    par_rows(op, dtype, rows, op.ph * op.pw * op.c, threads, exec);
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

/// # Safety
/// `h`, `out` (and `y` unless null): `numel` elements of `dtype`; `out` may equal `h` but
/// overlaps nothing else.
pub unsafe fn add_dropout(
    op: &AddDropout,
    dtype: DType,
    numel: usize,
    threads: usize,
    exec: &dyn Executor,
) {
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
        let d = Dropout {
            p: 0.3,
            seed: 12345,
        };
        let t = d.threshold();
        let kept = (0..200_000u64).filter(|&i| keep(d.seed, i, t)).count();
        let frac = kept as f64 / 200_000.0;
        assert!((frac - 0.7).abs() < 0.005, "{frac}");
        let again = (0..200_000u64).filter(|&i| keep(d.seed, i, t)).count();
        assert_eq!(kept, again);
        let other = (0..200_000u64)
            .filter(|&i| keep(d.seed + 1, i, t) != keep(d.seed, i, t))
            .count();
        assert!(other > 50_000);
    }

    #[test]
    fn layer_norm_forward_and_backward_match_finite_differences() {
        let (rows, d) = (3usize, 7usize);
        let mut x: Vec<f64> = (0..rows * d)
            .map(|i| ((i * 37 % 11) as f64 - 5.0) * 0.3)
            .collect();
        let mut w: Vec<f64> = (0..d).map(|i| 1.0 + 0.1 * i as f64).collect();
        let mut b: Vec<f64> = (0..d).map(|i| 0.05 * i as f64).collect();
        let gy: Vec<f64> = (0..rows * d)
            .map(|i| ((i * 13 % 7) as f64 - 3.0) * 0.2)
            .collect();
        let fwd = |x: &mut Vec<f64>,
                   w: &mut Vec<f64>,
                   b: &mut Vec<f64>|
         -> (Vec<f64>, Vec<f64>, Vec<f64>) {
            let mut y = vec![0.0; rows * d];
            let mut mean = vec![0.0; rows];
            let mut rstd = vec![0.0; rows];
            let op = LnFwd {
                x: p(x),
                w: p(w),
                b: p(b),
                y: p(&mut y),
                mean: p(&mut mean),
                rstd: p(&mut rstd),
                d,
                eps: 1e-5,
            };
            unsafe { layer_norm(&op, DType::F64, rows, 1, &Serial) };
            (y, mean, rstd)
        };
        let loss = |x: &mut Vec<f64>, w: &mut Vec<f64>, b: &mut Vec<f64>| -> f64 {
            fwd(x, w, b).0.iter().zip(&gy).map(|(a, g)| a * g).sum()
        };
        let (_, mut mean, mut rstd) = fwd(&mut x, &mut w, &mut b);
        let mut gy2 = gy.clone();
        let mut gx = vec![1.0; rows * d]; // accumulate onto ones
        let op = LnBwd {
            gy: p(&mut gy2),
            x: p(&mut x),
            mean: p(&mut mean),
            rstd: p(&mut rstd),
            w: p(&mut w),
            gx: p(&mut gx),
            accumulate: true,
            d,
        };
        let gwb = unsafe { layer_norm_backward(&op, DType::F64, rows, 2, &Serial) };
        let h = 1e-6;
        for i in 0..rows * d {
            let mut xp = x.clone();
            xp[i] += h;
            let mut xm = x.clone();
            xm[i] -= h;
            let num = (loss(&mut xp, &mut w.clone(), &mut b.clone())
                - loss(&mut xm, &mut w.clone(), &mut b.clone()))
                / (2.0 * h);
            assert!(
                (gx[i] - 1.0 - num).abs() < 1e-7,
                "x {i}: {} vs {num}",
                gx[i] - 1.0
            );
        }
        for j in 0..d {
            let mut wp = w.clone();
            wp[j] += h;
            let mut wm = w.clone();
            wm[j] -= h;
            let num = (loss(&mut x.clone(), &mut wp, &mut b.clone())
                - loss(&mut x.clone(), &mut wm, &mut b.clone()))
                / (2.0 * h);
            assert!((gwb[j] - num).abs() < 1e-7);
            let gb: f64 = (0..rows).map(|r| gy[r * d + j]).sum();
            assert!((gwb[d + j] - gb).abs() < 1e-12);
        }
    }

    #[test]
    fn gelu_backward_matches_finite_differences() {
        let n = 5usize;
        let x0: Vec<f64> = (0..2 * n)
            .map(|i| ((i * 7 % 5) as f64 - 2.0) * 0.7)
            .collect();
        let go: Vec<f64> = (0..2 * n)
            .map(|i| ((i * 3 % 4) as f64 - 1.5) * 0.4)
            .collect();
        let drop = Dropout { p: 0.25, seed: 7 };
        let h = 1e-6;
        // GELU with dropout
        let gl = |x: &[f64]| -> f64 {
            let mut xs = x.to_vec();
            let mut y = vec![0.0; x.len()];
            let op = GeluFwd {
                x: p(&mut xs),
                y: p(&mut y),
                dropout: drop,
            };
            unsafe { gelu_forward(&op, DType::F64, x.len(), 1, &Serial) };
            y.iter().zip(&go).map(|(a, g)| a * g).sum()
        };
        let mut xs = x0.clone();
        let mut g = go.clone();
        let mut y = vec![0.0; 2 * n];
        let op = GeluBwd {
            x: p(&mut xs),
            g: p(&mut g),
            y: p(&mut y),
            dropout: drop,
        };
        unsafe { gelu_backward(&op, DType::F64, 2 * n, 1, &Serial) };
        for i in 0..2 * n {
            let (mut xp, mut xm) = (x0.clone(), x0.clone());
            xp[i] += h;
            xm[i] -= h;
            let num = (gl(&xp) - gl(&xm)) / (2.0 * h);
            assert!((g[i] - num).abs() < 1e-8, "gelu {i}: {} vs {num}", g[i]);
            let want = 0.5 * x0[i] * (1.0 + libm::erf(x0[i] / 2f64.sqrt()));
            let m = if keep(drop.seed, i as u64, drop.threshold()) {
                1.0 / 0.75
            } else {
                0.0
            };
            assert!((y[i] - want * m).abs() < 1e-15);
        }
    }

    #[test]
    fn attention_matches_naive_and_finite_differences() {
        let (bsz, n, heads, dh) = (2usize, 5usize, 2usize, 3usize);
        let len = bsz * n * 3 * heads * dh;
        let qkv0: Vec<f64> = (0..len)
            .map(|i| ((i * 29 % 17) as f64 - 8.0) * 0.15)
            .collect();
        let go: Vec<f64> = (0..bsz * n * heads * dh)
            .map(|i| ((i * 11 % 7) as f64 - 3.0) * 0.3)
            .collect();
        for drop in [Dropout::OFF, Dropout { p: 0.3, seed: 99 }] {
            let run = |qkv: &[f64]| -> Vec<f64> {
                let mut q = qkv.to_vec();
                let mut o = vec![0.0; bsz * n * heads * dh];
                let a = Attention {
                    qkv: p(&mut q),
                    b: bsz,
                    n,
                    heads,
                    dh,
                    scale: 0.6,
                    dropout: drop,
                };
                unsafe { attention(&a, p(&mut o), DType::F64, 2, &Serial) };
                o
            };
            let o = run(&qkv0);
            // naive reference
            let at = |b: usize, i: usize, part: usize, h: usize, d: usize| {
                qkv0[((b * n + i) * 3 + part) * heads * dh + h * dh + d]
            };
            let t = drop.threshold();
            for b in 0..bsz {
                for h in 0..heads {
                    for i in 0..n {
                        let s: Vec<f64> = (0..n)
                            .map(|j| {
                                0.6 * (0..dh)
                                    .map(|d| at(b, i, 0, h, d) * at(b, j, 1, h, d))
                                    .sum::<f64>()
                            })
                            .collect();
                        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                        let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                        let z: f64 = e.iter().sum();
                        for d in 0..dh {
                            let want: f64 = (0..n)
                                .map(|j| {
                                    let keepj = !drop.active()
                                        || keep(
                                            drop.seed,
                                            (((b * heads + h) * n + i) * n + j) as u64,
                                            t,
                                        );
                                    let sc = if drop.active() {
                                        if keepj {
                                            1.0 / 0.7
                                        } else {
                                            0.0
                                        }
                                    } else {
                                        1.0
                                    };
                                    e[j] / z * sc * at(b, j, 2, h, d)
                                })
                                .sum();
                            let got = o[(b * n + i) * heads * dh + h * dh + d];
                            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
                        }
                    }
                }
            }
            let mut q = qkv0.clone();
            let mut g = go.clone();
            let mut gq = vec![0.0; len];
            let a = Attention {
                qkv: p(&mut q),
                b: bsz,
                n,
                heads,
                dh,
                scale: 0.6,
                dropout: drop,
            };
            unsafe { attention_backward(&a, p(&mut g), p(&mut gq), DType::F64, 2, &Serial) };
            let h = 1e-6;
            for i in 0..len {
                let (mut xp, mut xm) = (qkv0.clone(), qkv0.clone());
                xp[i] += h;
                xm[i] -= h;
                let lp: f64 = run(&xp).iter().zip(&go).map(|(a, b)| a * b).sum();
                let lm: f64 = run(&xm).iter().zip(&go).map(|(a, b)| a * b).sum();
                let num = (lp - lm) / (2.0 * h);
                assert!((gq[i] - num).abs() < 1e-8, "qkv {i}: {} vs {num}", gq[i]);
            }
        }
    }

    #[test]
    fn patches_gather_and_scatter_are_inverse_permutations() {
        let (b, c, h, w, ph, pw) = (2usize, 3usize, 4usize, 6usize, 2usize, 3usize);
        let n = b * c * h * w;
        let mut img: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let mut pat = vec![0f32; n];
        let mut op = Patches {
            img: p(&mut img),
            patches: p(&mut pat),
            c,
            h,
            w,
            ph,
            pw,
            backward: false,
        };
        unsafe { patches(&op, DType::F32, b, 2, &Serial) };
        // spot check against the einops formula
        let (gw, pd) = (w / pw, ph * pw * c);
        for (bi, gy, gx, p1, p2, ch) in [(1, 1, 0, 1, 2, 2), (0, 0, 1, 0, 1, 1)] {
            let want = img[((bi * c + ch) * h + gy * ph + p1) * w + gx * pw + p2];
            assert_eq!(
                pat[(bi * (h / ph) * gw + gy * gw + gx) * pd + (p1 * pw + p2) * c + ch],
                want
            );
        }
        let mut sorted = pat.clone();
        sorted.sort_by(f32::total_cmp);
        assert_eq!(sorted, img);
        let mut back = vec![0f32; n];
        op.img = p(&mut back);
        op.backward = true;
        unsafe { patches(&op, DType::F32, b, 2, &Serial) };
        assert_eq!(back, img);
    }
}

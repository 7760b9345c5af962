//! Inverted dropout from a counter-based hash (masks are recomputed, never stored), and the
//! residual add that applies it.

use super::*;

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
pub(super) struct Mask<T> {
    pub(super) on: bool,
    seed: u64,
    threshold: u32,
    scale: T,
}

impl<T: Act> Mask<T> {
    pub(super) fn of(d: Dropout) -> Self {
        Mask {
            on: d.active(),
            seed: d.seed,
            threshold: d.threshold(),
            scale: T::of(d.scale()),
        }
    }
    #[inline(always)]
    pub(super) fn at(&self, i: usize) -> T {
        if keep(self.seed, i as u64, self.threshold) {
            self.scale
        } else {
            T::of(0.0)
        }
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

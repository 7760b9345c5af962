//! Gradient clipping: the total norm of many gradients in one read pass, and in-place
//! scaling/clamping. Partial results are combined in a fixed order, so the norm does not
//! depend on the number of threads.

use half::{bf16, f16};

use crate::driver::{map_pieces, DType, Executor};
use crate::elem::Elem;

/// One gradient buffer: `numel` dense elements of `dtype` at `ptr`.
#[derive(Clone, Copy, Debug)]
pub struct Buf {
    pub dtype: DType,
    pub numel: usize,
    pub ptr: *mut u8,
}
unsafe impl Send for Buf {}
unsafe impl Sync for Buf {}

/// Which norm: `Max` is `inf`, `Min` is `-inf`, `Count` is `0`, `P(p)` any other order.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Norm {
    P(f64),
    Max,
    Min,
    Count,
}

impl Norm {
    pub fn of(p: f64) -> Norm {
        if p == f64::INFINITY {
            Norm::Max
        } else if p == f64::NEG_INFINITY {
            Norm::Min
        } else if p == 0.0 {
            Norm::Count
        } else {
            Norm::P(p)
        }
    }

    fn identity(self) -> f64 {
        match self {
            Norm::Max => 0.0,
            Norm::Min => f64::INFINITY,
            _ => 0.0,
        }
    }

    fn combine(self, a: f64, b: f64) -> f64 {
        match self {
            Norm::Max => nan_max(a, b),
            Norm::Min => nan_min(a, b),
            _ => a + b,
        }
    }

    #[inline(always)]
    fn term(self, x: f64) -> f64 {
        match self {
            Norm::P(2.0) => x * x,
            Norm::P(1.0) => x.abs(),
            Norm::P(p) => x.abs().powf(p),
            Norm::Max | Norm::Min => x.abs(),
            Norm::Count => f64::from(u8::from(x != 0.0)),
        }
    }

    fn finish(self, acc: f64) -> f64 {
        match self {
            Norm::P(2.0) => acc.sqrt(),
            Norm::P(1.0) => acc,
            Norm::P(p) => acc.powf(1.0 / p),
            _ => acc,
        }
    }
}

fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

fn nan_min(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.min(b)
    }
}

unsafe fn partial<E: Elem>(norm: Norm, ptr: *mut u8, b: usize, e: usize) -> f64
where
    E::Op: Into<f64>,
{
    let s = std::slice::from_raw_parts((ptr as *const E).add(b), e - b);
    let mut acc = norm.identity();
    // Four lanes keep the sum vectorizable and its order fixed.
    let mut lanes = [norm.identity(); 4];
    let mut chunks = s.chunks_exact(4);
    for c in &mut chunks {
        for k in 0..4 {
            lanes[k] = norm.combine(lanes[k], norm.term(c[k].load().into()));
        }
    }
    for x in chunks.remainder() {
        acc = norm.combine(acc, norm.term(x.load().into()));
    }
    for l in lanes {
        acc = norm.combine(acc, l);
    }
    acc
}

unsafe fn partial_any(norm: Norm, buf: &Buf, b: usize, e: usize) -> f64 {
    match buf.dtype {
        DType::F32 => partial::<f32>(norm, buf.ptr, b, e),
        DType::F64 => partial::<f64>(norm, buf.ptr, b, e),
        DType::BF16 => partial::<bf16>(norm, buf.ptr, b, e),
        DType::F16 => partial::<f16>(norm, buf.ptr, b, e),
    }
}

/// The `p`-norm of each buffer (torch then takes the norm of these, in the grads' dtype).
///
/// # Safety
/// Every buffer must be valid for reads of `numel` elements of its dtype.
pub unsafe fn tensor_norms(bufs: &[Buf], p: f64, threads: usize, exec: &dyn Executor) -> Vec<f64> {
    let norm = Norm::of(p);
    let pieces = crate::driver::pieces(bufs.iter().map(|b| b.numel));
    // SAFETY: forwarded from the caller.
    let r = map_pieces(&pieces, threads, exec, norm.identity(), &|j, b, e| unsafe {
        partial_any(norm, &bufs[j], b, e)
    });
    // Combine each tensor's pieces in order, so the result does not depend on threads.
    let mut acc = vec![norm.identity(); bufs.len()];
    for (&(j, _, _), v) in pieces.iter().zip(r) {
        acc[j] = norm.combine(acc[j], v);
    }
    acc.into_iter().map(|a| norm.finish(a)).collect()
}

/// The `p`-norm of all buffers together, computed in f64.
///
/// # Safety
/// As [`tensor_norms`].
pub unsafe fn total_norm(bufs: &[Buf], p: f64, threads: usize, exec: &dyn Executor) -> f64 {
    let norm = Norm::of(p);
    let per = tensor_norms(bufs, p, threads, exec);
    if norm == Norm::Count {
        return per.iter().filter(|&&c| c != 0.0).count() as f64;
    }
    let acc = per.iter().fold(norm.identity(), |a, &n| match norm {
        Norm::P(q) => a + n.abs().powf(q),
        _ => norm.combine(a, n),
    });
    norm.finish(acc)
}

unsafe fn map_any(buf: &Buf, f: &(dyn Fn(f64) -> f64 + Sync)) {
    unsafe fn go<E: Elem>(buf: &Buf, f: &(dyn Fn(f64) -> f64 + Sync))
    where
        E::Op: Into<f64>,
    {
        let s = std::slice::from_raw_parts_mut(buf.ptr as *mut E, buf.numel);
        for x in s {
            *x = E::store(<E::Op as crate::elem::OpFloat>::of(f(x.load().into())));
        }
    }
    match buf.dtype {
        DType::F32 => go::<f32>(buf, f),
        DType::F64 => go::<f64>(buf, f),
        DType::BF16 => go::<bf16>(buf, f),
        DType::F16 => go::<f16>(buf, f),
    }
}

/// `g.mul_(coef)` for every buffer, with `coef` rounded to each buffer's compute type first
/// (as torch multiplies by a tensor of the grad's dtype).
///
/// # Safety
/// Every buffer must be valid for reads and writes of `numel` elements of its dtype.
pub unsafe fn scale(bufs: &[Buf], coef: f64) {
    for buf in bufs {
        match buf.dtype {
            DType::F64 => map_any(buf, &|x| x * coef),
            _ => {
                let c = coef as f32;
                map_any(buf, &move |x| (x as f32 * c) as f64)
            }
        }
    }
}

/// `g.clamp_(-clip, clip)` for every buffer (NaN stays NaN).
///
/// # Safety
/// As [`scale`].
pub unsafe fn clamp(bufs: &[Buf], clip: f64) {
    for buf in bufs {
        let c = if buf.dtype == DType::F64 {
            clip
        } else {
            clip as f32 as f64
        };
        map_any(buf, &move |x| if x.is_nan() { x } else { x.max(-c).min(c) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::{RayonPool, Serial};

    fn buf(v: &mut [f64]) -> Buf {
        Buf {
            dtype: DType::F64,
            numel: v.len(),
            ptr: v.as_mut_ptr() as *mut u8,
        }
    }

    #[test]
    fn norms_by_hand() {
        let (mut a, mut b) = (vec![3.0, -4.0], vec![12.0]);
        let bufs = [buf(&mut a), buf(&mut b)];
        unsafe {
            assert_eq!(total_norm(&bufs, 2.0, 1, &Serial), 13.0);
            assert_eq!(total_norm(&bufs, 1.0, 1, &Serial), 19.0);
            assert_eq!(total_norm(&bufs, f64::INFINITY, 1, &Serial), 12.0);
            assert_eq!(total_norm(&bufs, f64::NEG_INFINITY, 1, &Serial), 3.0);
            // The 0-norm counts tensors with a non-zero element, as torch's stacked norms do.
            assert_eq!(total_norm(&bufs, 0.0, 1, &Serial), 2.0);
            assert!(
                (total_norm(&bufs, 3.0, 1, &Serial) - (27.0f64 + 64.0 + 1728.0).powf(1.0 / 3.0))
                    .abs()
                    < 1e-12
            );
        }
    }

    #[test]
    fn threads_do_not_change_the_norm() {
        let mut v: Vec<f64> = (0..300_000).map(|i| ((i as f64) * 0.37).sin()).collect();
        let bufs = [buf(&mut v)];
        unsafe {
            assert_eq!(
                total_norm(&bufs, 2.0, 1, &Serial).to_bits(),
                total_norm(&bufs, 2.0, 2, &RayonPool).to_bits()
            );
        }
    }

    #[test]
    fn scale_and_clamp() {
        let mut v = vec![1.0, -2.0, f64::NAN];
        let bufs = [buf(&mut v)];
        unsafe {
            scale(&bufs, 0.5);
            assert_eq!(&v[..2], &[0.5, -1.0]);
            clamp(&[buf(&mut v)], 0.75);
            assert_eq!(&v[..2], &[0.5, -0.75]);
        }
        assert!(v[2].is_nan());
    }
}

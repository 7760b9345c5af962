//! Element types a kernel can update, and the float type its arithmetic runs in.
//!
//! As in torch's fused CPU kernels, reduced-precision buffers (bf16, fp16) are loaded into
//! fp32 ("opmath"), updated there, and rounded back once per element.

use half::{bf16, f16};

/// The arithmetic type of a kernel: `f32` or `f64`.
pub trait OpFloat:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
{
    fn of(x: f64) -> Self;
    fn sqrt(self) -> Self;
    fn abs(self) -> Self;
    /// `self * a + b` with one rounding, where torch's vectorized kernels use `fmadd`.
    fn mul_add(self, a: Self, b: Self) -> Self;
    /// torch's `maximum`: NaN wins.
    fn max_nan(self, other: Self) -> Self;
}

macro_rules! op_float {
    ($t:ty) => {
        impl OpFloat for $t {
            #[inline(always)]
            fn of(x: f64) -> Self {
                x as $t
            }
            #[inline(always)]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline(always)]
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            #[inline(always)]
            fn mul_add(self, a: Self, b: Self) -> Self {
                <$t>::mul_add(self, a, b)
            }
            #[inline(always)]
            fn max_nan(self, other: Self) -> Self {
                if self.is_nan() || other.is_nan() {
                    <$t>::NAN
                } else if self > other {
                    self
                } else {
                    other
                }
            }
        }
    };
}
op_float!(f32);
op_float!(f64);

/// A storage element: loaded into its [`OpFloat`] and stored back with one rounding.
pub trait Elem: Copy + Send + Sync + 'static {
    type Op: OpFloat;
    fn load(self) -> Self::Op;
    fn store(v: Self::Op) -> Self;
}

impl Elem for f32 {
    type Op = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        self
    }
    #[inline(always)]
    fn store(v: f32) -> f32 {
        v
    }
}

impl Elem for f64 {
    type Op = f64;
    #[inline(always)]
    fn load(self) -> f64 {
        self
    }
    #[inline(always)]
    fn store(v: f64) -> f64 {
        v
    }
}

impl Elem for bf16 {
    type Op = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    /// Round to nearest even exactly as c10::BFloat16 does (NaN becomes 0x7FC0); written
    /// branch-free so the loop vectorizes.
    #[inline(always)]
    fn store(v: f32) -> bf16 {
        let u = v.to_bits();
        let rounded = (u.wrapping_add(((u >> 16) & 1) + 0x7FFF) >> 16) as u16;
        bf16::from_bits(if v.is_nan() { 0x7FC0 } else { rounded })
    }
}

impl Elem for f16 {
    type Op = f32;
    #[inline(always)]
    fn load(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn store(v: f32) -> f16 {
        f16::from_f32(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_store_matches_half_round_to_nearest_even() {
        for &x in &[
            0.0f32,
            -0.0,
            1.0,
            1.0 + 1.0 / 256.0,
            1.0078125,
            std::f32::consts::PI,
            -std::f32::consts::E,
            1e-40,
            3.4e38,
        ] {
            assert_eq!(bf16::store(x).to_bits(), bf16::from_f32(x).to_bits(), "{x}");
        }
        // Ties go to even: 1 + 2^-8 lies halfway between 1 and 1 + 2^-7.
        assert_eq!(bf16::store(1.0 + 1.0 / 256.0).load(), 1.0);
        assert_eq!(bf16::store(f32::NAN).to_bits(), 0x7FC0);
        assert_eq!(bf16::store(f32::INFINITY).load(), f32::INFINITY);
    }

    #[test]
    fn maximum_propagates_nan() {
        assert!(1.0f32.max_nan(f32::NAN).is_nan());
        assert!(f32::NAN.max_nan(1.0).is_nan());
        assert_eq!(2.0f64.max_nan(3.0), 3.0);
    }
}

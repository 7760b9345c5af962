//! Exponential moving average of model weights: `ema.lerp_(model, 1 - decay)` over every
//! floating tensor in one parallel pass (timm's ModelEmaV3 update), and its decay schedule.

use half::{bf16, f16};

use crate::clip::Buf;
use crate::common::lerp;
use crate::driver::{map_pieces, pieces, DType, Executor};
use crate::elem::{Elem, OpFloat};

/// timm ModelEmaV3's `get_decay(step)`; `step` None gives `decay`.
pub fn decay_at(
    step: Option<i64>,
    decay: f64,
    min_decay: f64,
    update_after_step: i64,
    use_warmup: bool,
    warmup_gamma: f64,
    warmup_power: f64,
) -> f64 {
    let Some(step) = step else { return decay };
    let step = (step - update_after_step - 1).max(0);
    if step <= 0 {
        return 0.0;
    }
    if use_warmup {
        let d = 1.0 - (1.0 + step as f64 / warmup_gamma).powf(-warmup_power);
        f64::max(f64::min(d, decay), min_decay)
    } else {
        decay
    }
}

unsafe fn lerp_piece<E: Elem>(ema: &Buf, model: &Buf, b: usize, e: usize, weight: f64) {
    let dst = std::slice::from_raw_parts_mut((ema.ptr as *mut E).add(b), e - b);
    let src = std::slice::from_raw_parts((model.ptr as *const E).add(b), e - b);
    let w = <E::Op as OpFloat>::of(weight);
    for (d, s) in dst.iter_mut().zip(src) {
        *d = E::store(lerp(d.load(), s.load(), w));
    }
}

/// `ema[i].lerp_(model[i], weight)` for every pair, in parallel.
///
/// # Safety
/// Each pair must hold valid, non-overlapping buffers of the same dtype and length.
pub unsafe fn lerp_all(pairs: &[(Buf, Buf)], weight: f64, threads: usize, exec: &dyn Executor) {
    let ps = pieces(pairs.iter().map(|(a, _)| a.numel));
    map_pieces(&ps, threads, exec, (), &|j, b, e| {
        let (ema, model) = &pairs[j];
        // SAFETY: forwarded from the caller.
        unsafe {
            match ema.dtype {
                DType::F32 => lerp_piece::<f32>(ema, model, b, e, weight),
                DType::F64 => lerp_piece::<f64>(ema, model, b, e, weight),
                DType::BF16 => lerp_piece::<bf16>(ema, model, b, e, weight),
                DType::F16 => lerp_piece::<f16>(ema, model, b, e, weight),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::Serial;

    #[test]
    fn decay_schedule_like_timm() {
        assert_eq!(decay_at(None, 0.999, 0.0, 0, false, 1.0, 2.0 / 3.0), 0.999);
        assert_eq!(decay_at(Some(1), 0.999, 0.0, 0, false, 1.0, 2.0 / 3.0), 0.0);
        assert_eq!(
            decay_at(Some(2), 0.999, 0.0, 0, false, 1.0, 2.0 / 3.0),
            0.999
        );
        let warm = decay_at(Some(11), 0.9999, 0.0, 0, true, 1.0, 2.0 / 3.0);
        assert!((warm - (1.0 - 11f64.powf(-2.0 / 3.0))).abs() < 1e-15);
    }

    #[test]
    fn lerp_towards_model() {
        let (mut e, mut m) = (vec![0.0f32, 10.0], vec![1.0f32, 0.0]);
        let pair = (
            Buf {
                dtype: DType::F32,
                numel: 2,
                ptr: e.as_mut_ptr() as *mut u8,
            },
            Buf {
                dtype: DType::F32,
                numel: 2,
                ptr: m.as_mut_ptr() as *mut u8,
            },
        );
        unsafe { lerp_all(&[pair], 0.25, 1, &Serial) };
        assert_eq!(e, vec![0.25, 7.5]);
    }
}

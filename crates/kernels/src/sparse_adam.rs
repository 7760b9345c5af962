//! SparseAdam (torch.optim.SparseAdam): Adam on the rows a sparse gradient touches.
//!
//! The gradient arrives coalesced, as torch's `sparse_adam` makes it: `indices`
//! (`sparse_dim × nnz`, unique) and `values` (`nnz × slice` elements, one dense slice per
//! index). Each slice updates the same elements of `param`, `exp_avg` and `exp_avg_sq`,
//! with torch's operations in torch's order:
//!
//! ```text
//! u1 = (g - m) * (1 - beta1);  m = m + u1
//! u2 = (g * g - v) * (1 - beta2);  v = v + u2
//! p = p + (-step_size) * ((u1 + m_old) / (sqrt(u2 + v_old) + eps))
//! ```
//!
//! with `step_size = lr * sqrt(1 - beta2^step) / (1 - beta1^step)` in f64 and every
//! scalar rounded to the element type, as torch's CPU kernels round Python scalars.

use crate::driver::{map_pieces, DType, Executor};
use crate::elem::OpFloat;

/// One SparseAdam step's hyper-parameters.
#[derive(Clone, Copy, Debug)]
pub struct SparseAdam {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// The step count after this step's increment (torch's `state["step"]`).
    pub step: i64,
    pub maximize: bool,
    /// The step size as torch computed it from a tensor lr (in that tensor's dtype); None
    /// for a float lr, whose step size is computed here.
    pub tensor_lr_step_size: Option<f64>,
}

impl SparseAdam {
    /// torch's `step_size`, in f64 as Python computes it (`**` is libm's `pow`).
    pub fn step_size(&self) -> f64 {
        if let Some(s) = self.tensor_lr_step_size {
            return s;
        }
        let step = self.step as f64;
        let bias_correction1 = 1.0 - self.beta1.powf(step);
        let bias_correction2 = 1.0 - self.beta2.powf(step);
        self.lr * bias_correction2.sqrt() / bias_correction1
    }
}

/// Element offsets of each index's slice in a contiguous tensor of `sizes`, from
/// `indices` (`sparse_dim × nnz`, row-major). None when an index is out of bounds or the
/// offsets are not strictly increasing (a coalesced gradient's are: sorted and unique).
pub fn slice_offsets(indices: &[i64], sizes: &[i64], sparse_dim: usize) -> Option<Vec<usize>> {
    if sparse_dim == 0 || sparse_dim > sizes.len() {
        return None;
    }
    let nnz = indices.len() / sparse_dim;
    if nnz * sparse_dim != indices.len() {
        return None;
    }
    let slice: usize = sizes[sparse_dim..].iter().map(|&s| s as usize).product();
    let mut strides = vec![slice; sparse_dim];
    for d in (0..sparse_dim.saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * sizes[d + 1] as usize;
    }
    let mut out = Vec::with_capacity(nnz);
    for k in 0..nnz {
        let mut off = 0usize;
        for d in 0..sparse_dim {
            let i = indices[d * nnz + k];
            if i < 0 || i >= sizes[d] {
                return None;
            }
            off += i as usize * strides[d];
        }
        if out.last().is_some_and(|&prev| off <= prev) {
            return None;
        }
        out.push(off);
    }
    Some(out)
}

/// Raw buffers of one parameter (checked by the bindings: contiguous, one dtype, disjoint).
#[derive(Clone, Copy, Debug)]
pub struct Buffers {
    pub param: *mut u8,
    pub exp_avg: *mut u8,
    pub exp_avg_sq: *mut u8,
    pub values: *const u8,
}
// SAFETY: the caller's contract makes the buffers valid and the written slices disjoint.
unsafe impl Send for Buffers {}
unsafe impl Sync for Buffers {}

#[inline(always)]
unsafe fn rows<T: OpFloat>(
    b: Buffers,
    offsets: &[usize],
    slice: usize,
    k0: usize,
    k1: usize,
    c: [T; 4],
    maximize: bool,
) {
    let [one_minus_beta1, one_minus_beta2, eps, neg_step] = c;
    let (p, m, v) = (
        b.param as *mut T,
        b.exp_avg as *mut T,
        b.exp_avg_sq as *mut T,
    );
    for (k, &off) in offsets.iter().enumerate().take(k1).skip(k0) {
        let g = std::slice::from_raw_parts((b.values as *const T).add(k * slice), slice);
        let p = std::slice::from_raw_parts_mut(p.add(off), slice);
        let m = std::slice::from_raw_parts_mut(m.add(off), slice);
        let v = std::slice::from_raw_parts_mut(v.add(off), slice);
        for j in 0..slice {
            let g = if maximize { -g[j] } else { g[j] };
            let (m_old, v_old) = (m[j], v[j]);
            let u1 = (g - m_old) * one_minus_beta1;
            let u2 = (g * g - v_old) * one_minus_beta2;
            m[j] = m_old + u1;
            v[j] = v_old + u2;
            let denom = (u2 + v_old).sqrt() + eps;
            p[j] = p[j] + neg_step * ((u1 + m_old) / denom);
        }
    }
}

/// Applies one SparseAdam step to the slices at `offsets` (from [`slice_offsets`]).
///
/// # Safety
/// `param`, `exp_avg`, `exp_avg_sq`: contiguous buffers of `dtype` covering every
/// `offset + slice`; `values`: `offsets.len() * slice` elements of `dtype`; none overlaps
/// another; `offsets` strictly increasing (so the written slices are disjoint).
pub unsafe fn sparse_adam(
    h: &SparseAdam,
    b: Buffers,
    dtype: DType,
    offsets: &[usize],
    slice: usize,
    threads: usize,
    exec: &dyn Executor,
) {
    let nnz = offsets.len();
    // About 16K elements per piece, whole slices each.
    let per = ((1 << 14) / slice.max(1)).max(1);
    let pieces: Vec<(usize, usize, usize)> = (0..nnz)
        .step_by(per)
        .map(|k| (0, k, (k + per).min(nnz)))
        .collect();
    let step_size = h.step_size();
    let c64 = [1.0 - h.beta1, 1.0 - h.beta2, h.eps, -step_size];
    let c32 = c64.map(|x| x as f32);
    map_pieces(&pieces, threads, exec, (), &|_, k0, k1| match dtype {
        DType::F32 => rows::<f32>(b, offsets, slice, k0, k1, c32, h.maximize),
        DType::F64 => rows::<f64>(b, offsets, slice, k0, k1, c64, h.maximize),
        // The bindings send 16-bit types to torch.
        DType::BF16 | DType::F16 => unreachable!("sparse_adam: f32 and f64 only"),
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::Serial;

    #[test]
    fn offsets_follow_row_major_strides_and_reject_bad_indices() {
        // sizes (3, 4, 2): sparse dims 2, slice 2.
        let idx = [0, 1, 2, /* dim 1: */ 3, 0, 1];
        assert_eq!(slice_offsets(&idx, &[3, 4, 2], 2), Some(vec![6, 8, 18]));
        assert_eq!(slice_offsets(&[0, 4], &[4, 3], 1), None, "out of bounds");
        assert_eq!(slice_offsets(&[-1], &[4, 3], 1), None, "negative");
        assert_eq!(slice_offsets(&[2, 1], &[4, 3], 1), None, "unsorted");
        assert_eq!(slice_offsets(&[1, 1], &[4, 3], 1), None, "duplicate");
        assert_eq!(slice_offsets(&[], &[4, 3], 1), Some(vec![]));
    }

    #[test]
    fn touches_only_the_indexed_rows_and_matches_dense_adam_there() {
        let h = SparseAdam {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            step: 1,
            maximize: false,
            tensor_lr_step_size: None,
        };
        let mut p = vec![1.0f64; 8];
        let (mut m, mut v) = (vec![0.0f64; 8], vec![0.0f64; 8]);
        let g = [0.5f64, -2.0];
        let b = Buffers {
            param: p.as_mut_ptr() as *mut u8,
            exp_avg: m.as_mut_ptr() as *mut u8,
            exp_avg_sq: v.as_mut_ptr() as *mut u8,
            values: g.as_ptr() as *const u8,
        };
        // Row 2 of a (4, 2) parameter.
        unsafe { sparse_adam(&h, b, DType::F64, &[4], 2, 1, &Serial) };
        // First Adam step: p - lr * sign(g) (eps scaled by 1 / sqrt(1 - beta2), as torch has it).
        assert!(
            (p[4] - 0.9).abs() < 1e-6 && (p[5] - 1.1).abs() < 1e-6,
            "{p:?}"
        );
        assert!(p
            .iter()
            .enumerate()
            .all(|(i, &x)| i == 4 || i == 5 || x == 1.0));
        assert_eq!((m[4], v[5]), (0.5 * (1.0 - 0.9), 4.0 * (1.0 - 0.999)));
    }
}

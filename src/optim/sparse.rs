//! SparseAdam's step for one parameter: torch's `sparse_adam` with the row updates in
//! `ferrotorch_kernels::sparse_adam`.
//!
//! Python coalesces the gradient (torch's own `coalesce`, so duplicate indices are summed
//! exactly as torch sums them) and passes its indices and values. Everything is read at
//! this call; anything the kernel cannot take (a subclass, another device or dtype, shapes
//! that do not match, shared memory, indices that are not sorted and unique) returns False
//! untouched, and Python runs torch's function instead.

use ferrotorch_kernels::sparse_adam::{self as k, Buffers, SparseAdam};
use ferrotorch_kernels::DType;
use pyo3::prelude::*;

use crate::access::{any_overlap, bump_versions, Meta};
use crate::errors::{enter, Error};

/// The buffers of one call, read now (addresses as plain numbers, so the call can cross
/// into GIL-free code); the objects are held by the caller.
struct Call {
    dtype: DType,
    /// param, exp_avg, exp_avg_sq, values.
    addrs: [usize; 4],
    ranges: [(usize, usize); 4],
    indices: (usize, usize),
    sizes: Vec<i64>,
    sparse_dim: usize,
    slice: usize,
}

fn read(objs: [&Bound<'_, PyAny>; 5]) -> PyResult<Option<Call>> {
    let mut metas = [Meta::NONE; 5];
    for (m, o) in metas.iter_mut().zip(objs) {
        match Meta::of(o)? {
            Some(x) => *m = x,
            None => return Ok(None),
        }
    }
    let [p, m, v, idx, vals] = metas;
    let (Some(pf), Some(mf), Some(vf), Some(valf), Some(idxf)) =
        (p.flat(), m.flat(), v.flat(), vals.flat(), idx.flat_i64())
    else {
        return Ok(None);
    };
    let same_dtype = [mf.dtype, vf.dtype, valf.dtype]
        .iter()
        .all(|&d| d == pf.dtype);
    let sizes = p.sizes().to_vec();
    let isz = idx.sizes();
    if !same_dtype
        || !matches!(pf.dtype, DType::F32 | DType::F64)
        || !m.same_shape(&p)
        || !v.same_shape(&p)
        || isz.len() != 2
        || isz[0] < 1
        || isz[0] as usize > sizes.len()
    {
        return Ok(None);
    }
    let (sparse_dim, nnz) = (isz[0] as usize, isz[1]);
    let mut want = vec![nnz];
    want.extend_from_slice(&sizes[sparse_dim..]);
    if vals.sizes() != want.as_slice() {
        return Ok(None);
    }
    let slice = sizes[sparse_dim..].iter().product::<i64>() as usize;
    let flats = [pf, mf, vf, valf];
    Ok(Some(Call {
        dtype: pf.dtype,
        addrs: flats.map(|f| f.ptr as usize),
        ranges: flats.map(|f| f.range()),
        indices: idxf,
        sizes,
        sparse_dim,
        slice,
    }))
}

/// One SparseAdam step of `param` from a coalesced gradient's `indices` and `values`;
/// `step` is the count after this step's increment; `tensor_lr_step_size` is the step
/// size torch computes from a tensor lr (in its dtype). False: nothing changed, torch's
/// function must step this parameter.
#[pyfunction]
#[pyo3(signature = (param, exp_avg, exp_avg_sq, indices, values, *, lr, beta1, beta2, eps, step, maximize, tensor_lr_step_size=None))]
#[allow(clippy::too_many_arguments)]
pub fn sparse_adam_step(
    py: Python<'_>,
    param: &Bound<'_, PyAny>,
    exp_avg: &Bound<'_, PyAny>,
    exp_avg_sq: &Bound<'_, PyAny>,
    indices: &Bound<'_, PyAny>,
    values: &Bound<'_, PyAny>,
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    step: i64,
    maximize: bool,
    tensor_lr_step_size: Option<f64>,
) -> PyResult<bool> {
    let Some(c) = read([param, exp_avg, exp_avg_sq, indices, values])? else {
        return Ok(false);
    };
    let h = SparseAdam {
        lr,
        beta1,
        beta2,
        eps,
        step,
        maximize,
        tensor_lr_step_size,
    };
    let threads = tch::get_num_threads().max(1) as usize;
    // The five objects are borrowed from the caller for the whole call.
    let done = enter(py, "SparseAdam", move || {
        let (iaddr, inum) = c.indices;
        let mut ranges = c.ranges.to_vec();
        ranges.push((iaddr, iaddr + inum * 8));
        if any_overlap(&mut ranges) {
            return Ok(false);
        }
        // SAFETY: a plain contiguous CPU int64 tensor of `inum` elements, alive (held by
        // the caller) and not written during the call (it overlaps no written buffer).
        let idx: &[i64] = if inum == 0 {
            &[]
        } else {
            unsafe { std::slice::from_raw_parts(iaddr as *const i64, inum) }
        };
        // Row d of the (sparse_dim × nnz) indices indexes dimension d.
        let nnz = inum / c.sparse_dim;
        if let Some(&bad) = idx
            .iter()
            .enumerate()
            .find_map(|(n, i)| (*i < 0 || *i >= c.sizes[n / nnz]).then_some(i))
        {
            return Err(Error::Runtime(format!(
                "SparseAdam: the gradient's index {bad} is out of bounds for the parameter's size {:?}",
                c.sizes
            )));
        }
        let Some(offsets) = k::slice_offsets(idx, &c.sizes, c.sparse_dim) else {
            return Ok(false); // not sorted and unique: torch's function decides
        };
        let [param, exp_avg, exp_avg_sq, values] = c.addrs;
        let b = Buffers {
            param: param as *mut u8,
            exp_avg: exp_avg as *mut u8,
            exp_avg_sq: exp_avg_sq as *mut u8,
            values: values as *const u8,
        };
        // SAFETY: every buffer was read at this call from a live plain contiguous CPU tensor
        // of one float dtype with the shapes checked in `read`; none overlaps another; the
        // offsets are in bounds and strictly increasing.
        unsafe {
            k::sparse_adam(
                &h,
                b,
                c.dtype,
                &offsets,
                c.slice,
                threads,
                &crate::parallel::TorchThreads,
            )
        };
        Ok(true)
    })?;
    if done {
        bump_versions(&[param.clone(), exp_avg.clone(), exp_avg_sq.clone()]);
    }
    Ok(done)
}

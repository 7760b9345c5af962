//! Buffers for the activations and gradient temporaries the fused kernels write, kept for
//! reuse between steps (src/shim/pool.cpp): a training step allocates the same sizes every
//! time, and from glibc's heap, which is trimmed when a step frees them, every page faulted
//! in again on the next step. They are plain contiguous CPU tensors; only tensors that stay
//! inside the ViT's forward and backward (saved activations, temporaries) come from here,
//! never one handed to the user (a gradient, the logits), since their storage cannot be
//! resized.

use pyo3::prelude::*;
use tch::{Kind, Tensor};

use crate::access::{kind_dtype, scalar_type};
use crate::errors::Result;

extern "C" {
    // src/shim/pool.cpp
    fn ft_pool_empty(sizes: *const i64, ndim: usize, dtype: i32) -> *mut torch_sys::C_tensor;
    fn ft_pool_empty_cache() -> usize;
    fn ft_pool_cached() -> usize;
}

/// An uninitialized contiguous CPU tensor of `size` and `kind`, reusing a freed buffer of
/// the same byte size when one waits; through torch's allocator for anything else.
pub(super) fn empty(size: &[i64], kind: Kind) -> Result<Tensor> {
    if let Some(st) = kind_dtype(kind).map(scalar_type) {
        // SAFETY: `size` is `size.len()` readable i64s; a non-null result is a new
        // at::Tensor* that the returned Tensor owns.
        let t = unsafe { ft_pool_empty(size.as_ptr(), size.len(), st) };
        if !t.is_null() {
            return Ok(unsafe { Tensor::from_ptr(t) });
        }
    }
    Ok(Tensor::f_empty(size, (kind, tch::Device::Cpu))?)
}

/// [`empty`] with the size and dtype of `t`.
pub(super) fn empty_like(t: &Tensor) -> Result<Tensor> {
    empty(&t.size(), t.kind())
}

/// Frees the buffers waiting for reuse and returns how many bytes they held.
#[pyfunction]
pub fn vit_empty_cache() -> usize {
    // SAFETY: no arguments; the pool's lock makes it safe from any thread.
    unsafe { ft_pool_empty_cache() }
}

/// Bytes of buffers waiting for reuse.
#[pyfunction]
pub fn vit_cached_bytes() -> usize {
    // SAFETY: as above.
    unsafe { ft_pool_cached() }
}

//! Matmuls: the oneDNN (1x1 convolution) / `addmm` dispatch and the Linear forward and
//! backward built on it.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use tch::{Device, Kind, Tensor};

use super::ops::last;
use crate::errors::Result;

thread_local! {
    /// Whether [`matmul_nt`] may use oneDNN: set for the duration of one forward or backward
    /// pass (which runs on the calling thread) from the model's configuration.
    static ONEDNN: Cell<bool> = const { Cell::new(true) };
}

/// Runs `f` with [`ONEDNN`] set to `on`, restoring the previous value afterwards.
pub(super) fn with_onednn<T>(on: bool, f: impl FnOnce() -> T) -> T {
    let before = ONEDNN.replace(on);
    let out = f();
    ONEDNN.set(before);
    out
}

/// Multiply-adds at or above which [`matmul_nt`] asks oneDNN: each call costs it ~40-60 us
/// more than `addmm`, and the two broke even at 25-40 M here.
const ONEDNN_MIN_MACS: i64 = 1 << 25;

/// `x2 @ w.T (+ b)` for a 2-D `x2 (M, K)` and `w (N, K)`.
///
/// On the CPU, fp32/bf16 go through oneDNN as a 1x1 convolution over a channels-last view
/// of `x2` (a plain GEMM, no copies either way): for the ViT's tall, thin products
/// (K = 256..768) libtorch's oneDNN kernels measured 1.3-2x the GFLOP/s of the MKL `sgemm`
/// that `addmm` calls on this machine's CPU. Anything else, or any oneDNN error, takes
/// `addmm` / `mm`.
pub(super) fn matmul_nt(x2: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (m, kk) = (x2.size()[0], x2.size()[1]);
    let n = w.size()[0];
    let onednn = ONEDNN.get()
        && x2.device() == Device::Cpu
        && matches!(x2.kind(), Kind::Float | Kind::BFloat16)
        && m * kk * n >= ONEDNN_MIN_MACS
        && w.kind() == x2.kind()
        && b.is_none_or(|b| b.kind() == x2.kind());
    // A libtorch without oneDNN (or a CPU without bf16 support) fails the first call; from
    // then on that dtype goes straight to addmm instead of raising a C++ error every time.
    static ONEDNN_FAILED: [AtomicBool; 2] = [AtomicBool::new(false), AtomicBool::new(false)];
    let failed = &ONEDNN_FAILED[usize::from(x2.kind() == Kind::BFloat16)];
    if onednn && !failed.load(Ordering::Relaxed) {
        let x2 = x2.f_contiguous()?;
        let w = w.f_contiguous()?;
        // (M, K) row-major is (1, K, M, 1) in channels-last: C = K, H = M.
        let x4 = x2.f_as_strided([1, kk, m, 1], [m * kk, 1, kk, kk], None::<i64>)?;
        let w4 = w.f_view([n, kk, 1, 1])?;
        match x4.f_mkldnn_convolution(&w4, b, [0, 0], [1, 1], [1, 1], 1) {
            // channels-last (1, N, M, 1) is (M, N) row-major: a view, not a copy
            Ok(y) => return Ok(y.f_permute([0, 2, 3, 1])?.f_reshape([m, n])?),
            Err(_) => failed.store(true, Ordering::Relaxed),
        }
    }
    Ok(match b {
        Some(b) => b.f_addmm(x2, &w.f_tr()?)?,
        None => x2.f_mm(&w.f_tr()?)?,
    })
}

/// `g2 @ w` for `g2 (M, N)`, `w (N, K)`: a Linear's input gradient. `w.T` goes in as a view:
/// only the oneDNN branch needs it contiguous, and `mm` takes it as it is.
pub(super) fn matmul_nn(g2: &Tensor, w: &Tensor) -> Result<Tensor> {
    matmul_nt(g2, &w.f_tr()?, None)
}

/// `x @ w.T + b` over the last dim.
pub(super) fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let size = x.size();
    let x2 = x.f_reshape([-1, size[size.len() - 1]])?;
    let y = matmul_nt(&x2, w, b)?;
    let mut out = size;
    let n = out.len();
    out[n - 1] = w.size()[0];
    Ok(y.f_reshape(out)?)
}

/// Returns (grad x, grad w, grad b) of `linear` (grad b is None without `with_bias`).
pub(super) fn linear_bwd(
    gy: &Tensor,
    x: &Tensor,
    w: &Tensor,
    with_bias: bool,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    let (out, inp) = (last(gy), last(x));
    let gy2 = gy.f_reshape([-1, out])?;
    let gx = matmul_nn(&gy2, w)?;
    let mut gx_size = gy.size();
    let n = gx_size.len();
    gx_size[n - 1] = inp;
    let gw = gy2.f_tr()?.f_mm(&x.f_reshape([-1, inp])?)?;
    let gb = if with_bias {
        Some(gy2.f_sum_dim_intlist([0i64].as_slice(), false, None::<Kind>)?)
    } else {
        None
    };
    Ok((gx.f_reshape(gx_size)?, gw, gb))
}

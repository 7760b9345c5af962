//! Vision Transformer (vit-pytorch's `ViT`, or timm's plain `VisionTransformer`) forward
//! and backward, written out by hand.
//!
//! No libtorch autograd is used. The forward pass returns the logits and the activations
//! the backward pass needs; Python keeps those with `ctx.save_for_backward`, so torch frees
//! them after `backward()` (or keeps them under `retain_graph=True`) exactly as it does for
//! its own ops. Matmuls go through tch (oneDNN or MKL on CPU, see [`matmul_nt`]). On CPU
//! everything between the matmuls is one fused Rust pass from `ferrotorch_kernels::vit`
//! ([`Ops::Fused`]); on other devices the same math runs as tch ops ([`Ops::Torch`]).
//! Dropout masks come from a counter-based hash of a seed drawn from torch's generator, so
//! they are recomputed, never stored, and both paths draw the same masks.
//!
//! With cls pooling the last layer runs on the cls token alone ([`cls_layer`]); without a
//! gradient to compute, the batch runs in cache-sized chunks and nothing is saved
//! ([`infer`]).
//!
//! The bindings never rely on the Python layer's checks: every tensor must be a plain
//! `torch.Tensor`/`nn.Parameter`, and the images, the parameters (against the layout
//! `ferrotorch.nn.vit._layout` describes, [`check_params`]), the saved activations and the
//! logits' gradient (against what the forward pass was given and saved) are checked for shape,
//! dtype, device and real strided storage before any kernel runs.
//!
//! Parameter order (as `ferrotorch.nn.ViT._ordered_params` lists them): [patch LayerNorm
//! w/b], patch Linear w/b, [embedding LayerNorm w/b], [cls token], pos embedding; per layer
//! attention LayerNorm w/b, qkv w, [qkv b], [out w/b], feed-forward LayerNorm w/b, Linear 1
//! w/b, Linear 2 w/b; then the final LayerNorm w/b and the head w/b.
//!
//! [`matmul_nt`]: matmul::matmul_nt
//! [`Ops::Fused`]: ops::Ops::Fused
//! [`Ops::Torch`]: ops::Ops::Torch
//! [`cls_layer`]: cls::cls_layer
//! [`infer`]: forward::infer
//! [`check_params`]: config::check_params

use pyo3::prelude::*;

mod attention;
mod backward;
mod bindings;
mod buffers;
mod cls;
mod config;
mod forward;
mod matmul;
mod ops;

pub use bindings::{vit_backward, vit_forward, VitRun};
pub use buffers::{vit_cached_bytes, vit_empty_cache};

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<VitRun>()?;
    m.add_function(wrap_pyfunction!(vit_forward, m)?)?;
    m.add_function(wrap_pyfunction!(vit_backward, m)?)?;
    m.add_function(wrap_pyfunction!(vit_empty_cache, m)?)?;
    m.add_function(wrap_pyfunction!(vit_cached_bytes, m)?)?;
    Ok(())
}

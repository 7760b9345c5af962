//! ferrotorch's Python extension, `ferrotorch._native`.
//!
//! Layers, one way: `ferrotorch_kernels` (pure Rust math) ← this crate (PyO3 + tch glue:
//! argument checks, tensor validation, GIL release) ← `python/ferrotorch` (torch-compatible
//! classes).

use pyo3::prelude::*;

pub mod access;
pub mod clip;
pub mod errors;
pub mod optim;
pub mod parallel;
pub mod sched;
pub mod train;
pub mod vit;

/// The torch release this extension was compiled against (build.rs reads it from the torch
/// of the building environment), as a marker in the library file: `import ferrotorch` finds
/// it there and compares it with the running torch *before* loading the extension, since
/// loading a build for another libtorch may crash instead of failing. The module's
/// `TORCH_VERSION` is read from it.
#[used]
pub static BUILT_FOR_TORCH: &str = concat!(
    "ferrotorch-built-for-torch=",
    env!("FERROTORCH_TORCH_VERSION"),
    ";"
);

/// True when fused steps run on torch's OpenMP threads (False in a forked child, where a
/// fork-safe pool is used instead).
#[pyfunction]
fn uses_torch_threads() -> bool {
    parallel::uses_torch_threads()
}

/// The SIMD kernels ferrotorch's CPU code runs: "avx512", "avx2" or "default" (capped by
/// `FERROTORCH_CPU_CAPABILITY` or torch's `ATEN_CPU_CAPABILITY`).
#[pyfunction]
fn cpu_capability() -> &'static str {
    match ferrotorch_kernels::simd_level() {
        3 => "avx512",
        2 => "avx2",
        _ => "default",
    }
}

#[pymodule]
fn _native(py: Python<'_>, m: &Bound<'_, PyModule>) -> PyResult<()> {
    // libtorch must be loaded (by importing torch) before any tch call.
    py.import("torch")?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // Read through the marker, so the linker keeps it in the file.
    let built_for =
        &BUILT_FOR_TORCH["ferrotorch-built-for-torch=".len()..BUILT_FOR_TORCH.len() - 1];
    m.add("TORCH_VERSION", built_for)?;
    optim::register(m)?;
    m.add_function(wrap_pyfunction!(uses_torch_threads, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_capability, m)?)?;
    sched::register(m)?;
    clip::register(m)?;
    train::register(m)?;
    vit::register(m)?;
    m.add(
        "FerrotorchValueError",
        py.get_type::<errors::FerrotorchValueError>(),
    )?;
    m.add(
        "FerrotorchTypeError",
        py.get_type::<errors::FerrotorchTypeError>(),
    )?;
    m.add(
        "FerrotorchRuntimeError",
        py.get_type::<errors::FerrotorchRuntimeError>(),
    )?;
    Ok(())
}

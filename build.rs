//! Points the linker at the torch of the Python environment doing this build.
//!
//! torch-sys caches the libtorch directory it found the first time its build script ran.
//! `pip install .` runs that build inside a temporary isolated environment, deleted right
//! after, so a later `maturin build`/`develop` in another environment would link against a
//! directory that no longer exists. This script re-runs whenever the Python environment
//! changes and adds the current torch's `lib` directory to the search path.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const REQUIRED_TORCH: &str = "2.13.0";

fn main() {
    for var in [
        "VIRTUAL_ENV",
        "PYTHONPATH",
        "PYO3_PYTHON",
        "CONDA_PREFIX",
        "LIBTORCH_USE_PYTORCH",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/shim/tensor_meta.cpp");
    // `cargo test -p ferrotorch-kernels` never builds this crate; anything else links torch.
    let python = env::var_os("PYO3_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(if env::var_os("VIRTUAL_ENV").is_some() {
                "python"
            } else {
                "python3"
            })
        });
    let script = "import os, sysconfig, torch; print(torch.__version__); \
                  print(os.path.join(os.path.dirname(torch.__file__), 'lib')); \
                  print(os.path.join(os.path.dirname(torch.__file__), 'include')); \
                  print(sysconfig.get_paths()['include']); \
                  print(int(torch.compiled_with_cxx11_abi()))";
    let out = match Command::new(&python).args(["-c", script]).output() {
        Ok(out) if out.status.success() => out,
        Ok(out) => panic!(
            "ferrotorch needs torch=={REQUIRED_TORCH} in the Python environment that builds it \
             ({python:?} could not import torch: {})",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => panic!("could not run {python:?} to find torch: {e}"),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let version = lines.next().unwrap_or_default().trim();
    let lib = lines.next().unwrap_or_default().trim();
    if version.split('+').next() != Some(REQUIRED_TORCH) {
        panic!("ferrotorch is built against torch=={REQUIRED_TORCH} (tch 0.26), but {python:?} has torch {version}");
    }
    println!("cargo:rustc-link-search=native={lib}");
    let torch_include = PathBuf::from(lines.next().unwrap_or_default().trim());
    let python_include = lines.next().unwrap_or_default().trim().to_string();
    let cxx11_abi = lines.next().unwrap_or("1").trim().to_string();
    // The tensor-metadata shim: reads a Python tensor's layout in one call (src/access.rs).
    cc::Build::new()
        .cpp(true)
        .file("src/shim/tensor_meta.cpp")
        .include(&torch_include)
        .include(torch_include.join("torch/csrc/api/include"))
        .include(python_include)
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", cxx11_abi.as_str())
        .flag_if_supported("-w")
        .opt_level(2)
        .compile("ferrotorch_shim");
}

//! Points the linker at the torch of the Python environment doing this build, checks that it
//! is a torch ferrotorch supports, and records which one it is.
//!
//! torch-sys caches the libtorch directory it found the first time its build script ran.
//! `pip install .` runs that build inside a temporary isolated environment, deleted right
//! after, so a later `maturin build`/`develop` in another environment would link against a
//! directory that no longer exists. This script re-runs whenever the Python environment
//! changes and adds the current torch's `lib` directory to the search path.

use std::env;
use std::path::PathBuf;
use std::process::Command;

/// The torch releases (major, minor) this source builds against: tch 0.26 is generated for
/// 2.13, and src/shim/torch_compat.h supplies what the others lack or renamed.
const SUPPORTED_TORCH: (u32, std::ops::RangeInclusive<u32>) = (2, 11..=15);

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
    println!("cargo:rerun-if-changed=src/shim/muon.cpp");
    println!("cargo:rerun-if-changed=src/shim/pool.cpp");
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
            "ferrotorch needs torch {} in the Python environment that builds it \
             ({python:?} could not import torch: {})",
            supported_text(),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => panic!("could not run {python:?} to find torch: {e}"),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let version = lines.next().unwrap_or_default().trim();
    let lib = lines.next().unwrap_or_default().trim();
    let public = version.split('+').next().unwrap_or_default();
    let mut parts = public.split('.').map(|p| p.parse::<u32>().ok());
    let (major, minor) = (parts.next().flatten(), parts.next().flatten());
    let (want_major, want_minor) = SUPPORTED_TORCH;
    match (major, minor) {
        (Some(ma), Some(mi)) if ma == want_major && want_minor.contains(&mi) => {}
        _ => panic!(
            "ferrotorch builds against torch {}, but {python:?} has torch {version}",
            supported_text()
        ),
    }
    check_torch_sys_stamp(public);
    // The Python package checks at import that the torch it runs with is this one.
    println!("cargo:rustc-env=FERROTORCH_TORCH_VERSION={public}");
    println!("cargo:rustc-link-search=native={lib}");
    let torch_include = PathBuf::from(lines.next().unwrap_or_default().trim());
    let python_include = lines.next().unwrap_or_default().trim().to_string();
    let cxx11_abi = lines.next().unwrap_or("1").trim().to_string();
    // The C++ shims: a Python tensor's layout in one call (src/access.rs), Muon's step
    // through ATen's C++ ops (src/optim/muon.rs), and the ViT's reusable activation buffers
    // (src/vit/buffers.rs).
    cc::Build::new()
        .cpp(true)
        .file("src/shim/tensor_meta.cpp")
        .file("src/shim/muon.cpp")
        .file("src/shim/pool.cpp")
        .include(&torch_include)
        .include(torch_include.join("torch/csrc/api/include"))
        .include(python_include)
        // src/shim/cxx.sh (the CXX of .cargo/config.toml) raises this to C++20 for torch >= 2.14.
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", cxx11_abi.as_str())
        .flag_if_supported("-w")
        .opt_level(2)
        .compile("ferrotorch_shim");
}

fn supported_text() -> String {
    let (major, minor) = SUPPORTED_TORCH;
    format!("{major}.{}.x - {major}.{}.x", minor.start(), minor.end())
}

/// torch-sys re-runs its build script only when its own inputs change, not when the torch of
/// the environment does, so a target directory reused after switching or upgrading torch
/// would link wrappers compiled for the old headers. src/shim/cxx.sh stamps torch-sys's
/// build directory with the version it compiled against; refuse a mismatch.
fn check_torch_sys_stamp(version: &str) {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets it"));
    let Some(build) = out.parent().and_then(|p| p.parent()) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(build) else {
        return;
    };
    let newest = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("torch-sys-"))
        .map(|e| e.path().join("out/ferrotorch-torch-version"))
        .filter_map(|p| Some((std::fs::metadata(&p).ok()?.modified().ok()?, p)))
        .max();
    let Some((_, stamp)) = newest else { return };
    let built = std::fs::read_to_string(&stamp).unwrap_or_default();
    if built.trim() != version {
        panic!(
            "torch-sys's C++ in this target directory was compiled against torch {}, but the \
             environment has torch {version}: run `cargo clean -p torch-sys` (or build in a \
             target directory of its own: `pip install .` uses one per torch version)",
            built.trim()
        );
    }
}

"""Building against the user's torch: the PEP 517 backend, the C++ compiler wrapper and the
version records they leave (build_backend/, src/shim/cxx.sh, build.rs)."""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.util
import io
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import ferrotorch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "build_backend"))
import ferrotorch_backend as backend  # noqa: E402


def test_supported_range_is_declared_once_per_language():
    """build.rs (which refuses other torches) and the backend (which picks the torch) agree."""
    rust = (ROOT / "build.rs").read_text()
    m = re.search(r"SUPPORTED_TORCH: \(u32, std::ops::RangeInclusive<u32>\) = \((\d+), (\d+)\.\.=(\d+)\)", rust)
    assert m, "SUPPORTED_TORCH not found in build.rs"
    major, lo, hi = map(int, m.groups())
    assert backend.SUPPORTED == (major, range(lo, hi + 1))
    assert backend.SUPPORTED_SPEC == f"torch>={major}.{lo},<{major}.{hi + 1}"
    deps = (ROOT / "pyproject.toml").read_text()
    assert f'"torch>={major}.{lo},<{major}.{hi + 1}"' in deps


def test_running_torch_is_the_one_the_extension_was_built_against():
    assert ferrotorch._native.TORCH_VERSION == ferrotorch.REQUIRED_TORCH
    assert torch.__version__.split("+")[0] == ferrotorch.REQUIRED_TORCH
    assert backend._supported(torch.__version__)


@pytest.mark.parametrize("version,ok", [("2.11.0", True), ("2.13.0+cu130", True), ("2.15.1", True),
                                        ("2.10.0", False), ("2.16.0", False), ("3.11.0", False)])
def test_supported_versions(version, ok):
    assert backend._supported(version) is ok


def test_an_unsupported_installed_torch_stops_the_build(monkeypatch):
    """Never replaced: the build stops and says which torch it found."""
    monkeypatch.setattr(backend, "_installed_torch", lambda: "2.9.1")
    with pytest.raises(RuntimeError, match=r"torch 2\.9\.1.*never replaces"):
        backend.get_requires_for_build_wheel()
    monkeypatch.setattr(backend, "_installed_torch", lambda: "2.14.1+cpu")
    assert backend._target_torch() == "2.14.1+cpu"
    monkeypatch.setattr(backend, "_installed_torch", lambda: None)  # a fresh environment
    assert backend._target_torch() is None
    if importlib.util.find_spec("maturin") is not None:
        assert backend.SUPPORTED_SPEC in backend.get_requires_for_build_wheel()
        monkeypatch.setattr(backend, "_installed_torch", lambda: "2.14.1+cpu")
        assert not any(r.startswith("torch") for r in backend.get_requires_for_build_wheel())


def test_installed_torch_is_read_outside_the_build_isolation():
    assert backend._installed_torch() == torch.__version__.split("+")[0]


def _fake_wheel(directory: Path) -> Path:
    info = "ferrotorch-0.1.0.dist-info"
    files = {
        "ferrotorch/__init__.py": b"x = 1\n",
        "ferrotorch/_native.so": os.urandom(64),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\n",
        f"{info}/METADATA": (
            b"Metadata-Version: 2.4\nName: ferrotorch\nVersion: 0.1.0\n"
            b"Requires-Dist: torch>=2.11,<2.16\nRequires-Dist: numpy\n"
            b"Requires-Dist: torchvision ; extra == 'test'\n"
        ),
    }
    path = directory / "ferrotorch-0.1.0-cp311-cp311-linux_x86_64.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(f"{info}/RECORD", "".join(f"{n},,\n" for n in files) + f"{info}/RECORD,,\n")
    return path


def test_retag_pins_the_torch_and_keeps_the_wheel_valid(tmp_path):
    out = backend.retag(_fake_wheel(tmp_path), "2.15.0")
    assert out.name == "ferrotorch-0.1.0+torch2.15.0-cp311-cp311-linux_x86_64.whl"
    assert not (tmp_path / "ferrotorch-0.1.0-cp311-cp311-linux_x86_64.whl").exists()
    info = "ferrotorch-0.1.0+torch2.15.0.dist-info"
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        assert {f"{info}/METADATA", f"{info}/RECORD", f"{info}/WHEEL", "ferrotorch/_native.so"} <= names
        assert not any(n.startswith("ferrotorch-0.1.0.dist-info") for n in names)
        meta = z.read(f"{info}/METADATA").decode()
        assert "Version: 0.1.0+torch2.15.0" in meta
        assert "Requires-Dist: torch==2.15.0\n" in meta
        assert "Requires-Dist: torchvision ; extra == 'test'" in meta  # extras untouched
        rows = list(csv.reader(io.StringIO(z.read(f"{info}/RECORD").decode())))
        assert {r[0] for r in rows} == names
        for path, digest, size in rows:
            if path.endswith("RECORD"):
                assert digest == size == ""
                continue
            data = z.read(path)
            assert int(size) == len(data)
            assert digest == "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _wrapper(tmp_path, minor, source="libtch/torch_api_generated.cpp"):
    inc = tmp_path / f"inc{minor}"
    (inc / "torch" / "headeronly").mkdir(parents=True)
    (inc / "torch" / "headeronly" / "version.h").write_text(
        f"#define TORCH_VERSION_MAJOR 2\n#define TORCH_VERSION_MINOR {minor}\n"
    )
    env = dict(os.environ, FERROTORCH_REAL_CXX="echo")
    out = subprocess.run(
        [str(ROOT / "src/shim/cxx.sh"), "-O1", "-I", str(inc), "-std=c++17", "-c", source],
        capture_output=True, text=True, env=env, check=True,
    )
    return out.stdout.split()


@pytest.mark.parametrize("minor,std", [(11, "-std=c++17"), (13, "-std=c++17"), (14, "-std=c++20"), (15, "-std=c++20")])
def test_cxx_wrapper_picks_the_standard_and_the_compat_header(tmp_path, minor, std):
    args = _wrapper(tmp_path, minor)
    assert std in args and args.count(std) == 1
    assert args[args.index("-include") + 1].endswith("src/shim/torch_compat.h")
    other = _wrapper(tmp_path / "x", minor, source="libtch/torch_api.cpp")
    assert "-include" not in other and std in other


def test_cxx_wrapper_leaves_other_compiles_alone(tmp_path):
    env = dict(os.environ, FERROTORCH_REAL_CXX="echo")
    out = subprocess.run([str(ROOT / "src/shim/cxx.sh"), "-O2", "-std=c++17", "-c", "x.cpp"],
                         capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["-O2", "-std=c++17", "-c", "x.cpp"]

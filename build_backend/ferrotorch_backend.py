"""PEP 517 backend: maturin, built against the torch the installing environment already has.

pip builds a package in an isolated environment that cannot see the user's packages, so a
plain ``requires = ["torch"]`` would compile against whatever torch the index offers, and the
wheel's dependency would then replace the user's torch. This wrapper around maturin's backend:

1. looks for torch in the interpreter pip installs into (``python -I``, which is outside
   pip's isolation). A supported release (``SUPPORTED``) is used as it is and nothing is
   downloaded; an unsupported one stops the build with a message saying so; with none, the
   build requires the newest supported torch, which pip puts in the build environment;
2. builds with maturin in a target directory of that torch's own (``target/torch-2.15.0-cp311``)
   so object files compiled against one libtorch never link against another;
3. rewrites the wheel to require exactly that torch (so pip refuses a mismatched torch
   instead of downgrading one) and to carry it in its local version:
   ``ferrotorch-0.1.0+torch2.15.0``, the way PyTorch extensions publish a wheel per torch.

Example (pyproject.toml)::

    [build-system]
    requires = ["maturin>=1.5,<2"]
    build-backend = "ferrotorch_backend"
    backend-path = ["build_backend"]
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

# Keep equal to SUPPORTED_TORCH in build.rs (tests/test_packaging.py checks): the torch
# releases src/shim/torch_compat.h adapts tch 0.26's C++ to.
SUPPORTED = (2, range(11, 16))
SUPPORTED_SPEC = f"torch>={SUPPORTED[0]}.{SUPPORTED[1].start},<{SUPPORTED[0]}.{SUPPORTED[1].stop}"

_PROBE = (
    "import json, os, sys, torch; print(json.dumps({'version': torch.__version__, "
    "'dir': os.path.dirname(torch.__file__), 'python': '%d%d' % sys.version_info[:2]}))"
)
_FIND = (
    "import importlib.metadata as m\n"
    "try: print(m.version('torch'))\n"
    "except m.PackageNotFoundError: pass\n"
)


def _public(version: str) -> str:
    return version.split("+")[0]


def _supported(version: str) -> bool:
    parts = re.match(r"(\d+)\.(\d+)\.", _public(version) + ".")
    return bool(parts) and int(parts[1]) == SUPPORTED[0] and int(parts[2]) in SUPPORTED[1]


def _installed_torch() -> str | None:
    """The torch version in the environment pip installs into (not pip's build overlay)."""
    out = subprocess.run(
        [sys.executable, "-I", "-c", _FIND], capture_output=True, text=True, check=True
    )
    return out.stdout.strip() or None


def _target_torch() -> str | None:
    """The installed torch if the build should use it; raises for an unsupported one."""
    found = _installed_torch()
    if found is None:
        return None
    if not _supported(found):
        raise RuntimeError(
            f"ferrotorch builds against torch {SUPPORTED_SPEC[len('torch'):]}, but this "
            f"environment has torch {found}. ferrotorch never replaces an installed torch: "
            f"install a supported one first, e.g. pip install '{SUPPORTED_SPEC}'."
        )
    return found


def _probe(isolated: bool) -> dict:
    import json

    args = [sys.executable, "-I", "-c", _PROBE] if isolated else [sys.executable, "-c", _PROBE]
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"could not import torch to build against: {out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _python_shims(directory: Path) -> None:
    """`python`/`python3` that run the target interpreter (torch-sys and build.rs call them)."""
    for name in ("python", "python3"):
        shim = directory / name
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        shim.chmod(shim.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _build(build, directory: str, *args) -> str:
    use_installed = _target_torch() is not None
    torch = _probe(isolated=use_installed)
    saved = dict(os.environ)
    try:
        if use_installed:
            # Out of pip's isolation: its PYTHONPATH overlay hides the user's packages.
            os.environ.pop("PYTHONPATH", None)
        root = Path(__file__).resolve().parent.parent
        target = os.environ.setdefault(
            "CARGO_TARGET_DIR",
            str(root / "target" / f"torch-{_public(torch['version'])}-cp{torch['python']}"),
        )
        # torch-sys runs `python` or `python3` from PATH: make both this interpreter (in a
        # fixed place, so a rebuild sees the same PATH and cargo reuses what it built).
        shims = Path(target) / "python-shims"
        shims.mkdir(parents=True, exist_ok=True)
        _python_shims(shims)
        os.environ["PATH"] = str(shims) + os.pathsep + os.environ.get("PATH", "")
        os.environ["PYO3_PYTHON"] = sys.executable
        # torch-sys re-runs its build script when this changes (any value enables it).
        os.environ["LIBTORCH_USE_PYTORCH"] = f"{torch['version']} {torch['dir']}"
        name = build(directory, *args)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return retag(Path(directory) / name, _public(torch["version"])).name


def retag(wheel: Path, torch_version: str) -> Path:
    """Rewrites a ferrotorch wheel to require torch==torch_version and to say so in its version."""
    m = re.match(r"(?P<name>[^-]+)-(?P<version>[^-]+)-(?P<rest>.+)\.whl$", wheel.name)
    if m is None:
        raise ValueError(f"not a wheel file name: {wheel.name}")
    name, version = m["name"], m["version"]
    new_version = f"{_public(version)}+torch{torch_version}"
    old_info, new_info = f"{name}-{version}.dist-info/", f"{name}-{new_version}.dist-info/"
    target = wheel.with_name(f"{name}-{new_version}-{m['rest']}.whl")
    with zipfile.ZipFile(wheel) as src:
        entries = [(i, src.read(i)) for i in src.infolist()]
    records = []
    tmp = target.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info, data in entries:
            path = info.filename
            if path.startswith(old_info):
                path = new_info + path[len(old_info):]
            if path == new_info + "RECORD":
                continue
            if path == new_info + "METADATA":
                data = _metadata(data.decode(), new_version, torch_version).encode()
            out = zipfile.ZipInfo(path, info.date_time)
            out.external_attr, out.compress_type = info.external_attr, zipfile.ZIP_DEFLATED
            dst.writestr(out, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            records.append(f"{path},sha256={digest.decode()},{len(data)}")
        records.append(f"{new_info}RECORD,,")
        dst.writestr(new_info + "RECORD", "\n".join(records) + "\n")
    wheel.unlink()
    tmp.replace(target)
    return target


def _metadata(text: str, version: str, torch_version: str) -> str:
    text = re.sub(r"(?m)^Version: .*$", f"Version: {version}", text, count=1)
    # The unconditional torch requirement becomes exact; extras keep their markers.
    return re.sub(
        r"(?m)^Requires-Dist: torch\b[^;\n]*$", f"Requires-Dist: torch=={torch_version}", text
    )


# maturin is imported where it is used, so this module (and its tests) load without it.
def get_requires_for_build_wheel(config_settings=None):
    installed = _target_torch()  # first: an unsupported torch stops the build right here
    import maturin

    needs = list(maturin.get_requires_for_build_wheel(config_settings))
    return needs if installed is not None else needs + [SUPPORTED_SPEC]


def get_requires_for_build_editable(config_settings=None):
    return get_requires_for_build_wheel(config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    # No prepare_metadata_for_build_wheel: the metadata depends on the build, so pip takes it
    # from this wheel (and reuses the wheel rather than building twice).
    import maturin

    return _build(maturin.build_wheel, wheel_directory, config_settings)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    import maturin

    return _build(maturin.build_editable, wheel_directory, config_settings)


def get_requires_for_build_sdist(config_settings=None):
    import maturin

    return maturin.get_requires_for_build_sdist(config_settings)


def build_sdist(sdist_directory, config_settings=None):
    import maturin

    return maturin.build_sdist(sdist_directory, config_settings)

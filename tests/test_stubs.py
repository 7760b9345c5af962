"""The hand-written stub of the extension matches what the extension exports."""

from __future__ import annotations

import ast
from pathlib import Path

import ferrotorch
from ferrotorch import _native


def stub_names() -> tuple[set[str], dict[str, set[str]]]:
    stub = Path(ferrotorch.__file__).with_name("_native.pyi")
    tree = ast.parse(stub.read_text())
    top: set[str] = set()
    members: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            top.add(node.name)
            members[node.name] = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
        elif isinstance(node, ast.FunctionDef):
            top.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            top.add(node.target.id)
    return top, members


def test_stub_lists_exactly_the_public_names():
    top, _ = stub_names()
    public = {n for n in dir(_native) if not n.startswith("_") or n == "__version__"}
    assert top == public


def test_stub_methods_exist_on_classes():
    _, members = stub_names()
    for cls_name, methods in members.items():
        cls = getattr(_native, cls_name)
        for m in methods:
            assert hasattr(cls, m), f"{cls_name}.{m} is in the stub but not in the extension"
        inherited = {n for base in cls.__mro__[1:] for n in vars(base)}
        public = {n for n in vars(cls) if not n.startswith("_") and n not in inherited}
        assert public <= methods, f"{cls_name} exports {public - methods} missing from the stub"


def test_package_is_typed():
    assert Path(ferrotorch.__file__).with_name("py.typed").exists()


def test_mypy_stubtest_agrees_with_the_extension():
    """mypy's stubtest imports the extension and checks every name and signature."""
    import subprocess
    import sys

    import pytest

    pytest.importorskip("mypy")
    out = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "--ignore-disjoint-bases", "ferrotorch._native"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr

"""``FERROTORCH_CPU_CAPABILITY`` / torch's ``ATEN_CPU_CAPABILITY`` cap the SIMD kernels
ferrotorch runs (so AVX2 figures can be measured on an AVX-512 machine), and every level
gives the same numbers: Adam, Adafactor, LBFGS's two-loop recursion and the ViT kernels bit
for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ferrotorch import _native

PROBE = r"""
import json, torch, ferrotorch, ferrotorch.optim as fopt
from ferrotorch import _native
torch.manual_seed(0)
out = {"ours": _native.cpu_capability(), "torch": torch.backends.cpu.get_cpu_capability()}
ps = [torch.nn.Parameter(torch.randn(300, 37)), torch.nn.Parameter(torch.randn(1000))]
for name in ("Adam", "Adafactor"):
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    opt = getattr(fopt, name)(qs, lr=1e-2)
    for i in range(3):
        for q in qs:
            q.grad = torch.sin(q.detach() * (i + 1))
        opt.step()
    out[name] = [q.detach().double().sum().item() for q in qs] + [float(q.detach().view(torch.int32).sum()) for q in qs]
g = torch.randn(1001)
pairs = [(torch.randn(1001), torch.randn(1001)) for _ in range(5)]
al, d = torch.zeros(5), torch.zeros(1001)
assert _native.lbfgs_two_loop(g, [y for y, _ in pairs], [s for _, s in pairs], [torch.tensor(0.3)] * 5, torch.tensor(0.7), al, d)
out["LBFGS"] = d.double().tolist() + al.double().tolist()
print(json.dumps(out))
"""


def _probe(**env: str) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("FERROTORCH_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY")}
    e.update(env)
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=e, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_capability_is_reported():
    assert _native.cpu_capability() in ("avx512", "avx2", "default")


@pytest.mark.skipif(_native.cpu_capability() == "default", reason="no AVX2 on this CPU")
def test_one_switch_caps_torch_and_ferrotorch_and_the_numbers_do_not_change():
    native = _probe()
    avx2 = _probe(ATEN_CPU_CAPABILITY="avx2")
    base = _probe(FERROTORCH_CPU_CAPABILITY="default")
    assert avx2["ours"] == "avx2" and avx2["torch"] == "AVX2"
    assert base["ours"] == "default"
    for name in ("Adam", "Adafactor", "LBFGS"):
        assert native[name] == avx2[name] == base[name], name

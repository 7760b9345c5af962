"""Clip-and-step: torch's clip_grad_norm_ + fused step vs ferrotorch's fused
clip_grad_norm_and_step, in one run.

    python benchmarks/bench_clip.py [--png chart.png]

Layout a (64 x 262,144 fp32). Ratio = torch time / ferrotorch time (higher is better).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import ferrotorch.optim as fopt
from ferrotorch.nn.utils import clip_grad_norm_ as ft_clip
from _common import machine as _machine
from _common import chart

LAYOUT = (64, 262_144)


def params():
    g = torch.Generator().manual_seed(0)
    ps = []
    for _ in range(LAYOUT[0]):
        p = torch.randn(LAYOUT[1], generator=g).requires_grad_()
        p.grad = torch.randn(LAYOUT[1], generator=g)
        ps.append(p)
    return ps


def timed(fn, steps=5, repeats=7) -> float:
    for _ in range(2):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        out.append((time.perf_counter() - t0) / steps * 1e3)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--png")
    args = ap.parse_args()
    print(_machine())
    print(f"torch {torch.__version__}: ms per clip+step, layout a; ratio = torch / ferrotorch")
    print(f"{'optimizer':<8} {'thr':>3} | {'torch clip+fused':>16} {'ferro clip_ then step':>21} {'ferro fused':>11} | {'ratio':>6}")
    rows = []
    for name in ("Adam", "AdamW", "SGD"):
        kw = {"lr": 1e-3, "momentum": 0.9} if name == "SGD" else {"lr": 1e-3}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            ps = params()
            ref = getattr(torch.optim, name)(ps, fused=True, **kw)
            t_torch = timed(lambda: (torch.nn.utils.clip_grad_norm_(ps, 1.0), ref.step()))
            del ref, ps
            ps = params()
            ours = getattr(fopt, name)(ps, **kw)
            t_sep = timed(lambda: (ft_clip(ps, 1.0), ours.step()))
            t_fused = timed(lambda: ours.clip_grad_norm_and_step(1.0))
            del ours, ps
            rows.append((f"{name} {threads}t", t_torch / t_fused))
            print(f"{name:<8} {threads:>3} | {t_torch:16.2f} {t_sep:21.2f} {t_fused:11.2f} | {t_torch / t_fused:6.2f}", flush=True)
    if args.png:
        chart(rows, args.png, "clip+step speed-up vs torch (higher is better)")


if __name__ == "__main__":
    main()

"""Muon step time: ferrotorch vs torch.optim.Muon, one run.

    python benchmarks/bench_muon.py            # ~1 min on 2 cores
    python benchmarks/bench_muon.py --quick

Both run the same ATen ops (the Newton–Schulz matmuls in bf16, as torch does), so the
numbers are identical and the difference is the ~20 Python op dispatches per parameter that
ferrotorch makes from C++. Each cell is the median ms per ``step()``, torch and ferrotorch
timed alternately; the ratio is torch's time / ferrotorch's.
"""

from __future__ import annotations

import time

import torch

import ferrotorch.optim as fopt
from _common import alternate, peer_args

#: The 2-D weights of models our users train (Muon steps matrices only).
CASES = {
    "LeNet-5 fc (3 mats)": [(120, 400), (84, 120), (10, 84)],
    "ViT-tiny, 6 blocks (24 mats)": [(576, 192), (192, 192), (384, 192), (192, 384)] * 6,
    "MLP 1024 (4 mats)": [(1024, 1024)] * 4,
}


def build(cls: type, shapes: list[tuple[int, int]]) -> torch.optim.Optimizer:
    g = torch.Generator().manual_seed(0)
    params = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=g))
        p.grad = torch.randn(s, generator=g)
        params.append(p)
    opt = cls(params, lr=0.02)
    for _ in range(2):
        opt.step()
    return opt


def timed(opt: torch.optim.Optimizer, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - t0) / steps * 1e3


def main() -> None:
    args, repeats = peer_args(__doc__)
    print(f"{'case':>30} {'thr':>3} {'torch ms':>9} {'ours ms':>8} {'ratio':>6}")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for name, shapes in CASES.items():
            theirs, ours = build(torch.optim.Muon, shapes), build(fopt.Muon, shapes)
            steps = 3 if max(r * c for r, c in shapes) > 500_000 else 10
            t_ms, f_ms = alternate(lambda: timed(theirs, steps), lambda: timed(ours, steps), repeats)
            print(f"{name:>30} {threads:>3} {t_ms:>9.3f} {f_ms:>8.3f} {t_ms / f_ms:>5.2f}x")

if __name__ == "__main__":
    main()

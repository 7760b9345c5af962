"""Per-step overhead of ``scheduler.step()``: ferrotorch vs torch.optim.lr_scheduler, one run.

    python benchmarks/bench_sched.py

Each cell is the median µs per ``step()`` (the optimizer is not stepped), for 1 and 100
param groups; ratio = torch / ferrotorch (higher is better for ferrotorch).
"""

from __future__ import annotations

import statistics
import time
import warnings

import torch
from torch.optim import lr_scheduler as tls
from torch.optim import swa_utils as tswa

from ferrotorch.optim import lr_scheduler as fls
from ferrotorch.optim import swa_utils as fswa
from _common import machine as _machine
from _common import chart, progress

CASES = {
    "StepLR": lambda m, o: m.StepLR(o, step_size=30, gamma=0.5),
    "MultiStepLR": lambda m, o: m.MultiStepLR(o, [100, 200, 300], 0.5),
    "ExponentialLR": lambda m, o: m.ExponentialLR(o, 0.999),
    "CosineAnnealingLR": lambda m, o: m.CosineAnnealingLR(o, T_max=10_000),
    "LinearLR": lambda m, o: m.LinearLR(o, 0.1, total_iters=10_000),
    "CyclicLR": lambda m, o: m.CyclicLR(o, 0.01, 0.1, step_size_up=500),
    "OneCycleLR": lambda m, o: m.OneCycleLR(o, 0.1, total_steps=100_000),
    "CosineAnnealingWarmRestarts": lambda m, o: m.CosineAnnealingWarmRestarts(o, T_0=100),
    "ReduceLROnPlateau": lambda m, o: m.ReduceLROnPlateau(o, patience=3),
    "SWALR": lambda m, o: (fswa if m is fls else tswa).SWALR(o, swa_lr=0.05, anneal_epochs=1000),
}


def bench(mod, name: str, groups: int, steps: int = 2000, repeats: int = 7) -> float:
    opt = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)]} for _ in range(groups)], lr=0.1, momentum=0.9)
    sched = CASES[name](mod, opt)
    plateau = name == "ReduceLROnPlateau"
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(steps):
            if plateau:
                sched.step(1.0)
            else:
                sched.step()
        samples.append((time.perf_counter() - t0) / steps * 1e6)
    return statistics.median(samples)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--png", help="also write a bar chart of the ratios to this PNG file (needs matplotlib)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    print(_machine())
    print(f"torch {torch.__version__}: µs per scheduler.step() (median of 7 x 2000 steps); ratio = torch / ferrotorch")
    print(f"{'scheduler':<28} {'groups':>6} | {'torch':>8} {'ferro':>8} | {'ratio':>6}")
    print("-" * 66)
    bar = progress(2 * len(CASES), args.no_progress)
    rows = []
    for name in CASES:
        for groups in (1, 100):
            t, f = bench(tls, name, groups), bench(fls, name, groups)
            bar.update(1)
            rows.append((f"{name} x{groups}", t / f))
            print(f"{name:<28} {groups:>6} | {t:8.2f} {f:8.2f} | {t / f:6.2f}", flush=True)
    bar.close()
    if args.png:
        chart(rows, args.png, "speed-up vs torch (higher is better)")


if __name__ == "__main__":
    main()

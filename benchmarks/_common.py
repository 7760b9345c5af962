"""Shared by the benchmark scripts: a tqdm progress bar and a PNG bar chart."""

from __future__ import annotations

import sys
from collections.abc import Callable


class NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: int, disabled: bool):
    """A tqdm bar on stderr (the table stays clean on stdout)."""
    if disabled:
        return NoProgress()
    try:
        from tqdm import tqdm
    except ImportError:
        return NoProgress()
    return tqdm(total=total, desc="benchmarking", unit="cell", leave=False, file=sys.stderr)


def chart(rows: list[tuple[str, float]], path: str, xlabel: str = "speed-up vs torch fused (higher is better)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 0.3 * len(rows) + 1.5))
    labels = [r[0] for r in rows]
    ratios = [r[1] for r in rows]
    ax.barh(labels, ratios, color=["tab:green" if x >= 1 else "tab:red" for x in ratios])
    ax.axvline(1.0, color="black", lw=1)
    ax.set_xlabel(xlabel)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"chart written to {path}")


def peer_args(doc: str | None):
    """The command line of a one-optimizer benchmark against its torch twin (``--quick``,
    ``--threads``); prints the header (CPU, kernels, torch) and returns ``(args, repeats)``."""
    import argparse

    import torch

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 repeats instead of 7")
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args()
    print(machine())
    print(f"torch {torch.__version__}")
    return args, 3 if args.quick else 7


def alternate(theirs: Callable[[], float], ours: Callable[[], float], repeats: int) -> tuple[float, float]:
    """Median of ``repeats`` timings each, taken alternately so load changes hit both alike."""
    import statistics

    t, f = [], []
    for _ in range(repeats):
        t.append(theirs())
        f.append(ours())
    return statistics.median(t), statistics.median(f)


def machine() -> str:
    """The CPU and the SIMD kernels both libraries run, for every figure's header."""
    import torch

    from ferrotorch import _native

    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    import platform

    name = name or platform.processor() or platform.machine()
    return f"{name} · torch kernels {torch.backends.cpu.get_cpu_capability()} · ferrotorch kernels {_native.cpu_capability()}"

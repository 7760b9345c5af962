"""SparseAdam step time: ferrotorch vs torch.optim.SparseAdam, one run.

    python benchmarks/bench_sparse_adam.py            # ~30 s on 2 cores
    python benchmarks/bench_sparse_adam.py --quick

An ``nn.Embedding(rows, dim, sparse=True)`` weight with the gradient an embedding lookup of
``batch`` random token ids gives (uncoalesced, repeated ids summed by the step's coalesce).
Each cell is the median ms per ``step()``; the ratio is torch's time / ferrotorch's.
"""

from __future__ import annotations

import statistics
import time

import torch

import ferrotorch.optim as fopt
from _common import peer_args

CASES = [(100_000, 128, 512), (100_000, 128, 8192), (20_000, 512, 4096)]


def grad_for(weight: torch.Tensor, batch: int, g: torch.Generator) -> torch.Tensor:
    ids = torch.randint(0, weight.shape[0], (batch,), generator=g)
    emb = torch.nn.functional.embedding(ids, weight, sparse=True)
    (grad,) = torch.autograd.grad(emb.sum() * 0.01, weight)
    return grad


def time_opt(cls: type, rows: int, dim: int, batch: int, repeats: int, steps: int = 20) -> float:
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(rows, dim, generator=g))
    grads = [grad_for(w, batch, g) for _ in range(4)]
    opt = cls([w], lr=1e-3)
    for i in range(3):
        w.grad = grads[i % 4]
        opt.step()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(steps):
            w.grad = grads[i % 4]
            opt.step()
        samples.append((time.perf_counter() - t0) / steps * 1e3)
    return statistics.median(samples)


def main() -> None:
    args, repeats = peer_args(__doc__)
    print(f"{'rows x dim':>14} {'batch':>6} {'thr':>3} {'torch ms':>9} {'ours ms':>8} {'ratio':>6}")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for rows, dim, batch in CASES:
            t = time_opt(torch.optim.SparseAdam, rows, dim, batch, repeats)
            f = time_opt(fopt.SparseAdam, rows, dim, batch, repeats)
            print(f"{rows:>7} x {dim:<4} {batch:>6} {threads:>3} {t:>9.3f} {f:>8.3f} {t / f:>5.2f}x")


if __name__ == "__main__":
    main()

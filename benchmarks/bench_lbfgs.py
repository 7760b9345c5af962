"""LBFGS step time: ferrotorch vs torch.optim.LBFGS, one run.

    python benchmarks/bench_lbfgs.py            # ~1 min on 2 cores
    python benchmarks/bench_lbfgs.py --quick

Each case is one ``step(closure)`` of up to 20 iterations with ``history_size=100`` (torch's
defaults), with and without the strong-Wolfe line search, started from the same point after
a warm-up step (so the history is full). The closure is part of both times. Each cell is the
median ms per step, torch and ferrotorch timed alternately; the ratio is torch's time /
ferrotorch's.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

import ferrotorch.optim as fopt
from _common import alternate, peer_args


def mlp_fit(width: int) -> Callable[[], tuple[list[torch.Tensor], Callable[[torch.optim.Optimizer], Callable[[], torch.Tensor]]]]:
    """A small regression MLP (a PINN-sized problem): 2 hidden layers of ``width``."""

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(4, width), torch.nn.Tanh(), torch.nn.Linear(width, width), torch.nn.Tanh(), torch.nn.Linear(width, 1)
        )
        x = torch.randn(512, 4)
        y = torch.sin(x).sum(1, keepdim=True)

        def closure_for(opt):
            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss

            return closure

        return list(model.parameters()), closure_for

    return make


def image_fit(side: int) -> Callable[[], tuple[list[torch.Tensor], Callable[[torch.optim.Optimizer], Callable[[], torch.Tensor]]]]:
    """An image as the parameter (style-transfer shaped): a smoothness + data loss."""

    def make():
        torch.manual_seed(0)
        img = torch.nn.Parameter(torch.rand(1, 3, side, side))
        target = torch.rand(1, 3, side, side)

        def closure_for(opt):
            def closure():
                opt.zero_grad()
                tv = (img[..., 1:, :] - img[..., :-1, :]).square().mean() + (img[..., 1:] - img[..., :-1]).square().mean()
                loss = (img - target).square().mean() + 0.1 * tv
                loss.backward()
                return loss

            return closure

        return [img], closure_for

    return make


CASES = {
    "MLP 4-32-32-1 (1.2k params)": mlp_fit(32),
    "MLP 4-256-256-1 (67k params)": mlp_fit(256),
    "image 3x128x128 (49k params)": image_fit(128),
    "image 3x512x512 (786k params)": image_fit(512),
}


def timed(cls: type, make, line_search: str | None) -> float:
    """ms of one ``step(closure)`` from the point (and history) after a warm-up step."""
    params, closure_for = make()
    opt = cls(params, line_search_fn=line_search)
    closure = closure_for(opt)
    opt.step(closure)  # fills the history
    t0 = time.perf_counter()
    opt.step(closure)
    return (time.perf_counter() - t0) * 1e3


def main() -> None:
    args, repeats = peer_args(__doc__)
    print(f"{'case':>30} {'line search':>12} {'thr':>3} {'torch ms':>9} {'ours ms':>8} {'ratio':>6}")
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for name, make in CASES.items():
            for ls in (None, "strong_wolfe"):
                tm, fm = alternate(lambda: timed(torch.optim.LBFGS, make, ls), lambda: timed(fopt.LBFGS, make, ls), repeats)
                print(f"{name:>30} {str(ls):>12} {threads:>3} {tm:>9.2f} {fm:>8.2f} {tm / fm:>5.2f}x")

if __name__ == "__main__":
    main()

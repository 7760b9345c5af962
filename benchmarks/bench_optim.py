"""Optimizer step time: ferrotorch vs torch.optim (for-loop, foreach, fused), one run.

    python benchmarks/bench_optim.py                  # full table (a few minutes on 2 cores)
    python benchmarks/bench_optim.py --quick          # fewer repeats

Layouts: a = 64 tensors x 262,144 elements, b = 2000 tensors x 1000 elements. Each cell is
the median ms per ``step()`` over several timed runs of a few steps. The implementations of a
row are timed in turns (one run each per repeat), so a busy machine's slow spells hit them
alike, and each run starts with the caches holding another implementation's tensors, as a
training step's optimizer call starts after the backward pass. Ratios are torch's time
divided by ferrotorch's (higher is better for ferrotorch); "x best" compares with torch's fastest
implementation (fused where torch has one, else foreach). Rows whose implementation leaves bf16
parameters unchanged after a step are flagged: torch 2.13's fused SGD skips bf16 updates.

The roofline columns: "GB/s" is the memory traffic ferrotorch's step must make (each element of
the parameter, grad and per-element state read once, and the parameter and state written once:
``ACCESSES`` below) over its time; "% roof" compares it with the best of STREAM-style copy,
triad and in-place axpy loops (torch's kernels) timed in the same run, at the same thread
count, on arrays as large as the layout (so both meet the same caches); their GB/s are
printed once per layout, thread count and dtype. A memory-bound step near 100% is at the
machine's roofline.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

import ferrotorch.optim as fopt
from _common import machine as _machine
from _common import chart as _chart
from _common import progress as _progress

LAYOUTS = {"a": (64, 262_144), "b": (2000, 1000)}
CONFIGS = {
    "Adam": (torch.optim.Adam, fopt.Adam, dict(lr=1e-3)),
    "AdamW": (torch.optim.AdamW, fopt.AdamW, dict(lr=1e-3, weight_decay=1e-2)),
    "SGD(momentum)": (torch.optim.SGD, fopt.SGD, dict(lr=1e-2, momentum=0.9)),
    "SGD(nesterov)": (torch.optim.SGD, fopt.SGD, dict(lr=1e-2, momentum=0.9, nesterov=True)),
    "RMSprop": (torch.optim.RMSprop, fopt.RMSprop, dict(lr=1e-2)),
    "Adagrad": (torch.optim.Adagrad, fopt.Adagrad, dict(lr=1e-2)),
    "Adamax": (torch.optim.Adamax, fopt.Adamax, dict(lr=2e-3)),
    "RAdam": (torch.optim.RAdam, fopt.RAdam, dict(lr=1e-3)),
    "NAdam": (torch.optim.NAdam, fopt.NAdam, dict(lr=2e-3)),
    "Adadelta": (torch.optim.Adadelta, fopt.Adadelta, dict(lr=1.0)),
    "ASGD": (torch.optim.ASGD, fopt.ASGD, dict(lr=1e-2)),
    "Rprop": (torch.optim.Rprop, fopt.Rprop, dict(lr=1e-2)),
    "Adafactor": (torch.optim.Adafactor, fopt.Adafactor, dict(lr=1e-2)),
}
#: Tensors of the size of the parameters a step reads or writes, counting one read and one
#: write of the same tensor as two (default options: no amsgrad, momentum, centering).
ACCESSES = {
    "Adam": 7, "AdamW": 7,  # p rw, grad r, exp_avg rw, exp_avg_sq rw
    "SGD(momentum)": 5, "SGD(nesterov)": 5,  # p rw, grad r, momentum_buffer rw
    "RMSprop": 5, "Adagrad": 5,  # p rw, grad r, square_avg / sum rw
    "Adamax": 7, "RAdam": 7, "NAdam": 7, "Adadelta": 7, "Rprop": 7,  # two state tensors
    "ASGD": 5,  # p rw, grad r, ax rw
    "Adafactor": 3,  # p rw, grad r (the factored state is rows + cols)
}
#: torch.optim classes with a fused CPU kernel (torch 2.13).
FUSED = {"Adam", "AdamW", "SGD(momentum)", "SGD(nesterov)", "Adagrad"}


def make(layout: str, dtype: torch.dtype) -> list[torch.Tensor]:
    n, size = LAYOUTS[layout]
    g = torch.Generator().manual_seed(0)
    params = []
    for _ in range(n):
        p = torch.randn(size, generator=g).to(dtype).requires_grad_()
        p.grad = torch.randn(size, generator=g).to(dtype)
        params.append(p)
    return params


def time_in_turns(opts: dict[str, torch.optim.Optimizer], steps: dict[str, int], repeats: int) -> dict[str, float]:
    """Median ms per ``step()`` of each optimizer, timed in turns: every repeat times each
    one once (``steps[name]`` steps), so a slow spell of a busy machine hits all of them
    alike instead of whichever happened to run then."""
    for opt in opts.values():
        for _ in range(3):
            opt.step()
    samples: dict[str, list[float]] = {name: [] for name in opts}
    for _ in range(repeats):
        for name, opt in opts.items():
            t0 = time.perf_counter()
            for _ in range(steps[name]):
                opt.step()
            samples[name].append((time.perf_counter() - t0) / steps[name] * 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


def stream_gbps(numel: int, dtype: torch.dtype, threads: int, repeats: int) -> dict[str, float]:
    """STREAM-style bandwidths over arrays of ``numel`` elements, in GB/s counting each
    element read or written once: copy ``a = b``, triad ``a = b + s * c`` and the in-place
    axpy ``a += s * c`` (the access pattern of an optimizer step: no write-allocate reads).
    Torch's kernels at ``threads`` threads, median of ``repeats`` timed runs of 5."""
    torch.set_num_threads(threads)
    b, c = torch.rand(numel, dtype=dtype), torch.rand(numel, dtype=dtype)
    a = torch.empty_like(b)
    kernels = {
        "copy": (2, lambda: a.copy_(b)),
        "triad": (3, lambda: torch.add(b, c, alpha=0.5, out=a)),
        "axpy": (3, lambda: a.add_(c, alpha=1e-3)),
    }
    out = {}
    for name, (arrays, run) in kernels.items():
        for _ in range(3):
            run()
        samples = []
        for _ in range(max(repeats, 5)):
            t0 = time.perf_counter()
            for _ in range(5):
                run()
            samples.append((time.perf_counter() - t0) / 5)
        out[name] = arrays * numel * a.element_size() / statistics.median(samples) / 1e9
    return out


def bench(name: str, layout: str, dtype: torch.dtype, threads: int, repeats: int) -> dict[str, float | str]:
    torch_cls, ours_cls, kw = CONFIGS[name]
    impls = {
        "torch loop": lambda ps: torch_cls(ps, foreach=False, **kw),
        "torch foreach": lambda ps: torch_cls(ps, foreach=True, **kw),
        "torch fused": lambda ps: torch_cls(ps, fused=True, **kw),
        "ferrotorch": lambda ps: ours_cls(ps, **kw),
    }
    if name not in FUSED:
        del impls["torch fused"]
    torch.set_num_threads(threads)
    row: dict[str, float | str] = {}
    opts, params, before = {}, {}, {}
    for impl, build in impls.items():
        params[impl] = make(layout, dtype)
        before[impl] = params[impl][0].detach().clone()
        opts[impl] = build(params[impl])
    steps = {impl: 2 if impl == "torch loop" and layout == "a" else 5 for impl in impls}
    row.update(time_in_turns(opts, steps, repeats))
    for impl in impls:
        if torch.equal(params[impl][0].detach(), before[impl]):
            row[impl + " note"] = "no update!"
    del opts, params
    gc.collect()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 repeats instead of 7")
    ap.add_argument("--layouts", default="a,b")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--optimizers", default=",".join(CONFIGS))
    ap.add_argument("--png", help="also write a bar chart of the ratios to this PNG file (needs matplotlib)")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = ap.parse_args()
    repeats = 3 if args.quick else 7
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    print(_machine())
    print(f"torch {torch.__version__}, ms per step (median of {repeats}); x best = torch's fastest (fused, else foreach) / ferrotorch")
    names = {n.lower(): n for n in CONFIGS}
    wanted = []
    for n in args.optimizers.split(","):
        if n.strip().lower() not in names:
            ap.error(f"unknown optimizer {n!r}; choose from {', '.join(CONFIGS)}")
        wanted.append(names[n.strip().lower()])
    for d in args.dtypes.split(","):
        if d not in dtypes:
            ap.error(f"unknown dtype {d!r}; choose from {', '.join(dtypes)}")
    for lay in args.layouts.split(","):
        if lay not in LAYOUTS:
            ap.error(f"unknown layout {lay!r}; choose from {', '.join(LAYOUTS)}")
    head = (
        f"{'optimizer':<14} {'lay':>3} {'thr':>3} {'dtype':>5} | {'loop':>8} {'foreach':>8} {'fused':>8} {'ferro':>8} | "
        f"{'x loop':>6} {'x fe':>6} {'x best':>7} | {'GB/s':>6} {'% roof':>7}"
    )
    print(head)
    print("-" * len(head))
    cells = [
        (layout, threads, dname, name)
        for layout in args.layouts.split(",")
        for threads in map(int, args.threads.split(","))
        for dname in args.dtypes.split(",")
        for name in wanted
    ]
    roof: dict[tuple[str, int, str], float] = {}
    progress = _progress(len(cells), args.no_progress)
    rows = []
    for layout, threads, dname, name in cells:
        r = bench(name, layout, dtypes[dname], threads, repeats)
        progress.update(1)
        best = min(r[k] for k in ("torch foreach", "torch fused") if k in r)
        rows.append((f"{name} {layout}/{threads}t/{dname}", best / r["ferrotorch"]))
        notes = " ".join(f"[{k[:-5]}: {v}]" for k, v in r.items() if k.endswith("note"))
        ours = r["ferrotorch"]
        fused = f"{r['torch fused']:8.2f}" if "torch fused" in r else f"{'-':>8}"
        numel = LAYOUTS[layout][0] * LAYOUTS[layout][1]
        if (layout, threads, dname) not in roof:
            bw = stream_gbps(numel, dtypes[dname], threads, repeats)
            roof[layout, threads, dname] = max(bw.values())
            print(f"  (layout {layout}, {threads} thread(s), {dname}: " + ", ".join(f"{k} {v:.1f}" for k, v in bw.items()) + " GB/s)")
        gbps = ACCESSES[name] * numel * dtypes[dname].itemsize / (ours / 1e3) / 1e9
        print(
            f"{name:<14} {layout:>3} {threads:>3} {dname:>5} | {r['torch loop']:8.2f} {r['torch foreach']:8.2f} "
            f"{fused} {ours:8.2f} | {r['torch loop'] / ours:6.2f} {r['torch foreach'] / ours:6.2f} "
            f"{best / ours:7.2f} | {gbps:6.1f} {100 * gbps / roof[layout, threads, dname]:6.0f}% {notes}",
            flush=True,
        )
    progress.close()
    if args.png:
        _chart(rows, args.png)


if __name__ == "__main__":
    main()

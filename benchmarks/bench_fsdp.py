"""Optimizer step time under FSDP2 (`fully_shard`, DTensor params) on two gloo processes.

    python benchmarks/bench_fsdp.py [--layers 8] [--dim 1024]

Prints, for rank 0, the median time of `opt.step()` alone (grads fixed) for torch.optim's
AdamW (single-tensor and foreach) and ferrotorch's AdamW, and the ratios, all measured in
one run with the implementations taking turns.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, port: int, layers: int, dim: int, repeats: int) -> None:
    from torch.distributed.fsdp import fully_shard

    import ferrotorch.optim as fopt

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    impls = {
        "torch AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False),
        "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "ferrotorch AdamW": lambda ps: fopt.AdamW(ps, lr=1e-3),
    }
    opts = {}
    for name, make in impls.items():
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(dim, dim) for _ in range(layers)])
        for m in model:
            fully_shard(m)
        fully_shard(model)
        model(torch.randn(4, dim)).sum().backward()
        opts[name] = make(list(model.parameters()))
        opts[name].step()
    times = {n: [] for n in impls}
    for _ in range(repeats):
        for name, opt in opts.items():
            dist.barrier()
            t = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t)
    if rank == 0:
        n_params = sum(p.numel() for p in opts["ferrotorch AdamW"].param_groups[0]["params"])
        print(f"FSDP2, 2 gloo processes, 1 thread each, {layers} x Linear({dim}, {dim}) = {n_params / 1e6:.1f} M params")
        base = statistics.median(times["torch AdamW"])
        for name, ts in times.items():
            m = statistics.median(ts)
            print(f"{name:<22} {m * 1e3:8.2f} ms   x{base / m:5.2f} vs torch AdamW")
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, args.layers, args.dim, args.repeats), nprocs=2)


if __name__ == "__main__":
    main()

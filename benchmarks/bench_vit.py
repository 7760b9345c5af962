"""ViT training step, inference and peak memory: ferrotorch.nn.ViT vs vit-pytorch, timm and
torch.compile, measured in one run.

    python benchmarks/bench_vit.py [--batch 64] [--threads 2] [--no-compile]

Configuration of issue #4: 32x32x3 images, patch 4, dim 256, depth 6, heads 8, dim_head 32,
mlp 512, 10 classes, fp32. A training step is forward + cross-entropy + backward; inference
is one no-grad forward in eval mode. Times are medians over --repeats runs. Each model lives
in a worker process of its own (as it would in a user's script: one model cannot change the
heap, page faults or caches another one sees) and the workers take turns, one timed call
each per repeat, so a slow spell of this shared machine hits all of them. "peak MB" is the
growth of the process's RSS during two training steps over its RSS after a warm-up step,
each model in a fresh subprocess (so one model's memory cannot hide another's) with glibc's
mmap threshold at 64 KB (so freed tensors leave RSS and the figure tracks live memory). Ratios are vit-pytorch / other (higher is better for the other).

Then the seed-000 step (the users' CIFAR-10 loop): the same ViT with dropout 0.1 and
emb_dropout 0.1, batch 128, a whole optimizer step (zero_grad, forward, cross-entropy,
backward, AdamW(lr=1e-4, weight_decay=1e-4).step()): ferrotorch.nn.ViT + ferrotorch.optim
against vit-pytorch + torch.optim (its default implementation), in worker processes taking
turns in the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from _common import machine as _machine

CFG = dict(image_size=32, patch_size=4, num_classes=10, dim=256, depth=6, heads=8, dim_head=32, mlp_dim=512)


def build(name: str):
    """The model called `name`, all with the same weights where the architectures agree."""
    torch.manual_seed(0)
    if name in ("vit-pytorch", "ferrotorch", "torch.compile"):
        import vit_pytorch

        ref = vit_pytorch.ViT(**CFG)
        if name == "vit-pytorch":
            return ref
        if name == "torch.compile":
            return torch.compile(ref)
        from ferrotorch.nn import ViT

        ours = ViT(**CFG)
        ours.load_state_dict(ref.state_dict())
        return ours
    import timm

    tm = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=256, depth=6, num_heads=8, mlp_ratio=2.0, qkv_bias=False
    )
    if name == "timm":
        return tm
    from ferrotorch.nn import ViT

    return ViT.from_timm(tm)  # "ferrotorch (timm)"


def steps(model, batch: int, infer_batch: int):
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    xi = torch.randn(infer_batch, 3, 32, 32)

    def train():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    def infer():
        model.eval()
        with torch.no_grad():
            model(xi)
        model.train()

    return train, infer


SEED000 = dict(batch=128, dropout=0.1, emb_dropout=0.1, lr=1e-4, weight_decay=1e-4)


def seed000_step(ours: bool):
    """One training step of seed 000's loop, as a closure."""
    import vit_pytorch

    torch.manual_seed(0)
    cfg = dict(CFG, dropout=SEED000["dropout"], emb_dropout=SEED000["emb_dropout"])
    model = vit_pytorch.ViT(**cfg)
    optim = torch.optim
    if ours:
        import ferrotorch.optim as optim
        from ferrotorch.nn import ViT

        ref, model = model, ViT(**cfg)
        model.load_state_dict(ref.state_dict())
    opt = optim.AdamW(model.parameters(), lr=SEED000["lr"], weight_decay=SEED000["weight_decay"])
    x = torch.randn(SEED000["batch"], 3, 32, 32)
    y = torch.randint(0, 10, (SEED000["batch"],))

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def worker(what: str, batch: int, infer_batch: int, threads: int) -> None:
    """Runs in a subprocess: builds `what` ("model:<name>" or "seed000:ours|ref"), warms it
    up, then answers each command line on stdin ("train", "infer" or "step") with the
    milliseconds that one call took, until stdin closes."""
    torch.set_num_threads(threads)
    kind, name = what.split(":", 1)
    if kind == "model":
        train, infer = steps(build(name), batch, infer_batch)
        fns = {"train": train, "infer": infer}
    else:
        fns = {"step": seed000_step(name == "ours")}
    for f in fns.values():
        f()  # warm-up: allocator, optimizer state, torch.compile's build
    print("ready", flush=True)
    for line in sys.stdin:
        print(f"{timed(fns[line.strip()]):.6f}", flush=True)


class Worker:
    """One model in its own process, timed on request."""

    def __init__(self, what: str, args) -> None:
        self.what = what
        cmd = [sys.executable, __file__, "--worker", what, "--batch", str(args.batch), "--infer-batch", str(args.infer_batch), "--threads", str(args.threads)]
        # stderr to a file: a pipe nobody reads would block a chatty worker (torch.compile).
        self.err = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            self.proc.communicate()
            raise RuntimeError(self.last_error())

    def last_error(self) -> str:
        self.err.seek(0)
        lines = self.err.read().strip().splitlines()
        return lines[-1] if lines else f"{self.what}: exit code {self.proc.returncode}"

    def time(self, command: str) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"{self.what} died: {self.last_error()}")
        return float(line)

    def close(self) -> None:
        self.proc.communicate()


def in_turns(workers: dict[str, Worker], command: str, repeats: int) -> dict[str, float]:
    """Median milliseconds of `command` per worker, every repeat timing each worker once."""
    times: dict[str, list[float]] = {n: [] for n in workers}
    for _ in range(repeats):
        for name, w in workers.items():
            times[name].append(w.time(command))
    return {n: statistics.median(v) for n, v in times.items()}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


_POLL = """
import os, sys, time
pid, best = sys.argv[1], 0
page = os.sysconf("SC_PAGE_SIZE")
sys.stdout.write("ready\\n"); sys.stdout.flush()
try:
    while True:
        with open(f"/proc/{pid}/statm") as f:
            best = max(best, int(f.read().split()[1]) * page)
        time.sleep(0.0005)
except (KeyboardInterrupt, FileNotFoundError, ProcessLookupError):
    pass
print(best)
"""


def peak_child(name: str, batch: int, threads: int) -> None:
    """Runs in a subprocess: prints the peak RSS growth of two training steps over the RSS
    after a warm-up step (so one-time initialisation and compilation are not counted), as
    seen by a second process polling /proc/<pid>/statm every 0.5 ms."""
    import signal

    torch.set_num_threads(threads)
    model = build(name)
    train, _ = steps(model, batch, 1)
    train()
    base = rss_mb()
    poll = subprocess.Popen([sys.executable, "-c", _POLL, str(os.getpid())], stdout=subprocess.PIPE, text=True)
    assert poll.stdout is not None
    poll.stdout.readline()
    for _ in range(2):
        train()
    time.sleep(0.01)
    poll.send_signal(signal.SIGINT)
    peak = int(poll.communicate()[0].split()[-1]) / 2**20
    print(json.dumps({"peak_mb": peak - base}))


def measure_peak(name: str, batch: int, threads: int) -> float | None:
    # Every allocation over 64 KB gets its own mmap, returned to the OS when freed, so RSS
    # follows live memory instead of whatever glibc's heap happened to keep from step 1.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run(
        [sys.executable, __file__, "--peak-child", name, "--batch", str(batch), "--threads", str(threads)],
        capture_output=True, text=True, timeout=900, env=env,
    )
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]
    except (IndexError, ValueError, KeyError):
        print(f"  ({name}: peak memory run failed: {out.stderr.strip().splitlines()[-1:]})", file=sys.stderr)
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--infer-batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (it takes minutes to build)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--no-seed000", action="store_true", help="skip the seed-000 training step")
    ap.add_argument("--peak-child", help=argparse.SUPPRESS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peak_child:
        return peak_child(args.peak_child, args.batch, args.threads)
    if args.worker:
        return worker(args.worker, args.batch, args.infer_batch, args.threads)
    names = ["vit-pytorch", "ferrotorch", "timm", "ferrotorch (timm)"] + ([] if args.no_compile else ["torch.compile"])
    print(_machine())
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch} (train) / {args.infer_batch} (inference), fp32")
    workers: dict[str, Worker] = {}
    for name in names:
        try:
            workers[name] = Worker(f"model:{name}", args)
        except RuntimeError as e:  # torch.compile may not build on every machine
            print(f"  ({name} skipped: {str(e)[:160]})", file=sys.stderr)
            continue
        print(f"  built {name}", file=sys.stderr, flush=True)
    train_ms = in_turns(workers, "train", args.repeats)
    infer_ms = in_turns(workers, "infer", args.repeats)
    for w in workers.values():
        w.close()
    rows: dict[str, tuple[float, float, float | None]] = {}
    for name in workers:
        peak = None if args.no_memory else measure_peak(name, args.batch, args.threads)
        rows[name] = (train_ms[name], infer_ms[name], peak)
    rt, ri, rp = rows["vit-pytorch"]
    print(f"{'model':<18} | {'train ms':>9} {'x':>6} | {'infer ms':>9} {'x':>6} | {'peak MB':>8} {'ours/ref':>8}")
    for name, (t, i, p) in rows.items():
        mem = f"{p:8.0f} {p / rp:8.2f}" if p is not None and rp else f"{'-':>8} {'-':>8}"
        print(f"{name:<18} | {t:9.1f} {rt / t:6.2f} | {i:9.1f} {ri / i:6.2f} | {mem}")
    print("x = vit-pytorch time / this time (higher is faster); ours/ref = peak MB / vit-pytorch's peak MB")
    print("ferrotorch (timm) runs the timm model's weights; compare its times with timm's row.")
    if args.no_seed000:
        return
    pair = {"ref": Worker("seed000:ref", args), "ours": Worker("seed000:ours", args)}
    seed = in_turns(pair, "step", args.repeats)
    for w in pair.values():
        w.close()
    ref, ours = seed["ref"], seed["ours"]
    print(
        f"seed-000 step (batch {SEED000['batch']}, dropout {SEED000['dropout']}, AdamW): "
        f"vit-pytorch + torch.optim {ref:.1f} ms, ferrotorch {ours:.1f} ms, x {ref / ours:.2f}"
    )


if __name__ == "__main__":
    main()

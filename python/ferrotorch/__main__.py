"""``python -m ferrotorch demo``: train ``ferrotorch.nn.ViT`` on scikit-learn's digits (real
data that ships with scikit-learn, no download) with ferrotorch's AdamW, linear warm-up +
cosine schedule, EMA of the weights and gradient clipping; then, when vit-pytorch is
installed, the same run (same initial weights, same batches, same hyper-parameters) with
torch.optim + torch's schedulers + vit_pytorch.ViT, and compare the times. Writes a
checkpoint (ferrotorch.train.save_checkpoint) and a PNG with the loss, accuracy and lr curves.

    python -m ferrotorch demo
    python -m ferrotorch demo --epochs 5 --output-dir /tmp/run --no-compare
    python -m ferrotorch demo --dataset cifar10 --limit 5000      # torchvision's CIFAR-10
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Callable

#: Per-dataset defaults: the model and the hyper-parameters the demo trains with.
PRESETS: dict[str, dict[str, Any]] = {
    # 8x8 grayscale digits cut into four 4x4 patches (a 2x2 patch LayerNorm would map blank
    # and fully inked patches to the same vector). ~97-99% test accuracy over seeds 0-9.
    "digits": dict(
        model=dict(image_size=8, patch_size=4, channels=1, num_classes=10, dim=64, depth=4, heads=4, dim_head=16, mlp_dim=128),
        epochs=20, batch_size=64, lr=3e-3, weight_decay=0.05, ema_decay=0.99, clip=1.0,
    ),
    # Issue #4's configuration: 32x32x3, patch 4, dim 256, depth 6, 8 heads.
    "cifar10": dict(
        model=dict(image_size=32, patch_size=4, channels=3, num_classes=10, dim=256, depth=6, heads=8, dim_head=32, mlp_dim=512),
        epochs=10, batch_size=128, lr=1e-3, weight_decay=0.05, ema_decay=0.999, clip=1.0,
    ),
}

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


# ---- data ------------------------------------------------------------------------------------

@dataclass
class Data:
    name: str
    x_train: Any
    y_train: Any
    x_test: Any
    y_test: Any
    augment: bool = False


def _load_digits(limit: int | None) -> Data:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        sys.exit("error: the demo trains on scikit-learn's digits: pip install 'ferrotorch[demo]' (or scikit-learn)")
    import torch

    X, y = load_digits(return_X_y=True)
    # A fixed, stratified 80/20 split: the test images are never trained on.
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.2, random_state=0, stratify=y)

    def img(a: Any) -> torch.Tensor:
        return torch.tensor(a / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)

    data = Data("scikit-learn digits, 8x8 grayscale", img(X_tr), torch.tensor(y_tr), img(X_te), torch.tensor(y_te))
    return _limit(data, limit)


def _load_cifar10(root: Path, download: bool, limit: int | None) -> Data:
    """torchvision's CIFAR-10 as normalized tensors; exits with one clear line when
    torchvision or the files are missing (never a traceback)."""
    try:
        from torchvision.datasets import CIFAR10
    except ImportError:
        sys.exit("error: --dataset cifar10 needs torchvision: pip install torchvision (pip picks the release matching your torch)")
    import torch

    sets = []
    for train in (True, False):
        try:
            if download and not _cifar_present(root):
                print(f"downloading CIFAR-10 (170 MB) into {root} ...", flush=True)
            sets.append(CIFAR10(root=str(root), train=train, download=download))
        except Exception as e:  # noqa: BLE001 - offline, corrupted, unwritable: one message
            reason = " ".join(str(e).split()) or type(e).__name__
            if download:
                sys.exit(f"error: could not download CIFAR-10 into {root} ({reason}); when offline, "
                         "copy cifar-10-batches-py (or cifar-10-python.tar.gz) there or pass --data-dir pointing at it")
            sys.exit(f"error: CIFAR-10 is not in {root} ({reason}), and --no-download forbids fetching it; "
                     "drop --no-download to download it (170 MB) or pass --data-dir pointing at cifar-10-batches-py's parent")
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)

    def img(ds: Any) -> torch.Tensor:
        return (torch.from_numpy(ds.data).permute(0, 3, 1, 2).float().div_(255) - mean) / std

    data = Data(
        "torchvision CIFAR-10, 32x32 RGB", img(sets[0]), torch.tensor(sets[0].targets), img(sets[1]), torch.tensor(sets[1].targets), augment=True
    )
    return _limit(data, limit)


def _cifar_present(root: Path) -> bool:
    return (root / "cifar-10-batches-py" / "batches.meta").is_file()


def _limit(data: Data, limit: int | None) -> Data:
    if limit is not None:
        data.x_train, data.y_train = data.x_train[:limit], data.y_train[:limit]
        data.x_test, data.y_test = data.x_test[:limit], data.y_test[:limit]
    return data


def _augment(x: Any, g: Any) -> Any:
    """CIFAR's usual augmentation on a batch: random crop (4-pixel zero padding) + flip."""
    import torch
    import torch.nn.functional as F

    n, _, h, w = x.shape
    dy, dx = torch.randint(0, 9, (2,), generator=g).tolist()
    x = F.pad(x, (4, 4, 4, 4))[:, :, dy : dy + h, dx : dx + w]
    flip = torch.rand(n, generator=g) < 0.5
    return torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)


# ---- one training run -------------------------------------------------------------------------

@dataclass
class Run:
    """What differs between the ferrotorch run and the torch.optim + vit-pytorch run."""

    label: str
    model: Any
    optimizer: Any
    step: Callable[[], None]  # clip + optimizer step + scheduler step
    ema_update: Callable[[int], None]
    ema_model: Any
    history: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in ("step_loss", "step_lr", "loss", "test_loss", "acc", "ema_acc", "lr", "time")})


class _TorchEMA:
    """timm's ModelEmaV3 (use_warmup=True) in plain torch, for the comparison run."""

    def __init__(self, model: Any, decay: float) -> None:
        self.module = copy.deepcopy(model).eval()
        self.decay = decay

    def update(self, model: Any, step: int) -> None:
        import torch

        s = max(0, step - 1)
        decay = 0.0 if s <= 0 else max(min(1 - (1 + s) ** (-2 / 3), self.decay), 0.0)
        with torch.no_grad():
            ema = [t for t in self.module.state_dict().values() if t.is_floating_point()]
            cur = [t for t in model.state_dict().values() if t.is_floating_point()]
            torch._foreach_lerp_(ema, cur, 1.0 - decay)


def _evaluate(model: Any, x: Any, y: Any, batch: int = 500) -> tuple[float, float]:
    import torch
    import torch.nn.functional as F

    was = model.training
    model.eval()
    loss = correct = 0.0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            logits = model(x[i : i + batch])
            loss += F.cross_entropy(logits, y[i : i + batch], reduction="sum").item()
            correct += (logits.argmax(1) == y[i : i + batch]).sum().item()
    model.train(was)
    return loss / len(x), correct / len(x)


def _fit(run: Run, data: Data, args: argparse.Namespace, per_epoch_lines: bool, show_bar: bool = True) -> Iterator[float]:
    """Trains ``run`` for args.epochs, one epoch per ``next()``; yields each epoch's seconds.
    (Two runs advanced in turns share the machine's busy and quiet spells fairly.)"""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(args.seed)  # same batches (and augmentation) for every run
    n = len(data.x_train)
    steps_per_epoch = math.ceil(n / args.batch_size)
    bar = _bar(args.epochs * steps_per_epoch, run.label, args.verbose and show_bar)
    h = run.history
    if per_epoch_lines:
        bar.write(f"{'epoch':>7} {'train loss':>10} {'test loss':>9} {'test acc':>8} {'EMA acc':>8} {'lr':>9} {'time':>7}")
    step = 0
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        run.model.train()
        perm = torch.randperm(n, generator=g)
        loss_sum = 0.0
        for i in range(0, n, args.batch_size):
            idx = perm[i : i + args.batch_size]
            x = data.x_train[idx]
            if data.augment:
                x = _augment(x, g)
            lr = run.optimizer.param_groups[0]["lr"]
            run.optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(run.model(x), data.y_train[idx])
            loss.backward()
            run.step()
            step += 1
            run.ema_update(step)
            value = loss.item()
            loss_sum += value * len(idx)
            h["step_loss"].append(value)
            h["step_lr"].append(lr)
            bar.update(1)
            bar.set_postfix(epoch=f"{epoch}/{args.epochs}", loss=f"{value:.3f}", lr=f"{lr:.1e}", refresh=False)
        test_loss, acc = _evaluate(run.model, data.x_test, data.y_test)
        _, ema_acc = _evaluate(run.ema_model, data.x_test, data.y_test)
        dt = time.perf_counter() - t0
        for k, v in (("loss", loss_sum / n), ("test_loss", test_loss), ("acc", acc), ("ema_acc", ema_acc), ("lr", h["step_lr"][-1]), ("time", dt)):
            h[k].append(v)
        if per_epoch_lines:
            bar.write(f"{epoch:4d}/{args.epochs:<2d} {h['loss'][-1]:10.4f} {test_loss:9.4f} {acc:8.2%} {ema_acc:8.2%} {h['lr'][-1]:9.2e} {dt:6.2f}s")
        if epoch == args.epochs:
            bar.close()
        yield dt


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kw: object) -> None:
        pass

    def write(self, s: str) -> None:
        print(s, flush=True)

    def close(self) -> None:
        pass


def _bar(total: int, label: str, enabled: bool) -> Any:
    """A tqdm progress bar over the training steps (on stderr; the per-epoch lines go to
    stdout). Plain prints when quiet or when tqdm is missing."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        print("(tqdm is not installed: no progress bar; pip install tqdm)")
        return _NoBar()
    return tqdm(total=total, desc=label, unit="step", leave=False, dynamic_ncols=True)


def _ferrotorch_run(model: Any, args: argparse.Namespace, total_steps: int, warmup_steps: int) -> tuple[Run, dict[str, Any]]:
    import ferrotorch

    opt = ferrotorch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = ferrotorch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    warm = ferrotorch.optim.warmup.LinearWarmup(opt, warmup_period=warmup_steps)
    ema = ferrotorch.train.ModelEMA(model, decay=args.ema_decay, use_warmup=True)

    def step() -> None:
        opt.clip_grad_norm_and_step(args.clip)  # clip + AdamW in one fused pass
        with warm.dampening():
            sched.step()

    run = Run("ferrotorch", model, opt, step, lambda s: ema.update(model, s), ema.module)
    return run, dict(model=model, optimizer=opt, scheduler=sched, warmup=warm, ema=ema)


def _torch_run(model: Any, args: argparse.Namespace, total_steps: int, warmup_steps: int) -> Run:
    import torch
    from torch.optim import lr_scheduler as tls

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    # lr_t = lr * min(1, (t + 1) / warmup) * cosine(t): pytorch_warmup's LinearWarmup times
    # CosineAnnealingLR, written with torch's own schedulers.
    scheds: list[tls.LRScheduler] = [tls.CosineAnnealingLR(opt, T_max=total_steps)]
    if warmup_steps > 1:
        scheds.insert(0, tls.LinearLR(opt, start_factor=1 / warmup_steps, end_factor=1.0, total_iters=warmup_steps - 1))
    sched = tls.ChainedScheduler(scheds, optimizer=opt)
    ema = _TorchEMA(model, args.ema_decay)

    def step() -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        sched.step()

    return Run("torch.optim+vit-pytorch", model, opt, step, lambda s: ema.update(model, s), ema.module)


# ---- outputs ----------------------------------------------------------------------------------

def _plot(path: Path, runs: list[Run], steps_per_epoch: int) -> str | None:
    """Loss, accuracy and lr curves; returns a reason when no PNG could be written."""
    try:
        from matplotlib.figure import Figure  # no pyplot: leaves any backend alone
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    import numpy as np

    fig = Figure(figsize=(15, 4.2))
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    for i, run in enumerate(runs):
        h = run.history
        steps = np.arange(1, len(h["step_loss"]) + 1) / steps_per_epoch
        epochs = np.arange(1, len(h["loss"]) + 1)
        # ferrotorch: thick red; the comparison run: thin blue on top (the curves coincide).
        c, lw, mk, z = ("tab:red", 2.2, "o", 2) if i == 0 else ("tab:blue", 1.0, "x", 3)
        if i == 0:
            ax_loss.plot(steps, h["step_loss"], color=c, alpha=0.25, lw=0.8, label=f"{run.label} train (per step)")
        ax_loss.plot(epochs, h["loss"], color=c, lw=lw, marker=mk, ms=4, zorder=z, label=f"{run.label} train (epoch mean)")
        ax_loss.plot(epochs, h["test_loss"], color=c, lw=lw, ls="--", zorder=z, label=f"{run.label} test")
        ax_acc.plot(epochs, np.array(h["ema_acc"]) * 100, color=c, lw=lw, marker=mk, ms=4, zorder=z, label=f"{run.label} (EMA weights)")
        ax_acc.plot(epochs, np.array(h["acc"]) * 100, color=c, lw=lw, ls=":", zorder=z, label=f"{run.label} (raw weights)")
        ax_lr.plot(steps, h["step_lr"], color=c, lw=lw, ls="-" if i == 0 else "--", zorder=z, label=run.label)
    ax_loss.set(title="cross-entropy loss", xlabel="epoch", yscale="log")
    ax_acc.set(title="test accuracy (%)", xlabel="epoch", ylim=(max(0, min(min(r.history["ema_acc"]) for r in runs) * 100 - 5), 100.5))
    ax_lr.set(title="learning rate (warm-up + cosine)", xlabel="epoch")
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as e:
        return f"could not write {path}: {e}"
    return None


# ---- the command ------------------------------------------------------------------------------

def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {v}")
    return v


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {s}")
    return v


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ferrotorch demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=sorted(PRESETS), default="digits", help="digits (scikit-learn, bundled; default) or cifar10 (torchvision)")
    ap.add_argument("--epochs", type=_positive_int, help="default: 20 (digits), 10 (cifar10)")
    ap.add_argument("--batch-size", type=_positive_int, help="default: 64 (digits), 128 (cifar10)")
    ap.add_argument("--lr", type=_positive_float, help="peak learning rate; default: 3e-3 (digits), 1e-3 (cifar10)")
    ap.add_argument("--output-dir", type=Path, default=Path("ferrotorch-demo"), help="where the checkpoint and the PNG go (default: ./ferrotorch-demo)")
    ap.add_argument("--data-dir", type=Path, default=Path("data"), help="CIFAR-10's folder (torchvision layout; default: ./data)")
    ap.add_argument("--no-download", action="store_true", help="never download CIFAR-10; fail with a message when it is not in --data-dir")
    ap.add_argument("--limit", type=_positive_int, help="use only the first N training and N test images (quick runs)")
    ap.add_argument("--no-compare", dest="compare", action="store_false", help="skip the torch.optim + vit-pytorch run")
    ap.add_argument("--seed", type=int, default=0, help="initial weights and batch order (default: 0)")
    ap.add_argument("--threads", type=_positive_int, default=_cores(), help=f"torch threads (default: this machine's cores, {_cores()})")
    ap.add_argument("-q", "--quiet", dest="verbose", action="store_false", help="no progress bar and no per-epoch lines")
    return ap


def _process_age(fallback_start: float) -> float:
    """Seconds since this process started (imports included); since ``fallback_start``
    where /proc is missing."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.perf_counter() - fallback_start


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def demo(argv: list[str]) -> int:
    t_start = time.perf_counter()
    ap = _parser()
    args = ap.parse_args(argv)
    preset = PRESETS[args.dataset]
    for key in ("epochs", "batch_size", "lr"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    args.weight_decay, args.ema_decay, args.clip = preset["weight_decay"], preset["ema_decay"], preset["clip"]
    out = args.output_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        ap.error(f"--output-dir {out}: cannot create it ({e.strerror or e})")
    if not os.access(out, os.W_OK):
        ap.error(f"--output-dir {out}: not writable")

    import torch

    import ferrotorch

    torch.set_num_threads(args.threads)
    if args.dataset == "digits":
        data = _load_digits(args.limit)
    else:
        data = _load_cifar10(args.data_dir, not args.no_download, args.limit)

    cfg = preset["model"]
    torch.manual_seed(args.seed)
    model = ferrotorch.nn.ViT(**cfg)
    initial = copy.deepcopy(model.state_dict())
    n_params = sum(p.numel() for p in model.parameters())
    steps_per_epoch = math.ceil(len(data.x_train) / args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = steps_per_epoch  # one epoch of linear warm-up, then cosine to zero
    shape = ", ".join(f"{k}={v}" for k, v in cfg.items())
    print(f"ferrotorch {ferrotorch.__version__} · torch {torch.__version__} · {torch.get_num_threads()} threads")
    print(f"data    {data.name}: {len(data.x_train)} train / {len(data.x_test)} held-out test images"
          + (" (random crop + flip)" if data.augment else ""))
    print(f"model   ferrotorch.nn.ViT({shape}): {n_params:,} parameters")
    print(f"train   {args.epochs} epochs x {steps_per_epoch} steps, batch {args.batch_size}, AdamW(lr={args.lr:g}, weight_decay={args.weight_decay:g}), "
          f"linear warm-up {warmup_steps} steps + cosine, EMA {args.ema_decay:g}, clip grad norm {args.clip:g}, seed {args.seed}")
    print(flush=True)

    run, stateful = _ferrotorch_run(model, args, total_steps, warmup_steps)
    twin = None
    if args.compare:
        try:
            import vit_pytorch
        except ImportError:
            print("(vit-pytorch is not installed: no comparison run; pip install vit-pytorch==1.26.11)\n")
        else:
            ref = vit_pytorch.ViT(**cfg)
            ref.load_state_dict(initial)  # both runs start from the same weights
            twin = _torch_run(ref, args, total_steps, warmup_steps)
            print("comparison: the same run with torch.optim.AdamW + torch's LinearLR/CosineAnnealingLR + "
                  "vit_pytorch.ViT (same initial weights, batches and hyper-parameters), its epochs "
                  "taking turns with ferrotorch's\n", flush=True)
    ours = _fit(run, data, args, per_epoch_lines=args.verbose)
    theirs = _fit(twin, data, args, per_epoch_lines=False, show_bar=False) if twin is not None else None
    ft_epochs: list[float] = []
    tt_epochs: list[float] = []
    for _ in range(args.epochs):
        ft_epochs.append(next(ours))
        if theirs is not None:
            tt_epochs.append(next(theirs))
    ft_time = sum(ft_epochs)
    h = run.history
    print(f"ferrotorch: final test accuracy {h['ema_acc'][-1]:.2%} (EMA weights; raw weights {h['acc'][-1]:.2%}), "
          f"training time {ft_time:.1f} s ({ft_time / args.epochs:.2f} s/epoch)", flush=True)

    runs = [run]
    if twin is not None:
        tt_time = sum(tt_epochs)
        t = twin.history
        runs.append(twin)
        lr_gap = max(abs(a - b) / b for a, b in zip(h["step_lr"], t["step_lr"]) if b)
        ratio = statistics.median(b / a for a, b in zip(ft_epochs, tt_epochs) if a > 0)
        print(f"\n{'':26}{'ferrotorch':>14}{'torch.optim + vit-pytorch':>28}")
        print(f"{'training time':26}{ft_time:12.1f} s{tt_time:26.1f} s")
        print(f"{'time per epoch':26}{ft_time / args.epochs:12.2f} s{tt_time / args.epochs:26.2f} s")
        print(f"{'final train loss':26}{h['loss'][-1]:14.4f}{t['loss'][-1]:28.4f}")
        print(f"{'final test accuracy (EMA)':26}{h['ema_acc'][-1]:14.2%}{t['ema_acc'][-1]:28.2%}")
        print(f"{'final test accuracy (raw)':26}{h['acc'][-1]:14.2%}{t['acc'][-1]:28.2%}")
        print(f"speed-up: {ratio:.2f}x (median over epochs of torch.optim + vit-pytorch time / ferrotorch time, "
              f"the two runs' epochs in turns); learning rates agree to {lr_gap:.0e} (relative)")

    print()
    ckpt = ferrotorch.train.save_checkpoint(
        out / "checkpoint.pt", epoch=args.epochs, step=total_steps, metric=h["ema_acc"][-1],
        extra={"dataset": args.dataset, "model_config": dict(cfg), "history": {k: list(v) for k, v in h.items()}},
        **stateful,
    )
    print(f"checkpoint  {ckpt}  (ferrotorch.train.load_checkpoint, or torch.load(weights_only=True))")
    png = out / "curves.png"
    why = _plot(png, runs, steps_per_epoch)
    print(f"plot        {png}" if why is None else f"plot        skipped: {why}")
    print(f"test accuracy {h['ema_acc'][-1]:.2%} · total wall time {_process_age(t_start):.1f} s")
    return 0


_USAGE = """\
usage: python -m ferrotorch demo [options]

commands:
  demo   train ferrotorch.nn.ViT on scikit-learn's digits (or --dataset cifar10) with
         ferrotorch's AdamW, warm-up + cosine, EMA and gradient clipping; compare the time
         with torch.optim + vit-pytorch; write a checkpoint and a PNG of the curves

options of the demo: python -m ferrotorch demo --help"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "demo":
        return demo(argv[1:])
    print(f"unknown command {argv[0]!r}; try: python -m ferrotorch demo (or --help)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

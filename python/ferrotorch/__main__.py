"""``python -m ferrotorch demo``: train on scikit-learn's digits with ferrotorch, then with
torch.optim, and compare loss, accuracy and optimizer time.

    python -m ferrotorch demo --epochs 15
    python -m ferrotorch demo --optimizer sgd
"""

from __future__ import annotations

import argparse
import sys
import time


def _load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("the demo trains on scikit-learn's digits: pip install 'ferrotorch[demo]' (or scikit-learn)")
    return load_digits(return_X_y=True)


def _train(lib: str, args: argparse.Namespace, data) -> dict:
    import torch
    import torch.nn.functional as F

    import ferrotorch.optim

    optim = ferrotorch.optim if lib == "ferrotorch" else torch.optim
    X_train, y_train, X_test, y_test = data
    torch.manual_seed(args.seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, args.width), torch.nn.ReLU(), torch.nn.Linear(args.width, args.width), torch.nn.ReLU(),
        torch.nn.Linear(args.width, 10),
    )
    extra = {} if lib == "ferrotorch" else {"foreach": False}
    if args.optimizer == "adamw":
        opt = optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-2, **extra)
    else:
        opt = optim.SGD(model.parameters(), lr=args.lr * 30, momentum=0.9, nesterov=True, **extra)
    steps_per_epoch = (len(X_train) + args.batch_size - 1) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opt.param_groups[0]["lr"], total_steps=args.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(args.seed)
    step_time = 0.0
    history = []
    bar = _bar(args.epochs, lib, args.verbose)
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(X_train), generator=gen)
        total = 0.0
        for i in range(0, len(X_train), args.batch_size):
            idx = perm[i : i + args.batch_size]
            opt.zero_grad()
            loss = F.cross_entropy(model(X_train[idx]), y_train[idx])
            loss.backward()
            t0 = time.perf_counter()
            opt.step()
            step_time += time.perf_counter() - t0
            sched.step()
            total += loss.item() * len(idx)
        model.eval()
        with torch.no_grad():
            acc = (model(X_test).argmax(1) == y_test).float().mean().item()
        history.append((total / len(X_train), acc, sched.get_last_lr()[0]))
        bar.update(1)
        bar.set_postfix(loss=f"{history[-1][0]:.4f}", acc=f"{acc:.2%}")
        if args.verbose:
            bar.write(f"  [{lib:>10}] epoch {epoch + 1:2d}  loss {history[-1][0]:.4f}  test acc {acc:6.2%}  lr {history[-1][2]:.2e}")
    bar.close()
    return {"history": history, "step_time": step_time, "steps": args.epochs * steps_per_epoch}


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kw: object) -> None:
        pass

    def write(self, s: str) -> None:
        print(s)

    def close(self) -> None:
        pass


def _bar(total: int, lib: str, enabled: bool):
    """A tqdm progress bar over epochs (plain prints when tqdm is missing or quiet)."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=f"{lib:>10}", unit="epoch", leave=False)


def demo(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m ferrotorch demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-q", "--quiet", dest="verbose", action="store_false")
    args = ap.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.width < 1:
        ap.error("--epochs, --batch-size and --width must be positive")

    import torch

    import ferrotorch

    X, y = _load_digits()
    X = torch.tensor(X / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    split = int(0.8 * len(X))
    data = (X[:split], y[:split], X[split:], y[split:])
    print(f"ferrotorch {ferrotorch.__version__} (torch {torch.__version__}, {torch.get_num_threads()} threads): "
          f"MLP 64-{args.width}-{args.width}-10 on digits ({split} train / {len(X) - split} test), "
          f"{args.optimizer}, OneCycleLR, {args.epochs} epochs")
    runs = {lib: _train(lib, args, data) for lib in ("ferrotorch", "torch")}
    f, t = runs["ferrotorch"], runs["torch"]
    print()
    print(f"{'':>22} {'ferrotorch':>12} {'torch.optim':>12}")
    print(f"{'final train loss':>22} {f['history'][-1][0]:12.4f} {t['history'][-1][0]:12.4f}")
    print(f"{'final test accuracy':>22} {f['history'][-1][1]:12.2%} {t['history'][-1][1]:12.2%}")
    fs, ts = f["step_time"] / f["steps"] * 1e6, t["step_time"] / t["steps"] * 1e6
    print(f"{'optimizer.step() µs':>22} {fs:12.1f} {ts:12.1f}   ({ts / fs:.2f}x)")
    worst = max(abs(a[0] - b[0]) / max(abs(b[0]), 1e-12) for a, b in zip(f["history"], t["history"]))
    print(f"{'loss curves rel. diff':>22} {worst:12.2e}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m ferrotorch demo [options]   (see: python -m ferrotorch demo --help)")
        return 0 if argv else 2
    if argv[0] == "demo":
        return demo(argv[1:])
    print(f"unknown command {argv[0]!r}; try: python -m ferrotorch demo", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""ViT training step and inference: ferrotorch.nn.ViT vs vit-pytorch (and timm), one run.

    python benchmarks/bench_vit.py [--batch 64] [--threads 2]

Configuration of issue #4: 32x32x3 images, patch 4, dim 256, depth 6, heads 8, dim_head 32,
mlp 512, 10 classes, fp32. Prints ms per training step (forward + cross-entropy + backward)
and per inference batch, ratios (vit-pytorch / ferrotorch) and peak RSS growth.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from ferrotorch.nn import ViT

CFG = dict(image_size=32, patch_size=4, num_classes=10, dim=256, depth=6, heads=8, dim_head=32, mlp_dim=512)


def timed(fn, repeats: int) -> float:
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--infer-batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import vit_pytorch

    torch.manual_seed(0)
    ref = vit_pytorch.ViT(**CFG)
    ours = ViT(**CFG)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    xi = torch.randn(args.infer_batch, 3, 32, 32)
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch} (train) / {args.infer_batch} (inference)")
    print(f"{'model':<12} | {'train ms':>9} {'infer ms':>9}")
    rows = {}
    for name, model in (("vit-pytorch", ref), ("ferrotorch", ours)):
        def train():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()

        def infer():
            with torch.no_grad():
                model.eval()
                model(xi)
                model.train()

        rows[name] = (timed(train, args.repeats), timed(infer, args.repeats))
        print(f"{name:<12} | {rows[name][0]:9.1f} {rows[name][1]:9.1f}", flush=True)
    (rt, ri), (ft, fi) = rows["vit-pytorch"], rows["ferrotorch"]
    print(f"ratio (vit-pytorch / ferrotorch): train {rt / ft:.2f}x, inference {ri / fi:.2f}x")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()

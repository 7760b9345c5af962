"""CUDA: ferrotorch's optimizer step against torch's fused and foreach steps, and the ViT
against vit-pytorch and timm, measured in one run on one GPU.

    python benchmarks/bench_gpu.py [--repeats 50] [--batch 64]

ferrotorch hands CUDA groups to torch's fused kernels (Adam, AdamW, SGD) or its foreach
kernels (the rest), so the goal is a ratio of 1.0 or better against torch's fastest: never
slower than ``fused=True``. Times are CUDA-event medians per step (after warm-up), the
implementations taking turns. Layouts: a = 64 x 262,144 fp32 elements, b = 2000 x 1000.
The ViT is issue #4's configuration (32x32x3, patch 4, dim 256, depth 6, heads 8,
dim_head 32, mlp 512), a training step (forward, cross-entropy, backward) at --batch and
inference at 4x that batch. Without a GPU it says so and exits 0.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

LAYOUTS = {"a": (64, 262_144), "b": (2000, 1000)}
OPTIMIZERS = [
    ("Adam", {"lr": 1e-3}, True),
    ("AdamW", {"lr": 1e-3, "weight_decay": 1e-2}, True),
    ("SGD", {"lr": 1e-2, "momentum": 0.9}, True),
    ("SGD", {"lr": 1e-2, "momentum": 0.9, "nesterov": True}, True),
    ("RMSprop", {"lr": 1e-3}, False),
    ("Adagrad", {"lr": 1e-2}, False),
    ("Adamax", {"lr": 2e-3}, False),
    ("RAdam", {"lr": 1e-3}, False),
    ("NAdam", {"lr": 2e-3}, False),
    ("Adadelta", {"lr": 1.0}, False),
    ("ASGD", {"lr": 1e-2}, False),
    ("Rprop", {"lr": 1e-2}, False),
]
VIT = dict(image_size=32, patch_size=4, num_classes=10, dim=256, depth=6, heads=8, dim_head=32, mlp_dim=512)


def cuda_ms(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def bench_optim(repeats: int) -> None:
    import ferrotorch.optim as fopt

    print(f"optimizer step, ms (median of {repeats}); x = torch's fastest / ferrotorch")
    print(f"{'optimizer':<16}{'layout':>7}{'for-loop':>10}{'foreach':>10}{'fused':>10}{'ferrotorch':>12}{'x':>7}")
    for name, cfg, has_fused in OPTIMIZERS:
        label = name + (" nesterov" if cfg.get("nesterov") else "")
        for layout, (n, size) in LAYOUTS.items():
            impls = {"for-loop": (getattr(torch.optim, name), {"foreach": False}),
                     "foreach": (getattr(torch.optim, name), {"foreach": True}),
                     "ferrotorch": (getattr(fopt, name), {})}
            if has_fused:
                impls["fused"] = (getattr(torch.optim, name), {"fused": True})
            runs = {}
            for key, (cls, how) in impls.items():
                params = [torch.randn(size, device="cuda", requires_grad=True) for _ in range(n)]
                for p in params:
                    p.grad = torch.randn_like(p)
                opt = cls(params, **cfg, **how)
                opt.step()
                runs[key] = opt
            times = {key: [] for key in runs}
            for _ in range(3):  # in turns, so clocks and other load hit all alike
                for key, opt in runs.items():
                    times[key] += cuda_ms(opt.step, max(1, repeats // 3))
            med = {key: statistics.median(t) for key, t in times.items()}
            best = min(v for k, v in med.items() if k != "ferrotorch")
            cell = lambda k: f"{med[k]:>10.3f}" if k in med else f"{'-':>10}"  # noqa: E731
            print(f"{label:<16}{layout:>7}{cell('for-loop')}{cell('foreach')}{cell('fused')}"
                  f"{med['ferrotorch']:>12.3f}{best / med['ferrotorch']:>7.2f}")
            del runs
            torch.cuda.empty_cache()


def bench_vit(repeats: int, batch: int) -> None:
    import timm
    import vit_pytorch

    from ferrotorch.nn import ViT

    torch.manual_seed(0)
    ref = vit_pytorch.ViT(**VIT).cuda()
    ours = ViT(**VIT).cuda()
    ours.load_state_dict(ref.state_dict())
    tm = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=256, depth=6, num_heads=8, mlp_ratio=2.0,
        qkv_bias=False,
    ).cuda()
    models = {"vit-pytorch": ref, "ferrotorch": ours, "timm": tm}
    x = torch.randn(batch, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (batch,), device="cuda")
    xi = torch.randn(4 * batch, 3, 32, 32, device="cuda")

    def train(m):
        return lambda: F.cross_entropy(m(x), y).backward()

    def infer(m):
        def run():
            with torch.no_grad():
                m(xi)
        return run

    print(f"\nViT (issue #4 configuration), ms (median of {repeats}); x = vit-pytorch / model")
    print(f"{'model':<14}{'train':>9}{'x':>7}{'infer':>9}{'x':>7}")
    res = {}
    for name, m in models.items():
        m.train()
        for _ in range(3):
            train(m)()
        res[name] = (statistics.median(cuda_ms(train(m), repeats)), statistics.median(cuda_ms(infer(m.eval()), repeats)))
    base = res["vit-pytorch"]
    for name, (t, i) in res.items():
        print(f"{name:<14}{t:>9.2f}{base[0] / t:>7.2f}{i:>9.2f}{base[1] / i:>7.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device visible to torch; nothing to time.")
        return
    print(f"device: {torch.cuda.get_device_name()} · torch {torch.__version__}")
    bench_optim(args.repeats)
    bench_vit(args.repeats, args.batch)


if __name__ == "__main__":
    main()

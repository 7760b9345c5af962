"""The LR range test against the torch-lr-finder package (seeds 003/004)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import ferrotorch.optim as fopt  # noqa: E402
from ferrotorch.train import LRFinder  # noqa: E402

torch_lr_finder = pytest.importorskip("torch_lr_finder")


def setup(seed=0):
    torch.manual_seed(seed)
    X = torch.randn(256, 10)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0).long()
    ds = torch.utils.data.TensorDataset(X, y)
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    return model, ds


@pytest.mark.parametrize("step_mode", ["exp", "linear"])
@pytest.mark.parametrize("with_val", [False, True])
def test_same_history_as_torch_lr_finder(step_mode, with_val):
    results = []
    for impl in ("ours", "ref"):
        model, ds = setup()
        loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1))
        val = torch.utils.data.DataLoader(ds, batch_size=64) if with_val else None
        opt = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9)
        crit = torch.nn.CrossEntropyLoss()
        kw = dict(end_lr=10 if step_mode == "exp" else 0.5, num_iter=60, step_mode=step_mode, smooth_f=0.05, diverge_th=5)
        if impl == "ours":
            f = LRFinder(model, opt, crit)
            f.range_test(loader, val_loader=val, progress=False, **kw)
        else:
            f = torch_lr_finder.LRFinder(model, opt, crit, device="cpu")
            f.range_test(loader, val_loader=val, **kw)
            f.reset()
        results.append(f.history)
    ours, ref = results
    assert len(ours["lr"]) == len(ref["lr"])
    np.testing.assert_allclose(ours["lr"], ref["lr"], rtol=1e-12)
    np.testing.assert_allclose(ours["loss"], ref["loss"], rtol=1e-5)


def test_restores_model_and_optimizer_and_suggests():
    model, ds = setup()
    loader = torch.utils.data.DataLoader(ds, batch_size=32)
    opt = fopt.AdamW(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    opt_before = opt.state_dict()
    f = LRFinder(model, opt, torch.nn.CrossEntropyLoss())
    lrs, losses = f.range_test(loader, start_lr=1e-6, end_lr=1.0, num_iter=80, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.state_dict()["state"] == opt_before["state"] and opt.param_groups[0]["lr"] == 1e-3
    assert lrs[0] == pytest.approx(1e-6) and len(lrs) == len(losses) <= 80
    s = f.suggestion()
    ref = lrs[10 : len(lrs) - 5][int(np.gradient(np.array(losses[10 : len(losses) - 5])).argmin())]
    assert s == ref
    ax = f.plot(path=None)
    assert ax.get_xscale() == "log"


def test_stops_on_divergence():
    model, ds = setup()
    loader = torch.utils.data.DataLoader(ds, batch_size=32)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    f = LRFinder(model, opt, torch.nn.CrossEntropyLoss())
    lrs, losses = f.range_test(loader, end_lr=1e4, num_iter=200, progress=False)
    assert len(lrs) < 200
    assert losses[-1] > 5 * min(losses)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(num_iter=1), "num_iter"),
        (dict(step_mode="cubic"), "expected one of"),
        (dict(smooth_f=1.0), "smooth_f"),
        (dict(accumulation_steps=0), "accumulation_steps"),
    ],
)
def test_bad_arguments(kw, match):
    model, ds = setup()
    f = LRFinder(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match=match):
        f.range_test(torch.utils.data.DataLoader(ds, batch_size=32), progress=False, **kw)
    with pytest.raises(TypeError):
        LRFinder("model", torch.optim.SGD(model.parameters(), lr=0.1), torch.nn.CrossEntropyLoss())

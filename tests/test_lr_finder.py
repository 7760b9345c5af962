"""The LR range test against the torch-lr-finder package (seeds 003/004)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import copy  # noqa: E402

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
    ax, lr = f.plot()  # torch-lr-finder's return: (ax, suggested lr) with suggest_lr=True
    assert lr == s and ax.get_xscale() == "log"
    assert f.plot(suggest_lr=False).get_xscale() == "log"


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


# ---- torch-lr-finder 0.2.2's full API (issue #12) -------------------------------------------
# Each test runs the same calls through torch_lr_finder and through ours and compares.

import matplotlib.pyplot as plt  # noqa: E402

from ferrotorch.train import DataLoaderIter, TrainDataLoaderIter, ValDataLoaderIter  # noqa: E402


def run_both(build, ours_kw=None, ref_kw=None, range_kw=None, wrap=None, reset=True):
    """Builds (model, opt, crit, train, val) twice from ``build``, runs the range test with
    torch_lr_finder and with ours (restore=False, then reset() if ``reset``), returns both
    finders and their models."""
    out = []
    for impl in ("ours", "ref"):
        model, opt, crit, train, val = build()
        if wrap is not None:
            train, val = wrap(impl, train, val)
        kw = dict(ours_kw or {}) if impl == "ours" else dict(ref_kw or ours_kw or {})
        cls = LRFinder if impl == "ours" else torch_lr_finder.LRFinder
        f = cls(model, opt, crit, **kw)
        rk = dict(range_kw or {})
        if impl == "ours":
            rk.update(progress=False, restore=False)
        f.range_test(train, val_loader=val, **rk)
        if reset:
            f.reset()
        out.append((f, model, opt))
    return out


def xor_build(groups=False, batch=8, n=160, extras=0, validate=False, momentum=0.0):
    def build():
        torch.manual_seed(3)
        X = torch.randint(0, 2, (n, 8)).float()
        y = (X.sum(1, keepdim=True) % 2).float()
        tensors = [X, y] + [torch.randint(0, 2, (n,)) for _ in range(extras)]
        ds = torch.utils.data.TensorDataset(*tensors)
        model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 1))
        if groups:
            params = [{"params": model[0].parameters(), "lr": 1e-3}, {"params": model[1].parameters(), "lr": 1e-5}]
        else:
            params = model.parameters()
        opt = torch.optim.SGD(params, lr=1e-5, momentum=momentum)
        train = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(int(n * 0.9))) if validate else ds, batch_size=batch)
        val = torch.utils.data.DataLoader(torch.utils.data.Subset(ds, range(int(n * 0.9), n)), batch_size=batch) if validate else None
        return model, opt, torch.nn.MSELoss(), train, val

    return build


def assert_same_history(ours, ref, rtol=1e-6):
    assert len(ours.history["lr"]) == len(ref.history["lr"])
    np.testing.assert_allclose(ours.history["lr"], ref.history["lr"], rtol=1e-12)
    np.testing.assert_allclose(ours.history["loss"], ref.history["loss"], rtol=rtol)


@pytest.mark.parametrize("start_lr", [None, 1e-4, [1e-2, 1e-4]])
@pytest.mark.parametrize("validate", [False, True])
def test_per_group_start_lr_matches_torch_lr_finder(start_lr, validate):
    (ours, om, oo), (ref, rm, ro) = run_both(
        xor_build(groups=True, validate=validate, momentum=0.5),
        range_kw=dict(start_lr=start_lr, end_lr=1.0, num_iter=30),
        reset=False,
    )
    assert_same_history(ours, ref)
    # Every group ramped from its own start, so the trained weights agree too. (The groups'
    # lrs afterwards differ by design: torch-lr-finder's scheduler steps once past end_lr.)
    for a, b in zip(om.parameters(), rm.parameters()):
        torch.testing.assert_close(a, b)
    ours.reset(), ref.reset()
    assert [g["lr"] for g in oo.param_groups] == [g["lr"] for g in ro.param_groups]


def test_start_lr_list_of_wrong_length_is_refused_like_torch_lr_finder():
    model, opt, crit, train, _ = xor_build(groups=True)()
    with pytest.raises(ValueError) as ref_err:
        torch_lr_finder.LRFinder(model, opt, crit).range_test(train, start_lr=[1e-3], num_iter=5)
    model, opt, crit, train, _ = xor_build(groups=True)()
    before = [g["lr"] for g in opt.param_groups]
    with pytest.raises(ValueError) as ours_err:
        LRFinder(model, opt, crit).range_test(train, start_lr=[1e-3], num_iter=5, progress=False)
    assert str(ours_err.value) == str(ref_err.value)
    assert [g["lr"] for g in opt.param_groups] == before  # restored


@pytest.mark.parametrize("accumulation_steps", [1, 3])
@pytest.mark.parametrize("non_blocking_transfer", [True, False])
def test_accumulation_and_non_blocking_match_torch_lr_finder(accumulation_steps, non_blocking_transfer):
    (ours, *_), (ref, *_) = run_both(
        xor_build(extras=2),  # batches (inputs, labels, extra, extra): extras are ignored
        range_kw=dict(end_lr=0.5, num_iter=20, accumulation_steps=accumulation_steps, non_blocking_transfer=non_blocking_transfer),
    )
    assert_same_history(ours, ref)


class TwoInputs(torch.nn.Module):
    """A model whose inputs are a dict holding a tuple and a list of tensors."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 3)
        self.b = torch.nn.Linear(4, 3)

    def forward(self, inputs):
        (x1,), [x2] = inputs["first"], inputs["second"]
        return self.a(x1) + self.b(x2)


def test_dict_tuple_list_inputs_with_loader_iter_subclasses():
    def build():
        torch.manual_seed(5)
        X1, X2 = torch.randn(96, 4), torch.randn(96, 4)
        y = torch.randint(0, 3, (96,))
        rows = [{"x1": X1[i], "x2": X2[i], "y": y[i]} for i in range(96)]
        model = TwoInputs()
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        train = torch.utils.data.DataLoader(rows[:64], batch_size=16)
        val = torch.utils.data.DataLoader(rows[64:], batch_size=16)
        return model, opt, torch.nn.CrossEntropyLoss(), train, val

    def from_batch(self, batch):
        return {"first": (batch["x1"],), "second": [batch["x2"]]}, batch["y"]

    def wrap(impl, train, val):
        mod = torch_lr_finder if impl == "ref" else __import__("ferrotorch.train", fromlist=["x"])
        T = type("T", (mod.TrainDataLoaderIter,), {"inputs_labels_from_batch": from_batch})
        V = type("V", (mod.ValDataLoaderIter,), {"inputs_labels_from_batch": from_batch})
        return T(train), V(val)

    (ours, *_), (ref, *_) = run_both(build, range_kw=dict(end_lr=1.0, num_iter=15), wrap=wrap)
    assert_same_history(ours, ref)


def test_torch_lr_finder_iterator_subclasses_are_accepted():
    model, opt, crit, train, _ = xor_build()()
    f = LRFinder(model, opt, crit)
    lrs, _ = f.range_test(torch_lr_finder.TrainDataLoaderIter(train), num_iter=5, progress=False)
    assert len(lrs) == 5


def test_dataloader_iters_behave_like_torch_lr_finder():
    ds = torch.utils.data.TensorDataset(torch.randn(40, 2), torch.randn(40, 1))
    loader = torch.utils.data.DataLoader(ds, batch_size=8)

    def drain(it, n):
        got = []
        try:
            for _ in range(n):
                got.append(next(it))
        except StopIteration:
            pass
        return got

    for ours_cls, ref_cls, kw in [
        (TrainDataLoaderIter, torch_lr_finder.TrainDataLoaderIter, {}),
        (TrainDataLoaderIter, torch_lr_finder.TrainDataLoaderIter, {"auto_reset": False}),
        (ValDataLoaderIter, torch_lr_finder.ValDataLoaderIter, {}),
    ]:
        ours, ref = ours_cls(loader, **kw), ref_cls(loader, **kw)
        assert isinstance(ours, DataLoaderIter) and ours.dataset is ref.dataset is ds
        for rounds in range(3):
            a, b = drain(ours, 7), drain(ref, 7)
            assert len(a) == len(b)
            for (xa, ya), (xb, yb) in zip(a, b):
                assert torch.equal(xa, xb) and torch.equal(ya, yb)
            ours, ref = iter(ours), iter(ref)
    with pytest.raises(ValueError, match="batch type is not supported"):
        next(TrainDataLoaderIter([{"x": 1}]))


@pytest.mark.parametrize("which", ["train", "val"])
def test_unsupported_loader_types(which):
    model, opt, crit, train, _ = xor_build(validate=True)()
    plain = [(torch.randn(2, 8), torch.randn(2, 1))]
    f = LRFinder(model, opt, crit)
    args = (plain, None) if which == "train" else (train, plain)
    with pytest.raises(ValueError, match=f"`{which}_loader` has unsupported type"):
        f.range_test(*args, num_iter=5, progress=False)


def test_memory_cache_off_writes_to_cache_dir_and_resets(tmp_path):
    model, opt, crit, train, _ = xor_build(momentum=0.9)()
    opt.step()  # some optimizer state (momentum buffers need a step with grads)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    before = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    f = LRFinder(model, opt, crit, memory_cache=False, cache_dir=str(tmp_path))
    assert len(list(tmp_path.iterdir())) == 2
    f.range_test(train, end_lr=1.0, num_iter=10, progress=False, restore=False)
    assert not all(torch.equal(before[0][k], v) for k, v in model.state_dict().items())
    for _ in range(2):  # reset twice: the cache is not consumed
        f.reset()
        assert all(torch.equal(before[0][k], v) for k, v in model.state_dict().items())
        state = opt.state_dict()["state"]
        assert all(torch.equal(before[1]["state"][i]["momentum_buffer"], s["momentum_buffer"]) for i, s in state.items())
    del f
    import gc

    gc.collect()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="not a valid directory"):
        LRFinder(model, opt, crit, memory_cache=False, cache_dir=str(tmp_path / "missing"))


def test_reset_restores_state_of_construction_as_torch_lr_finder():
    (ours, om, oo), (ref, rm, ro) = run_both(xor_build(momentum=0.9), range_kw=dict(end_lr=1.0, num_iter=10))
    for a, b in zip(om.parameters(), rm.parameters()):
        assert torch.equal(a, b)
    assert oo.state_dict() == ro.state_dict()


def test_amp_arguments_are_checked_like_torch_lr_finder():
    model, opt, crit, *_ = xor_build()()
    for kw in [dict(amp_backend="nope"), dict(amp_backend="torch")]:
        with pytest.raises(ValueError) as ref_err:
            torch_lr_finder.LRFinder(model, opt, crit, **kw)
        with pytest.raises(ValueError) as ours_err:
            LRFinder(model, opt, crit, **kw)
        assert str(ours_err.value) == str(ref_err.value)


def test_torch_amp_on_cpu_matches_torch_lr_finder():
    scalers = iter([torch.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu")])
    calls = {"ours": 0, "ref": 0}

    def kw():
        scaler = next(scalers)
        return dict(amp_backend="torch", amp_config={"device_type": "cpu", "dtype": torch.bfloat16}, grad_scaler=scaler)

    results = []
    for impl in ("ours", "ref"):
        model, opt, crit, train, _ = xor_build()()
        k = kw()
        orig = k["grad_scaler"].scale

        def counting(loss, _orig=orig, _impl=impl):
            calls[_impl] += 1
            return _orig(loss)

        k["grad_scaler"].scale = counting
        cls = LRFinder if impl == "ours" else torch_lr_finder.LRFinder
        f = cls(model, opt, crit, **k)
        extra = dict(progress=False) if impl == "ours" else {}
        f.range_test(train, end_lr=1.0, num_iter=12, accumulation_steps=2, **extra)
        results.append(f)
    assert calls["ours"] == calls["ref"] == 24
    assert_same_history(*results, rtol=1e-6)


def test_plot_returns_and_marks_like_torch_lr_finder():
    (ours, *_), (ref, *_) = run_both(xor_build(), range_kw=dict(end_lr=1.0, num_iter=30))
    for kw in [dict(), dict(skip_start=0, skip_end=0), dict(skip_start=3, skip_end=7, log_lr=False, show_lr=0.01), dict(suggest_lr=False, show_lr=0.1)]:
        res = []
        for f in (ours, ref):
            fig, ax = plt.subplots()
            r = f.plot(ax=ax, **kw)
            res.append((r, ax))
        (r_ours, ax_ours), (r_ref, ax_ref) = res
        if kw.get("suggest_lr", True):
            assert r_ours[0] is ax_ours and r_ours[1] == r_ref[1]
            assert ours.suggestion(kw.get("skip_start", 10), kw.get("skip_end", 5)) == r_ref[1]
        else:
            assert r_ours is ax_ours
        assert len(ax_ours.lines) == len(ax_ref.lines) and len(ax_ours.collections) == len(ax_ref.collections)
        for la, lb in zip(ax_ours.lines, ax_ref.lines):
            np.testing.assert_array_equal(np.asarray(la.get_xdata(), float), np.asarray(lb.get_xdata(), float))
            np.testing.assert_allclose(np.asarray(la.get_ydata(), float), np.asarray(lb.get_ydata(), float), rtol=1e-6)
        assert ax_ours.get_xscale() == ax_ref.get_xscale()
        plt.close("all")


@pytest.mark.parametrize("skip", [(10, 5), (0, 9), (4, 5)])
def test_too_few_points_raise_torch_lr_finders_error(skip):
    (ours, *_), (ref, *_) = run_both(xor_build(), range_kw=dict(end_lr=1.0, num_iter=10))
    fig, ax = plt.subplots()
    with pytest.raises(RuntimeError) as ref_err:
        ref.plot(*skip, ax=ax)
    with pytest.raises(RuntimeError) as ours_err:
        ours.plot(*skip, ax=ax)
    assert str(ours_err.value) == str(ref_err.value)
    with pytest.raises(RuntimeError, match="Need at least"):
        ours.suggestion(*skip)
    assert ours.plot(*skip, ax=ax, suggest_lr=False) is ax
    plt.close("all")


def test_plot_path_saves_without_showing(tmp_path, monkeypatch):
    model, opt, crit, train, _ = xor_build()()
    f = LRFinder(model, opt, crit)
    f.range_test(train, end_lr=1.0, num_iter=20, progress=False)
    shown = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: shown.append(1))
    ax, lr = f.plot(path=tmp_path / "lr.png")
    assert (tmp_path / "lr.png").stat().st_size > 0 and shown == [] and lr == f.suggestion()
    f.plot()
    assert shown == [1]
    plt.close("all")


def test_scheduler_attached_is_refused_at_construction():
    model, opt, crit, *_ = xor_build()()
    torch.optim.lr_scheduler.StepLR(opt, 1)
    with pytest.raises(RuntimeError, match="already has a scheduler"):
        torch_lr_finder.LRFinder(model, opt, crit)
    with pytest.raises(RuntimeError, match="already has a scheduler"):
        LRFinder(model, opt, crit)

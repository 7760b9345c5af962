"""Checkpoints: exact resume of a full training state, atomic best-N files, clear errors."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ferrotorch.optim as fopt
from ferrotorch.optim import lr_scheduler as fls
from ferrotorch.optim import warmup as fwarm
from ferrotorch.train import CheckpointManager, EarlyStopping, ModelEMA, load_checkpoint, save_checkpoint


def build():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Dropout(0.3), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    opt = fopt.AdamW(model.parameters(), lr=1e-2)
    sched = fls.MultiStepLR(opt, milestones=[20, 40], gamma=0.5)
    warm = fwarm.LinearWarmup(opt, warmup_period=10)
    ema = ModelEMA(model, decay=0.9)
    return model, opt, sched, warm, ema


def data():
    g = torch.Generator().manual_seed(5)
    X = torch.randn(96, 8, generator=g)
    return torch.utils.data.TensorDataset(X, (X[:, 0] > 0).long() + (X[:, 1] > 0).long())


def train_epoch(model, opt, sched, warm, ema, loader):
    losses = []
    for x, y in loader:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) + 0.0 * float(np.random.rand()) + 0.0 * random.random()
        loss.backward()
        opt.step()
        with warm.dampening():
            sched.step()
        ema.update(model)
        losses.append(loss.item())
    return losses


def test_resumed_run_continues_exactly(tmp_path):
    ds = data()
    model, opt, sched, warm, ema = build()
    loader = torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True)  # shuffles with torch's RNG
    full = []
    for epoch in range(6):
        if epoch == 3:
            save_checkpoint(tmp_path / "mid.pt", epoch=epoch - 1, model=model, optimizer=opt, scheduler=sched, warmup=warm, ema=ema)
        full.append(train_epoch(model, opt, sched, warm, ema, loader))
    # A new process would build everything afresh, with other RNG states.
    torch.manual_seed(123)
    np.random.seed(7)
    random.seed(9)
    model2, opt2, sched2, warm2, ema2 = build()
    info = load_checkpoint(tmp_path / "mid.pt", model=model2, optimizer=opt2, scheduler=sched2, warmup=warm2, ema=ema2)
    assert info["epoch"] == 2
    loader2 = torch.utils.data.DataLoader(ds, batch_size=16, shuffle=True)
    resumed = [train_epoch(model2, opt2, sched2, warm2, ema2, loader2) for _ in range(3)]
    assert resumed == full[3:]
    for a, b in zip(ema.module.parameters(), ema2.module.parameters()):
        assert torch.equal(a, b)
    torch.load(tmp_path / "mid.pt", weights_only=True)  # readable with weights_only


def test_keep_best_n_and_no_truncated_files(tmp_path, monkeypatch):
    model, opt, *_ = build()
    mgr = CheckpointManager(tmp_path, keep_best=2, mode="min")
    for metric in [0.9, 0.5, 0.7, 0.3, 0.8]:
        mgr.save(metric, model=model, optimizer=opt)
    kept = sorted(p.name for p in tmp_path.glob("best-*.pt"))
    assert len(kept) == 2 and load_checkpoint(mgr.best(), model=model)["metric"] == 0.3
    good = (tmp_path / "last.pt").read_bytes()

    real_save = torch.save

    def killed_mid_write(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "last.pt", model=model)
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "last.pt").read_bytes() == good  # the old, complete file
    assert not list(tmp_path.glob(".*tmp*"))


def test_corrupt_and_foreign_checkpoints_are_clear_errors(tmp_path):
    model, opt, *_ = build()
    before = [p.detach().clone() for p in model.parameters()]
    (tmp_path / "bad.pt").write_bytes(b"\x00not a zip")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "bad.pt", model=model)
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(ValueError, match="not a ferrotorch checkpoint"):
        load_checkpoint(tmp_path / "bare.pt", model=model)
    save_checkpoint(tmp_path / "m.pt", model=model)
    with pytest.raises(ValueError, match="holds no \\['optimizer'\\]"):
        load_checkpoint(tmp_path / "m.pt", model=model, optimizer=opt)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt", model=model)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert (tmp_path / "bad.pt").read_bytes() == b"\x00not a zip"
    with pytest.raises(TypeError, match="unknown objects"):
        save_checkpoint(tmp_path / "x.pt", modle=model)


def test_early_stopping():
    s = EarlyStopping(patience=2, min_delta=0.01, mode="min")
    decisions = [s.step(v) for v in [1.0, 0.9, 0.895, 0.899, 0.5]]
    assert decisions == [False, False, False, True, False]  # 2 epochs without improving
    t = EarlyStopping(patience=0, mode="max")
    assert [t.step(v) for v in [1, 2, 2]] == [False, False, True]
    assert EarlyStopping().step(float("nan"))
    assert not EarlyStopping(check_finite=False).step(float("nan"))
    u = EarlyStopping()
    u.load_state_dict(s.state_dict())
    assert u.best == s.best and u.num_bad_epochs == s.num_bad_epochs
    with pytest.raises(ValueError):
        EarlyStopping(mode="sideways")


@pytest.mark.parametrize("mode", ["min", "max"])
@pytest.mark.parametrize("patience,min_delta", [(0, 0.0), (1, 0.0), (3, 0.0), (3, 0.05), (7, 0.01)])
def test_early_stopping_decides_like_lightning(mode, patience, min_delta):
    """Lightning's EarlyStopping callback is the reference: the same decision, epoch by
    epoch, on noisy plateauing curves (and a NaN)."""
    import math

    lightning_es = pytest.importorskip("lightning.pytorch.callbacks").EarlyStopping
    rng = torch.Generator().manual_seed(patience * 10 + int(min_delta * 100))
    for trial in range(20):
        n = 40
        trend = torch.linspace(1.0, 0.2, n) if mode == "min" else torch.linspace(0.2, 1.0, n)
        values = (trend.clamp(0.5, 0.7) + 0.05 * torch.randn(n, generator=rng)).tolist()
        if trial == 0:
            values[25] = math.nan
        ref = lightning_es(monitor="val", patience=patience, min_delta=min_delta, mode=mode)
        ours = EarlyStopping(patience=patience, min_delta=min_delta, mode=mode)
        for epoch, v in enumerate(values):
            want, _ = ref._evaluate_stopping_criteria(torch.tensor(v))
            assert ours.step(v) == want, (trial, epoch, v)
            if want:
                break

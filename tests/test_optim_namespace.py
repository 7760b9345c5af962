"""``ferrotorch.optim`` answers every public name of ``torch.optim`` (the natives are
ferrotorch's, the rest torch's own objects), and ``ferrotorch.optim.swa_utils`` is
``torch.optim.swa_utils``: an SWA loop with ferrotorch's SGD equals the same loop with
torch's."""

from __future__ import annotations

import copy
import types

import pytest
import torch
import torch.optim as topt
import torch.optim.swa_utils as tswa
from torch.optim import lr_scheduler as tls

import ferrotorch.optim as fopt
from ferrotorch.optim import lr_scheduler as fls


@pytest.mark.parametrize("name", topt.__all__)
def test_every_torch_optim_name_resolves(name):
    assert name in fopt.__all__
    ours, theirs = getattr(fopt, name), getattr(topt, name)
    if name in fopt.NATIVE:
        assert issubclass(ours, theirs) and ours is not theirs
    elif name == "lr_scheduler":
        assert ours is fls
    elif name == "swa_utils":
        assert ours.__name__ == "ferrotorch.optim.swa_utils"
    elif isinstance(theirs, types.ModuleType):  # e.g. torch 2.15's torch.optim.functional
        assert ours is theirs
    else:  # computed by torch; no native kernel yet
        assert name in fopt.TORCH_COMPUTED and ours is theirs


def test_native_and_torch_computed_cover_torch_optim():
    modules = {n for n in topt.__all__ if isinstance(getattr(topt, n), types.ModuleType)}
    assert {"lr_scheduler", "swa_utils"} <= modules
    assert set(fopt.NATIVE) | set(fopt.TORCH_COMPUTED) | modules == set(topt.__all__)
    assert not set(fopt.NATIVE) & set(fopt.TORCH_COMPUTED)
    # the module docstring names every torch-computed optimizer
    for name in fopt.TORCH_COMPUTED:
        assert f"``{name}``" in fopt.__doc__, name


def test_star_import_gives_every_name():
    ns: dict = {}
    exec("from ferrotorch.optim import *", ns)
    assert set(topt.__all__) <= set(ns)


@pytest.mark.parametrize(
    "name",
    [
        n
        for n in topt.__all__
        if not isinstance(getattr(topt, n), types.ModuleType)
        and n not in ("Optimizer", "swap_in_optimizer_params_and_state", "SparseAdam", "LBFGS", "Muon")
    ],
)
def test_torch_computed_and_native_optimizers_train_like_torch(name):
    """Each optimizer class reached through ferrotorch.optim takes the same calls as
    torch.optim's and gives its numbers."""
    results = []
    for mod in (fopt, topt):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2).double()
        opt = getattr(mod, name)(model.parameters(), lr=0.01)
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(8, 4, dtype=torch.float64)).pow(2).mean().backward()
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_lbfgs_and_muon_are_torchs_classes_and_run():
    for mod in (fopt, topt):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(3, 3, dtype=torch.float64))
        opt = mod.LBFGS([w], lr=0.5, max_iter=5)

        def closure():
            opt.zero_grad()
            loss = (w - 1).pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
    # native (tests/test_lbfgs.py, tests/test_muon.py), subclasses of torch's
    assert issubclass(fopt.LBFGS, topt.LBFGS) and fopt.LBFGS is not topt.LBFGS
    assert issubclass(fopt.Muon, topt.Muon) and fopt.Muon is not topt.Muon


def test_swa_utils_names_are_torchs():
    from ferrotorch.optim import swa_utils as fswa
    from ferrotorch.optim.swa_utils import SWALR, AveragedModel  # noqa: F401  (the seeds' import)

    assert set(fswa.__all__) == set(tswa.__all__)
    for name in tswa.__all__:
        if name == "SWALR":  # computed natively, a subclass of torch's
            assert issubclass(fswa.SWALR, tswa.SWALR) and fswa.SWALR is not tswa.SWALR
        else:
            assert getattr(fswa, name) is getattr(tswa, name)


def swa_loop(optim_mod, sched_mod, avg: str):
    """torch's documented SWA recipe: a cosine schedule, then SWALR and weight averaging
    from ``swa_start``, then update_bn."""
    from ferrotorch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

    SWALR = (fopt if optim_mod is fopt else topt).swa_utils.SWALR

    torch.manual_seed(0)
    X, y = torch.randn(96, 6, dtype=torch.float64), torch.randn(96, 1, dtype=torch.float64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=16)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 1)).double()
    opt = optim_mod.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = sched_mod.CosineAnnealingLR(opt, T_max=20)
    swa_model = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9)) if avg == "ema" else AveragedModel(model)
    swa_sched = SWALR(opt, swa_lr=0.05, anneal_epochs=3, anneal_strategy="cos")
    lrs = []
    for epoch in range(10):
        for inputs, targets in loader:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(inputs), targets).backward()
            opt.step()
        if epoch >= 4:
            swa_model.update_parameters(model)
            swa_sched.step()
        else:
            sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    update_bn(loader, swa_model)
    swa_model.eval()
    with torch.no_grad():
        out = swa_model(X)
    return lrs, copy.deepcopy(swa_model.state_dict()), out


@pytest.mark.parametrize("avg", ["swa", "ema"])
def test_swa_loop_with_ferrotorch_sgd_equals_torch(avg):
    lrs, state, out = swa_loop(fopt, fls, avg)
    ref_lrs, ref_state, ref_out = swa_loop(topt, tls, avg)
    assert lrs == pytest.approx(ref_lrs, rel=1e-12, abs=0)
    assert state.keys() == ref_state.keys()
    for k in state:
        torch.testing.assert_close(state[k], ref_state[k], rtol=1e-12, atol=1e-14, msg=k)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-14)
    assert int(state["n_averaged"]) == int(ref_state["n_averaged"]) > 1  # it did average

"""Checkpoints move between torch.optim and ferrotorch in both directions."""

from __future__ import annotations

import copy
import io
import pickle
import random

import pytest
import torch

import ferrotorch
from conftest import OPTIMIZERS, feed_same_grads, make_params, random_config, rel_err


def roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def clone_params(ps):
    return [p.detach().clone().requires_grad_() for p in ps]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_torch_to_ferrotorch_to_torch_mid_training(name, seed):
    """Train with torch, resume in ferrotorch, resume again in torch: same as never stopping."""
    rng = random.Random(seed)
    cfg = random_config(name, rng)
    ours_cls, torch_cls = OPTIMIZERS[name]
    dtype = torch.float64
    ref = make_params(seed, dtype)  # uninterrupted torch run
    cur = make_params(seed, dtype)  # the run that changes hands
    ref_opt = torch_cls([{"params": ref[:4]}, {"params": ref[4:], "lr": cfg["lr"] / 3}], foreach=False, **cfg)
    opt = torch_cls([{"params": cur[:4]}, {"params": cur[4:], "lr": cfg["lr"] / 3}], foreach=False, **cfg)
    g = torch.Generator().manual_seed(seed)
    r2 = random.Random(seed)
    for phase, cls in enumerate([torch_cls, ours_cls, torch_cls, ours_cls]):
        if phase:
            sd = roundtrip(opt.state_dict())
            cur = clone_params(cur)
            kw = {"foreach": False} if cls is torch_cls else {}
            opt = cls([{"params": cur[:4]}, {"params": cur[4:]}], **kw, **cfg)
            opt.load_state_dict(sd)
        for _ in range(15):
            feed_same_grads(ref, cur, g, 0.2, r2)
            ref_opt.step()
            opt.step()
    assert max(rel_err(a, b) for a, b in zip(cur, ref)) <= 1e-12
    assert [gr["lr"] for gr in opt.param_groups] == [gr["lr"] for gr in ref_opt.param_groups]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_format_is_torchs(name):
    rng = random.Random(1)
    cfg = random_config(name, rng)
    ours_cls, torch_cls = OPTIMIZERS[name]
    pa, pb = make_params(1, torch.float32), make_params(1, torch.float32)
    ours, ref = ours_cls(pa, **cfg), torch_cls(pb, **cfg)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        feed_same_grads(pa, pb, g)
        ours.step()
        ref.step()
    so, st = ours.state_dict(), ref.state_dict()
    assert so["param_groups"] == st["param_groups"]
    assert so["state"].keys() == st["state"].keys()
    for k in so["state"]:
        a, b = so["state"][k], st["state"][k]
        assert a.keys() == b.keys()
        for key in a:
            assert type(a[key]) is type(b[key])
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape and a[key].device == b[key].device
    # weights_only loading works for our checkpoints.
    loaded = roundtrip(so)
    assert loaded["param_groups"] == so["param_groups"]


def test_sgd_state_into_adam_is_a_clear_error():
    pa = make_params(2, torch.float32)
    sgd = ferrotorch.optim.SGD(pa, lr=0.1, momentum=0.9)
    for p in pa:
        p.grad = torch.ones_like(p)
    sgd.step()
    adam = ferrotorch.optim.Adam(pa)
    with pytest.raises(ValueError, match="param group 0 .* no .*betas.*not written by a Adam"):
        adam.load_state_dict(sgd.state_dict())
    # Even with the group keys forged, foreign state keys are named.
    sd = sgd.state_dict()
    sd["param_groups"][0].update(betas=(0.9, 0.999), eps=1e-8, amsgrad=False)
    with pytest.raises(ValueError, match="momentum_buffer.*another optimizer"):
        adam.load_state_dict(sd)
    assert len(adam.state) == 0


def test_wrong_group_and_param_counts_raise_torchs_errors():
    pa = make_params(3, torch.float32)
    ours = ferrotorch.optim.Adam([{"params": pa[:3]}, {"params": pa[3:]}])
    one_group = torch.optim.Adam(pa).state_dict()
    with pytest.raises(ValueError, match="different number of parameter groups"):
        ours.load_state_dict(one_group)
    other_split = torch.optim.Adam([{"params": pa[:2]}, {"params": pa[2:]}]).state_dict()
    with pytest.raises(ValueError, match="doesn't match the size"):
        ours.load_state_dict(other_split)
    with pytest.raises(ValueError, match="expects the dict returned by optimizer.state_dict"):
        ours.load_state_dict({"weights": 1})


def test_state_with_wrong_shape_is_rejected():
    pa = make_params(3, torch.float32)
    src = torch.optim.Adam(pa)
    for p in pa:
        p.grad = torch.ones_like(p)
    src.step()
    sd = src.state_dict()
    sd["state"][4]["exp_avg"] = torch.zeros(3, 3)
    ours = ferrotorch.optim.Adam(pa)
    with pytest.raises(ValueError, match=r"state 'exp_avg' of parameter 4 has shape \(3, 3\).*\(4, 5\)"):
        ours.load_state_dict(sd)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_deepcopy_and_pickle(name):
    ours_cls, _ = OPTIMIZERS[name]
    pa = make_params(4, torch.float32)
    opt = ours_cls(pa, lr=0.01)
    for p in pa:
        p.grad = torch.ones_like(p)
    opt.step()
    twin = copy.deepcopy(opt)
    assert twin.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    restored = pickle.loads(pickle.dumps(opt))
    assert type(restored) is type(opt)
    for p in restored.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    restored.step()  # plans are rebuilt after unpickling


def test_add_param_group_duplicates_rejected_and_new_group_steps():
    pa = make_params(5, torch.float32)
    pb = [p.detach().clone().requires_grad_() for p in pa]
    ours, ref = ferrotorch.optim.SGD(pa[:3], lr=0.1, momentum=0.9), torch.optim.SGD(pb[:3], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="some parameters appear in more than one parameter group"):
        ours.add_param_group({"params": pa[2:4]})
    g = torch.Generator().manual_seed(5)
    feed_same_grads(pa, pb, g)
    ours.step()
    ref.step()
    ours.add_param_group({"params": pa[3:], "lr": 0.01})
    ref.add_param_group({"params": pb[3:], "lr": 0.01})
    for _ in range(5):
        feed_same_grads(pa, pb, g)
        ours.step()
        ref.step()
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)


def test_adagrad_initializes_state_eagerly_like_torch():
    pa = make_params(6, torch.float32)
    ours = ferrotorch.optim.Adagrad(pa, initial_accumulator_value=0.3)
    ref = torch.optim.Adagrad(make_params(6, torch.float32), initial_accumulator_value=0.3)
    assert ours.state_dict()["state"].keys() == ref.state_dict()["state"].keys()
    assert torch.equal(ours.state[pa[4]]["sum"], torch.full((4, 5), 0.3))

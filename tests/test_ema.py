"""ModelEMA against timm's ModelEmaV3 (the reference implementation)."""

from __future__ import annotations

import pytest
import torch

from ferrotorch.train import ModelEMA

timm_ema = pytest.importorskip("timm.utils.model_ema")


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


@pytest.mark.parametrize(
    "kw",
    [
        dict(decay=0.9),
        dict(decay=0.999, use_warmup=True),
        dict(decay=0.99, use_warmup=True, warmup_gamma=3.0, warmup_power=0.75, min_decay=0.5),
        dict(decay=0.95, update_after_step=5),
        dict(decay=0.9, exclude_buffers=True),
    ],
)
def test_same_averages_as_timm_model_ema_v3(kw):
    net = model()
    ours, ref = ModelEMA(net, **kw), timm_ema.ModelEmaV3(net, **kw)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.randn(32, 6)
    for step in range(60):
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
        ours.update(net, step=step)
        ref.update(net, step=step)
        assert ours.get_decay(step) == ref.get_decay(step)
    for (k, a), (_, b) in zip(ours.module.state_dict().items(), ref.module.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=k)


def test_update_every_and_evaluate_with_average():
    net = model()
    ema = ModelEMA(net, decay=0.5, update_every=3)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net, step=1)  # skipped (not a multiple of 3)
    assert all(torch.equal(before[k], v) for k, v in ema.module.state_dict().items())
    ema.update(net, step=3)
    w = net[0].weight.detach().clone()
    with ema.average_parameters(net):
        torch.testing.assert_close(net[0].weight, ema.module[0].weight)
    assert torch.equal(net[0].weight, w)
    with pytest.raises(ValueError, match="update_every"):
        ModelEMA(net, update_every=0)
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(net, decay=1.5)


def test_toolkit_with_accumulation_frozen_params_and_amp():
    """Gradient accumulation, a frozen layer, autocast(bf16) + GradScaler, clipping and EMA
    together: ferrotorch's pipeline equals the torch/timm one."""
    from ferrotorch.nn.utils import clip_grad_norm_
    import ferrotorch.optim as fopt

    results = []
    for lib in ("ferrotorch", "reference"):
        net = model()
        for p in net[0].parameters():
            p.requires_grad_(False)
        trainable = [p for p in net.parameters() if p.requires_grad]
        opt = fopt.AdamW(net.parameters(), lr=1e-2) if lib == "ferrotorch" else torch.optim.AdamW(net.parameters(), lr=1e-2, foreach=False)
        ema = ModelEMA(net, decay=0.9) if lib == "ferrotorch" else timm_ema.ModelEmaV3(net, decay=0.9)
        clip = clip_grad_norm_ if lib == "ferrotorch" else torch.nn.utils.clip_grad_norm_
        scaler = torch.amp.GradScaler("cpu", init_scale=128.0)
        g = torch.Generator().manual_seed(1)
        for step in range(12):
            opt.zero_grad()
            for micro in range(2):
                x = torch.randn(16, 6, generator=g)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = net(x).float().pow(2).mean() / 2
                scaler.scale(loss).backward()
            scaler.unscale_(opt)
            clip(trainable, 0.5)
            scaler.step(opt)
            scaler.update()
            ema.update(net, step=step)
        results.append(([p.detach().clone() for p in net.parameters()], [p.detach().clone() for p in ema.module.parameters()]))
    (pa, ea), (pb, eb) = results
    for a, b in zip(pa + ea, pb + eb):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

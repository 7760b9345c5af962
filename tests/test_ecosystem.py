"""ferrotorch inside the libraries people train with: torch.distributed (DDP, ZeRO),
Lightning, AMP, torch.compile. Each test runs the real library."""

from __future__ import annotations

import time
import warnings

import pytest
import torch
import torch.nn.functional as F

import ferrotorch.optim as fopt
from ferrotorch.optim import lr_scheduler as fls


def _data(rank: int, n: int = 32):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def _ddp_worker(rank: int, world: int, init_file: str, lib: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    from datetime import timedelta

    torch.set_num_threads(1)
    # A bounded timeout turns a lost peer into an error instead of a hang.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        model = DDP(_model())
        if lib == "ferrotorch":
            opt = fopt.AdamW(model.parameters(), lr=1e-2)
            sched = fls.CosineAnnealingLR(opt, T_max=20)
        elif lib == "torch":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
        else:  # ZeRO sharding a ferrotorch optimizer
            opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=fopt.AdamW, lr=1e-2)
            sched = fls.CosineAnnealingLR(opt, T_max=20)
        x, y = _data(rank)
        for _ in range(15):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
        if lib == "zero":
            opt.consolidate_state_dict(to=0)
        if rank == 0:
            state = opt.state_dict()
            torch.save({"params": [p.detach().clone() for p in model.parameters()], "opt": state}, out)
        dist.barrier()
        # Release DDP, ZeRO and their process-group handles before the group goes away.
        del model, opt, sched
    finally:
        dist.destroy_process_group()


def _run_ddp(lib: str, tmp_path) -> dict:
    import torch.multiprocessing as mp

    init = tmp_path / f"init_{lib}"
    out = tmp_path / f"out_{lib}.pt"
    ctx = mp.spawn(_ddp_worker, args=(2, str(init), lib, str(out)), nprocs=2, join=False)
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"DDP run '{lib}' did not finish in 240 s")
    return torch.load(out, weights_only=True)


def test_ddp_and_zero_match_torch_optim(tmp_path):
    ours, ref, zero = _run_ddp("ferrotorch", tmp_path), _run_ddp("torch", tmp_path), _run_ddp("zero", tmp_path)
    for a, b, z in zip(ours["params"], ref["params"], zero["params"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(z, b, rtol=1e-6, atol=1e-7)
    # ZeRO's consolidated state dict loads into a single-process ferrotorch optimizer.
    model = _model()
    single = fopt.AdamW(model.parameters(), lr=1e-2)
    single.load_state_dict(zero["opt"])
    assert len(single.state) == len(list(model.parameters()))
    assert all(float(s["step"]) == 15 for s in single.state.values())


def test_autocast_bf16_with_grad_scaler_matches_torch():
    runs = {}
    for lib in ("ferrotorch", "torch"):
        model = _model()
        opt = fopt.SGD(model.parameters(), lr=0.05, momentum=0.9) if lib == "ferrotorch" else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sched = (fls if lib == "ferrotorch" else torch.optim.lr_scheduler).StepLR(opt, 5, 0.5)
        scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
        x, y = _data(0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(12):
                opt.zero_grad()
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = F.cross_entropy(model(x), y)
                scaler.scale(loss).backward()
                if step == 4:
                    model[0].bias.grad[0] = float("nan")
                scaler.step(opt)
                scaler.update()
                sched.step()
        runs[lib] = ([p.detach().clone() for p in model.parameters()], scaler.get_scale(), sorted({str(w.message)[:60] for w in caught}))
    (pa, sa, wa), (pb, sb, wb) = runs["ferrotorch"], runs["torch"]
    assert sa == sb
    assert wa == wb  # the same warnings as torch (e.g. scheduler-before-optimizer on the skipped step)
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_torch_compile_model_trains_with_ferrotorch():
    pytest.importorskip("torch._dynamo")
    x, y = _data(0)
    losses = {}
    for compiled in (False, True):
        model = _model()
        net = torch.compile(model, backend="inductor") if compiled else model
        opt = fopt.AdamW(model.parameters(), lr=1e-2)
        out = []
        for _ in range(5):
            opt.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            out.append(loss.item())
        losses[compiled] = out
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_lightning_trains_checkpoints_and_resumes(tmp_path):
    L = pytest.importorskip("lightning.pytorch")

    class Net(L.LightningModule):
        def __init__(self, plateau: bool):
            super().__init__()
            self.net = _model()
            self.plateau = plateau

        def training_step(self, batch, idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def validation_step(self, batch, idx):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self.net(x), y))

        def configure_optimizers(self):
            opt = fopt.AdamW(self.parameters(), lr=1e-2)
            if self.plateau:
                sched = fls.ReduceLROnPlateau(opt, patience=0, factor=0.5)
                return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_loss", "interval": "epoch"}}
            sched = fls.OneCycleLR(opt, max_lr=0.05, total_steps=40)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    x, y = _data(0, 64)
    ds = torch.utils.data.TensorDataset(x, y)
    loader = lambda: torch.utils.data.DataLoader(ds, batch_size=16)  # noqa: E731
    for plateau in (False, True):
        kw = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
        model = Net(plateau)
        trainer = L.Trainer(max_epochs=2, **kw)
        trainer.fit(model, loader(), loader())
        ckpt = tmp_path / f"p{plateau}.ckpt"
        trainer.save_checkpoint(ckpt)
        lr_after_2 = trainer.optimizers[0].param_groups[0]["lr"]
        resumed = Net(plateau)
        t2 = L.Trainer(max_epochs=3, **kw)
        t2.fit(resumed, loader(), loader(), ckpt_path=ckpt)
        opt = t2.optimizers[0]
        assert isinstance(opt, fopt.AdamW)
        assert float(next(iter(opt.state.values()))["step"]) == 12  # 3 epochs x 4 batches
        assert opt.param_groups[0]["lr"] != lr_after_2 or plateau

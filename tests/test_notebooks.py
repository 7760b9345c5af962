"""The notebooks in notebooks/ run top to bottom (nbclient, as `jupyter nbconvert --execute`
would), on small data and offline, each in its own pytest tmp_path; the suite fails if a cell
raises. Their results are then checked against torch, pytorch_warmup and torch-lr-finder.

The kernel is the ``python3`` kernel of this interpreter's environment (ipykernel from the
``test`` extra); the test checks that it really runs ``sys.prefix``'s Python, so the notebooks
import the ferrotorch under test.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from nbclient import NotebookClient

NB_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = ["01_vit_cifar10.ipynb", "02_lenet_fashion_mnist.ipynb", "03_scheduler_gallery.ipynb", "04_lr_range_test.ipynb"]
_PROBE = "import sys; print('KERNEL-PREFIX=' + sys.prefix)"


def run_notebook(name: str, cwd: Path, monkeypatch: pytest.MonkeyPatch, data_dir: Path | None = None, figures: int = 0) -> str:
    """Executes notebooks/<name> with cwd ``cwd``; returns the text of its stream outputs.
    ``figures``: how many plots must show up inline (no cell may turn the inline backend off)."""
    # The kernel inherits this environment. FAST: a few epochs on small data. The data dir
    # points into tmp_path, so a dataset elsewhere on the machine is never picked up (and
    # nothing is ever downloaded: the notebooks use download=False). One OpenMP thread: the
    # models are tiny, and on a shared 2-core runner torch's spinning thread team made a
    # LeNet step ~10x slower than one thread.
    monkeypatch.setenv("FERROTORCH_NB_FAST", "1")
    monkeypatch.setenv("FERROTORCH_DATA", str(data_dir if data_dir is not None else cwd / "no-data"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(NB_DIR / name, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(_PROBE))
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    client.execute()  # raises CellExecutionError (with the traceback) if a cell raises
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "stream")
    prefix = [line.split("=", 1)[1] for line in text.splitlines() if line.startswith("KERNEL-PREFIX=")]
    assert prefix == [sys.prefix], f"the notebook ran in {prefix}, not in this environment ({sys.prefix})"
    shown = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert shown == figures, f"{name}: {shown} inline figures, expected {figures}"
    return text


@pytest.fixture
def repo_untouched():
    before = sorted(p.name for p in NB_DIR.iterdir())
    yield
    assert sorted(p.name for p in NB_DIR.iterdir()) == before, "a notebook wrote into notebooks/"


def test_notebooks_are_committed_without_outputs():
    assert sorted(p.name for p in NB_DIR.glob("*.ipynb")) == NOTEBOOKS
    for name in NOTEBOOKS:
        nb = nbformat.read(NB_DIR / name, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata["kernelspec"]["name"] == "python3"
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{name}: clear the outputs before committing"


def test_vit_cifar10(tmp_path, monkeypatch, repo_untouched):
    text = run_notebook("01_vit_cifar10.ipynb", tmp_path, monkeypatch, figures=2)
    assert "using scikit-learn's digits" in text
    for png in ("vit_lr_schedule.png", "vit_curves.png"):
        assert (tmp_path / png).stat().st_size > 0
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    best = sorted((tmp_path / "checkpoints").glob("best-*.pt"))
    assert len(best) == 1
    best = torch.load(best[0], weights_only=True)
    assert {"model", "optimizer", "scheduler", "early_stopping", "rng"} <= set(last)
    assert last["epoch"] == 5  # FAST: 6 epochs, no early stop with patience 10
    assert best["metric"] == last["early_stopping"]["best"] > 0.3  # well above chance (0.1) on the digits
    assert set(torch.load(tmp_path / "best_model.pth", weights_only=True)) == set(best["model"])


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An MNIST-format (IDX) file of uint8 data."""
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes())


def _fake_fashion_mnist(root: Path) -> None:
    """A tiny dataset in Fashion-MNIST's on-disk layout (the digits at 28x28), so that the
    notebook's torchvision branch runs without a download."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    img = np.kron(X.reshape(-1, 8, 8) * 255 / 16, np.ones((3, 3)))
    img = np.pad(img, ((0, 0), (2, 2), (2, 2)))
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    _write_idx(raw / "train-images-idx3-ubyte", img[:600])
    _write_idx(raw / "train-labels-idx1-ubyte", y[:600])
    _write_idx(raw / "t10k-images-idx3-ubyte", img[600:800])
    _write_idx(raw / "t10k-labels-idx1-ubyte", y[600:800])


def _check_lenet_outputs(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    acc = EventAccumulator(str(runs[0] / "Training vs. Validation Loss_Validation"))
    acc.Reload()
    assert len(acc.Scalars("Training vs. Validation Loss")) == 8  # one point per epoch
    state = torch.load(tmp_path / "model_params.pth", weights_only=True)
    assert state["conv1.weight"].shape == (6, 1, 5, 5)
    ckpt = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert ckpt["epoch"] == 7 and len(ckpt["optimizer_state_dict"]["state"]) == 10
    assert (tmp_path / "lenet_lr.png").stat().st_size > 0


def test_lenet_fashion_mnist_offline(tmp_path, monkeypatch, repo_untouched):
    text = run_notebook("02_lenet_fashion_mnist.ipynb", tmp_path, monkeypatch, figures=1)
    assert "using scikit-learn's digits" in text
    _check_lenet_outputs(tmp_path)


def test_lenet_fashion_mnist_from_disk(tmp_path, monkeypatch, repo_untouched):
    data = tmp_path / "data"
    _fake_fashion_mnist(data)
    text = run_notebook("02_lenet_fashion_mnist.ipynb", tmp_path, monkeypatch, data_dir=data, figures=1)
    assert "using scikit-learn's digits" not in text
    assert "一共有150个批次" in text  # 600 images, batch size 4
    _check_lenet_outputs(tmp_path)


def _torch_curve(sched: torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau, steps: int, key: str = "lr", metrics=None) -> np.ndarray:
    """torch's own values, read in the ordinary training loop."""
    opt = sched.optimizer
    out = []
    for i in range(steps):
        v = opt.param_groups[0][key]
        out.append(v[0] if key == "betas" else v)
        opt.step()
        sched.step(metrics[i]) if metrics is not None else sched.step()
    return np.array(out)


def test_scheduler_gallery(tmp_path, monkeypatch, repo_untouched):
    import pytorch_warmup

    run_notebook("03_scheduler_gallery.ipynb", tmp_path, monkeypatch, figures=3)
    for png in ("torch_schedulers.png", "warmup_schedulers.png", "dampening.png"):
        assert (tmp_path / png).stat().st_size > 0
    curves = np.load(tmp_path / "scheduler_curves.npz")
    torch_classes = ["LambdaLR", "MultiplicativeLR", "StepLR", "MultiStepLR", "ConstantLR", "LinearLR", "ExponentialLR", "PolynomialLR",
                     "CosineAnnealingLR", "CosineAnnealingWarmRestarts", "CyclicLR", "OneCycleLR", "SequentialLR", "ChainedScheduler",
                     "ReduceLROnPlateau"]
    assert set(torch_classes) <= set(curves.files)
    assert {"CyclicLR/momentum", "OneCycleLR/momentum", "OneCycleLR (AdamW)/beta1"} <= set(curves.files)

    # A few of the gallery's curves, rebuilt here from torch alone (same arguments as the notebook).
    S = torch.optim.lr_scheduler

    def sgd(lr=0.1):
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9)

    o = sgd()
    assert np.array_equal(curves["CosineAnnealingWarmRestarts"], _torch_curve(S.CosineAnnealingWarmRestarts(o, T_0=10, T_mult=2, eta_min=1e-5), 100))
    cyc = dict(base_lr=0.01, max_lr=0.1, step_size_up=15, mode="triangular2", cycle_momentum=True, base_momentum=0.8, max_momentum=0.9)
    assert np.array_equal(curves["CyclicLR"], _torch_curve(S.CyclicLR(sgd(), **cyc), 100))
    assert np.array_equal(curves["CyclicLR/momentum"], _torch_curve(S.CyclicLR(sgd(), **cyc), 100, key="momentum"))
    assert np.array_equal(curves["OneCycleLR/momentum"], _torch_curve(S.OneCycleLR(sgd(), max_lr=0.1, total_steps=100), 100, key="momentum"))
    adamw = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    assert np.array_equal(curves["OneCycleLR (AdamW)/beta1"], _torch_curve(S.OneCycleLR(adamw, max_lr=0.1, total_steps=100), 100, key="betas"))
    o = sgd()
    seq = S.SequentialLR(o, [S.LinearLR(o, start_factor=0.1, total_iters=10), S.CosineAnnealingLR(o, T_max=90)], milestones=[10])
    assert np.array_equal(curves["SequentialLR"], _torch_curve(seq, 100))
    plateau = _torch_curve(S.ReduceLROnPlateau(sgd(), mode="min", factor=0.5, patience=5), 100, metrics=curves["val_loss"])
    assert np.array_equal(curves["ReduceLROnPlateau"], plateau) and plateau[-1] < plateau[0]  # it did cut the lr

    # The dampening() curves against pytorch_warmup itself (AdamW, betas (0.9, 0.99), cosine over 300 steps).
    for name, make in {
        "LinearWarmup(50)": lambda o: pytorch_warmup.LinearWarmup(o, warmup_period=50),
        "ExponentialWarmup(50)": lambda o: pytorch_warmup.ExponentialWarmup(o, warmup_period=50),
        "UntunedLinearWarmup": pytorch_warmup.UntunedLinearWarmup,
        "UntunedExponentialWarmup": pytorch_warmup.UntunedExponentialWarmup,
        "RAdamWarmup": pytorch_warmup.RAdamWarmup,
    }.items():
        o = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.1, betas=(0.9, 0.99))
        sched, warm = S.CosineAnnealingLR(o, T_max=300), make(o)
        ref = []
        for _ in range(300):
            ref.append(o.param_groups[0]["lr"])
            o.step()
            with warm.dampening():
                sched.step()
        np.testing.assert_allclose(curves["warmup/" + name], ref, rtol=1e-12, atol=0, err_msg=name)


def test_lr_range_test(tmp_path, monkeypatch, repo_untouched):
    run_notebook("04_lr_range_test.ipynb", tmp_path, monkeypatch, figures=3)
    assert (tmp_path / "lr_range_test.png").stat().st_size > 0
    lrs, losses = np.load(tmp_path / "lr_range_test.npy")
    # torch-lr-finder's exponential ramp: lr_i = start * (end / start) ** (i / (num_iter - 1))
    i = np.arange(len(lrs))
    np.testing.assert_allclose(lrs, 1e-7 * (10 / 1e-7) ** (i / 99), rtol=1e-12)
    assert np.isfinite(losses).all() and losses.min() < losses[0]

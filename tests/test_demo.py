"""The README's first command, ``python -m ferrotorch demo`` (issue #5): a ferrotorch.nn.ViT
trained on scikit-learn's digits, the torch.optim + vit-pytorch comparison, the checkpoint and
PNG it writes, ``--dataset cifar10`` and its messages, and bad options."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("sklearn")

ACC = re.compile(r"^test accuracy (\d+\.\d+)% · total wall time (\d+\.\d+) s$", re.M)


def demo(*args: str, env: dict | None = None, prelude: str = "", timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs the demo in a fresh interpreter; ``prelude`` runs first (to hide or fake modules)."""
    if prelude:
        code = "import sys\n" + textwrap.dedent(prelude) + "\nfrom ferrotorch.__main__ import main\nsys.exit(main(sys.argv[1:]))\n"
        cmd = [sys.executable, "-c", code, "demo", *args]
    else:
        cmd = [sys.executable, "-m", "ferrotorch", "demo", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def accuracy(out: str) -> float:
    m = ACC.search(out)
    assert m, out
    return float(m.group(1)) / 100


def test_short_run_writes_a_loadable_checkpoint_and_a_png(tmp_path):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    import ferrotorch

    out = demo("--epochs", "3", "--output-dir", str(tmp_path / "run"))
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr
    acc = accuracy(out.stdout)
    assert 0.8 < acc <= 1.0, out.stdout  # 3 epochs already get ~95%
    # per-epoch lines: epoch, train loss, test loss, test acc, EMA acc, lr, time
    epochs = re.findall(r"^\s+(\d)/3\s+\S+\s+\S+\s+\S+%\s+\S+%\s+\S+\s+\S+s$", out.stdout, re.M)
    assert epochs == ["1", "2", "3"], out.stdout
    # the comparison run (vit-pytorch is a test dependency)
    assert re.search(r"^final test accuracy \(EMA\)\s+\d+\.\d+%\s+\d+\.\d+%$", out.stdout, re.M), out.stdout
    assert re.search(r"^speed-up: \d+\.\d+x", out.stdout, re.M), out.stdout
    assert re.search(r"learning rates agree to \d(\.\d+)?e-1\d", out.stdout), out.stdout

    ckpt = tmp_path / "run" / "checkpoint.pt"
    png = tmp_path / "run" / "curves.png"
    assert f"checkpoint  {ckpt}" in out.stdout and f"plot        {png}" in out.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    state = torch.load(ckpt, weights_only=True)
    assert {"model", "optimizer", "scheduler", "warmup", "ema"} <= set(state)
    assert state["epoch"] == 3 and state["metric"] == pytest.approx(acc, abs=6e-5)
    cfg = state["extra"]["model_config"]
    assert cfg["image_size"] == 8 and cfg["channels"] == 1

    # The checkpoint restores the run: its EMA weights give the printed test accuracy.
    model = ferrotorch.nn.ViT(**cfg)
    ema = ferrotorch.train.ModelEMA(model)
    opt = ferrotorch.optim.AdamW(model.parameters())
    info = ferrotorch.train.load_checkpoint(ckpt, model=model, ema=ema, optimizer=opt, restore_rng=False)
    assert info["step"] == opt.state[next(iter(model.parameters()))]["step"].item()
    X, y = load_digits(return_X_y=True)
    _, X_te, _, y_te = train_test_split(X, y, test_size=0.2, random_state=0, stratify=y)
    with torch.no_grad():
        pred = ema.module(torch.tensor(X_te / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)).argmax(1)
    assert (pred == torch.tensor(y_te)).float().mean().item() == pytest.approx(acc, abs=1e-4)


def test_default_run_reaches_95_percent(tmp_path):
    """The full default demo (20 epochs and the comparison run; ~25 s on 2 idle cores)."""
    out = demo("-q", "--output-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert accuracy(out.stdout) >= 0.95, out.stdout
    ours, theirs = re.search(r"^final test accuracy \(EMA\)\s+(\d+\.\d+)%\s+(\d+\.\d+)%$", out.stdout, re.M).groups()
    assert float(theirs) >= 95.0 and abs(float(ours) - float(theirs)) <= 1.0, out.stdout
    print(out.stdout)


def test_without_vit_pytorch_matplotlib_and_tqdm(tmp_path):
    """Optional pieces missing: the run still completes and says what it skipped."""
    prelude = "for m in ('vit_pytorch', 'matplotlib', 'matplotlib.figure', 'tqdm', 'tqdm.auto'):\n    sys.modules[m] = None\n"
    out = demo("--epochs", "1", "--output-dir", str(tmp_path), prelude=prelude)
    assert out.returncode == 0, out.stderr
    assert "vit-pytorch is not installed" in out.stdout
    assert "plot        skipped: matplotlib is not installed" in out.stdout
    assert "tqdm is not installed" in out.stdout
    assert (tmp_path / "checkpoint.pt").is_file() and not (tmp_path / "curves.png").exists()
    accuracy(out.stdout)


def test_cifar10_missing_files_with_no_download(tmp_path):
    out = demo("--dataset", "cifar10", "--data-dir", str(tmp_path / "empty"), "--no-download", "--output-dir", str(tmp_path / "o"))
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert f"error: CIFAR-10 is not in {tmp_path / 'empty'}" in out.stderr and "--no-download" in out.stderr


def test_cifar10_download_failure_is_one_line(tmp_path):
    """Offline: the proxy points at a closed local port, so nothing leaves the machine."""
    import os

    env = dict(os.environ)
    for k in ("no_proxy", "NO_PROXY"):
        env.pop(k, None)
    for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env[k] = "http://127.0.0.1:9"
    out = demo("--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "o"), env=env)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert f"error: could not download CIFAR-10 into {tmp_path / 'data'}" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_cifar10_without_torchvision(tmp_path):
    out = demo("--dataset", "cifar10", "--output-dir", str(tmp_path), prelude="sys.modules['torchvision'] = None")
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert "--dataset cifar10 needs torchvision: pip install torchvision" in out.stderr


def test_cifar10_pipeline_on_stand_in_data(tmp_path):
    """Everything after torchvision's loader (normalization, crop + flip, the 32x32x3 patch-4
    ViT, checkpoint): CIFAR10 is replaced by random images of CIFAR's layout."""
    prelude = """
        import numpy as np, torchvision.datasets
        class FakeCIFAR10:
            def __init__(self, root, train, download):
                rng = np.random.default_rng(0 if train else 1)
                self.data = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
                self.targets = [int(t) for t in rng.integers(0, 10, 64)]
        torchvision.datasets.CIFAR10 = FakeCIFAR10
    """
    out = demo("--dataset", "cifar10", "--epochs", "1", "--batch-size", "32", "--limit", "48", "--no-compare", "--output-dir", str(tmp_path), prelude=prelude)
    assert out.returncode == 0, out.stderr
    assert "48 train / 48 held-out test images (random crop + flip)" in out.stdout
    assert "image_size=32, patch_size=4, channels=3" in out.stdout
    accuracy(out.stdout)
    cfg = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["extra"]["model_config"]
    assert (cfg["image_size"], cfg["patch_size"], cfg["dim"], cfg["depth"]) == (32, 4, 256, 6)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--epochs", "0"], "argument --epochs: must be positive, got 0"),
        (["--batch-size", "x"], "argument --batch-size: expected a positive integer, got 'x'"),
        (["--lr", "-1"], "argument --lr: must be a positive finite number, got -1"),
        (["--lr", "nan"], "argument --lr: must be a positive finite number, got nan"),
        (["--limit", "-5"], "argument --limit: must be positive, got -5"),
        (["--threads", "0"], "argument --threads: must be positive, got 0"),
        (["--dataset", "mnist"], "argument --dataset: invalid choice: 'mnist'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_options_are_clear_errors(args, message, capsys):
    from ferrotorch.__main__ import main

    with pytest.raises(SystemExit) as exc:  # argparse's exit, before any training
        main(["demo", *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_unwritable_output_dir(tmp_path, capsys):
    from ferrotorch.__main__ import main

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--output-dir", str(blocker / "sub")])
    assert exc.value.code == 2
    assert f"--output-dir {blocker / 'sub'}: cannot create it" in capsys.readouterr().err


def test_help(capsys):
    from ferrotorch.__main__ import main

    out = subprocess.run([sys.executable, "-m", "ferrotorch", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "python -m ferrotorch demo" in out.stdout and "ferrotorch.nn.ViT" in out.stdout
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--epochs", "--batch-size", "--output-dir", "--dataset", "--data-dir", "--no-download", "--limit", "--no-compare", "--seed", "--quiet"):
        assert opt in text
    assert main([]) == 2 and "usage: python -m ferrotorch demo" in capsys.readouterr().err
    assert main(["train"]) == 2 and "unknown command 'train'" in capsys.readouterr().err

"""Shared helpers for the core tests: the real-data folder, small synthetic data sets, IDX files,
the command line run in-process, tiny trained runs, checkpoint comparison."""

from __future__ import annotations

import gzip
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV_DATA = "DPLATENT_DATA"


def real_data_root() -> Path | None:
    """The folder named by $DPLATENT_DATA (relative paths: to the working directory, else to the
    repository root), or None when the variable is unset."""
    env = os.environ.get(ENV_DATA)
    if not env:
        return None
    path = Path(env)
    if not path.is_absolute() and not path.exists():
        path = ROOT / path
    return path.resolve()


@pytest.fixture(autouse=True)
def no_busy_warning(monkeypatch):
    """The suite itself keeps the CPU busy: without this, the CLI's warning about a busy
    machine (dplatent.runtime.busy_warning) would join the stderr that tests check."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    path = real_data_root()
    if path is None:
        pytest.skip(f"{ENV_DATA} is not set")
    if not path.is_dir():
        pytest.fail(f"{ENV_DATA}={path} is not a folder")
    return path


@pytest.fixture
def single_thread():
    """Tiny models run fastest (and share the machine best) on one thread."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def synthetic_images(n: int, num_classes: int = 10, size: int = 28,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Balanced labels and uint8 images with a class-dependent bar plus noise."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % num_classes).astype(np.int64)
    rng.shuffle(y)
    x = rng.integers(0, 60, size=(n, size, size), dtype=np.uint8)
    rows = np.linspace(2, size - 6, num_classes).astype(int)
    for c in range(num_classes):
        x[y == c, rows[c]:rows[c] + 4, 3:size - 3] = 220
    return x, y


def idx_bytes(array: np.ndarray, dtype_code: int = 0x08) -> bytes:
    """An IDX file's bytes: magic (0, 0, dtype, ndim), big-endian dimensions, the payload."""
    header = bytes([0, 0, dtype_code, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array).tobytes()


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    data = idx_bytes(array)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def write_builtin_copy(folder: Path, name: str, x: np.ndarray, y: np.ndarray,
                       split: str = "test", compress: bool = True) -> Path:
    """Small IDX files under folder/name with the built-in data set's file names."""
    from dplatent.data import FILES
    img, lab = FILES[split]
    if not compress:
        img, lab = img.removesuffix(".gz"), lab.removesuffix(".gz")
    write_idx(folder / name / img, x, compress)
    write_idx(folder / name / lab, y.astype(np.uint8), compress)
    return folder


# ------------------------------------------------ replaying the draws of the denoising loss


def predraw(gen: torch.Generator, b: int, k: int, d: int, timesteps: int, label_dropout: float):
    """The draws denoising_loss makes for a batch of b, in its order."""
    t = torch.randint(0, timesteps, (b, k), generator=gen)
    noise = torch.randn(b, k, d, generator=gen)
    drop = (torch.rand(b, k, generator=gen) < label_dropout if label_dropout > 0
            else torch.zeros(b, k, dtype=torch.bool))
    return t, noise, drop


class ExactGaussianDenoiser(torch.nn.Module):
    """v-prediction of the exact denoiser for data N(0, s^2 I) under the given schedule. Its one
    parameter is unused: samplers read the model's device from its parameters."""

    def __init__(self, s: float, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.s, self.abar = s, alphas_cumprod
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, z, t, y):
        a = self.abar[t].sqrt()[:, None]
        b = (1 - self.abar[t]).sqrt()[:, None]
        x0 = a * self.s * self.s / (a * a * self.s * self.s + b * b) * z
        eps = (z - a * x0) / b
        return a * eps - b * x0


def loss_from_draws(model, z0, y, acp, t, noise, drop, null_label, prediction="v"):
    """The denoising loss of examples z0 [b, D] with given draws, written out independently."""
    ab = acp[t].unsqueeze(-1)
    x0 = z0.unsqueeze(1)
    zt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    labels = torch.where(drop, torch.full_like(t, null_label), y.unsqueeze(1).expand_as(t))
    # epsilon-prediction targets the noise; v-prediction v = sqrt(ab) eps - sqrt(1 - ab) z0
    target = noise if prediction == "epsilon" else ab.sqrt() * noise - (1 - ab).sqrt() * x0
    return (model(zt, t, labels) - target).pow(2).mean(dim=(1, 2))


def quadrant_images(n: int, seed: int, size: int = 12,
                    classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A separable labelled set: class c lights up quadrant c of a noisy size x size image."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=n)
    x = rng.integers(0, 80, size=(n, size, size)).astype(np.uint8)
    half = size // 2
    for i, c in enumerate(y):
        r, col = divmod(int(c), 2)
        x[i, r * half:(r + 1) * half, col * half:(col + 1) * half] += 170
    return x, y.astype(np.int64)


# ------------------------------------------------ small data sets as files


def write_synthetic_npz(path: Path, n: int, seed: int, num_classes: int = 10) -> Path:
    """synthetic_images(n) saved as an .npz with arrays x and y."""
    x, y = synthetic_images(n, num_classes=num_classes, seed=seed)
    np.savez(path, x=x, y=y)
    return path


def bar_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels 0..9 in order (unshuffled) and 28 x 28 uint8 images with class c's bar on rows
    2 + 2c .. 5 + 2c, plus noise (the audit tests' toy set)."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 10).astype(np.int64)
    x = rng.integers(0, 60, size=(n, 28, 28), dtype=np.uint8)
    for c in range(10):
        x[y == c, 2 + 2 * c:6 + 2 * c, 3:25] = 220
    return x, y


# ------------------------------------------------ the command line and tiny runs, in-process


def run_main(argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """`dplatent ARGV` in this process, through the same entry point as the installed command;
    returns (exit code, stdout, stderr)."""
    from dplatent.cli import main
    monkeypatch.setattr(sys, "argv", ["dplatent", *argv])
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str) -> str:
    """Asserts exit status 2 and a single `error: ...` line on stderr, no traceback; returns it."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def train_smoke(dataset: Path | str, run_dir: Path, **settings: str) -> Path:
    """A finished smoke run (RDP accountant, delta 1e-3, one thread, any further settings)
    trained in this process; torch's thread count is restored afterwards."""
    from dplatent import config
    from dplatent.train.stages import train
    cfg = config.resolve("smoke", {"privacy.accountant": "rdp", "privacy.delta": "1e-3",
                                   "threads": "1", **settings})
    old = torch.get_num_threads()
    try:
        train(dataset=str(dataset), data_dir=None, cfg=cfg, run_dir=run_dir, progress=False)
    finally:
        torch.set_num_threads(old)
    return run_dir


def train_tiny_autoencoder(run_dir: Path, *, n: int, batch_size: int, sample_rate: float,
                           steps: int, ema_decay: float | None = None, checkpoint_every: int = 2,
                           progress: bool = False):
    """`steps` DP-SGD steps (sigma 1, C 1) of a tiny autoencoder on n random 16x16 images
    (seed 0) through the training loop, checkpoints in run_dir. Returns (the initial weights,
    the model train_stage hands on, the ledger)."""
    from dplatent.models.autoencoder import Autoencoder, reconstruction_loss
    from dplatent.privacy.accounting import StagePlan
    from dplatent.privacy.ledger import Ledger
    from dplatent.train.loop import StageSettings, train_stage

    torch.manual_seed(0)
    x = torch.rand(n, 1, 16, 16)
    model = Autoencoder(in_channels=1, image_size=16, channels=(8,), latent_channels=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = StagePlan(stage="autoencoder", batch_size=batch_size, sample_rate=sample_rate,
                     steps=steps, noise_multiplier=1.0, clip_norm=1.0, epsilon_alone=0.0)
    settings = StageSettings(name="autoencoder", plan=plan, lr=1e-2, physical_batch_size=8,
                             grad_mode="hooks", ema_decay=ema_decay,
                             checkpoint_every=checkpoint_every, seed=0)
    ledger = Ledger(accountant="rdp", target_epsilon=100.0, delta=1e-5)
    out = train_stage(model, n, lambda m, idx, g: reconstruction_loss(m, x[idx]), settings,
                      ledger, run_dir, progress=progress)
    return before, out, ledger


# ------------------------------------------------ comparing checkpoints


def assert_same_state(a, b, where: str = "") -> None:
    """Bitwise equality of nested checkpoint contents (tensors, numbers, containers)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs (max abs diff " \
            f"{(a.double() - b.double()).abs().max().item() if a.is_floating_point() else '-'})"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same_state(u, v, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"

"""Downstream classifiers: train on synthetic, test on real data (DPDM / DPImageBench protocol).

For each seed: the synthetic set is split into train and a held-out *synthetic* validation
part; the model is trained for a fixed number of epochs and the epoch with the best
validation accuracy is kept; only that model is evaluated, once, on the real test set.
The real test set never influences training or model selection.

Everything runs on the given device (default: the CPU); batch order comes from a CPU
generator, so the same seed visits the same batches on every device.

Models: the CNN of this literature (conv 32/64/128, dense 128, dropout 0.5, Adam), an MLP
(flatten -> 100 -> classes) and logistic regression (one linear layer, Adam).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from dplatent.data import LabelledImages
from dplatent.errors import ConfigError, DataError
from dplatent.eval.fid import torch_threads

KINDS = ("cnn", "mlp", "logreg")


@dataclass(frozen=True)
class ClassifierConfig:
    epochs: int = 10
    batch_size: int = 256
    lr: float = 1e-3
    val_fraction: float = 0.1
    seeds: int = 3
    first_seed: int = 0  # seeds first_seed .. first_seed + seeds - 1: add seeds to a record
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.seeds < 1:
            raise ConfigError(f"classifier epochs, batch size and seeds must be positive: {self}")
        if self.first_seed < 0:
            raise ConfigError(f"the first classifier seed must be >= 0, got {self.first_seed}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"validation fraction must lie in (0, 1), got {self.val_fraction}")
        if self.lr <= 0:
            raise ConfigError(f"learning rate must be positive, got {self.lr}")


# Epoch defaults per model kind (the CNN is the slow one on CPU).
DEFAULT_EPOCHS = {"cnn": 10, "mlp": 20, "logreg": 20}


@dataclass(frozen=True)
class ClassifierResult:
    kind: str
    accuracy: float  # mean real-test accuracy over seeds, a fraction
    std: float  # sample standard deviation over seeds (ddof=1; 0 for one seed)
    per_seed: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)  # synthetic validation, per seed
    best_epoch: list[int] = field(default_factory=list)  # 1-based, per seed
    epochs: int = 0
    seconds: float = 0.0


# ----------------------------------------------------------------------------- models


class CNN(nn.Module):
    """Three 3x3 conv blocks (32, 64, 128 channels, ReLU, 2x2 max-pool), dense 128, dropout 0.5.

    The flatten size is computed from the input shape, so 28x28 grey, 32x32 and 64x64 RGB all
    work.
    """

    def __init__(self, channels: int, size: int, num_classes: int) -> None:
        super().__init__()
        blocks = []
        for c_in, c_out in ((channels, 32), (32, 64), (64, 128)):
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*blocks)
        with torch.no_grad():
            flat = self.features(torch.zeros(1, channels, size, size)).numel()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, 128), nn.ReLU(), nn.Dropout(0.5),
                                  nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def make_model(kind: str, channels: int, size: int, num_classes: int) -> nn.Module:
    in_features = channels * size * size
    if kind == "cnn":
        return CNN(channels, size, num_classes)
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(in_features, 100), nn.ReLU(),
                             nn.Linear(100, num_classes))
    if kind == "logreg":
        return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))
    raise ConfigError(f"unknown classifier {kind!r}; choose from {KINDS}")


# ----------------------------------------------------------------------------- protocol


def to_tensors(images: LabelledImages) -> tuple[torch.Tensor, torch.Tensor]:
    """Float images centred to [-0.5, 0.5] (N, C, H, W) and int64 labels."""
    return torch.from_numpy(images.to_float() - 0.5), torch.from_numpy(images.y.astype(np.int64))


def split_indices(n: int, val_fraction: float, rng: np.random.Generator) -> tuple[np.ndarray,
                                                                                   np.ndarray]:
    """Disjoint random (train, validation) indices of range(n); both non-empty."""
    if n < 2:
        raise DataError(f"need at least 2 synthetic records to hold out a validation split, "
                        f"got {n}")
    perm = rng.permutation(n)
    n_val = min(max(1, round(n * val_fraction)), n - 1)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """[N] predicted classes, in batches, with the model in eval mode and no autograd."""
    model.eval()
    return torch.cat([model(x[start:start + batch_size]).argmax(dim=1)
                      for start in range(0, len(x), batch_size)])


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    return int((predict(model, x, batch_size) == y).sum()) / len(y)


def train_one_epoch(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
                    y: torch.Tensor, batch_size: int, gen: torch.Generator) -> None:
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    order = torch.randperm(len(y), generator=gen).to(x.device)
    for start in range(0, len(y), batch_size):
        idx = order[start:start + batch_size]
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()


def train_select(model: nn.Module, train: tuple[torch.Tensor, torch.Tensor],
                 val: tuple[torch.Tensor, torch.Tensor], config: ClassifierConfig,
                 seed: int) -> tuple[nn.Module, float, int]:
    """Train for config.epochs; return (model at best validation epoch, its val acc, epoch)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    best_state, best_acc, best_epoch = None, -1.0, 0
    for epoch in range(1, config.epochs + 1):
        train_one_epoch(model, opt, *train, config.batch_size, gen)
        acc = accuracy(model, *val)
        if acc > best_acc:
            best_state, best_acc, best_epoch = copy.deepcopy(model.state_dict()), acc, epoch
    model.load_state_dict(best_state)
    return model, best_acc, best_epoch


def check_compatible(train: LabelledImages, test: LabelledImages) -> None:
    """The training (synthetic) set must match the real set's image shape and class count."""
    if train.x.shape[1:] != test.x.shape[1:]:
        raise DataError(f"{train.name}: images have shape {train.x.shape[1:]}, but {test.name} "
                        f"has {test.x.shape[1:]}")
    if train.num_classes != test.num_classes:
        raise DataError(f"{train.name}: {train.num_classes} classes, but {test.name} has "
                        f"{test.num_classes}")


def downstream_accuracy(kind: str, train: LabelledImages, test: LabelledImages,
                        config: ClassifierConfig,
                        device: torch.device | None = None) -> ClassifierResult:
    """Train `kind` on `train` (selection on a held-out part of it), test once on `test`.
    Input channels and size come from the data; models and tensors live on `device`."""
    check_compatible(train, test)
    device = torch.device("cpu") if device is None else device
    start = time.perf_counter()
    x, y = (t.to(device) for t in to_tensors(train))
    x_test, y_test = (t.to(device) for t in to_tensors(test))
    test_accs, val_accs, epochs = [], [], []
    with torch_threads(config.threads):
        for seed in range(config.first_seed, config.first_seed + config.seeds):
            torch.manual_seed(seed)
            tr, va = split_indices(len(y), config.val_fraction, np.random.default_rng(seed))
            model = make_model(kind, train.channels, train.image_size, train.num_classes)
            model = model.to(device)
            tr, va = torch.from_numpy(tr).to(device), torch.from_numpy(va).to(device)
            model, val_acc, epoch = train_select(model, (x[tr], y[tr]), (x[va], y[va]),
                                                 config, seed)
            test_accs.append(accuracy(model, x_test, y_test))
            val_accs.append(val_acc)
            epochs.append(epoch)
    std = float(np.std(test_accs, ddof=1)) if len(test_accs) > 1 else 0.0
    return ClassifierResult(kind=kind, accuracy=float(np.mean(test_accs)), std=std,
                            per_seed=test_accs, val_accuracy=val_accs, best_epoch=epochs,
                            epochs=config.epochs, seconds=time.perf_counter() - start)


def real_ceiling(kind: str, real_train: LabelledImages, real_test: LabelledImages,
                 config: ClassifierConfig, device: torch.device | None = None) -> ClassifierResult:
    """The same protocol on the real training set: the accuracy a perfect generator reaches."""
    return downstream_accuracy(kind, real_train, real_test, config, device)

"""Which device the models run on: `auto`, `cpu`, `cuda` or `cuda:N`.

Every command runs the same code on every device: models and tensors are moved with
`.to(device)` and random generators are created on the device whose tensors they fill.
`auto` picks the current CUDA GPU when torch sees one, else the CPU. No mixed precision is
used: per-example gradient norms, clipping and noise stay in float32 everywhere.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from dplatent.errors import ConfigError

if TYPE_CHECKING:
    import torch

CHOICES = ("auto", "cpu", "cuda")
_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_spec(spec: str) -> str:
    """`spec` if it names a device option (no torch needed); ConfigError otherwise."""
    if not isinstance(spec, str) or not _PATTERN.fullmatch(spec):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    return spec


def check_processes(spec: str, world_size: int) -> str:
    """`spec` if it suits `world_size` training processes; ConfigError otherwise. Several
    processes each take the GPU of their local rank (plain `cuda` or `auto`); an explicit
    `cuda:N` would put every one of them on the same GPU."""
    text = check_spec(spec)
    if world_size > 1 and text.startswith("cuda:"):
        raise ConfigError(f"device {text!r} would put all {world_size} training processes on "
                          "one GPU; use --device cuda or --device auto with several processes")
    return text


def resolve(spec: str = "auto") -> torch.device:
    """The torch device for an option value; a clear error when a GPU is asked for and absent."""
    import torch
    text = check_spec(spec)
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = (f"CUDA {torch.version.cuda}" if torch.version.cuda
                 else "a CPU-only build")
        raise ConfigError(f"device {text!r}: no CUDA GPU is available (torch "
                          f"{torch.__version__}, {build}); use --device cpu or --device auto")
    # plain `cuda` is the current CUDA device: GPU 0, or the one a training process was given
    # with torch.cuda.set_device (one GPU per process)
    index = int(text.partition(":")[2]) if ":" in text else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(f"device {text!r}: only {count} CUDA GPU(s) visible "
                          f"(cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


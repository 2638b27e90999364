"""Several training processes on one machine: process group, roles, launcher.

Start them with `torchrun --nproc-per-node N -m dplatent train ...` or with
`dplatent train --nproc N ...` (which runs the same torch.distributed launcher itself).

How one logical DP-SGD step is shared by W processes (the privacy analysis is unchanged, so
the ledger's epsilon is exactly that of a single process with the same configuration):

* Sampling. Every process holds the whole data set and a sampling generator in the same state.
  Each draws the same Poisson sample of the whole data set (each record in independently with
  probability q: the single-process sampler, draw for draw) and keeps its share, every W-th
  index from its rank on (dp_training.poisson_batches). The shares are disjoint and their union
  is the logical batch, whose expected size is q n over all processes.
* Clipping and noise (dp_training.make_trainer, Opacus' DPDDP and distributed DP optimizers):
  each process clips its examples' gradients to norm C and sums them; rank 0 alone adds one
  draw of N(0, (sigma C)^2), from the same noise generator a single process uses; the sums are
  all-reduced and divided by q n. Every process applies the same gradient, so all hold the
  same parameters after every step (DPDDP broadcasts rank 0's at the start).
* Writing. Only rank 0 writes the run directory (configuration, checkpoints, ledger, logs,
  timings). Checkpoints also hold every process's loss generator state, so a run resumed with
  the same number of processes continues exactly; resumed with another number (or by a single
  process) it continues with the same sampling and noise streams.

Backends: gloo for CPU tensors; on a machine with CUDA, NCCL for CUDA tensors (and gloo for
CPU ones), each process using the GPU numbered by its local rank.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from dplatent import device
from dplatent.errors import DplatentError


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Whether this process writes the run's files (the only process, or rank 0)."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def all_gather(obj: Any) -> list[Any]:
    """`obj` of every process, by rank ([obj] for a single process)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def launched_world_size() -> int:
    """The number of processes a launcher (torchrun, `launch`) started this one among."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError as exc:
        raise DplatentError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from exc


TIMEOUT_ENV = "DPLATENT_COLLECTIVE_TIMEOUT"


def collective_timeout() -> datetime.timedelta | None:
    """How long a collective (a barrier, a broadcast, the gradients' all-reduce) waits for the
    other processes before it fails: `$DPLATENT_COLLECTIVE_TIMEOUT` seconds, else None
    (torch's default, 30 minutes). A process that never arrives then stops the run with an
    error instead of holding every other process for that long."""
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not seconds > 0 or math.isinf(seconds):
        raise DplatentError(f"{TIMEOUT_ENV}={text!r} is not a positive number of seconds")
    return datetime.timedelta(seconds=seconds)


def backend() -> str:
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


@contextlib.contextmanager
def process_group(nproc: int | None = None) -> Iterator[None]:
    """Join the process group a launcher described in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT); nothing to do for a single process. `nproc`: the number of
    processes asked for, checked against the launcher's."""
    world = launched_world_size()
    timeout = collective_timeout()
    if nproc is not None and nproc != world and (world > 1 or nproc > 1):
        raise DplatentError(f"--nproc {nproc} but the launcher started {world} process(es)")
    if world <= 1 or dist.is_initialized():
        yield
        return
    if not dist.is_available():
        raise DplatentError("this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    if "OMP_NUM_THREADS" not in os.environ:
        # threads = 0 ("all cores") then means this process's share of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    dist.init_process_group(backend=backend(), timeout=timeout)
    try:
        yield
    finally:
        dist.destroy_process_group()


def train(nproc: int | None = None, **kwargs: Any) -> dict | None:
    """`stages.train(**kwargs)` in `nproc` processes: started here when no launcher started
    this one, else this process's part of the launcher's group. Returns the result's "timings"
    and "ledger" in the main process, None elsewhere."""
    from dplatent.train import stages
    if nproc is not None and nproc < 1:
        raise DplatentError(f"--nproc must be >= 1, got {nproc}")
    device.check_processes(kwargs["cfg"].device,
                           launched_world_size() if nproc is None else nproc)
    if nproc is not None and nproc > 1 and launched_world_size() <= 1:
        return launch(nproc, _train_worker, kwargs)
    with process_group(nproc):
        return _summary(stages.train(**kwargs))


def _train_worker(kwargs: dict) -> dict | None:
    from dplatent.train import stages
    with process_group():
        return _summary(stages.train(**kwargs))


def _summary(result: dict) -> dict | None:
    """What the launching process reports (the models stay in the run directory)."""
    return {"timings": result["timings"], "ledger": result["ledger"]} if is_main() else None


def launch(nproc: int, fn: Callable[..., Any], *args: Any) -> Any:
    """Run `fn(*args)` in `nproc` new processes of one process group on this machine, with
    torch.distributed's elastic launcher (what torchrun runs); returns rank 0's result.
    `fn` must be a module-level function; it should enter `process_group()`."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc,
                          run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0, start_method="spawn")
    # The launcher logs each failure with a traceback; failures are reported below instead.
    logging.disable(logging.CRITICAL)
    try:
        results = elastic_launch(config, fn)(*args)
    except ChildFailedError as exc:
        raise DplatentError(_failure_message(exc)) from None
    except SignalException as exc:  # Ctrl-C or a kill: the workers have been stopped
        raise KeyboardInterrupt from exc
    finally:
        logging.disable(logging.NOTSET)
    return results[0]


def _error_names(cls: type = DplatentError) -> set[str]:
    return {cls.__name__}.union(*(_error_names(c) for c in cls.__subclasses__()))


def _failure_message(exc: Exception) -> str:
    """One line for the first failed process: the message of a DplatentError (a problem the
    user can fix, as a single process reports it); any other error's traceback goes to
    stderr first."""
    failed_rank, failure = exc.get_first_failure()
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    lines = str(message).strip().splitlines()
    last = lines[-1] if lines else f"exit code {failure.exitcode}"
    name, sep, text = last.partition(": ")
    if sep and name.rpartition(".")[2] in _error_names():
        return text
    data = failure.error_file_data if isinstance(failure.error_file_data, dict) else {}
    trace = data.get("message", {})
    trace = trace.get("extraInfo", {}).get("py_callstack") if isinstance(trace, dict) else None
    if trace:
        print(trace, file=sys.stderr)
    hint = ""
    if "Timed out" in last:
        hint = (" (another process did not reach the same collective operation in time; "
                f"${TIMEOUT_ENV} sets how many seconds the others wait)")
    return f"training process {failed_rank} failed: {last}{hint}"

"""Data parallelism within one fine-tune: the process group and the few collectives rankopt needs.

Started under ``torchrun`` (or any launcher that sets RANK, WORLD_SIZE, MASTER_ADDR, ...), every
process trains the same adapters on its shard of each global batch. The model is not wrapped in
DistributedDataParallel: a reallocation replaces parameter tensors, which DDP's gradient buckets
are built around, and the rank controller must read the summed task gradient before the
orthogonality penalty adds its own. Instead the trainable gradients are summed in one collective
per optimizer step (a LoRA fine-tune trains few parameters, so overlapping that with the
backward buys little), and every decision that changes a shape is taken on rank 0 and
broadcast. One process (no launcher) is the same code with every collective a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from rankopt.errors import RankoptError

TIMEOUT_ENV = "RANKOPT_COLLECTIVE_TIMEOUT"  # seconds a collective waits for a lost peer (default 600)


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes training one fine-tune."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The one process that writes (MLflow, checkpoints, exports) and talks to Optuna."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1


def current() -> Processes:
    """The process group rankopt trains in (one process when none was started)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return Processes()
    return Processes(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def launched() -> bool:
    """True when a launcher started this process as one of several (torchrun sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_environment(device: str | None = None) -> Processes:
    """Join the launcher's process group once per process (gloo on CPU, NCCL on CUDA).

    On CUDA each process takes the GPU of its LOCAL_RANK, so a preset's ``training.device: cuda``
    means "this process's GPU". Collectives give up after ``RANKOPT_COLLECTIVE_TIMEOUT`` seconds
    (default 600), so a peer that died or hung ends the job instead of stalling it. ``device``
    None: CUDA when this machine has it.
    """
    if not launched():
        return current()
    dist = torch.distributed
    if not dist.is_initialized():
        cuda = device.startswith("cuda") if device is not None else torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=collective_timeout()))
    return current()


def collective_timeout() -> float:
    raw = os.environ.get(TIMEOUT_ENV, "600")
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if seconds <= 0:
        raise RankoptError(f"{TIMEOUT_ENV}={raw!r} is not a positive number of seconds; set it to e.g. 600")
    return seconds


def shutdown() -> None:
    """Leave the process group (at the end of a command), waiting for the others first."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def check_divisible(batch_size: int, what: str = "training.batch_size") -> None:
    """Every process must get an equal share of each micro-batch."""
    world = current().world
    if batch_size % world:
        raise RankoptError(f"{what}={batch_size} (the global micro-batch) does not split over {world} processes; "
                           f"make it a multiple of {world}")


def shard(batch: dict, procs: Processes | None = None) -> dict:
    """This process's rows of a collated global batch: a contiguous 1/world slice of every tensor."""
    procs = procs or current()
    if not procs.parallel:
        return batch
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value) and value.dim() > 0:
            size = value.shape[0] // procs.world
            value = value[procs.rank * size:(procs.rank + 1) * size]
        out[key] = value
    return out


def my_share(n: int, procs: Processes | None = None) -> range:
    """The indices of ``n`` items this process handles (every world-th, starting at its rank)."""
    procs = procs or current()
    return range(procs.rank, n, procs.world)


def sum_gradients(params: list[torch.Tensor], extra: torch.Tensor | None = None) -> torch.Tensor | None:
    """Sum the parameters' gradients (and ``extra``, e.g. the step's loss) over all processes, in one collective.

    A parameter without a gradient here (its shard had no targets) counts as zeros and gets the sum.
    Returns the summed ``extra``.
    """
    if not current().parallel:
        return extra
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    pieces = [g.reshape(-1).float() for g in grads] + ([extra.reshape(1).float()] if extra is not None else [])
    flat = torch.cat(pieces)
    torch.distributed.all_reduce(flat)
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
        offset += n
    return flat[offset].reshape(()).to(extra.dtype) if extra is not None else None


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over all processes (in place; itself on one process).

    NCCL reduces only CUDA tensors: a CPU tensor (a few counters) makes the trip through this
    process's GPU.
    """
    if not current().parallel:
        return tensor
    device = collective_device()
    if tensor.device == device:
        torch.distributed.all_reduce(tensor)
        return tensor
    moved = tensor.to(device)
    torch.distributed.all_reduce(moved)
    return tensor.copy_(moved)


def collective_device() -> torch.device:
    """Where the process group's collectives run: this process's GPU under NCCL, else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj=None):
    """Rank 0's ``obj`` on every process (pickled)."""
    if not current().parallel:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list:
    """Every process's ``obj``, in rank order, on every process."""
    procs = current()
    if not procs.parallel:
        return [obj]
    out = [None] * procs.world
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_tensors(tensors: list[torch.Tensor]) -> None:
    """Overwrite ``tensors`` with rank 0's values (in place), in one collective per dtype."""
    if not current().parallel or not tensors:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    with torch.no_grad():
        for group in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            torch.distributed.broadcast(flat, src=0)
            offset = 0
            for t in group:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()


def is_peer_failure(exc: BaseException) -> bool:
    """True for the errors a collective raises when a peer died, hung past the timeout or never came.

    torch raises DistError subclasses for some; gloo's transport errors still arrive as plain
    RuntimeErrors naming gloo (or NCCL's, NCCL).
    """
    if isinstance(exc, torch.distributed.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and current().parallel and any(
        marker in text for marker in ("gloo", "NCCL", "Connection reset", "Connection closed", "Timed out"))


def check_same(value, what: str) -> None:
    """Fail on every process, in one line, when ``value`` differs between processes."""
    values = gather_objects(value)
    if any(v != values[0] for v in values[1:]):
        raise RankoptError(f"{what} differ between the data-parallel processes; they must start from the same "
                           "preset, data and model files")

"""Multi-process training and embedding with ``torchrun``: process group, rank and world size.

``torchrun --nproc_per_node N --no-python wsdino train CACHE ...`` (or any launcher that
sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``)
starts N copies; :func:`setup` joins them into one process group — NCCL on GPUs, gloo
on CPUs — and gives each its GPU. Training then wraps the student in
``DistributedDataParallel``, shards the field sampler by rank, all-reduces the DINO centre
and writes checkpoints from rank 0 only. Embedding (``wsdino embed`` under torchrun)
deals the chunks of fields out to the ranks and merges them on rank 0; it passes small
Python objects (an error, the per-rank counts) with :func:`broadcast_object` and
:func:`gather_objects`.

Example
-------
>>> from napari_wsdino.core.distributed import setup
>>> info = setup("cpu")          # no torchrun variables: a single process
>>> info.world_size, info.is_main
(1, True)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # True when setup() created the process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device_type: str = "cpu", timeout_s: float = 1800) -> DistInfo:
    """Join the ``torchrun`` process group if there is one (else a single process).

    Parameters
    ----------
    device_type
        ``"cuda"`` → NCCL and ``cuda:LOCAL_RANK``; anything else → gloo.
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(),
                        int(os.environ.get("LOCAL_RANK", dist.get_rank())), False)
    world = env_world_size()
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group(backend, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local, True)


def teardown(info: DistInfo) -> None:
    """Leave the process group if :func:`setup` created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def any_rank(info: DistInfo, flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when ``flag`` is true on any (e.g. a stop request)."""
    if not info.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_object(info: DistInfo, obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (a small picklable object; ``obj`` itself
    in a single process).

    Example
    -------
    >>> broadcast_object(DistInfo(), {"error": None})
    {'error': None}
    """
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(info: DistInfo, obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in a single process).

    Example
    -------
    >>> gather_objects(DistInfo(), 3)
    [3]
    """
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out

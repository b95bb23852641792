"""Distributed runs under ``torchrun``: sharding, reductions, and rank-0-only output.

``torchrun --nproc_per_node N -m prunecp_cli <command> ...`` sets ``WORLD_SIZE``/``RANK``; prunecp
then initialises a process group (NCCL on GPUs, gloo on CPUs), gives each rank every N-th example,
and sums statistics across ranks with :func:`all_reduce_sum`. Without torchrun every function here
is the identity and nothing is initialised.
"""

from __future__ import annotations

import atexit
import os

import numpy as np
import torch
import torch.distributed as tdist

from prunecp_cli.reporting import process_rank


def world_size() -> int:
    """Number of processes (1 unless launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank (0 unless launched by torchrun); see :func:`prunecp_cli.reporting.process_rank`."""
    return process_rank()


def is_distributed() -> bool:
    """True when a process group of more than one process is running."""
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def setup(device: torch.device) -> None:
    """Initialise the process group once when launched by torchrun with more than one process."""
    if world_size() <= 1 or not tdist.is_available() or tdist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tdist.init_process_group(backend=backend)
    # A process that exits with a live gloo group can abort in its C++ destructors ("terminate called
    # without an active exception", SIGABRT) and fail the whole torchrun job: always tear it down.
    atexit.register(teardown)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over all ranks (a new tensor; the input is unchanged)."""
    if not is_distributed():
        return tensor
    out = tensor.detach().clone()
    if tdist.get_backend() == "nccl" and out.device.type != "cuda":
        out = out.cuda()
        tdist.all_reduce(out)
        return out.to(tensor.device)
    tdist.all_reduce(out)
    return out


def shard_dataset(dataset):
    """This rank's share of ``dataset``: every world_size-th example starting at its rank."""
    if not is_distributed():
        return dataset
    return dataset.subset(np.arange(tdist.get_rank(), len(dataset), tdist.get_world_size()))


def shard_batches(dataset, batch_size: int):
    """This rank's share of ``dataset`` in whole batches: batches r, r + W, r + 2W, ... of the single-process order.

    Iterating the result in batches of ``batch_size`` yields exactly the batches a single process
    would see (only fewer of them), so statistics that depend on batch composition (BatchNorm in
    training mode) are the same as without torchrun.
    """
    if not is_distributed():
        return dataset
    starts = np.arange(0, len(dataset), batch_size)[tdist.get_rank() :: tdist.get_world_size()]
    rows = [np.arange(s, min(s + batch_size, len(dataset))) for s in starts]
    return dataset.subset(np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64))


def gather_rows(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather per-example rows from all ranks and put them back in dataset order.

    Args:
        tensor: this rank's rows ``[n_local, ...]``.
        index: the dataset position of each row ``[n_local]``.

    Returns:
        All rows ``[n_total, ...]`` sorted by ``index`` (identical on every rank).
    """
    if not is_distributed():
        order = torch.argsort(index)
        return tensor[order]
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(tdist.get_world_size())]
    tdist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    pad = lambda t: torch.cat([t, t.new_zeros((longest - t.shape[0], *t.shape[1:]))])  # noqa: E731
    rows = [torch.zeros_like(pad(tensor)) for _ in sizes]
    idxs = [torch.zeros_like(pad(index)) for _ in sizes]
    tdist.all_gather(rows, pad(tensor).contiguous())
    tdist.all_gather(idxs, pad(index).contiguous())
    rows = torch.cat([r[: int(s.item())] for r, s in zip(rows, sizes, strict=True)])
    idxs = torch.cat([i[: int(s.item())] for i, s in zip(idxs, sizes, strict=True)])
    return rows[torch.argsort(idxs)]


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_distributed():
        tdist.barrier()


def teardown() -> None:
    """Wait for every rank, then destroy the process group (registered at exit by :func:`setup`).

    The barrier keeps a rank that finished early from tearing down while another still talks to
    it; a rank that fails makes torchrun stop the others, so the barrier cannot hang a failed run.
    """
    if not (tdist.is_available() and tdist.is_initialized()):
        return
    try:
        if tdist.get_world_size() > 1:
            tdist.barrier()
    finally:
        tdist.destroy_process_group()

"""Private data-parallel training over ``torch.distributed`` (gloo on CPU, NCCL on GPU; launched by torchrun).

How one logical step stays one release of sensitivity C with the noise added once:

* **Sampling.** The (public) index set is split into shards, one per rank (``indices[rank::world_size]``);
  every rank draws its own Poisson sample of its shard at the GLOBAL rate q. The union over ranks is then a
  Poisson sample of the whole set at rate q (each example lives on exactly one rank), which is what the
  accountant counts, with ``B̄ = q·N`` over all N examples. Empty per-rank batches are normal.
* **Clipping.** Each rank clips its own examples (the engine, as in one process).
* **Release.** The ranks sum their clipped sums with one bucketed ``all_reduce`` per step; then every rank
  adds the SAME Gaussian noise (a key agreed once at start: rank 0 draws it from the OS and broadcasts it over
  the process group; it is never saved) at the same counters, and divides by the global ``B̄``. So the noise
  enters the release once, and every rank holds bit-identical released gradients and, from identical
  initial weights (broadcast from rank 0 by ``make_private``), identical weights.
* **Checks.** Before every release the ranks agree that all of them passed their checks (a small
  ``all_reduce``): one rank's refusal makes every rank raise the same error instead of leaving the others
  waiting in the data ``all_reduce``. A rank that dies or raises anywhere else leaves the others waiting
  until the process group's timeout (``torch.distributed.init_process_group(timeout=...)``), as in any
  data-parallel job.

DDP: ``DistributedDataParallel``'s gradient reducer hooks the parameters' gradient accumulators, which never
receive a gradient here (the engine forms the clipped sums itself), so it has nothing to reduce. ``make_private``
therefore unwraps a DDP (or Opacus DPDDP) model and the optimizer's all-reduce takes the reducer's place.
Multi-node runs change nothing but the launcher.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from .data import PoissonDataLoader, _check_index_set
from .validation import PrivacyConfigError

#: bytes per all-reduce bucket of clipped sums
BUCKET_BYTES = 64 << 20


def is_distributed() -> bool:
    """True inside an initialized process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _device_for_collectives(like: Optional[Tensor] = None) -> torch.device:
    """gloo reduces CPU tensors, NCCL CUDA tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree_on_key(seed: Optional[int] = None) -> int:
    """The noise key every rank uses: rank 0's ``seed`` (insecure, experiments) or a fresh 63-bit key from
    rank 0's OS randomness, broadcast to all ranks over the process group (never written anywhere)."""
    dev = _device_for_collectives()
    key = torch.tensor([seed if seed is not None else secrets.randbits(63)], dtype=torch.int64, device=dev)
    dist.broadcast(key, src=0)
    return int(key.item())


def config_fingerprint(*values) -> int:
    """A 62-bit digest of ``values`` (their ``repr``): equal on two ranks iff they hold the same settings."""
    digest = hashlib.sha256(repr(values).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


def all_ranks_agree(ok: bool, fingerprint: int = 0) -> Tuple[bool, bool]:
    """``(ok on every rank, every rank passed the same fingerprint)``, from one small all-reduce (every rank
    gets the same answer)."""
    flags = torch.tensor([1 if ok else 0, fingerprint, -fingerprint], dtype=torch.int64,
                         device=_device_for_collectives())
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    all_ok, lowest, highest = int(flags[0]), int(flags[1]), -int(flags[2])
    return bool(all_ok), lowest == highest


def all_reduce_sums(tensors: List[Tensor]) -> float:
    """Sum ``tensors`` (in place) over all ranks, in buckets of at most :data:`BUCKET_BYTES` of one dtype;
    returns the seconds spent communicating."""
    start = time.perf_counter()
    dev = _device_for_collectives()
    by_dtype: Dict[torch.dtype, List[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        bucket: List[Tensor] = []
        size = 0
        for t in group:
            nbytes = t.numel() * t.element_size()
            if bucket and size + nbytes > BUCKET_BYTES:
                _reduce_bucket(bucket, dev)
                bucket, size = [], 0
            bucket.append(t)
            size += nbytes
        if bucket:
            _reduce_bucket(bucket, dev)
    return time.perf_counter() - start


def _reduce_bucket(bucket: List[Tensor], dev: torch.device) -> None:
    flat = torch.cat([b.reshape(-1) for b in bucket]).to(dev)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for b in bucket:
        n = b.numel()
        b.copy_(flat[offset:offset + n].view_as(b))
        offset += n


@torch.no_grad()
def broadcast_module(module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (identical starting weights)."""
    dev = _device_for_collectives()
    for t in list(module.parameters()) + list(module.buffers()):
        buf = t.detach().to(dev).clone()
        dist.broadcast(buf, src=0)
        t.copy_(buf.to(t.device))


class DistributedPoissonDataLoader(PoissonDataLoader):
    """This rank's Poisson loader: its shard ``indices[rank::world_size]`` of the public index set (default:
    the whole dataset), sampled at the GLOBAL rate q. ``global_num_samples`` (N) and
    ``global_expected_batch_size`` (q·N) are what the accountant and the release use; ``expected_batch_size``
    is this rank's share. Every rank yields the same number of batches per epoch."""

    def __init__(self, dataset, *, sample_rate: float, world_size: int, rank: int, steps: Optional[int] = None,
                 indices=None, **kwargs):
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise PrivacyConfigError(f"rank {rank!r} and world_size {world_size!r} do not form a process group")
        # distinct over ALL ranks: a duplicate split across two shards would be sampled twice per step
        everyone = np.arange(len(dataset)) if indices is None else _check_index_set(indices)
        if len(everyone) < world_size:
            raise PrivacyConfigError(f"{len(everyone)} examples cannot be sharded over {world_size} ranks")
        shard = everyone[rank::world_size]
        if steps is None:
            steps = max(1, round(1.0 / sample_rate))
        super().__init__(dataset, sample_rate=sample_rate, indices=shard, steps=steps, **kwargs)
        self.world_size, self.rank = world_size, rank
        self.global_num_samples = int(len(everyone))
        self.global_expected_batch_size = float(sample_rate) * len(everyone)

    @classmethod
    def from_data_loader(cls, loader, generator=None, *, insecure_seed=None, world_size: Optional[int] = None,
                         rank: Optional[int] = None) -> "DistributedPoissonDataLoader":
        """From a per-rank ``DataLoader`` (e.g. with a ``DistributedSampler``, as in PyTorch's DDP recipes):
        q = its per-rank batch size / the per-rank share of the data, the same steps per epoch."""
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, torch.utils.data.DistributedSampler):
            world_size, rank = sampler.num_replicas, sampler.rank
        world_size = dist.get_world_size() if world_size is None else world_size
        rank = dist.get_rank() if rank is None else rank
        if loader.batch_size is None:
            raise PrivacyConfigError("cannot derive the sampling rate: the loader has no batch_size")
        n = len(loader.dataset)
        per_rank = -(-n // world_size)
        collate = getattr(loader.collate_fn, "collate_fn", loader.collate_fn)
        return cls(loader.dataset, sample_rate=min(1.0, loader.batch_size / per_rank), world_size=world_size,
                   rank=rank, steps=max(1, len(loader)), generator=generator, insecure_seed=insecure_seed,
                   num_workers=loader.num_workers, collate_fn=collate, pin_memory=loader.pin_memory)


def unwrap_data_parallel(module: nn.Module) -> Tuple[nn.Module, bool]:
    """``(inner module, was wrapped)`` for ``DistributedDataParallel`` / Opacus' ``DPDDP``."""
    names = {c.__name__ for c in type(module).__mro__}
    if names & {"DistributedDataParallel", "DifferentiallyPrivateDistributedDataParallel", "DPDDP"}:
        return module.module, True
    return module, False


__all__ = ["is_distributed", "agree_on_key", "all_ranks_agree", "config_fingerprint", "all_reduce_sums", "broadcast_module",
           "DistributedPoissonDataLoader", "unwrap_data_parallel", "BUCKET_BYTES"]

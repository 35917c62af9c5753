"""Poisson sampling and micro-batching for DP training.

The privacy analysis of DP-SGD / DP-SAT (see :mod:`dpsat_fast.accounting`)
assumes *Poisson sampling*: at every step each of the ``N`` examples is
included in the batch independently with probability ``q``. Hence

* the batch size ``B ~ Binomial(N, q)`` is random (mean ``qN``, variance
  ``qN(1-q)``) and may be 0, which is a normal step (pure noise);
* the *expected* batch size ``B̄ = qN`` is public and is what the noisy sum
  is divided by — never the realized ``B``;
* ``q`` is a property of the sampler, not of ``len(loader)`` (the number of
  steps is a free choice).

A shuffled fixed-size DataLoader does *not* satisfy these assumptions; use
:class:`PoissonDataLoader` (or :meth:`PoissonDataLoader.from_data_loader`).

The sampler draws its inclusion mask with ``torch.rand``; pass a seeded
``torch.Generator`` for reproducibility. (A cryptographically secure source
is out of scope here: like the other PyTorch DP libraries, the default PRNG
is used.)
"""

from __future__ import annotations

import collections.abc
import math
import numbers
import operator
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data import default_collate

from .validation import check_sample_rate

__all__ = [
    "PoissonBatchSampler",
    "PoissonDataLoader",
    "split_micro_batches",
    "is_poisson_loader",
]


# --------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------


def _check_positive_int(n: Any, name: str) -> int:
    try:
        if isinstance(n, bool):
            raise TypeError
        value = operator.index(n)
    except TypeError:
        raise ValueError(f"{name} must be a positive integer (got {n!r}).") from None
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer (got {n!r}).")
    return int(value)


# --------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------


class PoissonBatchSampler(Sampler[list[int]]):
    """Batch sampler with independent Bernoulli(q) inclusion of every index.

    At each of ``steps`` steps, index ``i ∈ {0, …, N-1}`` is in the batch iff
    ``U_i < q`` for fresh ``U_i ~ Uniform[0, 1)`` (``torch.rand(N)``), so the
    inclusions are i.i.d. Bernoulli(q) across indices and steps, the batch
    size is ``Binomial(N, q)``, and a batch may be empty (yielded as ``[]``).

    Args:
        num_samples: dataset size ``N`` (> 0).
        sample_rate: ``q ∈ (0, 1]``.
        steps: batches per iteration (per "epoch"); default ``round(1/q)``,
            i.e. one expected pass over the data.
        generator: optional ``torch.Generator`` (seed it for reproducibility);
            the global torch RNG is used when ``None``.
    """

    def __init__(
        self,
        num_samples: int,
        sample_rate: float,
        steps: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        self.num_samples: int = _check_positive_int(num_samples, "num_samples")
        self.sample_rate: float = check_sample_rate(sample_rate)
        if steps is None:
            steps = max(1, round(1.0 / self.sample_rate))
        self.steps: int = _check_positive_int(steps, "steps")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None (got {type(generator).__name__}).")
        self.generator = generator

    @property
    def expected_batch_size(self) -> float:
        """The public expected batch size ``B̄ = q·N`` (a float)."""
        return self.sample_rate * self.num_samples

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            mask = torch.rand(self.num_samples, generator=self.generator) < self.sample_rate
            yield mask.nonzero().flatten().tolist()

    def __repr__(self) -> str:
        return (
            f"PoissonBatchSampler(num_samples={self.num_samples}, sample_rate={self.sample_rate}, "
            f"steps={self.steps})"
        )


# --------------------------------------------------------------------------
# Collation of possibly-empty batches
# --------------------------------------------------------------------------


def _empty_like_batch(batch: Any) -> Any:
    """Map a collated batch of one example to the same structure with 0 examples.

    Tensors ``(1, *shape)`` become ``(0, *shape)`` with the same dtype/device;
    mappings, namedtuples, tuples and lists are rebuilt; a list of non-tensor
    leaves (e.g. strings) becomes ``[]``.
    """
    if isinstance(batch, torch.Tensor):
        return batch[:0].clone()
    if isinstance(batch, collections.abc.Mapping):
        items = {k: _empty_like_batch(v) for k, v in batch.items()}
        try:
            return type(batch)(items)  # type: ignore[call-arg]
        except TypeError:
            return items
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_empty_like_batch(v) for v in batch))
    if isinstance(batch, (tuple, list)):
        if any(isinstance(v, (torch.Tensor, collections.abc.Mapping, tuple, list)) for v in batch):
            return type(batch)(_empty_like_batch(v) for v in batch)
        return type(batch)()  # a per-example list of plain leaves (e.g. strings)
    return batch


class _EmptySafeCollate:
    """Collate function that also handles the empty batch ``[]``.

    Non-empty batches go to ``collate_fn`` unchanged. For an empty batch the
    output structure, trailing shapes and dtypes are derived from
    ``collate_fn([dataset[0]])`` (computed once, lazily) with every tensor cut
    to 0 rows. A picklable object, so it works with ``num_workers > 0``.
    """

    def __init__(self, dataset: Dataset, collate_fn: Callable[[list[Any]], Any]) -> None:
        self.dataset = dataset
        self.collate_fn = collate_fn
        self._empty: Any = None

    def __call__(self, batch: list[Any]) -> Any:
        if len(batch) > 0:
            return self.collate_fn(batch)
        if self._empty is None:
            self._empty = _empty_like_batch(self.collate_fn([self.dataset[0]]))
        return self._empty


# --------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------


class PoissonDataLoader(DataLoader):
    """A ``DataLoader`` whose batches are Poisson samples (see :class:`PoissonBatchSampler`).

    Give exactly one of ``sample_rate`` (q) or ``expected_batch_size``
    (then ``q = expected_batch_size / len(dataset)``). Batches have random
    size and may be empty; an empty batch is collated to tensors of shape
    ``(0, *sample_shape)`` with the dtypes a one-example batch would have.

    Attributes:
        sample_rate: q.
        expected_batch_size: the public ``B̄ = q·N`` (float) to divide noisy sums by.
        num_samples: ``N = len(dataset)``.
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        sample_rate: Optional[float] = None,
        expected_batch_size: Optional[int] = None,
        steps: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        num_workers: int = 0,
        collate_fn: Optional[Callable[[list[Any]], Any]] = None,
        pin_memory: bool = False,
    ) -> None:
        try:
            n = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError(
                "PoissonDataLoader needs a map-style dataset with __len__ (Poisson sampling draws "
                "from a known N); IterableDataset is not supported."
            ) from None
        if n <= 0:
            raise ValueError("PoissonDataLoader needs a non-empty dataset (len(dataset) == 0).")
        if (sample_rate is None) == (expected_batch_size is None):
            raise ValueError(
                "give exactly one of sample_rate (q in (0, 1]) or expected_batch_size "
                f"(in (0, len(dataset)]) (got sample_rate={sample_rate!r}, "
                f"expected_batch_size={expected_batch_size!r})."
            )
        if expected_batch_size is not None:
            if (
                not isinstance(expected_batch_size, numbers.Real)
                or isinstance(expected_batch_size, bool)
                or not math.isfinite(float(expected_batch_size))
                or not (0 < float(expected_batch_size) <= n)
            ):
                raise ValueError(
                    f"expected_batch_size must be a number in (0, len(dataset)={n}] "
                    f"(got {expected_batch_size!r})."
                )
            q = float(expected_batch_size) / n
        else:
            q = check_sample_rate(sample_rate)
        sampler = PoissonBatchSampler(n, q, steps=steps, generator=generator)
        super().__init__(
            dataset,
            batch_sampler=sampler,
            num_workers=num_workers,
            collate_fn=_EmptySafeCollate(dataset, collate_fn if collate_fn is not None else default_collate),
            pin_memory=pin_memory,
        )
        self.sample_rate: float = q
        self.num_samples: int = n
        self.expected_batch_size: float = q * n

    @classmethod
    def from_data_loader(
        cls, loader: DataLoader, generator: Optional[torch.Generator] = None
    ) -> "PoissonDataLoader":
        """Poisson loader matching an ordinary ``DataLoader``.

        Uses ``q = loader.batch_size / len(loader.dataset)``, the same number of
        steps per epoch as ``loader`` (``len(loader)``), and its dataset,
        ``num_workers``, ``collate_fn`` and ``pin_memory``.
        """
        if not isinstance(loader, DataLoader):
            raise ValueError(f"loader must be a torch.utils.data.DataLoader (got {type(loader).__name__}).")
        if loader.batch_size is None:
            raise ValueError(
                "cannot derive the sampling rate: loader.batch_size is None (the loader uses a custom "
                "batch_sampler). Build PoissonDataLoader(dataset, sample_rate=q) or "
                "PoissonDataLoader(dataset, expected_batch_size=B) directly."
            )
        dataset = loader.dataset
        try:
            n = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError("from_data_loader needs a map-style dataset with __len__.") from None
        if n <= 0:
            raise ValueError("from_data_loader needs a non-empty dataset.")
        collate = loader.collate_fn
        if isinstance(collate, _EmptySafeCollate):
            collate = collate.collate_fn
        return cls(
            dataset,
            sample_rate=min(1.0, loader.batch_size / n),
            steps=max(1, len(loader)),
            generator=generator,
            num_workers=loader.num_workers,
            collate_fn=collate,
            pin_memory=loader.pin_memory,
        )


def is_poisson_loader(loader: Any) -> bool:
    """True iff ``loader`` draws its batches with :class:`PoissonBatchSampler`."""
    return isinstance(loader, PoissonDataLoader) or isinstance(
        getattr(loader, "batch_sampler", None), PoissonBatchSampler
    )


# --------------------------------------------------------------------------
# Micro-batching
# --------------------------------------------------------------------------


def _tensor_leaves(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, collections.abc.Mapping):
        return [t for v in batch.values() for t in _tensor_leaves(v)]
    if isinstance(batch, (tuple, list)):
        return [t for v in batch for t in _tensor_leaves(v)]
    raise ValueError(
        f"split_micro_batches supports tensors and (nested) tuples/lists/dicts of tensors; "
        f"found a leaf of type {type(batch).__name__}."
    )


def _slice_batch(batch: Any, start: int, stop: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[start:stop]
    if isinstance(batch, collections.abc.Mapping):
        items = {k: _slice_batch(v, start, stop) for k, v in batch.items()}
        try:
            return type(batch)(items)  # type: ignore[call-arg]
        except TypeError:
            return items
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_slice_batch(v, start, stop) for v in batch))
    return type(batch)(_slice_batch(v, start, stop) for v in batch)


def split_micro_batches(batch: Any, max_physical_batch_size: int) -> Iterator[Any]:
    """Split a logical batch into consecutive chunks of at most ``max_physical_batch_size``.

    ``batch`` is a tensor or a (nested) tuple/list/dict of tensors sharing the
    leading (example) dimension ``B``. Yields ``ceil(B / m)`` chunks that
    concatenate back to ``batch``; an empty batch (``B = 0``) yields exactly
    one empty chunk, so a training loop still performs one normal step.
    """
    m = _check_positive_int(max_physical_batch_size, "max_physical_batch_size")
    leaves = _tensor_leaves(batch)
    if not leaves:
        raise ValueError("split_micro_batches: the batch contains no tensors.")
    if any(t.dim() == 0 for t in leaves):
        raise ValueError("split_micro_batches: every tensor needs a leading batch dimension (found a 0-d tensor).")
    sizes = {int(t.shape[0]) for t in leaves}
    if len(sizes) != 1:
        raise ValueError(
            f"split_micro_batches: all tensors must share the leading batch dimension (found sizes {sorted(sizes)})."
        )
    (b,) = sizes
    if b == 0:
        yield batch
        return
    for start in range(0, b, m):
        yield _slice_batch(batch, start, min(start + m, b))

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

The analysis also assumes that the adversary does not know *which* examples
were sampled. By default the inclusions therefore come from the operating
system's CSPRNG (``os.urandom``), the sampler keeps no random state (nothing
in a checkpoint or a pickled sampler reveals past or future batches), and the
inclusion rate is exactly ``q`` up to ``2^-53``: example ``i`` is included iff
``U_i < K`` for a uniform 53-bit integer ``U_i`` and ``K = ceil(q·2^53)``, so
``P(include) = K/2^53 ∈ [q, q + 2^-53)`` even for tiny ``q`` (``torch.rand(N) <
q`` would use fp32's ``2^-24`` grid: 60× too many inclusions at ``q = 1e-9``).
The comparison is decided lazily from the most significant byte down, so a
step reads about one random byte per example.

For reproducible *experiments* only, ``generator=`` (a seeded
``torch.Generator``) or ``insecure_seed=`` draws the same bytes from a seeded
PRNG instead; this mode is **not private** (whoever knows the seed or the
generator state knows every batch) and warns when it is selected.
"""

from __future__ import annotations

import collections
import collections.abc
import fractions
import math
import numbers
import operator
import os
import sys
import warnings
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data import default_collate
from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter, _SingleProcessDataLoaderIter

from .validation import check_sample_rate

__all__ = [
    "PoissonBatchSampler",
    "PoissonDataLoader",
    "InsecureSamplingWarning",
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


def _check_index_set(indices: Any, name: str = "indices") -> np.ndarray:
    """``indices`` as a 1-D int64 array of distinct non-negative dataset indices (refused otherwise).

    Duplicates are refused: an index listed twice would be included with
    probability ``1 - (1-q)^2 ≈ 2q``, more than the accountant assumes.
    """
    if isinstance(indices, torch.Tensor):
        arr = indices.detach().cpu().numpy()
    elif isinstance(indices, range):
        arr = np.arange(indices.start, indices.stop, indices.step, dtype=np.int64)
    else:
        try:
            arr = np.asarray(indices)
        except Exception:  # noqa: BLE001
            raise ValueError(f"{name} must be a 1-D sequence of dataset indices (got {type(indices).__name__}).") from None
        if arr.dtype == object:  # e.g. a list of numpy/torch integer scalars
            try:
                arr = np.asarray([operator.index(i) for i in arr.ravel()], dtype=np.int64).reshape(arr.shape)
            except TypeError:
                raise ValueError(f"{name} must contain integers (got {indices!r:.80}).") from None
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of dataset indices (got shape {tuple(arr.shape)}).")
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty (Poisson sampling needs N = len({name}) > 0).")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(
            f"{name} must contain integer dataset indices (got dtype {arr.dtype}); a boolean mask can be "
            f"turned into indices with numpy.flatnonzero(mask)."
        )
    arr = arr.astype(np.int64, copy=True)
    if (arr < 0).any():
        raise ValueError(f"{name} must be non-negative dataset indices (found {int(arr.min())}).")
    if np.unique(arr).size != arr.size:
        raise ValueError(
            f"{name} contains duplicates: an index listed twice would be sampled with probability ≈ 2q, "
            f"breaking the privacy analysis. Pass each example once."
        )
    arr.setflags(write=False)
    return arr


# --------------------------------------------------------------------------
# Exact-rate Bernoulli(q) inclusions from random bytes
# --------------------------------------------------------------------------

_U_BITS = 53
_U_RANGE = 1 << _U_BITS
# The 53 bits of U, most significant first, as (shift, width): six full bytes, then 5 bits taken from the
# top of one more byte.
_U_DIGITS = ((45, 8), (37, 8), (29, 8), (21, 8), (13, 8), (5, 8), (0, 5))


def _inclusion_threshold(sample_rate: float) -> int:
    """``K = ceil(q·2^53)`` (exact, via ``Fraction``): ``P(U < K) = K/2^53 ∈ [q, q + 2^-53)``."""
    return math.ceil(fractions.Fraction(sample_rate) * _U_RANGE)


def _bernoulli_positions(n: int, threshold: int, randbytes: Callable[[int], np.ndarray]) -> np.ndarray:
    """Sorted positions ``i ∈ [0, n)`` with ``U_i < threshold`` for i.i.d. uniform 53-bit integers ``U_i``.

    ``U_i`` is revealed lazily, one byte at a time from the most significant
    end (see ``_U_DIGITS``): ``randbytes(m)`` returns ``m`` uniform bytes
    (``uint8``) and is called once for all ``n`` positions, then only for the
    positions whose prefix so far equals the threshold's (a fraction ``2^-8``
    per level), so a step costs ≈ ``n`` random bytes. The decision equals
    ``U_i < threshold`` exactly for the ``U_i`` those bytes spell.
    """
    if threshold >= _U_RANGE:  # q = 1
        return np.arange(n, dtype=np.int64)
    if threshold <= 0:
        return np.zeros(0, dtype=np.int64)
    digits = [(threshold >> shift) & ((1 << width) - 1) for shift, width in _U_DIGITS]
    first = np.asarray(randbytes(n), dtype=np.uint8)
    if first.shape != (n,):
        raise RuntimeError(f"random byte source returned shape {first.shape}, expected ({n},)")
    included = first < digits[0]
    ties = np.flatnonzero(first == digits[0])
    for (_, width), digit in zip(_U_DIGITS[1:], digits[1:]):
        if ties.size == 0:
            break
        draw = np.asarray(randbytes(ties.size), dtype=np.uint8)
        if draw.shape != (ties.size,):
            raise RuntimeError(f"random byte source returned shape {draw.shape}, expected ({ties.size},)")
        if width < 8:
            draw = draw >> (8 - width)
        included[ties[draw < digit]] = True
        ties = ties[draw == digit]
    # Positions still tied have U == threshold exactly: not included (U < K is strict).
    return np.flatnonzero(included)


def _os_random_bytes(m: int) -> np.ndarray:
    """``m`` bytes from the OS CSPRNG (``os.urandom``) as a ``uint8`` array."""
    return np.frombuffer(os.urandom(m), dtype=np.uint8)


class InsecureSamplingWarning(UserWarning):
    """Warned when a Poisson sampler draws from a seeded PRNG (reproducible, not private)."""


def _caller_stacklevel() -> int:
    """``stacklevel`` for ``warnings.warn`` called here that points at the first frame outside this module."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame, level = frame.f_back, level + 1
    return level


def _warn_insecure() -> None:
    warnings.warn(
        "Poisson sampling uses a seeded PRNG (generator= / insecure_seed=): batches are reproducible and NOT "
        "private — anyone who knows the seed or the generator state (e.g. from a checkpoint) can tell which "
        "examples were in every batch, and the differential-privacy guarantee does not hold. Use it for "
        "experiments only; omit generator/insecure_seed for the secure default (OS CSPRNG).",
        InsecureSamplingWarning,
        stacklevel=_caller_stacklevel(),
    )


def _insecure_generator(generator: Any, insecure_seed: Any) -> Optional[torch.Generator]:
    """Resolve the ``generator`` / ``insecure_seed`` arguments to a CPU ``torch.Generator`` or ``None``."""
    if generator is not None and insecure_seed is not None:
        raise ValueError("give at most one of generator and insecure_seed (both select the insecure seeded mode).")
    if insecure_seed is not None:
        if isinstance(insecure_seed, bool) or not isinstance(insecure_seed, numbers.Integral):
            raise ValueError(f"insecure_seed must be an integer (got {insecure_seed!r}).")
        return torch.Generator().manual_seed(int(insecure_seed))
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None (got {type(generator).__name__}).")
    if generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator (got one on {generator.device}).")
    return generator


# --------------------------------------------------------------------------
# Sampler
# --------------------------------------------------------------------------


class PoissonBatchSampler(Sampler[list[int]]):
    """Batch sampler with independent Bernoulli(q) inclusion of every index.

    At each of ``steps`` steps, position ``i ∈ {0, …, N-1}`` is in the batch
    iff ``U_i < ceil(q·2^53)`` for a fresh uniform 53-bit integer ``U_i``, so
    the inclusions are i.i.d. Bernoulli with rate ``ceil(q·2^53)/2^53`` (``q``
    to within ``2^-53``) across positions and steps, the batch size is
    ``Binomial(N, q)``, and a batch may be empty (yielded as ``[]``). Batches
    list their indices in increasing position order.

    By default (``secure``) the random bits come from the OS CSPRNG
    (``os.urandom``) and the sampler holds no random state: nothing on the
    object (or in a checkpoint of it) determines past or future batches.

    Args:
        num_samples: dataset size ``N`` (> 0); may be ``None`` when ``indices``
            is given (it must otherwise equal ``len(indices)``).
        sample_rate: ``q ∈ (0, 1]``.
        steps: batches per iteration (per "epoch"); default ``round(1/q)``,
            i.e. one expected pass over the data.
        generator: **insecure, not private** — a seeded CPU ``torch.Generator``
            to draw the bits from instead of the OS CSPRNG, for reproducible
            experiments; whoever knows its seed or state knows every batch.
            Warns (:class:`InsecureSamplingWarning`).
        indices: optional index set (distinct non-negative ints, e.g. a
            training split): Poisson sampling runs over its positions
            ``0..len(indices)-1`` (``N = len(indices)``) and the batches hold
            the mapped dataset indices ``indices[i]``.
        insecure_seed: **insecure, not private** — shorthand for
            ``generator=torch.Generator().manual_seed(insecure_seed)``.
    """

    def __init__(
        self,
        num_samples: Optional[int],
        sample_rate: float,
        steps: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        *,
        indices: Optional[Sequence[int]] = None,
        insecure_seed: Optional[int] = None,
    ) -> None:
        self.indices: Optional[np.ndarray] = None
        if indices is not None:
            self.indices = _check_index_set(indices)
            if num_samples is None:
                num_samples = int(self.indices.size)
            elif _check_positive_int(num_samples, "num_samples") != self.indices.size:
                raise ValueError(
                    f"num_samples={num_samples!r} but len(indices)={self.indices.size}: with an index set, "
                    f"N is the size of the set (pass num_samples=None)."
                )
        self.num_samples: int = _check_positive_int(num_samples, "num_samples")
        self.sample_rate: float = check_sample_rate(sample_rate)
        if steps is None:
            steps = max(1, round(1.0 / self.sample_rate))
        self.steps: int = _check_positive_int(steps, "steps")
        self.generator: Optional[torch.Generator] = _insecure_generator(generator, insecure_seed)
        # K = ceil(q·2^53) is a function of the public q, not random state.
        self._threshold: int = _inclusion_threshold(self.sample_rate)
        if self.generator is not None:
            _warn_insecure()

    @property
    def secure(self) -> bool:
        """True iff inclusions come from the OS CSPRNG (no seed, no random state kept on the sampler)."""
        return self.generator is None

    @property
    def inclusion_probability(self) -> fractions.Fraction:
        """The exact per-example inclusion probability ``ceil(q·2^53)/2^53`` (within ``2^-53`` of ``q``)."""
        return fractions.Fraction(self._threshold, _U_RANGE)

    @property
    def expected_batch_size(self) -> float:
        """The public expected batch size ``B̄ = q·N`` (a float)."""
        return self.sample_rate * self.num_samples

    def __len__(self) -> int:
        return self.steps

    def _random_bytes(self, m: int) -> np.ndarray:
        if self.generator is None:
            return _os_random_bytes(m)
        return torch.randint(0, 256, (m,), dtype=torch.uint8, generator=self.generator).numpy()

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            positions = _bernoulli_positions(self.num_samples, self._threshold, self._random_bytes)
            if self.indices is not None:
                positions = self.indices[positions]
            yield positions.tolist()

    def __repr__(self) -> str:
        subset = "" if self.indices is None else ", indices=<index set>"
        return (
            f"PoissonBatchSampler(num_samples={self.num_samples}, sample_rate={self.sample_rate}, "
            f"steps={self.steps}{subset}, secure={self.secure})"
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
    ``collate_fn([dataset[example_index]])`` (computed once, lazily; the
    first index of the loader's index set, 0 for the whole dataset) with every
    tensor cut to 0 rows. A picklable object, so it works with ``num_workers > 0``.
    """

    def __init__(self, dataset: Dataset, collate_fn: Callable[[list[Any]], Any], example_index: int = 0) -> None:
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.example_index = int(example_index)
        self._empty: Any = None

    def __call__(self, batch: list[Any]) -> Any:
        if len(batch) > 0:
            return self.collate_fn(batch)
        if self._empty is None:
            self._empty = _empty_like_batch(self.collate_fn([self.dataset[self.example_index]]))
        return self._empty


# --------------------------------------------------------------------------
# Loader
# --------------------------------------------------------------------------


class _CountingIterMixin:
    """Counts the examples of each batch when ``__next__`` hands it to the user.

    The index lists are recorded when the batch sampler yields them (in the
    main process, also when workers prefetch) and popped in order at hand-out:
    the loader returns batches in sampling order (``in_order``).
    """

    def __init__(self, loader: "PoissonDataLoader") -> None:
        self._poisson_loader = loader
        self._pending_sizes: collections.deque[int] = collections.deque()
        super().__init__(loader)  # type: ignore[call-arg]

    def _next_index(self):  # type: ignore[no-untyped-def]
        index = super()._next_index()  # type: ignore[misc]
        self._pending_sizes.append(len(index))
        return index

    def __next__(self) -> Any:
        data = super().__next__()  # type: ignore[misc]
        self._poisson_loader._count_handed_out(self._pending_sizes.popleft())
        return data


class _CountingSingleProcessIter(_CountingIterMixin, _SingleProcessDataLoaderIter):
    pass


class _CountingMultiProcessingIter(_CountingIterMixin, _MultiProcessingDataLoaderIter):
    pass


class PoissonDataLoader(DataLoader):
    """A ``DataLoader`` whose batches are Poisson samples (see :class:`PoissonBatchSampler`).

    Give exactly one of ``sample_rate`` (q) or ``expected_batch_size``
    (then ``q = expected_batch_size / N``). ``N = len(dataset)``, or
    ``len(indices)`` when an index set (e.g. a training split) is given: then
    only those dataset indices are ever sampled. Batches have random size and
    may be empty; an empty batch is collated to tensors of shape
    ``(0, *sample_shape)`` with the dtypes a one-example batch would have.

    The inclusions come from the OS CSPRNG unless ``generator`` or
    ``insecure_seed`` selects the **insecure, not private** seeded mode
    (reproducible experiments only; it warns).

    Attributes:
        sample_rate: q.
        expected_batch_size: the public ``B̄ = q·N`` (float) to divide noisy sums by.
        num_samples: ``N`` (``len(dataset)``, or ``len(indices)`` with an index set).
        indices: the index set (read-only int64 array) or ``None`` for the whole dataset.
        examples_yielded: examples in all batches handed out so far by this
            loader's iterators (counted in the main process when ``next()``
            returns a batch, not when it is sampled or prefetched).
        last_batch_size: number of examples in the most recently handed-out
            batch (``None`` before the first one).
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        sample_rate: Optional[float] = None,
        expected_batch_size: Optional[int] = None,
        steps: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        indices: Optional[Sequence[int]] = None,
        insecure_seed: Optional[int] = None,
        num_workers: int = 0,
        collate_fn: Optional[Callable[[list[Any]], Any]] = None,
        pin_memory: bool = False,
    ) -> None:
        try:
            dataset_len = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError(
                "PoissonDataLoader needs a map-style dataset with __len__ (Poisson sampling draws "
                "from a known N); IterableDataset is not supported."
            ) from None
        if dataset_len <= 0:
            raise ValueError("PoissonDataLoader needs a non-empty dataset (len(dataset) == 0).")
        index_set: Optional[np.ndarray] = None
        n = dataset_len
        if indices is not None:
            index_set = _check_index_set(indices)
            if int(index_set.max()) >= dataset_len:
                raise ValueError(
                    f"indices must be dataset indices in [0, len(dataset)={dataset_len}) "
                    f"(found {int(index_set.max())})."
                )
            n = int(index_set.size)
        if (sample_rate is None) == (expected_batch_size is None):
            raise ValueError(
                "give exactly one of sample_rate (q in (0, 1]) or expected_batch_size "
                f"(in (0, N]) (got sample_rate={sample_rate!r}, "
                f"expected_batch_size={expected_batch_size!r})."
            )
        if expected_batch_size is not None:
            if (
                not isinstance(expected_batch_size, numbers.Real)
                or isinstance(expected_batch_size, bool)
                or not math.isfinite(float(expected_batch_size))
                or not (0 < float(expected_batch_size) <= n)
            ):
                where = "len(dataset)" if index_set is None else "len(indices)"
                raise ValueError(
                    f"expected_batch_size must be a number in (0, {where}={n}] (got {expected_batch_size!r})."
                )
            q = float(expected_batch_size) / n
        else:
            q = check_sample_rate(sample_rate)
        sampler = PoissonBatchSampler(
            None if index_set is not None else n,
            q,
            steps=steps,
            generator=generator,
            indices=index_set,
            insecure_seed=insecure_seed,
        )
        collate = _EmptySafeCollate(
            dataset,
            collate_fn if collate_fn is not None else default_collate,
            example_index=0 if index_set is None else int(index_set[0]),
        )
        super().__init__(
            dataset,
            batch_sampler=sampler,
            num_workers=num_workers,
            collate_fn=collate,
            pin_memory=pin_memory,
        )
        self.sample_rate: float = q
        self.num_samples: int = n
        self.expected_batch_size: float = q * n
        self.indices: Optional[np.ndarray] = sampler.indices
        self.examples_yielded: int = 0
        self.last_batch_size: Optional[int] = None

    @property
    def secure(self) -> bool:
        """True iff the batches come from the OS CSPRNG (see :attr:`PoissonBatchSampler.secure`)."""
        return self.batch_sampler.secure

    def _count_handed_out(self, n: int) -> None:
        self.examples_yielded += int(n)
        self.last_batch_size = int(n)

    def _get_iterator(self):  # type: ignore[no-untyped-def]
        if self.num_workers == 0:
            return _CountingSingleProcessIter(self)
        self.check_worker_number_rationality()
        return _CountingMultiProcessingIter(self)

    @classmethod
    def from_data_loader(
        cls,
        loader: DataLoader,
        generator: Optional[torch.Generator] = None,
        *,
        insecure_seed: Optional[int] = None,
    ) -> "PoissonDataLoader":
        """Poisson loader matching an ordinary ``DataLoader``.

        The index set comes from ``loader.sampler``:

        * ``RandomSampler`` (without replacement, all examples — ``shuffle=True``)
          or ``SequentialSampler`` (``shuffle=False``): the whole dataset;
        * ``SubsetRandomSampler`` (or any sampler with an ``indices``
          attribute): only those indices, ``N = len(indices)``;
        * ``DistributedSampler``, ``WeightedRandomSampler``,
          ``RandomSampler(replacement=True)`` or with other ``num_samples``, and
          other custom samplers are refused with a ``ValueError``.

        Uses ``q = loader.batch_size / N``, the same number of steps per epoch
        as ``loader`` (``len(loader)``), and its dataset, ``num_workers``,
        ``collate_fn`` and ``pin_memory``. Inclusions come from the OS CSPRNG
        unless ``generator`` / ``insecure_seed`` asks for the **insecure, not
        private** seeded mode (the loader's own ``generator`` is not used).
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
            dataset_len = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            raise ValueError("from_data_loader needs a map-style dataset with __len__.") from None
        if dataset_len <= 0:
            raise ValueError("from_data_loader needs a non-empty dataset.")
        indices = _loader_index_set(loader.sampler, dataset_len)
        n = dataset_len if indices is None else int(indices.size)
        collate = loader.collate_fn
        if isinstance(collate, _EmptySafeCollate):
            collate = collate.collate_fn
        return cls(
            dataset,
            sample_rate=min(1.0, loader.batch_size / n),
            steps=max(1, len(loader)),
            generator=generator,
            insecure_seed=insecure_seed,
            indices=indices,
            num_workers=loader.num_workers,
            collate_fn=collate,
            pin_memory=loader.pin_memory,
        )


_BUILD_DIRECTLY = (
    "Build the Poisson loader directly over a uniform index set instead: "
    "PoissonDataLoader(dataset, expected_batch_size=B, indices=train_indices) or "
    "PoissonDataLoader(torch.utils.data.Subset(dataset, train_indices), expected_batch_size=B)."
)


def _loader_index_set(sampler: Any, dataset_len: int) -> Optional[np.ndarray]:
    """The uniform index set a ``DataLoader``'s sampler draws from (``None``: the whole dataset).

    Refuses samplers whose index distribution Poisson sampling cannot reproduce.
    """
    data = torch.utils.data
    if isinstance(sampler, data.DistributedSampler):
        raise ValueError(
            "from_data_loader: the loader uses a DistributedSampler; each rank must Poisson-sample its shard "
            "at the global rate q. Use dpsat_fast.distributed.DistributedPoissonDataLoader (make_private does "
            "this itself inside a torch.distributed process group; see docs/distributed.md)."
        )
    if isinstance(sampler, data.WeightedRandomSampler):
        raise ValueError(
            "from_data_loader: the loader uses a WeightedRandomSampler; Poisson sampling needs every example "
            "of a uniform index set to be included with the same probability q, so weights (and sampling with "
            "replacement) cannot be carried over. " + _BUILD_DIRECTLY
        )
    if isinstance(sampler, data.RandomSampler):
        if sampler.replacement or sampler.num_samples != dataset_len or len(sampler.data_source) != dataset_len:
            raise ValueError(
                "from_data_loader: the loader uses a RandomSampler with replacement=True or a custom "
                f"num_samples (replacement={sampler.replacement}, num_samples={sampler.num_samples}, "
                f"len(dataset)={dataset_len}); Poisson sampling needs a uniform index set, each example "
                "included independently with probability q. " + _BUILD_DIRECTLY
            )
        return None
    if isinstance(sampler, data.SequentialSampler):
        if len(sampler.data_source) != dataset_len:
            raise ValueError(
                "from_data_loader: the loader's SequentialSampler is over a data source of another length "
                f"({len(sampler.data_source)}) than its dataset ({dataset_len}). " + _BUILD_DIRECTLY
            )
        return None
    if isinstance(sampler, data.SubsetRandomSampler) or hasattr(sampler, "indices"):
        indices = _check_index_set(sampler.indices, "loader.sampler.indices")
        if int(indices.max()) >= dataset_len:
            raise ValueError(
                f"from_data_loader: loader.sampler.indices go up to {int(indices.max())}, outside the dataset "
                f"(len {dataset_len})."
            )
        return indices
    raise ValueError(
        f"from_data_loader: cannot convert a loader whose sampler is {type(sampler).__name__}: Poisson "
        "sampling needs a uniform index set (the whole dataset — RandomSampler/SequentialSampler — or a "
        "SubsetRandomSampler's indices). " + _BUILD_DIRECTLY
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

"""Large logical batches on small memory: iterate physical batches, release once per logical batch.

    with BatchMemoryManager(data_loader=train_loader, max_physical_batch_size=64, optimizer=optimizer) as loader:
        for x, y in loader:
            optimizer.zero_grad()
            criterion(model(x), y).backward()
            optimizer.step()          # releases (and accounts) only after the last piece of a logical batch

Each logical batch the Poisson loader draws is cut into consecutive pieces of at most
``max_physical_batch_size`` examples; before every piece but the last the optimizer is told to skip its next
step (:meth:`~dpsat_fast.optim.DPOptimizer.signal_skip_step`), so the clipped sums of all pieces accumulate
(``zero_grad`` after a skipped step keeps them) and the noise is added once, at the last piece. An empty
logical batch is one empty piece: a normal step, pure noise. DP-SAT evaluates every piece at the same
``w_t + ε_t``.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

from ..data import is_poisson_loader, split_micro_batches
from ..validation import PrivacyConfigError


class _PhysicalBatches:
    def __init__(self, data_loader, max_physical_batch_size: int, optimizer):
        self.data_loader = data_loader
        self.max_physical_batch_size = max_physical_batch_size
        self.optimizer = optimizer

    def __iter__(self) -> Iterator[Any]:
        for batch in self.data_loader:
            pieces = list(split_micro_batches(batch, self.max_physical_batch_size))
            for k, piece in enumerate(pieces):
                self.optimizer.signal_skip_step(do_skip=k < len(pieces) - 1)
                yield piece

    def __len__(self) -> int:
        """The expected number of physical batches (Poisson batch sizes vary)."""
        per_logical = max(1, math.ceil(self.data_loader.expected_batch_size / self.max_physical_batch_size))
        return len(self.data_loader) * per_logical


class BatchMemoryManager:
    """Context manager yielding physical batches of at most ``max_physical_batch_size`` examples from the
    Poisson ``data_loader`` that :meth:`~dpsat_fast.PrivacyEngine.make_private` returned, with one release of
    ``optimizer`` per logical batch (Opacus' ``opacus.utils.batch_memory_manager.BatchMemoryManager``)."""

    def __init__(self, *, data_loader, max_physical_batch_size: int, optimizer):
        if not is_poisson_loader(data_loader):
            raise PrivacyConfigError(
                "BatchMemoryManager needs the Poisson data loader that make_private returned (the privacy "
                "analysis assumes Poisson sampling of the logical batches)")
        if not hasattr(optimizer, "signal_skip_step"):
            raise PrivacyConfigError("BatchMemoryManager needs the private optimizer that make_private returned")
        if isinstance(max_physical_batch_size, bool) or not isinstance(max_physical_batch_size, int) \
                or max_physical_batch_size <= 0:
            raise PrivacyConfigError(f"max_physical_batch_size must be a positive int, got {max_physical_batch_size!r}")
        self.data_loader = data_loader
        self.max_physical_batch_size = max_physical_batch_size
        self.optimizer = optimizer

    def __enter__(self) -> _PhysicalBatches:
        return _PhysicalBatches(self.data_loader, self.max_physical_batch_size, self.optimizer)

    def __exit__(self, *exc) -> bool:
        self.optimizer.signal_skip_step(do_skip=False)
        return False

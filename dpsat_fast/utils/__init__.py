"""Training-loop utilities with Opacus' names: :class:`BatchMemoryManager` (logical batches split into
physical batches, one release per logical batch)."""

from .batch_memory_manager import BatchMemoryManager

__all__ = ["BatchMemoryManager"]

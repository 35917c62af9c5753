"""Private optimizers: DP-SGD wrapper (and, built on it, DP-SAT)."""

from .dp_optimizer import DPOptimizer

__all__ = ["DPOptimizer"]

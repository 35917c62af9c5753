"""Private optimizers: the DP-SGD wrapper, DP-SAT (perturbation along the last noisy gradient, free of
privacy cost) and the two-query DP-SAM baseline."""

from .dp_optimizer import DPOptimizer
from .dpsat import DPSAM, DPSAT

__all__ = ["DPOptimizer", "DPSAT", "DPSAM"]

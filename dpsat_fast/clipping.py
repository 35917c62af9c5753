"""Clip factors: how per-example squared norms become per-example scales (DESIGN.md §2.1).

A style maps ``{parameter key: [B] squared norms}`` to ``{parameter key: [B] scales}``; the clipped sum of a
parameter is ``Σ_i scale_i G_i``. Every style bounds each example's total contribution by
:attr:`sensitivity` in L2, which is what the noise is calibrated to (std = σ · sensitivity).
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor

from .validation import PrivacyConfigError, check_max_grad_norm

FLAT_EPS = 1e-6


class ClippingStyle:
    def __init__(self, max_grad_norm: float):
        check_max_grad_norm(max_grad_norm)
        self.max_grad_norm = float(max_grad_norm)

    @property
    def sensitivity(self) -> float:
        return self.max_grad_norm

    def scales(self, sq_norms: Dict[str, Tensor]) -> Dict[str, Tensor]:
        raise NotImplementedError


def total_norms(sq_norms: Dict[str, Tensor]) -> Tensor:
    """Per-example L2 norm over all parameters: sqrt(Σ_params ‖G_i^p‖²)."""
    return torch.stack(list(sq_norms.values())).sum(0).sqrt()


class FlatClipping(ClippingStyle):
    """``c_i = min(1, C / (‖g_i‖ + 1e-6))`` over all trainable parameters concatenated."""

    def scales(self, sq_norms):
        factor = (self.max_grad_norm / (total_norms(sq_norms) + FLAT_EPS)).clamp(max=1.0)
        return {k: factor for k in sq_norms}


class AutomaticClipping(ClippingStyle):
    """Automatic clipping / AUTO-S normalization: ``c_i = C / (‖g_i‖ + γ)``; every example has norm < C."""

    def __init__(self, max_grad_norm: float, stability: float = 0.01):
        super().__init__(max_grad_norm)
        if not stability > 0:
            raise PrivacyConfigError(f"automatic clipping needs stability γ > 0, got {stability!r}")
        self.stability = float(stability)

    def scales(self, sq_norms):
        factor = self.max_grad_norm / (total_norms(sq_norms) + self.stability)
        return {k: factor for k in sq_norms}


def make_clipping(style: str | ClippingStyle, max_grad_norm: float) -> ClippingStyle:
    if isinstance(style, ClippingStyle):
        return style
    if style == "flat":
        return FlatClipping(max_grad_norm)
    if style == "automatic":
        return AutomaticClipping(max_grad_norm)
    raise PrivacyConfigError(f"unknown clipping style {style!r}; expected 'flat' or 'automatic'")

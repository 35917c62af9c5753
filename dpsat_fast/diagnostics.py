"""Per-step diagnostics of private training, for the user's eyes only.

Most of these numbers are computed from the private per-example gradient norms of the last backward, so
they are **not differentially private**: printing or logging them for data you may not look at leaks
information about individual examples. They are never part of what the optimizer releases, and computing
them changes nothing in the training (no extra noise, no extra privacy cost, because nothing computed
here is released). Each :class:`StepDiagnostics` says which of its fields are private.

* ``clipped_fraction``: share of the examples whose clip factor is below 1 (for group-wise styles: below
  1 in at least one group). Private.
* ``norm_quantiles``: quantiles of the per-example total gradient norm. Private.
* ``perturbation_norm``: the norm of DP-SAT's current perturbation ε (ρ, or 0 when there is none): a
  function of released gradients, so public.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence

import torch

from .clipping import GroupWiseClipping
from .engine import BookKeepingEngine

__all__ = ["PRIVATE_FIELDS", "StepDiagnostics", "step_diagnostics"]

PRIVATE_FIELDS = ("batch_size", "clipped_fraction", "norm_quantiles")


@dataclasses.dataclass(frozen=True)
class StepDiagnostics:
    """Diagnostics of the last backward. The fields named in :attr:`private_fields` come from private data:
    NOT differentially private, do not release them."""

    batch_size: int
    clipped_fraction: float
    norm_quantiles: Dict[float, float]
    perturbation_norm: Optional[float]
    private_fields: Sequence[str] = PRIVATE_FIELDS

    def __str__(self) -> str:
        q = ", ".join(f"q{int(k * 100)}={v:.3g}" for k, v in self.norm_quantiles.items())
        eps = "" if self.perturbation_norm is None else f", |ε|={self.perturbation_norm:.3g} (public)"
        return (f"[NON-PRIVATE diagnostics] B={self.batch_size}, clipped {self.clipped_fraction:.1%}, "
                f"norms {q}{eps}")


@torch.no_grad()
def step_diagnostics(engine: BookKeepingEngine, optimizer=None,
                     quantiles: Sequence[float] = (0.1, 0.5, 0.9)) -> StepDiagnostics:
    """Diagnostics of the engine's last backward (and of ``optimizer``'s DP-SAT perturbation, if any)."""
    sq = engine.last_sq_norms
    if not sq:
        raise RuntimeError("no backward has run through the engine yet")
    total_sq = torch.stack([v.double() for v in sq.values()]).sum(0)
    scales = engine.clipping.scales({k: v.double() for k, v in sq.items()})
    if isinstance(engine.clipping, GroupWiseClipping):
        clipped = torch.stack([s < 1 for s in scales.values()]).any(0)
    else:
        clipped = next(iter(scales.values())) < 1
    norms = total_sq.sqrt()
    q = torch.quantile(norms, torch.tensor(list(quantiles), dtype=torch.float64)) if norms.numel() else None
    perturbation = getattr(optimizer, "perturbation", None) if optimizer is not None else None
    eps_norm = None
    if optimizer is not None and hasattr(optimizer, "rho"):
        eps_norm = 0.0 if perturbation is None else float(
            torch.stack([e.double().pow(2).sum() for e in perturbation]).sum().sqrt())
    return StepDiagnostics(
        batch_size=int(norms.numel()),
        clipped_fraction=float(clipped.double().mean()) if clipped.numel() else 0.0,
        norm_quantiles={float(k): float(v) for k, v in zip(quantiles, q)} if q is not None else {},
        perturbation_norm=eps_norm,
    )

"""Pruning for private training: magnitude pre-pruning and gradient dropping.

Both restrict the released noisy gradient to a set of kept coordinates, so the noise goes into fewer
dimensions. The clipping (and so the sensitivity C) is unchanged: the per-example norms still cover every
coordinate of a trainable tensor, which can only over-estimate the norm of the kept part, and releasing
the kept coordinates of a Gaussian mechanism is post-processing. The privacy cost is that of DP-SGD.

* :class:`MagnitudePrePruning`: before private training, remove the fraction ``rate`` of weights with the
  smallest magnitude (one global threshold, or one per tensor) and keep them at exactly zero: their
  gradient (noise included) is never released and they never move.
* :class:`GradientDropping`: each step, update only the fraction ``keep`` of each tensor's coordinates with
  the largest score, the score being the current weights (``"weight"``) or the previous step's noisy
  gradient (``"previous_gradient"``: the whole output of the previous Gaussian mechanism, before its own
  masking, so the kept set can move; the first step uses the weights).

The selection may use only public or already-released quantities: the weights (a function of the
released gradients and the public initialization) and earlier noisy gradients, never the current step's
private gradients. The optimizer therefore asks for the masks at the start of its step, before it reads any
clipped sum of that step, and :meth:`GradientDropping.select` receives nothing else (tests check both).
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["CombinedSparsity", "GradientDropping", "MagnitudePrePruning", "Sparsity", "magnitude_masks"]


def _prunable(model: nn.Module, names: Optional[Sequence[str]]) -> Dict[str, nn.Parameter]:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if names is None:
        return {n: p for n, p in params.items() if p.dim() >= 2}  # conv / linear / embedding weights
    missing = sorted(set(names) - set(params))
    if missing:
        raise ValueError(f"not trainable parameters of the model: {missing}")
    return {n: params[n] for n in names}


def _top_mask(score: Tensor, keep: int) -> Tensor:
    """Bool mask of the ``keep`` largest entries of ``score`` (ties broken by index: deterministic)."""
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if keep > 0:
        idx = torch.sort(score.flatten(), descending=True, stable=True).indices[:keep]
        mask[idx] = True
    return mask.view(score.shape)


def magnitude_masks(params: Dict[str, Tensor], rate: float, scope: str = "global") -> Dict[str, Tensor]:
    """Keep-masks removing the fraction ``rate`` of entries with the smallest |value|: over all tensors
    together (``scope="global"``) or in each tensor (``"layer"``)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"pruning rate must be in [0, 1), got {rate}")
    if scope == "layer":
        return {n: _top_mask(p.detach().abs(), p.numel() - int(math.floor(rate * p.numel()))) for n, p in params.items()}
    if scope != "global":
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    flat = torch.cat([p.detach().abs().flatten() for p in params.values()])
    kept = _top_mask(flat, flat.numel() - int(math.floor(rate * flat.numel())))
    out, start = {}, 0
    for n, p in params.items():
        out[n] = kept[start:start + p.numel()].view(p.shape)
        start += p.numel()
    return out


class Sparsity:
    """What a DP optimizer asks a sparsity method in each logical step: :meth:`select` first (the keep-masks of
    this release, from the weights and earlier releases only), :meth:`observe` with each noisy gradient
    (before masking: the output of the Gaussian mechanism, public), :meth:`after_step` after the update."""

    def select(self, params: List[nn.Parameter]) -> Dict[nn.Parameter, Tensor]:
        raise NotImplementedError

    def observe(self, p: nn.Parameter, noisy_grad: Tensor) -> None:
        """The noisy gradient of ``p`` released this step, before masking."""

    def after_step(self, params: List[nn.Parameter]) -> None:
        """Called after the base optimizer's update."""


class MagnitudePrePruning(Sparsity):
    """Prune ``model`` now (zero the removed weights) and keep them at zero through private training.

    Args:
        model: the model before private training (pretrained or initialized: public).
        rate: fraction of the prunable weights removed, in [0, 1).
        scope: ``"global"`` (one magnitude threshold) or ``"layer"`` (the same rate in every tensor).
        names: parameters to prune (default: every trainable tensor of dimension ≥ 2: conv/linear weights).
    """

    def __init__(self, model: nn.Module, rate: float, scope: str = "global", names: Optional[Sequence[str]] = None):
        prunable = _prunable(model, names)
        masks = magnitude_masks(prunable, rate, scope)
        self.masks: Dict[nn.Parameter, Tensor] = {prunable[n]: m for n, m in masks.items()}
        self.names = {prunable[n]: n for n in masks}
        self._zero_pruned()

    @torch.no_grad()
    def _zero_pruned(self) -> None:
        for p, m in self.masks.items():
            p.mul_(m.to(p.dtype))

    @property
    def kept_fraction(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        return sum(int(m.sum()) for m in self.masks.values()) / max(total, 1)

    def select(self, params):
        return {p: self.masks[p] for p in params if p in self.masks}

    def after_step(self, params):
        self._zero_pruned()  # weight decay or a stateful optimizer cannot revive a pruned weight


class GradientDropping(Sparsity):
    """Each step release only the fraction ``keep`` of every selected tensor's coordinates.

    Args:
        keep: fraction kept per tensor, in (0, 1].
        score: ``"weight"`` (largest |w_t|) or ``"previous_gradient"`` (largest |g̃_{t-1}|, the previous noisy
            gradient before masking; the weights at the first step).
        params: the tensors to sparsify (default: every tensor the optimizer releases with dimension ≥ 2).
    """

    SCORES = ("weight", "previous_gradient")

    def __init__(self, keep: float, score: str = "previous_gradient", params: Optional[Iterable[nn.Parameter]] = None):
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {keep}")
        if score not in self.SCORES:
            raise ValueError(f"score must be one of {self.SCORES}, got {score!r}")
        self.keep, self.score = float(keep), score
        self.only = None if params is None else {id(p) for p in params}
        self.previous: Dict[int, Tensor] = {}

    def _chosen(self, p: nn.Parameter) -> bool:
        return (p.dim() >= 2) if self.only is None else id(p) in self.only

    @torch.no_grad()
    def select(self, params):
        masks = {}
        for p in params:
            if not self._chosen(p):
                continue
            released = self.previous.get(id(p)) if self.score == "previous_gradient" else None
            score = (released if released is not None else p.detach()).abs()
            masks[p] = _top_mask(score, max(1, int(math.ceil(self.keep * p.numel()))))
        return masks

    @torch.no_grad()
    def observe(self, p, noisy_grad):
        if self.score == "previous_gradient" and self._chosen(p):
            self.previous[id(p)] = noisy_grad.detach().clone()


class CombinedSparsity(Sparsity):
    """Several methods at once (e.g. pre-pruning, then gradient dropping among what is left): a coordinate is
    released only if every method keeps it."""

    def __init__(self, *methods: Sparsity):
        if not methods:
            raise ValueError("CombinedSparsity needs at least one method")
        self.methods = methods

    def select(self, params):
        masks: Dict[nn.Parameter, Tensor] = {}
        for method in self.methods:
            for p, m in method.select(params).items():
                masks[p] = m if p not in masks else masks[p] & m
        return masks

    def observe(self, p, noisy_grad):
        for method in self.methods:
            method.observe(p, noisy_grad)

    def after_step(self, params):
        for method in self.methods:
            method.after_step(params)

"""Clip factors: how per-example squared norms become per-example scales (docs/algorithms.md §1).

A style maps ``{parameter key: [B] squared norms}`` to ``{parameter key: [B] scales}``; the clipped sum of a
parameter is ``Σ_i scale_i G_i``. Every style bounds each example's total contribution by
:attr:`sensitivity` in L2, which is what the noise is calibrated to (std = σ · sensitivity, on every
coordinate).

Styles:

* :class:`FlatClipping`: one norm over all parameters, ``c_i = min(1, C/(‖g_i‖+1e-6))``.
* :class:`AutomaticClipping`: normalization (AUTO-S), ``c_i = C/(‖g_i‖+γ)``.
* :class:`GroupWiseClipping`: parameters split into groups k, each clipped on its own to a budget C_k with
  ``Σ_k C_k² = C²``: an example's contribution has norm ≤ sqrt(Σ_k C_k²) = C, the same sensitivity as flat
  clipping at C. :class:`PerLayerClipping` is the grouping by module.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from .validation import PrivacyConfigError, check_max_grad_norm

FLAT_EPS = 1e-6


class ClippingStyle:
    #: the clip factors of a module's parameters depend on that module's norms only (per-layer clipping): the
    #: engine then clips and sums each layer during the backward and keeps no output gradient
    per_module = False

    def __init__(self, max_grad_norm: float):
        self._max_grad_norm = check_max_grad_norm(max_grad_norm)

    @property
    def max_grad_norm(self) -> float:
        """C; settable between steps (checked; budgets derived from it follow)."""
        return self._max_grad_norm

    @max_grad_norm.setter
    def max_grad_norm(self, value: float) -> None:
        self._max_grad_norm = check_max_grad_norm(value)
        self._rebind()

    def _rebind(self) -> None:
        """Re-derive whatever depends on C (group budgets) after it changed."""

    @property
    def sensitivity(self) -> float:
        """The L2 bound of one example's clipped contribution with the factors :meth:`scales` returns now."""
        return self._max_grad_norm

    def scales(self, sq_norms: Dict[str, Tensor]) -> Dict[str, Tensor]:
        raise NotImplementedError

    def bind(self, param_sizes: Mapping[str, int]) -> None:
        """Called once by the engine with every trainable parameter's key and size (before any step)."""


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


GroupSpec = Union[Mapping[str, Sequence[str]], Callable[[str], str]]


class GroupWiseClipping(ClippingStyle):
    """Each group k of parameters is clipped on its own: ``c_i^k = min(1, C_k / (‖g_i^k‖ + 1e-6))`` with
    ``g_i^k`` example i's gradient of the group's parameters, and budgets ``C_k = C·sqrt(w_k / Σ_j w_j)``, so
    that ``Σ_k C_k² = C²`` and the sensitivity is C (noise σC on every coordinate, as with flat clipping).

    Args:
        max_grad_norm: the total budget C.
        groups: ``{group name: [parameter keys]}`` covering every trainable parameter exactly once, or a
            function from parameter key (``"module.path.weight"``) to group name.
        weights: ``"equal"`` (w_k = 1, the default), ``"size"`` (w_k = number of parameters of group k), or
            ``{group name: w_k > 0}`` for every group.

    The budgets are fixed when the engine binds the style (from all trainable parameters), never from a
    batch, so they do not depend on private data.
    """

    def __init__(self, max_grad_norm: float, groups: GroupSpec, weights: Union[str, Mapping[str, float]] = "equal"):
        super().__init__(max_grad_norm)
        if not (callable(groups) or isinstance(groups, Mapping)):
            raise PrivacyConfigError("groups must be a mapping {group: [parameter keys]} or a function key -> group")
        if isinstance(weights, str) and weights not in ("equal", "size"):
            raise PrivacyConfigError(f"weights must be 'equal', 'size' or a mapping, got {weights!r}")
        self.groups = groups
        self.weights = weights
        self.group_of: Dict[str, str] = {}
        self.budgets: Dict[str, float] = {}
        self._param_sizes: Optional[Dict[str, int]] = None

    def _rebind(self) -> None:
        if self._param_sizes is not None:
            self.bind(self._param_sizes)

    def bind(self, param_sizes: Mapping[str, int]) -> None:
        self._param_sizes = dict(param_sizes)
        if callable(self.groups):
            group_of = {key: str(self.groups(key)) for key in param_sizes}
        else:
            group_of = {}
            for group, keys in self.groups.items():
                for key in keys:
                    if key in group_of:
                        raise PrivacyConfigError(f"parameter '{key}' is in groups '{group_of[key]}' and '{group}'")
                    group_of[key] = group
            unknown = sorted(set(group_of) - set(param_sizes))
            if unknown:
                raise PrivacyConfigError(f"groups name parameters that are not trainable here: {unknown}")
            missing = sorted(set(param_sizes) - set(group_of))
            if missing:
                raise PrivacyConfigError(f"every trainable parameter needs a clipping group; missing: {missing}")
        names = sorted(set(group_of.values()))
        if self.weights == "equal":
            w = {g: 1.0 for g in names}
        elif self.weights == "size":
            w = {g: float(sum(n for k, n in param_sizes.items() if group_of[k] == g)) for g in names}
        else:
            missing = sorted(set(names) - set(self.weights))
            if missing or any(not (math.isfinite(float(self.weights[g])) and float(self.weights[g]) > 0)
                              for g in names):
                raise PrivacyConfigError(f"weights need a finite value > 0 for every group {names}; got "
                                         f"{dict(self.weights)}")
            w = {g: float(self.weights[g]) for g in names}
        total = sum(w.values())
        self.group_of = group_of
        # rounded down by 1e-15 relative, so that Σ_k C_k² ≤ C² holds in floating point too (sensitivity C);
        # re-derived whenever C changes
        self.budgets = {g: self.max_grad_norm * math.sqrt(w[g] / total) * (1.0 - 2.0 ** -50) for g in names}

    def scales(self, sq_norms):
        if not self.budgets:
            raise RuntimeError("GroupWiseClipping.scales before bind(): pass the style to an engine")
        by_group: Dict[str, list] = {}
        for key, v in sq_norms.items():
            if key not in self.group_of:
                raise RuntimeError(f"parameter '{key}' has no clipping group")
            by_group.setdefault(self.group_of[key], []).append(v)
        factors = {g: (self.budgets[g] / (torch.stack(vs).sum(0).sqrt() + FLAT_EPS)).clamp(max=1.0)
                   for g, vs in by_group.items()}
        return {key: factors[self.group_of[key]] for key in sq_norms}


def module_of(key: str) -> str:
    """``"stages.0.conv1.weight"`` -> ``"stages.0.conv1"`` (the module that owns a parameter)."""
    return key.rsplit(".", 1)[0] if "." in key else ""


class PerLayerClipping(GroupWiseClipping):
    """Group-wise clipping with one group per module (layer): budgets equal (default) or by ``weights``.

    Each layer's clip factors depend on its own norms only, so the engine clips, sums (and noises) a layer in
    the backward as soon as its output gradient is there, and frees it: no output gradients are stored."""

    per_module = True

    def __init__(self, max_grad_norm: float, weights: Union[str, Mapping[str, float]] = "equal"):
        super().__init__(max_grad_norm, module_of, weights)


STYLES = ("flat", "automatic", "per_layer")


def make_clipping(style: str | ClippingStyle, max_grad_norm: float) -> ClippingStyle:
    if isinstance(style, ClippingStyle):
        return style
    if style == "flat":
        return FlatClipping(max_grad_norm)
    if style == "automatic":
        return AutomaticClipping(max_grad_norm)
    if style == "per_layer":
        return PerLayerClipping(max_grad_norm)
    raise PrivacyConfigError(f"unknown clipping style {style!r}; expected one of {STYLES} or a ClippingStyle "
                             f"(e.g. GroupWiseClipping for groups of your own)")

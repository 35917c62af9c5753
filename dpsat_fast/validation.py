"""Checks that run before any data is touched, and the fixes they point to.

Every error names the module or argument at fault and what to do about it (TESTING.md item 8).
"""

from __future__ import annotations

import itertools
import math
import numbers
import warnings
from typing import List, Optional

from torch import nn

from .layers import DPMultiheadAttention, convert_multihead_attention, get_rule, supported_types


class PrivacyConfigError(ValueError):
    """A model or a privacy parameter that cannot be trained privately as given."""


def model_problems(module: nn.Module) -> List[str]:
    """Everything that stops ``module`` from being trained privately, one line per module."""
    problems = []
    for name, m in module.named_modules():
        label = f"'{name or '<root>'}' ({type(m).__name__})"
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            problems.append(f"{label}: BatchNorm in train mode mixes examples of a batch, so per-example "
                            f"gradients (and the privacy guarantee) do not exist; replace it with GroupNorm: "
                            f"model = dpsat_fast.fix_model(model)")
            continue
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
            problems.append(f"{label}: lazy module with uninitialized parameters; run one forward pass on "
                            f"public dummy data first")
            continue
        trainable = [n for n, p in m.named_parameters(recurse=False) if p.requires_grad]
        rule = get_rule(m)
        if rule is None:
            if not trainable:
                continue
            if type(m) is nn.MultiheadAttention:
                fix = "swap in DPMultiheadAttention: model = dpsat_fast.fix_model(model)"
            else:
                fix = ("freeze them (requires_grad_(False)), rebuild the module from supported layers "
                       f"({', '.join(sorted(t.__name__ for t in supported_types()))}), or register a rule "
                       f"with dpsat_fast.layers.register_rule")
            problems.append(f"{label}: trainable parameters {trainable} have no per-sample gradient rule; {fix}")
            continue
        if trainable:
            problems += [f"{label}: {p}" for p in rule.problems(m)]
    return problems


def validate_model(module: nn.Module) -> None:
    """Raise :class:`PrivacyConfigError` listing every problem of ``module`` (nothing if it is fine)."""
    problems = model_problems(module)
    if problems:
        raise PrivacyConfigError("this model cannot be trained with differential privacy as it is:\n  - "
                                 + "\n  - ".join(problems))


def _largest_group_count(channels: int, max_groups: int) -> int:
    return max(g for g in range(1, min(channels, max_groups) + 1) if channels % g == 0)


def fix_model(module: nn.Module, max_groups: int = 32) -> nn.Module:
    """Return ``module`` with BatchNorm replaced by GroupNorm (≤ ``max_groups`` groups dividing the channels)
    and nn.MultiheadAttention by :class:`DPMultiheadAttention` (weights copied). Works in place where it can."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        gn = nn.GroupNorm(_largest_group_count(module.num_features, max_groups), module.num_features,
                          eps=module.eps, affine=module.affine)
        if module.affine:
            gn.weight.data.copy_(module.weight.data)
            gn.bias.data.copy_(module.bias.data)
            gn.weight.requires_grad_(module.weight.requires_grad)
            gn.bias.requires_grad_(module.bias.requires_grad)
        ref = next(itertools.chain(module.parameters(), module.buffers()), None)
        if ref is not None:
            gn = gn.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
        return gn.train(module.training)
    module = convert_multihead_attention(module)
    for name, child in module.named_children():
        setattr(module, name, fix_model(child, max_groups))
    return module


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))


def check_noise_multiplier(noise_multiplier, allow_zero: bool = False, name: str = "noise_multiplier") -> float:
    """σ: finite and > 0 (σ = 0 only with ``allow_zero``, the explicit non-private switch)."""
    if not _is_real(noise_multiplier) or noise_multiplier < 0 or (noise_multiplier == 0 and not allow_zero):
        raise PrivacyConfigError(
            f"{name} must be a finite number > 0, got {noise_multiplier!r}; σ is the ratio of the noise std to the "
            f"clipping norm" + ("; σ = 0 gives no privacy and cannot be accounted (optimizers accept it only with "
                                "allow_non_private=True)" if _is_real(noise_multiplier) and noise_multiplier == 0
                                else ""))
    return float(noise_multiplier)


def check_max_grad_norm(max_grad_norm) -> float:
    if not _is_real(max_grad_norm) or max_grad_norm <= 0:
        raise PrivacyConfigError(f"max_grad_norm (clipping norm C) must be a finite number > 0, got {max_grad_norm!r}")
    return float(max_grad_norm)


def check_sample_rate(sample_rate, name: str = "sample_rate") -> float:
    if not _is_real(sample_rate) or not (0 < sample_rate <= 1):
        raise PrivacyConfigError(f"{name} must be a number in (0, 1], got {sample_rate!r}; it is the Poisson "
                                 f"sampling rate q = expected_batch_size / dataset_size")
    return float(sample_rate)


def check_delta(delta, num_samples: Optional[int] = None, name: str = "delta") -> float:
    if not _is_real(delta) or not (0 < delta < 1):
        raise PrivacyConfigError(f"{name} must be a number in the open interval (0, 1), got {delta!r}; a common "
                                 f"choice is δ ≪ 1/dataset_size")
    if num_samples is not None and delta > 1.0 / num_samples:
        warnings.warn(f"delta={delta:g} is larger than 1/N = {1.0 / num_samples:g}: such a δ allows releasing "
                      f"an example outright; use δ ≪ 1/N", stacklevel=3)
    return float(delta)


__all__ = ["PrivacyConfigError", "model_problems", "validate_model", "fix_model", "DPMultiheadAttention",
           "check_noise_multiplier", "check_max_grad_norm", "check_sample_rate", "check_delta"]

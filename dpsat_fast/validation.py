"""Checks that run before any data is touched, and the fixes they point to.

Every error names the module or argument at fault and what to do about it.
"""

from __future__ import annotations

import itertools
import math
import numbers
import warnings
from typing import List, Optional, Tuple

from torch import nn
from torch.nn.utils import parametrize

from .layers import (DPMultiheadAttention, convert_multihead_attention, convert_sequence_first_transformers, get_rule,
                     register_generic, supported_types)
from .layers.rnn import convert_rnn, convertible_rnn, is_opacus_rnn
from .layers.norms import batchnorm_coupling, batchnorm_fix


class PrivacyConfigError(ValueError):
    """A model or a privacy parameter that cannot be trained privately as given."""


_BatchNorm = nn.modules.batchnorm._BatchNorm
_InstanceNorm = nn.modules.instancenorm._InstanceNorm
_RUNNING_STATS_FIX = ("construct it with track_running_stats=False (each example is then normalized by its own "
                      "statistics), or keep it in eval mode (it then normalizes with its fixed running statistics)")


def _has_running_stats(m: nn.Module) -> bool:
    """A norm layer (other than BatchNorm) that keeps running-statistics buffers."""
    return (not isinstance(m, _BatchNorm) and hasattr(m, "track_running_stats")
            and (getattr(m, "running_mean", None) is not None or getattr(m, "running_var", None) is not None))


def _updates_running_stats(m: nn.Module) -> bool:
    """A forward of ``m`` (with running statistics) now would write statistics of its input into its buffers."""
    if isinstance(m, _InstanceNorm):  # torch passes the buffers whenever it uses the input's statistics
        return m.training or not m.track_running_stats
    return bool(m.track_running_stats) and m.training


def _coupling(m: nn.Module) -> Optional[str]:
    """Why a forward of ``m`` in its current mode would couple examples or store private statistics (or None)."""
    if isinstance(m, _BatchNorm):
        why = batchnorm_coupling(m)
        return f"BatchNorm {why}; {batchnorm_fix(m)}" if why else None
    if _has_running_stats(m) and _updates_running_stats(m):
        return (f"{type(m).__name__} with running statistics (track_running_stats=True) in train mode adds the "
                f"mean and variance of the private data, un-noised, to buffers that are released with "
                f"state_dict(); {_RUNNING_STATS_FIX}")
    return None


def _sequence_first(m: nn.Module) -> bool:
    """A torch transformer layer that feeds [T, B, D] tensors to its Linear/LayerNorm layers."""
    if not isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return False
    attns = [getattr(m, n, None) for n in ("self_attn", "multihead_attn")]
    return any(a is not None and not getattr(a, "batch_first", True) for a in attns)


def _parametrization_fix(m: nn.Module) -> str:
    """How to get rid of an old-style reparametrization hook (torch.nn.utils.weight_norm/spectral_norm)."""
    for hook in m._forward_pre_hooks.values():
        kind = type(hook).__name__
        if kind == "WeightNorm":
            return (f"it carries torch.nn.utils.weight_norm on '{hook.name}': remove it before training with "
                    f"torch.nn.utils.remove_weight_norm(module) (the same function with a plain weight), or freeze "
                    f"them (requires_grad_(False))")
        if kind == "SpectralNorm":
            return (f"it carries torch.nn.utils.spectral_norm on '{hook.name}': remove it before training with "
                    f"torch.nn.utils.remove_spectral_norm(module), or freeze them (requires_grad_(False))")
    return ("freeze them (requires_grad_(False)), move them into a module of their own that has a rule, or register "
            "a rule that owns them (dpsat_fast.layers.register_rule)")


def model_problems(module: nn.Module) -> List[str]:
    """Everything that stops ``module`` from being trained privately, one line per module.

    Refused: modules that couple the examples of a batch or store statistics of the private data in their
    current mode (BatchNorm in train mode or without running statistics, norm layers with running statistics
    in train mode; trainable or not), torch transformer layers with the sequence-first layout, lazy modules,
    trainable parameters that no rule computes per-example gradients for (a module without a rule, a
    parameter its rule does not own, e.g. ``weight_g``/``weight_v`` of torch.nn.utils.weight_norm, or a
    parametrized tensor of torch.nn.utils.parametrize), and what a rule itself refuses.
    """
    problems = []
    inside_parametrizations: List[str] = []
    for name, m in module.named_modules():
        if any(name == p or name.startswith(p + ".") for p in inside_parametrizations):
            continue  # reported with the parametrized module
        label = f"'{name or '<root>'}' ({type(m).__name__})"
        coupling = _coupling(m)
        if coupling is not None:
            problems.append(f"{label}: {coupling}")
            continue
        if _sequence_first(m) and any(p.requires_grad for p in m.parameters()):
            problems.append(f"{label}: batch_first=False feeds [T, B, D] tensors to its Linear and LayerNorm layers, "
                            f"which would be clipped per position instead of per example (silently when T == B); "
                            f"convert it exactly with model = dpsat_fast.fix_model(model), or build it with "
                            f"batch_first=True and feed [B, T, D]")
        if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
            problems.append(f"{label}: lazy module with uninitialized parameters; run one forward pass on "
                            f"public dummy data first")
            continue
        trainable = [n for n, p in m.named_parameters(recurse=False) if p.requires_grad]
        if parametrize.is_parametrized(m):
            prefix = f"{name}.parametrizations" if name else "parametrizations"
            inside_parametrizations.append(prefix)
            tensors = list(m.parametrizations.keys())
            trainable += [f"parametrizations.{n}" for n, p in m.parametrizations.named_parameters() if p.requires_grad]
            if trainable:
                problems.append(
                    f"{label}: {tensors} are computed by torch.nn.utils.parametrize (e.g. parametrizations."
                    f"weight_norm, spectral_norm, orthogonal) from the parameters of a ParametrizationList, which no "
                    f"per-sample gradient rule sees, so trainable parameters {trainable} would receive noise only; "
                    f"remove the parametrization before training with torch.nn.utils.parametrize."
                    f"remove_parametrizations(module, {tensors[0]!r}) (it keeps the current value as a plain "
                    f"parameter), or freeze them (requires_grad_(False))")
            continue
        rule = get_rule(m)
        if rule is None:
            if not trainable:
                continue
            if type(m) is nn.MultiheadAttention:
                fix = "swap in DPMultiheadAttention: model = dpsat_fast.fix_model(model)"
            elif convertible_rnn(m):
                fix = (f"convert it exactly with model = dpsat_fast.fix_model(model) (it becomes "
                       f"dpsat_fast.layers.{_rnn_target(m)}: the same function from nn.Linear cells, weights copied)")
            elif isinstance(m, nn.RNNBase) or isinstance(m, nn.modules.rnn.RNNCellBase):
                fix = ("rebuild it from dpsat_fast.layers.DPLSTM/DPGRU/DPRNN or nn.Linear cells (only nn.LSTM, "
                       "nn.GRU and nn.RNN themselves are converted by dpsat_fast.fix_model), or freeze it "
                       "(requires_grad_(False))")
            else:
                fix = ("freeze them (requires_grad_(False)), rebuild the module from supported layers "
                       f"({', '.join(sorted(t.__name__ for t in supported_types()))}), register a rule "
                       f"with dpsat_fast.layers.register_rule, or opt in to the exact generic rule for the module's "
                       f"own parameters (per-example gradients by torch.func; it recomputes the module's forward "
                       f"and backward once more per step, so keep such modules small): "
                       f"dpsat_fast.layers.register_generic(module), or model = dpsat_fast.fix_model(model, "
                       f"generic=True) for every such module")
            problems.append(f"{label}: trainable parameters {trainable} have no per-sample gradient rule; {fix}")
            continue
        if trainable:
            unowned = [n for n in trainable if n not in rule.owned_params]
            if unowned:
                problems.append(f"{label}: trainable parameters {unowned} are not computed by its per-sample gradient "
                                f"rule (it handles {list(rule.owned_params)}), so they would receive noise only; "
                                f"{_parametrization_fix(m)}")
                continue
            problems += [f"{label}: {p}" for p in rule.problems(m)]
    return problems


def validate_model(module: nn.Module) -> None:
    """Raise :class:`PrivacyConfigError` listing every problem of ``module`` (nothing if it is fine)."""
    problems = model_problems(module)
    if problems:
        raise PrivacyConfigError("this model cannot be trained with differential privacy as it is:\n  - "
                                 + "\n  - ".join(problems))


# -- the mode can change after attach: guards at the forward, and frozen norm layers pinned in eval mode -------

class _EvalPin:
    """Set as ``module.train`` (an instance attribute): ``train(mode)`` keeps the module in eval mode, so that
    ``model.train()`` leaves a frozen norm layer frozen. ``del module.train`` removes the pin."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, mode: bool = True) -> nn.Module:
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self.module.training = False
        for child in self.module.children():
            child.train(mode)
        return self.module


def _pin_eval(m: nn.Module) -> _EvalPin:
    m.training = False
    pin = _EvalPin(m)
    m.train = pin  # nn.Module.__setattr__ stores a plain attribute: it shadows the method
    return pin


def _frozen_with_running_stats(m: nn.Module) -> bool:
    """A norm layer that normalizes with fixed running statistics now (eval mode), the one allowed mode."""
    if isinstance(m, _BatchNorm):
        return batchnorm_coupling(m) is None
    return _has_running_stats(m) and not _updates_running_stats(m) and bool(m.track_running_stats)


class ForwardGuards:
    """What :func:`install_forward_guards` installed; :meth:`remove` takes it all away again."""

    def __init__(self):
        self.hooks = []
        self.pins: List[Tuple[nn.Module, _EvalPin]] = []

    def remove(self) -> None:
        """Remove the forward pre-hooks and unpin the norm layers these guards pinned (they stay in eval mode;
        a later ``model.train()`` switches them to train mode again)."""
        for h in self.hooks:
            h.remove()
        for m, pin in self.pins:
            if m.__dict__.get("train") is pin:
                del m.__dict__["train"]
        self.hooks, self.pins = [], []


def _forward_guard(name: str):
    def guard(m: nn.Module, args) -> None:
        if isinstance(m, _BatchNorm):
            why = batchnorm_coupling(m)
            if why is not None:
                raise PrivacyConfigError(f"'{name}' ({type(m).__name__}) {why}; refused before it computed anything; "
                                         f"{batchnorm_fix(m)}")
        elif _updates_running_stats(m):
            raise PrivacyConfigError(
                f"'{name}' ({type(m).__name__}) with running statistics (track_running_stats=True) is in train mode: "
                f"this forward would add the mean and variance of the private data, un-noised, to buffers released "
                f"with state_dict(); refused before it computed anything. Put it back in eval mode (module.eval()) "
                f"or {_RUNNING_STATS_FIX}")
    return guard


def install_forward_guards(module: nn.Module) -> ForwardGuards:
    """Guard the forward of every BatchNorm and every norm layer with running statistics in ``module``.

    Validation at attach sees the modes of that moment; the mode can change later (``model.train()``,
    ``bn.training = True``). Each guard is a forward pre-hook (run first, before any other pre-hook and before
    the module computes anything) that raises :class:`PrivacyConfigError` if that forward would couple the
    examples of the batch or update running statistics: a BatchNorm in train mode or without running
    statistics, a norm layer with running statistics in train mode.

    Every such layer that is frozen now (eval mode with running statistics, e.g. after
    :func:`freeze_batchnorm`) is also pinned in eval mode: ``model.train()`` in a training loop leaves it
    frozen (its ``train`` is overridden on the instance to keep ``training=False``); a direct assignment
    ``bn.training = True`` is still refused by the guard at the next forward. The returned handle's
    ``remove()`` removes the guards and the pins it added (pins made by :func:`freeze_batchnorm` stay).

    Meant to be installed by an engine when it attaches (after :func:`validate_model`) and removed when it
    detaches.
    """
    guards = ForwardGuards()
    for name, m in module.named_modules():
        if not (isinstance(m, _BatchNorm) or _has_running_stats(m)):
            continue
        guards.hooks.append(m.register_forward_pre_hook(_forward_guard(name or "<root>"), prepend=True))
        if _frozen_with_running_stats(m) and "train" not in m.__dict__:  # not pinned (nor overridden) yet
            guards.pins.append((m, _pin_eval(m)))
    return guards


def freeze_batchnorm(model: nn.Module, affine_trainable: bool = True) -> nn.Module:
    """Freeze every BatchNorm of ``model`` for private training, in place; returns ``model``.

    Each BatchNorm goes to eval mode and normalizes every example with its running statistics (kept as they
    are, e.g. from public pretraining), so it no longer couples the examples of a batch and stores nothing
    about the private data. It is pinned there: ``model.train()`` (also called every step of a training loop)
    leaves it in eval mode, because its ``train`` is overridden on the instance; ``del bn.train`` undoes the
    pin. Its affine weight and bias train (``affine_trainable=True``: exact per-example gradients by the
    BatchNorm rule) or are frozen (``False``).

    Raises :class:`PrivacyConfigError` for a BatchNorm without running statistics (track_running_stats=False):
    there is nothing to freeze it to; replace it with GroupNorm (:func:`fix_model`).
    """
    bns = [(name or "<root>", m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]
    stateless = [f"'{name}' ({type(m).__name__})" for name, m in bns
                 if m.running_mean is None and m.running_var is None]
    if stateless:
        raise PrivacyConfigError(f"cannot freeze {', '.join(stateless)}: no running statistics "
                                 f"(track_running_stats=False) to normalize with; replace them with GroupNorm: "
                                 f"model = dpsat_fast.fix_model(model)")
    for _, m in bns:
        _pin_eval(m)
        for p in (m.weight, m.bias):
            if p is not None:
                p.requires_grad_(affine_trainable)
    return model


def _largest_group_count(channels: int, max_groups: int) -> int:
    return max(g for g in range(1, min(channels, max_groups) + 1) if channels % g == 0)


def _rnn_target(m: nn.Module) -> str:
    name = type(m).__name__
    if is_opacus_rnn(m):
        return name
    return {"LSTM": "DPLSTM", "GRU": "DPGRU"}.get(name, "DPRNN")


def _mark_generic(module: nn.Module) -> None:
    """Opt every module whose trainable own parameters have no rule into the generic rule."""
    for m in module.modules():
        if (parametrize.is_parametrized(m) or isinstance(m, parametrize.ParametrizationList)
                or (isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params())):
            continue
        if get_rule(m) is None and any(p.requires_grad for p in m.parameters(recurse=False)):
            register_generic(m)


def fix_model(module: nn.Module, max_groups: int = 32, generic: bool = False) -> nn.Module:
    """Return ``module`` made private-trainable with the same function where it can be kept:

    * BatchNorm becomes GroupNorm (≤ ``max_groups`` groups dividing the channels), except a BatchNorm pinned in
      eval mode by :func:`freeze_batchnorm` (a frozen BatchNorm is supported as it is);
    * nn.MultiheadAttention becomes :class:`DPMultiheadAttention` (weights copied);
    * sequence-first (``batch_first=False``) nn.Transformer / TransformerEncoder / TransformerDecoder /
      TransformerEncoderLayer / TransformerDecoderLayer become batch-first inside and are wrapped in a
      :class:`~dpsat_fast.layers.SequenceFirstAdapter` that keeps their interface (inputs and outputs
      [T, B, D], masks unchanged), so that their Linear and LayerNorm layers see the batch first; converted
      encoders never take torch's nested-tensor fast path (it needs nn.MultiheadAttention's packed weights);
    * nn.LSTM / nn.GRU / nn.RNN and Opacus' DPLSTM / DPGRU / DPRNN become :class:`~dpsat_fast.layers.DPLSTM` /
      ``DPGRU`` / ``DPRNN`` (the same function from nn.Linear cells, weights and ``requires_grad`` copied);
    * with ``generic=True``, every module that still has trainable own parameters without a rule (a raw
      ``nn.Parameter`` used in its forward: ViT's class token and position embedding, a learned scale) is
      opted in to the exact generic rule (:func:`dpsat_fast.layers.register_generic`; per-example gradients by
      torch.func, at the cost of recomputing that module's forward and backward once more per step).

    Works in place where it can."""
    module = _fix(module, max_groups)
    if generic:
        _mark_generic(module)
    return module


def _fix(module: nn.Module, max_groups: int) -> nn.Module:
    if isinstance(module, _BatchNorm) and not isinstance(module.__dict__.get("train"), _EvalPin):
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
    if convertible_rnn(module):
        return convert_rnn(module)
    module = convert_sequence_first_transformers(module)
    module = convert_multihead_attention(module)
    if isinstance(module, nn.TransformerEncoder):
        module.use_nested_tensor = False
    for name, child in module.named_children():
        setattr(module, name, _fix(child, max_groups))
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
           "install_forward_guards", "ForwardGuards", "freeze_batchnorm",
           "check_noise_multiplier", "check_max_grad_norm", "check_sample_rate", "check_delta"]

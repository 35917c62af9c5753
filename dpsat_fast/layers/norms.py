"""LayerNorm, GroupNorm, InstanceNorm{1,2,3}d (affine), RMSNorm, and frozen BatchNorm{1,2,3}d.

Each is ``y = x̂ ⊙ w + b`` with ``x̂`` the per-example normalized input (no cross-example coupling; for
BatchNorm only in eval mode with running statistics, where every example is normalized with the same fixed
statistics: validation refuses the other modes, and the rule refuses them again at the forward). The
normalization goes through autograd as usual; only the affine part is a custom function whose backward
forms the small per-example gradients and their squared norms directly, in one pass over x̂ and g (the op
``affine_per_example_grads``, docs/algorithms.md §3): ``∂w_i = Σ_t x̂_{i,t} ⊙ g_{i,t}``, ``∂b_i = Σ_t g_{i,t}``
(t over all non-parameter dimensions). The clipped sum adds the DP noise in the same kernel.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..ops import error_bounds
from .base import (LayerRule, ModuleRecord, NoiseRequest, Use, materialized_clipped_sums, materialized_sq_norms,
                   sum_over_uses)


class _AffineFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xhat, weight, bias, record: ModuleRecord, param_view, channel_first, w_eff, b_eff):
        # weight/bias: graph edges only; the affine map uses w_eff/b_eff (DP-SAT: w + ε)
        ctx.save_for_backward(xhat, w_eff)
        ctx.record, ctx.param_view, ctx.channel_first = record, param_view, channel_first
        out = xhat * w_eff.view(param_view) if w_eff is not None else xhat
        return out + b_eff.view(param_view) if b_eff is not None else out

    @staticmethod
    def backward(ctx, grad_out):
        xhat, weight = ctx.saved_tensors
        B = grad_out.shape[0]
        param_shape = (weight if weight is not None else ctx.record.module.bias).shape
        if ctx.channel_first:  # [B, C, *S] -> [B, T, C] (a transposed view)
            as_btc = lambda t: t.reshape(B, t.shape[1], math.prod(t.shape[2:])).transpose(1, 2)  # noqa: E731
        else:  # [B, *, *param_shape] -> [B, T, K]
            as_btc = lambda t: t.reshape(B, math.prod(t.shape[1:]) // math.prod(param_shape), math.prod(param_shape))  # noqa: E731
        with_w, with_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        dw, db, w_sq, b_sq = ops.affine_per_example_grads(as_btc(xhat), as_btc(grad_out), with_w, with_b)
        use = {}
        if with_w:
            use.update(weight=dw.view(B, *param_shape), weight_sq_norm=w_sq)
        if with_b:
            use.update(bias=db.view(B, *param_shape), bias_sq_norm=b_sq)
        ctx.record.add_use(ctx, **use)
        grad_xhat = None
        if ctx.needs_input_grad[0]:
            grad_xhat = grad_out * weight.view(ctx.param_view).to(grad_out.dtype) if weight is not None else grad_out
        return grad_xhat, None, None, None, None, None, None, None


class _NormRule(LayerRule):
    """Shared machinery: subclasses give ``normalize`` and where the parameters sit in the input."""

    channel_first = False  # True: params on dim 1 (GroupNorm/InstanceNorm/BatchNorm); False: trailing dims

    def normalize(self, module: nn.Module, x: Tensor) -> Tensor:
        raise NotImplementedError

    def min_input_dim(self, param: Tensor) -> int:
        """Fewest input dimensions: the batch, the parameter's dimensions and (channel-first) a spatial one."""
        return param.dim() + 1 + int(self.channel_first)

    def forward(self, module, record: ModuleRecord, x: Tensor) -> Tensor:
        param = module.weight if module.weight is not None else module.bias
        if x.dim() < self.min_input_dim(param):
            raise ValueError(f"{record.name}: DP {type(module).__name__} needs a batch dimension first, got "
                             f"input of shape {tuple(x.shape)}")
        xhat = self.normalize(module, x)
        if self.channel_first:
            param_view = (param.shape[0],) + (1,) * (x.dim() - 2)
        else:
            param_view = tuple(param.shape)
        bias = getattr(module, "bias", None)
        return _AffineFunction.apply(xhat, module.weight, bias, record, param_view, self.channel_first,
                                     record.effective(module.weight), record.effective(bias))

    def per_example_grads(self, record, uses: List[Use], names: Sequence[str]) -> Dict[str, Tensor]:
        return {n: sum_over_uses([u[n] for u in uses]) for n in names}

    def sq_norms(self, record, uses, names) -> Dict[str, Tensor]:
        # norms of the same per-example gradients the clipped sum adds: only their own rounding to certify
        if len(uses) == 1:
            g = uses[0][names[0]]
            rho = error_bounds.materialized_sq_norm_error(g[0].numel() if g.shape[0] else 1, g.dtype)
            return {n: uses[0][n + "_sq_norm"].double() * (1.0 + rho) for n in names}
        return {n: materialized_sq_norms(g) for n, g in self.per_example_grads(record, uses, names).items()}

    def clipped_sums(self, record, uses, scale, names, noise: Optional[NoiseRequest] = None):
        return materialized_clipped_sums(self.per_example_grads(record, uses, names), scale, noise)


class LayerNormRule(_NormRule):
    module_types = (nn.LayerNorm,)

    def normalize(self, module, x):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)


class RMSNormRule(_NormRule):
    module_types = (nn.RMSNorm,)

    def normalize(self, module, x):
        return F.rms_norm(x, module.normalized_shape, None, module.eps)


class GroupNormRule(_NormRule):
    module_types = (nn.GroupNorm,)
    channel_first = True

    def min_input_dim(self, param: Tensor) -> int:
        return 2  # [B, C] (no spatial dimension) is a valid GroupNorm input

    def normalize(self, module, x):
        return F.group_norm(x, module.num_groups, None, None, module.eps)


class InstanceNormRule(_NormRule):
    module_types = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
    channel_first = True

    def problems(self, module) -> List[str]:
        if module.track_running_stats and module.training:
            return ["track_running_stats=True accumulates un-noised running statistics of the private data "
                    "into buffers that are released with the model; set track_running_stats=False"]
        return []

    def normalize(self, module, x):
        use_input_stats = module.training or not module.track_running_stats
        return F.instance_norm(x, module.running_mean, module.running_var, None, None, use_input_stats,
                               module.momentum if module.momentum is not None else 0.0, module.eps)


#: What to do about a BatchNorm that couples examples (the messages about one end with it).
BATCHNORM_FIX = ("freeze its statistics: `dpsat_fast.freeze_batchnorm(model)` for a pretrained model, or replace "
                 "it with GroupNorm: `dpsat_fast.fix_model(model)`")
#: ... and about one without running statistics, which cannot be frozen as it is.
BATCHNORM_WITHOUT_STATS_FIX = ("replace it with GroupNorm: `dpsat_fast.fix_model(model)`, or give it running "
                               "statistics (track_running_stats=True, e.g. those of a pretrained model) and freeze "
                               "them: `dpsat_fast.freeze_batchnorm(model)`")


def batchnorm_fix(module: nn.Module) -> str:
    """The fix to name in a message about ``module`` (a BatchNorm that couples examples)."""
    has_stats = module.running_mean is not None or module.running_var is not None
    return BATCHNORM_FIX if has_stats else BATCHNORM_WITHOUT_STATS_FIX


def batchnorm_coupling(module: nn.Module) -> Optional[str]:
    """Why ``module`` (a BatchNorm) would couple the examples of a batch at a forward now, or None if it
    normalizes every example with fixed running statistics (eval mode with running statistics)."""
    if module.training:
        return ("is in train mode: it normalizes each example with the mean and variance of the whole batch "
                "(coupling the examples, so per-example gradients and the privacy guarantee do not exist) and "
                "writes running statistics of the private data, un-noised, into state_dict()")
    if module.running_mean is None and module.running_var is None:
        return ("has no running statistics (track_running_stats=False), so it normalizes with the statistics "
                "of the whole batch in eval mode too, coupling the examples of a batch")
    return None


class BatchNormRule(_NormRule):
    """Frozen BatchNorm (eval mode with running statistics, the usual way to fine-tune a pretrained CNN
    privately): ``x̂ = (x − running_mean) / sqrt(running_var + eps)`` per channel, the same for every example,
    then the affine part with exact per-example gradients. Channel-first; BatchNorm1d also takes [B, C].
    SyncBatchNorm in eval mode computes the same function and is handled too."""

    module_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    channel_first = True

    def problems(self, module) -> List[str]:
        why = batchnorm_coupling(module)
        return [f"BatchNorm {why}; {batchnorm_fix(module)}"] if why else []

    def min_input_dim(self, param: Tensor) -> int:
        return 2

    def forward(self, module, record: ModuleRecord, x: Tensor) -> Tensor:
        why = batchnorm_coupling(module)
        if why is not None:  # the mode changed after attach and no forward guard caught it: never compute
            from ..validation import PrivacyConfigError
            raise PrivacyConfigError(f"'{record.name}' ({type(module).__name__}) {why}; nothing was computed; "
                                     f"{batchnorm_fix(module)}")
        module._check_input_dim(x)
        return super().forward(module, record, x)

    def normalize(self, module, x):
        return F.batch_norm(x, module.running_mean, module.running_var, None, None, False, 0.0, module.eps)

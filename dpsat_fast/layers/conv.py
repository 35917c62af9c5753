"""nn.Conv1d/2d/3d: stride, padding (numbers, 'valid', 'same', non-zero padding modes), dilation, groups.

For group k the layer is a matrix product on unfolded patches: ``a_i ∈ R^{T×D_k}`` with T output positions
and ``D_k = (C_in/groups)·∏kernel``, ``g_i ∈ R^{T×P_k}`` with ``P_k = C_out/groups``; the per-example weight
gradient of the group is ``g_iᵀ a_i`` and ``‖∂W_i‖² = Σ_k ‖g_{i,k}ᵀ a_{i,k}‖²`` (DESIGN.md §2.3). Every group
is counted: treating a grouped conv as dense gives wrong norms. The clipped sum never unfolds: it is
the convolution weight-gradient of the per-example-scaled output gradient.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ghost
from .base import LayerRule, ModuleRecord, Use, sum_over_uses


def unfold_patches(x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                   dilation: Sequence[int], groups: int) -> Tensor:
    """im2col for N-d convolution: x [B, C, *S] -> [B, groups, (C/groups)·∏k, T] (weight layout order).

    1-D and 2-D go through F.unfold (one optimized im2col, no intermediate copies); 3-D through strided
    windows and one copy."""
    n = len(kernel_size)
    B, C = x.shape[:2]
    if n == 2:
        cols = F.unfold(x, tuple(kernel_size), tuple(dilation), tuple(padding), tuple(stride))  # [B, C·K, T]
    elif n == 1:
        cols = F.unfold(x.unsqueeze(2), (1, kernel_size[0]), (1, dilation[0]), (0, padding[0]), (1, stride[0]))
    else:
        if any(padding):
            x = F.pad(x, [p for pad in reversed(padding) for p in (pad, pad)])
        for d in range(n):
            x = x.unfold(2 + d, dilation[d] * (kernel_size[d] - 1) + 1, stride[d])  # appends a window dim
        x = x[(slice(None),) * (2 + n) + tuple(slice(None, None, dl) for dl in dilation)]  # [B, C, *T, *k]
        perm = (0, 1) + tuple(range(2 + n, 2 + 2 * n)) + tuple(range(2, 2 + n))
        T = math.prod(x.shape[2:2 + n])
        cols = x.permute(perm).reshape(B, C * math.prod(kernel_size), T)
    return cols.view(B, groups, cols.shape[1] // groups, cols.shape[2])


class _ConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, record: ModuleRecord, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.record = record
        ctx.geometry = (stride, padding, dilation, groups)
        n = weight.dim() - 2
        return torch.convolution(x, weight, bias, stride, padding, dilation, False, [0] * n, groups)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        ctx.record.add_use(x=x, g=grad_out)
        grad_x = None
        if ctx.needs_input_grad[0]:
            n = weight.dim() - 2
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight.to(grad_out.dtype), None, stride, padding, dilation, False, [0] * n,
                groups, [True, False, False])[0]
        return grad_x, None, None, None, None, None, None, None


class ConvRule(LayerRule):
    module_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

    def __init__(self, route: str | None = None):
        self.route = route

    def _prepare(self, module: nn.modules.conv._ConvNd, x: Tensor) -> Tuple[Tensor, Tuple[int, ...]]:
        """Apply padding the conv op cannot express (modes, asymmetric 'same'); return numeric padding."""
        n = module.weight.dim() - 2
        zero = (0,) * n
        if module.padding_mode != "zeros":
            return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode), zero
        if isinstance(module.padding, str):
            if module.padding == "valid":
                return x, zero
            rp = module._reversed_padding_repeated_twice
            left, right = tuple(rp[0::2][::-1]), tuple(rp[1::2][::-1])
            if left == right:
                return x, left
            return F.pad(x, rp), zero
        return x, tuple(module.padding)

    def forward(self, module, record: ModuleRecord, x: Tensor) -> Tensor:
        n = module.weight.dim() - 2
        if x.dim() != n + 2:
            raise ValueError(f"{record.name}: DP Conv{n}d needs batched input of {n + 2} dims, got "
                             f"shape {tuple(x.shape)}")
        x, padding = self._prepare(module, x)
        record.geometry = (tuple(module.stride), padding, tuple(module.dilation), module.groups)
        return _ConvFunction.apply(x, module.weight, module.bias, record, *record.geometry)

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _patches_and_grads(record, uses: List[Use]):
        """Unfolded inputs [B·G, T, D_k] and output grads [B·G, T, P_k] (transposed views of feature-major
        tensors: no copies), several uses concatenated along T."""
        stride, padding, dilation, groups = record.geometry
        ks = record.module.weight.shape[2:]
        a_parts, g_parts = [], []
        for u in uses:
            a_parts.append(unfold_patches(u["x"], ks, stride, padding, dilation, groups))  # [B, G, D_k, T]
            g = u["g"]
            g_parts.append(g.reshape(g.shape[0], groups, g.shape[1] // groups, math.prod(g.shape[2:])))  # [B, G, P_k, T]
        a = torch.cat(a_parts, 3) if len(a_parts) > 1 else a_parts[0]
        g = torch.cat(g_parts, 3) if len(g_parts) > 1 else g_parts[0]
        B, G = a.shape[:2]
        return (a.reshape(B * G, a.shape[2], a.shape[3]).transpose(1, 2),
                g.reshape(B * G, g.shape[2], g.shape[3]).transpose(1, 2), B, G)

    @staticmethod
    def _bias_grads(uses: List[Use]) -> Tensor:
        return sum_over_uses([u["g"].to(ghost.accum_dtype(u["g"])).flatten(2).sum(2) for u in uses])

    @staticmethod
    def _grouped_weight_grads(record, uses: List[Use], sl: slice) -> Tensor:
        """Per-example weight gradients [b, *weight.shape] of examples ``sl``, summed over uses, as ONE
        convolution weight-gradient with the batch folded into the groups (no unfold)."""
        stride, padding, dilation, groups = record.geometry
        w = record.module.weight
        n = w.dim() - 2
        out = None
        for u in uses:
            x, g = u["x"][sl], u["g"][sl]
            dt, b = ghost.accum_dtype(x), x.shape[0]
            if b == 0:
                return torch.zeros((0,) + tuple(w.shape), dtype=dt, device=w.device)
            pe = torch.ops.aten.convolution_backward(
                g.to(dt).reshape(1, b * g.shape[1], *g.shape[2:]), x.to(dt).reshape(1, b * x.shape[1], *x.shape[2:]),
                torch.zeros((b * w.shape[0],) + tuple(w.shape[1:]), dtype=dt, device=w.device), None, stride,
                padding, dilation, False, [0] * n, b * groups, [False, True, False])[1]
            pe = pe.view((b,) + tuple(w.shape))
            out = pe if out is None else out + pe
        return out

    def _route(self, record, uses: List[Use]) -> str:
        if self.route is not None:
            return self.route
        w, groups = record.module.weight, record.geometry[3]
        T = sum(math.prod(u["g"].shape[2:]) for u in uses)
        return ghost.choose_route(T, w[0].numel(), w.shape[0] // groups)

    # -- rule ----------------------------------------------------------------------------------
    def sq_norms(self, record, uses, names) -> Dict[str, Tensor]:
        out = {}
        if "weight" in names:
            if self._route(record, uses) == "instantiate":
                B, per_example = uses[0]["x"].shape[0], record.module.weight.numel()
                parts = [self._grouped_weight_grads(record, uses, sl).flatten(1).pow(2).sum(1)
                         for sl in ghost.batch_chunks(B, per_example)]
                out["weight"] = torch.cat(parts) if len(parts) != 1 else parts[0]
            else:
                a, g, B, G = self._patches_and_grads(record, uses)
                out["weight"] = ghost.sq_norms_ghost(a, g).view(B, G).sum(1)
        if "bias" in names:
            out["bias"] = self._bias_grads(uses).pow(2).sum(1)
        return out

    def clipped_sums(self, record, uses, scale, names) -> Dict[str, Tensor]:
        stride, padding, dilation, groups = record.geometry
        out = {}
        if "weight" in names:
            weight = record.module.weight.detach()
            n = weight.dim() - 2
            parts = []
            for u in uses:
                dt = ghost.accum_dtype(u["x"])
                g = u["g"].to(dt) * scale.to(dt).view(-1, *([1] * (n + 1)))
                parts.append(torch.ops.aten.convolution_backward(
                    g, u["x"].to(dt), weight.to(dt), None, stride, padding, dilation, False,
                    [0] * n, groups, [False, True, False])[1])
            out["weight"] = sum_over_uses(parts)
        if "bias" in names:
            bias = self._bias_grads(uses)
            out["bias"] = bias.t().mv(scale.to(bias.dtype))
        return out

    def per_example_grads(self, record, uses, names) -> Dict[str, Tensor]:
        out = {}
        if "weight" in names:
            out["weight"] = self._grouped_weight_grads(record, uses, slice(None))
        if "bias" in names:
            out["bias"] = self._bias_grads(uses)
        return out

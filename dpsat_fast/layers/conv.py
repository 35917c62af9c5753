"""nn.Conv1d/2d/3d: stride, padding (numbers, 'valid', 'same', non-zero padding modes), dilation, groups.

For group k the layer is a matrix product on unfolded patches: ``a_i ∈ R^{T×D_k}`` with T output positions
and ``D_k = (C_in/groups)·∏kernel``, ``g_i ∈ R^{T×P_k}`` with ``P_k = C_out/groups``; the per-example weight
gradient of the group is ``g_iᵀ a_i`` and ``‖∂W_i‖² = Σ_k ‖g_{i,k}ᵀ a_{i,k}‖²`` (DESIGN.md §2.3). Every group
is counted: treating a grouped conv as dense gives wrong norms. Norms and clipped noisy sums are the ops
``conv_weight_sq_norms`` / ``conv_clipped_sum_with_noise`` (Triton with implicit im2col on CUDA, convolution
weight-gradients on CPU); a module used several times in one forward is handled exactly in PyTorch.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..ops import torch_impl
from .base import NO_NOISE, LayerRule, ModuleRecord, NoiseRequest, Use, sum_over_uses


# Per layer, per-example weight gradients up to this many elements (fp32: 64 MiB) are kept between the norms
# and the clipped sum on the PyTorch path; larger ones are recomputed as a convolution weight-gradient.
PER_EXAMPLE_CACHE_ELEMENTS = 1 << 24


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
        ctx.record.add_use(ctx, x=x, g=grad_out)
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
    def _args(record) -> tuple:
        stride, padding, dilation, groups = record.geometry
        return tuple(record.module.weight.shape), stride, padding, dilation, groups

    @staticmethod
    def _bias_grads(uses: List[Use]) -> Tensor:
        return sum_over_uses([torch_impl.conv_bias_per_example_grads(u["g"]) for u in uses])

    def _weight_grads(self, record, uses: List[Use], sl: slice = slice(None)) -> Tensor:
        return sum_over_uses([torch_impl.conv_per_example_grads(u["x"][sl], u["g"][sl], *self._args(record))
                              for u in uses])

    def _keep_per_example(self, record, use: Use) -> bool:
        """PyTorch path, instantiate route, and the per-example gradients fit the cache budget."""
        x, g = use["x"], use["g"]
        if ops.use_triton(x):
            return False
        shape, groups = record.module.weight.shape, record.geometry[3]
        route = self.route or ops.choose_route(math.prod(g.shape[2:]), math.prod(shape[1:]), shape[0] // groups)
        return route == "instantiate" and x.shape[0] * math.prod(shape) <= PER_EXAMPLE_CACHE_ELEMENTS

    # -- rule ----------------------------------------------------------------------------------
    def sq_norms(self, record, uses, names) -> Dict[str, Tensor]:
        shape, stride, padding, dilation, groups = self._args(record)
        with_bias = "bias" in names
        if "weight" not in names:
            return {"bias": self._bias_grads(uses).pow(2).sum(1)}
        record.cache.clear()
        if len(uses) == 1 and self._keep_per_example(record, uses[0]):
            # CPU instantiate route: keep the per-example gradients for the clipped sum (Σ_i c_i G_i is then
            # one pass over them instead of a second convolution weight-gradient)
            pe, bias, w_sq, b_sq = ops.conv_per_example_grads(uses[0]["x"], uses[0]["g"], *self._args(record),
                                                              with_bias=with_bias)
            record.cache["weight_per_example"] = pe
            out = {"weight": w_sq}
            if with_bias:
                record.cache["bias_per_example"] = bias
                out["bias"] = b_sq
            return out
        if len(uses) == 1:
            w, b = ops.conv_weight_sq_norms(uses[0]["x"], uses[0]["g"], shape, stride, padding, dilation, groups,
                                            self.route, with_bias=with_bias)
            return {"weight": w, "bias": b} if with_bias else {"weight": w}
        # one module used several times: the per-example gradient is the sum over uses (cross terms)
        B = uses[0]["x"].shape[0]
        T = sum(math.prod(u["g"].shape[2:]) for u in uses)
        route = self.route or ops.choose_route(T, math.prod(shape[1:]), shape[0] // groups)
        if route == "instantiate":
            parts = [self._weight_grads(record, uses, sl).flatten(1).pow(2).sum(1)
                     for sl in torch_impl.batch_chunks(B, math.prod(shape))]
            out = {"weight": torch.cat(parts) if len(parts) != 1 else parts[0]}
        else:
            a, g = torch_impl.conv_patches_and_grads([u["x"] for u in uses], [u["g"] for u in uses], shape[2:],
                                                     stride, padding, dilation, groups)
            out = {"weight": torch_impl.sq_norms_ghost(a, g).view(B, groups).sum(1)}
        if with_bias:
            out["bias"] = self._bias_grads(uses).pow(2).sum(1)
        return out

    def clipped_sums(self, record, uses, scale, names, noise: Optional[NoiseRequest] = None):
        if "weight" not in names:
            bias = self._bias_grads(uses)
            return {"bias": bias.t().mv(scale.to(bias.dtype))}, set()
        if noise is None or not noise.covers(names):
            noise = NO_NOISE
        with_bias = "bias" in names
        pe = record.cache.pop("weight_per_example", None)
        if pe is not None:
            w = ops.per_example_clipped_sum_with_noise(pe.flatten(1), scale, noise.seed, noise.offsets.get("weight", 0),
                                                       noise.std).view(pe.shape[1:])
            out = {"weight": w}
            if with_bias:
                bias = record.cache.pop("bias_per_example")
                out["bias"] = ops.per_example_clipped_sum_with_noise(bias, scale, noise.seed,
                                                                     noise.offsets.get("bias", 0), noise.std)
            return out, set(noise.offsets) & set(names)
        w_parts, b_parts = [], []
        for k, u in enumerate(uses):
            use_noise = noise if k == 0 else NO_NOISE  # the noise goes into the sum once
            w, b = ops.conv_clipped_sum_with_noise(u["x"], u["g"], scale, *self._args(record), with_bias,
                                                   use_noise.seed, use_noise.offsets.get("weight", 0),
                                                   use_noise.offsets.get("bias", 0), use_noise.std)
            w_parts.append(w)
            b_parts.append(b)
        out = {"weight": sum_over_uses(w_parts)}
        if with_bias:
            out["bias"] = sum_over_uses(b_parts)
        return out, set(noise.offsets) & set(names)

    def per_example_grads(self, record, uses, names) -> Dict[str, Tensor]:
        out = {}
        if "weight" in names:
            out["weight"] = self._weight_grads(record, uses)
        if "bias" in names:
            out["bias"] = self._bias_grads(uses)
        return out

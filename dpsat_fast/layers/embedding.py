"""nn.Embedding: per-example gradient rows add up for repeated indices.

For example i with indices ``x_{i,t}`` and output gradients ``g_{i,t}``, row v of the per-example gradient
is ``Σ_{t: x_{i,t}=v} g_{i,t}`` (rows of ``padding_idx`` get nothing). The squared norm sums the squares of
these accumulated rows: duplicates are added before squaring, so the norm is exact. Cost O(B·T·D), the
per-example gradient is never materialized.
"""

from __future__ import annotations

import math
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.torch_impl import accum_dtype
from .base import LayerRule, ModuleRecord, Use, as_batch_positions_features


class _EmbeddingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx, weight, padding_idx, record: ModuleRecord):
        ctx.save_for_backward(idx)
        ctx.record = record
        return F.embedding(idx, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_out):
        (idx,) = ctx.saved_tensors
        ctx.record.add_use(ctx, idx=idx.reshape(idx.shape[0], math.prod(idx.shape[1:])),
                           g=as_batch_positions_features(grad_out))
        return None, None, None, None


class EmbeddingRule(LayerRule):
    module_types = (nn.Embedding,)
    owned_params = ("weight",)

    def problems(self, module: nn.Embedding) -> List[str]:
        out = []
        if module.max_norm is not None:
            out.append("max_norm renormalizes the weight in place from the batch's indices; set max_norm=None")
        if module.scale_grad_by_freq:
            out.append("scale_grad_by_freq couples examples through batch frequencies; set it to False")
        if module.sparse:
            out.append("sparse gradients are not supported; set sparse=False")
        return out

    def forward(self, module: nn.Embedding, record: ModuleRecord, idx: Tensor) -> Tensor:
        if idx.dim() < 1:
            raise ValueError(f"{record.name}: DP Embedding needs a batch dimension first")
        return _EmbeddingFunction.apply(idx, module.weight, module.padding_idx, record)

    @staticmethod
    def _flat(record: ModuleRecord, uses: List[Use]):
        idx = torch.cat([u["idx"] for u in uses], 1)  # [B, T]
        g = torch.cat([u["g"] for u in uses], 1)  # [B, T, D]
        g = g.to(accum_dtype(g))
        pad = record.module.padding_idx
        if pad is not None:
            g = g * (idx != pad).unsqueeze(-1).to(g.dtype)
        return idx, g

    def sq_norms(self, record, uses, names) -> Dict[str, Tensor]:
        idx, g = self._flat(record, uses)
        B, T = idx.shape
        V = record.module.num_embeddings
        example = torch.arange(B, device=idx.device).unsqueeze(1).expand(B, T)
        keys = (example * V + idx).reshape(-1)
        unique, inverse = torch.unique(keys, return_inverse=True)
        rows = torch.zeros(unique.numel(), g.shape[-1], dtype=g.dtype, device=g.device)
        rows.index_add_(0, inverse, g.reshape(B * T, -1))  # one row per (example, index)
        out = torch.zeros(B, dtype=g.dtype, device=g.device)
        out.index_add_(0, unique // V, rows.pow(2).sum(1))
        return {"weight": out}

    def clipped_sums(self, record, uses, scale, names, noise=None):
        idx, g = self._flat(record, uses)
        weight = record.module.weight
        out = torch.zeros(weight.shape, dtype=g.dtype, device=g.device)
        out.index_add_(0, idx.reshape(-1), (g * scale.to(g.dtype).view(-1, 1, 1)).reshape(-1, g.shape[-1]))
        return {"weight": out}, set()

    def per_example_grads(self, record, uses, names) -> Dict[str, Tensor]:
        idx, g = self._flat(record, uses)
        B = idx.shape[0]
        out = torch.zeros(B, *record.module.weight.shape, dtype=g.dtype, device=g.device)
        out.scatter_add_(1, idx.unsqueeze(-1).expand_as(g), g)
        return {"weight": out}

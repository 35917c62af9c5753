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
    def forward(ctx, idx, weight, padding_idx, record: ModuleRecord, w_eff):
        ctx.save_for_backward(idx)
        ctx.record = record
        return F.embedding(idx, w_eff, padding_idx)  # weight: graph edge only; w_eff = w (+ ε under DP-SAT)

    @staticmethod
    def backward(ctx, grad_out):
        (idx,) = ctx.saved_tensors
        ctx.record.add_use(ctx, idx=idx.reshape(idx.shape[0], math.prod(idx.shape[1:])),
                           g=as_batch_positions_features(grad_out))
        return None, None, None, None, None


def _lookup_problems(module) -> List[str]:
    """What an Embedding or EmbeddingBag cannot do privately."""
    out = []
    if module.max_norm is not None:
        out.append("max_norm renormalizes the weight in place from the batch's indices; set max_norm=None")
    if module.scale_grad_by_freq:
        out.append("scale_grad_by_freq couples examples through batch frequencies; set it to False")
    if module.sparse:
        out.append("sparse gradients are not supported; set sparse=False")
    return out


def rows_per_example_and_index(idx: Tensor, g: Tensor, num_embeddings: int):
    """``g`` [B, T, F] summed per (example, embedding index) of ``idx`` [B, T]: ``(example of each row, index of
    each row, rows)``; duplicates of one index in one example are added before anything is squared."""
    B, T = idx.shape
    example = torch.arange(B, device=idx.device).unsqueeze(1).expand(B, T)
    keys = (example * num_embeddings + idx).reshape(-1)
    unique, inverse = torch.unique(keys, return_inverse=True)
    rows = torch.zeros(unique.numel(), g.shape[-1], dtype=g.dtype, device=g.device)
    rows.index_add_(0, inverse, g.reshape(B * T, g.shape[-1]))
    return unique // num_embeddings, unique % num_embeddings, rows


class EmbeddingRule(LayerRule):
    module_types = (nn.Embedding,)
    owned_params = ("weight",)

    def problems(self, module: nn.Embedding) -> List[str]:
        return _lookup_problems(module)

    def forward(self, module: nn.Embedding, record: ModuleRecord, idx: Tensor) -> Tensor:
        if idx.dim() < 1:
            raise ValueError(f"{record.name}: DP Embedding needs a batch dimension first")
        return _EmbeddingFunction.apply(idx, module.weight, module.padding_idx, record, record.effective(module.weight))

    @staticmethod
    def _flat(record: ModuleRecord, uses: List[Use]):
        idx = torch.cat([u["idx"] for u in uses], 1)  # [B, T]
        g = torch.cat([u["g"] for u in uses], 1)  # [B, T, D]
        g = g.to(accum_dtype(g))
        pad = record.module.padding_idx
        if pad is not None:
            g = g * (idx != pad).unsqueeze(-1).to(g.dtype)
        return idx, g

    def _rows(self, record: ModuleRecord, uses: List[Use]):
        """Per (example, index) accumulated gradient rows: ``(example of each row, index of each row, rows)``;
        computed once per backward and used for both the norm and the clipped sum."""
        cached = record.cache.get("rows")
        if cached is not None:
            return cached
        idx, g = self._flat(record, uses)
        record.cache["rows"] = rows_per_example_and_index(idx, g, record.module.num_embeddings)
        return record.cache["rows"]

    def sq_norms(self, record, uses, names) -> Dict[str, Tensor]:
        # the squares of the accumulated rows (duplicates added before squaring), exactly in float64: the
        # clipped sum adds these same rows, so this bounds what it adds for each example
        example, _, rows = self._rows(record, uses)
        B = uses[0]["idx"].shape[0]
        out = torch.zeros(B, dtype=torch.float64, device=rows.device)
        out.index_add_(0, example, rows.double().pow(2).sum(1))
        return {"weight": out * (1.0 + (rows.shape[1] * max(1, uses[0]["idx"].shape[1]) + 2) * 2.0 ** -53)}

    def clipped_sums(self, record, uses, scale, names, noise=None):
        example, index, rows = self._rows(record, uses)
        record.cache.pop("rows", None)
        weight = record.module.weight
        out = torch.zeros(weight.shape, dtype=rows.dtype, device=rows.device)
        out.index_add_(0, index, rows * scale.to(rows.dtype)[example].unsqueeze(1))
        return {"weight": out}, set()

    def per_example_grads(self, record, uses, names) -> Dict[str, Tensor]:
        idx, g = self._flat(record, uses)
        B = idx.shape[0]
        out = torch.zeros(B, *record.module.weight.shape, dtype=g.dtype, device=g.device)
        out.scatter_add_(1, idx.unsqueeze(-1).expand_as(g), g)
        return {"weight": out}


# -- EmbeddingBag ----------------------------------------------------------------------------------------

def _bag_layout(idx: Tensor, offsets, psw, mode: str, include_last_offset: bool, padding_idx, dtype):
    """The bags as a padded batch: ``(bag_idx [B, L] long, coef [B, L])`` with
    ``out_b = Σ_l coef[b, l]·W[bag_idx[b, l]]``
    (coef: the per-sample weight, 1, or 1/bag size for mean; 0 for padding entries and empty slots); plus, for a
    1-D input, ``(bag, position)`` of every entry (None for 2-D), to map per-entry values back."""
    if idx.dim() == 2:
        B, L = idx.shape
        bag_idx = idx
        coef = psw.to(dtype) if psw is not None else torch.ones(B, L, dtype=dtype, device=idx.device)
        entry = None
    else:
        N = idx.shape[0]
        starts = offsets[:-1] if include_last_offset else offsets
        B = starts.shape[0]
        ends = offsets[1:] if include_last_offset else torch.cat([offsets[1:], offsets.new_tensor([N])])
        t = torch.arange(N, device=idx.device)
        bag = (torch.searchsorted(starts.contiguous(), t, right=True) - 1).clamp_min(0)
        inside = (t >= starts[bag]) & (t < ends[bag]) if B else torch.zeros(N, dtype=torch.bool, device=idx.device)
        pos = t - starts[bag] if B else t
        L = int((ends - starts).clamp_min(0).max()) if B else 0
        bag_idx = torch.zeros(B, L, dtype=idx.dtype, device=idx.device)
        coef = torch.zeros(B, L, dtype=dtype, device=idx.device)
        w = psw.to(dtype) if psw is not None else torch.ones(N, dtype=dtype, device=idx.device)
        sel = inside.nonzero().flatten()
        bag_idx[bag[sel], pos[sel]] = idx[sel]
        coef[bag[sel], pos[sel]] = w[sel]
        entry = (bag, pos, inside)
    if padding_idx is not None:
        coef = coef * (bag_idx != padding_idx).to(dtype)
    if mode == "mean":
        count = (coef != 0).sum(1, keepdim=True) if psw is None else None
        # torch divides by the number of non-padding entries of the bag (no per-sample weights in mean mode)
        coef = coef / count.clamp_min(1).to(dtype)
    return bag_idx, coef, entry


class _EmbeddingBagFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx, offsets, psw, weight, record: ModuleRecord, w_eff, mode, include_last_offset, padding_idx):
        ctx.save_for_backward(idx, offsets, psw, w_eff)
        ctx.record, ctx.mode, ctx.include_last_offset, ctx.padding_idx = record, mode, include_last_offset, padding_idx
        # weight: graph edge only; w_eff = w (+ ε under DP-SAT)
        return F.embedding_bag(idx, w_eff, offsets, mode=mode, per_sample_weights=psw,
                               include_last_offset=include_last_offset, padding_idx=padding_idx)

    @staticmethod
    def backward(ctx, grad_out):
        idx, offsets, psw, w = ctx.saved_tensors
        dtype = accum_dtype(grad_out)
        bag_idx, coef, entry = _bag_layout(idx, offsets, psw, ctx.mode, ctx.include_last_offset, ctx.padding_idx, dtype)
        ctx.record.add_use(ctx, idx=bag_idx, coef=coef, g=grad_out)
        grad_psw = None
        if psw is not None and ctx.needs_input_grad[2]:
            # ∂out_b/∂psw_t = W[idx_t]·g_b (0 for padding entries)
            per_slot = (w[bag_idx].to(grad_out.dtype) * grad_out.unsqueeze(1)).sum(-1)
            if ctx.padding_idx is not None:
                per_slot = per_slot * (bag_idx != ctx.padding_idx).to(grad_out.dtype)
            if entry is None:
                grad_psw = per_slot.to(psw.dtype)
            else:
                bag, pos, inside = entry
                grad_psw = torch.zeros_like(psw)
                sel = inside.nonzero().flatten()
                grad_psw[sel] = per_slot[bag[sel], pos[sel]].to(psw.dtype)
        return None, None, grad_psw, None, None, None, None, None, None


class EmbeddingBagRule(LayerRule):
    """nn.EmbeddingBag, one bag per example (a row of a 2-D input, or a bag of ``offsets``): mode ``sum``
    (optionally with ``per_sample_weights``) or ``mean``, ``padding_idx``, ``include_last_offset``.

    Example b's gradient row v is ``Σ_{l: idx_{b,l} = v} coef_{b,l}·g_b`` (coef: the per-sample weight, 1, or
    1/(non-padding bag size) for mean; padding entries 0). The rows of an example are accumulated once (repeated
    indices added before squaring) and both the squared norm (exact squares in float64, rounded up) and the
    clipped sum use these same rows: a certified norm by construction. ``mode='max'`` is refused."""

    module_types = (nn.EmbeddingBag,)
    owned_params = ("weight",)

    def problems(self, module: nn.EmbeddingBag) -> List[str]:
        out = _lookup_problems(module)
        if module.mode not in ("sum", "mean"):
            out.append(f"mode={module.mode!r} is not supported (only 'sum' and 'mean'); for a max over the bag use "
                       f"nn.Embedding on padded [B, L] indices followed by .amax(1), which is supported")
        return out

    def forward(self, module: nn.EmbeddingBag, record: ModuleRecord, input: Tensor, offsets=None,
                per_sample_weights=None) -> Tensor:
        if input.dim() == 2 and offsets is not None:
            raise ValueError(f"{record.name}: if input is 2D, then offsets has to be None (one bag per row)")
        if input.dim() == 1 and offsets is None:
            raise ValueError(f"{record.name}: a 1D input needs offsets (one bag per example)")
        if input.dim() not in (1, 2):
            raise ValueError(f"{record.name}: DP EmbeddingBag takes a 2D input [B, L] or a 1D input with offsets")
        if module.mode not in ("sum", "mean"):  # validation refuses it; never compute
            raise ValueError(f"{record.name}: EmbeddingBag mode={module.mode!r} is not supported")
        return _EmbeddingBagFunction.apply(input, offsets, per_sample_weights, module.weight, record,
                                           record.effective(module.weight), module.mode, module.include_last_offset,
                                           module.padding_idx)

    @staticmethod
    def _contributions(uses: List[Use]):
        """``(example, index, contribution)`` of every slot of every use: coef·g [B, L, D] flattened."""
        idx = torch.cat([u["idx"] for u in uses], 1)  # [B, ΣL]
        contrib = torch.cat([u["coef"].unsqueeze(-1) * u["g"].to(u["coef"].dtype).unsqueeze(1) for u in uses], 1)
        return idx, contrib

    def _rows(self, record: ModuleRecord, uses: List[Use]):
        cached = record.cache.get("bag_rows")
        if cached is not None:
            return cached
        idx, contrib = self._contributions(uses)
        record.cache["bag_rows"] = (*rows_per_example_and_index(idx, contrib, record.module.num_embeddings),
                                    idx.shape[1])
        return record.cache["bag_rows"]

    def sq_norms(self, record, uses, names) -> Dict[str, Tensor]:
        example, _, rows, L = self._rows(record, uses)
        B = uses[0]["idx"].shape[0]
        out = torch.zeros(B, dtype=torch.float64, device=rows.device)
        out.index_add_(0, example, rows.double().pow(2).sum(1))
        return {"weight": out * (1.0 + (rows.shape[1] * max(1, L) + 2) * 2.0 ** -53)}

    def clipped_sums(self, record, uses, scale, names, noise=None):
        example, index, rows, _ = self._rows(record, uses)
        record.cache.pop("bag_rows", None)
        out = torch.zeros(record.module.weight.shape, dtype=rows.dtype, device=rows.device)
        out.index_add_(0, index, rows * scale.to(rows.dtype)[example].unsqueeze(1))
        return {"weight": out}, set()

    def per_example_grads(self, record, uses, names) -> Dict[str, Tensor]:
        idx, contrib = self._contributions(uses)
        B, L = idx.shape
        V, D = record.module.weight.shape
        out = torch.zeros(B * V, D, dtype=contrib.dtype, device=contrib.device)
        keys = (torch.arange(B, device=idx.device).unsqueeze(1) * V + idx).reshape(-1)
        out.index_add_(0, keys, contrib.reshape(B * L, D))
        return {"weight": out.view(B, V, D)}

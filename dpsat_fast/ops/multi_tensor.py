"""DP-SAT's passes over all trainable parameters at once (docs/algorithms.md §2).

* :func:`multi_tensor_sq_norm`: ``Σ_k ‖t_k‖²`` over a list of tensors, for the ONE global norm of the
  released gradient that the perturbation is scaled by.
* :func:`multi_tensor_perturb_`: ``backup ← params; params ← params + α·direction`` in one pass per tensor
  (reads each parameter once instead of twice).

``torch.ops.dpsat_fast.multi_tensor_*``: C++ kernels on CPU (csrc/cpu/per_sample.cpp: chunked
at::parallel_for, deterministic chunk-ordered sums), ``torch._foreach_*`` compositions elsewhere (CUDA),
and on CPU when the extension is not built.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

from ._ext import EXTENSION_AVAILABLE

__all__ = ["multi_tensor_perturb_", "multi_tensor_sq_norm"]

_LIB = "dpsat_fast"
# as csrc/dpsat_fast.cpp declares them (used only without the extension; tests check they agree)
SCHEMAS = {
    "multi_tensor_sq_norm": "multi_tensor_sq_norm(Tensor[] tensors) -> Tensor",
    "multi_tensor_perturb_": "multi_tensor_perturb_(Tensor(a!)[] params, Tensor(b!)[] backup, Tensor[] direction, "
                             "Tensor alpha) -> ()",
}


def _result_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _torch_sq_norm(tensors):
    dt = _result_dtype(tensors)
    norms = torch._foreach_norm([t if t.dtype in (torch.float32, torch.float64) else t.float() for t in tensors])
    return torch.stack([n.to(dt) for n in norms]).pow(2).sum()


def _torch_perturb_(params, backup, direction, alpha):
    torch._foreach_copy_(backup, params)
    torch._foreach_add_(params, torch._foreach_mul(direction, alpha.to(params[0].device)))


def _fake_sq_norm(tensors):
    torch._check(len(tensors) > 0, lambda: "multi_tensor_sq_norm: needs at least one tensor")
    return tensors[0].new_empty((), dtype=_result_dtype(tensors))


def _fake_perturb_(params, backup, direction, alpha):
    torch._check(len(params) == len(backup) == len(direction),
                 lambda: "multi_tensor_perturb_: params, backup and direction need one tensor each")
    return None


def _register() -> torch.library.Library:
    lib = torch.library.Library(_LIB, "FRAGMENT")
    impls = {"multi_tensor_sq_norm": _torch_sq_norm, "multi_tensor_perturb_": _torch_perturb_}
    fakes = {"multi_tensor_sq_norm": _fake_sq_norm, "multi_tensor_perturb_": _fake_perturb_}
    for name, schema in SCHEMAS.items():
        if not EXTENSION_AVAILABLE:
            lib.define(schema)
            lib.impl(name, impls[name], "CPU")
        lib.impl(name, impls[name], "CUDA")
        torch.library.register_fake(f"{_LIB}::{name}", fakes[name], lib=lib)
    return lib


_lib = _register()


def _one_device(op: str, tensors: Sequence[Tensor]) -> None:
    if len({t.device for t in tensors}) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted({str(t.device) for t in tensors})}")


def multi_tensor_sq_norm(tensors: Sequence[Tensor]) -> Tensor:
    """``Σ_k Σ_j t_k[j]²`` as a 0-dim tensor on the tensors' device: float32, float64 if any input is."""
    tensors = list(tensors)
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    _one_device("multi_tensor_sq_norm", tensors)
    return torch.ops.dpsat_fast.multi_tensor_sq_norm(tensors)


@torch.no_grad()
def multi_tensor_perturb_(params: Sequence[Tensor], backup: Sequence[Tensor], direction: Sequence[Tensor],
                          alpha: Union[float, Tensor]) -> None:
    """In place: ``backup[k] ← params[k]``, then ``params[k] ← params[k] + (α·direction[k])`` with the product
    rounded to the parameter dtype first (the same bits as ``p + α·d`` computed in two steps). Tensors must
    match in shape and dtype; non-contiguous ones take the ``torch._foreach`` path."""
    params, backup, direction = list(params), list(backup), list(direction)
    op = "multi_tensor_perturb_"
    if not len(params) == len(backup) == len(direction):
        raise ValueError(f"{op}: params, backup and direction need one tensor each, got {len(params)}, "
                         f"{len(backup)} and {len(direction)}")
    if not params:
        return
    for k, (p, b, d) in enumerate(zip(params, backup, direction)):
        if not (p.shape == b.shape == d.shape and p.dtype == b.dtype == d.dtype):
            raise ValueError(f"{op}: tensor {k} of params, backup and direction differ in shape or dtype")
    _one_device(op, params + backup + direction)
    alpha_t = alpha.detach() if isinstance(alpha, Tensor) else torch.tensor(float(alpha), dtype=torch.float64)
    if all(t.is_contiguous() for t in params + backup + direction):
        if params[0].device.type == "cpu":
            alpha_t = alpha_t.cpu()
        torch.ops.dpsat_fast.multi_tensor_perturb_(params, backup, direction, alpha_t)
    else:
        _torch_perturb_(params, backup, direction, alpha_t)

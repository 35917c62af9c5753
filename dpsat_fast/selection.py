"""Which parameters train: layer selection for private fine-tuning.

Choosing the trainable layers is itself a privacy-utility hyperparameter: fewer trainable parameters means
less noise in total, at the price of capacity. :func:`select_trainable` freezes a model and unfreezes the
union of the selectors it is given:

* ``patterns``: glob patterns on parameter names (``fnmatch``), e.g. ``["classifier.*", "*.bias"]``;
* ``last_k``: every parameter of the last k blocks (:func:`blocks`);
* ``norms``: every parameter of the normalization layers;
* ``head``: the last block (the classifier);
* ``biases``: every bias (bias-only fine-tuning, "BitFit").

Frozen parts are free in the engine: a module without trainable parameters is not hooked (no records, no
norms, no clipped sums), and autograd runs no backward below the lowest trainable layer, since nothing
there requires a gradient. The selection reads only the model's structure, never data.
"""
from __future__ import annotations

import fnmatch
from typing import List, Optional, Sequence, Tuple

from torch import nn

__all__ = ["NORM_TYPES", "blocks", "parse_selection", "select_trainable"]

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.RMSNorm,
              nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def blocks(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The model's blocks in registration order: containers (Sequential, ModuleList, ModuleDict, and the model
    itself) are opened, every other module that holds parameters is one block (a residual block, a layer)."""
    out: List[Tuple[str, nn.Module]] = []

    def visit(prefix: str, module: nn.Module, top: bool) -> None:
        if (top or isinstance(module, _CONTAINERS)) and not any(True for _ in module.parameters(recurse=False)):
            for name, child in module.named_children():
                visit(f"{prefix}.{name}" if prefix else name, child, False)
        elif any(True for _ in module.parameters()):
            out.append((prefix, module))

    visit("", model, True)
    return out


def select_trainable(model: nn.Module, *, patterns: Sequence[str] = (), last_k: Optional[int] = None,
                     norms: bool = False, head: bool = False, biases: bool = False) -> List[str]:
    """Set ``requires_grad`` so that exactly the selected parameters train; returns their names.

    Raises ValueError if the selectors select nothing, or if ``last_k`` exceeds the number of blocks."""
    names = dict(model.named_parameters())
    chosen = set()
    for pattern in patterns:
        matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matched:
            raise ValueError(f"pattern {pattern!r} matches no parameter; names look like {list(names)[:4]}")
        chosen.update(matched)
    model_blocks = blocks(model)
    if last_k is not None:
        if not 1 <= last_k <= len(model_blocks):
            raise ValueError(f"last_k must be in [1, {len(model_blocks)}] (the model's blocks), got {last_k}")
    k = max(last_k or 0, 1 if head else 0)
    for prefix, module in model_blocks[len(model_blocks) - k:] if k else []:
        chosen.update(f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters())
    if norms:
        for prefix, module in model.named_modules():
            if isinstance(module, NORM_TYPES):
                chosen.update(f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(recurse=False))
    if biases:
        chosen.update(n for n in names if n.rsplit(".", 1)[-1] == "bias")
    if not chosen:
        raise ValueError("the selection is empty: give patterns, last_k, norms, head or biases")
    for n, p in names.items():
        p.requires_grad_(n in chosen)
    return [n for n in names if n in chosen]


def parse_selection(spec: str) -> dict:
    """``select_trainable`` arguments from a command-line spec: ``all``, or ``+``-joined parts among
    ``last:K``, ``norms``, ``head``, ``bias``, ``pattern:GLOB[,GLOB...]`` (e.g. ``norms+head``)."""
    if spec == "all":
        return {"patterns": ["*"]}
    kwargs: dict = {}
    for part in spec.split("+"):
        if part.startswith("last:"):
            kwargs["last_k"] = int(part[len("last:"):])
        elif part.startswith("pattern:"):
            kwargs.setdefault("patterns", []).extend(p for p in part[len("pattern:"):].split(",") if p)
        elif part in ("norms", "head"):
            kwargs[part] = True
        elif part == "bias":
            kwargs["biases"] = True
        else:
            raise ValueError(f"unknown selection part {part!r} in {spec!r}; expected all, last:K, norms, head, bias "
                             f"or pattern:GLOB")
    return kwargs

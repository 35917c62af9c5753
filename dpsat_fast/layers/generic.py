"""Opt-in exact rule for the module's own raw parameters: per-example gradients by ``torch.func``.

A module that uses an ``nn.Parameter`` in its own forward (ViT's class token and position embedding, a learned
scale, PReLU's slope) has no per-layer rule. :class:`GenericRule` computes the exact per-example gradients of
the module's OWN trainable parameters (``named_parameters(recurse=False)``); its children keep their rules.

How. The forward runs the module's own ``forward`` with its own parameters replaced by their values (``w``,
or ``w + ε`` under DP-SAT) detached from autograd, so that the children run as usual (hooked, recording their
own uses) and the input gradient flows to earlier layers through the ordinary graph. An identity autograd
function on the module's outputs, with the own parameters as graph edges only, receives the output gradient
``g``. In the backward it recomputes, example by example, ``vjp`` of ``θ ↦ forward(θ, x_i)`` at ``g_i`` with
``torch.func.vmap`` over the batch: each example is a batch of one inside the vmapped function, so example i's
gradient depends on ``x_i`` and ``g_i`` only — coupling through the module's forward is impossible by
construction. The per-example gradients ``[B, *shape]`` are materialized: the clipping norm is
:func:`~dpsat_fast.layers.base.materialized_sq_norms` of the very tensors the clipped sum adds
(``ops.per_example_clipped_sum_with_noise``), so the certified-norm contract holds with no position bound.

Assumptions (checked where possible):

* the module's forward treats dimension 0 of every tensor argument, and of every floating-point tensor it
  returns, as the batch (arguments and outputs with another leading size are refused);
* its forward is deterministic: random operations (dropout with p > 0 in train mode) cannot be replayed
  example by example and are refused (vmap's ``randomness="error"``);
* the recomputed per-example outputs must equal the batched forward's outputs (up to a rounding tolerance):
  a forward that mixes examples (batch statistics) or is not batch-first is refused at the backward, before
  anything is released.

Cost: the backward of a module under this rule recomputes its forward and backward once more, vmapped over
the examples (the children run their plain forwards inside), and keeps ``B × numel`` per-example gradients of
the own parameters. For a module whose forward contains the whole network (torchvision's VisionTransformer
holds ``class_token`` on the root) that is about one more forward and backward of the model per step; moving
the raw parameter into a small module of its own (``x + self.pos_embedding``) and registering only that
module makes the recompute as cheap as that module.

Enable it explicitly: :func:`register_generic` (a module instance, or every module of an exact type) or
``dpsat_fast.fix_model(model, generic=True)`` (every module whose trainable own parameters have no rule).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from .base import (LayerRule, ModuleRecord, NoiseRequest, Use, materialized_clipped_sums, materialized_sq_norms,
                   sum_over_uses)

#: instance attribute marking a module for the generic rule (set by :func:`register_generic`)
GENERIC_ATTR = "_dpsat_generic_rule"

#: relative tolerance (of the largest output magnitude) between the batched forward and the per-example
#: recompute; only a check of the assumptions above (mixing examples changes outputs by O(1))
_RTOL = {torch.float64: 1e-6, torch.float32: 1e-3}
_RTOL_LOW_PRECISION = 3e-2


class _Everything:
    """``owned_params`` of the generic rule: every own parameter of the module."""

    def __contains__(self, name) -> bool:
        return True

    def __iter__(self):
        return iter(["<every own parameter>"])


class _Call(nn.Module):
    """``functional_call`` target: the module's own forward (not its patched one), parameters swapped."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.m = module

    def forward(self, args, kwargs):
        return type(self.m).forward(self.m, *args, **kwargs)


class _plain_forwards:
    """While the recompute runs, every hooked module inside ``module`` uses its plain forward (the engine's
    patched forwards record uses and call custom autograd functions, which vmap cannot run)."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.saved = []

    def __enter__(self):
        from ..engine import _PrivateForward

        for m in self.module.modules():
            f = m.__dict__.get("forward")
            if isinstance(f, _PrivateForward):
                self.saved.append((m, f))
                del m.__dict__["forward"]
        return self

    def __exit__(self, *exc):
        for m, f in self.saved:
            m.__dict__["forward"] = f
        self.saved = []
        return False


class _Info:
    """What the backward needs besides tensors: the structure of the call."""

    def __init__(self, rule, module, in_spec, leaves, tensor_pos, out_pos, autocast):
        self.rule, self.module, self.in_spec, self.leaves = rule, module, in_spec, leaves
        self.tensor_pos, self.out_pos, self.autocast = tensor_pos, out_pos, autocast


class _GenericFunction(torch.autograd.Function):
    """Identity on the module's floating outputs; the own parameters are graph edges only (their gradient is the
    engine's clipped sum), the tensor arguments are saved for the recompute."""

    @staticmethod
    def forward(ctx, record: ModuleRecord, info: _Info, n_out: int, n_params: int, *tensors):
        outs = tensors[:n_out]
        ins = tensors[n_out + n_params:]
        ctx.record, ctx.info, ctx.n_out, ctx.n_params = record, info, n_out, n_params
        ctx.save_for_backward(*outs, *ins)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        outs, ins = saved[:ctx.n_out], saved[ctx.n_out:]
        record = ctx.record
        # the engine's gate first: no recompute for a backward that writes no parameter gradient
        if record.accepts(ctx):
            pe = ctx.info.rule.per_example_from_call(record, ctx.info, ins, grads, outs)
            record.add_accepted_use(**pe)
        n_in = len(saved) - ctx.n_out
        passthrough = tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[4:4 + ctx.n_out]))
        return (None, None, None, None) + passthrough + (None,) * (ctx.n_params + n_in)


def _autocast_state():
    return [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in ("cpu", "cuda")]


class GenericRule(LayerRule):
    """Exact per-example gradients of a module's own parameters by ``torch.func`` (module docstring).

    Args:
        chunk_size: examples per vmapped chunk of the recompute (``None``: all at once); bounds its memory.
    """

    owned_params = _Everything()

    def __init__(self, chunk_size: Optional[int] = None):
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        self.chunk_size = chunk_size

    def problems(self, module: nn.Module) -> List[str]:
        return []

    # -- forward ----------------------------------------------------------------------------------
    def forward(self, module: nn.Module, record: ModuleRecord, *args, **kwargs):
        where = f"{record.name or '<root>'} ({type(module).__name__})"
        leaves, in_spec = tree_flatten((args, kwargs))
        tensor_pos = [i for i, t in enumerate(leaves) if isinstance(t, Tensor)]
        if not tensor_pos:
            raise ValueError(f"{where}: the generic per-sample rule needs a tensor argument whose dimension 0 is the "
                             f"batch; this call has none")
        B = _batch_of(leaves[tensor_pos[0]], where, "argument")
        for i in tensor_pos:
            if _batch_of(leaves[i], where, "argument") != B:
                raise ValueError(f"{where}: the generic per-sample rule assumes dimension 0 of every tensor argument "
                                 f"is the batch, got leading sizes {[tuple(leaves[j].shape[:1]) for j in tensor_pos]}")
        own = {n: record.effective(p).detach() for n, p in module.named_parameters(recurse=False)}
        out = functional_call(_Call(module), {f"m.{n}": v for n, v in own.items()}, (args, kwargs),
                              tie_weights=False, strict=False)
        out_leaves, out_spec = tree_flatten(out)
        out_pos = [i for i, t in enumerate(out_leaves) if isinstance(t, Tensor) and t.is_floating_point()]
        if not out_pos:
            raise ValueError(f"{where}: the generic per-sample rule needs a floating-point tensor output")
        for i in out_pos:
            if _batch_of(out_leaves[i], where, "output") != B:
                raise ValueError(f"{where}: the generic per-sample rule assumes dimension 0 of every output is the "
                                 f"batch ({B}), got an output of shape {tuple(out_leaves[i].shape)}")
        params = [getattr(module, n) for n in record.param_names]
        is_tensor = set(tensor_pos)
        static = [None if i in is_tensor else leaf for i, leaf in enumerate(leaves)]
        info = _Info(self, module, in_spec, static, tensor_pos, out_pos, _autocast_state())
        new = _GenericFunction.apply(record, info, len(out_pos), len(params), *[out_leaves[i] for i in out_pos],
                                     *params, *[leaves[i] for i in tensor_pos])
        for k, i in enumerate(out_pos):
            out_leaves[i] = new[k]
        return tree_unflatten(out_leaves, out_spec)

    # -- backward: the per-example recompute ---------------------------------------------------------
    def per_example_from_call(self, record: ModuleRecord, info: _Info, ins: Sequence[Tensor],
                              grads: Sequence[Optional[Tensor]], outs: Sequence[Tensor]) -> Dict[str, Tensor]:
        """``{name: [B, *shape]}``: the per-example gradients of the own trainable parameters for one call."""
        module = info.module
        where = f"{record.name or '<root>'} ({type(module).__name__})"
        names = list(record.param_names)
        theta = {n: record.effective(getattr(module, n)).detach() for n in names}
        const = {f"m.{n}": record.effective(p).detach() for n, p in module.named_parameters(remove_duplicate=False)
                 if n not in theta}
        gs = tuple((torch.zeros_like(o) if g is None else g.to(o.dtype)).detach() for g, o in zip(grads, outs))
        xs = tuple(t.detach() for t in ins)
        B = xs[0].shape[0]
        if B == 0:
            return {n: torch.zeros((0,) + tuple(v.shape), dtype=v.dtype, device=v.device) for n, v in theta.items()}

        def single(th, x_i):
            leaves = list(info.leaves)
            for k, pos in enumerate(info.tensor_pos):
                leaves[pos] = x_i[k].unsqueeze(0)  # a batch of one: the example alone
            args, kwargs = tree_unflatten(leaves, info.in_spec)
            out = functional_call(_Call(module), {**{f"m.{n}": v for n, v in th.items()}, **const}, (args, kwargs),
                                  tie_weights=False, strict=False)
            flat = tree_flatten(out)[0]
            res = []
            for i in info.out_pos:
                if flat[i].dim() == 0 or flat[i].shape[0] != 1:
                    raise _AssumptionError(f"{where}: for a single example the module returned an output of "
                                           f"shape {tuple(flat[i].shape)}; the generic rule assumes dimension 0 is "
                                           f"the batch")
                res.append(flat[i][0])
            return tuple(res)

        def per_example(x_i, g_i):
            out_i, pullback = vjp(lambda th: single(th, x_i), theta)
            return pullback(g_i)[0], out_i

        try:
            with _plain_forwards(module), _Autocast(info.autocast):
                pe, recomputed = vmap(per_example, randomness="error", chunk_size=self.chunk_size)(xs, gs)
        except _AssumptionError:
            raise
        except Exception as e:
            if "random" in str(e) and "vmap" in str(e):
                raise RuntimeError(
                    f"{where}: the generic per-sample rule recomputes this module's forward example by example and "
                    f"cannot replay random operations (dropout with p > 0 in train mode) inside it. Set those "
                    f"dropout probabilities to 0, or move the raw parameters into a small module of their own "
                    f"(e.g. one whose forward is `x + self.pos_embedding`) and register only that module "
                    f"(dpsat_fast.layers.register_generic(module))") from e
            raise RuntimeError(
                f"{where}: the generic per-sample rule could not recompute this module's forward example by example "
                f"with torch.func (vmap of vjp): {type(e).__name__}: {e}. Operations that write in place into "
                f"tensors shared by all examples, or custom autograd functions without vmap support, cannot be "
                f"vmapped; rebuild the module from supported layers or register a rule for it "
                f"(dpsat_fast.layers.register_rule)") from e
        _check_same_outputs(where, outs, recomputed, loose=_reduced_precision(info.autocast, xs[0].device))
        # a vjp is linear in g: an example whose output gradient is zero (e.g. dropped as non-finite) has zero
        # gradient, also where the recompute produced inf·0
        zero = torch.stack([g.reshape(B, -1).eq(0).all(1) for g in gs]).all(0)
        if bool(zero.any()):
            pe = {n: torch.where(zero.view(-1, *([1] * (v.dim() - 1))), torch.zeros((), dtype=v.dtype,
                                                                                   device=v.device), v)
                  for n, v in pe.items()}
        return dict(pe)

    # -- the engine's side ------------------------------------------------------------------------
    def per_example_grads(self, record, uses: List[Use], names: Sequence[str]) -> Dict[str, Tensor]:
        return {n: sum_over_uses([u[n] for u in uses]) for n in names}

    def sq_norms(self, record, uses, names) -> Dict[str, Tensor]:
        # the norms of the very tensors the clipped sum adds (certified by construction)
        return {n: materialized_sq_norms(g) for n, g in self.per_example_grads(record, uses, names).items()}

    def clipped_sums(self, record, uses, scale, names, noise: Optional[NoiseRequest] = None):
        return materialized_clipped_sums(self.per_example_grads(record, uses, names), scale, noise)


class _AssumptionError(ValueError):
    """A module that breaks the generic rule's stated assumptions."""


def _batch_of(t: Tensor, where: str, what: str) -> int:
    if t.dim() == 0:
        raise ValueError(f"{where}: the generic per-sample rule assumes dimension 0 of every tensor {what} is the "
                         f"batch, got a 0-dimensional tensor")
    return t.shape[0]


class _Autocast:
    """Re-enter the autocast state of the forward for the recompute (same precision, same function)."""

    def __init__(self, state):
        self.state = state
        self.ctxs = []

    def __enter__(self):
        for device, enabled, dtype in self.state:
            if device == "cuda" and not torch.cuda.is_available():
                continue
            ctx = torch.autocast(device, dtype=dtype, enabled=enabled)
            ctx.__enter__()
            self.ctxs.append(ctx)
        return self

    def __exit__(self, *exc):
        for ctx in reversed(self.ctxs):
            ctx.__exit__(*exc)
        self.ctxs = []
        return False


def _reduced_precision(autocast_state, device: torch.device) -> bool:
    """The forward ran under autocast, or float32 matrix products may use TF32/bf16 passes on this device: the
    batched and per-example computations then differ by 16-bit-like rounding."""
    if any(enabled for _, enabled, _ in autocast_state):
        return True
    if device.type == "cuda":
        return torch.get_float32_matmul_precision() != "highest" or torch.backends.cudnn.allow_tf32
    return torch.get_float32_matmul_precision() != "highest"


def _check_same_outputs(where: str, outs: Sequence[Tensor], recomputed: Sequence[Tensor], loose: bool = False) -> None:
    """The per-example recompute reproduces the batched forward: else the forward mixes examples (or is not
    batch-first), and the per-example gradients would not be those of the batch's function."""
    for o, r in zip(outs, recomputed):
        o = o.detach()
        r = r.to(o.dtype)
        if o.numel() == 0:
            continue
        finite = torch.isfinite(o)
        zero = torch.zeros((), dtype=o.dtype, device=o.device)
        scale = float(torch.where(finite, o.abs(), zero).amax())
        rtol = _RTOL_LOW_PRECISION if loose else _RTOL.get(o.dtype, _RTOL_LOW_PRECISION)
        worst = float(torch.where(finite, (r - o).abs(), zero).amax())
        if not worst <= rtol * max(scale, torch.finfo(o.dtype).tiny):
            raise RuntimeError(
                f"{where}: its forward does not compute each example alone — recomputed example by example, the "
                f"output differs from the batched forward by {worst:.3g} (largest output {scale:.3g}). The generic "
                f"per-sample rule assumes a forward that treats dimension 0 as the batch and mixes no examples "
                f"(no batch statistics, no sequence-first layout); nothing was released from this backward")


def register_generic(target, chunk_size: Optional[int] = None):
    """Opt in to :class:`GenericRule` for ``target``: an ``nn.Module`` instance (only that module; the mark
    survives ``deepcopy`` and pickling) or a module class (every module of exactly that type). Returns
    ``target``. The generic rule is only a fallback: registering a type that has a rule is refused, and a
    marked instance of such a type keeps its type's rule."""
    from . import register_rule, supported_types

    rule = GenericRule(chunk_size)
    if isinstance(target, nn.Module):
        object.__setattr__(target, GENERIC_ATTR, rule)
        return target
    if isinstance(target, type) and issubclass(target, nn.Module):
        existing = supported_types()
        if target in existing and not isinstance(_rule_of_type(target), GenericRule):
            raise ValueError(f"{target.__name__} already has a rule ({type(_rule_of_type(target)).__name__}); the "
                             f"generic rule is only a fallback for modules without one")
        register_rule(target, rule)
        return target
    raise TypeError(f"register_generic takes an nn.Module instance or an nn.Module subclass, got {target!r}")


def _rule_of_type(t):
    from . import _RULES

    return _RULES.get(t)


def unregister_generic(module: nn.Module) -> None:
    """Remove the instance mark set by :func:`register_generic` (types: ``register_rule`` another rule)."""
    module.__dict__.pop(GENERIC_ATTR, None)


def generic_rule_of(module: nn.Module) -> Optional[GenericRule]:
    rule = module.__dict__.get(GENERIC_ATTR)
    return rule if isinstance(rule, GenericRule) else None


__all__ = ["GenericRule", "register_generic", "unregister_generic", "generic_rule_of"]

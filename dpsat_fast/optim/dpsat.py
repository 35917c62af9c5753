"""DP-SAT (Park, Kim, Choi, Lee, ICML 2023) and its baselines (docs/algorithms.md §2).

DP-SAT perturbs the weights along the previously RELEASED noisy gradient before taking the per-example
gradients of a step::

    ε_t  = ρ · g̃_{t-1} / (‖g̃_{t-1}‖₂ + 1e-16)      (one global norm; g̃_{-1} = 0: step 0 is DP-SGD)
    g̃_t  = (Σ_i clip(∇ℓ_i(w_t + ε_t)) + N(0, σ²C²I)) / B̄
    w_{t+1} = BaseOptimizer(w_t, g̃_t)

Because g̃_{t-1} is already public, the perturbation is post-processing: one noisy query per step, the
privacy cost of DP-SGD, one forward and backward per step.

How the perturbation meets the training loop: it is never written into the parameters. The engine applies
it functionally in the forward of every hooked module (the layer computes with ``w_t + ε_t`` while recording,
and its input gradient is that of ``w_t + ε_t``): every forward with gradients of a step — any micro-batch,
any mode, any sub-module called directly — is at exactly ``w_t + ε_t``, while ``state_dict``, evaluation
(``no_grad``), checkpoints, rollbacks and dtype/device moves always see ``w_t``.

:class:`DPSAM` is the naive baseline: a noisy gradient at ``w_t`` for the ascent, another at ``w_t + ε``
for the update; two queries per step (accounted as two compositions), twice the compute.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional

import torch
from torch import Tensor

from .. import ops
from ..validation import PrivacyConfigError
from .dp_optimizer import DPOptimizer

DIRECTIONS = ("noisy_gradient", "last_update")


def check_rho(rho: float) -> float:
    if not isinstance(rho, (int, float)) or not math.isfinite(rho) or rho < 0:
        raise PrivacyConfigError(f"rho (perturbation radius) must be a finite number ≥ 0, got {rho!r}")
    return float(rho)


def _scaled_to_radius(tensors: List[Tensor], rho: float) -> List[Tensor]:
    """``ρ · t / (‖t‖₂ + 1e-16)`` with one global L2 norm over all tensors (new tensors).

    Multi-tensor passes (:mod:`dpsat_fast.ops.multi_tensor`: one parallel C++ pass on CPU, ``torch._foreach``
    launches on CUDA) and a device scalar, so the step never waits for the GPU."""
    norm = ops.multi_tensor_sq_norm(tensors).sqrt()
    return torch._foreach_mul(tensors, rho / (norm + 1e-16))


class DPSAT(DPOptimizer):
    """DP-SGD with sharpness-aware perturbation along the previous noisy gradient.

    Args (besides :class:`DPOptimizer`'s):
        rho: perturbation radius ρ ≥ 0; ρ = 0 is DP-SGD, bit for bit.
        direction: ``"noisy_gradient"`` (ε along g̃_{t-1}, the paper's rule) or ``"last_update"``
            (ε along w_{t-1} − w_t, also free of privacy cost).
    """

    def __init__(self, optimizer, *, engine, rho: float, direction: str = "noisy_gradient", **dp_kwargs):
        super().__init__(optimizer, engine=engine, **dp_kwargs)
        if direction not in DIRECTIONS:
            raise PrivacyConfigError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        self.rho = check_rho(rho)
        self.direction = direction
        self.perturbation: Optional[List[Tensor]] = None  # ε_t, one tensor per trainable parameter

    @property
    def perturbed(self) -> bool:
        """True when the forwards of the current step compute at ``w_t + ε_t`` (the parameters stay ``w_t``)."""
        return self.engine.perturbation is not None

    def _set_perturbation(self, eps: Optional[List[Tensor]]) -> None:
        self.perturbation = eps
        self.engine.set_perturbation(None if eps is None else dict(zip(self._trainable(), eps)))

    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        params = self._trainable()
        # masks are chosen at w_t, before anything of this step is read
        masks = self.select_masks() if not self._skip_next_step else None
        loss = self._run_closure(closure) if closure is not None else None
        if self._skipping():
            return loss
        self.privatize_gradients(masks)
        if self.direction == "noisy_gradient":
            eps = _scaled_to_radius([p.grad for p in params], self.rho) if self.rho > 0 else None
        else:
            before = [p.detach().clone() for p in params] if self.rho > 0 else None
        self.original_optimizer.step()
        self._after_update()
        if self.direction == "last_update":
            eps = (_scaled_to_radius(torch._foreach_sub(before, [p.detach() for p in params]), self.rho)
                   if self.rho > 0 else None)
        self._set_perturbation(eps)
        self._account()
        self._after_release()
        return loss

    def pre_step(self, masks=None) -> bool:
        """Opacus' protocol: release and account this step's gradient and prepare the next perturbation
        (along the released gradient); the caller then runs ``original_optimizer.step()``."""
        if self.direction != "noisy_gradient":
            raise PrivacyConfigError("pre_step() with direction='last_update': the perturbation needs the update "
                                     "itself; call optimizer.step() instead")
        if self._skipping():
            return False
        self.privatize_gradients(self.select_masks() if masks is None else masks)
        params = self._trainable()
        self._set_perturbation(_scaled_to_radius([p.grad for p in params], self.rho) if self.rho > 0 else None)
        self._account()
        self._after_release()
        return True

    def detach(self) -> None:
        """Stop perturbing the forwards (the parameters were never perturbed)."""
        self.engine.set_perturbation(None)

    def state_dict(self):
        sd = super().state_dict()
        sd["dpsat"] = {"rho": self.rho, "direction": self.direction, "perturbation": self.perturbation}
        return sd

    def load_state_dict(self, state_dict) -> None:
        self.check_state_dict(state_dict)
        state_dict = dict(state_dict)
        sat = state_dict.pop("dpsat", None)
        super().load_state_dict(state_dict)
        if sat is not None:
            eps = sat["perturbation"]
            params = self._trainable()
            self._set_perturbation(None if eps is None else [e.to(p.device, p.dtype) for e, p in zip(eps, params)])


class DPSAM(DPOptimizer):
    """Naive private SAM: two privatized gradients per step (ascent at w_t, update at w_t + ε). Needs a
    closure that runs forward and backward over the whole logical batch; accounted as two compositions."""

    def __init__(self, optimizer, *, engine, rho: float, **dp_kwargs):
        super().__init__(optimizer, engine=engine, **dp_kwargs)
        self.rho = check_rho(rho)

    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        if closure is None:
            raise PrivacyConfigError("DPSAM.step needs a closure (forward + backward of the logical batch): it "
                                     "evaluates the batch twice per step")
        if self._skip_next_step:
            raise PrivacyConfigError("DPSAM cannot skip steps (BatchMemoryManager): its closure must run the whole "
                                     "logical batch, e.g. over dpsat_fast.data.split_micro_batches(batch, n)")
        params = self._trainable()
        masks = self.select_masks()
        self._run_closure(closure)
        self.privatize_gradients(masks)  # query 1: g̃ at w_t
        if self.rho > 0:
            eps = _scaled_to_radius([p.grad for p in params], self.rho)
            self.engine.set_perturbation(dict(zip(params, eps)))
        self.zero_grad(set_to_none=True)
        try:
            loss = self._run_closure(closure)
            self.privatize_gradients(masks)  # query 2: g̃ at w_t + ε
        finally:
            self.engine.set_perturbation(None)
        self.original_optimizer.step()
        self._after_update()
        self._account(compositions=2)
        self._after_release()
        return loss

    def pre_step(self, masks=None) -> bool:
        raise PrivacyConfigError("DPSAM has no pre_step(): it releases two gradients per step; call "
                                 "optimizer.step(closure)")

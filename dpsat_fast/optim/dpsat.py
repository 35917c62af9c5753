"""DP-SAT (Park, Kim, Choi, Lee, ICML 2023) and its baselines (DESIGN.md §2.2).

DP-SAT perturbs the weights along the previously RELEASED noisy gradient before taking the per-example
gradients of a step::

    ε_t  = ρ · g̃_{t-1} / (‖g̃_{t-1}‖₂ + 1e-16)      (one global norm; g̃_{-1} = 0: step 0 is DP-SGD)
    g̃_t  = (Σ_i clip(∇ℓ_i(w_t + ε_t)) + N(0, σ²C²I)) / B̄
    w_{t+1} = BaseOptimizer(w_t, g̃_t)

Because g̃_{t-1} is already public, the perturbation is post-processing: one noisy query per step, the
privacy cost of DP-SGD, one forward and backward per step.

How the perturbation meets the training loop: the first forward of a logical step (in train mode, with
gradients enabled) applies ``w ← w + ε_t`` after saving ``w``; every further micro-batch of the step sees
exactly the same ``w_t + ε_t``; :meth:`DPSAT.step` restores the saved ``w_t`` by copy (bit-exact, no
leftover perturbation) before the base update. Between steps the weights are unperturbed.

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


class _Perturbation:
    """Apply ``w ← w + ε`` remembering ``w`` (one fused pass: backup and update), and restore ``w`` by copy;
    the backup buffers are allocated once and reused every step."""

    def __init__(self):
        self.applied = False
        self._buffers: Optional[List[Tensor]] = None

    @torch.no_grad()
    def apply(self, params: List[Tensor], eps: List[Tensor]) -> None:
        if self._buffers is None or len(self._buffers) != len(params) or any(
                b.shape != p.shape or b.dtype != p.dtype or b.device != p.device for b, p in zip(self._buffers, params)):
            self._buffers = [torch.empty_like(p) for p in params]
        ops.multi_tensor_perturb_(params, self._buffers, eps, 1.0)
        self.applied = True

    @torch.no_grad()
    def restore(self, params: List[Tensor]) -> None:
        if self.applied:
            torch._foreach_copy_(params, self._buffers)
            self.applied = False


class _PerturbBeforeForward:
    """Forward pre-hook of the model; a deep copy of the model gets an inert hook (it is a plain model)."""

    def __init__(self, optimizer: "DPSAT"):
        self.optimizer = optimizer

    def __call__(self, module, args) -> None:
        if self.optimizer is not None:
            self.optimizer._before_forward(module, args)

    def __deepcopy__(self, memo):
        return _PerturbBeforeForward(None)


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
        self._state = _Perturbation()
        self._hook = engine.module.register_forward_pre_hook(_PerturbBeforeForward(self))

    def _before_forward(self, module, args) -> None:
        if self.perturbation is not None and not self._state.applied and module.training \
                and torch.is_grad_enabled():
            self._state.apply(self._trainable(), self.perturbation)

    @property
    def perturbed(self) -> bool:
        """True between the first forward of a step and :meth:`step`."""
        return self._state.applied

    def step(self, closure: Optional[Callable[[], Tensor]] = None):
        params = self._trainable()
        self._state.restore(params)  # masks are chosen at w_t, before anything of this step is read
        masks = self.select_masks()
        try:
            loss = self._run_closure(closure) if closure is not None else None
        finally:
            self._state.restore(params)
        self.privatize_gradients(masks)
        released = [p.grad for p in params]
        if self.direction == "noisy_gradient":
            self.perturbation = _scaled_to_radius(released, self.rho) if self.rho > 0 else None
        else:
            before = [p.detach().clone() for p in params] if self.rho > 0 else None
        self.original_optimizer.step()
        self._after_update()
        if self.direction == "last_update" and self.rho > 0:
            self.perturbation = _scaled_to_radius(torch._foreach_sub(before, [p.detach() for p in params]),
                                                  self.rho)
        self._account()
        return loss

    def detach(self) -> None:
        """Remove the forward hook (restoring weights first if a step is half done)."""
        self._state.restore(self._trainable())
        self._hook.remove()

    def state_dict(self):
        if self._state.applied:
            raise RuntimeError("state_dict() between a forward and step(): the weights are perturbed; "
                               "checkpoint after step()")
        sd = super().state_dict()
        sd["dpsat"] = {"rho": self.rho, "direction": self.direction, "perturbation": self.perturbation}
        return sd

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        sat = state_dict.pop("dpsat", None)
        super().load_state_dict(state_dict)
        if sat is not None:
            eps = sat["perturbation"]
            params = self._trainable()
            self.perturbation = None if eps is None else [e.to(p.device, p.dtype) for e, p in zip(eps, params)]


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
        params = self._trainable()
        masks = self.select_masks()
        self._run_closure(closure)
        self.privatize_gradients(masks)  # query 1: g̃ at w_t
        state = _Perturbation()
        if self.rho > 0:
            state.apply(params, _scaled_to_radius([p.grad for p in params], self.rho))
        self.zero_grad(set_to_none=True)
        try:
            loss = self._run_closure(closure)
        finally:
            state.restore(params)
        self.privatize_gradients(masks)  # query 2: g̃ at w_t + ε
        self.original_optimizer.step()
        self._after_update()
        self._account(compositions=2)
        return loss

"""Sharpness of a trained model: what DP-SAT is meant to reduce (Park et al., ICML 2023, §3).

Three measurements of the loss ``L(w)`` on a fixed batch, all NON-PRIVATE diagnostics of the released model
(use a public batch: a held-out or public split, never the private training data unless you accept that the
number itself is not private):

* :func:`hessian_top_eigenvalue` — λ_max of ∇²L(w) by power iteration with Hessian-vector products (double
  backward, no Hessian is formed). Power iteration converges to the eigenvalue of largest *magnitude*; for a
  trained network that is the top (positive) one in practice, and the Rayleigh quotient is reported.
* :func:`perturbation_sharpness` — the loss increase ``L(w + δ) − L(w)`` for ``‖δ‖₂ = ρ`` (one global norm over
  the measured parameters), with δ random (uniform on the sphere; mean and std over draws) and adversarial (along
  the gradient, ``δ = ρ·∇L/‖∇L‖``: SAM's first-order inner maximizer; ``ascent_steps > 1`` runs normalized
  gradient ascent projected onto the ρ-ball instead).
* :func:`sharpness_report` — both, in one dict.

``loss_fn(model) -> scalar`` closes over the batch, e.g. ``lambda m: F.cross_entropy(m(x), y)``
(:func:`cross_entropy_loss` builds it). The model is measured in ``eval()`` mode and restored (mode and
parameters, bit for bit). It must be a plain model: detach the privacy engine first
(``privacy_engine.detach()``), since an attached engine records every forward and refuses a second
backward through one graph.

    from dpsat_fast.sharpness import cross_entropy_loss, sharpness_report
    print(sharpness_report(model, cross_entropy_loss(x_public, y_public), rho=0.05))
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["cross_entropy_loss", "hessian_top_eigenvalue", "perturbation_sharpness", "sharpness_report"]

LossFn = Callable[[nn.Module], Tensor]


def cross_entropy_loss(x: Tensor, y: Tensor, batch_size: Optional[int] = None) -> LossFn:
    """``loss_fn`` for a fixed batch: the mean cross-entropy of ``model(x)`` against ``y`` (evaluated in chunks of
    ``batch_size`` examples when given, weighted to the same mean)."""
    import torch.nn.functional as F

    def loss_fn(model: nn.Module) -> Tensor:
        if batch_size is None or batch_size >= len(y):
            return F.cross_entropy(model(x), y)
        return sum(F.cross_entropy(model(xb), yb, reduction="sum") for xb, yb in
                   zip(x.split(batch_size), y.split(batch_size))) / len(y)

    return loss_fn


def _params(model: nn.Module, params: Optional[Sequence[nn.Parameter]]) -> List[nn.Parameter]:
    _check_detached(model)
    out = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    if not out:
        raise ValueError("no parameter to measure: every parameter is frozen (pass params=)")
    return out


def _check_detached(model: nn.Module) -> None:
    from .engine import _PrivateForward

    for name, m in model.named_modules():
        if isinstance(m.__dict__.get("forward"), _PrivateForward):
            raise RuntimeError(f"module '{name or type(m).__name__}' is still attached to a privacy engine: measure "
                               f"sharpness on the released model after privacy_engine.detach() (or engine.detach())")


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def _norm(a: Sequence[Tensor]) -> Tensor:
    return _dot(a, a).sqrt()


class _Measuring:
    """eval() mode during the measurement, the caller's mode and exact parameter values afterwards."""

    def __init__(self, model: nn.Module, params: Sequence[nn.Parameter]):
        self.model, self.params = model, params

    def __enter__(self):
        self.training = self.model.training
        self.saved = [p.detach().clone() for p in self.params]
        self.model.eval()
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for p, s in zip(self.params, self.saved):
                p.copy_(s)
        self.model.train(self.training)
        return False


def hessian_top_eigenvalue(model: nn.Module, loss_fn: LossFn, *, params: Optional[Sequence[nn.Parameter]] = None,
                           iters: int = 50, tol: float = 1e-4, seed: int = 0) -> Dict[str, object]:
    """Top Hessian eigenvalue of ``loss_fn(model)`` with respect to ``params`` (default: the trainable ones) by power
    iteration: ``v ← Hv/‖Hv‖`` from a seeded random start, until the Rayleigh quotient ``vᵀHv`` changes by less
    than ``tol`` (relative) or after ``iters`` products.

    Returns ``{"eigenvalue", "iterations", "converged", "history"}`` (the Rayleigh quotient at every iteration).
    """
    params = _params(model, params)
    with _Measuring(model, params):
        loss = loss_fn(model)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        v = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in params]
        n = _norm(v)
        v = [t / n for t in v]
        history: List[float] = []
        converged = False
        for _ in range(iters):
            hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
            hv = [h.detach() for h in hv]
            rayleigh = float(_dot(v, hv))
            history.append(rayleigh)
            norm = float(_norm(hv))
            if norm == 0.0:
                converged = True
                break
            v = [h / norm for h in hv]
            if len(history) > 1 and abs(history[-1] - history[-2]) <= tol * max(abs(history[-1]), 1e-12):
                converged = True
                break
    return {"eigenvalue": history[-1], "iterations": len(history), "converged": converged, "history": history}


@torch.no_grad()
def _loss_at(model: nn.Module, loss_fn: LossFn, params: Sequence[nn.Parameter], base: Sequence[Tensor],
             delta: Sequence[Tensor]) -> float:
    for p, b, d in zip(params, base, delta):
        p.copy_(b + d)
    return float(loss_fn(model))


def perturbation_sharpness(model: nn.Module, loss_fn: LossFn, rho: float, *,
                           params: Optional[Sequence[nn.Parameter]] = None, n_random: int = 10,
                           ascent_steps: int = 1, seed: int = 0) -> Dict[str, object]:
    """Loss increase under random and adversarial perturbations of global L2 norm ``rho``.

    Returns ``{"loss", "rho", "random_increase_mean", "random_increase_std", "random_increases",
    "adversarial_increase", "gradient_norm"}``. Random: ``δ = ρ·z/‖z‖``, ``z ~ N(0, I)`` from a generator seeded
    with ``seed`` (``n_random`` draws). Adversarial: ``δ = ρ·g/‖g‖`` with ``g = ∇L(w)`` (``ascent_steps = 1``), or
    ``ascent_steps`` steps ``δ ← Π_ρ(δ + (ρ/steps)·∇L(w+δ)/‖∇L(w+δ)‖)``; a zero gradient gives a zero increase.
    """
    if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho >= 0):
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r}")
    if ascent_steps < 1 or n_random < 0:
        raise ValueError(f"ascent_steps must be >= 1 and n_random >= 0, got {ascent_steps}, {n_random}")
    params = _params(model, params)
    with _Measuring(model, params) as state:
        base = state.saved
        with torch.no_grad():
            loss0 = float(loss_fn(model))
        gen = torch.Generator(device="cpu").manual_seed(seed)
        random_increases = []
        for _ in range(n_random):
            z = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in params]
            scale = rho / float(_norm(z))
            random_increases.append(_loss_at(model, loss_fn, params, base, [t * scale for t in z]) - loss0)
        delta = [torch.zeros_like(b) for b in base]
        grad_norm0 = None
        for step in range(ascent_steps):
            with torch.no_grad():
                for p, b, d in zip(params, base, delta):
                    p.copy_(b + d)
            g = torch.autograd.grad(loss_fn(model), params)
            gnorm = float(_norm(g))
            if grad_norm0 is None:
                grad_norm0 = gnorm
            if gnorm == 0.0:
                break
            step_size = rho if ascent_steps == 1 else rho / ascent_steps
            delta = [d + step_size * t / gnorm for d, t in zip(delta, g)]
            dnorm = float(_norm(delta))
            if dnorm > rho:
                delta = [d * (rho / dnorm) for d in delta]
        adversarial = _loss_at(model, loss_fn, params, base, delta) - loss0
    mean = sum(random_increases) / len(random_increases) if random_increases else float("nan")
    std = (math.sqrt(sum((r - mean) ** 2 for r in random_increases) / (len(random_increases) - 1))
           if len(random_increases) > 1 else 0.0)
    return {"loss": loss0, "rho": float(rho), "random_increase_mean": mean, "random_increase_std": std,
            "random_increases": random_increases, "adversarial_increase": adversarial,
            "gradient_norm": grad_norm0, "ascent_steps": ascent_steps}


def sharpness_report(model: nn.Module, loss_fn: LossFn, rho: float, *,
                     params: Optional[Sequence[nn.Parameter]] = None, hessian_iters: int = 50,
                     hessian_tol: float = 1e-4, n_random: int = 10, ascent_steps: int = 1,
                     seed: int = 0) -> Dict[str, object]:
    """:func:`hessian_top_eigenvalue` and :func:`perturbation_sharpness` in one flat dict (the eigenvalue under
    ``hessian_top_eigenvalue``, its iteration count under ``hessian_iterations``)."""
    eig = hessian_top_eigenvalue(model, loss_fn, params=params, iters=hessian_iters, tol=hessian_tol, seed=seed)
    pert = perturbation_sharpness(model, loss_fn, rho, params=params, n_random=n_random,
                                  ascent_steps=ascent_steps, seed=seed)
    return {**pert, "hessian_top_eigenvalue": eig["eigenvalue"], "hessian_iterations": eig["iterations"],
            "hessian_converged": eig["converged"]}

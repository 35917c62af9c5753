"""Empirical privacy checks: a white-box canary audit of one private release, and a neighbour-replay
self-test for a user's own model, loss and batch.

Canary audit (:func:`canary_audit`)
-----------------------------------
A lower bound on the ε of ONE private release of this library's real code path (``BookKeepingEngine`` +
``DPOptimizer``, full batch, q = 1), to compare with the ε the accountant claims for the same σ and δ.
Each trial runs one real private step with the canary example IN the batch (positive trial) or OUT of it
(negative trial), reads the released gradient ``g̃ = p.grad`` white-box and computes the statistic
``s = B̄·⟨g̃, u⟩`` with ``u`` the unit direction of the canary's gradient. The benign part of ``s`` is the
same in every trial (fixed data, weights reset each trial); the noise is fresh (the optimizer draws its key
from the OS and never reuses a Philox counter). A correct release shifts ``s`` by at most C (the clipped
contribution) against noise ``N(0, σ²C²)``: the two distributions are ``1/σ``-GDP apart, exactly what the
accountant assumes at q = 1.

From M positive and M negative trials the first half picks the threshold ``τ`` (the one with the best
lower bound on that half), the second half gives TPR = P(s > τ | in) and FPR = P(s > τ | out) with
Clopper–Pearson bounds. At ``confidence`` 1 − α each one-sided bound is at level α/2, so jointly
``μ_lower = Φ⁻¹(TPR_low) − Φ⁻¹(FPR_high)`` is a lower bound on the Gaussian-DP μ of the release with
probability ≥ 1 − α, and ``ε_lower(δ)`` is the ε of μ_lower-GDP at δ:
``δ(ε) = Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)``. A release that keeps its promise gives
``ε_lower ≤ ε_claimed`` with probability ≥ 1 − α; one with half the noise, no clipping or a wrong
per-example norm gives ``ε_lower ≫ ε_claimed``.

Built-in canaries (``canary=``):

* ``"dirac"``: ``nn.Linear(8, 4, bias=False)`` on 2-D inputs, per-example loss ``ℓ_i = ⟨f(x_i), w_i⟩``;
  the canary ``x = s·e_0``, ``w = e_0`` has its whole gradient ``s·e_0 ⊗ e_0`` in the single weight
  coordinate ``[0, 0]`` (``s = canary_norm``, default 10·C).
* ``"cancellation"``: the floating-point attack on ghost norms. ``nn.Linear(16, 16, bias=False)`` on inputs
  ``[B, T=2, 16]`` (the engine takes the Gram ("ghost") route, ``T(D+P) < DP``), ``ℓ_i = Σ_t ⟨f(x_{i,t}),
  w_{i,t}⟩``. The canary has two identical positions ``a_1 = a_2 = a = 1000·e_0`` and output weights
  ``w_1 = v``, ``w_2 = −v + δ`` with ``v = 2^k e_0`` (‖v‖ ≥ 1024) and ``δ ⊥ v`` small: its true gradient is
  ``δ ⊗ a``, of norm ``‖a‖‖δ‖ = canary_norm`` (default 100·C), while ``Σ_{t,s}(a_t·a_s)(g_t·g_s)`` cancels
  to 0 in fp32. An engine that trusts that number does not clip the canary.
* an :class:`AuditSetup` of your own (model, benign batch, canary, loss).

Self-test (:func:`privacy_self_test`)
-------------------------------------
Neighbour replay without noise on the user's own model, loss and batch: the clipped sum ``S = Σ_i c_i g_i``
of the batch, of the batch without example i, and of the batch with example i replaced by another one; a
per-example model and loss change S by at most C per added/removed example (2C per replacement), and the
difference equals example i's contribution computed alone. Anything else means the examples are coupled
(a loss centred on the batch mean, contrastive losses, BatchNorm-like layers, sequence-first tensors) and
the noise, calibrated to C, does not cover it: :class:`PrivacySelfTestError` says so, loudly.
"""

from __future__ import annotations

import collections.abc
import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from scipy import optimize, stats
from scipy.special import log_ndtr, ndtr, ndtri
from torch import Tensor, nn

from .accounting import compute_epsilon
from .engine import BookKeepingEngine
from .optim import DPOptimizer
from .validation import PrivacyConfigError, check_delta, check_max_grad_norm, check_noise_multiplier

__all__ = [
    "AuditSetup",
    "AuditResult",
    "canary_audit",
    "dirac_setup",
    "cancellation_setup",
    "gdp_delta",
    "gdp_epsilon",
    "clopper_pearson",
    "PrivacySelfTestError",
    "SelfTestReport",
    "privacy_self_test",
]

LossFn = Callable[[nn.Module, Any], Tensor]


# ------------------------------------------------------------------------------------------------
# Gaussian DP and binomial confidence bounds
# ------------------------------------------------------------------------------------------------


def gdp_delta(epsilon: float, mu: float) -> float:
    """δ(ε) of μ-Gaussian DP: ``Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2)`` (stable for large ε and μ)."""
    if mu <= 0:
        return 0.0
    return float(ndtr(-epsilon / mu + mu / 2) - math.exp(epsilon + float(log_ndtr(-epsilon / mu - mu / 2))))


def gdp_epsilon(mu: float, delta: float) -> float:
    """The smallest ε ≥ 0 with ``δ(ε) ≤ delta`` for μ-GDP (0 for μ ≤ 0, inf for μ = inf)."""
    delta = check_delta(delta)
    if not mu > 0:  # also NaN
        return 0.0
    if math.isinf(mu):
        return math.inf
    if gdp_delta(0.0, mu) <= delta:
        return 0.0
    hi = 1.0
    while gdp_delta(hi, mu) > delta:
        hi *= 2.0
        if hi > 1e6:
            return math.inf
    return float(optimize.brentq(lambda e: gdp_delta(e, mu) - delta, 0.0, hi, xtol=1e-10, rtol=1e-12))


def clopper_pearson(successes, trials: int, alpha: float) -> Tuple[np.ndarray, np.ndarray]:
    """One-sided Clopper–Pearson bounds at level ``alpha`` each: (lower, upper) such that
    P(p < lower) ≤ alpha and P(p > upper) ≤ alpha. ``successes`` may be an array."""
    k = np.asarray(successes, dtype=np.float64)
    n = float(trials)
    lower = np.where(k > 0, stats.beta.ppf(alpha, np.maximum(k, 1), np.maximum(n - k + 1, 1)), 0.0)
    upper = np.where(k < n, stats.beta.ppf(1 - alpha, k + 1, np.maximum(n - k, 1)), 1.0)
    return lower, upper


def _mu_from_rates(tpr_low, fpr_high):
    with np.errstate(divide="ignore"):
        return ndtri(np.asarray(tpr_low, dtype=np.float64)) - ndtri(np.asarray(fpr_high, dtype=np.float64))


# ------------------------------------------------------------------------------------------------
# Canary audit
# ------------------------------------------------------------------------------------------------


@dataclass
class AuditSetup:
    """What one audit runs: a fresh (unattached) model, the fixed benign batch, the canary (a batch of one
    example, same structure) and ``loss_fn(model, batch) -> scalar`` (summing or averaging per-example losses
    over the batch, as ``loss_reduction`` of the audit says). ``direction``: the unit direction ``u`` of the
    statistic, ``{parameter name: tensor}``; None takes the canary's own gradient (float64, at the initial
    weights, computed alone)."""

    model: nn.Module
    benign: Any
    canary: Any
    loss_fn: LossFn
    name: str = "custom"
    direction: Optional[Dict[str, Tensor]] = None


def _projection_loss(reduction: str) -> LossFn:
    """``ℓ_i = Σ ⟨f(x_i), w_i⟩`` (over all positions), summed or averaged over the batch."""

    def loss_fn(model: nn.Module, batch) -> Tensor:
        x, w = batch
        per_example = (model(x) * w).flatten(1).sum(1)
        return per_example.sum() if reduction == "sum" else per_example.mean()

    return loss_fn


def dirac_setup(max_grad_norm: float = 1.0, *, canary_norm: Optional[float] = None, benign_examples: int = 8,
                loss_reduction: str = "sum", data_seed: int = 0, dtype: torch.dtype = torch.float32) -> AuditSetup:
    """The Dirac canary: gradient ``s·e_0 ⊗ e_0`` (one weight coordinate), ``s = canary_norm`` (10·C)."""
    C = check_max_grad_norm(max_grad_norm)
    s = 10.0 * C if canary_norm is None else float(canary_norm)
    gen = torch.Generator().manual_seed(data_seed)
    D, P = 8, 4
    model = nn.Linear(D, P, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.randn(P, D, generator=gen) / math.sqrt(D))
    model = model.to(dtype)
    benign = (torch.randn(benign_examples, D, generator=gen, dtype=torch.float64).to(dtype),
              torch.randn(benign_examples, P, generator=gen, dtype=torch.float64).to(dtype))
    x = torch.zeros(1, D, dtype=dtype)
    x[0, 0] = s
    w = torch.zeros(1, P, dtype=dtype)
    w[0, 0] = 1.0
    return AuditSetup(model, benign, (x, w), _projection_loss(loss_reduction), name="dirac")


def cancellation_setup(max_grad_norm: float = 1.0, *, canary_norm: Optional[float] = None,
                       benign_examples: int = 8, loss_reduction: str = "sum", data_seed: int = 0,
                       input_norm: float = 1000.0) -> AuditSetup:
    """The floating-point cancellation canary (see the module docstring): true gradient ``δ ⊗ a`` of norm
    ``canary_norm`` (100·C), whose fp32 Gram-route norm cancels to 0. Always float32."""
    C = check_max_grad_norm(max_grad_norm)
    target = 100.0 * C if canary_norm is None else float(canary_norm)
    D = P = 16
    T = 2
    gen = torch.Generator().manual_seed(data_seed)
    model = nn.Linear(D, P, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.randn(P, D, generator=gen) / math.sqrt(D))
    benign = (torch.randn(benign_examples, T, D, generator=gen), torch.randn(benign_examples, T, P, generator=gen))
    delta_norm = target / input_norm
    # v = 2^k e_0 with ‖δ‖² below a quarter ulp of ‖v‖² = 2^2k: the fp32 Gram entries round δ away exactly
    k = max(10, math.ceil(math.log2(max(delta_norm, 1e-30))) + 13)
    a = torch.zeros(D)
    a[0] = input_norm
    v = torch.zeros(P)
    v[0] = 2.0 ** k
    d = torch.zeros(P)
    d[1] = delta_norm
    x = torch.stack([a, a])[None]
    w = torch.stack([v, -v + d])[None]
    return AuditSetup(model, benign, (x, w), _projection_loss(loss_reduction), name="cancellation")


@dataclass
class AuditResult:
    """The outcome of :func:`canary_audit`. ``passed``: ``epsilon_lower ≤ epsilon_claimed``."""

    canary: str
    epsilon_lower: float
    epsilon_claimed: float
    mu_lower: float
    mu_claimed: float
    mu_estimate: float
    tpr: float
    fpr: float
    tpr_lower: float
    fpr_upper: float
    threshold: float
    trials: int
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    confidence: float
    clipping: str
    canary_grad_norm: float
    seconds: float
    scores_in: np.ndarray = field(repr=False, default=None)
    scores_out: np.ndarray = field(repr=False, default=None)

    @property
    def passed(self) -> bool:
        return self.epsilon_lower <= self.epsilon_claimed

    def __repr__(self) -> str:
        verdict = "≤" if self.passed else ">"
        return (f"AuditResult({self.canary}: ε_lower={self.epsilon_lower:.3f} {verdict} ε_claimed="
                f"{self.epsilon_claimed:.3f} [{'passed' if self.passed else 'FAILED'}]; μ_lower={self.mu_lower:.3f} "
                f"(claimed μ=1/σ={self.mu_claimed:.3f}, point estimate {self.mu_estimate:.3f}); TPR={self.tpr:.3f} "
                f"(≥{self.tpr_lower:.3f}), FPR={self.fpr:.3f} (≤{self.fpr_upper:.3f}); {self.trials}+{self.trials} "
                f"trials, σ={self.noise_multiplier:g}, C={self.max_grad_norm:g}, δ={self.delta:g}, "
                f"clipping={self.clipping}, ‖canary grad‖={self.canary_grad_norm:.4g}, confidence="
                f"{self.confidence:g}, {self.seconds:.1f}s)")


def _canary_direction(setup: AuditSetup) -> Tuple[Dict[str, Tensor], float]:
    """(unit direction per parameter name, norm) of the canary's gradient, float64, canary alone."""
    if setup.direction is not None:
        u = {n: t.detach().to(torch.float64) for n, t in setup.direction.items()}
        norm = math.sqrt(sum(float(t.pow(2).sum()) for t in u.values()))
        if not norm > 0:
            raise PrivacyConfigError("AuditSetup.direction must be a nonzero direction")
        return {n: t / norm for n, t in u.items()}, float("nan")
    ref = copy.deepcopy(setup.model).double()
    canary = _map_tensors(setup.canary, lambda t: t.double() if t.is_floating_point() else t)
    ref.zero_grad(set_to_none=True)
    setup.loss_fn(ref, canary).backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach()
             for n, p in ref.named_parameters() if p.requires_grad}
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
    if not norm > 0:
        raise PrivacyConfigError("the canary has a zero gradient at the initial weights; it cannot be audited")
    return {n: g / norm for n, g in grads.items()}, norm


def _run_trials(setup, model, params, u, opt, initial, positive, expected_batch, trials, scores) -> None:
    """Alternating negative / positive trials: reset the weights, one real private step, the statistic."""
    named = list(model.named_parameters())
    for t in range(trials):
        for which, batch in ((0, setup.benign), (1, positive)):
            with torch.no_grad():
                for n, p in named:
                    p.copy_(initial[n])
            opt.zero_grad(set_to_none=True)
            setup.loss_fn(model, batch).backward()
            opt.step()
            s = sum(float(torch.dot(p.grad.detach().to(torch.float64).flatten(), ui.flatten()))
                    for p, ui in zip(params, u))
            scores[which, t] = s * expected_batch


def canary_audit(canary: Union[str, AuditSetup] = "dirac", *, noise_multiplier: float = 1.0,
                 max_grad_norm: float = 1.0, delta: float = 1e-5, trials: int = 1000, confidence: float = 0.95,
                 clipping: str = "flat", loss_reduction: str = "sum", canary_norm: Optional[float] = None,
                 benign_examples: int = 8, data_seed: int = 0, noise_seed: Optional[int] = None) -> AuditResult:
    """Empirical lower bound on ε of one private release (q = 1), against the accountant's ε.

    Args:
        canary: ``"dirac"``, ``"cancellation"`` (see the module docstring) or an :class:`AuditSetup`.
        noise_multiplier: σ of the release (σ around 1 gives a claimed ε of a few units at δ = 1e-5).
        max_grad_norm: C.
        delta: δ of both ε's.
        trials: M: M positive (canary in) and M negative (canary out) trials, alternating; half of each
            choose the threshold, the other half measure TPR/FPR. 1000 take a few seconds on 2 cores.
        confidence: 1 − α of the joint Clopper–Pearson bounds (each one-sided at α/2).
        clipping: the engine's clipping style.
        loss_reduction: how the built-in canaries' loss reduces over the batch (and the engine's setting).
        canary_norm: norm of the built-in canary's true gradient (dirac: 10·C, cancellation: 100·C).
        benign_examples: size of the fixed benign batch of the built-in canaries.
        data_seed: seed of the built-in model's weights and benign data (never of the noise).
        noise_seed: None (default) draws the noise key from the OS, as in training; an int only to replay.

    Every trial is one real step: ``optimizer.zero_grad(); loss_fn(model, batch).backward();
    optimizer.step()`` with one engine and ``DPOptimizer(SGD(lr=1))`` reused across trials, weights reset
    before each. ``expected_batch_size`` is the fixed B̄ = (benign examples + 1).
    """
    sigma = check_noise_multiplier(noise_multiplier)
    C = check_max_grad_norm(max_grad_norm)
    delta = check_delta(delta)
    if not (isinstance(trials, int) and trials >= 20):
        raise PrivacyConfigError(f"trials must be an int ≥ 20, got {trials!r}")
    if not 0 < confidence < 1:
        raise PrivacyConfigError(f"confidence must be in (0, 1), got {confidence!r}")
    if isinstance(canary, AuditSetup):
        setup = canary
    elif canary == "dirac":
        setup = dirac_setup(C, canary_norm=canary_norm, benign_examples=benign_examples,
                            loss_reduction=loss_reduction, data_seed=data_seed)
    elif canary == "cancellation":
        setup = cancellation_setup(C, canary_norm=canary_norm, benign_examples=benign_examples,
                                   loss_reduction=loss_reduction, data_seed=data_seed)
    else:
        raise PrivacyConfigError(f"canary must be 'dirac', 'cancellation' or an AuditSetup, got {canary!r}")
    t0 = time.perf_counter()
    u_named, canary_grad_norm = _canary_direction(setup)
    epsilon_claimed = compute_epsilon(sigma, 1.0, 1, delta)

    model = setup.model
    benign_size = _batch_size(setup.benign)
    positive = _concat_batches(setup.benign, setup.canary)
    expected_batch = float(benign_size + _batch_size(setup.canary))
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = BookKeepingEngine(model, max_grad_norm=C, loss_reduction=loss_reduction, clipping=clipping)
    try:
        names = {p: n for n, p in model.named_parameters()}
        params = list(engine.params)
        u = [u_named[names[p]].to(device=p.device) for p in params]
        opt = DPOptimizer(torch.optim.SGD(params, lr=1.0), engine=engine, noise_multiplier=sigma,
                          expected_batch_size=expected_batch, seed=noise_seed)
        scores = np.empty((2, trials), dtype=np.float64)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny GEMMs: one thread is fastest, and immune to a busy machine
        try:
            _run_trials(setup, model, params, u, opt, initial, positive, expected_batch, trials, scores)
        finally:
            torch.set_num_threads(threads)
        opt.zero_grad(set_to_none=True)
    finally:
        engine.detach()
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(initial[n])
                p.grad = None
    out_scores, in_scores = scores
    alpha = (1.0 - confidence) / 2.0
    half = trials // 2
    # threshold: the best lower bound on the first half (candidates: the scores of that half)
    cand = np.unique(np.concatenate([in_scores[:half], out_scores[:half]]))
    in_sorted, out_sorted = np.sort(in_scores[:half]), np.sort(out_scores[:half])
    tp = half - np.searchsorted(in_sorted, cand, side="right")
    fp = half - np.searchsorted(out_sorted, cand, side="right")
    tl, _ = clopper_pearson(tp, half, alpha)
    _, fh = clopper_pearson(fp, half, alpha)
    score = _mu_from_rates(tl, fh)
    best = np.flatnonzero(score >= score.max() - 1e-12)  # a plateau (e.g. separated halves): take its middle
    threshold = float(0.5 * (cand[best[0]] + cand[min(best[-1] + 1, len(cand) - 1)]))
    # evaluation on the second half
    n_eval = trials - half
    tp = int((in_scores[half:] > threshold).sum())
    fp = int((out_scores[half:] > threshold).sum())
    tl, _ = clopper_pearson(tp, n_eval, alpha)
    _, fh = clopper_pearson(fp, n_eval, alpha)
    tpr_low, fpr_high = float(tl), float(fh)
    mu_lower = float(_mu_from_rates(tpr_low, fpr_high))
    tpr, fpr = tp / n_eval, fp / n_eval
    clamp = 0.5 / n_eval
    mu_estimate = float(ndtri(min(max(tpr, clamp), 1 - clamp)) - ndtri(min(max(fpr, clamp), 1 - clamp)))
    return AuditResult(
        canary=setup.name, epsilon_lower=gdp_epsilon(mu_lower, delta), epsilon_claimed=float(epsilon_claimed),
        mu_lower=mu_lower, mu_claimed=1.0 / sigma, mu_estimate=mu_estimate, tpr=tpr, fpr=fpr, tpr_lower=tpr_low,
        fpr_upper=fpr_high, threshold=threshold, trials=trials, noise_multiplier=sigma, max_grad_norm=C,
        delta=delta, confidence=confidence, clipping=str(clipping), canary_grad_norm=canary_grad_norm,
        seconds=time.perf_counter() - t0, scores_in=in_scores, scores_out=out_scores)


# ------------------------------------------------------------------------------------------------
# Batches: a tensor or a (nested) tuple / list / dict of tensors, examples along dimension 0
# ------------------------------------------------------------------------------------------------


def _map_tensors(batch: Any, fn: Callable[[Tensor], Tensor], other: Any = None) -> Any:
    """Apply ``fn`` (or ``fn(t, o)`` with the matching leaf of ``other``) to every tensor with a leading
    dimension; anything else (0-d tensors, non-tensors) passes unchanged."""
    if isinstance(batch, Tensor):
        if batch.dim() == 0:
            return batch
        return fn(batch) if other is None else fn(batch, other)
    if isinstance(batch, collections.abc.Mapping):
        items = {k: _map_tensors(v, fn, None if other is None else other[k]) for k, v in batch.items()}
        try:
            return type(batch)(items)  # type: ignore[call-arg]
        except TypeError:
            return items
    if isinstance(batch, (tuple, list)):
        parts = [_map_tensors(v, fn, None if other is None else other[j]) for j, v in enumerate(batch)]
        if isinstance(batch, tuple) and hasattr(batch, "_fields"):
            return type(batch)(*parts)
        return type(batch)(parts)
    return batch


def _leaves(batch: Any) -> List[Tensor]:
    if isinstance(batch, Tensor):
        return [batch]
    if isinstance(batch, collections.abc.Mapping):
        return [t for v in batch.values() for t in _leaves(v)]
    if isinstance(batch, (tuple, list)):
        return [t for v in batch for t in _leaves(v)]
    return []


def _batch_size(batch: Any) -> int:
    sizes = {int(t.shape[0]) for t in _leaves(batch) if t.dim() > 0}
    if not sizes:
        raise PrivacyConfigError("the batch contains no tensor with an example dimension; a batch is a tensor or "
                                 "a (nested) tuple/list/dict of tensors with the examples along dimension 0")
    if len(sizes) != 1:
        raise PrivacyConfigError(
            f"the tensors of the batch have different sizes along dimension 0 ({sorted(sizes)}); every tensor "
            f"must have the example dimension first. Sequence-first tensors ([T, B, ...]) must be transposed "
            f"(e.g. batch_first=True)")
    return sizes.pop()


def _concat_batches(a: Any, b: Any) -> Any:
    return _map_tensors(a, lambda x, y: torch.cat([x, y]), b)


def _remove(batch: Any, i: int) -> Any:
    return _map_tensors(batch, lambda t: torch.cat([t[:i], t[i + 1:]]))


def _select(batch: Any, i: int) -> Any:
    return _map_tensors(batch, lambda t: t[i:i + 1])


def _replace(batch: Any, i: int, source: Any, j: int) -> Any:
    def put(t, s):
        t = t.clone()
        t[i] = s[j]
        return t

    return _map_tensors(batch, put, source)


# ------------------------------------------------------------------------------------------------
# Neighbour-replay self-test
# ------------------------------------------------------------------------------------------------


class PrivacySelfTestError(PrivacyConfigError):
    """:func:`privacy_self_test` found examples whose effect on the clipped sum is not bounded by the
    sensitivity C (or that are coupled to the other examples of the batch). ``report`` holds the details."""

    def __init__(self, message: str, report: "SelfTestReport"):
        super().__init__(message)
        self.report = report


@dataclass
class _Check:
    kind: str  # "remove", "add", "replace"
    example: int
    other: Optional[int]
    norm: float
    bound: float
    parameter: str
    coupling: float = 0.0  # ‖Δ − example i's contribution computed alone‖ (remove only)

    @property
    def ratio(self) -> float:
        return self.norm / self.bound

    def describe(self) -> str:
        what = {"remove": f"example {self.example} removed",
                "add": f"example {self.other} added in place of removed example {self.example}",
                "replace": f"example {self.example} replaced by {'the given replacement' if self.other is None else f'a copy of example {self.other}'}"}[self.kind]
        bound = "C" if self.kind != "replace" else "2C"
        return (f"{what}: ‖Δ‖ = {self.norm:.6g} = {self.ratio:.4f} × {bound} ({bound} = {self.bound:.6g}), "
                f"largest part in '{self.parameter}'")


_CAUSES = (
    "Likely causes:\n"
    "  - a loss that mixes examples: centred on or normalised by batch statistics (e.g. ‖f(x_i) − mean_j "
    "f(x_j)‖²), contrastive / in-batch-negative, pairwise or ranking losses. Every example needs its own loss "
    "term ℓ_i that depends on example i only; the loss is Σ_i ℓ_i or mean_i ℓ_i.\n"
    "  - a layer that couples examples in the forward: BatchNorm-like batch statistics (also custom ones), "
    "x − x.mean(0), attention or pooling over the batch dimension, state carried between forward passes.\n"
    "  - sequence-first tensors ([T, B, ...], e.g. RNN/attention without batch_first=True): the engine treats "
    "dimension 0 of every layer input as the example dimension.\n"
    "  - randomness inside the forward or loss that the test cannot replay (functional dropout, random "
    "augmentation): disable it for the test.\n"
    "The Gaussian noise is calibrated to the sensitivity C, so a contribution above C (or examples coupled "
    "through the batch) is not covered by the privacy guarantee.")


@dataclass
class SelfTestReport:
    """What :func:`privacy_self_test` measured. ``passed`` is False if any contribution exceeded its bound
    by more than the tolerance or any example was coupled to the others."""

    sensitivity: float
    tolerance: float
    batch_size: int
    examples: List[int]
    checks: List[_Check]
    seconds: float = 0.0
    coupling_tolerance: float = 1e-2
    notes: List[str] = field(default_factory=list)

    @property
    def worst(self) -> Optional[_Check]:
        return max(self.checks, key=lambda c: c.ratio, default=None)

    @property
    def worst_ratio(self) -> float:
        w = self.worst
        return 0.0 if w is None else w.ratio

    @property
    def worst_coupling(self) -> Optional[_Check]:
        removes = [c for c in self.checks if c.kind == "remove" and not math.isnan(c.coupling)]
        return max(removes, key=lambda c: c.coupling, default=None)

    @property
    def violations(self) -> List[_Check]:
        return [c for c in self.checks if c.ratio > 1.0 + self.tolerance]

    @property
    def coupled(self) -> List[_Check]:
        return [c for c in self.checks if c.kind == "remove" and c.coupling > self.coupling_tolerance * self.sensitivity]

    @property
    def passed(self) -> bool:
        return not self.violations and not self.coupled

    def lines(self) -> List[str]:
        w, wc = self.worst, self.worst_coupling
        why = []
        if self.violations:
            why.append(f"{len(self.violations)} contribution(s) above the bound")
        if self.coupled:
            why.append(f"{len(self.coupled)} example(s) coupled to the rest of the batch")
        verdict = "PASSED" if self.passed else f"FAILED ({', '.join(why)})"
        head = (f"privacy self-test {verdict}: sensitivity C = {self.sensitivity:.6g}, "
                f"worst ratio ‖Δ‖/bound = {self.worst_ratio:.4f} (tolerance {self.tolerance:g}), "
                f"{len(self.examples)} of {self.batch_size} examples tested")
        out = [head]
        if w is not None:
            out.append("worst: " + w.describe())
        if wc is not None:
            out.append(f"coupling: largest ‖Δ − example's own contribution‖ = {wc.coupling:.3g} = "
                       f"{wc.coupling / self.sensitivity:.3g} × C (example {wc.example})")
        out.extend(self.notes)
        for c in self.violations[:5]:
            out.append("VIOLATION: " + c.describe())
        for c in self.coupled[:5]:
            out.append(f"COUPLED: removing example {c.example} changed the other examples' contributions by "
                       f"{c.coupling:.4g} = {c.coupling / self.sensitivity:.3g} × C")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


class _PreservedState:
    """Everything the self-test could disturb, restored on exit: module train flags of dropout layers
    (switched to eval), the engine's DP-SAT perturbation (suspended),
    parameter values, ``.grad`` and buffers, the RNG states, the engine's noise planner."""

    def __init__(self, model: nn.Module, engine: BookKeepingEngine):
        self.model, self.engine = model, engine

    def __enter__(self):
        m = self.model
        self.dropout = [(d, d.training) for d in m.modules() if isinstance(d, nn.modules.dropout._DropoutNd)]
        for d, _ in self.dropout:
            d.training = False
        self.perturbation = self.engine.perturbation  # DP-SAT's ε: the test runs at the weights themselves
        self.engine.set_perturbation(None)
        self.params = [(p, p.detach().clone(), p.grad) for p in m.parameters()]
        self.buffers = [(b, b.detach().clone()) for b in m.buffers()]
        devices = sorted({t.device.index for t, *_ in self.params if t.device.type == "cuda"})
        self.rng = torch.random.fork_rng(devices=devices)
        self.rng.__enter__()
        self.planner = self.engine.noise_planner
        self.engine.noise_planner = None
        return self

    def __exit__(self, *exc):
        try:
            self.engine.noise_planner = self.planner
            self.rng.__exit__(*exc)
            with torch.no_grad():
                for p, value, grad in self.params:
                    if not torch.equal(p, value):
                        p.copy_(value)
                    p.grad = grad
                for b, value in self.buffers:
                    if not torch.equal(b, value):
                        b.copy_(value)
        finally:
            self.engine.set_perturbation(self.perturbation)
            for d, training in self.dropout:
                d.training = training
        return False


def privacy_self_test(model: Union[nn.Module, BookKeepingEngine], loss_fn: LossFn, batch: Any, *,
                      engine: Optional[BookKeepingEngine] = None, max_grad_norm: Optional[float] = None,
                      loss_reduction: Optional[str] = None, clipping: Any = None,
                      examples: Optional[Sequence[int]] = None, max_examples: int = 16, replacement: Any = None,
                      tolerance: float = 1e-3, coupling_tolerance: float = 1e-2, seed: int = 0,
                      raise_on_failure: bool = True) -> SelfTestReport:
    """Neighbour replay of ``loss_fn`` on ``batch`` without noise: is every example's effect on the clipped
    sum bounded by the sensitivity C, and independent of the other examples?

    Two ways to call it::

        privacy_self_test(model, loss_fn, batch, max_grad_norm=1.0, loss_reduction="mean")   # before make_private
        privacy_self_test(model, loss_fn, batch, engine=privacy_engine.engine)            # an attached engine
        privacy_self_test(privacy_engine.engine, loss_fn, batch)                          # same (model = engine.module)

    Args:
        model: the model (or an attached :class:`~dpsat_fast.engine.BookKeepingEngine`).
        loss_fn: ``loss_fn(model, batch) -> scalar``: your loss, with whatever reduction you train with.
        batch: a tensor or a (nested) tuple/list/dict of tensors, examples along dimension 0 (≥ 1 example).
        engine: an engine attached to ``model``: its clipping, C and loss_reduction are what is tested.
            Without one, a temporary engine is attached with ``max_grad_norm`` (required),
            ``loss_reduction`` (default "mean": how the engine interprets your loss) and ``clipping``
            (default "flat"), and detached afterwards.
        examples: indices to test; default all if the batch has ≤ ``max_examples`` examples, else a sample of
            ``max_examples`` (drawn with ``seed``).
        replacement: one example (a batch of size 1, same structure) put in place of each tested example;
            default: a copy of the next example of the batch.
        tolerance: relative slack of the bound: fail when ‖Δ‖ > bound·(1 + tolerance).
        coupling_tolerance: fail when removing an example changes the others' contributions by more than
            coupling_tolerance·C (``‖S(B) − S(B∖i) − S({i})‖``; loose enough for TF32 / reduced-precision GEMMs).
        seed: the RNG seed every replayed forward runs under (and of the example sample).
        raise_on_failure: raise :class:`PrivacySelfTestError` on failure (default) instead of only reporting.

    Checks per tested example i (S(X) = the noise-free clipped sum of batch X, ‖·‖ over all parameters):
    ``‖S(B) − S(B∖i)‖ ≤ C`` (remove), ``‖S(B∖i ∪ j) − S(B∖i)‖ ≤ C`` (add the replacement j),
    ``‖S(B) − S(B with i → j)‖ ≤ 2C`` (replace), and ``S(B) − S(B∖i) = S({i})`` (no coupling).

    Nothing of a run is disturbed: no optimizer or accountant step, no noise (the engine's ``noise_planner``
    is set to None and restored), weights, ``.grad``, buffers and RNG states are restored, dropout layers run
    in eval mode during the test and DP-SAT's perturbation is suspended. With an attached engine the
    call is refused while a step is half done (clipped sums pending): run it before the step's first
    backward or after ``optimizer.step()``.

    Returns a :class:`SelfTestReport` (``str(report)`` is readable); raises :class:`PrivacySelfTestError`
    with the report and the likely causes if a check fails.
    """
    t0 = time.perf_counter()
    if isinstance(model, BookKeepingEngine):
        if engine is not None and engine is not model:
            raise PrivacyConfigError("pass the engine once (as the first argument or as engine=)")
        engine = model
        model = getattr(engine, "module", None)
        if not isinstance(model, nn.Module):
            raise PrivacyConfigError("pass the model first and the engine as engine=")
    if not isinstance(model, nn.Module):
        raise PrivacyConfigError(f"model must be an nn.Module or a BookKeepingEngine, got {type(model).__name__}")
    for name, value in (("tolerance", tolerance), ("coupling_tolerance", coupling_tolerance)):
        if not (isinstance(value, (int, float)) and value >= 0):
            raise PrivacyConfigError(f"{name} must be a number ≥ 0, got {value!r}")
    B = _batch_size(batch)
    if B < 1:
        raise PrivacyConfigError("the self-test needs a batch with at least one example")
    if replacement is not None and _batch_size(replacement) != 1:
        raise PrivacyConfigError("replacement must be one example (a batch of size 1 with the batch's structure)")
    if examples is None:
        if B <= max_examples:
            examples = list(range(B))
        else:
            gen = torch.Generator().manual_seed(seed)
            examples = sorted(torch.randperm(B, generator=gen)[:max_examples].tolist())
    else:
        examples = [int(i) for i in examples]
        bad = [i for i in examples if not 0 <= i < B]
        if bad:
            raise PrivacyConfigError(f"examples {bad} are not indices of a batch of {B}")

    own_engine = engine is None
    if own_engine:
        if max_grad_norm is None:
            raise PrivacyConfigError("max_grad_norm (C) is required without an attached engine (or pass engine=)")
        try:
            engine = BookKeepingEngine(model, max_grad_norm=max_grad_norm, loss_reduction=loss_reduction or "mean",
                                       clipping=clipping or "flat")
        except PrivacyConfigError as e:
            if "already attached" in str(e):
                raise PrivacyConfigError("privacy_self_test: this model is already attached to an engine; test that "
                                         "engine: privacy_self_test(model, loss_fn, batch, engine=privacy_engine."
                                         "engine)") from e
            raise
    else:
        given = [n for n, v in (("max_grad_norm", max_grad_norm), ("loss_reduction", loss_reduction),
                                ("clipping", clipping)) if v is not None]
        if given:
            raise PrivacyConfigError(f"{given} cannot be set with an attached engine: its own settings are tested")
        if engine.summed_grads:
            raise PrivacyConfigError(
                "privacy_self_test: a step is half done (the engine holds clipped sums not yet released); run the "
                "self-test before the step's first backward or after optimizer.step() / zero_grad()")
    try:
        C = float(engine.clipping.sensitivity)
        params = list(engine.params)
        keys = engine.param_keys
        with _PreservedState(model, engine):

            def clipped_sum(b, rng_seed: int = seed) -> Dict[nn.Parameter, Tensor]:
                torch.manual_seed(rng_seed)
                try:
                    with torch.enable_grad():
                        loss = loss_fn(model, b)
                        if not (isinstance(loss, Tensor) and loss.numel() == 1):
                            raise PrivacyConfigError("loss_fn(model, batch) must return a scalar tensor")
                        loss.backward()
                    return {p: engine.take_summed_grad(p)[0].detach().to(torch.float64) for p in params}
                finally:
                    engine.clear()

            def diff(x, y) -> Tuple[float, str]:
                parts = {p: (x[p] - y[p]) for p in params}
                sq = {p: float(d.pow(2).sum()) for p, d in parts.items()}
                top = max(sq, key=sq.get) if sq else None
                return math.sqrt(sum(sq.values())), (keys[top] if top is not None else "-")

            def zeros():
                return {p: torch.zeros(p.shape, dtype=torch.float64, device=p.device) for p in params}

            full = clipped_sum(batch)
            again = clipped_sum(batch)
            n_again, _ = diff(full, again)
            if n_again > coupling_tolerance * C:
                raise PrivacyConfigError(
                    f"privacy_self_test: two replays of the same batch under the same seed differ by {n_again:.3g} "
                    f"(C = {C:g}): the loss or model is not deterministic, so neighbour replay cannot be judged")
            other = clipped_sum(batch, seed + 1)  # a different seed: randomness the test cannot replay?
            n_other, _ = diff(full, other)
            if n_other > coupling_tolerance * C:
                raise PrivacyConfigError(
                    f"privacy_self_test: the clipped sum of the same batch changes with the random seed (by "
                    f"{n_other:.3g}, C = {C:g}): the forward or the loss draws random numbers outside dropout "
                    f"modules (functional dropout, random augmentation); disable them for the self-test")
            checks: List[_Check] = []
            notes: List[str] = []
            for i in examples:
                removed = clipped_sum(_remove(batch, i)) if B > 1 else zeros()
                n, top = diff(full, removed)
                try:
                    alone = clipped_sum(_select(batch, i))
                except Exception as e:  # e.g. a forward that squeezes the batch dimension of a batch of one
                    alone = None
                    if not notes:
                        notes.append(f"coupling not checked: a batch of one example failed ({type(e).__name__}: {e})")
                if alone is None:
                    coupling = math.nan
                else:
                    delta = {p: full[p] - removed[p] for p in params}
                    coupling, _ = diff(delta, alone)
                checks.append(_Check("remove", i, None, n, C, top, coupling))
                if replacement is None and B < 2:
                    continue
                src, j = (replacement, 0) if replacement is not None else (batch, (i + 1) % B)
                replaced = clipped_sum(_replace(batch, i, src, j))
                n, top = diff(replaced, removed)
                checks.append(_Check("add", i, None if replacement is not None else j, n, C, top))
                n, top = diff(full, replaced)
                checks.append(_Check("replace", i, None if replacement is not None else j, n, 2 * C, top))
    finally:
        if own_engine:
            engine.detach()
        else:
            engine.clear()
    report = SelfTestReport(C, float(tolerance), B, list(examples), checks, time.perf_counter() - t0,
                            float(coupling_tolerance), notes)
    if raise_on_failure and not report.passed:
        raise PrivacySelfTestError(str(report) + "\n" + _CAUSES, report)
    return report


def _main() -> None:  # pragma: no cover - a manual entry point
    import argparse

    ap = argparse.ArgumentParser(description="White-box canary audit of one private release (q = 1)")
    ap.add_argument("--canary", default="dirac", choices=["dirac", "cancellation"])
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--clipping", default="flat")
    args = ap.parse_args()
    print(canary_audit(args.canary, noise_multiplier=args.sigma, max_grad_norm=args.max_grad_norm,
                       delta=args.delta, trials=args.trials, confidence=args.confidence, clipping=args.clipping))


if __name__ == "__main__":  # pragma: no cover
    _main()

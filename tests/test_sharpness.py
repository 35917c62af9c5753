"""dpsat_fast.sharpness against a quadratic with a known Hessian, and on a real model (exact Hessian by
torch.autograd.functional.hessian, engine refused, model restored)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpsat_fast.sharpness import (cross_entropy_loss, hessian_top_eigenvalue, perturbation_sharpness,
                                  sharpness_report)


class Quadratic(nn.Module):
    """L(w) = ½ wᵀAw + bᵀw: Hessian A, gradient Aw + b."""

    def __init__(self, A, b, w):
        super().__init__()
        self.register_buffer("A", A)
        self.register_buffer("b", b)
        self.w = nn.Parameter(w.clone())

    def loss(self):
        return 0.5 * self.w @ self.A @ self.w + self.b @ self.w


def _quadratic(d=12, eigenvalues=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    lam = torch.tensor(eigenvalues, dtype=torch.float64) if eigenvalues is not None else \
        torch.linspace(0.1, 3.0, d, dtype=torch.float64)
    d = len(lam)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    A = Q @ torch.diag(lam) @ Q.T
    b = torch.randn(d, generator=g, dtype=torch.float64)
    w = torch.randn(d, generator=g, dtype=torch.float64)
    return Quadratic(A, b, w), lam


def _loss(m):
    return m.loss()


def test_top_eigenvalue_of_a_quadratic():
    model, lam = _quadratic(eigenvalues=[7.0, 3.0, 2.0, 1.0, 0.5, 0.1, -0.2, 0.0])
    out = hessian_top_eigenvalue(model, _loss, iters=200, tol=1e-12)
    assert out["converged"]
    assert out["eigenvalue"] == pytest.approx(7.0, rel=1e-8)
    assert out["history"][-1] == out["eigenvalue"] and out["iterations"] == len(out["history"])


def test_adversarial_increase_is_exact_on_a_quadratic():
    model, _ = _quadratic()
    A, b, w = model.A, model.b, model.w.detach().clone()
    g = A @ w + b
    u = g / g.norm()
    for rho in (0.01, 0.1, 0.5):
        out = perturbation_sharpness(model, _loss, rho, n_random=0)
        expected = rho * g.norm() + 0.5 * rho ** 2 * (u @ A @ u)
        assert out["adversarial_increase"] == pytest.approx(float(expected), rel=1e-10)
        assert out["gradient_norm"] == pytest.approx(float(g.norm()), rel=1e-12)
        assert out["loss"] == pytest.approx(float(0.5 * w @ A @ w + b @ w), rel=1e-12)
    assert torch.equal(model.w.detach(), w)  # restored bit for bit


def test_random_increase_at_the_minimum_is_half_rho2_trace_over_d():
    """At w* = −A⁻¹b the gradient is 0: L(w*+δ) − L(w*) = ½ δᵀAδ, whose mean over the sphere of radius ρ is
    ½ρ²·tr(A)/d; the gradient vanishes (up to rounding), so the "adversarial" direction is only rounding noise and
    its increase lies in the same range."""
    model, lam = _quadratic(d=10)
    with torch.no_grad():
        model.w.copy_(-torch.linalg.solve(model.A, model.b))
    rho = 0.3
    out = perturbation_sharpness(model, _loss, rho, n_random=4000, seed=1)
    expected = 0.5 * rho ** 2 * float(lam.sum()) / len(lam)
    # the per-draw values lie in [½ρ²λ_min, ½ρ²λ_max]; 4000 draws: the mean within a few std errors
    assert out["random_increase_mean"] == pytest.approx(expected, rel=0.03)
    lo, hi = 0.5 * rho ** 2 * float(lam.min()), 0.5 * rho ** 2 * float(lam.max())
    assert all(lo - 1e-12 <= r <= hi + 1e-12 for r in out["random_increases"])
    assert out["gradient_norm"] < 1e-10 and lo - 1e-12 <= out["adversarial_increase"] <= hi + 1e-12


def test_projected_ascent_beats_one_step_and_stays_in_the_ball():
    """Several ascent steps on a quadratic reach at least the one-step increase, never beyond the exact maximum
    over the ball (ρ‖g‖ + ½ρ²λ_max bounds it)."""
    model, lam = _quadratic(eigenvalues=[10.0, 1.0, 0.5, 0.1])
    rho = 1.0
    one = perturbation_sharpness(model, _loss, rho, n_random=0)["adversarial_increase"]
    many = perturbation_sharpness(model, _loss, rho, n_random=0, ascent_steps=20)["adversarial_increase"]
    g = model.A @ model.w.detach() + model.b
    assert many >= one - 1e-9
    assert many <= rho * float(g.norm()) + 0.5 * rho ** 2 * 10.0 + 1e-9


def _tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(1, 3, 3, padding=1), nn.GroupNorm(1, 3), nn.Tanh(), nn.Flatten(),
                         nn.Linear(3 * 6, 4)).double()


def test_top_eigenvalue_matches_the_full_hessian_of_a_small_network():
    model = _tiny_model()
    x, y = torch.randn(16, 1, 6, dtype=torch.float64), torch.randint(0, 4, (16,))
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([p.detach().flatten() for p in params])

    def flat_loss(v):
        chunks, i = {}, 0
        for n, p in zip(names, params):
            chunks[n] = v[i:i + p.numel()].view_as(p)
            i += p.numel()
        return F.cross_entropy(torch.func.functional_call(model, chunks, (x,)), y)

    H = torch.autograd.functional.hessian(flat_loss, flat)
    eig = torch.linalg.eigvalsh(H)
    top = eig[eig.abs().argmax()]  # power iteration finds the largest magnitude
    out = hessian_top_eigenvalue(model, cross_entropy_loss(x, y), iters=1000, tol=1e-12)
    assert out["eigenvalue"] == pytest.approx(float(top), rel=1e-5)


def test_report_restores_mode_and_parameters_and_chunked_loss_matches():
    model = _tiny_model().train()
    x, y = torch.randn(10, 1, 6, dtype=torch.float64), torch.randint(0, 4, (10,))
    before = [p.detach().clone() for p in model.parameters()]
    full, chunked = cross_entropy_loss(x, y), cross_entropy_loss(x, y, batch_size=3)
    assert full(model).item() == pytest.approx(chunked(model).item(), rel=1e-12)
    report = sharpness_report(model, chunked, rho=0.05, n_random=3, hessian_iters=5)
    assert model.training
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
    for key in ("hessian_top_eigenvalue", "random_increase_mean", "adversarial_increase", "loss"):
        assert math.isfinite(report[key]), key
    assert report["adversarial_increase"] > report["random_increase_mean"]  # the gradient direction is worse


def test_refuses_a_model_attached_to_the_engine():
    from dpsat_fast.engine import BookKeepingEngine

    model = _tiny_model()
    engine = BookKeepingEngine(model, max_grad_norm=1.0)
    x, y = torch.randn(4, 1, 6, dtype=torch.float64), torch.randint(0, 4, (4,))
    with pytest.raises(RuntimeError, match="detach"):
        hessian_top_eigenvalue(model, cross_entropy_loss(x, y))
    engine.detach()
    assert hessian_top_eigenvalue(model, cross_entropy_loss(x, y), iters=3)["iterations"] >= 2

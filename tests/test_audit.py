"""Empirical privacy audit (white-box canaries, Gaussian-DP lower bound on ε) and the user-facing
neighbour-replay self-test.

The canary audits use fresh OS noise keys, so they are statistical: at confidence 0.99 (each
Clopper–Pearson bound at 0.5%) and 1000+1000 trials, a correct release fails the audit with probability
≈ 2·10⁻⁴ (simulated), while half the noise (μ = 2 against the claimed μ = 1) or no clipping fails it with
probability ≈ 0.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpsat_fast.accounting import PrivacyAccountant, compute_epsilon
from dpsat_fast.audit import (PrivacySelfTestError, cancellation_setup, canary_audit, clopper_pearson, gdp_delta,
                              gdp_epsilon, privacy_self_test)
from dpsat_fast.clipping import FlatClipping
from dpsat_fast.engine import BookKeepingEngine
from dpsat_fast.optim import DPOptimizer, DPSAT
from dpsat_fast.validation import PrivacyConfigError

SIGMA, DELTA, TRIALS, CONFIDENCE = 1.0, 1e-5, 1000, 0.99


def _audit(canary="dirac", **kw):
    kw = {"noise_multiplier": SIGMA, "delta": DELTA, "trials": TRIALS, "confidence": CONFIDENCE, **kw}
    result = canary_audit(canary, **kw)
    print(result)
    return result


# -- the statistics ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.7, 1.0, 2.0])
def test_gdp_epsilon_equals_pld_of_one_gaussian_release(sigma):
    """One Gaussian release with sensitivity C and noise σC is exactly (1/σ)-GDP: the conversion must
    reproduce dp-accounting's PLD ε (which rounds pessimistically, by < 1e-3 here)."""
    eps_pld = compute_epsilon(sigma, 1.0, 1, DELTA)
    eps_gdp = gdp_epsilon(1.0 / sigma, DELTA)
    assert eps_gdp == pytest.approx(eps_pld, rel=1e-3, abs=1e-3)
    assert eps_gdp <= eps_pld + 1e-9
    assert gdp_delta(eps_gdp, 1.0 / sigma) == pytest.approx(DELTA, rel=1e-6)
    assert gdp_epsilon(0.0, DELTA) == 0.0 and gdp_epsilon(-1.0, DELTA) == 0.0
    assert gdp_epsilon(2.0 / sigma, DELTA) > eps_gdp


def test_clopper_pearson_bounds():
    lo, hi = clopper_pearson(np.array([0, 500]), 500, 0.005)
    assert lo[0] == 0.0 and hi[1] == 1.0
    assert hi[0] == pytest.approx(1 - 0.005 ** (1 / 500), rel=1e-9)  # no successes in n: 1 − α^(1/n)
    assert lo[1] == pytest.approx(0.005 ** (1 / 500), rel=1e-9)
    lo, hi = clopper_pearson(250, 500, 0.005)
    assert 0.43 < lo < 0.5 < hi < 0.57


# -- canary audits of the real code path and of broken variants -----------------------------------------


def test_audit_real_code_dirac_canary():
    r = _audit("dirac")
    assert r.epsilon_claimed == pytest.approx(compute_epsilon(SIGMA, 1.0, 1, DELTA))
    assert r.canary_grad_norm == pytest.approx(10.0)  # far above C: the clipping is what the audit sees
    assert r.mu_lower > 0  # the canary is seen at all (the statistic is not blind)
    assert r.epsilon_lower <= r.epsilon_claimed, r


@pytest.mark.parametrize("clipping,loss_reduction", [("automatic", "sum"), ("per_layer", "mean")])
def test_audit_real_code_other_paths(clipping, loss_reduction):
    r = _audit("dirac", clipping=clipping, loss_reduction=loss_reduction)
    assert r.epsilon_lower <= r.epsilon_claimed, r


def test_audit_catches_halved_noise(monkeypatch):
    """Broken variant (a): the optimizer adds half the noise it accounts for."""
    real = DPOptimizer.noise_std
    monkeypatch.setattr(DPOptimizer, "noise_std", property(lambda self: 0.5 * real.fget(self)))
    r = _audit("dirac")
    assert r.epsilon_lower > r.epsilon_claimed, r


def test_audit_catches_missing_clipping(monkeypatch):
    """Broken variant (b): the clipping style returns ones (no clipping)."""
    monkeypatch.setattr(FlatClipping, "scales", lambda self, sq: {k: torch.ones_like(v) for k, v in sq.items()})
    r = _audit("dirac")
    assert r.epsilon_lower > r.epsilon_claimed, r


def test_cancellation_canary_defeats_a_naive_fp32_ghost_norm():
    """The canary of the next test is a real attack: its true gradient norm is 100·C, while the fp32 Gram
    formula Σ_{t,s}(a_t·a_s)(g_t·g_s) gives ≈ 0 (so a naive engine would not clip it)."""
    setup = cancellation_setup(1.0)
    x, w = setup.canary
    assert x.dtype == torch.float32 and x.shape == (1, 2, 16)
    true = torch.einsum("btp,btd->bpd", w.double(), x.double()).flatten(1).norm(dim=1)
    assert true.item() == pytest.approx(100.0, rel=1e-3)
    gram_a, gram_g = x @ x.transpose(1, 2), w @ w.transpose(1, 2)  # fp32, as a ghost-norm kernel would
    naive = (gram_a * gram_g).sum((1, 2))
    assert naive.abs().item() < 1.0  # vs the true 1e4


def test_audit_real_code_cancellation_canary():
    """Variant (c) on the real code: a canary whose per-position output gradients cancel must still be
    clipped to C. (The fp32 ghost norm of this canary is ≈ 0; an engine that trusts it releases a
    100·C contribution and fails this audit with ε_lower ≈ 30.)"""
    r = _audit("cancellation")
    assert r.canary_grad_norm == pytest.approx(100.0, rel=1e-3)
    assert r.epsilon_lower <= r.epsilon_claimed, r


# -- neighbour-replay self-test: models and losses that are private ---------------------------------------


def _ce(reduction="mean"):
    return lambda model, b: F.cross_entropy(model(b[0]), b[1], reduction=reduction)


class EmbeddingBag(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.fc = nn.Linear(6, 3)

    def forward(self, idx):
        return self.fc(self.emb(idx).mean(1))


def _private_cases():
    g = torch.Generator().manual_seed(0)
    mlp = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    conv = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 5 * 5, 3))
    x = torch.randn(8, 6, generator=g)
    xc = torch.randn(6, 2, 5, 5, generator=g)
    idx = torch.randint(0, 20, (7, 5), generator=g)
    idx[0, :] = 3  # repeated indices
    return {
        "mlp-mean": (mlp, _ce("mean"), (x, torch.randint(0, 3, (8,), generator=g)), "mean"),
        "mlp-sum": (mlp, _ce("sum"), (x, torch.randint(0, 3, (8,), generator=g)), "sum"),
        "conv-groupnorm-mean": (conv, _ce("mean"), (xc, torch.randint(0, 3, (6,), generator=g)), "mean"),
        "conv-groupnorm-sum": (conv, _ce("sum"), (xc, torch.randint(0, 3, (6,), generator=g)), "sum"),
        "embedding-mean": (EmbeddingBag(), _ce("mean"), (idx, torch.randint(0, 3, (7,), generator=g)), "mean"),
        "embedding-dict-sum": (EmbeddingBag(), lambda m, b: F.cross_entropy(m(b["x"]), b["y"], reduction="sum"),
                               {"x": idx, "y": torch.randint(0, 3, (7,), generator=g)}, "sum"),
    }


@pytest.mark.parametrize("case", list(_private_cases()))
@pytest.mark.parametrize("C", [0.1, 10.0])
def test_self_test_passes_on_per_example_models(case, C):
    model, loss_fn, batch, reduction = _private_cases()[case]
    before = copy.deepcopy(model.state_dict())
    report = privacy_self_test(model, loss_fn, batch, max_grad_norm=C, loss_reduction=reduction)
    assert report.passed and report.sensitivity == C
    assert report.examples == list(range(len(batch[0] if not isinstance(batch, dict) else batch["y"])))
    assert 0.1 < report.worst_ratio <= 1 + 1e-3  # the bound is met, and the test measured something
    text = str(report)
    assert "PASSED" in text and f"C = {C:g}" in text and "worst ratio" in text
    for k, v in model.state_dict().items():  # weights untouched, model detached again
        assert torch.equal(v, before[k]), k
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_self_test_runs_dropout_layers_in_eval_and_restores_modes():
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)).train()
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    report = privacy_self_test(model, _ce(), (x, y), max_grad_norm=1.0)
    assert report.passed
    assert all(m.training for m in model.modules())


class CountingLinear(nn.Module):
    """A forward that updates a buffer (state a replay must not leave behind)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.fc(x)


def test_self_test_restores_buffers_and_gradients():
    model = CountingLinear()
    model.fc.weight.grad = torch.full_like(model.fc.weight, 7.0)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    assert privacy_self_test(model, _ce(), (x, y), max_grad_norm=1.0).passed
    assert model.calls.item() == 0
    assert torch.equal(model.fc.weight.grad, torch.full_like(model.fc.weight, 7.0)) and model.fc.bias.grad is None


def test_self_test_samples_examples_of_large_batches():
    model = nn.Linear(4, 2)
    x, y = torch.randn(40, 4), torch.randint(0, 2, (40,))
    report = privacy_self_test(model, _ce(), (x, y), max_grad_norm=1.0, max_examples=5)
    assert report.passed and len(report.examples) == 5 and report.batch_size == 40
    report = privacy_self_test(model, _ce(), (x, y), max_grad_norm=1.0, examples=[0, 39])
    assert report.examples == [0, 39]


# -- neighbour-replay self-test: models and losses that couple examples ----------------------------------


def _centred_loss(model, x):
    f = model(x)
    return (f - f.mean(0, keepdim=True)).pow(2).sum(1).mean()


def _contrastive_loss(model, pairs):
    z1 = F.normalize(model(pairs[:, 0]), dim=1)
    z2 = F.normalize(model(pairs[:, 1]), dim=1)
    return F.cross_entropy(z1 @ z2.T / 0.1, torch.arange(len(pairs)))


class BatchCentring(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(x - x.mean(0))


def _coupled_cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 6, generator=g)
    return {
        "loss-centred-on-batch-mean": (nn.Linear(6, 4), _centred_loss, x),
        "contrastive-loss": (nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)), _contrastive_loss,
                             torch.randn(8, 2, 6, generator=g)),
        "model-mixes-examples": (BatchCentring(), _ce(), (x, torch.randint(0, 3, (8,), generator=g))),
    }


@pytest.mark.parametrize("case", list(_coupled_cases()))
def test_self_test_fails_loudly_on_coupled_examples(case):
    model, loss_fn, batch = _coupled_cases()[case]
    with pytest.raises(PrivacySelfTestError) as info:
        privacy_self_test(model, loss_fn, batch, max_grad_norm=1.0)
    report = info.value.report
    assert not report.passed
    assert report.worst_ratio > 1.0 + 1e-3 and report.violations  # a contribution above C, measured
    assert report.coupled
    message = str(info.value)
    assert "FAILED" in message and "C = 1" in message and f"worst ratio ‖Δ‖/bound = {report.worst_ratio:.4f}" in message
    assert "mean" in message and "contrastive" in message and "BatchNorm" in message and "sequence-first" in message
    assert isinstance(info.value, PrivacyConfigError)
    assert not any("forward" in m.__dict__ for m in model.modules())  # the temporary engine is detached


def test_self_test_catches_coupling_below_the_bound():
    """A centred loss with a large C: no contribution exceeds C on this batch, but removing an example changes
    the others' gradients (Δ ≠ the example's own contribution): the guarantee does not hold, and the test says
    so."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 6, generator=g) + 3
    model = nn.Linear(6, 4)
    with pytest.raises(PrivacySelfTestError, match="coupled") as info:
        privacy_self_test(model, _centred_loss, x, max_grad_norm=100.0)
    report = info.value.report
    assert not report.violations and report.worst_ratio < 1 and report.coupled
    assert "COUPLED" in str(report)


def test_self_test_reports_without_raising_when_asked():
    model, loss_fn, batch = _coupled_cases()["model-mixes-examples"]
    report = privacy_self_test(model, loss_fn, batch, max_grad_norm=1.0, raise_on_failure=False)
    assert not report.passed and "FAILED" in str(report)


def test_self_test_refuses_batches_that_are_not_example_first():
    model = nn.Linear(6, 3)
    x, y = torch.randn(5, 4, 6), torch.randint(0, 3, (4,))  # [T, B, D] sequence-first input, labels [B]
    with pytest.raises(PrivacyConfigError, match="Sequence-first"):
        privacy_self_test(model, lambda m, b: F.cross_entropy(m(b[0]).mean(0), b[1]), (x, y), max_grad_norm=1.0)


def test_self_test_refuses_random_losses():
    model = nn.Linear(6, 3)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    with pytest.raises(PrivacyConfigError, match="changes with the random seed"):
        privacy_self_test(model, lambda m, b: F.cross_entropy(F.dropout(m(b[0]), 0.5), b[1]), (x, y),
                          max_grad_norm=1.0)


# -- neighbour-replay self-test with an attached engine: nothing of the run is disturbed -----------------


# bit-for-bit comparisons of two runs need a fixed noise key (never private; the library warns)
FIXED_NOISE_KEY = pytest.mark.filterwarnings("ignore:.*noise key is fixed")


def _run(opt_cls, *, self_test_between, **opt_kw):
    """Two private steps with a fixed noise seed; optionally the self-test between them (attached engine)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(2)]
    engine = BookKeepingEngine(model, max_grad_norm=0.5)
    accountant = PrivacyAccountant("pld")
    opt = opt_cls(torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9), engine=engine, noise_multiplier=1.0,
                  expected_batch_size=8, seed=11, accountant=accountant, sample_rate=0.1, **opt_kw)
    state = {}
    for k, (x, y) in enumerate(batches):
        if k == 1 and self_test_between:
            weights = [p.detach().clone() for p in model.parameters()]
            grads = [p.grad for p in model.parameters()]
            offset, steps, planner = opt.noise_offset, len(accountant), engine.noise_planner
            rng = torch.get_rng_state()
            report = privacy_self_test(model, _ce(), (x, y), engine=engine)
            assert report.passed and report.sensitivity == 0.5
            assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
            assert all(p.grad is gr for p, gr in zip(model.parameters(), grads))
            assert opt.noise_offset == offset and len(accountant) == steps and engine.noise_planner == planner
            assert torch.equal(torch.get_rng_state(), rng)
            assert not engine.summed_grads
            state["report"] = report
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()], len(accountant), state


@FIXED_NOISE_KEY
@pytest.mark.parametrize("opt_cls,kw", [(DPOptimizer, {}), (DPSAT, {"rho": 0.05})])
def test_self_test_with_attached_engine_does_not_disturb_the_run(opt_cls, kw):
    ref, ref_steps, _ = _run(opt_cls, self_test_between=False, **kw)
    got, steps, state = _run(opt_cls, self_test_between=True, **kw)
    assert steps == ref_steps == 2
    for a, b in zip(ref, got):
        assert torch.equal(a, b)  # bit for bit: no noise drawn, no weight or perturbation disturbed
    assert "PASSED" in str(state["report"])


@FIXED_NOISE_KEY
def test_self_test_accepts_the_engine_as_first_argument_and_refuses_a_half_done_step():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    ref_model = copy.deepcopy(model)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    results = []
    for m, test_in_between in [(ref_model, False), (model, True)]:
        engine = BookKeepingEngine(m, max_grad_norm=1.0)
        opt = DPOptimizer(torch.optim.SGD(m.parameters(), lr=0.5), engine=engine, noise_multiplier=1.0,
                          expected_batch_size=8, seed=5)
        if test_in_between:
            assert privacy_self_test(engine, _ce(), (x, y)).passed
            with pytest.raises(PrivacyConfigError, match="settings"):
                privacy_self_test(engine, _ce(), (x, y), max_grad_norm=2.0)
        F.cross_entropy(m(x), y).backward()
        if test_in_between:
            with pytest.raises(PrivacyConfigError, match="half done") as info:
                privacy_self_test(model, _ce(), (x, y), engine=engine)
            assert not isinstance(info.value, PrivacySelfTestError)
        opt.step()
        results.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)  # the pending clipped sums survived the refused call


def test_self_test_needs_a_clipping_norm_or_the_attached_engine():
    model, batch = nn.Linear(3, 2), (torch.randn(4, 3), torch.randint(0, 2, (4,)))
    with pytest.raises(PrivacyConfigError, match="max_grad_norm"):
        privacy_self_test(model, _ce(), batch)
    engine = BookKeepingEngine(model, max_grad_norm=1.0)
    with pytest.raises(PrivacyConfigError, match="engine="):
        privacy_self_test(model, _ce(), batch, max_grad_norm=1.0)
    assert privacy_self_test(model, _ce(), batch, engine=engine).passed
    engine.detach()

"""Tests for dpsat_fast.accounting.

ε values are checked against dp-accounting's published reference and against
direct dp_accounting calls; the adapter's own logic (event construction,
composition counts, calibration, ledger, validation) is what is under test.
"""

from __future__ import annotations

import io
import math

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting import pld, rdp

from dpsat_fast import accounting
from dpsat_fast.accounting import (
    RDP_ORDERS,
    PrivacyAccountant,
    calibrate_noise_multiplier,
    compute_epsilon,
)

DELTA = 1e-5
# dp-accounting's published reference: CIFAR-10-like, 100 epochs.
REF_SIGMA, REF_Q, REF_STEPS = 1.0, 256 / 50000, int(100 * 50000 / 256)


def _direct_epsilon(entries, delta, accountant):
    """ε straight from dp_accounting, bypassing the adapter (and its cache)."""
    acc = pld.PLDAccountant() if accountant == "pld" else rdp.RdpAccountant(orders=RDP_ORDERS)
    events = [
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), c
        )
        for s, q, c in entries
    ]
    acc.compose(dp_accounting.ComposedDpEvent(events))
    return acc.get_epsilon(delta)


# ---------------------------------------------------------------------------
# Reference values
# ---------------------------------------------------------------------------


def test_reference_rdp():
    eps = compute_epsilon(REF_SIGMA, REF_Q, REF_STEPS, DELTA, accountant="rdp")
    assert eps == pytest.approx(4.52, rel=0.01)
    # dp-accounting's default order grid gives the published number too.
    acc = rdp.RdpAccountant()
    acc.compose(
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(REF_Q, dp_accounting.GaussianDpEvent(REF_SIGMA)), REF_STEPS
        )
    )
    assert eps <= acc.get_epsilon(DELTA) + 1e-9  # our grid is at least as fine near the optimum


def test_reference_pld():
    eps = compute_epsilon(REF_SIGMA, REF_Q, REF_STEPS, DELTA)  # "pld" is the default
    assert eps == pytest.approx(4.17, rel=0.01)
    # PLD is the tighter accountant.
    assert eps < compute_epsilon(REF_SIGMA, REF_Q, REF_STEPS, DELTA, accountant="rdp")


def test_subsampling_matters():
    """ε of the subsampled mechanism is far below that of the full-batch one."""
    sub = compute_epsilon(REF_SIGMA, REF_Q, 1000, DELTA, accountant="rdp")
    full = compute_epsilon(REF_SIGMA, 1.0, 1000, DELTA, accountant="rdp")
    assert sub < full / 10


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_matches_direct_dp_accounting_random_configs(accountant):
    rng = np.random.default_rng(1234)
    for _ in range(4):
        sigma = float(rng.uniform(2.0, 4.0))
        q = float(10 ** rng.uniform(-3, -1))
        steps = int(rng.integers(1, 2000))
        delta = float(10 ** rng.uniform(-7, -3))
        got = compute_epsilon(sigma, q, steps, delta, accountant=accountant)
        want = _direct_epsilon([(sigma, q, steps)], delta, accountant)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12), (sigma, q, steps, delta)


def test_zero_steps_is_zero():
    assert compute_epsilon(1.0, 0.01, 0, DELTA) == 0.0
    assert compute_epsilon(1.0, 0.01, 0, DELTA, accountant="rdp") == 0.0
    assert PrivacyAccountant().get_epsilon(DELTA) == 0.0


def test_cache_hits():
    accounting._epsilon_cached.cache_clear()
    accounting._composed_accountant.cache_clear()
    compute_epsilon(2.0, 0.01, 123, DELTA, accountant="rdp")
    compute_epsilon(2.0, 0.01, 123, DELTA, accountant="rdp")
    info = accounting._epsilon_cached.cache_info()
    assert info.misses == 1 and info.hits == 1


# ---------------------------------------------------------------------------
# Monotonicity and composition
# ---------------------------------------------------------------------------

# σ ≥ 1.5 keeps PLD fast (its cost grows quickly as σ shrinks).
BASE = dict(noise_multiplier=2.5, sample_rate=0.01, steps=300, delta=DELTA)


def _eps(acc, **kw):
    args = {**BASE, **kw}
    return compute_epsilon(args["noise_multiplier"], args["sample_rate"], args["steps"], args["delta"], acc)


def _strictly_increasing(xs):
    return all(a < b for a, b in zip(xs, xs[1:]))


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_monotone_in_steps_and_q(accountant):
    assert _strictly_increasing([_eps(accountant, steps=t) for t in (1, 10, 100, 1000)])
    assert _strictly_increasing([_eps(accountant, sample_rate=q) for q in (0.001, 0.01, 0.05, 0.2)])


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_monotone_in_sigma_and_delta(accountant):
    by_sigma = [_eps(accountant, noise_multiplier=s) for s in (1.5, 2.5, 4.0, 10.0)]
    assert all(a > b for a, b in zip(by_sigma, by_sigma[1:]))
    by_delta = [_eps(accountant, delta=d) for d in (1e-8, 1e-6, 1e-4, 1e-2)]
    assert all(a > b for a, b in zip(by_delta, by_delta[1:]))


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_two_compositions_per_step_is_doubled_steps(accountant):
    sigma, q, steps = 2.5, 0.02, 250
    two = compute_epsilon(sigma, q, steps, DELTA, accountant, compositions_per_step=2)
    assert two == pytest.approx(_direct_epsilon([(sigma, q, 2 * steps)], DELTA, accountant), rel=1e-9)
    assert two == pytest.approx(compute_epsilon(sigma, q, 2 * steps, DELTA, accountant), rel=1e-12)
    assert two > compute_epsilon(sigma, q, steps, DELTA, accountant) * 1.2

    led = PrivacyAccountant(accountant)
    for _ in range(steps):
        led.step(sigma, q, num_compositions=2)
    assert led.steps == steps  # logical steps, not compositions
    assert led.get_epsilon(DELTA) == pytest.approx(two, rel=1e-12)


# ---------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------

# (target ε, q, steps) chosen so that the calibrated σ is ≈ 3 (fast PLD).
@pytest.mark.parametrize("accountant", ["rdp", "pld"])
@pytest.mark.parametrize("target, q, steps", [(1.0, 0.02, 2000), (3.0, 0.05, 2000), (8.0, 0.1, 3000)])
def test_calibration_hits_target_from_below(accountant, target, q, steps):
    sigma = calibrate_noise_multiplier(target, DELTA, q, steps, accountant=accountant)
    eps = compute_epsilon(sigma, q, steps, DELTA, accountant)
    assert eps <= target
    assert eps >= 0.99 * target
    # Independent check, bypassing the adapter's cache.
    assert _direct_epsilon([(sigma, q, steps)], DELTA, accountant) <= target
    # Slightly less noise would overshoot (σ is not needlessly large).
    assert compute_epsilon(sigma * 0.97, q, steps, DELTA, accountant) > target


CAL_Q, CAL_STEPS = 0.05, 2000


def test_calibration_dpsam_needs_more_noise():
    one = calibrate_noise_multiplier(3.0, DELTA, CAL_Q, CAL_STEPS, accountant="rdp")
    two = calibrate_noise_multiplier(3.0, DELTA, CAL_Q, CAL_STEPS, accountant="rdp", compositions_per_step=2)
    assert two > one * 1.2
    eps = compute_epsilon(two, CAL_Q, CAL_STEPS, DELTA, "rdp", compositions_per_step=2)
    assert 0.99 * 3.0 <= eps <= 3.0


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_calibration_unreachable_target_raises(accountant):
    # Full batches for 100k steps: even σ = 1000 spends more than ε = 0.5.
    with pytest.raises(ValueError, match="unreachable"):
        calibrate_noise_multiplier(0.5, DELTA, 1.0, 100_000, accountant=accountant)


def test_calibration_absurdly_large_target_raises():
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate_noise_multiplier(1e7, DELTA, 0.001, 10, accountant="rdp")


@pytest.mark.parametrize("target", [0.0, -1.0, float("nan"), float("inf")])
def test_calibration_bad_target_raises(target):
    with pytest.raises(ValueError, match="target_epsilon"):
        calibrate_noise_multiplier(target, DELTA, 0.01, 100)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(delta=0.0), "delta"),
        (dict(sample_rate=1.5), "sample_rate"),
        (dict(steps=0), "steps"),
        (dict(accountant="moments"), "accountant"),
        (dict(rtol=0.0), "rtol"),
        (dict(compositions_per_step=0), "compositions_per_step"),
    ],
)
def test_calibration_bad_args_raise(kwargs, name):
    args = dict(target_epsilon=3.0, delta=DELTA, sample_rate=0.01, steps=100)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        calibrate_noise_multiplier(**args)


# ---------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------

BAD_SIGMAS = [0.0, -1.0, float("nan"), float("inf"), -float("inf"), True, "1.0", None]
BAD_QS = [0.0, -0.1, 1.0000001, 2.0, float("nan"), float("inf"), None]
BAD_DELTAS = [0.0, -1e-5, 1.0, 1.5, float("nan"), None]
BAD_STEPS = [-1, 1.5, float("nan"), "10", None]


@pytest.mark.parametrize("sigma", BAD_SIGMAS)
def test_bad_sigma(sigma):
    with pytest.raises(ValueError, match="noise_multiplier"):
        compute_epsilon(sigma, 0.01, 10, DELTA)
    with pytest.raises(ValueError, match="noise_multiplier"):
        PrivacyAccountant().step(sigma, 0.01)


@pytest.mark.parametrize("q", BAD_QS)
def test_bad_sample_rate(q):
    with pytest.raises(ValueError, match="sample_rate"):
        compute_epsilon(1.0, q, 10, DELTA)
    with pytest.raises(ValueError, match="sample_rate"):
        PrivacyAccountant().step(1.0, q)


@pytest.mark.parametrize("delta", BAD_DELTAS)
def test_bad_delta(delta):
    with pytest.raises(ValueError, match="delta"):
        compute_epsilon(1.0, 0.01, 10, delta)
    led = PrivacyAccountant()
    led.step(1.0, 0.01)
    with pytest.raises(ValueError, match="delta"):
        led.get_epsilon(delta)


@pytest.mark.parametrize("steps", BAD_STEPS)
def test_bad_steps(steps):
    with pytest.raises(ValueError, match="steps"):
        compute_epsilon(1.0, 0.01, steps, DELTA)


def test_bad_accountant_and_compositions():
    with pytest.raises(ValueError, match="accountant"):
        compute_epsilon(1.0, 0.01, 10, DELTA, accountant="moments")
    with pytest.raises(ValueError, match="compositions_per_step"):
        compute_epsilon(1.0, 0.01, 10, DELTA, compositions_per_step=0)
    with pytest.raises(ValueError, match="mechanism"):
        PrivacyAccountant("moments")
    with pytest.raises(ValueError, match="num_compositions"):
        PrivacyAccountant().step(1.0, 0.01, num_compositions=0)


def test_valid_edge_inputs_accepted():
    assert compute_epsilon(np.float64(3.0), np.float32(0.5), np.int64(3), 1e-3) > 0
    assert compute_epsilon(3.0, 1.0, 1, DELTA, accountant="RDP") > 0  # q = 1 allowed, name case-insensitive


# ---------------------------------------------------------------------------
# Ledger
# ---------------------------------------------------------------------------


def _filled_ledger(mechanism="pld"):
    led = PrivacyAccountant(mechanism)
    for _ in range(3):
        led.step(2.5, 0.01)
    for _ in range(2):
        led.step(2.5, 0.02)
    led.step(4.0, 0.02, num_compositions=2)
    led.step(2.5, 0.01)
    return led


def test_ledger_merges_consecutive_equal_steps():
    led = _filled_ledger()
    assert led.steps == 7
    assert len(led) == 7
    assert led.history == [[2.5, 0.01, 3], [2.5, 0.02, 2], [4.0, 0.02, 2], [2.5, 0.01, 1]]
    # history is a copy
    led.history[0][2] = 100
    assert led.history[0][2] == 3


@pytest.mark.parametrize("mechanism", ["rdp", "pld"])
def test_ledger_epsilon_composes_all_entries(mechanism):
    led = _filled_ledger(mechanism)
    want = _direct_epsilon([(2.5, 0.01, 3), (2.5, 0.02, 2), (4.0, 0.02, 2), (2.5, 0.01, 1)], DELTA, mechanism)
    assert led.get_epsilon(DELTA) == pytest.approx(want, rel=1e-9)


def test_ledger_single_entry_matches_compute_epsilon():
    led = PrivacyAccountant("rdp")
    for _ in range(50):
        led.step(1.3, 0.02)
    assert led.history == [[1.3, 0.02, 50]]
    assert led.get_epsilon(DELTA) == compute_epsilon(1.3, 0.02, 50, DELTA, "rdp")


def _assert_plain(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert type(k) is str
            _assert_plain(v)
    elif isinstance(obj, list):
        for v in obj:
            _assert_plain(v)
    else:
        assert type(obj) in (str, int, float), type(obj)


@pytest.mark.filterwarnings("ignore::dpsat_fast.accounting.AccountantSubstitutionWarning")
@pytest.mark.parametrize("mechanism", ["rdp", "pld", "prv", "gdp"])
def test_state_dict_round_trip_weights_only(mechanism):
    led = _filled_ledger(mechanism)
    sd = led.state_dict()
    _assert_plain(sd)
    buf = io.BytesIO()
    torch.save({"accountant": sd}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)["accountant"]
    fresh = PrivacyAccountant()  # mechanism comes from the state
    fresh.load_state_dict(loaded)
    assert fresh.mechanism() == fresh.name == mechanism  # the requested name survives the round trip
    assert fresh.method == accounting.ACCOUNTANT_METHODS[mechanism]
    assert fresh.steps == led.steps
    assert fresh.history == led.history
    assert fresh.get_epsilon(DELTA) == led.get_epsilon(DELTA)
    # Resuming continues the ledger exactly like an uninterrupted run.
    fresh.step(2.5, 0.01)
    led.step(2.5, 0.01)
    assert fresh.history == led.history and fresh.steps == led.steps
    assert fresh.get_epsilon(DELTA) == led.get_epsilon(DELTA)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda sd: sd.pop("history"),
        lambda sd: sd.__setitem__("mechanism", "foo"),
        lambda sd: sd.__setitem__("steps", -1),
        lambda sd: sd["history"].append([0.0, 0.01, 1]),
        lambda sd: sd["history"].append([1.0, 1.5, 1]),
        lambda sd: sd["history"].append([1.0, 0.01, 0]),
        lambda sd: sd["history"].append([1.0, 0.01]),
        lambda sd: sd.__setitem__("version", 99),
        lambda sd: sd.__setitem__("version", True),
        lambda sd: sd.__setitem__("method", "rdp"),  # "pld" is not computed with RDP
        lambda sd: sd.__setitem__("history", "[]"),
        lambda sd: sd.update(version=1, mechanism="prv", method=None) or sd.pop("method"),  # v1 knew pld/rdp only
    ],
)
def test_load_state_dict_rejects_bad_state(mutate):
    sd = _filled_ledger().state_dict()
    mutate(sd)
    fresh = PrivacyAccountant()
    with pytest.raises(ValueError):
        fresh.load_state_dict(sd)
    assert fresh.steps == 0 and fresh.history == []  # unchanged on failure


def test_epsilon_is_finite_float():
    eps = compute_epsilon(2.0, 0.01, 100, DELTA)
    assert isinstance(eps, float) and math.isfinite(eps) and eps > 0


# ---------------------------------------------------------------------------
# Opacus' accountant names and interface (comparisons with Opacus itself are
# in test_opacus_accounting.py)
# ---------------------------------------------------------------------------

SUB_WARNING = accounting.AccountantSubstitutionWarning


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Forget which substitution warnings this process has already given."""
    monkeypatch.setattr(accounting, "_WARNED_SUBSTITUTIONS", set())


def test_accountant_names_and_methods():
    assert set(accounting.ACCOUNTANTS) == {"pld", "rdp", "prv", "gdp"}
    assert accounting.ACCOUNTANT_METHODS == {"pld": "pld", "rdp": "rdp", "prv": "pld", "gdp": "pld"}


@pytest.mark.filterwarnings("ignore::dpsat_fast.accounting.AccountantSubstitutionWarning")
@pytest.mark.parametrize("requested, method", [("pld", "pld"), ("rdp", "rdp"), ("PRV", "pld"), ("gdp", "pld")])
def test_mechanism_is_a_method_returning_the_requested_name(requested, method):
    led = PrivacyAccountant(requested)
    assert callable(led.mechanism)
    assert led.mechanism() == led.name == requested.lower()
    assert led.method == method
    with pytest.raises(AttributeError):
        led.name = "rdp"  # read-only: name and method always agree
    with pytest.raises(AttributeError):
        led.method = "rdp"
    assert requested.lower() in repr(led)


def test_prv_and_gdp_report_the_pld_epsilon(fresh_warnings):
    want = compute_epsilon(2.5, 0.01, 300, DELTA, "pld")
    assert compute_epsilon(2.5, 0.01, 300, DELTA, "prv") == want
    with pytest.warns(SUB_WARNING, match="under-report|several times less"):
        assert compute_epsilon(2.5, 0.01, 300, DELTA, "gdp") == want
    for name in ("prv", "gdp"):
        led = PrivacyAccountant(name)
        for _ in range(300):
            led.step(noise_multiplier=2.5, sample_rate=0.01)
        assert led.get_epsilon(DELTA) == want


def test_gdp_warns_once_per_process_and_prv_never(fresh_warnings):
    import warnings as _warnings

    with _warnings.catch_warnings(record=True) as caught:
        _warnings.simplefilter("always")
        PrivacyAccountant("prv")
        compute_epsilon(3.0, 0.01, 10, DELTA, "prv")
        PrivacyAccountant("gdp")
        PrivacyAccountant("gdp")
        compute_epsilon(3.0, 0.01, 10, DELTA, "gdp")
        calibrate_noise_multiplier(3.0, DELTA, 0.01, 10, accountant="gdp")
    subs = [w for w in caught if issubclass(w.category, SUB_WARNING)]
    assert len(subs) == 1 and "'gdp'" in str(subs[0].message)


@pytest.mark.filterwarnings("ignore::dpsat_fast.accounting.AccountantSubstitutionWarning")
@pytest.mark.parametrize("name", ["prv", "gdp"])
def test_calibration_with_opacus_names_is_pld_calibration(name):
    want = calibrate_noise_multiplier(3.0, DELTA, 0.05, 2000, accountant="pld")
    assert calibrate_noise_multiplier(3.0, DELTA, 0.05, 2000, accountant=name) == want
    led = PrivacyAccountant(name)
    assert calibrate_noise_multiplier(3.0, DELTA, 0.05, 2000, accountant=led.method) == want
    # ``accountant=ledger.mechanism`` (the method itself, as PrivacyEngine passed the old string attribute)
    assert calibrate_noise_multiplier(3.0, DELTA, 0.05, 2000, accountant=led.mechanism) == want
    with pytest.raises(ValueError, match="accountant"):
        calibrate_noise_multiplier(3.0, DELTA, 0.05, 2000, accountant=lambda: "pld")


def test_version_1_state_loads():
    """A state written before the Opacus names existed (version 1) loads unchanged."""
    v1 = {"version": 1, "mechanism": "rdp", "steps": 7, "non_private_steps": 0,
          "history": [[2.5, 0.01, 3], [2.5, 0.02, 2], [4.0, 0.02, 2], [2.5, 0.01, 1]]}
    led = PrivacyAccountant()
    led.load_state_dict(v1)
    assert led.mechanism() == "rdp" and led.method == "rdp" and led.steps == 7
    assert led.get_epsilon(DELTA) == _filled_ledger("rdp").get_epsilon(DELTA)
    sd = led.state_dict()
    assert sd["version"] == 2 and sd["mechanism"] == "rdp" and sd["method"] == "rdp"
    no_version = {k: v for k, v in v1.items() if k not in ("version", "non_private_steps")}
    fresh = PrivacyAccountant("pld")
    fresh.load_state_dict(no_version)
    assert fresh.name == "rdp" and fresh.history == led.history


def test_keyword_step_and_opacus_history():
    led = PrivacyAccountant("rdp")
    for sigma, q in [(1.0, 0.01)] * 3 + [(1.5, 0.01)] * 2 + [(1.0, 0.01)]:
        led.step(noise_multiplier=sigma, sample_rate=q)
    # Opacus' (noise_multiplier, sample_rate, num_steps) entries, merged the same way.
    assert [tuple(e) for e in led.history] == [(1.0, 0.01, 3), (1.5, 0.01, 2), (1.0, 0.01, 1)]
    for sigma, q, n in led.history:  # unpacks like Opacus' tuples
        assert n >= 1
    assert len(led) == 6


def test_get_privacy_spent_conventions():
    rdp_led, pld_led = PrivacyAccountant("rdp"), PrivacyAccountant("pld")
    assert rdp_led.get_privacy_spent(delta=DELTA) == (0.0, 0.0)  # Opacus' RDP before any step
    assert pld_led.get_privacy_spent(delta=DELTA) == (0.0, None)
    for led in (rdp_led, pld_led):
        for _ in range(100):
            led.step(noise_multiplier=2.0, sample_rate=0.02)
    eps, alpha = rdp_led.get_privacy_spent(delta=DELTA)
    assert eps == rdp_led.get_epsilon(DELTA) == compute_epsilon(2.0, 0.02, 100, DELTA, "rdp")
    assert isinstance(alpha, float) and alpha in RDP_ORDERS
    # α attains ε: RDP at the single order α gives the same ε.
    single = rdp.RdpAccountant(orders=[alpha])
    single.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(2.0)), 100))
    assert eps == pytest.approx(single.get_epsilon(DELTA), rel=1e-12)
    eps_pld, none = pld_led.get_privacy_spent(delta=DELTA)
    assert none is None and eps_pld == pld_led.get_epsilon(DELTA)
    rdp_led.record_non_private_step()
    eps, alpha = rdp_led.get_privacy_spent(delta=DELTA)
    assert eps == math.inf and math.isnan(alpha)
    with pytest.raises(TypeError):
        rdp_led.get_privacy_spent(DELTA)  # keyword-only, as Opacus


def test_opacus_query_keywords():
    led = PrivacyAccountant("rdp")
    for _ in range(50):
        led.step(2.0, 0.02)
    alphas = [1.5, 2.0, 4.0, 8.0, 16.0, 32.0]
    acc = rdp.RdpAccountant(orders=alphas)
    acc.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(2.0)), 50))
    want_eps, want_alpha = acc.get_epsilon_and_optimal_order(DELTA)
    assert led.get_epsilon(DELTA, alphas=alphas) == pytest.approx(want_eps, rel=1e-12)
    assert led.get_privacy_spent(delta=DELTA, alphas=alphas) == pytest.approx((want_eps, want_alpha), rel=1e-12)
    assert led.get_epsilon(DELTA, alphas=alphas) >= led.get_epsilon(DELTA)  # the default grid is finer
    pld_led = PrivacyAccountant("prv")
    pld_led.step(2.0, 0.02)
    base = pld_led.get_epsilon(DELTA)
    # PRV's precision knobs and alphas are accepted and ignored (as Opacus' PRV ignores alphas).
    assert pld_led.get_epsilon(DELTA, eps_error=0.1, delta_error=1e-9, alphas=alphas, poisson=True) == base
    for bad in (dict(poisson=False), dict(eps_error=0.0), dict(delta_error=float("nan")),
                dict(alphas=[0.5, 2.0]), dict(alphas=[]), dict(alphas="2.0"), dict(alphas=[2.0, float("inf")])):
        with pytest.raises(ValueError):
            led.get_epsilon(DELTA, **bad)
    with pytest.raises(TypeError, match="unexpected"):
        led.get_epsilon(DELTA, orders=alphas)


def _hooked_optimizer(ledger_of_optimizer=None, sample_rate=0.1):
    from dpsat_fast.engine import BookKeepingEngine
    from dpsat_fast.optim import DPOptimizer

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    engine = BookKeepingEngine(model, max_grad_norm=1.0)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), engine=engine, noise_multiplier=1.3,
                      expected_batch_size=4.0, accountant=ledger_of_optimizer,
                      sample_rate=sample_rate if ledger_of_optimizer is not None else None)
    return model, opt


def _train_steps(model, opt, steps):
    for _ in range(steps):
        model(torch.randn(4, 4)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()


def test_optimizer_hook_fn_records_each_release_once():
    ledger = PrivacyAccountant("rdp")
    model, opt = _hooked_optimizer()
    opt.step_hook = ledger.get_optimizer_hook_fn(sample_rate=0.1)
    _train_steps(model, opt, 3)
    assert ledger.steps == 3 and ledger.history == [[1.3, 0.1, 3]]
    # An optimizer that accounts into this very ledger is not counted twice.
    ledger2 = PrivacyAccountant("rdp")
    model, opt = _hooked_optimizer(ledger2)
    opt.step_hook = ledger2.get_optimizer_hook_fn(sample_rate=0.1)
    _train_steps(model, opt, 3)
    assert ledger2.steps == 3 and ledger2.history == [[1.3, 0.1, 3]]
    with pytest.raises(ValueError, match="sample_rate"):
        ledger.get_optimizer_hook_fn(sample_rate=0.0)


def test_optimizer_hook_fn_conventions():
    from types import SimpleNamespace

    from dpsat_fast.optim import DPSAM

    ledger = PrivacyAccountant("rdp")
    hook = ledger.get_optimizer_hook_fn(sample_rate=0.01)
    hook(SimpleNamespace(noise_multiplier=2.0, accumulated_iterations=3))  # Opacus: q · accumulated_iterations
    hook(SimpleNamespace(noise_multiplier=2.0))
    sam = DPSAM.__new__(DPSAM)  # attributes only: the hook reads σ and the class
    sam.__dict__.update(_noise_multiplier=2.0, accountant=None)
    hook(sam)
    assert ledger.history == [[2.0, 0.03, 1], [2.0, 0.01, 3]] and ledger.steps == 3  # DP-SAM: two compositions
    hook(SimpleNamespace(noise_multiplier=0.0))
    assert ledger.get_epsilon(DELTA) == math.inf and ledger.steps == 4

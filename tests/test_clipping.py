"""Clipping styles (issue 6): flat, automatic, per-layer and group-wise, each against a float64 per-example
reference, with its sensitivity bound, neighbour replay and the noise it implies."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpsat_fast.clipping import (AutomaticClipping, FlatClipping, GroupWiseClipping, PerLayerClipping,
                                 make_clipping, module_of)
from dpsat_fast.engine import BookKeepingEngine
from dpsat_fast.optim import DPOptimizer
from dpsat_fast.validation import PrivacyConfigError
from oracle import engine_results, neighbour_update_distance, per_example_grads


class Net(nn.Module):
    """Conv + GroupNorm + Linear with biases: four modules, eight parameters."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.fc1 = nn.Linear(4 * 16, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.norm(self.conv(x))).flatten(1)
        return self.fc2(F.relu(self.fc1(h)))


GROUPS = {"features": ["conv.weight", "conv.bias", "norm.weight", "norm.bias"],
          "head": ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]}


def _styles(C):
    return {
        "flat": FlatClipping(C),
        "automatic": AutomaticClipping(C, stability=0.01),
        "per_layer": PerLayerClipping(C),
        "per_layer_by_size": PerLayerClipping(C, weights="size"),
        "group_wise": GroupWiseClipping(C, GROUPS, weights={"features": 1.0, "head": 3.0}),
    }


STYLE_NAMES = list(_styles(1.0))


def _reference_factors(style_name, grads, C, sizes):
    """Per parameter key: [B] clip factors from per-example grads, written out from the definitions."""
    sq = {k: g.flatten(1).pow(2).sum(1) for k, g in grads.items()}
    if style_name in ("flat", "automatic"):
        total = torch.stack(list(sq.values())).sum(0).sqrt()
        c = (C / (total + 1e-6)).clamp(max=1) if style_name == "flat" else C / (total + 0.01)
        return {k: c for k in grads}
    if style_name == "group_wise":
        group_of = {k: g for g, keys in GROUPS.items() for k in keys}
        weights = {"features": 1.0, "head": 3.0}
    else:
        group_of = {k: module_of(k) for k in grads}
        groups = set(group_of.values())
        weights = ({g: 1.0 for g in groups} if style_name == "per_layer" else
                   {g: float(sum(sizes[k] for k in grads if group_of[k] == g)) for g in groups})
    total_w = sum(weights.values())
    out = {}
    for g in set(group_of.values()):
        budget = C * math.sqrt(weights[g] / total_w)
        norm = torch.stack([sq[k] for k in grads if group_of[k] == g]).sum(0).sqrt()
        c = (budget / (norm + 1e-6)).clamp(max=1)
        out.update({k: c for k in grads if group_of[k] == g})
    return out


@pytest.mark.parametrize("style_name", STYLE_NAMES)
def test_clipped_sums_equal_the_per_example_reference(style_name):
    torch.manual_seed(0)
    model = Net().double()
    x = torch.randn(7, 2, 4, 4, dtype=torch.float64)
    # per-example loss weights over four decades: gradient norms from far below to far above C
    weights = torch.randn(7, 3, dtype=torch.float64) * torch.logspace(-3, 1, 7, dtype=torch.float64).view(7, 1)
    C = 0.8
    grads = per_example_grads(model, [x], weights)
    sizes = {k: p.numel() for k, p in model.named_parameters()}
    factors = _reference_factors(style_name, grads, C, sizes)
    _, sums = engine_results(model, [x], weights, C, clipping=_styles(C)[style_name])
    some_clipped = False
    for k, g in grads.items():
        ref = torch.tensordot(factors[k], g, dims=1)
        torch.testing.assert_close(sums[k].double(), ref, rtol=1e-9, atol=1e-12, msg=k)
        some_clipped |= bool((factors[k] < 1).any()) and bool((factors[k] > 0.99).any())
    if style_name != "automatic":
        assert some_clipped  # the batch exercises both sides of the clip


def _single_example_sums(model, x, style):
    engine = BookKeepingEngine(model, max_grad_norm=style.max_grad_norm, loss_reduction="sum", clipping=style)
    try:
        model(x).sum().backward()
        return {engine.param_keys[p]: engine.pop_summed_grad(p) for p in engine.params}
    finally:
        engine.detach()


@pytest.mark.parametrize("style_name", STYLE_NAMES)
def test_sensitivity_bound_per_style(style_name):
    """One example's whole contribution has norm ≤ C (= the style's sensitivity), each group's ≤ its budget."""
    C = 0.5
    model = Net().double()
    reached = 0.0
    for scale in [0.0, 1e-6, 1e-2, 1.0, 1e2, 1e4, 1e6]:
        style = _styles(C)[style_name]
        sums = _single_example_sums(model, scale * torch.randn(1, 2, 4, 4, dtype=torch.float64), style)
        total = math.sqrt(sum(s.double().pow(2).sum().item() for s in sums.values()))
        assert style.sensitivity == C
        assert total <= C * (1 + 1e-9), (scale, total)
        reached = max(reached, total)
        if isinstance(style, GroupWiseClipping):
            assert sum(b * b for b in style.budgets.values()) == pytest.approx(C * C, rel=1e-12)
            for g, budget in style.budgets.items():
                norm = math.sqrt(sum(s.double().pow(2).sum().item() for k, s in sums.items()
                                     if style.group_of[k] == g))
                assert norm <= budget * (1 + 1e-9), (g, norm, budget)
    assert reached > 0.98 * C  # a large example uses the whole budget (every group is clipped to its own)


@pytest.mark.parametrize("style_name", STYLE_NAMES)
def test_neighbour_replay_per_style(style_name):
    """Batches differing in one (outlier) example, same seed: the released updates differ by ≤ lr·C/B̄."""
    C, lr, expected_batch = 0.5, 0.3, 8.0
    torch.manual_seed(1)
    base = Net().double()
    x, y = torch.randn(6, 2, 4, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    outlier = 1e3 * torch.randn(1, 2, 4, 4, dtype=torch.float64)
    diff = neighbour_update_distance(base, x, y, outlier, C=C, lr=lr, expected_batch=expected_batch,
                                     engine_kwargs={"clipping": _styles(C)[style_name]})
    assert diff <= lr * C / expected_batch * (1 + 1e-9)
    assert diff > 0.3 * lr * C / expected_batch


def test_automatic_clipping_scale():
    """c_i = C/(‖g_i‖ + γ): every contribution is below C, and ‖c_i g_i‖ = C‖g_i‖/(‖g_i‖+γ) exactly."""
    C, gamma = 2.0, 0.01
    model = Net().double()
    for scale in [1e-3, 1.0, 1e3]:
        x = scale * torch.randn(1, 2, 4, 4, dtype=torch.float64)
        grads = per_example_grads(model, [x], torch.ones(1, 3, dtype=torch.float64))
        norm = math.sqrt(sum(g.pow(2).sum().item() for g in grads.values()))
        sums = _single_example_sums(model, x, AutomaticClipping(C, stability=gamma))
        total = math.sqrt(sum(s.double().pow(2).sum().item() for s in sums.values()))
        assert total == pytest.approx(C * norm / (norm + gamma), rel=1e-9)
        assert total < C


def test_group_wise_noise_is_sigma_times_c():
    """Per-layer clipping keeps the sensitivity C, so the optimizer's noise std is σ·C on every coordinate."""
    model = Net()
    engine = BookKeepingEngine(model, max_grad_norm=0.7, clipping="per_layer")
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), engine=engine, noise_multiplier=2.0,
                      expected_batch_size=1.0, seed=3)
    assert opt.noise_std == pytest.approx(1.4)
    assert engine.clipping.budgets == pytest.approx({m: 0.7 / 2 for m in ("conv", "norm", "fc1", "fc2")})
    opt.step()  # empty batch: pure noise
    noise = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert noise.std().item() == pytest.approx(1.4, rel=0.1)


@pytest.mark.parametrize("groups, weights, match", [
    ({"a": ["conv.weight"]}, "equal", "missing"),
    ({**GROUPS, "extra": ["nope.weight"]}, "equal", "not trainable"),
    ({"a": GROUPS["features"] + ["fc1.weight"], "b": GROUPS["head"]}, "equal", "is in groups"),
    (GROUPS, {"features": 1.0}, "every group"),
    (GROUPS, {"features": 1.0, "head": -1.0}, "every group"),
    (GROUPS, "uniform", "weights must be"),
])
def test_group_wise_configuration_errors(groups, weights, match):
    with pytest.raises(PrivacyConfigError, match=match):
        BookKeepingEngine(Net(), max_grad_norm=1.0, clipping=GroupWiseClipping(1.0, groups, weights))


def test_style_names():
    assert isinstance(make_clipping("per_layer", 1.0), PerLayerClipping)
    with pytest.raises(PrivacyConfigError, match="per_layer"):
        make_clipping("layerwise", 1.0)


# ---------------------------------------------------------------------------------------------------
# per-layer clipping happens during the backward: no output gradients kept to the end
# ---------------------------------------------------------------------------------------------------

class Reused(nn.Module):
    """fc is used twice in one forward (its per-example gradient has cross terms), the others once."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 4)
        self.fc = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(self.fc(torch.tanh(self.fc(self.inp(x)))))


def test_per_layer_clipping_consumes_each_layer_during_the_backward(monkeypatch):
    model = Reused().double()
    engine = BookKeepingEngine(model, max_grad_norm=1.0, loss_reduction="sum", clipping="per_layer")
    left_for_the_end = []
    finish = BookKeepingEngine._finish_backward

    def spy(self):
        left_for_the_end.extend(r.name for r in self.records if r.uses)
        finish(self)

    monkeypatch.setattr(BookKeepingEngine, "_finish_backward", spy)
    model(torch.randn(4, 5, dtype=torch.float64)).sum().backward()
    assert left_for_the_end == ["fc"]  # only the reused module waits for the end of the backward
    assert sorted(engine.last_sq_norms) == sorted(k for k, _ in model.named_parameters())
    engine.detach()


@pytest.mark.parametrize("microbatches", [1, 2])
def test_per_layer_clipping_with_reused_modules_and_micro_batches(microbatches):
    torch.manual_seed(0)
    model = Reused().double()
    x = torch.randn(6, 5, dtype=torch.float64)
    weights = torch.randn(6, 3, dtype=torch.float64) * torch.logspace(-2, 2, 6, dtype=torch.float64).view(6, 1)
    grads = per_example_grads(model, [x], weights)
    sizes = {k: p.numel() for k, p in model.named_parameters()}
    factors = _reference_factors("per_layer", grads, 0.6, sizes)
    engine = BookKeepingEngine(model, max_grad_norm=0.6, loss_reduction="sum", clipping="per_layer")
    for xs, ws in zip(x.chunk(microbatches), weights.chunk(microbatches)):
        (model(xs) * ws).sum().backward()
    for n, p in model.named_parameters():
        ref = torch.tensordot(factors[n], grads[n], dims=1)
        torch.testing.assert_close(engine.pop_summed_grad(p), ref, rtol=1e-9, atol=1e-12, msg=n)
    engine.detach()


def test_per_layer_non_finite_example_is_dropped_where_it_is_non_finite():
    """An example whose gradient is non-finite in a layer contributes nothing to that layer; every layer's sum
    stays finite and within the layer budgets."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double()
    engine = BookKeepingEngine(model, max_grad_norm=1.0, loss_reduction="sum", clipping="per_layer")
    x = torch.randn(3, 3, dtype=torch.float64)
    w = torch.ones(3, 2, dtype=torch.float64)
    w[1] = float("inf")
    (model(x) * w).sum().backward()
    for p in engine.params:
        s = engine.pop_summed_grad(p)
        assert torch.isfinite(s).all()
    engine.detach()

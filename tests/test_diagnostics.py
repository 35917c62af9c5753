"""Per-step diagnostics: values against a per-example reference, marked non-private, and free: computing them
changes nothing that is released."""
import copy

import pytest
import torch
import torch.nn.functional as F

from dpsat_fast.clipping import PerLayerClipping
from dpsat_fast.diagnostics import PRIVATE_FIELDS, step_diagnostics
from dpsat_fast.engine import BookKeepingEngine
from dpsat_fast.models import DigitsCNN
from dpsat_fast.optim import DPSAT
from oracle import per_example_grads


def _setup(clipping="flat", C=0.5):
    torch.manual_seed(0)
    model = DigitsCNN().double()
    engine = BookKeepingEngine(model, max_grad_norm=C, loss_reduction="sum",
                               clipping=PerLayerClipping(C) if clipping == "per_layer" else clipping)
    opt = DPSAT(torch.optim.SGD(model.parameters(), lr=0.1), engine=engine, rho=0.2, noise_multiplier=1.0,
                expected_batch_size=6, seed=3)
    return model, engine, opt


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_diagnostics_match_the_per_example_reference(clipping):
    model, engine, opt = _setup(clipping)
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    w = torch.randn(6, 10, dtype=torch.float64) * torch.logspace(-3, 1, 6, dtype=torch.float64).view(6, 1)
    grads = per_example_grads(model, [x], w)
    (model(x) * w).sum().backward()
    d = step_diagnostics(engine, opt)
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()
    if clipping == "flat":
        expected_clipped = (norms > 0.5 * (1 + 1e-9)).double().mean().item()
    else:
        per_layer = {}
        for k, g in grads.items():
            per_layer.setdefault(k.rsplit(".", 1)[0], []).append(g.flatten(1).pow(2).sum(1))
        budget = 0.5 / len(per_layer) ** 0.5
        expected_clipped = torch.stack([torch.stack(v).sum(0).sqrt() > budget for v in per_layer.values()]).any(0) \
            .double().mean().item()
    assert 0 < d.clipped_fraction < 1 and d.clipped_fraction == pytest.approx(expected_clipped)
    assert d.norm_quantiles[0.5] == pytest.approx(torch.quantile(norms, 0.5).item(), rel=1e-9)
    assert d.batch_size == 6 and d.perturbation_norm == 0.0  # step 0 of DP-SAT: no perturbation yet
    assert set(PRIVATE_FIELDS) == {"batch_size", "clipped_fraction", "norm_quantiles"}
    assert str(d).startswith("[NON-PRIVATE diagnostics]")
    opt.step()
    (model(x) * w).sum().backward()
    assert step_diagnostics(engine, opt).perturbation_norm == pytest.approx(0.2)  # ρ: public
    opt.step()


def test_diagnostics_change_nothing_released():
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (6,))
    results = []
    for look in (False, True):
        model, engine, opt = _setup()
        model = model  # same init (seeded)
        for _ in range(2):
            F.cross_entropy(model(x), y, reduction="sum").backward()
            if look:
                step_diagnostics(engine, opt)
            opt.step()
            opt.zero_grad()
        results.append(copy.deepcopy([p.detach() for p in model.parameters()]))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_diagnostics_need_a_backward():
    _, engine, _ = _setup()
    with pytest.raises(RuntimeError, match="no backward"):
        step_diagnostics(engine)

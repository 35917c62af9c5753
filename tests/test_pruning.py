"""Magnitude pre-pruning and gradient dropping: masks respected by the updates and by the noise, pruned
weights stay zero, sensitivity unchanged, and the selection never reads the current private gradients."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from dpsat_fast.engine import BookKeepingEngine
from dpsat_fast.models import DigitsCNN
from dpsat_fast.optim import DPSAT, DPOptimizer
from dpsat_fast.pruning import GradientDropping, MagnitudePrePruning, magnitude_masks
from oracle import neighbour_update_distance


def test_magnitude_masks_global_and_per_layer():
    params = {"a": torch.tensor([0.1, -5.0, 0.2, 3.0]), "b": torch.tensor([[1.0, -0.05], [4.0, 0.3]])}
    glob = magnitude_masks(params, 0.5, "global")  # 8 entries, remove the 4 smallest |.|: .05 .1 .2 .3
    assert glob["a"].tolist() == [False, True, False, True]
    assert glob["b"].tolist() == [[True, False], [True, False]]
    layer = magnitude_masks(params, 0.5, "layer")  # 2 of 4 per tensor
    assert layer["a"].tolist() == [False, True, False, True]
    assert layer["b"].tolist() == [[True, False], [True, False]]
    assert magnitude_masks(params, 0.0)["a"].all()
    with pytest.raises(ValueError, match="rate"):
        magnitude_masks(params, 1.0)


def _private_run(model, sparsity_factory, method="dpsgd", steps=3, seed=0, batches=None):
    torch.manual_seed(seed)
    model = copy.deepcopy(model)
    sparsity = sparsity_factory(model)
    engine = BookKeepingEngine(model, max_grad_norm=1.0)
    kwargs = dict(engine=engine, noise_multiplier=1.0, expected_batch_size=8, seed=5, sparsity=sparsity)
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    opt = DPSAT(base, rho=0.05, **kwargs) if method == "dpsat" else DPOptimizer(base, **kwargs)
    grads = []
    for t in range(steps):
        x, y = batches[t] if batches is not None else (torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))
        F.cross_entropy(model(x), y).backward()
        opt.step()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.zero_grad()
    if method == "dpsat":
        opt.detach()
    engine.detach()
    return model, sparsity, grads


@pytest.mark.parametrize("method", ["dpsgd", "dpsat"])
def test_pre_pruned_weights_stay_zero_and_get_no_noise(method):
    base = DigitsCNN()
    model, pruning, grads = _private_run(base, lambda m: MagnitudePrePruning(m, 0.7), method)
    assert pruning.kept_fraction == pytest.approx(0.3, abs=1e-3)
    for p, mask in pruning.masks.items():
        name = pruning.names[p]
        assert torch.all(p[~mask] == 0), name  # momentum and weight decay never revive a pruned weight
        assert torch.all(p[mask] != 0), name
        for g in grads:
            assert torch.all(g[name][~mask] == 0), name  # no gradient, no noise on pruned coordinates
            assert (g[name][mask] != 0).float().mean() > 0.99, name  # noise on every kept coordinate
    # unpruned parameters (biases, GroupNorm) are released in full
    assert all((g["features.1.weight"] != 0).all() for g in grads)


def test_noise_only_on_kept_coordinates_in_an_empty_step():
    model = DigitsCNN()
    dropping = GradientDropping(keep=0.25, score="weight")
    engine = BookKeepingEngine(model, max_grad_norm=2.0)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), engine=engine, noise_multiplier=1.5,
                      expected_batch_size=1.0, seed=9, sparsity=dropping)
    masks = dropping.select([p for p in model.parameters()])
    opt.step()  # no data: pure noise
    for p, mask in masks.items():
        assert torch.all(p.grad[~mask] == 0)
        kept = p.grad[mask]
        assert kept.numel() == pytest.approx(0.25 * p.numel(), abs=1)
        if kept.numel() > 2000:
            assert kept.std().item() == pytest.approx(3.0, rel=0.1)  # σ·C on every kept coordinate


@pytest.mark.parametrize("score", ["weight", "previous_gradient"])
def test_gradient_dropping_updates_only_the_kept_coordinates(score):
    base = DigitsCNN()
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    seen_masks = []

    class Recording(GradientDropping):
        def select(self, params):
            masks = super().select(params)
            seen_masks.append({id(p): m.clone() for p, m in masks.items()})
            return masks

    model, _, grads = _private_run(base, lambda m: Recording(keep=0.1, score=score), steps=1)
    names = {id(p): n for n, p in model.named_parameters()}
    for pid, mask in seen_masks[0].items():
        n = names[pid]
        assert torch.all(grads[0][n][~mask] == 0), n
        moved = model.state_dict()[n] != before[n]
        # SGD with weight decay moves every nonzero weight a little; without the masked gradient only by decay
        change = (model.state_dict()[n] - before[n]).abs()
        assert change[~mask].max() <= 0.1 * 1e-3 * before[n].abs().max() + 1e-12, n
        assert moved[mask].float().mean() > 0.99, n


def test_previous_gradient_score_moves_the_kept_set():
    model, dropping, _ = _private_run(DigitsCNN(), lambda m: GradientDropping(keep=0.1), steps=3)
    assert dropping.previous  # the full noisy gradients of the last step were observed
    w = dict(model.named_parameters())["features.4.weight"]
    prev = dropping.previous[id(w)]
    assert (prev != 0).float().mean() > 0.99  # before masking: dense, so the next selection can change


def test_selection_never_reads_the_current_private_gradients(monkeypatch):
    """Same history, two different current batches (one with an extreme outlier): the same masks. And in every
    step the masks are chosen before the optimizer reads any clipped sum of that step."""
    torch.manual_seed(0)
    history = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))) for _ in range(2)]
    current = {"a": (torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))),
               "b": (1e4 * torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))}
    events, masks_seen = [], {}
    original_release = BookKeepingEngine.release

    def release(self, params):
        events.append("take")
        return original_release(self, params)

    monkeypatch.setattr(BookKeepingEngine, "release", release)

    class Recording(GradientDropping):
        def select(self, params):
            events.append("select")
            masks = super().select(params)
            masks_seen.setdefault(self.tag, []).append([m.clone() for m in masks.values()])
            return masks

    base = DigitsCNN()  # the same initial weights for both runs
    for tag, batch in current.items():
        events.clear()

        def factory(m, tag=tag):
            r = Recording(keep=0.2)
            r.tag = tag
            return r

        _private_run(base, factory, method="dpsat", steps=3, batches=history + [batch])
        steps = "".join("s" if e == "select" else "t" for e in events).split("s")[1:]
        assert len(steps) == 3 and all(chunk and set(chunk) == {"t"} for chunk in steps)  # select, then takes
    for ma, mb in zip(masks_seen["a"][-1], masks_seen["b"][-1]):
        assert torch.equal(ma, mb)
    # one selection per step in both runs
    assert len(masks_seen["a"]) == len(masks_seen["b"]) == 3


def test_neighbour_replay_with_pruning():
    """Sparsity does not change the sensitivity: neighbouring batches give updates within lr·C/B̄."""
    C, lr, expected_batch = 0.5, 0.3, 8.0
    torch.manual_seed(1)
    base = DigitsCNN().double()
    x, y = torch.randn(6, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (6,))
    outlier = 1e3 * torch.randn(1, 1, 8, 8, dtype=torch.float64)
    diff = neighbour_update_distance(base, x, y, outlier, C=C, lr=lr, expected_batch=expected_batch,
                                     make_optimizer_kwargs=lambda m: {"sparsity": MagnitudePrePruning(m, 0.5)})
    assert diff <= lr * C / expected_batch * (1 + 1e-9)


def test_pre_pruning_with_gradient_dropping_keeps_the_intersection():
    from dpsat_fast.pruning import CombinedSparsity

    base = DigitsCNN()
    holder = {}

    def factory(m):
        holder["pre"] = MagnitudePrePruning(m, 0.5)
        holder["drop"] = GradientDropping(keep=0.3, score="weight")
        return CombinedSparsity(holder["pre"], holder["drop"])

    model, _, grads = _private_run(base, factory, steps=2)
    for p, mask in holder["pre"].masks.items():
        name = holder["pre"].names[p]
        assert torch.all(p[~mask] == 0), name  # pruned weights stay zero
        for g in grads:
            released = g[name] != 0
            assert not torch.any(released & ~mask), name  # nothing released outside the pre-pruning mask
            assert released.sum() <= 0.3 * p.numel() + 1, name  # and at most the dropping budget

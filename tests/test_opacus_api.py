"""Opacus' API surface: make_private's keywords, make_private_with_epsilon, BatchMemoryManager and skipped
steps, pre_step / original_optimizer.step, step hooks, loss_reduction="sum", per-layer lists of norms,
models already wrapped by Opacus. Each keeps Opacus' meaning (or a safer one) or is refused with the fix."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dpsat_fast import PrivacyEngine
from dpsat_fast.accounting import compute_epsilon
from dpsat_fast.utils import BatchMemoryManager
from dpsat_fast.validation import PrivacyConfigError
from dpsat_fast.validators import ModuleValidator


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 10, generator=g), torch.randint(0, 3, (n,), generator=g))


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))


def _private(model=None, batch_size=16, sigma=1.0, engine=None, seed=0, key=None, **kw):
    model = model if model is not None else _model(seed)
    pe = engine if engine is not None else PrivacyEngine(accountant="rdp")
    kw.setdefault("max_grad_norm", 1.0)
    if key is not None:
        kw["seed"] = key
    out = pe.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                          data_loader=DataLoader(_data(), batch_size=batch_size), noise_multiplier=sigma, **kw)
    return (pe, *out)


def test_make_private_with_epsilon_calibrates_sigma():
    model = _model()
    pe = PrivacyEngine(accountant="rdp")
    model, opt, loader = pe.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_data(), batch_size=16), target_epsilon=2.0, target_delta=1e-5, epochs=3,
        max_grad_norm=1.0)
    eps = compute_epsilon(opt.noise_multiplier, loader.sample_rate, 3 * len(loader), 1e-5, "rdp")
    assert eps <= 2.0 and eps == pytest.approx(2.0, rel=0.05)
    with pytest.raises(PrivacyConfigError, match="calibrates"):
        PrivacyEngine().make_private_with_epsilon(module=_model(), optimizer=torch.optim.SGD(_model().parameters(), lr=0.1),
                                                  data_loader=loader, target_epsilon=2.0, target_delta=1e-5,
                                                  epochs=3, max_grad_norm=1.0, noise_multiplier=1.0)


def test_optimizer_attributes_scripts_read():
    pe, model, opt, loader = _private()
    assert opt.max_grad_norm == 1.0 and opt.noise_multiplier == 1.0
    assert opt.expected_batch_size == loader.expected_batch_size == 16
    assert opt.loss_reduction == "mean" and opt.accumulated_iterations == 1
    assert isinstance(opt.original_optimizer, torch.optim.SGD)


def _flat_grad(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_batch_memory_manager_releases_once_per_logical_batch():
    """Physical batches of ≤ 5 examples, one release and one accounting step per logical batch, and the
    first release equals the release of that whole logical batch in one backward (noise-free)."""
    pe, model, opt, loader = _private(sigma=0.0, allow_non_private=True)
    releases, logical, current = [], [], []
    opt.step_hook = lambda o: releases.append(_flat_grad(model).clone())
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=5, optimizer=opt) as mem_loader:
        for x, y in mem_loader:
            assert len(y) <= 5
            current.append((x, y))
            opt.zero_grad()
            if len(y):
                F.cross_entropy(model(x), y).backward()
            before = len(releases)
            opt.step()
            if len(releases) > before:
                logical.append(current)
                current = []
    assert len(releases) == len(loader) == pe.accountant.steps
    assert any(len(pieces) > 1 for pieces in logical)
    _, fresh, fresh_opt, _ = _private(sigma=0.0, allow_non_private=True)  # the same initial weights
    x = torch.cat([a for a, _ in logical[0]])
    y = torch.cat([b for _, b in logical[0]])
    if len(y):
        F.cross_entropy(fresh(x), y).backward()
    fresh_opt.pre_step()
    torch.testing.assert_close(releases[0], _flat_grad(fresh), rtol=1e-5, atol=1e-7)


def test_batch_memory_manager_noise_once_and_empty_logical_batches():
    pe, model, opt, loader = _private(batch_size=2)  # q = 2/64: empty batches are common
    numel = sum(p.numel() for p in model.parameters())
    offsets = []
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=1, optimizer=opt) as mem_loader:
        for x, y in mem_loader:
            opt.zero_grad()
            if len(y):
                F.cross_entropy(model(x), y).backward()
            opt.step()
            offsets.append(opt.noise_offset)
    assert pe.accountant.steps == len(loader)
    assert opt.noise_offset == len(loader) * numel  # noise once per logical batch, empty ones included


def test_skipped_step_keeps_the_sums_through_zero_grad():
    pe, model, opt, loader = _private(sigma=0.0, allow_non_private=True)
    x, y = next(iter(DataLoader(_data(), batch_size=8)))
    opt.signal_skip_step(True)
    F.cross_entropy(model(x[:4]), y[:4], reduction="sum").backward()
    opt.step()
    assert pe.accountant.steps == 0 and opt.engine.summed_grads
    opt.zero_grad()
    assert opt.engine.summed_grads  # kept: the logical batch is in progress
    F.cross_entropy(model(x[4:]), y[4:], reduction="sum").backward()
    assert opt.pre_step() and pe.accountant.steps == 1
    opt.zero_grad()
    assert not opt.engine.summed_grads


def test_pre_step_then_original_step_equals_step():
    results = []
    for protocol in ("step", "pre_step"):
        pe, model, opt, loader = _private(seed=3, key=5)  # one (insecure) noise key for both protocols
        x, y = next(iter(DataLoader(_data(), batch_size=8)))
        F.cross_entropy(model(x), y).backward()
        if protocol == "step":
            opt.step()
        else:
            assert opt.pre_step()
            opt.original_optimizer.step()
        results.append((torch.cat([p.detach().flatten() for p in model.parameters()]), pe.accountant.steps))
    assert results[0][1] == results[1][1] == 1
    torch.testing.assert_close(results[0][0], results[1][0])


def test_step_hook_is_called_once_per_release():
    pe, model, opt, loader = _private()
    calls = []
    opt.step_hook = calls.append
    for x, y in loader:
        opt.zero_grad()
        if len(y):
            F.cross_entropy(model(x), y).backward()
        opt.step()
    assert calls == [opt] * len(loader)


def test_loss_reduction_sum_is_not_divided_like_opacus():
    """Opacus releases the noisy sum as is with loss_reduction='sum' and divides it by the expected batch
    size with 'mean'."""
    grads = {}
    x, y = next(iter(DataLoader(_data(), batch_size=8)))
    for reduction in ("mean", "sum"):
        pe, model, opt, loader = _private(sigma=0.0, allow_non_private=True, loss_reduction=reduction)
        F.cross_entropy(model(x), y, reduction=reduction).backward()
        opt.pre_step()
        grads[reduction] = _flat_grad(model)
    torch.testing.assert_close(grads["sum"], grads["mean"] * opt.expected_batch_size, rtol=1e-5, atol=1e-7)


def test_grad_sample_modes_and_ghost_criterion():
    for mode in ("hooks", "functorch", "ew"):
        assert len(_private(grad_sample_mode=mode)) == 4  # (pe, model, optimizer, loader)
    criterion = nn.CrossEntropyLoss()
    pe, model, opt, crit, loader = _private(grad_sample_mode="ghost", criterion=criterion)
    assert crit is criterion
    x, y = next(iter(loader))
    crit(model(x), y).backward()
    opt.step()
    with pytest.raises(PrivacyConfigError, match="no_op"):
        _private(grad_sample_mode="no_op")


@pytest.mark.parametrize("kwargs,match", [
    (dict(poisson_sampling=False), "Remove poisson_sampling=False"),
    (dict(batch_first=False), "batch-first"),
    (dict(rand_on_empty=True), "empty Poisson batches"),
    (dict(clipping="adaptive"), "adaptive"),
])
def test_what_cannot_be_private_is_refused_with_the_fix(kwargs, match):
    with pytest.raises(PrivacyConfigError, match=match):
        _private(**kwargs)


def test_noise_generator_only_outside_secure_mode():
    with pytest.raises(PrivacyConfigError, match="secure mode"):
        _private(noise_generator=torch.Generator().manual_seed(1))
    released = []
    for _ in range(2):
        pe, model, opt, loader = _private(model=_model(), engine=PrivacyEngine(secure_mode=False),
                                          noise_generator=torch.Generator().manual_seed(1))
        opt.pre_step()
        released.append(_flat_grad(model))
    torch.testing.assert_close(released[0], released[1], rtol=0, atol=0)  # reproducible (and not private)


def test_per_layer_clipping_with_one_norm_per_parameter():
    model = _model()
    norms = [0.5, 0.1, 1.0, 0.2]
    pe, model, opt, loader = _private(model, clipping="per_layer", max_grad_norm=norms, sigma=0.0,
                                      allow_non_private=True, loss_reduction="sum")
    assert opt.engine.clipping.sensitivity == pytest.approx(math.sqrt(sum(c * c for c in norms)))
    x = 100 * torch.randn(1, 10)  # one example with a huge gradient: every parameter clipped to its norm
    F.cross_entropy(model(x), torch.tensor([0]), reduction="sum").backward()
    opt.pre_step()
    for k, (p, c) in enumerate(zip(model.parameters(), norms)):
        assert p.grad.norm().item() <= c * (1 + 1e-6)
        if k in (0, 2):  # the weights of the huge input are clipped to exactly their own norm
            assert p.grad.norm().item() == pytest.approx(c, rel=1e-3)
    with pytest.raises(PrivacyConfigError, match="entries"):
        _private(clipping="per_layer", max_grad_norm=[1.0, 1.0])


def test_a_model_wrapped_by_opacus_is_unwrapped_and_opacus_hooks_are_gone():
    from opacus import GradSampleModule

    inner = _model()
    gsm = GradSampleModule(inner)
    pe, model, opt, loader = _private(gsm)
    assert model is inner
    for x, y in loader:
        opt.zero_grad()
        if len(y):
            F.cross_entropy(model(x), y).backward()
        opt.step()
    assert all(getattr(p, "grad_sample", None) is None for p in inner.parameters())


def test_wrap_model_false_returns_hooks_with_cleanup():
    inner = _model()
    pe, hooks, opt, loader = _private(inner, wrap_model=False)
    x, y = next(iter(DataLoader(_data(), batch_size=4)))
    F.cross_entropy(inner(x), y).backward()
    opt.step()
    hooks.cleanup()
    assert "forward" not in inner[0].__dict__


def test_module_validator_names():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert not ModuleValidator.is_valid(model)
    assert ModuleValidator.validate(model, strict=False)
    with pytest.raises(PrivacyConfigError):
        ModuleValidator.validate(model, strict=True)
    assert ModuleValidator.is_valid(ModuleValidator.fix(model))

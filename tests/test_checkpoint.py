"""Checkpoint and resume (TESTING.md item 11): same weights and ε as an uninterrupted run, no replayed noise,
DP-SAT's previous noisy gradient restored, weights_only loading, a missing ledger refuses to resume."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from dpsat_fast import PoissonDataLoader, PrivacyEngine


def _dataset():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(60, 1, 6, 6, generator=g), torch.randint(0, 3, (60,), generator=g))


def _fresh_run(init_seed, method):
    torch.manual_seed(init_seed)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    loader = PoissonDataLoader(_dataset(), sample_rate=0.2, steps=5,
                               generator=torch.Generator().manual_seed(init_seed + 1))
    pe = PrivacyEngine("rdp")
    kw = dict(sam_rho=0.1) if method == "dpsat" else dict(sam_rho=0.1, sam_method="dpsam") if method == "dpsam" else {}
    model, opt, loader = pe.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9),
                                         data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                                         seed=init_seed + 2, **kw)
    return pe, model, opt, loader


def _epoch(model, opt, loader):
    for x, y in loader:
        def closure():
            if len(y):
                F.cross_entropy(model(x), y).backward()
        opt.step(closure)
        opt.zero_grad()


@pytest.mark.parametrize("method", ["dpsgd", "dpsat", "dpsam"])
def test_resume_equals_uninterrupted_run(tmp_path, method):
    pe, model, opt, loader = _fresh_run(0, method)
    for _ in range(3):
        _epoch(model, opt, loader)
    expected_eps, expected = pe.get_epsilon(1e-5), [p.detach().clone() for p in model.parameters()]

    pe, model, opt, loader = _fresh_run(0, method)
    _epoch(model, opt, loader)
    pe.save_checkpoint(tmp_path / "ckpt.pt", epoch=1)
    offset_at_save = opt.noise_offset
    del pe, model, opt, loader

    pe, model, opt, loader = _fresh_run(123, method)  # a new process: other init, other seeds
    assert pe.load_checkpoint(tmp_path / "ckpt.pt") == {"epoch": 1}
    assert opt.noise_offset == offset_at_save and pe.accountant.steps == 5
    for _ in range(2):
        _epoch(model, opt, loader)
    assert pe.get_epsilon(1e-5) == expected_eps
    for p, q in zip(model.parameters(), expected):
        assert torch.equal(p, q)


def test_missing_ledger_refuses_to_resume(tmp_path):
    pe, model, opt, loader = _fresh_run(0, "dpsat")
    _epoch(model, opt, loader)
    pe.save_checkpoint(tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    del ckpt["accountant"]
    torch.save(ckpt, tmp_path / "no_ledger.pt")
    pe2, *_ = _fresh_run(1, "dpsat")
    with pytest.raises(ValueError, match="ledger"):
        pe2.load_checkpoint(tmp_path / "no_ledger.pt")
    assert pe2.accountant.steps == 0


def test_checkpoint_mid_step_is_refused(tmp_path):
    pe, model, opt, loader = _fresh_run(0, "dpsat")
    _epoch(model, opt, loader)
    x, y = next(iter(loader))
    model(torch.randn(2, 1, 6, 6)).sum().backward()  # weights are perturbed until step()
    with pytest.raises(RuntimeError, match="perturbed"):
        pe.save_checkpoint(tmp_path / "ckpt.pt")

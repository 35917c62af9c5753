"""make_private: validation before data, Poisson conversion, calibration, accounting once per step."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset

from dpsat_fast import PoissonDataLoader, PrivacyConfigError, PrivacyEngine, compute_epsilon


def _setup(batch_size=10, n=100):
    ds = TensorDataset(torch.randn(n, 5), torch.randint(0, 3, (n,)))
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    return model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(ds, batch_size=batch_size, shuffle=True)


def test_make_private_converts_loader_and_accounts_each_step():
    model, opt, loader = _setup()
    pe = PrivacyEngine()
    model, opt, loader = pe.make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.2,
                                         max_grad_norm=1.0, seed=0)
    assert isinstance(loader, PoissonDataLoader) and loader.sample_rate == pytest.approx(0.1)
    assert opt.expected_batch_size == pytest.approx(10.0)
    for x, y in loader:
        if len(y):
            F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert pe.accountant.steps == len(loader) == 10
    assert pe.get_epsilon(1e-5) == pytest.approx(compute_epsilon(1.2, 0.1, 10, 1e-5))


def test_target_epsilon_is_calibrated_and_never_exceeded():
    model, opt, loader = _setup()
    pe = PrivacyEngine("rdp")
    _, opt, loader = pe.make_private(module=model, optimizer=opt, data_loader=loader, target_epsilon=5.0,
                                     target_delta=1e-3, epochs=2, max_grad_norm=1.0)
    eps = compute_epsilon(opt.noise_multiplier, loader.sample_rate, 2 * len(loader), 1e-3, accountant="rdp")
    assert 4.5 < eps <= 5.0


def test_unreachable_target_epsilon_is_refused():
    model, opt, loader = _setup()
    with pytest.raises(ValueError, match="target"):
        PrivacyEngine("rdp").make_private(module=model, optimizer=opt, data_loader=loader, target_epsilon=1e-6,
                                     target_delta=1e-3, epochs=100, max_grad_norm=1.0)


def test_non_poisson_loader_claimed_private_is_refused():
    model, opt, loader = _setup()
    with pytest.raises(PrivacyConfigError, match="Poisson"):
        PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
                                     max_grad_norm=1.0, poisson_sampling=False)
    fixed = DataLoader(loader.dataset, batch_sampler=BatchSampler(SequentialSampler(loader.dataset), 10, False))
    with pytest.raises(ValueError, match="batch_sampler"):
        PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=fixed, noise_multiplier=1.0,
                                     max_grad_norm=1.0)


def test_bad_model_is_refused_before_the_loader_is_read():
    model, opt, loader = _setup()
    model.append(nn.BatchNorm1d(3))

    class Exploding(DataLoader):
        def __iter__(self):
            raise AssertionError("data touched")

    with pytest.raises(PrivacyConfigError, match="BatchNorm"):
        PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=Exploding(loader.dataset, batch_size=10),
                                     noise_multiplier=1.0, max_grad_norm=1.0)


@pytest.mark.parametrize("kwargs,match", [(dict(sam_rho=-0.1), "rho"), (dict(sam_rho=float("nan")), "rho"),
                                          (dict(sam_method="sam"), "sam_method"),
                                          (dict(sam_direction="up"), "sam_direction")])
def test_bad_sam_arguments_are_refused(kwargs, match):
    model, opt, loader = _setup()
    with pytest.raises(PrivacyConfigError, match=match):
        PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0,
                                     max_grad_norm=1.0, **kwargs)


def test_make_private_builds_the_requested_optimizer():
    from dpsat_fast.optim import DPSAM, DPSAT
    for kwargs, cls in ((dict(sam_rho=0.05), DPSAT), (dict(sam_rho=0.05, sam_method="dpsam"), DPSAM)):
        model, opt, loader = _setup()
        _, dp_opt, _ = PrivacyEngine().make_private(module=model, optimizer=opt, data_loader=loader,
                                                    noise_multiplier=1.0, max_grad_norm=1.0, **kwargs)
        assert type(dp_opt) is cls and dp_opt.rho == 0.05

"""Bad input is refused before any data is touched, with an error naming the problem and the fix."""

import warnings

import pytest
import torch
from torch import nn

from dpsat_fast.engine import BookKeepingEngine
from dpsat_fast.layers import DPMultiheadAttention
from dpsat_fast.optim import DPOptimizer
from dpsat_fast.validation import PrivacyConfigError, check_delta, fix_model, validate_model


class Untouchable(torch.Tensor):
    pass


@pytest.mark.parametrize("bn", [
    lambda: nn.BatchNorm2d(4),
    lambda: nn.BatchNorm2d(4, affine=False),
    lambda: nn.BatchNorm2d(4).requires_grad_(False),
    lambda: nn.BatchNorm1d(4),
    lambda: nn.BatchNorm3d(4),
    lambda: nn.SyncBatchNorm(4),
    lambda: nn.LazyBatchNorm2d(),
], ids=["bn2d", "no-affine", "frozen", "bn1d", "bn3d", "sync", "lazy"])
def test_batchnorm_in_train_mode_is_refused_with_fix(bn):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bn(), nn.ReLU())
    with pytest.raises(PrivacyConfigError, match=r"BatchNorm.*train mode.*freeze_batchnorm.*fix_model") as e:
        BookKeepingEngine(model, max_grad_norm=1.0)
    assert "'1'" in str(e.value)  # names the module


@pytest.mark.parametrize("bn", [
    lambda: nn.BatchNorm2d(4, track_running_stats=False),
    lambda: nn.BatchNorm2d(4, affine=False, track_running_stats=False),
    lambda: nn.BatchNorm2d(4, track_running_stats=False).requires_grad_(False),
    lambda: nn.BatchNorm1d(4, track_running_stats=False),
    lambda: nn.SyncBatchNorm(4, track_running_stats=False),
], ids=["bn2d", "no-affine", "frozen", "bn1d", "sync"])
def test_batchnorm_without_running_stats_is_refused_in_eval_mode_too(bn):
    """It normalizes with batch statistics in eval mode as well."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bn().eval())
    with pytest.raises(PrivacyConfigError, match=r"'1' \(\w*BatchNorm\w*\): .*track_running_stats=False.*fix_model"):
        BookKeepingEngine(model, max_grad_norm=1.0)


def test_frozen_batchnorm_in_eval_mode_is_fine():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4).requires_grad_(False).eval())
    validate_model(model)


def test_trainable_batchnorm_in_eval_mode_is_supported():
    """Eval mode with running statistics normalizes every example alike: its affine part trains privately."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4).eval(), nn.Flatten(), nn.Linear(4, 2))
    validate_model(model)
    engine = BookKeepingEngine(model, max_grad_norm=1.0)
    model(torch.randn(3, 3, 3, 3)).sum().backward()
    assert {"1.weight", "1.bias"} <= set(engine.last_sq_norms)
    engine.detach()


@pytest.mark.parametrize("norm", [
    lambda: nn.InstanceNorm2d(3, affine=True, track_running_stats=True),
    lambda: nn.InstanceNorm2d(3, track_running_stats=True),  # affine=False: still stores private statistics
    lambda: nn.InstanceNorm1d(3, affine=True, track_running_stats=True).requires_grad_(False),
    lambda: nn.InstanceNorm3d(3, track_running_stats=True),
    lambda: nn.LazyInstanceNorm2d(track_running_stats=True),
], ids=["affine", "no-affine", "frozen", "3d", "lazy"])
def test_norm_with_running_stats_in_train_mode_is_refused(norm):
    model = nn.Sequential(nn.Conv2d(3, 3, 1), norm())
    with pytest.raises(PrivacyConfigError, match=r"'1' \(\w*InstanceNorm\w*\): .*track_running_stats.*state_dict"):
        BookKeepingEngine(model, max_grad_norm=1.0)
    validate_model(nn.Sequential(nn.Conv2d(3, 3, 1), nn.InstanceNorm2d(3, affine=True, track_running_stats=True).eval()))
    validate_model(nn.Sequential(nn.Conv2d(3, 3, 1), nn.InstanceNorm2d(3, affine=True)))  # no running stats


def test_old_weight_norm_is_refused():
    """torch.nn.utils.weight_norm keeps the Linear type (it has a rule) but its trainable parameters are
    weight_g/weight_v, which the rule never sees: their update would be noise only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = nn.Sequential(torch.nn.utils.weight_norm(nn.Linear(3, 4)), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(PrivacyConfigError, match=r"'0' \(Linear\): trainable parameters \['weight_g', 'weight_v'\] "
                       r"are not computed by its per-sample gradient rule.*remove_weight_norm") as e:
        BookKeepingEngine(model, max_grad_norm=1.0)
    assert "'2'" not in str(e.value)
    torch.nn.utils.remove_weight_norm(model[0])
    BookKeepingEngine(model, max_grad_norm=1.0).detach()


def test_old_spectral_norm_and_extra_parameters_are_refused():
    model = nn.Sequential(torch.nn.utils.spectral_norm(nn.Linear(3, 4)))
    with pytest.raises(PrivacyConfigError, match=r"\['weight_orig'\].*remove_spectral_norm"):
        validate_model(model)
    lin = nn.Linear(3, 3)
    lin.scale = nn.Parameter(torch.ones(3))
    with pytest.raises(PrivacyConfigError, match=r"\['scale'\] are not computed by.*register_rule"):
        validate_model(lin)
    lin.scale.requires_grad_(False)
    validate_model(lin)


def test_parametrized_weight_is_refused():
    """New-style parametrizations move the weight to a ParametrizationList (no rule): one clear message naming
    the parametrized module and how to remove the parametrization."""
    model = nn.Sequential(nn.Linear(3, 3), torch.nn.utils.parametrizations.weight_norm(nn.Linear(3, 4)))
    with pytest.raises(PrivacyConfigError) as e:
        BookKeepingEngine(model, max_grad_norm=1.0)
    msg = str(e.value)
    assert msg.count("\n  - ") == 1, msg
    assert "'1' (ParametrizedLinear): ['weight'] are computed by torch.nn.utils.parametrize" in msg
    assert "parametrizations.weight.original0" in msg and "remove_parametrizations(module, 'weight')" in msg
    model[1].bias.requires_grad_(False)  # the parametrization alone is refused too
    with pytest.raises(PrivacyConfigError, match=r"'1' \(ParametrizedLinear\).*original1"):
        validate_model(model)
    torch.nn.utils.parametrize.remove_parametrizations(model[1], "weight")
    validate_model(model)


def test_fix_model_replaces_batchnorm_and_attention():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    model = nn.ModuleDict({"conv": nn.Conv2d(3, 48, 3), "bn": nn.BatchNorm2d(48), "attn": mha})
    with pytest.raises(PrivacyConfigError, match="MultiheadAttention.*fix_model"):
        validate_model(model)
    x = torch.randn(2, 5, 8)
    expected = mha(x, x, x)[0]
    fixed = fix_model(model)
    validate_model(fixed)
    assert isinstance(fixed["bn"], nn.GroupNorm) and fixed["bn"].num_groups == 24
    assert isinstance(fixed["attn"], DPMultiheadAttention)
    torch.testing.assert_close(fixed["attn"](x, x, x)[0], expected)


def test_unsupported_trainable_layer_is_named():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.scale

    model = nn.Sequential(nn.Linear(3, 3), Custom(), nn.PReLU())
    with pytest.raises(PrivacyConfigError) as e:
        BookKeepingEngine(model, max_grad_norm=1.0)
    msg = str(e.value)
    assert "'1' (Custom)" in msg and "['scale']" in msg and "'2' (PReLU)" in msg
    # frozen, they cost nothing and are fine
    model[1].requires_grad_(False)
    model[2].requires_grad_(False)
    BookKeepingEngine(model, max_grad_norm=1.0).detach()


def test_subclass_of_supported_layer_needs_explicit_rule():
    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2

    with pytest.raises(PrivacyConfigError, match="MyLinear"):
        validate_model(nn.Sequential(MyLinear(2, 2)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_norm=1.0), "max_norm"), (dict(scale_grad_by_freq=True), "scale_grad_by_freq"),
    (dict(sparse=True), "sparse")])
def test_embedding_options_that_break_privacy(kwargs, match):
    with pytest.raises(PrivacyConfigError, match=match):
        validate_model(nn.Embedding(5, 3, **kwargs))


def test_instance_norm_running_stats_refused():
    with pytest.raises(PrivacyConfigError, match="track_running_stats"):
        validate_model(nn.InstanceNorm2d(3, affine=True, track_running_stats=True))


@pytest.mark.parametrize("C", [0, -1.0, float("nan"), float("inf"), None])
def test_bad_clipping_norm(C):
    with pytest.raises(PrivacyConfigError, match="max_grad_norm"):
        BookKeepingEngine(nn.Linear(2, 2), max_grad_norm=C)


def _engine():
    model = nn.Linear(3, 2)
    return model, BookKeepingEngine(model, max_grad_norm=1.0)


@pytest.mark.parametrize("sigma", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_noise_multiplier(sigma):
    model, engine = _engine()
    with pytest.raises(PrivacyConfigError, match="noise_multiplier"):
        DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), engine=engine, noise_multiplier=sigma,
                    expected_batch_size=4)


def test_zero_noise_needs_explicit_switch():
    model, engine = _engine()
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), engine=engine, noise_multiplier=0.0,
                      expected_batch_size=4, allow_non_private=True)
    assert opt.noise_std == 0.0


@pytest.mark.parametrize("q", [0.0, -0.1, 1.5, float("nan")])
def test_bad_sample_rate(q):
    from dpsat_fast.accounting import PrivacyAccountant
    model, engine = _engine()
    with pytest.raises(PrivacyConfigError, match="sample_rate"):
        DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), engine=engine, noise_multiplier=1.0,
                    expected_batch_size=4, accountant=PrivacyAccountant(), sample_rate=q)


@pytest.mark.parametrize("b", [0, -3, float("nan"), float("inf")])
def test_bad_expected_batch_size(b):
    model, engine = _engine()
    with pytest.raises(PrivacyConfigError, match="expected_batch_size"):
        DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), engine=engine, noise_multiplier=1.0,
                    expected_batch_size=b)


def test_optimizer_params_not_the_models():
    model, engine = _engine()
    stranger = nn.Linear(3, 2)
    with pytest.raises(PrivacyConfigError, match="not a trainable parameter of the model"):
        DPOptimizer(torch.optim.SGD(list(model.parameters()) + list(stranger.parameters()), lr=0.1),
                    engine=engine, noise_multiplier=1.0, expected_batch_size=4)


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 2.0, float("nan")])
def test_bad_delta(delta):
    with pytest.raises(PrivacyConfigError, match="delta"):
        check_delta(delta)


def test_large_delta_warns():
    with pytest.warns(UserWarning, match="1/N"):
        check_delta(1e-3, num_samples=10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_delta(1e-5, num_samples=10_000)


def test_refused_before_data_is_touched():
    """Validation happens in the constructor: a bad model never sees a batch."""
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with pytest.raises(PrivacyConfigError):
        BookKeepingEngine(model, max_grad_norm=1.0)
    assert "forward" not in model[0].__dict__  # nothing was patched

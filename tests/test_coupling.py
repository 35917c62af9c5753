"""Layers that couple the examples of a batch or store statistics of the private data: refused at attach
(test_validation.py), refused again at the forward when the mode changed after attach (forward guards), and
frozen BatchNorm, the supported way to fine-tune a pretrained CNN privately (pinned in eval mode, exact
per-example gradients of its affine part)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpsat_fast import freeze_batchnorm
from dpsat_fast.engine import BookKeepingEngine
from dpsat_fast.optim import DPOptimizer
from dpsat_fast.validation import PrivacyConfigError, fix_model, install_forward_guards, validate_model
from oracle import per_example_grads, projection_loss


def _pretrained(bn):
    """Running statistics as a public pretraining would leave them (far from 0 and 1)."""
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.num_batches_tracked.fill_(100)
        if bn.affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return bn


def _stats(model):
    return {k: v.clone() for k, v in model.state_dict().items()
            if "running" in k or "num_batches_tracked" in k}


def _assert_same_stats(before, model):
    after = _stats(model)
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, msg=k)


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock, small."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.downsample(x))


class SmallResNet(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.layer1 = BasicBlock(4, 6, 2)
        self.fc = nn.Linear(6, classes)
        self.bn_fc = nn.BatchNorm1d(classes)  # BatchNorm1d on [B, C]

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x).mean((2, 3))
        return self.bn_fc(self.fc(x))


def _pretrained_resnet():
    model = SmallResNet()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            _pretrained(m)
    return model


def _batchnorms(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


# -- forward guards ----------------------------------------------------------------------------------------------

def test_guard_refuses_batchnorm_switched_to_train_before_it_computes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _pretrained(nn.BatchNorm2d(4)).eval(), nn.ReLU())
    validate_model(model)
    calls = []
    model[1].register_forward_pre_hook(lambda m, a: calls.append("pre"))
    model[1].register_forward_hook(lambda m, a, o: calls.append("post"))
    guards = install_forward_guards(model)
    before = _stats(model)
    model(torch.randn(2, 3, 5, 5))  # frozen: fine
    assert calls == ["pre", "post"]
    calls.clear()
    model[1].training = True  # a direct assignment goes around the pin
    with pytest.raises(PrivacyConfigError, match=r"'1' \(BatchNorm2d\) is in train mode.*refused before it computed "
                                                 r"anything.*freeze_batchnorm.*fix_model"):
        model(torch.randn(2, 3, 5, 5))
    assert calls == []  # the guard ran first: no other hook, no forward
    _assert_same_stats(before, model)
    with torch.no_grad():  # also without gradients: the running statistics would still change
        with pytest.raises(PrivacyConfigError):
            model(torch.randn(2, 3, 5, 5))
    _assert_same_stats(before, model)
    guards.remove()
    model(torch.randn(2, 3, 5, 5))  # removed: a plain (non-private) BatchNorm again
    assert not torch.equal(model[1].running_mean, before["1.running_mean"])


@pytest.mark.parametrize("bn", [
    lambda: nn.BatchNorm2d(4, track_running_stats=False),
    lambda: nn.BatchNorm2d(4, affine=False, track_running_stats=False),
    lambda: nn.SyncBatchNorm(4, track_running_stats=False),
], ids=["bn2d", "no-affine", "sync"])
def test_guard_refuses_batchnorm_without_running_stats_in_eval_mode(bn):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bn().eval())
    guards = install_forward_guards(model)
    with pytest.raises(PrivacyConfigError, match=r"'1' \(\w+\) has no running statistics.*fix_model"):
        model(torch.randn(2, 3, 5, 5))
    guards.remove()


@pytest.mark.parametrize("affine", [True, False])
def test_guard_refuses_norm_updating_running_stats(affine):
    norm = nn.InstanceNorm2d(4, affine=affine, track_running_stats=True).eval()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), norm)
    validate_model(model)
    guards = install_forward_guards(model)
    before = _stats(model)
    model.train()
    assert not norm.training  # pinned: frozen running statistics are the one allowed mode
    model(torch.randn(2, 3, 5, 5))
    norm.training = True
    with pytest.raises(PrivacyConfigError, match=r"'1' \(InstanceNorm2d\) with running statistics.*train mode.*"
                                                 r"refused before it computed anything"):
        model(torch.randn(2, 3, 5, 5))
    _assert_same_stats(before, model)
    guards.remove()


def test_guard_lets_per_example_norms_run():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, affine=True), nn.GroupNorm(2, 4),
                          nn.BatchNorm2d(4).eval())
    guards = install_forward_guards(model)
    model.train()
    model(torch.randn(2, 3, 5, 5))  # InstanceNorm without running stats in train mode is per example
    assert [m.training for m in model] == [True, True, True, False]
    guards.remove()


def test_guards_pin_frozen_batchnorm_and_remove_unpins():
    model = _pretrained_resnet().eval()
    guards = install_forward_guards(model)
    model.train()
    assert all(not bn.training for bn in _batchnorms(model)) and model.fc.training
    model.eval().train(True)
    assert all(not bn.training for bn in _batchnorms(model))
    copy.deepcopy(model).train()  # a copy keeps its own pins
    guards.remove()
    model.train()
    assert all(bn.training for bn in _batchnorms(model))


def test_guards_leave_freeze_batchnorm_pins():
    model = _pretrained_resnet()
    freeze_batchnorm(model)
    guards = install_forward_guards(model)
    guards.remove()
    model.train()
    assert all(not bn.training for bn in _batchnorms(model))


# -- freeze_batchnorm --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("affine_trainable", [True, False])
def test_freeze_batchnorm(affine_trainable):
    model = _pretrained_resnet().train()
    before = _stats(model)
    with pytest.raises(PrivacyConfigError, match=r"'bn1' \(BatchNorm2d\): BatchNorm is in train mode"):
        validate_model(model)
    assert freeze_batchnorm(model, affine_trainable=affine_trainable) is model
    validate_model(model)
    model.train()
    for bn in _batchnorms(model):
        assert not bn.training
        assert bn.weight.requires_grad is affine_trainable and bn.bias.requires_grad is affine_trainable
    assert model.fc.training and model.fc.weight.requires_grad
    model(torch.randn(2, 3, 6, 6))
    _assert_same_stats(before, model)
    del model.bn1.train  # documented way to undo the pin
    model.train()
    assert model.bn1.training and not model.layer1.bn1.training


def test_freeze_batchnorm_needs_running_stats():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(PrivacyConfigError, match=r"'2' \(BatchNorm2d\).*track_running_stats=False.*fix_model"):
        freeze_batchnorm(model)


def test_fix_model_keeps_frozen_batchnorm():
    model = freeze_batchnorm(_pretrained_resnet())
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    fixed = fix_model(model)
    assert len(_batchnorms(fixed)) == 5
    torch.testing.assert_close(fixed(x), expected)


# -- private training of a frozen-BatchNorm CNN ------------------------------------------------------------------

def _engine_installs_guards() -> bool:
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2).eval())
    engine = BookKeepingEngine(model, max_grad_norm=1.0)
    try:
        return len(model[1]._forward_pre_hooks) > 0
    finally:
        engine.detach()


def test_private_training_with_frozen_batchnorm():
    """A few DP-SGD steps of a pretrained ResNet-style CNN with frozen BatchNorm, model.train() every step: the
    BatchNorms stay in eval mode, their running statistics never change, and every step's per-example norms
    equal the float64 per-example reference (affine BatchNorm parameters included)."""
    model = freeze_batchnorm(_pretrained_resnet().double())
    before = _stats(model)
    engine = BookKeepingEngine(model, max_grad_norm=0.5, loss_reduction="sum")
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.2), engine=engine, noise_multiplier=1.0,
                      expected_batch_size=4.0, seed=3)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(3):
        model.train()
        assert all(not bn.training for bn in _batchnorms(model))
        x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
        weights = torch.randn(4, 3, dtype=torch.float64)
        ref = per_example_grads(model, [x], weights)
        projection_loss(model(x), weights).sum().backward()
        assert set(engine.last_sq_norms) == set(ref)
        for n, g in ref.items():
            torch.testing.assert_close(engine.last_sq_norms[n], g.flatten(1).pow(2).sum(1), rtol=1e-9, atol=1e-12,
                                       msg=f"step {step}, {n}")
        opt.step()
        opt.zero_grad()
    _assert_same_stats(before, model)
    assert not torch.equal(model.bn1.weight, start["bn1.weight"])  # the affine part trained
    engine.detach()


def test_batchnorm_rule_refuses_train_mode_at_forward():
    """Without any guard, a trainable BatchNorm switched to train mode after attach never computes: its rule
    refuses."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _pretrained(nn.BatchNorm2d(4)).eval())
    engine = BookKeepingEngine(model, max_grad_norm=1.0)
    before = _stats(model)
    model[1].training = True
    with pytest.raises(PrivacyConfigError, match=r"'1' \(BatchNorm2d\) is in train mode.*freeze_batchnorm"):
        model(torch.randn(2, 3, 5, 5))
    _assert_same_stats(before, model)
    engine.detach()


@pytest.mark.parametrize("trainable_affine", [True, False])
def test_engine_guards_mode_changes_after_attach(trainable_affine):
    if not _engine_installs_guards():
        pytest.skip("BookKeepingEngine does not call install_forward_guards (yet)")
    bn = _pretrained(nn.BatchNorm2d(4)).eval().requires_grad_(trainable_affine)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bn, nn.Flatten())
    engine = BookKeepingEngine(model, max_grad_norm=1.0)
    before = _stats(model)
    model.train()
    assert not bn.training  # pinned at attach
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    bn.training = True
    with pytest.raises(PrivacyConfigError, match=r"'1' \(BatchNorm2d\) is in train mode"):
        model(torch.randn(2, 3, 5, 5))
    _assert_same_stats(before, model)
    bn.training = False
    engine.detach()
    model.train()
    assert bn.training  # unpinned by detach

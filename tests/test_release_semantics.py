"""One release counts each example once, on every path a training loop can take.

Each test replays what ordinary user code does (skip a batch with zero_grad, compute input gradients for
an adversarial example, backward twice, survive an exception, change the parameter set or the privacy
parameters mid-run) and checks the release against the release of the clean run. Noise is switched off
(σ = 0, ``allow_non_private``) so that a release is exactly Σ_i c_i g_i / B̄ and can be compared bit for bit.
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpsat_fast import PrivacyEngine
from dpsat_fast.clipping import GroupWiseClipping
from dpsat_fast.engine import BackwardTwiceError, BookKeepingEngine
from dpsat_fast.optim import DPOptimizer, DPSAT
from dpsat_fast.validation import PrivacyConfigError

C = 1.0
B_BAR = 4.0


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))


def _batch(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _private(model=None, sigma=0.0, optimizer_cls=DPOptimizer, **kw):
    model = model if model is not None else _model()
    engine = BookKeepingEngine(model, max_grad_norm=C, loss_reduction="sum", **kw)
    opt = optimizer_cls(torch.optim.SGD(model.parameters(), lr=1.0), engine=engine, noise_multiplier=sigma,
                        expected_batch_size=B_BAR, allow_non_private=sigma == 0)
    return model, engine, opt


def _loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="sum")


def _released(opt):
    """Run the optimizer's release only (no update), return the flat released gradient."""
    opt.privatize_gradients()
    return torch.cat([p.grad.flatten() for p in opt._trainable()])


def _reference(*batches):
    """The release of a clean run over ``batches`` (micro-batches of one step)."""
    model, _, opt = _private()
    for b in batches:
        _loss(model, b).backward()
    return _released(opt)


# -- zero_grad --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("who", ["optimizer", "model"])
def test_zero_grad_discards_a_skipped_batch(who):
    """backward on a batch, then zero_grad, then the next batch: the skipped batch is not released."""
    model, _, opt = _private()
    _loss(model, _batch(1)).backward()
    (opt if who == "optimizer" else model).zero_grad()
    _loss(model, _batch(2)).backward()
    torch.testing.assert_close(_released(opt), _reference(_batch(2)), rtol=0, atol=0)


def test_zero_grad_between_steps_keeps_the_step_exact():
    model, _, opt = _private()
    for seed in (1, 2):
        opt.zero_grad()
        _loss(model, _batch(seed)).backward()
    torch.testing.assert_close(_released(opt), _reference(_batch(2)), rtol=0, atol=0)


# -- backward passes that compute no parameter gradient ----------------------------------------------------

@pytest.mark.parametrize("mode", ["train", "eval"])
def test_input_gradients_contribute_nothing(mode):
    """A 5-step PGD attack (torch.autograd.grad w.r.t. the inputs) before the real backward: the release is
    the real backward's alone."""
    model, engine, opt = _private()
    x, y = _batch(3)
    model.train(mode == "train")
    adv = x.clone()
    for _ in range(5):
        adv.requires_grad_(True)
        (gx,) = torch.autograd.grad(_loss(model, (adv, y)), adv)
        adv = (adv + 0.1 * gx.sign()).detach()
    assert not engine.summed_grads
    model.train()
    _loss(model, (adv, y)).backward()
    torch.testing.assert_close(_released(opt), _reference((adv, y)), rtol=0, atol=0)


def test_backward_with_inputs_and_input_gradient_penalty_contribute_nothing():
    model, engine, opt = _private()
    x, y = _batch(4)
    x.requires_grad_(True)
    loss = _loss(model, (x, y))
    loss.backward(inputs=[x], retain_graph=True)  # input-gradient only
    assert not engine.summed_grads and x.grad is not None
    loss.backward()  # the real backward through the same graph: the first one recorded nothing
    torch.testing.assert_close(_released(opt), _reference((x.detach(), y)), rtol=0, atol=0)


# -- two backward passes over one forward ----------------------------------------------------------------

def test_second_backward_through_one_forward_is_refused():
    model, engine, opt = _private()
    x, y = _batch(5)
    out = model(x)
    loss_a = F.cross_entropy(out, y, reduction="sum")
    loss_b = out.pow(2).sum()
    loss_a.backward(retain_graph=True)
    with pytest.raises(BackwardTwiceError, match="Sum the losses"):
        loss_b.backward()
    # what stays is the first backward (each example once); nothing of the refused one
    torch.testing.assert_close(_released(opt), _reference((x, y)), rtol=0, atol=0)


def test_summed_losses_are_one_backward():
    model, _, opt = _private()
    x, y = _batch(5)
    out = model(x)
    (F.cross_entropy(out, y, reduction="sum") + out.pow(2).sum()).backward()
    assert torch.isfinite(_released(opt)).all()


# -- exceptions inside a backward ------------------------------------------------------------------------

class _UsesWeightOutside(nn.Module):
    """A weight used outside its module: the engine refuses it inside the backward."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        return out + 1e-3 * self.inner[-1].weight.sum()


def test_exception_in_backward_leaves_no_state():
    model, engine, opt = _private()
    bad = _UsesWeightOutside(model)
    for _ in range(3):
        with pytest.raises(RuntimeError, match="used outside the forward"):
            _loss(bad, _batch(6)).backward()
    _loss(model, _batch(7)).backward()
    assert all(len(r.uses) == 0 for r in engine.records)
    torch.testing.assert_close(_released(opt), _reference(_batch(7)), rtol=0, atol=0)


def test_exception_from_a_user_hook_mid_backward_recovers_at_the_next_step():
    model, engine, opt = _private(clipping="per_layer")  # per-layer: sums are formed during the backward
    x, y = _batch(8)

    def boom(grad):
        raise ValueError("boom")

    out = model[0](x)
    out.register_hook(boom)  # fires after the later layers were already clipped and summed
    with pytest.raises(ValueError, match="boom"):
        F.cross_entropy(model[1:](out), y, reduction="sum").backward()
    # step() right away: the dead backward's partial sums are not released
    released = _released(opt)
    torch.testing.assert_close(released, torch.zeros_like(released), rtol=0, atol=0)
    _loss(model, _batch(9)).backward()
    model2, _, opt2 = _private(clipping="per_layer")
    _loss(model2, _batch(9)).backward()
    torch.testing.assert_close(_released(opt), _released(opt2), rtol=0, atol=0)


# -- the parameter set is fixed -------------------------------------------------------------------------

def test_optimizer_must_hold_every_hooked_parameter():
    model = _model()
    engine = BookKeepingEngine(model, max_grad_norm=C)
    with pytest.raises(PrivacyConfigError, match="does not update"):
        DPOptimizer(torch.optim.SGD(model[-1].parameters(), lr=0.1), engine=engine, noise_multiplier=1.0,
                    expected_batch_size=B_BAR)


def test_add_param_group_is_refused():
    model = _model()
    for p in model[0].parameters():
        p.requires_grad_(False)
    engine = BookKeepingEngine(model, max_grad_norm=C)
    opt = DPOptimizer(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1), engine=engine,
                      noise_multiplier=1.0, expected_batch_size=B_BAR)
    with pytest.raises(PrivacyConfigError, match="add_param_group"):
        opt.add_param_group({"params": list(model[0].parameters())})


def test_unfreezing_after_attach_is_refused_before_release():
    """A layer frozen at attach and unfrozen later: refused at its forward (if hooked) or at step()."""
    model = _model()
    for p in model[0].parameters():
        p.requires_grad_(False)
    model, engine, opt = _private(model)
    _loss(model, _batch(1)).backward()
    before = [p.detach().clone() for p in model.parameters()]
    model[0].weight.requires_grad_(True)
    with pytest.raises(PrivacyConfigError, match="unfrozen"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not engine.summed_grads


def test_freezing_a_hooked_layer_after_attach_is_refused():
    model, engine, opt = _private()
    model[-1].bias.requires_grad_(False)
    with pytest.raises(PrivacyConfigError, match="frozen after"):
        _loss(model, _batch(1)).backward()
    with pytest.raises(PrivacyConfigError, match="frozen after"):
        opt.step()


def test_nothing_outlives_its_step():
    model, engine, opt = _private()
    _loss(model, _batch(1)).backward()
    opt.step()
    assert not engine.summed_grads and not engine._pending and engine.step_examples == 0


def test_release_discards_sums_of_parameters_not_released():
    model, engine, _ = _private()
    _loss(model, _batch(1)).backward()
    engine.release([model[-1].weight])
    assert not engine.summed_grads


def test_make_private_twice_is_refused():
    model = _model()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_batch(1, n=16)), batch_size=4)
    pe = PrivacyEngine()
    pe.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0), data_loader=loader,
                    noise_multiplier=1.0, max_grad_norm=1.0, sam_rho=0.1)
    with pytest.raises(PrivacyConfigError, match="already attached"):
        PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                                     data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0, sam_rho=0.1)


# -- configuration changes after construction ---------------------------------------------------------------

def test_noise_multiplier_zero_is_refused_when_set():
    model, _, opt = _private(sigma=1.0)
    with pytest.raises(PrivacyConfigError, match="noise_multiplier"):
        opt.noise_multiplier = 0.0
    with pytest.raises(PrivacyConfigError):
        opt.noise_multiplier = float("nan")
    opt.noise_multiplier = 0.7  # a schedule with σ > 0 is fine
    assert opt.noise_std == pytest.approx(0.7 * C)


def test_unnoised_release_is_refused_before_the_weights_move():
    """σ forced to 0 behind the setter's back (a schedule writing the attribute): step() refuses before any
    weight changes, and no accountant is needed to notice."""
    model, engine, opt = _private(sigma=1.0)
    _loss(model, _batch(1)).backward()
    opt._noise_multiplier = 0.0
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(PrivacyConfigError):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_changed_clipping_norm_between_backward_and_step_is_refused():
    model, engine, opt = _private(sigma=1.0)
    _loss(model, _batch(1)).backward()
    opt.max_grad_norm = 0.5
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(PrivacyConfigError, match="clipping norm changed"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # the next step uses the new norm for clipping and noise alike
    _loss(model, _batch(2)).backward()
    opt.step()
    assert opt.noise_std == pytest.approx(0.5)


def test_group_budgets_follow_the_clipping_norm():
    model = _model()
    style = GroupWiseClipping(1.0, lambda key: "head" if key.startswith("4.") else "body", weights="size")
    model, engine, opt = _private(model, sigma=1.0, clipping=style)
    opt.max_grad_norm = 0.25
    assert math.sqrt(sum(b * b for b in style.budgets.values())) <= 0.25
    assert sum(b * b for b in style.budgets.values()) == pytest.approx(0.25 ** 2)
    assert opt.noise_std == pytest.approx(0.25)
    with pytest.raises(PrivacyConfigError):
        opt.max_grad_norm = -1.0


def test_dpsat_steps_follow_the_same_rules():
    model, engine, opt = _private(optimizer_cls=lambda base, **kw: DPSAT(base, rho=0.05, **kw))
    x, y = _batch(1)
    _loss(model, (x, y)).backward()
    opt.zero_grad()
    assert not engine.summed_grads
    (gx,) = torch.autograd.grad(_loss(model, (x.requires_grad_(True), y)), x)
    assert not engine.summed_grads
    copy.deepcopy(model)  # a copy of an attached model is fine


# -- the batch is the first dimension of every hooked layer ------------------------------------------------

class _SequenceFirst(nn.Module):
    """Feeds [T, B, D] to its Linear layers (PyTorch's batch_first=False convention)."""

    def __init__(self, T=6, D=5):
        super().__init__()
        self.T = T
        self.proj = nn.Linear(D, D)
        self.head = nn.Linear(D, 3)

    def forward(self, x):  # x [B, T·D]
        B = x.shape[0]
        h = self.proj(x.view(B, self.T, -1).transpose(0, 1))  # [T, B, D]: clipped per position
        return self.head(h).mean(0)  # every layer sees T as its leading dimension


def _poisson_run(model, steps, skip_every=None):
    from dpsat_fast.data import PoissonDataLoader

    ds = torch.utils.data.TensorDataset(torch.randn(60, 30), torch.randint(0, 3, (60,)))
    loader = PoissonDataLoader(ds, sample_rate=0.1, steps=steps)
    pe = PrivacyEngine()
    model, opt, loader = pe.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                         data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0)
    for k, (x, y) in enumerate(loader):
        opt.zero_grad()
        if len(y):
            F.cross_entropy(model(x), y).backward()
        if skip_every and k % skip_every == 0:
            continue  # a skipped batch: zero_grad at the next iteration discards it
        opt.step()
    return pe


def test_sequence_first_layers_are_refused_within_a_few_steps():
    with pytest.raises(PrivacyConfigError, match="FIRST dimension"):
        _poisson_run(_SequenceFirst(), steps=20)


def test_batch_first_layers_and_skipped_batches_pass_the_batch_check():
    model = nn.Sequential(nn.Linear(30, 8), nn.ReLU(), nn.Linear(8, 3))
    pe = _poisson_run(model, steps=10, skip_every=3)
    assert pe.accountant.steps == 6

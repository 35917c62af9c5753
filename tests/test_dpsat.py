"""DP-SAT, its variants and DP-SAM: the update rule of DESIGN.md §2.2 on every path (TESTING.md item 10)."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from dpsat_fast.accounting import PrivacyAccountant, compute_epsilon
from dpsat_fast.engine import BookKeepingEngine
from dpsat_fast.optim import DPOptimizer, DPSAM, DPSAT
from test_dp_step import TinyResNet


def _data(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def _make(kind, model, lr=0.1, rho=0.05, momentum=0.9, seed=3, accountant=None, **kw):
    engine = BookKeepingEngine(model, max_grad_norm=0.5)
    base = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    common = dict(engine=engine, noise_multiplier=0.8, expected_batch_size=10.0, seed=seed,
                  accountant=accountant, sample_rate=0.1 if accountant is not None else None)
    if kind == "dpsgd":
        return DPOptimizer(base, **common)
    if kind == "dpsam":
        return DPSAM(base, rho=rho, **common)
    return DPSAT(base, rho=rho, **common, **kw)


def _train(opt, model, steps=3, microbatches=1, closure=False, seed=0):
    for t in range(steps):
        x, y = _data(seed=seed + t)

        def run():
            for xm, ym in zip(x.chunk(microbatches), y.chunk(microbatches)):
                F.cross_entropy(model(xm), ym, reduction="sum").backward()

        if closure:
            opt.step(run)
        else:
            run()
            opt.step()
        opt.zero_grad()


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("microbatches", [1, 3])
def test_rho_zero_is_dpsgd_bit_for_bit(microbatches):
    base = TinyResNet()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    _train(_make("dpsgd", a), a, microbatches=microbatches)
    _train(_make("dpsat", b, rho=0.0), b, microbatches=microbatches)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


class _WeightRecorder:
    """Records, at every forward, the distance of the current weights from a reference copy."""

    def __init__(self, model):
        self.model, self.reference, self.distances, self.snapshots = model, None, [], []
        model.register_forward_pre_hook(self, prepend=False)

    def __call__(self, module, args):
        if self.reference is not None:
            cur = torch.cat([p.detach().flatten() for p in module.parameters()])
            self.distances.append((cur - self.reference).norm().item())
            self.snapshots.append(cur.clone())


@pytest.mark.parametrize("direction", ["noisy_gradient", "last_update"])
@pytest.mark.parametrize("microbatches", [1, 2, 3])
def test_every_microbatch_is_evaluated_at_exactly_w_plus_eps(microbatches, direction):
    model = TinyResNet()
    opt = _make("dpsat", model, rho=0.07, direction=direction)
    rec = _WeightRecorder(model)  # registered after the optimizer's hook: sees the perturbed weights
    for t in range(4):
        rec.reference = torch.cat([p.detach().flatten() for p in model.parameters()])
        rec.distances, rec.snapshots = [], []
        x, y = _data(seed=t)
        for xm, ym in zip(x.chunk(microbatches), y.chunk(microbatches)):
            F.cross_entropy(model(xm), ym).backward()
        assert len(rec.distances) == microbatches
        if t == 0:
            assert rec.distances == [0.0] * microbatches  # step 0 is unperturbed DP-SGD
        else:
            assert rec.distances == pytest.approx([0.07] * microbatches, rel=1e-5)
            assert all(torch.equal(s, rec.snapshots[0]) for s in rec.snapshots)  # no compounding
        assert opt.perturbed == (t > 0)
        opt.step()
        opt.zero_grad()
        assert not opt.perturbed


@pytest.mark.parametrize("kind", ["dpsat", "dpsam"])
@pytest.mark.parametrize("microbatches", [1, 2, 3])
def test_lr_zero_leaves_weights_unchanged(kind, microbatches):
    model = TinyResNet()
    before = _params(model)
    opt = _make(kind, model, lr=0.0, rho=0.5)
    _train(opt, model, steps=4, microbatches=microbatches, closure=(kind == "dpsam"))
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


def test_perturbation_follows_previous_noisy_gradient():
    model = TinyResNet()
    opt = _make("dpsat", model, rho=0.05, momentum=0.9)
    x, y = _data()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    released = [p.grad.clone() for p in model.parameters()]  # g̃_0, before momentum touched it
    norm = torch.cat([g.flatten() for g in released]).norm()
    for eps, g in zip(opt.perturbation, released):
        torch.testing.assert_close(eps, 0.05 * g / norm)


def test_weights_are_clean_after_each_step_for_evaluation():
    model = TinyResNet()
    opt = _make("dpsat", model, rho=0.3)
    _train(opt, model, steps=2)
    clean = _params(model)
    with torch.no_grad():
        model(_data()[0])  # evaluation never perturbs
    model.eval()
    model(_data()[0]).sum()
    for p, q in zip(model.parameters(), clean):
        assert torch.equal(p, q)


@pytest.mark.parametrize("closure", [False, True])
@pytest.mark.parametrize("microbatches", [1, 3])
def test_noise_once_per_logical_step(closure, microbatches):
    model = TinyResNet()
    numel = sum(p.numel() for p in model.parameters())
    for kind, per_step in (("dpsat", 1), ("dpsgd", 1), ("dpsam", 2)):
        m = copy.deepcopy(model)
        acc = PrivacyAccountant("rdp")
        opt = _make(kind, m, accountant=acc)
        _train(opt, m, steps=3, microbatches=microbatches, closure=closure or kind == "dpsam")
        assert opt.noise_offset == 3 * per_step * numel
        assert acc.steps == 3 and acc.history == [[0.8, 0.1, 3 * per_step]]


def test_accounting_dpsat_equals_dpsgd_and_dpsam_composes_twice():
    accs = {}
    for kind in ("dpsgd", "dpsat", "dpsam"):
        model = TinyResNet()
        accs[kind] = PrivacyAccountant("rdp")
        _train(_make(kind, model, accountant=accs[kind]), model, steps=3, closure=True)
    eps = {k: a.get_epsilon(1e-5) for k, a in accs.items()}
    assert eps["dpsat"] == eps["dpsgd"] == pytest.approx(compute_epsilon(0.8, 0.1, 3, 1e-5, "rdp"))
    assert eps["dpsam"] == pytest.approx(compute_epsilon(0.8, 0.1, 6, 1e-5, "rdp"))


def test_neighbour_replay_dpsat():
    """Same state (weights, previous noisy gradient) and noise; batches differing in one example."""
    C, lr, B = 0.5, 0.3, 10.0
    model = TinyResNet()
    opt = _make("dpsat", model, lr=lr, momentum=0.0, rho=0.2)
    _train(opt, model, steps=1)  # now a perturbation is pending
    state = opt.state_dict()
    x, y = _data(seed=9)
    outlier = 1e3 * torch.randn(1, 3, 6, 6)
    results = []
    for xs, ys in [(x, y), (torch.cat([x, outlier]), torch.cat([y, y[:1]]))]:
        m = copy.deepcopy(model)
        o = _make("dpsat", m, lr=lr, momentum=0.0, rho=0.2)
        o.load_state_dict(copy.deepcopy(state))
        F.cross_entropy(m(xs), ys, reduction="sum").backward()
        o.step()
        results.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    diff = (results[0] - results[1]).norm().item()
    assert 0.5 * lr * C / B < diff <= lr * C / B * (1 + 1e-6)


def test_state_dict_round_trip_restores_previous_noisy_gradient():
    model = TinyResNet()
    opt = _make("dpsat", model)
    _train(opt, model, steps=2)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    twin_model = copy.deepcopy(model)
    twin = _make("dpsat", twin_model, seed=123)
    twin.load_state_dict(torch.load(buf, weights_only=True))
    assert twin.noise_seed == opt.noise_seed and twin.noise_offset == opt.noise_offset
    for a, b in zip(opt.perturbation, twin.perturbation):
        assert torch.equal(a, b)
    _train(opt, model, steps=2, seed=5)
    _train(twin, twin_model, steps=2, seed=5)
    for p, q in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(p, q)


def test_dpsam_needs_closure_and_bad_rho_refused():
    model = TinyResNet()
    with pytest.raises(ValueError, match="rho"):
        _make("dpsat", model, rho=-0.1)
    opt = _make("dpsam", TinyResNet())
    with pytest.raises(ValueError, match="closure"):
        opt.step()


def test_adam_base_optimizer():
    model = TinyResNet()
    engine = BookKeepingEngine(model, max_grad_norm=1.0)
    opt = DPSAT(torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01), engine=engine, rho=0.05,
                noise_multiplier=1.0, expected_batch_size=10.0, seed=0)
    _train(opt, model, steps=3)
    assert all(torch.isfinite(p).all() for p in model.parameters())

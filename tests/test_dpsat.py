"""DP-SAT, its variants and DP-SAM: the update rule of docs/algorithms.md §2 on every path."""

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


class _EffectiveWeights:
    """Records, for every forward of a hooked module, the weights it computed with (the engine's view)."""

    def __init__(self, engine):
        self.engine, self.seen = engine, []
        self._original = engine.effective
        engine.effective = self
        for rec in engine.records:
            rec.effective = self

    def __call__(self, p):
        w = self._original(p)
        if p is not None and p in self.engine.param_keys:
            self.seen.append((p, w))
        return w

    def per_forward(self, n_params):
        return [self.seen[k:k + n_params] for k in range(0, len(self.seen), n_params)]


@pytest.mark.parametrize("direction", ["noisy_gradient", "last_update"])
@pytest.mark.parametrize("microbatches", [1, 2, 3])
def test_every_microbatch_is_evaluated_at_exactly_w_plus_eps(microbatches, direction):
    """Every forward of a step computes with w_t + ε_t (the same tensors for every micro-batch, at distance
    ρ from w_t), while the parameters themselves stay w_t."""
    model = TinyResNet()
    opt = _make("dpsat", model, rho=0.07, direction=direction)
    rec = _EffectiveWeights(opt.engine)
    n = len(opt.engine.params)
    for t in range(4):
        clean = _params(model)
        rec.seen = []
        x, y = _data(seed=t)
        for xm, ym in zip(x.chunk(microbatches), y.chunk(microbatches)):
            F.cross_entropy(model(xm), ym).backward()
        forwards = rec.per_forward(n)
        assert len(forwards) == microbatches
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), clean))  # never written
        for fwd in forwards:
            dist = torch.cat([(w - p).detach().flatten() for p, w in fwd]).norm().item()
            if t == 0:
                assert dist == 0.0  # step 0 is unperturbed DP-SGD
            else:
                assert dist == pytest.approx(0.07, rel=1e-5)
            assert all(torch.equal(w, w0) for (_, w), (_, w0) in zip(fwd, forwards[0]))  # no compounding
        assert opt.perturbed == (t > 0)
        opt.step()
        opt.zero_grad()
        assert opt.perturbed


def test_perturbation_reaches_eval_mode_and_sub_modules_but_not_no_grad():
    model = TinyResNet()
    opt = _make("dpsat", model, rho=0.2)
    _train(opt, model, steps=1)
    rec = _EffectiveWeights(opt.engine)
    x, _ = _data()
    model.eval()
    model(x).sum().backward()  # training in eval mode is still DP-SAT
    assert rec.seen and all(not torch.equal(w, p) for p, w in rec.seen)
    rec.seen = []
    head = model.head if hasattr(model, "head") else list(model.children())[-1]
    head(torch.randn(2, head.in_features)).sum()  # a sub-module called directly
    assert rec.seen and all(not torch.equal(w, p) for p, w in rec.seen)
    rec.seen = []
    with torch.no_grad():
        model(x)  # evaluation: the plain forward, clean weights
    assert rec.seen == []
    opt.zero_grad()


def test_logging_forward_between_steps_leaves_weights_and_state_dict_clean():
    model = TinyResNet()
    opt = _make("dpsat", model, rho=0.3)
    _train(opt, model, steps=2)
    clean = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _data()
    model.train()
    F.cross_entropy(model(x), y)  # a loss-logging forward, train mode, grad enabled
    for k, v in model.state_dict().items():
        assert torch.equal(v, clean[k]), k
    opt.zero_grad()


def test_rollback_between_forward_and_step_is_not_undone():
    """The usual NaN rollback: load an older state after a forward/backward, then step() at lr = 0. The
    weights are the loaded ones (the in-place version restored a stale backup over them)."""
    model = TinyResNet()
    opt = _make("dpsat", model, lr=0.0, rho=0.5)
    _train(opt, model, steps=1)
    older = {k: v.clone() + 1.0 for k, v in model.state_dict().items()}
    x, y = _data()
    F.cross_entropy(model(x), y).backward()
    model.load_state_dict(older)
    opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, older[k]), k
    # the next forward computes from the loaded weights, not from a cached w + ε of the old ones
    rec = _EffectiveWeights(opt.engine)
    model(x).sum()
    for p, w in rec.seen:
        assert (w - p).abs().max() < 10.0


def test_dtype_move_after_a_step():
    model = TinyResNet()
    opt = _make("dpsat", model, rho=0.1)
    _train(opt, model, steps=1)
    model.double()
    x, y = _data()
    F.cross_entropy(model(x.double()), y).backward()
    opt.step()
    assert all(p.dtype == torch.float64 and torch.isfinite(p).all() for p in model.parameters())


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
    twin = _make("dpsat", twin_model, seed=3)  # the same INSECURE seed: a reproducible resume
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

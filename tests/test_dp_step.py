"""A whole DP-SGD step: naive reference equality, clipping bound, neighbour replay, noise, non-finite
examples, low precision, optimizer surface."""

import copy
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from dpsat_fast.engine import BookKeepingEngine
from dpsat_fast.ops.reference import philox_normal
from dpsat_fast.optim import DPOptimizer


class TinyResNet(nn.Module):
    """Residual GroupNorm CNN: stem, one basic block with a strided 1×1 shortcut, head."""

    def __init__(self, classes=4):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.gn0 = nn.GroupNorm(4, 8)
        self.conv1 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(4, 8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.gn2 = nn.GroupNorm(4, 8)
        self.short = nn.Conv2d(8, 8, 1, stride=2, bias=False)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        x = F.relu(self.gn0(self.stem(x)))
        h = F.relu(self.gn1(self.conv1(x)))
        h = self.gn2(self.conv2(h))
        x = F.relu(h + self.short(x))
        return self.head(x.mean((2, 3)))


def _naive_step(model, x, y, C, sigma, expected_batch, seed, offset, lr):
    """Reference DP-SGD: per-example grads (float64 loop), clip, sum, Philox noise, divide by B̄, SGD."""
    ref = copy.deepcopy(model).double()
    grads = {n: [] for n, _ in ref.named_parameters()}
    for i in range(x.shape[0]):
        ref.zero_grad()
        F.cross_entropy(ref(x[i:i + 1].double()), y[i:i + 1]).backward()
        for n, p in ref.named_parameters():
            grads[n].append(p.grad.clone())
    grads = {n: torch.stack(g) for n, g in grads.items()}
    total = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()
    c = (C / (total + 1e-6)).clamp(max=1)
    new = {}
    for n, p in model.named_parameters():
        s = torch.tensordot(c, grads[n], dims=1)
        noise = philox_normal(seed, offset, p.numel()).double().view(p.shape)
        offset += p.numel()
        new[n] = p.detach().double() - lr * (s + sigma * C * noise) / expected_batch
    return new


@pytest.mark.parametrize("microbatches", [1, 3])
def test_step_equals_naive_reference(microbatches):
    model = TinyResNet().double()
    x, y = torch.randn(6, 3, 6, 6, dtype=torch.float64), torch.randint(0, 4, (6,))
    expected = _naive_step(model, x, y, C=0.7, sigma=1.3, expected_batch=5.0, seed=1234, offset=0, lr=0.5)
    engine = BookKeepingEngine(model, max_grad_norm=0.7)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.5), engine=engine, noise_multiplier=1.3,
                      expected_batch_size=5.0, seed=1234)
    for xs, ys in zip(x.chunk(microbatches), y.chunk(microbatches)):
        F.cross_entropy(model(xs), ys).backward()
    opt.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=1e-9, atol=1e-12, msg=n)


def _single_example_contribution(model, x, C):
    """The clipped contribution of one example (batch of one, loss 'sum')."""
    engine = BookKeepingEngine(model, max_grad_norm=C, loss_reduction="sum")
    try:
        model(x).sum().backward()
        return torch.cat([engine.pop_summed_grad(p).flatten() for p in engine.params]).norm().item()
    finally:
        engine.detach()


@pytest.mark.parametrize("C", [0.1, 1.0])
def test_clipping_bound(C):
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(16, 3)).double()
    norms = []
    for scale in [0.0, 1e-6, 1e-2, 1.0, 1e2, 1e4, 1e6]:
        x = scale * torch.randn(1, 2, 4, 4, dtype=torch.float64)
        n = _single_example_contribution(model, x, C)
        assert n <= C * (1 + 1e-9), (scale, n)
        norms.append(n)
    assert max(norms) > 0.99 * C  # large examples are clipped to C, so the configured C reaches the sum


def test_configured_clip_norm_reaches_the_sum():
    model = nn.Linear(5, 3).double()
    x = 100 * torch.randn(1, 5, dtype=torch.float64)
    assert _single_example_contribution(model, x, 0.1) == pytest.approx(0.1, rel=1e-6)
    assert _single_example_contribution(model, x, 1.0) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("microbatches", [1, 2])
def test_neighbour_replay(microbatches):
    """Batches differing in one example, same noise: updates differ by at most lr·C/B̄ (add/remove)."""
    C, lr, expected_batch = 0.5, 0.3, 8.0
    base = TinyResNet().double()
    x, y = torch.randn(7, 3, 6, 6, dtype=torch.float64), torch.randint(0, 4, (7,))
    x_big = 1e3 * torch.randn(1, 3, 6, 6, dtype=torch.float64)  # an outlier, far beyond C
    results = []
    for xs, ys in [(x, y), (torch.cat([x, x_big]), torch.cat([y, y[:1]]))]:
        model = copy.deepcopy(base)
        engine = BookKeepingEngine(model, max_grad_norm=C)
        opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=lr), engine=engine, noise_multiplier=1.0,
                          expected_batch_size=expected_batch, seed=7)
        for xm, ym in zip(xs.chunk(microbatches), ys.chunk(microbatches)):
            F.cross_entropy(model(xm), ym).backward()
        opt.step()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    diff = (results[0] - results[1]).norm().item()
    assert diff <= lr * C / expected_batch * (1 + 1e-9)
    assert diff > 0.5 * lr * C / expected_batch  # the outlier is clipped to exactly C, not dropped


def _noise_only_grads(model, sigma, C, expected_batch, seed, steps=1):
    engine = BookKeepingEngine(model, max_grad_norm=C)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), engine=engine, noise_multiplier=sigma,
                      expected_batch_size=expected_batch, seed=seed)
    out = []
    for _ in range(steps):
        opt.step()  # an empty batch: no forward/backward, a normal step of pure noise
        out.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    engine.detach()
    return out


def test_noise_distribution_ks():
    sigma, C, expected_batch = 1.1, 0.7, 13.0
    model = nn.Linear(1000, 2000)  # ~2e6 coordinates: enough power to reject a 1% scale error
    grads = _noise_only_grads(model, sigma, C, expected_batch, seed=2024)[0]
    z = torch.cat([g.flatten() for g in grads.values()]).double().numpy()
    scale = sigma * C / expected_batch
    assert stats.kstest(z, "norm", args=(0, scale)).pvalue > 1e-3
    assert stats.kstest(z, "norm", args=(0, 1.01 * scale)).pvalue < 1e-6


def test_noise_fresh_reproducible_and_per_tensor():
    model = nn.Sequential(nn.Linear(64, 64, bias=False), nn.Linear(64, 64, bias=False))
    a = _noise_only_grads(copy.deepcopy(model), 1.0, 1.0, 1.0, seed=5, steps=2)
    b = _noise_only_grads(copy.deepcopy(model), 1.0, 1.0, 1.0, seed=5, steps=2)
    c = _noise_only_grads(copy.deepcopy(model), 1.0, 1.0, 1.0, seed=6, steps=1)
    for n in a[0]:
        torch.testing.assert_close(a[0][n], b[0][n], rtol=0, atol=0)  # reproducible
        assert abs(np.corrcoef(a[0][n].flatten(), a[1][n].flatten())[0, 1]) < 0.05  # fresh each step
        assert abs(np.corrcoef(a[0][n].flatten(), c[0][n].flatten())[0, 1]) < 0.05  # seed matters
    assert abs(np.corrcoef(a[0]["0.weight"].flatten(), a[0]["1.weight"].flatten())[0, 1]) < 0.05  # per tensor


def test_unseeded_noise_differs_between_runs():
    model = nn.Linear(32, 32)
    g1 = _noise_only_grads(copy.deepcopy(model), 1.0, 1.0, 1.0, seed=None)[0]
    g2 = _noise_only_grads(copy.deepcopy(model), 1.0, 1.0, 1.0, seed=None)[0]
    assert not torch.equal(g1["weight"], g2["weight"])


def test_bf16_parameters_get_fp32_noise():
    model = nn.Linear(50, 40).to(torch.bfloat16)
    grads = _noise_only_grads(model, 1.0, 1.0, 1.0, seed=3)[0]
    offset = 0
    for n, p in model.named_parameters():
        expected = philox_normal(3, offset, p.numel()).view(p.shape).to(torch.bfloat16)
        offset += p.numel()
        assert grads[n].dtype == torch.bfloat16
        torch.testing.assert_close(grads[n], expected, rtol=0, atol=0)


def test_non_finite_example_contributes_zero():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (5,))
    engine = BookKeepingEngine(model, max_grad_norm=1.0, loss_reduction="sum")
    x_bad = x.clone()
    x_bad[2, 1] = float("nan")
    x_bad[4, 0] = float("inf")
    F.cross_entropy(model(x_bad), y, reduction="sum").backward()
    bad_sums = {p: engine.pop_summed_grad(p) for p in engine.params}
    keep = torch.tensor([0, 1, 3])
    F.cross_entropy(model(x[keep]), y[keep], reduction="sum").backward()
    for p in engine.params:
        assert torch.isfinite(bad_sums[p]).all()
        torch.testing.assert_close(bad_sums[p], engine.pop_summed_grad(p))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_large_norms_do_not_overflow(dtype):
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).to(dtype)
    engine = BookKeepingEngine(model, max_grad_norm=1.0, loss_reduction="sum")
    x = (300 * torch.randn(8, 64)).to(dtype)
    (model(x).float() * 1e3).sum().backward()  # per-example grads with norms ~1e8: squares overflow fp16
    total = sum(engine.last_sq_norms.values())
    assert total.dtype in (torch.float32, torch.float64) and torch.isfinite(total).all() and (total > 65504).any()
    s = torch.cat([engine.pop_summed_grad(p).flatten() for p in engine.params])
    assert torch.isfinite(s).all() and s.norm() <= 8 * (1 + 1e-3)


def test_mean_and_sum_reductions_agree():
    model = TinyResNet().double()
    x, y = torch.randn(5, 3, 6, 6, dtype=torch.float64), torch.randint(0, 4, (5,))
    out = {}
    for red in ("mean", "sum"):
        m = copy.deepcopy(model)
        engine = BookKeepingEngine(m, max_grad_norm=0.3, loss_reduction=red)
        F.cross_entropy(m(x), y, reduction=red).backward()
        out[red] = [engine.pop_summed_grad(p) for p in engine.params]
    for a, b in zip(out["mean"], out["sum"]):
        torch.testing.assert_close(a, b)


def _empty_batch_models():
    from dpsat_fast.layers import DPMultiheadAttention
    from dpsat_fast.models import DigitsCNN

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.head = DPMultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.attn(x, x, x)[0].mean(1))

    return {
        "tiny_resnet": (TinyResNet, (0, 3, 6, 6)),
        "digits_cnn": (DigitsCNN, (0, 1, 8, 8)),  # small maps: the ghost route of the convolutions
        "embedding": (lambda: nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 3)), "idx"),
        "groupnorm_2d": (lambda: nn.Sequential(nn.Linear(5, 4), nn.GroupNorm(2, 4), nn.Linear(4, 3)), (0, 5)),
        "conv1d_layernorm": (lambda: nn.Sequential(nn.Conv1d(2, 3, 3), nn.LayerNorm(4), nn.Flatten(), nn.Linear(12, 3)),
                             (0, 2, 6)),
        "attention": (Attention, (0, 5, 4)),
    }


@pytest.mark.parametrize("name", list(_empty_batch_models()))
def test_empty_batch_forward_backward_is_a_noise_step(name):
    """An empty Poisson batch run through the ordinary loop (forward, loss, backward, step) is a pure-noise
    step on every layer type (Opacus scripts do not skip empty batches)."""
    make, shape = _empty_batch_models()[name]
    model = make()
    engine = BookKeepingEngine(model, max_grad_norm=1.0)
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), engine=engine, noise_multiplier=1.0,
                      expected_batch_size=4.0, seed=0)
    x = torch.randint(0, 10, (0, 2)) if shape == "idx" else torch.empty(*shape)
    y = torch.empty(0, dtype=torch.long)
    F.cross_entropy(model(x), y).backward()  # mean over no example: NaN loss, empty gradients
    opt.step()
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_closure_adds_noise_once_and_lr_scheduler_and_state_dict():
    model = nn.Linear(6, 3)
    engine = BookKeepingEngine(model, max_grad_norm=1.0)
    base = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.9)
    opt = DPOptimizer(base, engine=engine, noise_multiplier=1.0, expected_batch_size=4.0, seed=11)
    assert isinstance(opt, torch.optim.Optimizer)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    offset0 = opt.noise_offset
    loss = opt.step(closure)
    assert loss is not None and opt.noise_offset - offset0 == sum(p.numel() for p in model.parameters())
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.5 and base.param_groups[0]["lr"] == 0.5
    sd = opt.state_dict()
    assert sd["dp"]["noise_offset"] == opt.noise_offset and sd["state"]  # momentum buffers present
    model2 = copy.deepcopy(model)
    engine2 = BookKeepingEngine(model2, max_grad_norm=1.0)
    opt2 = DPOptimizer(torch.optim.SGD(model2.parameters(), lr=1.0, momentum=0.9), engine=engine2,
                       noise_multiplier=1.0, expected_batch_size=4.0, seed=11)  # the same INSECURE seed
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    # the key is not in the state (secret); an insecure fixed seed given at construction is kept, with the
    # saved counter: a reproducible resume for experiments
    assert opt2.noise_offset == opt.noise_offset and opt2.noise_seed == 11 and opt2.steps == 1
    assert "noise_seed" not in sd["dp"]
    opt2.zero_grad()
    opt.zero_grad()
    for o, m in ((opt, model), (opt2, model2)):
        F.cross_entropy(m(x), y).backward()
        o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q)


def test_parameter_used_outside_its_module_is_refused():
    class Sneaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(x) + F.linear(x, self.lin.weight)  # second use bypasses the rule

    model = Sneaky()
    BookKeepingEngine(model, max_grad_norm=1.0)
    with pytest.raises(RuntimeError, match="lin.weight"):
        model(torch.randn(2, 3)).sum().backward()


def test_detach_restores_the_model():
    model = TinyResNet()
    x = torch.randn(2, 3, 6, 6)
    before = model(x)
    engine = BookKeepingEngine(model, max_grad_norm=1.0)
    engine.detach()
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    torch.testing.assert_close(model(x), before)


def test_deepcopy_of_attached_model_is_a_plain_model():
    model = TinyResNet()
    engine = BookKeepingEngine(model, max_grad_norm=1.0)
    twin = copy.deepcopy(model)
    twin(torch.randn(2, 3, 6, 6)).sum().backward()
    assert not engine.summed_grads  # the copy did not feed the original's engine
    assert all(p.grad is not None for p in twin.parameters())  # it is an ordinary model

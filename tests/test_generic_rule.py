"""The opt-in generic rule for a module's own raw parameters (dpsat_fast.layers.generic): a torchvision-style
ViT (class token on the root, position embedding on the encoder, patch-embedding conv, converted
nn.TransformerEncoderLayer) is refused with the fix, then trains privately with exact per-example norms and the
neighbour bound; the children keep their rules, the input gradient flows, DP-SAT's perturbation is applied,
and modules that break the rule's assumptions (mixing examples, random ops, non-batch outputs) are refused."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpsat_fast import PrivacyEngine, fix_model, register_generic
from dpsat_fast.audit import privacy_self_test
from dpsat_fast.engine import BackwardTwiceError, BookKeepingEngine
from dpsat_fast.layers import DPMultiheadAttention, GenericRule, get_rule, unregister_generic
from dpsat_fast.layers.conv import ConvRule
from dpsat_fast.layers.linear import LinearRule
from dpsat_fast.validation import PrivacyConfigError, model_problems, validate_model
from oracle import assert_matches_reference, neighbour_update_distance, per_example_grads


class Encoder(nn.Module):
    """torchvision.models.vision_transformer.Encoder in small: a raw position embedding in its own forward."""

    def __init__(self, seq_length, num_layers, num_heads, hidden_dim, mlp_dim, dropout=0.0):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, hidden_dim).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.layers = nn.Sequential(*[
                nn.TransformerEncoderLayer(hidden_dim, num_heads, mlp_dim, dropout=dropout, activation="gelu",
                                           batch_first=True, norm_first=True) for _ in range(num_layers)])
        self.ln = nn.LayerNorm(hidden_dim)

    def forward(self, input):
        input = input + self.pos_embedding
        return self.ln(self.layers(self.dropout(input)))


class TinyViT(nn.Module):
    """torchvision.models.VisionTransformer in small: patch-embedding conv, a raw class token on the root."""

    def __init__(self, image_size=8, patch_size=4, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16,
                 num_classes=3, dropout=0.0):
        super().__init__()
        self.patch_size = patch_size
        self.conv_proj = nn.Conv2d(3, hidden_dim, patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.encoder = Encoder((image_size // patch_size) ** 2 + 1, num_layers, num_heads, hidden_dim, mlp_dim,
                               dropout)
        self.heads = nn.Sequential(nn.Linear(hidden_dim, num_classes))

    def forward(self, x):
        x = self.conv_proj(x).flatten(2).transpose(1, 2)  # [B, patches, D]
        n = x.shape[0]
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        return self.heads(self.encoder(x)[:, 0])


def tiny_vit(**kw):
    torch.manual_seed(0)
    model = TinyViT(**kw)
    with torch.no_grad():
        model.class_token.normal_()  # torchvision starts it at 0; any value will do for the tests
    return fix_model(model, generic=True)


class Scaled(nn.Module):
    """Own raw parameters used around a child with its own rule."""

    def __init__(self, d=4):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(d))
        self.shift = nn.Parameter(torch.randn(1, d))
        self.inner = nn.Linear(d, d)

    def forward(self, x):
        return self.inner(x * self.scale) * self.scale.sum() + self.shift


def test_vit_is_refused_with_the_fixes_then_converted():
    raw = TinyViT()
    problems = model_problems(raw)
    text = "\n".join(problems)
    assert "'<root>' (TinyViT): trainable parameters ['class_token'] have no per-sample gradient rule" in text
    assert "'encoder' (Encoder): trainable parameters ['pos_embedding']" in text
    assert "register_generic(module)" in text and "fix_model(model, generic=True)" in text
    assert "MultiheadAttention" in text
    fixed = fix_model(copy.deepcopy(raw))  # without generic=True only the attention is converted
    assert {p.split(":")[0] for p in model_problems(fixed)} == {"'<root>' (TinyViT)", "'encoder' (Encoder)"}
    fixed = fix_model(raw, generic=True)
    validate_model(fixed)
    assert isinstance(fixed.encoder.layers[0].self_attn, DPMultiheadAttention)
    engine = BookKeepingEngine(fixed, max_grad_norm=1.0)
    rules = {r.name: (type(r.rule), r.param_names) for r in engine.records}
    # the generic rule covers only the module's own parameters; the children keep their rules
    assert rules[""] == (GenericRule, ("class_token",))
    assert rules["encoder"] == (GenericRule, ("pos_embedding",))
    assert rules["conv_proj"][0] is ConvRule and rules["heads.0"][0] is LinearRule
    assert rules["encoder.layers.0.self_attn.q_proj"][0] is LinearRule
    engine.detach()


def test_opt_in_is_explicit_and_per_instance_or_per_type():
    a, b = Scaled(), Scaled()
    with pytest.raises(PrivacyConfigError, match=r"'<root>' \(Scaled\).*register_generic"):
        validate_model(a)
    register_generic(a)
    validate_model(a)
    with pytest.raises(PrivacyConfigError):
        validate_model(b)  # only the registered instance
    assert isinstance(get_rule(copy.deepcopy(a)), GenericRule)  # the mark survives deepcopy
    unregister_generic(a)
    assert get_rule(a) is None

    class Mine(Scaled):
        pass

    register_generic(Mine)
    validate_model(Mine())
    with pytest.raises(ValueError, match="already has a rule"):
        register_generic(nn.Linear)  # never replaces a real rule
    lin = register_generic(nn.Linear(2, 2))  # an instance mark on a type with a rule: the type's rule wins
    assert isinstance(get_rule(lin), LinearRule)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_exact_per_example_norms_and_input_gradient(dtype):
    """A Linear before the module (its per-example gradient needs the input gradient through the module), the
    module used twice, frozen and trainable own parameters."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Linear(3, 4)
            self.mid = register_generic(Scaled())
            self.last = nn.Linear(4, 2)

        def forward(self, x):
            return self.last(torch.tanh(self.mid(torch.tanh(self.mid(self.first(x))))))

    net = Net()
    assert_matches_reference(net, [torch.randn(5, 3)], dtype, max_grad_norm=0.7)
    net.mid.shift.requires_grad_(False)
    _, sq = assert_matches_reference(net, [torch.randn(5, 3)], dtype, max_grad_norm=0.7)
    assert "mid.shift" not in sq and "mid.scale" in sq


def test_input_gradient_equals_the_plain_models():
    net = nn.Sequential(nn.Linear(3, 4), register_generic(Scaled()), nn.Linear(4, 2)).double()
    plain = copy.deepcopy(net)
    x = torch.randn(5, 3, dtype=torch.float64)
    engine = BookKeepingEngine(net, max_grad_norm=1.0, loss_reduction="sum")
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    net(xa).pow(2).sum().backward()
    plain(xb).pow(2).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    engine.detach()


def test_dpsat_perturbation_reaches_own_and_child_parameters():
    """Under DP-SAT every forward computes with w + ε: the own parameters in the forward and in the per-example
    recompute, the children in both as well."""
    net = nn.Sequential(nn.Linear(3, 4), register_generic(Scaled()), nn.Tanh(), nn.Linear(4, 2)).double()
    eps = {p: 0.1 * torch.randn_like(p) for p in net.parameters()}
    shifted = copy.deepcopy(net)
    with torch.no_grad():
        for p, q in zip(net.parameters(), shifted.parameters()):
            q.add_(eps[p])
    x = torch.randn(4, 3, dtype=torch.float64)
    w = torch.randn(4, 2, dtype=torch.float64)
    ref = per_example_grads(shifted, [x], w)
    engine = BookKeepingEngine(net, max_grad_norm=1e6, loss_reduction="sum")
    engine.set_perturbation(eps)
    (net(x) * w).sum().backward()
    for name, p in net.named_parameters():
        torch.testing.assert_close(engine.last_sq_norms[name], ref[name].flatten(1).pow(2).sum(1))
        torch.testing.assert_close(engine.summed_grads[p], ref[name].sum(0))  # C huge: no clipping
    engine.detach()


def test_vit_trains_privately():
    model = tiny_vit()
    data = torch.utils.data.TensorDataset(torch.randn(48, 3, 8, 8), torch.randint(0, 3, (48,)))
    loader = torch.utils.data.DataLoader(data, batch_size=12)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                                  noise_multiplier=1.0, max_grad_norm=1.0, sam_rho=0.05)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    steps = 0
    for x, y in loader:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
        steps += 1
    assert steps == 4
    for n, p in model.named_parameters():
        assert not torch.equal(before[n], p), n
    assert not torch.equal(before["class_token"], model.class_token)
    assert 0 < engine.get_epsilon(1e-5) < float("inf")


def test_vit_neighbour_moves_the_release_by_at_most_C():
    base = tiny_vit().double()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,), generator=g)
    outlier = 100 * torch.randn(1, 3, 8, 8, generator=g, dtype=torch.float64)
    C, lr, expected_batch = 0.5, 1.0, 6.0
    diff = neighbour_update_distance(base, x, y, outlier, C=C, lr=lr, expected_batch=expected_batch)
    assert diff <= lr * C / expected_batch * (1 + 1e-9)
    assert diff > 0.3 * lr * C / expected_batch
    report = privacy_self_test(base, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, y), max_grad_norm=C,
                               examples=[0, 4])
    assert report.passed


def test_backward_without_parameter_gradients_records_nothing_and_twice_is_refused():
    net = nn.Sequential(nn.Linear(3, 4), register_generic(Scaled()))
    engine = BookKeepingEngine(net, max_grad_norm=1.0)
    x = torch.randn(4, 3, requires_grad=True)
    (gx,) = torch.autograd.grad(net(x).sum(), x)  # e.g. an adversarial example: no parameter gradient
    assert gx.shape == x.shape and not engine.summed_grads
    loss = net(x).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(BackwardTwiceError):
        loss.backward()
    engine.detach()


def test_empty_batch_keyword_and_non_tensor_arguments():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(4))
            self.inner = nn.Linear(4, 4)

        def forward(self, x, *, gate=None, power=1):
            y = self.inner(x * self.w) ** power
            return {"y": y if gate is None else y * gate, "count": x.shape[0]}

    net = register_generic(Gated(), chunk_size=2).double()  # the recompute in chunks of 2 examples
    x, gate = torch.randn(5, 4, dtype=torch.float64), torch.rand(5, 1, dtype=torch.float64)

    class Call(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x, gate):
            return self.net(x, gate=gate, power=2)["y"]

    assert_matches_reference(Call(), [x, gate], torch.float64)
    engine = BookKeepingEngine(net, max_grad_norm=1.0)
    net(x[:0], gate=gate[:0])["y"].sum().backward()  # an empty Poisson batch
    assert engine.last_batch_size == 0 and not engine.summed_grads[net.w].any()
    engine.detach()


def test_per_example_scalar_output():
    class Score(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return (x * self.w).sum(1)  # [B]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)
            self.score = register_generic(Score())

        def forward(self, x):
            return self.score(torch.tanh(self.lin(x))).unsqueeze(1)

    assert_matches_reference(Net(), [torch.randn(5, 3)], torch.float64)


# -- the assumptions, refused ---------------------------------------------------------------------------

class MixesExamples(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return (x - x.mean(0)) * self.w  # batch statistics: example i's output depends on the others


class Dropped(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(x * self.w)


class SequenceFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, x):  # x [B, T, 4], but the module treats dimension 1 as the batch
        return x * self.w * x.softmax(0)


class Pooled(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return (x * self.w).sum()  # no batch dimension left


def _step(module, x):
    net = nn.Sequential(nn.Linear(4, 4), register_generic(module))
    engine = BookKeepingEngine(net, max_grad_norm=1.0)
    try:
        net(x).sum().backward()
        return engine
    finally:
        engine.detach()


def test_forward_that_mixes_examples_is_refused_and_releases_nothing():
    net = nn.Sequential(nn.Linear(4, 4), register_generic(MixesExamples()))
    engine = BookKeepingEngine(net, max_grad_norm=1.0)
    with pytest.raises(RuntimeError, match="does not compute each example alone"):
        net(torch.randn(5, 4)).sum().backward()
    assert not engine.summed_grads
    engine.detach()
    with pytest.raises(RuntimeError, match="does not compute each example alone"):
        _step(SequenceFirst(), torch.randn(3, 5, 4))


def test_random_ops_are_refused_in_train_mode_and_fine_in_eval_mode():
    with pytest.raises(RuntimeError, match="cannot replay random operations.*dropout"):
        _step(Dropped(), torch.randn(5, 4))
    m = Dropped()
    m.drop.eval()
    _step(m, torch.randn(5, 4))


def test_outputs_and_arguments_without_the_batch_are_refused():
    with pytest.raises(ValueError, match="dimension 0 of every (tensor )?output is the batch"):
        _step(Pooled(), torch.randn(5, 4))

    class Transposed(Pooled):
        def forward(self, x):
            return (x * self.w).t()

    with pytest.raises(ValueError, match=r"dimension 0 of every output is the batch \(5\), got an output of shape"):
        _step(Transposed(), torch.randn(5, 4))

    class TwoArgs(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(4))

        def forward(self, x, table):
            return x * self.w + table.sum(0)

    net = register_generic(TwoArgs())
    engine = BookKeepingEngine(net, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="dimension 0 of every tensor argument is the batch"):
        net(torch.randn(5, 4), torch.randn(7, 4))
    engine.detach()

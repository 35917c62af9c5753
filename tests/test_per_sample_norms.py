"""Per-sample oracle: for every supported layer and configuration, the engine's
per-example squared norms and clipped sums equal a float64 per-example reference.

Every float32 case runs twice: through the PyTorch kernels and through the Triton kernels (in the
interpreter when there is no GPU); float64 always takes the PyTorch path."""

import pytest
import torch
from torch import nn

from dpsat_fast import ops
from dpsat_fast.layers import DPMultiheadAttention
from dpsat_fast.ops import choose_route
from dpsat_fast.ops.triton import triton_can_run
from oracle import assert_matches_reference

DTYPES = [torch.float64, torch.float32]


@pytest.fixture(autouse=True, params=["torch", "triton"])
def kernel_backend(request):
    if request.param == "triton":
        callspec = getattr(request.node, "callspec", None)
        if callspec is not None and callspec.params.get("dtype") is torch.float64:
            pytest.skip("float64 always takes the PyTorch path")
        if not triton_can_run(torch.device("cpu")):
            pytest.skip("Triton cannot run on CPU here (TRITON_INTERPRET is off)")
    with ops.kernel_backend_as(request.param):
        yield request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 7), (4, 3, 7), (3, 2, 5, 7)], ids=["2d", "3d", "4d"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("route", [None, "ghost", "instantiate"])
def test_linear(dtype, shape, bias, route):
    from dpsat_fast.layers import linear, register_rule
    model = nn.Sequential(nn.Linear(7, 6, bias=bias), nn.Tanh(), nn.Linear(6, 3, bias=bias))
    register_rule(nn.Linear, linear.LinearRule(route))
    try:
        assert_matches_reference(model, [torch.randn(shape)], dtype, max_grad_norm=0.3)
    finally:
        register_rule(nn.Linear, linear.LinearRule())


CONV_CASES = [
    # (dims, kwargs, input spatial)
    (1, dict(kernel_size=3), (11,)),
    (1, dict(kernel_size=4, stride=2, padding=3, dilation=2, groups=2), (13,)),
    (1, dict(kernel_size=4, padding="same"), (9,)),
    (2, dict(kernel_size=3, padding=1), (7, 6)),
    (2, dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0)), (9, 7)),
    (2, dict(kernel_size=3, dilation=2, padding="same"), (7, 8)),
    (2, dict(kernel_size=(4, 2), padding="same"), (7, 5)),  # asymmetric 'same'
    (2, dict(kernel_size=3, padding="valid", groups=2), (6, 6)),
    (2, dict(kernel_size=3, padding=1, groups=4), (5, 5)),  # depthwise (C_in = groups = 4)
    (2, dict(kernel_size=3, padding=2, padding_mode="reflect"), (6, 7)),
    (2, dict(kernel_size=3, padding=1, padding_mode="circular", stride=2), (7, 7)),
    (2, dict(kernel_size=1), (5, 3)),
    (2, dict(kernel_size=1, stride=2), (7, 6)),  # strided 1x1 shortcut (a direct batched GEMM on CPU)
    (3, dict(kernel_size=3, padding=1), (4, 5, 3)),
    (3, dict(kernel_size=(2, 3, 1), stride=(1, 2, 1), dilation=(2, 1, 1), groups=2), (5, 6, 3)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dims,kwargs,spatial", CONV_CASES, ids=[str(i) for i in range(len(CONV_CASES))])
@pytest.mark.parametrize("bias", [True, False])
def test_conv(dtype, dims, kwargs, spatial, bias):
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    groups = kwargs.get("groups", 1)
    c_in = 4
    c_out = 4 if groups == 4 else 6
    model = nn.Sequential(conv(c_in, c_out, bias=bias, **kwargs), nn.Tanh(), nn.Flatten())
    assert_matches_reference(model, [torch.randn(3, c_in, *spatial)], dtype, max_grad_norm=0.5)


@pytest.mark.parametrize("budget", [0, 1 << 24], ids=["recompute", "cached"])
@pytest.mark.parametrize("case", [3, 7, 13], ids=["plain", "groups", "3d"])
def test_conv_instantiate_with_and_without_per_example_cache(monkeypatch, budget, case):
    """The PyTorch path keeps instantiate-route per-example gradients for the clipped sum when they fit the
    budget, and recomputes the sum as a conv weight-gradient otherwise: both exact."""
    from dpsat_fast.layers import conv, register_rule
    monkeypatch.setattr(conv, "PER_EXAMPLE_CACHE_ELEMENTS", budget)
    register_rule(nn.Conv2d, conv.ConvRule("instantiate"))
    register_rule(nn.Conv1d, conv.ConvRule("instantiate"))
    register_rule(nn.Conv3d, conv.ConvRule("instantiate"))
    try:
        dims, kwargs, spatial = CONV_CASES[case]
        layer = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](4, 4 if kwargs.get("groups") == 4 else 6, **kwargs)
        model = nn.Sequential(layer, nn.Tanh(), nn.Flatten())
        assert_matches_reference(model, [torch.randn(3, 4, *spatial)], torch.float32, max_grad_norm=0.5)
    finally:
        for t in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
            register_rule(t, conv.ConvRule())


@pytest.mark.parametrize("route", ["ghost", "instantiate"])
def test_conv_routes(route):
    from dpsat_fast.layers import conv, register_rule
    register_rule(nn.Conv2d, conv.ConvRule(route))
    try:
        model = nn.Sequential(nn.Conv2d(3, 5, 3, stride=2, padding=1, groups=1), nn.ReLU(),
                              nn.Conv2d(5, 5, 2, dilation=2, groups=5), nn.Flatten())
        assert_matches_reference(model, [torch.randn(4, 3, 9, 9)], torch.float64)
    finally:
        register_rule(nn.Conv2d, conv.ConvRule())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_repeated_indices(dtype, padding_idx):
    model = nn.Sequential(nn.Embedding(6, 5, padding_idx=padding_idx), nn.Tanh(), nn.Flatten(), nn.Linear(20, 3))
    idx = torch.tensor([[1, 1, 1, 1], [2, 3, 2, 3], [0, 5, 4, 2], [5, 5, 0, 5]])  # heavy duplicates
    assert_matches_reference(model, [idx], dtype, max_grad_norm=0.7)


def _frozen_bn(bn, bias=True):
    """A BatchNorm (or a norm with running statistics) as after pretraining, frozen: eval mode, running statistics far from 0 and 1 (so that a rule
    that normalized with the batch's statistics, or without the running ones, would be caught)."""
    with torch.no_grad():
        bn.running_mean.uniform_(-2, 2)
        bn.running_var.uniform_(0.3, 3)
    bn.bias.requires_grad_(bias)
    return bn.eval()


class _Norms(nn.Module):
    def __init__(self, norm, flatten_to=None):
        super().__init__()
        self.norm = norm
        self.act = nn.Tanh()

    def forward(self, x):
        return self.act(self.norm(x)) * 1.5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm,shape", [
    (lambda: nn.LayerNorm(6), (4, 6)),
    (lambda: nn.LayerNorm((3, 5)), (4, 2, 3, 5)),
    (lambda: nn.LayerNorm(5, bias=False), (3, 7, 5)),
    (lambda: nn.GroupNorm(2, 6), (4, 6, 3, 3)),
    (lambda: nn.GroupNorm(3, 6), (4, 6, 5)),
    (lambda: nn.GroupNorm(1, 4), (3, 4, 2, 2, 3)),
    (lambda: nn.InstanceNorm1d(4, affine=True), (3, 4, 7)),
    (lambda: nn.InstanceNorm2d(4, affine=True), (3, 4, 3, 5)),
    (lambda: nn.InstanceNorm3d(2, affine=True), (3, 2, 3, 2, 3)),
    (lambda: nn.RMSNorm(6), (4, 3, 6)),
    (lambda: nn.RMSNorm((2, 6), eps=1e-5), (4, 2, 6)),
    (lambda: _frozen_bn(nn.InstanceNorm2d(4, affine=True, track_running_stats=True)), (3, 4, 3, 5)),
    (lambda: _frozen_bn(nn.BatchNorm1d(6)), (4, 6)),
    (lambda: _frozen_bn(nn.BatchNorm1d(4, eps=1e-3)), (3, 4, 7)),
    (lambda: _frozen_bn(nn.BatchNorm2d(4)), (3, 4, 3, 5)),
    (lambda: _frozen_bn(nn.BatchNorm3d(2)), (3, 2, 3, 2, 3)),
    (lambda: _frozen_bn(nn.SyncBatchNorm(4)), (3, 4, 5, 2)),
    (lambda: _frozen_bn(nn.BatchNorm2d(4), bias=False), (3, 4, 3, 3)),
], ids=["ln", "ln2d", "ln-nobias", "gn2d", "gn1d", "gn3d", "in1d", "in2d", "in3d", "rms", "rms2d", "in2d-frozen-stats",
        "bn1d-2d", "bn1d", "bn2d", "bn3d", "syncbn", "bn2d-weight-only"])
def test_norm_layers(dtype, norm, shape):
    m = norm()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    assert_matches_reference(_Norms(m), [torch.randn(shape)], dtype, max_grad_norm=0.8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch_first", [True, False])
def test_dp_multihead_attention(dtype, batch_first):
    mha = DPMultiheadAttention(8, 2, batch_first=batch_first)
    B, L = 3, 5
    x = torch.randn(B, L, 8) if batch_first else torch.randn(L, B, 8)
    bd = 0 if batch_first else 1

    class SelfAttn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            causal = torch.ones(L, L, dtype=torch.bool).triu(1)
            return self.attn(x, x, x, attn_mask=causal, need_weights=False)[0]

    assert_matches_reference(SelfAttn(), [x], dtype, batch_dims=[bd])


def test_dp_multihead_attention_equals_torch():
    torch_mha = nn.MultiheadAttention(8, 4, batch_first=True, kdim=6, vdim=5)
    dp = DPMultiheadAttention.from_torch(torch_mha)
    q, k, v = torch.randn(2, 3, 8), torch.randn(2, 4, 6), torch.randn(2, 4, 5)
    kpm = torch.tensor([[False, False, True, False], [False, False, False, False]])
    out_t, w_t = torch_mha(q, k, v, key_padding_mask=kpm)
    out_d, w_d = dp(q, k, v, key_padding_mask=kpm)
    torch.testing.assert_close(out_d, out_t)
    torch.testing.assert_close(w_d, w_t)


@pytest.mark.parametrize("dtype", DTYPES)
def test_module_used_twice(dtype):
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 5)
            self.conv = nn.Conv2d(2, 2, 3, padding=1)
            self.emb = nn.Embedding(7, 5)
            self.norm = nn.GroupNorm(1, 2)

        def forward(self, idx, img):
            h = self.emb(idx).sum(1) + self.emb(idx.flip(1))[:, 0]
            h = self.lin(torch.tanh(self.lin(h)))
            c = self.conv(self.norm(img))
            c2 = self.conv(self.norm(torch.tanh(c[:, :, :3, :3])))  # other spatial size on the 2nd use
            return torch.cat([h, c.flatten(1), c2.flatten(1)], 1)

    idx = torch.randint(0, 7, (4, 3))
    assert_matches_reference(Reuse(), [idx, torch.randn(4, 2, 4, 5)], dtype, max_grad_norm=0.5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_parameter_shared_by_two_modules(dtype):
    """Tied input embedding and output projection: one parameter, two layer rules, cross terms included."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(9, 4)
            self.norm = nn.LayerNorm(4)
            self.head = nn.Linear(4, 9, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, idx):
            return self.head(self.norm(self.emb(idx)))

    assert_matches_reference(Tied(), [torch.randint(0, 9, (3, 4))], dtype, max_grad_norm=0.5)


def test_frozen_parameters_get_nothing():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    model[0].weight.requires_grad_(False)
    model[2].requires_grad_(False)
    ref, sq = assert_matches_reference(model, [torch.randn(4, 4)], torch.float64)
    assert set(sq) == {"0.bias"}


def test_route_choice_follows_cost_rule():
    assert choose_route(1, 512, 512) == "ghost"
    assert choose_route(16, 4608, 512) == "ghost"  # late ResNet conv: T small, D·P large
    assert choose_route(1024, 27, 64) == "instantiate"  # stem conv: T large


# -- recurrent layers, EmbeddingBag, the generic rule --------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["lstm", "lstm_proj", "gru", "rnn"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_recurrent_layers(dtype, kind, batch_first):
    from dpsat_fast.layers import DPGRU, DPLSTM, DPRNN

    kw = dict(num_layers=2, bidirectional=True, batch_first=batch_first)
    rnn = {"lstm": lambda: DPLSTM(3, 4, **kw), "lstm_proj": lambda: DPLSTM(3, 4, proj_size=2, **kw),
           "gru": lambda: DPGRU(3, 4, **kw), "rnn": lambda: DPRNN(3, 4, nonlinearity="relu", **kw)}[kind]()
    x = torch.randn(3, 5, 3) if batch_first else torch.randn(5, 3, 3)
    assert_matches_reference(rnn, [x], dtype, max_grad_norm=0.5, batch_dims=[0 if batch_first else 1])


class _Packed(nn.Module):
    """Padded sequences and lengths in, a PackedSequence through the RNN, padded output (and final state) out."""

    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x, lengths):
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, state = self.rnn(packed)
        h = state[0] if isinstance(state, tuple) else state
        padded, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return torch.cat([padded.flatten(1), h.transpose(0, 1).flatten(1)], 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_recurrent_layers_packed_sequences(dtype, kind):
    from dpsat_fast.layers import DPGRU, DPLSTM

    rnn = (DPLSTM if kind == "lstm" else DPGRU)(3, 4, num_layers=2, bidirectional=True)
    lengths = torch.tensor([2, 5, 1, 4])
    assert_matches_reference(_Packed(rnn), [torch.randn(4, 5, 3), lengths], dtype, max_grad_norm=0.5)


class _Bag(nn.Module):
    def __init__(self, layout, weighted=False, **kw):
        super().__init__()
        self.layout = layout
        self.bag = nn.EmbeddingBag(7, 4, **kw)
        self.lin = nn.Linear(4, 3)
        if weighted:  # per-sample weights from a trainable layer: its gradient needs theirs
            self.weigh = nn.Linear(1, 1)

    def forward(self, idx, lengths=None, weights=None):
        if weights is not None:
            weights = self.weigh(weights.unsqueeze(-1)).squeeze(-1)
        if self.layout == "2d":
            h = self.bag(idx, per_sample_weights=weights)
        else:  # 1-D indices with offsets: example i's bag is its first lengths[i] indices
            keep = torch.arange(idx.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
            flat = idx[keep]
            offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
            if not self.bag.include_last_offset:
                offsets = offsets[:-1]
            h = self.bag(flat, offsets, None if weights is None else weights[keep])
        return self.lin(torch.tanh(h)) + self.lin(torch.tanh(self.bag(idx[:, :2])))  # a second use


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["2d", "offsets", "offsets_last"])
@pytest.mark.parametrize("mode,weighted", [("sum", False), ("sum", True), ("mean", False)])
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_bag(dtype, layout, mode, weighted, padding_idx):
    model = _Bag("2d" if layout == "2d" else "1d", weighted, mode=mode, padding_idx=padding_idx,
                 include_last_offset=layout == "offsets_last")
    idx = torch.tensor([[1, 1, 2, 3], [2, 2, 2, 2], [0, 5, 6, 2], [4, 4, 1, 6]])  # duplicates, padding
    lengths = torch.tensor([4, 3, 0, 2])  # an empty bag too
    inputs = [idx, lengths, torch.randn(4, 4)] if weighted else [idx, lengths]
    assert_matches_reference(model, inputs, dtype, max_grad_norm=0.6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_generic_rule_vit(dtype):
    from test_generic_rule import tiny_vit

    assert_matches_reference(tiny_vit(), [torch.randn(3, 3, 8, 8)], dtype, max_grad_norm=0.5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_generic_rule_around_children(dtype):
    from dpsat_fast.layers import register_generic
    from test_generic_rule import Scaled

    net = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Flatten(1), nn.Unflatten(1, (4, 3)), nn.Tanh())
    model = nn.Sequential(net, register_generic(Scaled(3)), nn.Flatten(), nn.Linear(12, 2))
    assert_matches_reference(model, [torch.randn(4, 2, 5)], dtype, max_grad_norm=0.5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="max"), r"mode='max' is not supported.*nn.Embedding.*amax"), (dict(max_norm=1.0), "max_norm"),
    (dict(scale_grad_by_freq=True), "scale_grad_by_freq"), (dict(sparse=True), "sparse")])
def test_embedding_bag_refusals(kwargs, match):
    from dpsat_fast.validation import PrivacyConfigError, validate_model

    with pytest.raises(PrivacyConfigError, match=match):
        validate_model(nn.EmbeddingBag(5, 3, **kwargs))


def test_embedding_bag_empty_batch():
    from dpsat_fast.engine import BookKeepingEngine

    bag = nn.EmbeddingBag(5, 3)
    engine = BookKeepingEngine(bag, max_grad_norm=1.0)
    empty = torch.zeros(0, dtype=torch.long)
    for args in [(empty.view(0, 2),), (empty, empty)]:
        bag(*args).sum().backward()
        assert engine.last_batch_size == 0 and not engine.summed_grads[bag.weight].any()
        engine.clear()
    engine.detach()

"""Recurrent layers: dpsat_fast.layers.DPLSTM/DPGRU/DPRNN compute exactly what nn.LSTM/GRU/RNN compute (float64:
outputs, final states and gradients, both batch_first settings, multi-layer, bidirectional, projections,
PackedSequence, unbatched input), fix_model converts torch's and Opacus' recurrent modules, Opacus' DP RNNs also
work as they are, state dicts load both ways, and a char-LSTM trains privately with the neighbour bound."""

import copy
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from dpsat_fast import PrivacyEngine
from dpsat_fast.engine import BookKeepingEngine
from dpsat_fast.layers import DPGRU, DPLSTM, DPRNN, convert_rnn
from dpsat_fast.layers.linear import LinearRule
from dpsat_fast.layers.rnn import OpacusRNNRule
from dpsat_fast.validation import PrivacyConfigError, fix_model, model_problems, validate_model
from oracle import assert_matches_reference, neighbour_update_distance

I, H = 3, 5
KINDS = ["lstm", "lstm_proj", "gru", "rnn_tanh", "rnn_relu"]


def _torch(kind, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "lstm":
            return nn.LSTM(I, H, **kw)
        if kind == "lstm_proj":
            return nn.LSTM(I, H, proj_size=2, **kw)
        if kind == "gru":
            return nn.GRU(I, H, **kw)
        return nn.RNN(I, H, nonlinearity=kind[4:], **kw)


def _state(kind, L, B, dtype=torch.float64):
    out = 2 if kind == "lstm_proj" else H
    h = torch.randn(L, B, out, dtype=dtype)
    return (h, torch.randn(L, B, H, dtype=dtype)) if kind.startswith("lstm") else h


def _close(a, b):
    if isinstance(a, tuple):
        for x, y in zip(a, b):
            _close(x, y)
    else:
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _param_grads(module, names):
    return [getattr(module, n).grad for n in names]


CASES = list(itertools.product(KINDS, [True, False], [1, 2], [False, True], [True, False]))


@pytest.mark.parametrize("kind,batch_first,num_layers,bidirectional,bias", CASES,
                         ids=["-".join(map(str, c)) for c in CASES])
def test_converted_module_equals_torch(kind, batch_first, num_layers, bidirectional, bias):
    ref = _torch(kind, num_layers=num_layers, batch_first=batch_first, bidirectional=bidirectional,
                 bias=bias).double()
    dp = fix_model(copy.deepcopy(ref))
    assert type(dp) is {"lstm": DPLSTM, "lstm_proj": DPLSTM, "gru": DPGRU}.get(kind, DPRNN)
    B, T = 3, 6
    x = torch.randn((B, T, I) if batch_first else (T, B, I), dtype=torch.float64)
    hx = _state(kind, num_layers * (2 if bidirectional else 1), B)
    for args in [(x,), (x, hx)]:
        _close(dp(*args), ref(*args))
    # gradients: the same function, so the same parameter and input gradients
    xr, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    w = torch.randn_like(ref(x)[0])
    (ref(xr, hx)[0] * w).sum().backward()
    (dp(xd, hx)[0] * w).sum().backward()
    torch.testing.assert_close(xd.grad, xr.grad, rtol=1e-10, atol=1e-12)
    names = ref._flat_weights_names
    assert dp._flat_weights_names == names
    for n, a, b in zip(names, _param_grads(dp, names), _param_grads(ref, names)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("enforce_sorted", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_packed_sequence_equals_torch(kind, enforce_sorted, bidirectional):
    ref = _torch(kind, num_layers=2, batch_first=True, bidirectional=bidirectional).double()
    dp = convert_rnn(copy.deepcopy(ref))
    lengths = torch.tensor([6, 4, 4, 1]) if enforce_sorted else torch.tensor([4, 6, 1, 4])
    x = torch.randn(4, 6, I, dtype=torch.float64)
    hx = _state(kind, 2 * (2 if bidirectional else 1), 4)
    xr, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
    pr = pack_padded_sequence(xr, lengths, batch_first=True, enforce_sorted=enforce_sorted)
    pd = pack_padded_sequence(xd, lengths, batch_first=True, enforce_sorted=enforce_sorted)
    out_r, st_r = ref(pr, hx)
    out_d, st_d = dp(pd, hx)
    assert torch.equal(out_d.batch_sizes, out_r.batch_sizes)
    for a, b in [(out_d.sorted_indices, out_r.sorted_indices), (out_d.unsorted_indices, out_r.unsorted_indices)]:
        assert (a is None and b is None) or torch.equal(a, b)
    _close(out_d.data, out_r.data)
    _close(st_d, st_r)
    w = torch.randn_like(out_r.data)
    (out_r.data * w).sum().backward()
    (out_d.data * w).sum().backward()
    torch.testing.assert_close(xd.grad, xr.grad, rtol=1e-10, atol=1e-12)
    names = ref._flat_weights_names
    for n, a, b in zip(names, _param_grads(dp, names), _param_grads(ref, names)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("kind", KINDS)
def test_unbatched_input_equals_torch(kind):
    ref = _torch(kind, num_layers=2, bidirectional=True).double()
    dp = convert_rnn(copy.deepcopy(ref))
    x = torch.randn(5, I, dtype=torch.float64)
    _close(dp(x), ref(x))
    hx = _state(kind, 4, 1)
    hx = tuple(t[:, 0] for t in hx) if isinstance(hx, tuple) else hx[:, 0]
    _close(dp(x, hx), ref(x, hx))


def test_empty_batch():
    dp = DPLSTM(I, H, num_layers=2, bidirectional=True, batch_first=True)
    engine = BookKeepingEngine(dp, max_grad_norm=1.0)
    out, (h, c) = dp(torch.randn(0, 4, I))
    assert out.shape == (0, 4, 2 * H) and h.shape == (4, 0, H)
    out.sum().backward()
    assert engine.last_batch_size == 0 and not any(s.any() for s in engine.summed_grads.values())
    engine.detach()


def test_dropout_acts_between_layers_only():
    dp = DPLSTM(I, H, num_layers=2, dropout=0.5, batch_first=True).double()
    x = torch.randn(3, 4, I, dtype=torch.float64)
    with torch.no_grad():
        evaluated = dp.eval()(x)[0]
        trained = dp.train()(x)[0]
    assert not torch.allclose(trained, evaluated)  # dropped between the layers in train mode
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = DPGRU(I, H, num_layers=1, dropout=0.5).double()
    with torch.no_grad():
        torch.testing.assert_close(single.train()(x)[0], single.eval()(x)[0])  # never after the last layer


def test_constructor_arguments_follow_torch():
    assert DPRNN(I, H, 2, "relu").mode == "RNN_RELU"  # nonlinearity is nn.RNN's 4th positional argument
    assert DPLSTM(I, H, 1, True, True).batch_first
    with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM"):
        DPGRU(I, H, proj_size=2)
    with pytest.raises(ValueError, match="proj_size has to be smaller"):
        DPLSTM(I, H, proj_size=H)
    with pytest.raises(ValueError, match="Unknown nonlinearity"):
        DPRNN(I, H, nonlinearity="gelu")
    with pytest.raises(ValueError, match="dropout"):
        DPLSTM(I, H, dropout=1.5)
    with pytest.warns(UserWarning, match="num_layers greater than 1"):
        DPLSTM(I, H, dropout=0.2)
    with pytest.raises(RuntimeError, match="Expected hidden size"):
        DPGRU(I, H)(torch.randn(4, 2, I), torch.zeros(1, 3, H))
    with pytest.raises(RuntimeError, match="input_size"):
        DPGRU(I, H)(torch.randn(4, 2, I + 1))


def test_state_dicts_load_both_ways():
    ref = nn.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=2)
    dp = DPLSTM(I, H, num_layers=2, bidirectional=True, proj_size=2)
    dp.load_state_dict(ref.state_dict())  # torch names load as they are
    x = torch.randn(4, 3, I)
    _close_f = lambda a, b: torch.testing.assert_close(a, b)  # noqa: E731
    _close_f(dp(x)[0], ref(x)[0])
    back = dp.to_torch()
    assert type(back) is nn.LSTM and back.proj_size == 2
    _close_f(back(x)[0], ref(x)[0])
    assert set(dp.torch_state_dict()) == set(ref.state_dict())
    assert dp.weight_hr_l1_reverse is dp.hr_l1_reverse.weight  # torch's attribute names read through
    assert [[tuple(p.shape) for p in ws] for ws in dp.all_weights] == [[tuple(p.shape) for p in ws]
                                                                      for ws in ref.all_weights]
    dp.flatten_parameters()  # called by nn.LSTM code (DataParallel): a no-op here
    fresh = DPLSTM(I, H, num_layers=2, bidirectional=True, proj_size=2)
    fresh.load_state_dict(dp.state_dict())  # and its own names
    _close_f(fresh(x)[0], ref(x)[0])


def test_fix_model_converts_nested_rnns_keeping_flags_and_mode():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, I)
            self.enc = nn.ModuleDict({"lstm": nn.LSTM(I, H, batch_first=True), "gru": nn.GRU(H, H)})
            self.head = nn.Linear(H, 2)

        def forward(self, idx):
            h, _ = self.enc["lstm"](self.emb(idx))
            h, _ = self.enc["gru"](h.transpose(0, 1))
            return self.head(h[-1])

    net = Net().double()
    net.enc["gru"].weight_hh_l0.requires_grad_(False)
    net.enc["gru"].eval()
    problems = model_problems(net)
    assert any("'enc.lstm' (LSTM)" in p and "fix_model" in p and "DPLSTM" in p for p in problems), problems
    assert any("'enc.gru' (GRU)" in p and "DPGRU" in p for p in problems), problems
    idx = torch.randint(0, 10, (3, 4))
    expected = net(idx)
    fixed = fix_model(net)
    validate_model(fixed)
    assert isinstance(fixed.enc["lstm"], DPLSTM) and isinstance(fixed.enc["gru"], DPGRU)
    assert not fixed.enc["gru"].weight_hh_l0.requires_grad and fixed.enc["gru"].weight_ih_l0.requires_grad
    assert not fixed.enc["gru"].training and fixed.enc["lstm"].training
    assert fixed.enc["gru"].hh_l0.weight.dtype == torch.float64
    torch.testing.assert_close(fixed(idx), expected)


def test_cells_are_refused_with_a_fix():
    problems = model_problems(nn.Sequential(nn.LSTMCell(I, H)))
    assert len(problems) == 1 and "'0' (LSTMCell)" in problems[0] and "DPLSTM" in problems[0], problems


# -- Opacus' DP RNNs -----------------------------------------------------------------------------------

try:
    import opacus.layers as opacus_layers
except ImportError:  # the library never imports opacus; only these tests need it
    opacus_layers = None
needs_opacus = pytest.mark.skipif(opacus_layers is None, reason="opacus is not installed")


@needs_opacus
@pytest.mark.parametrize("name", ["DPLSTM", "DPGRU", "DPRNN"])
def test_opacus_rnn_used_as_it_is_is_exact(name):
    """Opacus registers the cells' parameters twice; the RNNLinear cells get the Linear rule and the engine clips
    the sum over the uses: exact against the float64 per-example reference."""
    cls = getattr(opacus_layers, name)
    model = cls(I, H, num_layers=2, bidirectional=True, batch_first=True)
    assert model_problems(model) == []
    engine = BookKeepingEngine(model, max_grad_norm=1.0)
    rules = {type(r.rule) for r in engine.records}
    assert rules == {OpacusRNNRule, LinearRule}
    engine.detach()
    for dtype in (torch.float64, torch.float32):
        assert_matches_reference(model, [torch.randn(4, 5, I)], dtype, max_grad_norm=0.5)


@needs_opacus
def test_opacus_rnn_with_packed_sequence_is_refused_with_the_fix():
    model = opacus_layers.DPLSTM(I, H, batch_first=True)
    engine = BookKeepingEngine(model, max_grad_norm=1.0)
    packed = pack_padded_sequence(torch.randn(3, 4, I), torch.tensor([4, 2, 1]), batch_first=True)
    with pytest.raises(ValueError, match=r"PackedSequence.*fix_model.*DPLSTM handles PackedSequence exactly"):
        model(packed)
    engine.detach()


@needs_opacus
def test_opacus_rnn_with_a_stray_parameter_is_refused():
    model = opacus_layers.DPGRU(I, H)
    model.register_parameter("bias_ih_l7", nn.Parameter(torch.zeros(3)))  # a torch name, not a cell's parameter
    with pytest.raises(PrivacyConfigError,
                       match=r"\['bias_ih_l7'\] are not the parameters of its RNNLinear.*fix_model"):
        validate_model(model)


@needs_opacus
@pytest.mark.parametrize("name", ["DPLSTM", "DPGRU", "DPRNN"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_fix_model_converts_opacus_rnns(name, batch_first):
    cls = getattr(opacus_layers, name)
    src = cls(I, H, num_layers=2, bidirectional=True, batch_first=batch_first).double()
    dp = fix_model(copy.deepcopy(src))
    assert type(dp).__name__ == name and type(dp).__module__ == "dpsat_fast.layers.rnn"
    x = torch.randn(3, 4, I, dtype=torch.float64)
    _close(dp(x), src(x))
    loaded = type(dp)(I, H, num_layers=2, bidirectional=True, batch_first=batch_first).double()
    loaded.load_state_dict(src.state_dict())  # Opacus saves torch's names
    _close(loaded(x), src(x))


@needs_opacus
def test_converting_opacus_rnn_with_dropout_warns_about_the_difference():
    src = opacus_layers.DPLSTM(I, H, num_layers=2, dropout=0.3)
    with pytest.warns(UserWarning, match="Opacus applies dropout to the hidden state at every time step"):
        fix_model(src)


@needs_opacus
def test_rnn_linear_gets_the_linear_rule():
    from opacus.layers.dp_rnn import RNNLinear

    model = nn.Sequential(RNNLinear(3, 4), nn.Tanh(), RNNLinear(4, 2))
    assert model_problems(model) == []
    assert_matches_reference(model, [torch.randn(5, 3)], torch.float64)


# -- private training -------------------------------------------------------------------------------------

class CharLSTM(nn.Module):
    """Opacus' char-LSTM example in small: embedding, LSTM (sequence-first, as there), linear head."""

    def __init__(self, vocab=12, classes=4, lstm=None):
        super().__init__()
        self.emb = nn.Embedding(vocab, 6)
        self.lstm = lstm if lstm is not None else nn.LSTM(6, 8, num_layers=2)
        self.out = nn.Linear(8, classes)

    def forward(self, idx):
        h, _ = self.lstm(self.emb(idx).transpose(0, 1))  # [T, B, H]
        return self.out(h[-1])


def test_char_lstm_trains_privately():
    torch.manual_seed(0)
    model = fix_model(CharLSTM())
    data = torch.utils.data.TensorDataset(torch.randint(0, 12, (64, 7)), torch.randint(0, 4, (64,)))
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    engine = PrivacyEngine()
    model, optimizer, loader = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                                  noise_multiplier=1.0, max_grad_norm=1.0, sam_rho=0.05)
    before = [p.detach().clone() for p in model.parameters()]
    for x, y in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert 0 < engine.get_epsilon(1e-5) < float("inf")


def test_neighbour_moves_the_release_by_at_most_C():
    torch.manual_seed(0)
    base = fix_model(CharLSTM(lstm=nn.LSTM(6, 8, num_layers=2, bidirectional=True, proj_size=4))).double()
    base.out = nn.Linear(8, 4).double()  # 2 directions × proj 4
    x, y = torch.randint(0, 12, (8, 7)), torch.randint(0, 4, (8,))
    outlier = torch.randint(0, 12, (1, 7))
    with torch.no_grad():  # make the outlier's gradient large: big embeddings for its tokens
        base.emb.weight[outlier.unique()] *= 50
    C, lr, expected_batch = 0.5, 1.0, 8.0
    diff = neighbour_update_distance(base, x, y, outlier, C=C, lr=lr, expected_batch=expected_batch)
    assert diff <= lr * C / expected_batch * (1 + 1e-9)
    assert diff > 0.3 * lr * C / expected_batch


def test_the_library_never_imports_opacus():
    import subprocess
    import sys

    code = ("import sys, torch; import dpsat_fast; from dpsat_fast import fix_model, validate_model;"
            "m = fix_model(torch.nn.Sequential(torch.nn.LSTM(3, 4), torch.nn.GRU(4, 4))); validate_model(m);"
            "dpsat_fast.BookKeepingEngine(m, max_grad_norm=1.0);"
            "assert not [k for k in sys.modules if k.split('.')[0] == 'opacus'], 'opacus imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]

"""torch's transformers under the engine: sequence-first modules converted exactly by fix_model (same function,
exact per-example norms), refused when left sequence-first, and evaluation of converted modules (torch's fast
paths read attributes of nn.MultiheadAttention)."""

import copy
import warnings

import pytest
import torch
from torch import nn

from dpsat_fast.layers import DPMultiheadAttention, SequenceFirstAdapter, convert_multihead_attention
from dpsat_fast.validation import PrivacyConfigError, fix_model, validate_model
from oracle import assert_matches_reference

D, H, FF = 8, 2, 12


def _build(kind, batch_first, norm_first=False):
    kw = dict(dim_feedforward=FF, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # enable_nested_tensor warnings of sequence-first encoders
        if kind == "encoder_layer":
            return nn.TransformerEncoderLayer(D, H, **kw)
        if kind == "decoder_layer":
            return nn.TransformerDecoderLayer(D, H, activation="gelu", **kw)
        if kind == "encoder":
            return nn.TransformerEncoder(nn.TransformerEncoderLayer(D, H, **kw), 2, norm=nn.LayerNorm(D))
        if kind == "decoder":
            return nn.TransformerDecoder(nn.TransformerDecoderLayer(D, H, **kw), 2, norm=nn.LayerNorm(D))
        if kind == "transformer":
            return nn.Transformer(D, H, 1, 2, dim_feedforward=FF, dropout=0.0, batch_first=batch_first,
                                  norm_first=norm_first)
    raise AssertionError(kind)


KINDS = ["encoder_layer", "decoder_layer", "encoder", "decoder", "transformer"]
TWO_SEQUENCES = {"decoder_layer", "decoder", "transformer"}


class Call(nn.Module):
    """Calls ``net`` the way users do, masks passed by keyword; the per-example masks are inputs (batch dim 0),
    so that the per-example reference slices them with the sequences."""

    def __init__(self, kind, net, S, T, masks):
        super().__init__()
        self.kind, self.net, self.masks = kind, net, masks
        self.causal = torch.ones(T, T, dtype=torch.bool).triu(1)
        self.src_causal = torch.ones(S, S, dtype=torch.bool).triu(1)

    def forward(self, *xs):
        kind, net = self.kind, self.net
        if kind in TWO_SEQUENCES:
            a, b, kpm_a, kpm_b = xs + (None,) * (4 - len(xs))
        else:
            a, kpm_a, kpm_b = xs + (None,) * (3 - len(xs))
        if not self.masks:
            return net(a) if kind not in TWO_SEQUENCES else net(a, b)
        if kind == "encoder_layer":
            return net(a, src_mask=self.src_causal, src_key_padding_mask=kpm_a, is_causal=True)
        if kind == "encoder":
            return net(a, mask=self.src_causal, src_key_padding_mask=kpm_a, is_causal=True)
        if kind in ("decoder_layer", "decoder"):
            return net(a, memory=b, tgt_mask=self.causal, tgt_key_padding_mask=kpm_a, memory_key_padding_mask=kpm_b,
                       tgt_is_causal=True)
        return net(a, b, tgt_mask=self.causal, src_key_padding_mask=kpm_a, tgt_key_padding_mask=kpm_b,
                   memory_key_padding_mask=kpm_a, tgt_is_causal=True)


def _inputs(kind, batch_first, B, S, T, masks, dtype=torch.float64):
    """(inputs, batch_dims): first sequence of length S (the decoders' target: length T), second of length S."""
    def seq(n):
        return torch.randn(B, n, D, dtype=dtype) if batch_first else torch.randn(n, B, D, dtype=dtype)

    bd = 0 if batch_first else 1
    if kind in ("decoder_layer", "decoder"):
        xs, dims = [seq(T), seq(S)], [bd, bd]
    elif kind == "transformer":
        xs, dims = [seq(S), seq(T)], [bd, bd]
    else:
        xs, dims = [seq(S)], [bd]
    if masks:
        first_len = T if kind in ("decoder_layer", "decoder") else S
        second_len = S if kind in ("decoder_layer", "decoder") else T
        kpm_a = torch.zeros(B, first_len, dtype=torch.bool)
        kpm_a[0, -1] = True
        kpm_a[-1, -2:] = True
        kpm_b = torch.zeros(B, second_len, dtype=torch.bool)
        kpm_b[1 % B, -1] = True
        xs += [kpm_a, kpm_b]
        dims += [0, 0]
    return xs, dims


@pytest.mark.parametrize("masks", [False, True], ids=["nomask", "masks"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seqfirst", "batchfirst"])
@pytest.mark.parametrize("kind", KINDS)
def test_fix_model_keeps_the_function(kind, batch_first, mode, masks):
    S, T, B = 5, 4, 3
    net = _build(kind, batch_first).double()
    original = Call(kind, net, S, T, masks)
    converted = Call(kind, fix_model(copy.deepcopy(net)), S, T, masks)
    validate_model(converted)
    if not batch_first:
        assert isinstance(converted.net, SequenceFirstAdapter) and converted.net.batch_first is False
    getattr(original, mode)()
    getattr(converted, mode)()
    xs, _ = _inputs(kind, batch_first, B, S, T, masks)
    expected = original(*xs)  # grad enabled, trainable weights: torch's regular path
    torch.testing.assert_close(converted(*xs), expected, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # eval without grad: where torch's fast paths would read nn.MultiheadAttention's weights
        torch.testing.assert_close(converted(*xs), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("masks", [False, True], ids=["nomask", "masks"])
@pytest.mark.parametrize("S,T,B", [(5, 4, 3), (3, 3, 3)], ids=["T!=B", "T==B"])
@pytest.mark.parametrize("kind", KINDS)
def test_per_example_norms_of_converted_sequence_first_modules(kind, S, T, B, masks):
    """The oracle slices the original sequence-first inputs along dimension 1 (T == B too, where a layer that saw
    [T, B, D] would be clipped per position without any error)."""
    net = fix_model(_build(kind, batch_first=False, norm_first=kind == "encoder"))
    model = Call(kind, net, S, T, masks)
    xs, dims = _inputs(kind, False, B, S, T, masks, dtype=torch.float32)
    assert_matches_reference(model, xs, torch.float64, max_grad_norm=0.5, batch_dims=dims)


def test_sequence_first_layer_without_conversion_is_refused():
    """Swapping only the attention leaves Linear/LayerNorm on [T, B, D]: refused, naming the layer and the fix."""
    model = nn.Sequential(convert_multihead_attention(_build("encoder_layer", batch_first=False)))
    with pytest.raises(PrivacyConfigError, match=r"'0' \(TransformerEncoderLayer\): batch_first=False.*fix_model"):
        validate_model(model)
    dec = convert_multihead_attention(_build("decoder", batch_first=False))
    with pytest.raises(PrivacyConfigError, match=r"'layers.1' \(TransformerDecoderLayer\): batch_first=False"):
        validate_model(dec)
    validate_model(fix_model(dec))
    validate_model(model.requires_grad_(False))  # frozen: nothing is clipped, nothing to refuse


def test_conversion_is_idempotent_and_keeps_access():
    net = fix_model(_build("transformer", batch_first=False))
    again = fix_model(net)
    assert again is net and isinstance(net.module, nn.Transformer)
    assert sum(isinstance(m, SequenceFirstAdapter) for m in net.modules()) == 1
    assert net.module.batch_first and all(m.batch_first for m in net.modules() if isinstance(m, DPMultiheadAttention))
    assert net.encoder.layers[0] is net.module.encoder.layers[0]  # attributes read through the adapter
    assert net.generate_square_subsequent_mask(3).shape == (3, 3)


def test_transformer_with_custom_encoder_converts_its_parts():
    """nn.Transformer with an encoder it cannot see into stays sequence-first; its standard decoder is converted."""
    class Custom(nn.Module):  # a sequence-first encoder of its own: [S, B, D] in and out
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D, D)

        def forward(self, src, mask=None, src_key_padding_mask=None, is_causal=None):
            return torch.tanh(self.lin(src.transpose(0, 1))).transpose(0, 1)

    t = nn.Transformer(D, H, dim_feedforward=FF, dropout=0.0, custom_encoder=Custom(),
                       custom_decoder=_build("decoder", False)).double()
    original = copy.deepcopy(t)
    fixed = fix_model(t)
    assert type(fixed) is nn.Transformer and isinstance(fixed.decoder, SequenceFirstAdapter)
    src, tgt = torch.randn(5, 3, D, dtype=torch.float64), torch.randn(4, 3, D, dtype=torch.float64)
    torch.testing.assert_close(fixed(src, tgt), original(src, tgt))
    validate_model(fixed)


@pytest.mark.parametrize("padding", [False, True], ids=["nomask", "padding"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seqfirst", "batchfirst"])
@pytest.mark.parametrize("kind", ["encoder_layer", "encoder"])
def test_eval_forward_of_converted_encoders(kind, batch_first, padding):
    """Converted encoders evaluate (torch's fast path bails out on DPMultiheadAttention instead of crashing), in
    no_grad and inference_mode, and equal the original computed by torch's regular path."""
    S, B = 6, 4
    original = _build(kind, batch_first).eval()  # an even head count: torch's fast path would be eligible
    fixed = fix_model(copy.deepcopy(original)).eval()
    if kind == "encoder":
        inner = fixed.module if isinstance(fixed, SequenceFirstAdapter) else fixed
        assert inner.use_nested_tensor is False
    x = torch.randn(B, S, D) if batch_first else torch.randn(S, B, D)
    kpm = None
    if padding:
        kpm = torch.zeros(B, S, dtype=torch.bool)
        kpm[1, -2:] = True
    expected = original(x, src_key_padding_mask=kpm)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            out = fixed(x, src_key_padding_mask=kpm)
        torch.testing.assert_close(out, expected.detach(), rtol=1e-5, atol=1e-5)


def test_new_encoder_around_converted_layer_evaluates():
    """An nn.TransformerEncoder built from a converted batch-first layer reads self_attn attributes at
    construction and in eval: no AttributeError, regular path."""
    layer = fix_model(_build("encoder_layer", batch_first=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        enc = nn.TransformerEncoder(layer, 2).eval()
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[0, -1] = True
    with torch.no_grad():
        out = enc(torch.randn(2, 5, D), src_key_padding_mask=kpm)
    assert out.shape == (2, 5, D) and torch.isfinite(out).all()


def test_dp_attention_reports_no_packed_projection():
    mha = DPMultiheadAttention.from_torch(nn.MultiheadAttention(D, H, batch_first=True))
    assert mha.in_proj_weight is None and mha.in_proj_bias is None and mha._qkv_same_embed_dim
    assert not DPMultiheadAttention(D, H, kdim=6)._qkv_same_embed_dim
    assert "in_proj_weight" not in mha.state_dict()

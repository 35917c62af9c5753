"""Layer selection for private fine-tuning: the selectors, and that frozen parts cost nothing (no hooks, no
gradients, no norm work, no backward below the lowest trainable layer) while the trained part is exact."""
from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from dpsat_fast.engine import BookKeepingEngine
from dpsat_fast.models import DigitsCNN
from dpsat_fast.optim import DPOptimizer
from dpsat_fast.selection import blocks, parse_selection, select_trainable
from oracle import engine_results, per_example_grads, reference_clipped_sums


def test_blocks_open_containers_only():
    assert [n for n, _ in blocks(DigitsCNN())] == ["features.0", "features.1", "features.4", "features.5",
                                                   "classifier.1", "classifier.3"]


@pytest.mark.parametrize("kwargs, expected", [
    ({"head": True}, ["classifier.3.weight", "classifier.3.bias"]),
    ({"last_k": 2}, ["classifier.1.weight", "classifier.1.bias", "classifier.3.weight", "classifier.3.bias"]),
    ({"norms": True, "head": True}, ["features.1.weight", "features.1.bias", "features.5.weight", "features.5.bias",
                                     "classifier.3.weight", "classifier.3.bias"]),
    ({"biases": True}, ["features.0.bias", "features.1.bias", "features.4.bias", "features.5.bias",
                        "classifier.1.bias", "classifier.3.bias"]),
    ({"patterns": ["features.4.*"]}, ["features.4.weight", "features.4.bias"]),
])
def test_selectors(kwargs, expected):
    model = DigitsCNN()
    assert select_trainable(model, **kwargs) == expected
    assert [n for n, p in model.named_parameters() if p.requires_grad] == expected


def test_selection_errors_and_parsing():
    with pytest.raises(ValueError, match="empty"):
        select_trainable(DigitsCNN())
    with pytest.raises(ValueError, match="matches no parameter"):
        select_trainable(DigitsCNN(), patterns=["fc.*"])
    with pytest.raises(ValueError, match="last_k"):
        select_trainable(DigitsCNN(), last_k=7)
    assert parse_selection("norms+head") == {"norms": True, "head": True}
    assert parse_selection("last:2+bias+pattern:a.*,b.*") == {"last_k": 2, "biases": True, "patterns": ["a.*", "b.*"]}
    assert parse_selection("all") == {"patterns": ["*"]}
    with pytest.raises(ValueError, match="unknown selection part"):
        parse_selection("top3")


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func.overloadpacket)] += 1  # "aten.convolution_backward", "dpsat_fast.conv_weight_sq_norms"
        return func(*args, **(kwargs or {}))


def _one_private_backward(model, x, y):
    engine = BookKeepingEngine(model, max_grad_norm=1.0)
    with _CountOps() as counter:
        F.cross_entropy(model(x), y).backward()
    return engine, counter.calls


def test_frozen_layers_are_free():
    torch.manual_seed(0)
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 10, (5,))
    model = DigitsCNN()
    select_trainable(model, last_k=2)  # the two Linear layers of the classifier
    engine, calls = _one_private_backward(model, x, y)
    assert calls["aten.addmm"] > 0  # the counter sees the ops (the names below are not vacuous)
    # hooks and records only for the trainable modules; the frozen ones keep their own forward
    assert [r.name for r in engine.records] == ["classifier.1", "classifier.3"]
    assert all("forward" not in m.__dict__ for n, m in model.named_modules() if n.startswith("features"))
    # norm work only for trainable parameters; no backward at all below the classifier
    assert sorted(engine.last_sq_norms) == ["classifier.1.bias", "classifier.1.weight", "classifier.3.bias",
                                            "classifier.3.weight"]
    assert calls["aten.convolution_backward"] == 0
    assert calls["aten.native_group_norm_backward"] == 0
    assert calls["dpsat_fast.conv_weight_sq_norms"] == 0 and calls["dpsat_fast.affine_per_example_grads"] == 0
    assert calls["dpsat_fast.linear_weight_sq_norms"] == 2
    opt = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), engine=engine, noise_multiplier=1.0,
                      expected_batch_size=5, seed=1)
    opt.step()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == n.startswith("classifier"), n
    engine.detach()


def test_frozen_middle_layer_passes_the_gradient_but_does_no_norm_work():
    """Norm layers + head trainable: the convs are frozen, but the backward must cross them (input gradients
    only, no weight gradients, no per-example work)."""
    torch.manual_seed(0)
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 10, (5,))
    model = DigitsCNN()
    select_trainable(model, norms=True, head=True)
    engine, calls = _one_private_backward(model, x, y)
    assert [r.name for r in engine.records] == ["features.1", "features.5", "classifier.3"]
    assert calls["dpsat_fast.conv_weight_sq_norms"] == 0 and calls["dpsat_fast.conv_per_example_grads"] == 0
    assert calls["dpsat_fast.affine_per_example_grads"] == 2
    # the second conv passes the gradient down to the first GroupNorm (its input gradient), the first
    # conv (below every trainable layer) is not differentiated
    assert calls["aten.convolution_backward"] == 1
    engine.detach()


@pytest.mark.parametrize("spec", ["norms+head", "bias", "last:3"])
def test_selected_layers_clip_exactly(spec):
    """The trainable subset's clipped sums equal the float64 per-example reference over that subset only."""
    torch.manual_seed(0)
    model = DigitsCNN().double()
    select_trainable(model, **parse_selection(spec))
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    weights = torch.randn(6, 10, dtype=torch.float64)
    grads = per_example_grads(model, [x], weights)
    assert set(grads) == {n for n, p in model.named_parameters() if p.requires_grad}
    _, sums = engine_results(model, [x], weights, 0.5)
    for n, ref in reference_clipped_sums(grads, 0.5).items():
        torch.testing.assert_close(sums[n].double(), ref, rtol=1e-9, atol=1e-12, msg=n)

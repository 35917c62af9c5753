"""Model zoo: shapes, parameter counts, DP compatibility (no BatchNorm, Opacus validator), backward."""

import pytest
import torch
from opacus.validators import ModuleValidator
from torch import nn

from dpsat_fast.models import INPUT_SHAPES, MODELS, NUM_CLASSES, DigitsCNN, build_model

# (low, high) parameter counts; the ResNets match the BatchNorm originals (GN has the same affine params).
PARAM_RANGES = {
    "digits_cnn": (2_000, 50_000),
    "mnist1d_cnn": (100_000, 200_000),
    "resnet18_gn": (11_100_000, 11_250_000),
    "wrn16_4_gn": (2_650_000, 2_800_000),
    "resnet50_gn": (25_400_000, 25_700_000),
}

# Spatial size used for the forward+backward test; ResNet-50 runs on a reduced 64×64 input (its global
# pooling accepts any size) to keep the CPU test fast; its 224×224 shape is checked without gradients.
BACKWARD_SPATIAL = {"digits_cnn": 8, "mnist1d_cnn": None, "resnet18_gn": 32, "wrn16_4_gn": 32, "resnet50_gn": 64}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_registries_agree():
    assert set(MODELS) == set(INPUT_SHAPES) == set(NUM_CLASSES) == set(PARAM_RANGES)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_param_count_in_range(name):
    model = build_model(name)
    count = sum(p.numel() for p in model.parameters())
    low, high = PARAM_RANGES[name]
    assert low <= count <= high, f"{name}: {count} parameters"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_no_batchnorm_and_opacus_validates(name):
    model = build_model(name)
    norm_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    assert not any(isinstance(m, norm_types) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert ModuleValidator.validate(model, strict=False) == []


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_backward(name):
    model = build_model(name)
    channels = INPUT_SHAPES[name][0]
    side = BACKWARD_SPATIAL[name]
    x = torch.randn(2, *INPUT_SHAPES[name]) if side is None else torch.randn(2, channels, side, side)
    y = torch.randint(0, NUM_CLASSES[name], (2,))
    logits = model(x)
    assert logits.shape == (2, NUM_CLASSES[name])
    nn.functional.cross_entropy(logits, y).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, pname
        assert torch.isfinite(p.grad).all(), pname


def test_resnet50_full_resolution_shape():
    model = build_model("resnet50_gn").eval()
    with torch.no_grad():
        logits = model(torch.randn(1, *INPUT_SHAPES["resnet50_gn"]))
    assert logits.shape == (1, 1000)


def test_num_classes_and_channels_configurable():
    model = DigitsCNN(num_classes=7, channels=(8, 12), groups=4)
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 7)
    assert build_model("wrn16_4_gn", num_classes=100)(torch.randn(1, 3, 32, 32)).shape == (1, 100)


def test_bad_groups_rejected():
    with pytest.raises(ValueError, match="groups"):
        DigitsCNN(channels=(6, 32), groups=4)


def test_unknown_model_name():
    with pytest.raises(KeyError, match="digits_cnn"):
        build_model("vgg")


def test_mnist1d_cnn_blocks_and_exact_per_example_norms():
    """The 1-D CNN: 5 selectable blocks (3 conv blocks, fc, head), [B, 40] or [B, 1, 40] input, and the engine's
    per-example norms of every layer (Conv1d, GroupNorm, Linear) match a float64 per-example loop."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from oracle import engine_results, per_example_grads

    from dpsat_fast.models import MNIST1DCNN
    from dpsat_fast.selection import blocks

    model = MNIST1DCNN()
    assert [n for n, _ in blocks(model)] == ["blocks.0", "blocks.1", "blocks.2", "fc", "head"]
    assert sum(p.numel() for p in model.parameters()) == 134_666
    x = torch.randn(5, 1, 40)
    torch.testing.assert_close(model(x), model(x.squeeze(1)))
    model = model.double()
    x, w = x.double(), torch.randn(5, 10, dtype=torch.float64)
    ref = per_example_grads(model, [x], w)
    sq, sums = engine_results(model, [x], w, max_grad_norm=1e9)
    assert set(sq) == set(ref) == {n for n, _ in model.named_parameters()}
    for name, g in ref.items():
        torch.testing.assert_close(sq[name], g.flatten(1).pow(2).sum(1), rtol=1e-6, atol=1e-10)
        torch.testing.assert_close(sums[name], g.sum(0), rtol=1e-6, atol=1e-10)

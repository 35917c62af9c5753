"""Reference models for training and benchmarks, built only from DP-friendly layers.

Every model uses Conv1d/Conv2d, Linear, GroupNorm, ReLU, pooling and Flatten: no BatchNorm (it mixes examples
in a batch, so per-example gradients stop being per-example) and no in-place activations (an in-place
op on a hooked layer's output breaks full backward hooks, which Opacus relies on).

- ``DigitsCNN``: a ~15k-parameter CNN for scikit-learn's 8×8 digits, fast on 2 CPU cores.
- ``MNIST1DCNN``: a ~135k-parameter 1-D CNN (Conv1d + GroupNorm, MLP head) for MNIST-1D signals of length 40.
- ``resnet18_gn``: CIFAR-style ResNet-18 (He et al., 2016) with GroupNorm, ~11.2M parameters.
- ``wrn16_4_gn``: Wide-ResNet-16-4 (Zagoruyko & Komodakis, 2016), pre-activation, GroupNorm, ~2.7M.
- ``resnet50_gn``: ImageNet ResNet-50 (v1.5, stride in the 3×3 conv) with GroupNorm, ~25.6M.

GroupNorm replacing BatchNorm is the standard recipe for DP image models (De et al., 2022,
"Unlocking high-accuracy differentially private image classification through scale").
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

__all__ = [
    "DigitsCNN",
    "MNIST1DCNN",
    "ConvGNBlock1d",
    "resnet18_gn",
    "wrn16_4_gn",
    "resnet50_gn",
    "MODELS",
    "INPUT_SHAPES",
    "NUM_CLASSES",
    "build_model",
]


def _group_norm(num_channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with ``min(groups, num_channels)`` groups; the channel count must divide evenly."""
    num_groups = min(groups, num_channels)
    if num_channels % num_groups != 0:
        raise ValueError(f"GroupNorm: {num_channels} channels do not split into {num_groups} groups")
    return nn.GroupNorm(num_groups, num_channels)


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class DigitsCNN(nn.Module):
    """Small GroupNorm CNN for 8×8 single-channel digits: input ``[B, 1, 8, 8]``, logits ``[B, num_classes]``.

    conv3×3 → GN → ReLU → maxpool (4×4) → conv3×3 → GN → ReLU → avgpool (2×2) → Linear → ReLU → Linear.
    """

    def __init__(self, num_classes: int = 10, channels: Sequence[int] = (16, 32), groups: int = 4):
        super().__init__()
        c1, c2 = channels
        hidden = 64
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, kernel_size=3, padding=1),
            _group_norm(c1, groups),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, kernel_size=3, padding=1),
            _group_norm(c2, groups),
            nn.ReLU(),
            nn.AvgPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * 2 * 2, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class ConvGNBlock1d(nn.Module):
    """Conv1d → GroupNorm → ReLU: one block (one unit for ``selection.blocks`` / ``--trainable last:K``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, groups: int):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2)
        self.gn = _group_norm(out_channels, groups)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.gn(self.conv(x)))


class MNIST1DCNN(nn.Module):
    """GroupNorm 1-D CNN for MNIST-1D (Greydanus, 2020): input ``[B, 1, length]`` (``[B, length]`` is accepted),
    logits ``[B, num_classes]``.

    Three Conv1d(k=5) → GroupNorm → ReLU blocks, 1 → 32 → 64 → 128 channels, strides 1, 2, 2 (40 → 40 → 20 →
    10 positions), Flatten, then Linear(1280 → 64) → ReLU → Linear(64 → classes) (no global pooling: where a
    pattern sits matters in MNIST-1D). 134,666 parameters at the defaults, most of them in the first Linear,
    so that a DP step costs about 0.6M multiply-adds per example (a 1→64→128→128 stack of the same size costs
    1.6M) on 2 CPU cores. Only Conv1d, GroupNorm and Linear hold parameters, all supported by the engine.
    Blocks for layer selection (``--trainable last:K``): ``blocks.0``, ``blocks.1``, ``blocks.2``, ``fc``,
    ``head``.
    """

    def __init__(self, num_classes: int = 10, length: int = 40, channels: Sequence[int] = (32, 64, 128),
                 strides: Sequence[int] = (1, 2, 2), hidden: int = 64, groups: int = 8, kernel_size: int = 5):
        super().__init__()
        if len(channels) != len(strides):
            raise ValueError(f"one stride per conv block: {len(channels)} channels, {len(strides)} strides")
        widths = [1, *channels]
        self.blocks = nn.Sequential(*[ConvGNBlock1d(widths[i], widths[i + 1], kernel_size, strides[i], groups)
                                      for i in range(len(channels))])
        out_length = length
        for stride in strides:
            out_length = (out_length + 2 * (kernel_size // 2) - kernel_size) // stride + 1
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[-1] * out_length, hidden)
        self.relu = nn.ReLU()
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        return self.head(self.relu(self.fc(self.flatten(self.blocks(x)))))


class BasicBlock(nn.Module):
    """ResNet basic block (two 3×3 convs), post-activation, GroupNorm; a 1×1 conv + GN shortcut where
    the shape changes."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int, groups: int):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, channels, stride)
        self.gn1 = _group_norm(channels, groups)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(channels, channels)
        self.gn2 = _group_norm(channels, groups)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                _conv1x1(in_channels, channels, stride), _group_norm(channels, groups)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.gn1(self.conv1(x)))
        out = self.gn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (1×1 → 3×3 with stride → 1×1, ×4 expansion), GroupNorm."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int, groups: int):
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = _conv1x1(in_channels, channels)
        self.gn1 = _group_norm(channels, groups)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(channels, channels, stride)
        self.gn2 = _group_norm(channels, groups)
        self.relu2 = nn.ReLU()
        self.conv3 = _conv1x1(channels, out_channels)
        self.gn3 = _group_norm(out_channels, groups)
        self.relu3 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                _conv1x1(in_channels, out_channels, stride), _group_norm(out_channels, groups)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.gn1(self.conv1(x)))
        out = self.relu2(self.gn2(self.conv2(out)))
        out = self.gn3(self.conv3(out))
        return self.relu3(out + self.shortcut(x))


class ResNetGN(nn.Module):
    """ResNet with GroupNorm; ``cifar_stem`` picks a 3×3 stride-1 stem without max-pool (32×32 inputs)
    instead of the ImageNet 7×7 stride-2 stem with 3×3 max-pool (224×224 inputs)."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        num_blocks: Sequence[int],
        num_classes: int,
        groups: int,
        cifar_stem: bool,
        widths: Sequence[int] = (64, 128, 256, 512),
    ):
        super().__init__()
        stem_channels = widths[0]
        if cifar_stem:
            self.stem = nn.Sequential(
                _conv3x3(3, stem_channels), _group_norm(stem_channels, groups), nn.ReLU()
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(3, stem_channels, kernel_size=7, stride=2, padding=3, bias=False),
                _group_norm(stem_channels, groups),
                nn.ReLU(),
                nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            )
        stages = []
        in_channels = stem_channels
        for stage_index, (width, count) in enumerate(zip(widths, num_blocks)):
            blocks = []
            for block_index in range(count):
                stride = 2 if stage_index > 0 and block_index == 0 else 1
                blocks.append(block(in_channels, width, stride, groups))
                in_channels = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.stages(self.stem(x)))))


class WideBasicBlock(nn.Module):
    """Pre-activation wide block: GN → ReLU → conv3×3 → GN → ReLU → conv3×3, plus a (1×1 conv) shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int, groups: int):
        super().__init__()
        self.gn1 = _group_norm(in_channels, groups)
        self.relu1 = nn.ReLU()
        self.conv1 = _conv3x3(in_channels, channels, stride)
        self.gn2 = _group_norm(channels, groups)
        self.relu2 = nn.ReLU()
        self.conv2 = _conv3x3(channels, channels)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != channels:
            self.shortcut = _conv1x1(in_channels, channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.relu1(self.gn1(x))
        out = self.conv2(self.relu2(self.gn2(self.conv1(pre))))
        # Pre-activation ResNet: a projection shortcut reads the pre-activated input.
        skip = x if self.shortcut is None else self.shortcut(pre)
        return out + skip


class WideResNetGN(nn.Module):
    """Wide-ResNet-``depth``-``widen`` for 32×32 inputs: (depth − 4) / 6 blocks per stage, widths
    16·k, 32·k, 64·k after a 16-channel 3×3 stem; final GN → ReLU → global average pool → Linear."""

    def __init__(self, depth: int, widen: int, num_classes: int, groups: int):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"Wide-ResNet depth must be 6n + 4, got {depth}")
        blocks_per_stage = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.stem = _conv3x3(3, 16)
        stages = []
        in_channels = 16
        for stage_index, width in enumerate(widths):
            blocks = []
            for block_index in range(blocks_per_stage):
                stride = 2 if stage_index > 0 and block_index == 0 else 1
                blocks.append(WideBasicBlock(in_channels, width, stride, groups))
                in_channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(
            _group_norm(in_channels, groups),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(in_channels, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def resnet18_gn(num_classes: int = 10, groups: int = 32) -> ResNetGN:
    """CIFAR ResNet-18 with GroupNorm: input ``[B, 3, 32, 32]``, ~11.2M parameters."""
    return ResNetGN(BasicBlock, (2, 2, 2, 2), num_classes, groups, cifar_stem=True)


def wrn16_4_gn(num_classes: int = 10, groups: int = 16) -> WideResNetGN:
    """Wide-ResNet-16-4 with GroupNorm: input ``[B, 3, 32, 32]``, ~2.7M parameters."""
    return WideResNetGN(depth=16, widen=4, num_classes=num_classes, groups=groups)


def resnet50_gn(num_classes: int = 1000, groups: int = 32) -> ResNetGN:
    """ImageNet ResNet-50 with GroupNorm: input ``[B, 3, 224, 224]``, ~25.6M parameters."""
    return ResNetGN(Bottleneck, (3, 4, 6, 3), num_classes, groups, cifar_stem=False)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "digits_cnn": DigitsCNN,
    "mnist1d_cnn": MNIST1DCNN,
    "resnet18_gn": resnet18_gn,
    "wrn16_4_gn": wrn16_4_gn,
    "resnet50_gn": resnet50_gn,
}

INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "digits_cnn": (1, 8, 8),
    "mnist1d_cnn": (1, 40),
    "resnet18_gn": (3, 32, 32),
    "wrn16_4_gn": (3, 32, 32),
    "resnet50_gn": (3, 224, 224),
}
"""Per-example input shape (without the batch dimension) of each model in ``MODELS``."""

NUM_CLASSES: dict[str, int] = {
    "digits_cnn": 10,
    "mnist1d_cnn": 10,
    "resnet18_gn": 10,
    "wrn16_4_gn": 10,
    "resnet50_gn": 1000,
}
"""Default number of classes of each model in ``MODELS``."""


def build_model(name: str, **kwargs) -> nn.Module:
    """Build ``MODELS[name](**kwargs)``; raises ``KeyError`` naming the known models otherwise."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    return MODELS[name](**kwargs)

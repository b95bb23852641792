"""Small CNNs for the demo, the tests and the benchmarks.

Each factory is usable as ``--arch prunecp_cli.models:NAME`` with ``--arch-kwargs`` for its
arguments. They cover the three couplings structural pruning must handle: plain chains (VGG-style),
residual additions with projection shortcuts (ResNet-style) and depthwise convolutions inside
residual blocks (MobileNet-style).
"""

from __future__ import annotations

from torch import nn


def _conv_bn(c_in: int, c_out: int, *, stride: int = 1, groups: int = 1, kernel: int = 3, relu: bool = True):
    layers = [nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
              nn.BatchNorm2d(c_out)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class DigitsCNN(nn.Module):
    """Three conv-BN-ReLU layers and a linear classifier, for 8×8 digits.

    Args:
        num_classes: outputs.
        in_channels: input channels.
        width: channels of the first layer (later layers have twice as many).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn(in_channels, width),
            _conv_bn(width, 2 * width),
            nn.MaxPool2d(2),
            _conv_bn(2 * width, 2 * width),
            nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class VGGSmall(nn.Module):
    """VGG-style: stages of two conv-BN-ReLU layers and max-pooling, then a two-layer head.

    Args:
        num_classes: outputs.
        in_channels: input channels.
        widths: channels per stage.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        layers, c_in = [], in_channels
        for width in widths:
            layers += [_conv_bn(c_in, width), _conv_bn(width, width), nn.MaxPool2d(2)]
            c_in = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1))
        self.classifier = nn.Sequential(nn.Linear(c_in, 2 * c_in), nn.ReLU(inplace=True), nn.Linear(2 * c_in, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with an identity or 1×1 projection shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv_bn(c_in, c_out, stride=stride)
        self.conv2 = _conv_bn(c_out, c_out, relu=False)
        self.shortcut = (
            _conv_bn(c_in, c_out, stride=stride, kernel=1, relu=False) if stride != 1 or c_in != c_out
            else nn.Identity()
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNetSmall(nn.Module):
    """CIFAR-style ResNet: a stem and stages of BasicBlocks with projection shortcuts.

    Args:
        num_classes: outputs.
        in_channels: input channels.
        widths: channels per stage (each later stage halves the resolution).
        blocks: BasicBlocks per stage.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths: tuple[int, ...] = (16, 32, 64),
                 blocks: int = 2) -> None:
        super().__init__()
        self.stem = _conv_bn(in_channels, widths[0])
        stages, c_in = [], widths[0]
        for i, width in enumerate(widths):
            stage = [BasicBlock(c_in, width, stride=1 if i == 0 else 2)]
            stage += [BasicBlock(width, width) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            c_in = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1×1 expansion, 3×3 depthwise, 1×1 projection, residual when shapes allow."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, expand: int = 4) -> None:
        super().__init__()
        hidden = c_in * expand
        self.block = nn.Sequential(
            _conv_bn(c_in, hidden, kernel=1),
            _conv_bn(hidden, hidden, stride=stride, groups=hidden),
            _conv_bn(hidden, c_out, kernel=1, relu=False),
        )
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        out = self.block(x)
        return x + out if self.residual else out


class MobileNetSmall(nn.Module):
    """MobileNetV2-style: a stem, inverted residual blocks with depthwise convolutions, a 1×1 head conv.

    Args:
        num_classes: outputs.
        in_channels: input channels.
        widths: output channels per stage (two blocks each; later stages halve the resolution).
        expand: expansion factor of the blocks.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths: tuple[int, ...] = (16, 24, 32),
                 expand: int = 4) -> None:
        super().__init__()
        self.stem = _conv_bn(in_channels, widths[0])
        blocks, c_in = [], widths[0]
        for i, width in enumerate(widths):
            blocks += [InvertedResidual(c_in, width, stride=1 if i == 0 else 2, expand=expand),
                       InvertedResidual(width, width, expand=expand)]
            c_in = width
        self.blocks = nn.Sequential(*blocks)
        self.head = _conv_bn(c_in, 4 * c_in, kernel=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * c_in, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.head(self.blocks(self.stem(x)))).flatten(1))


def digits_cnn(num_classes: int = 10, in_channels: int = 1, width: int = 16) -> DigitsCNN:
    """The demo's CNN for scikit-learn's 8×8 digits."""
    return DigitsCNN(num_classes, in_channels, width)


def vgg_small(num_classes: int = 10, in_channels: int = 1, widths: tuple[int, ...] = (16, 32, 64)) -> VGGSmall:
    """A VGG-style network with BatchNorm."""
    return VGGSmall(num_classes, in_channels, tuple(widths))


def resnet_small(num_classes: int = 10, in_channels: int = 1, widths: tuple[int, ...] = (16, 32, 64),
                 blocks: int = 2) -> ResNetSmall:
    """A ResNet-style network with projection shortcuts."""
    return ResNetSmall(num_classes, in_channels, tuple(widths), blocks)


def mobilenet_small(num_classes: int = 10, in_channels: int = 1, widths: tuple[int, ...] = (16, 24, 32),
                    expand: int = 4) -> MobileNetSmall:
    """A MobileNetV2-style network with depthwise convolutions."""
    return MobileNetSmall(num_classes, in_channels, tuple(widths), expand)

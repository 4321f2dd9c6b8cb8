"""Standard architectures written as ONNX with seeded random weights (no downloads, no PyTorch).

Layer-for-layer the torchvision definitions, so parameter counts and MACs match the published
figures at full width and 224x224; ``width`` and ``resolution`` shrink them for fast tests.
"""

from __future__ import annotations

import numpy as np
import onnx

from .builder import ModelBuilder


def _calib_batch(rng: np.random.Generator, res: int) -> np.ndarray:
    # Enough samples that per-channel statistics of the deepest (smallest) maps are stable.
    n = int(np.clip(4096 // (res * res) * 4, 4, 16))
    return rng.standard_normal((n, 3, res, res)).astype(np.float32)


def _ch(c: float, width: float, divisor: int = 8) -> int:
    """torchvision's _make_divisible: round to a multiple of divisor, never below 90 %."""
    v = c * width
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new < 0.9 * v:
        new += divisor
    return new


def resnet(
    depth: int, width: float = 1.0, resolution: int = 224, num_classes: int = 1000, seed: int = 0
) -> onnx.ModelProto:
    basic = depth in (18, 34)
    blocks = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3]}[depth]
    b = ModelBuilder(f"resnet{depth}", seed)
    x = b.input("input", (3, resolution, resolution), _calib_batch(b.rng, resolution))
    base = max(8, int(round(64 * width)))
    x = b.relu(b.bn(b.conv(x, base, 7, stride=2, pad=3)))
    x = b.maxpool(x, 3, 2, 1)
    in_ch = base
    expansion = 1 if basic else 4
    for stage, n in enumerate(blocks):
        planes = base * 2**stage
        for i in range(n):
            stride = 2 if (stage > 0 and i == 0) else 1
            identity = x
            if basic:
                y = b.relu(b.bn(b.conv(x, planes, 3, stride)))
                y = b.bn(b.conv(y, planes, 3), gain=0.5)
            else:
                y = b.relu(b.bn(b.conv(x, planes, 1, pad=0)))
                y = b.relu(b.bn(b.conv(y, planes, 3, stride)))
                y = b.bn(b.conv(y, planes * 4, 1, pad=0), gain=0.5)
            if stride != 1 or in_ch != planes * expansion:
                identity = b.bn(b.conv(x, planes * expansion, 1, stride, pad=0))
            x = b.relu(b.add(y, identity))
            in_ch = planes * expansion
    x = b.flatten(b.gap(x))
    b.output(b.gemm(x, num_classes, target_std=1.0))
    return b.build(f"ResNet-{depth} (torchvision layout), seeded random weights, BN calibrated")


def resnet18(**kw) -> onnx.ModelProto:
    return resnet(18, **kw)


def resnet50(**kw) -> onnx.ModelProto:
    return resnet(50, **kw)


def mobilenetv2(
    width: float = 1.0, resolution: int = 224, num_classes: int = 1000, seed: int = 0
) -> onnx.ModelProto:
    b = ModelBuilder("mobilenetv2", seed)
    x = b.input("input", (3, resolution, resolution), _calib_batch(b.rng, resolution))
    in_ch = _ch(32, width)
    last = _ch(1280, max(1.0, width))
    x = b.relu6(b.bn(b.conv(x, in_ch, 3, stride=2)))
    for t, c, n, s in [
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ]:
        out_ch = _ch(c, width)
        for i in range(n):
            stride = s if i == 0 else 1
            hidden = int(round(in_ch * t))
            y = x
            if t != 1:
                y = b.relu6(b.bn(b.conv(y, hidden, 1, pad=0)))
            y = b.relu6(b.bn(b.conv(y, hidden, 3, stride, groups=hidden)))
            y = b.bn(b.conv(y, out_ch, 1, pad=0), gain=0.5 if stride == 1 and in_ch == out_ch else 1.0)
            x = b.add(x, y) if stride == 1 and in_ch == out_ch else y
            in_ch = out_ch
    x = b.relu6(b.bn(b.conv(x, last, 1, pad=0)))
    x = b.flatten(b.gap(x))
    b.output(b.gemm(x, num_classes, target_std=1.0))
    return b.build("MobileNetV2 (torchvision layout), seeded random weights, BN calibrated")


def alexnet(
    width: float = 1.0, resolution: int = 224, num_classes: int = 1000, seed: int = 0
) -> onnx.ModelProto:
    """A plain chain: every cut crosses exactly one tensor."""
    b = ModelBuilder("alexnet", seed)
    x = b.input("input", (3, resolution, resolution), _calib_batch(b.rng, resolution))

    def c(v: float) -> int:
        return max(8, int(round(v * width)))

    x = b.maxpool(b.relu(b.conv(x, c(64), 11, stride=4, pad=2, bias=True)), 3, 2)
    x = b.maxpool(b.relu(b.conv(x, c(192), 5, pad=2, bias=True)), 3, 2)
    x = b.relu(b.conv(x, c(384), 3, bias=True))
    x = b.relu(b.conv(x, c(256), 3, bias=True))
    x = b.maxpool(b.relu(b.conv(x, c(256), 3, bias=True)), 3, 2)
    x = b.flatten(x)
    x = b.relu(b.gemm(x, c(4096)))
    x = b.relu(b.gemm(x, c(4096)))
    b.output(b.gemm(x, num_classes, target_std=1.0))
    return b.build("AlexNet (torchvision layout without adaptive pooling), seeded random weights")


def multitask(
    width: float = 1.0, resolution: int = 64, num_classes: int = 10, seed: int = 0
) -> onnx.ModelProto:
    """Two inputs (image, 16-d metadata) and three outputs, one of them produced early.

    Exercises what chains never do: a raw input needed deep in the graph, a graph output
    produced inside the head, and one weight tensor shared by two layers far apart.
    """
    b = ModelBuilder("multitask", seed)
    x = b.input("image", (3, resolution, resolution), _calib_batch(b.rng, resolution))
    meta = b.input("meta", (16,), b.rng.standard_normal((b.values[x].shape[0], 16)))
    c = max(8, int(round(32 * width)))
    x = b.relu(b.bn(b.conv(x, c, 3, stride=2)))
    x = b.relu(b.bn(b.conv(x, c, 3)))
    b.output(b.gemm(b.flatten(b.gap(x)), num_classes, target_std=1.0))  # auxiliary head
    tied = b.conv(x, c, 3)
    w_shared = b.nodes[-1].input[1]
    y = b.relu(b.bn(tied))
    y = b.relu(b.bn(b.conv(y, c, 3, stride=2)))
    y = b.relu(b.bn(b.conv(y, c, 3, w=w_shared)))  # same weights as three layers earlier
    y = b.flatten(b.gap(y))
    m = b.relu(b.gemm(meta, 32))
    z = b.relu(b.gemm(b.concat([y, m]), 64))
    b.output(b.gemm(z, num_classes, target_std=1.0))
    b.output(b.gemm(z, 4, target_std=1.0))
    return b.build("Two inputs, three outputs (auxiliary, logits, box), tied weights")

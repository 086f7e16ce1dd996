"""A plain ``torch.nn`` WideResNet in TRADES's layout (yaodongyu/TRADES ``models/wideresnet.py``): the
tests' independent reference, written from the architecture (Zagoruyko & Komodakis 2016) and that
file's module names and forward order.

- ``conv1`` (3x3, 16 channels, no bias);
- ``block1``, ``block2``, ``block3``: each a ``NetworkBlock`` whose ``layer`` is a ``Sequential`` of
  ``n = (depth - 4) / 6`` :class:`Block`; and ``sub_block1``, a fourth group built like ``block1``
  that TRADES registers but never calls (its tensors are in every TRADES state dict);
- a block holds ``bn1``, ``conv1``, ``bn2``, ``conv2`` and, where its in and out channels differ,
  ``convShortcut`` (1x1, with the block's stride); where they differ the residual branch and the
  shortcut both start from ``relu(bn1(x))``; where they are equal the shortcut is ``x`` itself;
- ``bn1`` + ReLU, an 8x8 average pool (global at 32 px), ``fc``.

``stages(x)`` returns ``{stem_out, block1_out, block2_out, block3_out}`` (NCHW), the activations our
model sows.
"""

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, cin, cout, stride, drop_rate=0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.equal = cin == cout
        self.drop_rate = drop_rate
        if not self.equal:
            self.convShortcut = nn.Conv2d(cin, cout, 1, stride=stride, padding=0, bias=False)

    def forward(self, x):
        a = torch.relu(self.bn1(x))
        h = torch.relu(self.bn2(self.conv1(a)))
        if self.drop_rate > 0:
            h = nn.functional.dropout(h, p=self.drop_rate, training=self.training)
        h = self.conv2(h)
        return (x if self.equal else self.convShortcut(a)) + h


class NetworkBlock(nn.Module):
    def __init__(self, n, cin, cout, stride, drop_rate=0.0):
        super().__init__()
        self.layer = nn.Sequential(*[Block(cin if i == 0 else cout, cout, stride if i == 0 else 1, drop_rate)
                                     for i in range(n)])

    def forward(self, x):
        return self.layer(x)


class TorchWideResNet(nn.Module):
    def __init__(self, depth=34, widen_factor=10, num_classes=10, drop_rate=0.0):
        super().__init__()
        assert (depth - 4) % 6 == 0
        n = (depth - 4) // 6
        c = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(3, c[0], 3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, c[0], c[1], 1, drop_rate)
        self.sub_block1 = NetworkBlock(n, c[0], c[1], 1, drop_rate)  # registered, never called
        self.block2 = NetworkBlock(n, c[1], c[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, c[2], c[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(c[3])
        self.fc = nn.Linear(c[3], num_classes)
        self.channels = c[3]

    def stages(self, x):
        out = {"stem_out": self.conv1(x)}
        h = out["stem_out"]
        for g in (1, 2, 3):
            h = getattr(self, f"block{g}")(h)
            out[f"block{g}_out"] = h
        return out

    def forward(self, x):
        h = self.stages(x)["block3_out"]
        h = torch.relu(self.bn1(h))
        h = nn.functional.avg_pool2d(h, 8).reshape(-1, self.channels)
        return self.fc(h)


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm affine parameters and running statistics (and ``fc.bias``), so that importing
    every tensor matters; ``num_batches_tracked`` set too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.num_batches_tracked.fill_(11)
            elif isinstance(m, nn.Linear):
                m.bias.copy_(torch.randn(m.out_features, generator=g) * 0.2)
    return model

"""Plain ``torch.nn`` EfficientNet-B0 with timm ``efficientnet_b0``'s parameter names, written from the
definition (Tan & Le 2019, B0 stages) as an independent reference: symmetric k//2 padding, BatchNorm eps
1e-5, SiLU, squeeze-and-excitation to ``int(block_input_width * 0.25)`` channels.

Names: ``conv_stem``, ``bn1``; ``blocks.0.0``: ``conv_dw``, ``bn1``, ``se.conv_reduce``, ``se.conv_expand``,
``conv_pw``, ``bn2`` (expand ratio 1); ``blocks.{s}.{b}``: ``conv_pw``, ``bn1``, ``conv_dw``, ``bn2``, ``se.*``,
``conv_pwl``, ``bn3``; ``conv_head``, ``bn2``, ``classifier``.
"""

import torch
import torch.nn.functional as F
from torch import nn

# (expand ratio, kernel, stride, output width, repeats)
STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
          (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]


class SqueezeExcite(nn.Module):
    def __init__(self, channels, reduced):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1)
        self.conv_expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        s = F.silu(self.conv_reduce(x.mean(dim=(2, 3), keepdim=True)))
        return x * torch.sigmoid(self.conv_expand(s))


class DepthwiseSeparable(nn.Module):
    def __init__(self, cin, cout, k):
        super().__init__()
        self.conv_dw = nn.Conv2d(cin, cin, k, 1, k // 2, groups=cin, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        self.se = SqueezeExcite(cin, int(cin * 0.25))
        self.conv_pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn2(self.conv_pw(self.se(F.silu(self.bn1(self.conv_dw(x))))))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, k, stride, expand):
        super().__init__()
        mid = cin * expand
        self.conv_pw = nn.Conv2d(cin, mid, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv_dw = nn.Conv2d(mid, mid, k, stride, k // 2, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.se = SqueezeExcite(mid, int(cin * 0.25))
        self.conv_pwl = nn.Conv2d(mid, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        y = F.silu(self.bn1(self.conv_pw(x)))
        y = self.se(F.silu(self.bn2(self.conv_dw(y))))
        y = self.bn3(self.conv_pwl(y))
        return x + y if self.skip else y


class EfficientNetB0(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        stages, cin = [], 32
        for expand, k, stride, cout, repeats in STAGES:
            blocks = []
            for b in range(repeats):
                s = stride if b == 0 else 1
                blocks.append(DepthwiseSeparable(cin, cout, k) if expand == 1
                              else InvertedResidual(cin, cout, k, s, expand))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(1280)
        self.classifier = nn.Linear(1280, num_classes)

    def forward_all(self, x):
        """(logits, [stem, stage 1..7, top activations (NCHW)]) in one pass."""
        x = F.silu(self.bn1(self.conv_stem(x)))
        outs = [x]
        for stage in self.blocks:
            x = stage(x)
            outs.append(x)
        x = F.silu(self.bn2(self.conv_head(x)))
        outs.append(x)
        return self.classifier(x.mean(dim=(2, 3))), outs

    def forward(self, x):
        return self.forward_all(x)[0]


def randomize(net, seed=0):
    """Random weights, non-zero biases, BatchNorm statistics and affine parameters away from defaults."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return net.eval()

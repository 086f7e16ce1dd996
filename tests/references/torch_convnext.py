"""Reference PyTorch ConvNeXt with timm's ``convnext_tiny`` parameter names, written from the
architecture's definition (Liu et al. 2022): 4x4 stride-4 stem + LayerNorm; stages of depths 3/3/9/3
and widths 96/192/384/768, stages 2-4 opening with LayerNorm + 2x2 stride-2 conv; blocks
``x + gamma * fc2(GELU(fc1(LN(dwconv7x7(x)))))``; global average pool, LayerNorm, linear head.
All LayerNorms have eps 1e-6 and normalise over channels.

State-dict keys: ``stem.0``, ``stem.1``, ``stages.{i}.downsample.0`` / ``.1``,
``stages.{i}.blocks.{j}.{conv_dw, norm, mlp.fc1, mlp.fc2, gamma}``, ``head.norm``, ``head.fc``.
"""

import torch
from torch import nn
from torch.nn import functional as F


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class Mlp(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x):
        y = self.conv_dw(x).permute(0, 2, 3, 1)  # NHWC for the LayerNorm and the pointwise MLP
        y = self.mlp(self.norm(y)) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class Stage(nn.Module):
    def __init__(self, in_dim, dim, depth):
        super().__init__()
        if in_dim != dim:
            self.downsample = nn.Sequential(LayerNorm2d(in_dim, eps=1e-6), nn.Conv2d(in_dim, dim, 2, stride=2))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[Block(dim) for _ in range(depth)])

    def forward(self, x):
        return self.blocks(self.downsample(x))


class Head(nn.Module):
    def __init__(self, dim, num_classes):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.fc(self.norm(x.mean(dim=(2, 3))))


class ConvNeXt(nn.Module):
    def __init__(self, depths=(3, 3, 9, 3), dims=(96, 192, 384, 768), num_classes=1000):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6))
        ins = (dims[0],) + tuple(dims[:-1])
        self.stages = nn.Sequential(*[Stage(i, d, n) for i, d, n in zip(ins, dims, depths)])
        self.head = Head(dims[-1], num_classes)

    def forward_features(self, x):
        """(stem output, [output of each stage]) in NCHW."""
        stem = self.stem(x)
        outs, h = [], stem
        for stage in self.stages:
            h = stage(h)
            outs.append(h)
        return stem, outs

    def forward(self, x):
        return self.head(self.forward_features(x)[1][-1])


def randomize_(model, seed=0):
    """Random LayerNorm affines, biases and layer scales (conv/linear weights keep PyTorch's init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(0.3 + 0.5 * torch.rand(p.shape, generator=g))
            elif p.ndim == 1 and ("norm" in name or name in ("stem.1.weight",) or ".downsample.0." in name) \
                    and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model

"""Plain ``torch.nn`` references of PAG's two CIFAR models, with the official state-dict names.

Written for the tests from the architecture definitions (the PAG paper's training recipe, and
the official PAG code's module layout, royg27/PAG-ROB), independently of our flax code:

- :class:`TorchCifarResNet`: ``conv1``/``bn1`` stem (3x3, stride 1, no max-pool), ``layer1..4`` of
  BasicBlocks (``conv1``, ``bn1``, ``conv2``, ``bn2``, ``shortcut`` = ``Sequential(conv 1x1, BN)`` or
  empty), global average pooling, ``linear``.
- :class:`TorchCifarViT`: ``emb``, ``cls_token``, ``pos_emb``, ``enc.{i}`` = (``la1``, ``msa.{q,k,v,o}``,
  ``la2``, ``mlp`` = Linear-GELU-Dropout-Linear-GELU-Dropout), ``fc`` = LayerNorm + Linear; the attention
  scores divided by ``sqrt(width)`` (official) or ``sqrt(head_dim)``.

Both take NCHW input already normalised (the tests put ``(x - 0.5) / 0.5`` in front) and return
``(logits, {stage name: activation})`` with the stage names our models sow (NCHW for conv features).
"""

import math

import torch
from torch import nn


class TorchBasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        else:
            self.shortcut = nn.Sequential()

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return torch.relu(h + self.shortcut(x))


class TorchCifarResNet(nn.Module):
    def __init__(self, num_classes=10, stage_sizes=(2, 2, 2, 2), widths=(64, 128, 256, 512)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        cin = widths[0]
        for i, (size, width) in enumerate(zip(stage_sizes, widths)):
            blocks = []
            for j in range(size):
                blocks.append(TorchBasicBlock(cin, width, 2 if (i > 0 and j == 0) else 1))
                cin = width
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(stage_sizes)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        stages = {}
        x = torch.relu(self.bn1(self.conv1(x)))
        stages["stem_out"] = x
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
            stages[f"layer{i + 1}_out"] = x
        x = x.mean(dim=(2, 3))
        return self.linear(x), stages


class TorchAttention(nn.Module):
    def __init__(self, width, heads, scale_by, dropout):
        super().__init__()
        self.heads, self.width = heads, width
        self.divisor = math.sqrt(width if scale_by == "width" else width // heads)
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.o = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        b, n, _ = x.shape
        d = self.width // self.heads
        q, k, v = (proj(x).reshape(b, n, self.heads, d).permute(0, 2, 1, 3) for proj in (self.q, self.k, self.v))
        attn = torch.softmax(q @ k.transpose(-1, -2) / self.divisor, dim=-1)  # (b, heads, n, n)
        out = (attn @ v).permute(0, 2, 1, 3).reshape(b, n, self.width)
        return self.drop(self.o(out))


class TorchEncoder(nn.Module):
    def __init__(self, width, mlp_width, heads, scale_by, dropout):
        super().__init__()
        self.la1 = nn.LayerNorm(width)
        self.msa = TorchAttention(width, heads, scale_by, dropout)
        self.la2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_width), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(mlp_width, width), nn.GELU(), nn.Dropout(dropout))

    def forward(self, x):
        x = x + self.msa(self.la1(x))
        return x + self.mlp(self.la2(x))


class TorchCifarViT(nn.Module):
    def __init__(self, num_classes=10, image=32, patch=4, width=384, layers=7, heads=12, mlp_width=384,
                 cls=True, scale_by="width", dropout=0.0):
        super().__init__()
        self.patch, self.cls = patch, cls
        grid = image // patch
        self.emb = nn.Linear(patch * patch * 3, width)
        if cls:
            self.cls_token = nn.Parameter(torch.randn(1, 1, width))
        self.pos_emb = nn.Parameter(torch.randn(1, grid * grid + int(cls), width))
        self.enc = nn.Sequential(*[TorchEncoder(width, mlp_width, heads, scale_by, dropout) for _ in range(layers)])
        self.fc = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, num_classes))

    def words(self, x):
        """(b, c, H, W) -> (b, patches, p*p*c): patches row-major, each flattened (row, col, channel)."""
        b, c, h, w = x.shape
        p = self.patch
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def forward(self, x):
        stages = {}
        x = self.emb(self.words(x))
        if self.cls:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.pos_emb
        stages["embed_out"] = x
        for i, layer in enumerate(self.enc):
            x = layer(x)
            stages[f"enc{i}_out"] = x
        x = x[:, 0] if self.cls else x.mean(dim=1)
        return self.fc(x), stages


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Makes every parameter and buffer informative: BatchNorm statistics and affine parameters, LayerNorm
    affine parameters and all biases away from their 0/1 defaults."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
                module.weight.copy_(torch.rand(module.weight.shape, generator=g) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.2)
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=g) * 0.2)
                module.running_var.copy_(torch.rand(module.running_var.shape, generator=g) + 0.5)
                module.num_batches_tracked.fill_(7)
            if isinstance(module, nn.Linear):
                module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.2)
    return model

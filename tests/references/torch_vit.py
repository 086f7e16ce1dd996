"""Reference PyTorch ViT with timm's parameter names, written from the architecture's definition
(Dosovitskiy et al. 2021; timm ``VisionTransformer`` defaults: class token, learned position embeddings,
pre-LN blocks with LayerNorm eps 1e-6, fused biased qkv, exact GELU, final LayerNorm, linear head).

``global_pool='avg'`` follows timm: mean of the patch tokens, then ``fc_norm`` (and no ``norm``).
State-dict keys: ``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.{i}.norm1``,
``blocks.{i}.attn.qkv``, ``blocks.{i}.attn.proj``, ``blocks.{i}.norm2``, ``blocks.{i}.mlp.fc1``,
``blocks.{i}.mlp.fc2``, ``norm`` / ``fc_norm``, ``head``.
"""

import torch
from torch import nn

VARIANTS = {"vit_ti16": (192, 3), "vit_s16": (384, 6), "vit_b16": (768, 12)}


class PatchEmbed(nn.Module):
    def __init__(self, width, patch):
        super().__init__()
        self.proj = nn.Conv2d(3, width, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, h*w, width), row-major patches


class Attention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        n, t, c = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (N, heads, T, head_dim)
        attn = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(n, t, c))


class Mlp(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, 4 * width)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, width=192, depth=12, heads=3, img_size=224, patch=16, num_classes=1000,
                 global_pool="token"):
        super().__init__()
        self.global_pool = global_pool
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.randn(1, (img_size // patch) ** 2 + 1, width) * 0.02)
        self.patch_embed = PatchEmbed(width, patch)
        self.blocks = nn.Sequential(*[Block(width, heads) for _ in range(depth)])
        if global_pool == "avg":
            self.fc_norm = nn.LayerNorm(width, eps=1e-6)
        else:
            self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Linear(width, num_classes)

    def forward_tokens(self, x):
        """(embedded tokens, [output of each block])."""
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        outs, h = [], x
        for block in self.blocks:
            h = block(h)
            outs.append(h)
        return x, outs

    def forward(self, x):
        _, outs = self.forward_tokens(x)
        h = outs[-1]
        pooled = self.fc_norm(h[:, 1:].mean(dim=1)) if self.global_pool == "avg" else self.norm(h)[:, 0]
        return self.head(pooled)


def vit(name, **kwargs):
    width, heads = VARIANTS[name]
    return VisionTransformer(width=width, heads=heads, **kwargs)


def randomize_(model, seed=0):
    """Random values for every parameter (LayerNorm affine and biases included), in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or "norm.weight" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1 or "token" in name or "pos_embed" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model

"""Plain ``torch.nn`` VGG-16 / VGG-16-BN with torchvision's parameter names, written from the definition
(Simonyan & Zisserman, configuration "D"; torchvision's module layout), as an independent reference.

``features``: a Sequential of Conv2d(3x3, padding 1) [+ BatchNorm2d] + ReLU per conv and MaxPool2d(2, 2) per
stage; ``avgpool``: AdaptiveAvgPool2d((7, 7)); ``classifier``: Linear(512*7*7, 4096), ReLU, Dropout,
Linear(4096, 4096), ReLU, Dropout, Linear(4096, classes). ``head="timm"`` replaces avgpool + classifier by
timm's layout: ``pre_logits.fc1`` Conv2d(512, 4096, 7) (after adaptive pooling up to 7x7 if the map is
smaller), ReLU, ``pre_logits.fc2`` Conv2d(4096, 4096, 1), ReLU, global average pooling, ``head.fc``.
``hidden`` (4096 in the original) may be reduced for cheap tests of the naming and head semantics.
"""

import torch
import torch.nn.functional as F
from torch import nn

CFG_D = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class ConvMlp(nn.Module):
    def __init__(self, hidden=4096):
        super().__init__()
        self.fc1 = nn.Conv2d(512, hidden, 7)
        self.fc2 = nn.Conv2d(hidden, hidden, 1)

    def forward(self, x):
        if x.shape[-2] < 7 or x.shape[-1] < 7:
            x = F.adaptive_avg_pool2d(x, (max(7, x.shape[-2]), max(7, x.shape[-1])))
        return F.relu(self.fc2(F.relu(self.fc1(x))))


class TimmHead(nn.Module):
    def __init__(self, num_classes, hidden=4096):
        super().__init__()
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc(x.mean(dim=(2, 3)))


class VGG(nn.Module):
    def __init__(self, batch_norm=False, num_classes=1000, head="torchvision", hidden=4096):
        super().__init__()
        layers, cin = [], 3
        for v in CFG_D:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers.append(nn.Conv2d(cin, v, 3, padding=1))
                if batch_norm:
                    layers.append(nn.BatchNorm2d(v))
                layers.append(nn.ReLU(inplace=True))
                cin = v
        self.features = nn.Sequential(*layers)
        self.head_kind = head
        if head == "timm":
            self.pre_logits = ConvMlp(hidden)
            self.head = TimmHead(num_classes, hidden)
        else:
            self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
            self.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, hidden), nn.ReLU(True), nn.Dropout(),
                                            nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(),
                                            nn.Linear(hidden, num_classes))

    def forward_all(self, x):
        """(logits, [output of each stage's max-pool (NCHW)]) in one pass."""
        outs = []
        for layer in self.features:
            x = layer(x)
            if isinstance(layer, nn.MaxPool2d):
                outs.append(x)
        if self.head_kind == "timm":
            return self.head(self.pre_logits(x)), outs
        return self.classifier(torch.flatten(self.avgpool(x), 1)), outs

    def forward(self, x):
        return self.forward_all(x)[0]


def randomize(net, seed=0):
    """Random weights everywhere, non-zero biases, BatchNorm statistics and affine parameters away from
    their defaults; scaled so activations keep a sensible magnitude through 16 layers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return net.eval()

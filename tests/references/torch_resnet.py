"""A plain ``torch.nn`` ResNet v1.5 with torchvision's parameter names: the tests' independent reference.

Written from the architecture's definition (He et al. 2016, with torchvision's stride on the 3x3 conv of
the Bottleneck): 7x7/2 conv, BN, ReLU, 3x3/2 max-pool (padding 1), four stages of BasicBlock or Bottleneck
blocks (widths 64, 128, 256, 512; stride 2 in the first block of stages 2-4; ``downsample`` = 1x1 conv +
BN where the shape changes), global average pool, ``fc``. State-dict keys: ``conv1``, ``bn1``,
``layer{1-4}.{i}.conv{1,2,3}``, ``.bn{1,2,3}``, ``.downsample.0``, ``.downsample.1``, ``fc``.
"""

import torch
from torch import nn


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return torch.relu(y + shortcut)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return torch.relu(y + shortcut)


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for s, (planes, depth) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if s == 0 else 2
            blocks = []
            for i in range(depth):
                downsample = None
                if i == 0 and (stride != 1 or inplanes != planes * block.expansion):
                    downsample = nn.Sequential(nn.Conv2d(inplanes, planes * block.expansion, 1, stride, bias=False),
                                               nn.BatchNorm2d(planes * block.expansion))
                blocks.append(block(inplanes, planes, stride if i == 0 else 1, downsample))
                inplanes = planes * block.expansion
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


CONFIGS = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet34": (BasicBlock, (3, 4, 6, 3)),
           "resnet50": (Bottleneck, (3, 4, 6, 3)), "resnet101": (Bottleneck, (3, 4, 23, 3))}


def resnet(name, num_classes=1000, seed=0, randomize_bn=True):
    """A torchvision-named ResNet with random weights; BN affine parameters and running statistics
    randomised too (so the import of every tensor matters), in eval mode."""
    torch.manual_seed(seed)
    block, layers = CONFIGS[name]
    net = ResNet(block, layers, num_classes)
    if randomize_bn:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, nn.BatchNorm2d):
                    n = m.num_features
                    m.weight.copy_(torch.rand(n, generator=g) * 0.8 + 0.4)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                    m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                    m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            net.fc.bias.copy_(torch.randn(num_classes, generator=g) * 0.1)
    return net.eval()

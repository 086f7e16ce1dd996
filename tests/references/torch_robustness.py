"""The checkpoint layout of the Madry lab's ``robustness`` library, written with plain ``torch.nn``: the
tests' independent reference for that format (MadryLab/robustness at a954124: ``attacker.py``,
``tools/helpers.py``, ``train.py``, ``cifar_models/resnet.py``).

- :class:`AttackerModel`: ``normalizer`` (``InputNormalize``: buffers ``new_mean`` / ``new_std`` of shape
  (3, 1, 1); ``(clamp(x, 0, 1) - new_mean) / new_std``), ``model`` (the classifier) and ``attacker``
  (an ``Attacker`` holding the same classifier object as ``model`` and its own ``normalize``), so its
  state dict repeats every classifier tensor under ``attacker.model.``.
- :func:`save_checkpoint`: what ``train.py`` saves, ``{'model': DataParallel(AttackerModel).state_dict(),
  'optimizer': ..., 'schedule': ..., 'epoch': ..., 'amp': None, <prec1 key>: ...}``, with ``torch.save``.
- :class:`CifarResNet`: ``cifar_models/resnet.py``'s ResNet (kuangliu's layout): ``conv1``, ``bn1``,
  ``layer1..4`` of ``BasicBlock`` (``conv1, bn1, conv2, bn2``) or ``Bottleneck`` (``conv1..3``, ``bn1..3``),
  ``shortcut`` = ``Sequential(conv 1x1, BN)`` or empty, ``avg_pool2d(out, 4)``, ``linear``; widths
  ``64 wm .. 512 wm``.
"""

import torch
from torch import nn


class InputNormalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("new_mean", torch.as_tensor(mean, dtype=torch.float32)[..., None, None])
        self.register_buffer("new_std", torch.as_tensor(std, dtype=torch.float32)[..., None, None])

    def forward(self, x):
        return (torch.clamp(x, 0, 1) - self.new_mean) / self.new_std


class Attacker(nn.Module):
    def __init__(self, model, mean, std):
        super().__init__()
        self.normalize = InputNormalize(mean, std)
        self.model = model


class AttackerModel(nn.Module):
    def __init__(self, model, mean, std):
        super().__init__()
        self.normalizer = InputNormalize(mean, std)
        self.model = model
        self.attacker = Attacker(model, mean, std)

    def forward(self, x):
        return self.model(self.normalizer(x))


def save_checkpoint(path, classifier, mean, std, epoch=90, prec1=None):
    """Writes ``classifier`` as the robustness library's training loop does; returns the wrapped model."""
    wrapped = nn.DataParallel(AttackerModel(classifier, mean, std))
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=50, gamma=0.1)
    info = {"model": wrapped.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
            "epoch": epoch, "amp": None}
    if prec1 is not None:
        info["adv_prec1"] = prec1
    torch.save(info, path)
    return wrapped


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != 4 * planes:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, 4 * planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(4 * planes))

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return torch.relu(self.bn3(self.conv3(h)) + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, block, num_blocks, num_classes=10, wm=1.0):
        super().__init__()
        widths = [int(w * wm) for w in (64, 128, 256, 512)]
        cin = widths[0]
        self.conv1 = nn.Conv2d(3, cin, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cin)
        for s, (planes, n) in enumerate(zip(widths, num_blocks)):
            blocks = []
            for i in range(n):
                blocks.append(block(cin, planes, (1 if s == 0 else 2) if i == 0 else 1))
                cin = planes * block.expansion
            setattr(self, f"layer{s + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.layer4(self.layer3(self.layer2(self.layer1(h))))
        h = nn.functional.avg_pool2d(h, 4)
        return self.linear(h.reshape(h.shape[0], -1))


CIFAR = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet50": (Bottleneck, (3, 4, 6, 3))}


def cifar_resnet(name, num_classes=10, wm=1.0, seed=0):
    """A robustness-library CIFAR ResNet with random weights and randomised BatchNorm parameters and
    statistics (and linear bias), in eval mode."""
    torch.manual_seed(seed)
    block, num_blocks = CIFAR[name]
    net = CifarResNet(block, num_blocks, num_classes, wm)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) * 0.8 + 0.4)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
        net.linear.bias.copy_(torch.randn(num_classes, generator=g) * 0.1)
    return net.eval()

"""Independent PyTorch version of the official PAG training loss, written from the semantics of
``royg27/PAG-ROB`` ``TRAIN_CIFAR10.py``, for the tests of
:mod:`advalign_jax.losses.pag`.

What it does, step by step, as the official training step does:

1. ``pred = model(aug_ce(images))``; ``ce = CrossEntropyLoss()(pred, target)`` (mean).
2. For each image n (a Python loop, like the official one): its K target classes (given here instead
   of ``torch.randperm(C)[:K]``, so both frameworks use the same draw), the image repeated K times and
   the K stored target gradients picked with ``index_select``; all concatenated into an N*K batch.
3. ``dummy = CrossEntropyLoss()(model(aug_pag(ims)), classes)`` on the replicated batch (a second
   training-mode forward pass) and ``grad = autograd.grad(-dummy, ims, create_graph=True)``: the input
   gradient w.r.t. the un-augmented replicated images.
4. ``pag = 10 * (1 - CosineSimilarity(dim=1)(grad.view(NK, -1), targets.view(NK, -1)).mean())``.
5. ``loss = ce + pag_coeff * pag``.

Images are NCHW here; the tests transpose to and from the JAX side's NHWC.
"""

import torch
import torch.nn.functional as F


class TinyCNN(torch.nn.Module):
    """conv3x3(3->6) [BN] act conv3x3(6->8) [BN] act, spatial mean, linear(8->C)."""

    def __init__(self, num_classes=5, use_bn=False, act="tanh"):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(6, 8, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(6) if use_bn else torch.nn.Identity()
        self.bn2 = torch.nn.BatchNorm2d(8) if use_bn else torch.nn.Identity()
        self.head = torch.nn.Linear(8, num_classes)
        self.act = {"tanh": torch.tanh, "relu": torch.relu, "sin": torch.sin}[act]

    def forward(self, x):
        x = self.act(self.bn1(self.conv1(x)))
        x = self.act(self.bn2(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


def crop_flip(x, top, left, flip, padding=4, fill=0.0):
    """torchvision's RandomCrop(size, padding) + RandomHorizontalFlip on a 4-D NCHW batch with the
    random draw given: one crop and one flip for the whole batch."""
    h, w = x.shape[2], x.shape[3]
    xp = F.pad(x, (padding, padding, padding, padding), mode="constant", value=fill)
    out = xp[:, :, top:top + h, left:left + w]
    return torch.flip(out, dims=[3]) if flip else out


def official_pag_loss(model, images, pag, target, classes, pag_coeff, aug_ce=None, aug_pag=None):
    """The official loss for one step. ``images`` (N, 3, H, W); ``pag`` (N, C, 3, H, W) stored targets;
    ``target`` (N,) labels; ``classes`` (N, K) long target classes. Returns (loss, parts)."""
    aug_ce = aug_ce or (lambda t: t)
    aug_pag = aug_pag or (lambda t: t)
    pred = model(aug_ce(images))
    loss_ce = torch.nn.CrossEntropyLoss()(pred, target)
    num_images, k = classes.shape
    ims, pag_new, target_new = [], [], []
    for rep in range(num_images):
        targets = classes[rep]
        ims.append(images[rep].repeat(k, 1, 1, 1))
        pag_new.append(torch.index_select(pag[rep], 0, targets))
        target_new.append(targets)
    ims = torch.cat(ims).requires_grad_(True)
    pag_new = torch.cat(pag_new)
    target_new = torch.cat(target_new)
    dummy_loss = torch.nn.CrossEntropyLoss()(model(aug_pag(ims)), target_new)
    (grad,) = torch.autograd.grad(-1 * dummy_loss, [ims], create_graph=True)
    cos = torch.nn.CosineSimilarity(dim=1)(grad.view(target_new.shape[0], -1),
                                           pag_new.view(target_new.shape[0], -1))
    pag_loss = 10 * (1.0 - cos.mean())
    loss = loss_ce + pag_coeff * pag_loss
    return loss, {"ce": loss_ce, "pag": pag_loss, "cos": cos, "grad": grad}

"""Independent PyTorch implementations of the attack conventions, written from their definitions.

- :func:`madry_pgd`: the Madry lab ``robustness`` library's PGD loop (L2 and Linf step and
  projection, ``use_best`` with its ``replace_best`` rule, targeted = descend the target's loss), with
  the starting point given (random draws cannot be shared across frameworks).
- :func:`alignment_attack`: the adversarial-alignment study's L2 attack (step ``g/||g|| * alpha``, then
  ``sphere`` or ``accumulate`` rescaling, then clipping), one image at a time.
- :func:`reference_protocol`: that study's minimal-eps search loop for one image, as its notebook runs it.
"""

import numpy as np
import torch
import torch.nn.functional as F


class TorchMLP(torch.nn.Module):
    """x (N, H, W, C) -> logits; the same function as tests' JAX ``mlp_logits``."""

    def __init__(self, w1, b1, w2, b2):
        super().__init__()
        self.w1, self.b1 = torch.tensor(w1), torch.tensor(b1)
        self.w2, self.b2 = torch.tensor(w2), torch.tensor(b2)

    def forward(self, x):
        h = torch.relu(x.reshape(x.shape[0], -1) @ self.w1 + self.b1)
        return h @ self.w2 + self.b2


def _losses(model, x, y, loss, targeted):
    logits = model(x)
    if loss == "ce":
        ce = F.cross_entropy(logits, y, reduction="none")
        return ce  # targeted: descended (sign handled by the caller)
    zy = logits.gather(1, y[:, None])[:, 0]
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), -float("inf")).max(1).values
    return other - zy if not targeted else zy - other


def madry_pgd(model, x0, y, eps, step_size, steps, norm="l2", targeted=False, use_best=False,
              loss="ce", x_start=None, clip=(0.0, 1.0)):
    """The robustness library's loop; ``eps`` and ``step_size`` may be per-example arrays."""
    x0 = torch.tensor(np.asarray(x0))
    y = torch.tensor(np.asarray(y), dtype=torch.long)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    eps = torch.as_tensor(np.broadcast_to(np.asarray(eps, np.float32), (x0.shape[0],)).copy()).reshape(shape)
    a = torch.as_tensor(np.broadcast_to(np.asarray(step_size, np.float32), (x0.shape[0],)).copy()).reshape(shape)
    m = -1.0 if (targeted and loss == "ce") else 1.0
    x = x0.clone() if x_start is None else torch.tensor(np.asarray(x_start))
    best_loss, best_x = None, None

    def replace_best(l, bl, xx, bx):
        if bl is None:
            return l.clone().detach(), xx.clone().detach()
        replace = m * bl < m * l
        bx[replace] = xx[replace].clone().detach()
        bl[replace] = l[replace]
        return bl, bx

    for _ in range(steps):
        x = x.clone().detach().requires_grad_(True)
        losses = _losses(model, x, y, loss, targeted)
        (grad,) = torch.autograd.grad(m * losses.sum(), [x])
        with torch.no_grad():
            if use_best:
                best_loss, best_x = replace_best(losses.detach(), best_loss, x.detach(), best_x)
            if norm == "l2":
                g_norm = grad.reshape(grad.shape[0], -1).norm(dim=1).reshape(shape)
                x = x + a * grad / (g_norm + 1e-10)
                diff = x - x0
                d_norm = diff.reshape(diff.shape[0], -1).norm(dim=1).reshape(shape)
                diff = diff * torch.clamp(eps / torch.where(d_norm > 0, d_norm, torch.ones_like(d_norm)), max=1.0)
            else:
                x = x + a * torch.sign(grad)
                diff = torch.max(torch.min(x - x0, eps), -eps)
            x = x0 + diff
            if clip is not None:
                x = torch.clamp(x, *clip)
    if not use_best:
        return x.detach().numpy()
    with torch.no_grad():
        losses = _losses(model, x, y, loss, targeted)
    _, best_x = replace_best(losses, best_loss, x.detach(), best_x)
    return best_x.numpy()


def alignment_attack(model, x0, y, eps, alpha=0.5, steps=3, projection="sphere", clip=(0.0, 1.0)):
    """The study's L2 attack for one image (batch of 1), mean cross-entropy as in its notebook."""
    x0 = torch.tensor(np.asarray(x0))
    y = torch.tensor(np.asarray(y), dtype=torch.long)
    xt = x0.clone()
    for _ in range(steps):
        xt.requires_grad = True
        cost = F.cross_entropy(model(xt), y)
        (grads,) = torch.autograd.grad(cost, [xt])
        with torch.no_grad():
            x_next = xt + grads / grads.reshape(1, -1).norm() * alpha
            delta = x_next - x0
            sigma = delta.reshape(1, -1).norm()
            if projection == "sphere":
                x_next = x0 + delta / sigma * eps
            else:  # accumulate
                x_next = x_next + delta / sigma * eps
            xt = x_next.clamp(min=clip[0], max=clip[1]).detach()
    return xt.numpy()


def reference_protocol(model, x, y, attack=alignment_attack, gate=10.0, split=1.0, low=0.001,
                       low_width=0.01, high_width=0.1):
    """The study's per-image search. Returns None (misclassified), 'unfooled', or (eps, x_adv, pred)."""
    def pred_of(z):
        with torch.no_grad():
            return int(model(torch.tensor(z)).argmax(1)[0])

    if pred_of(x) != int(y[0]):
        return None
    x_gate = attack(model, x, y, gate)
    if pred_of(x_gate) == int(y[0]):
        return "unfooled"
    info = {}
    x_split = attack(model, x, y, split)
    info[split] = x_split
    if pred_of(x_split) != int(y[0]):
        l, r, threshold = low, split, low_width
    else:
        l, r, threshold = split, gate, high_width
    key = split
    while r - l >= threshold:
        eps = l + (r - l) / 2
        x_mid = attack(model, x, y, eps)
        if pred_of(x_mid) != int(y[0]):
            r = eps
            if r != key:
                del info[key]
                key = r
                info[key] = x_mid
        else:
            l = eps
    x_adv = info[r] if r in info else attack(model, x, y, r)
    return r, x_adv, pred_of(x_adv)

"""Independent PyTorch versions of one adversarial-training step, written from the reference code:

- :func:`robustness_attack` / :func:`pgd_at_step`: the Madry lab's ``robustness`` library
  (``attacker.py`` ``Attacker.forward``, ``attack_steps.py`` ``L2Step``/``LinfStep``, ``train.py``):
  the model in eval mode during the attack, per-example cross-entropy, the step on ``mean(loss)``
  (L2: ``g / (||g|| + 1e-10)``, Linf: ``sign(g)``), the projection (L2: ``(x - x0).renorm(p=2, dim=0,
  maxnorm=eps)``, Linf: ``clamp(x - x0, -eps, eps)``) then ``clamp(0, 1)``, ``use_best`` (the iterate of
  best loss, recorded before each step, and the final one), then the model in train mode and the
  cross-entropy at the adversarial point;
- :func:`trades_step`: yaodongyu/TRADES ``trades.py`` ``trades_loss``: eval-mode attack from
  ``x + noise`` maximising ``KLDivLoss(size_average=False)(log_softmax(f(x_adv)), softmax(f(x)))``
  (Linf: sign steps, box projection, clamp; L2: SGD on delta with lr ``2 eps / steps``, the gradient
  normalised per example, ``delta = clamp(x + delta, 0, 1) - x`` and ``renorm``), then in train mode
  ``CE(f(x), y) + beta / B * KL(log_softmax(f(x_adv)), softmax(f(x)))`` with a second ``f(x)`` inside the
  KL, as the reference writes it.

The start noise is an argument, so both frameworks can use the same draw. NCHW tensors.
"""

import torch
import torch.nn.functional as F


def _l2_norm(t):
    return t.reshape(t.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (t.dim() - 1)))


def robustness_attack(model, x, y, eps, step_size, steps, constraint="l2", use_best=True, start=None):
    """The library's ``Attacker`` (untargeted, no restarts); ``start``: a starting point (its
    ``random_start`` draw) or None for ``x`` itself. Runs in whatever mode ``model`` is in."""
    orig = x.detach()
    xa = (orig if start is None else start).clone().detach()
    best_loss, best_x = None, None

    def project(z):
        if constraint == "l2":
            d = (z - orig).renorm(p=2, dim=0, maxnorm=eps)
        else:
            d = torch.clamp(z - orig, -eps, eps)
        return torch.clamp(orig + d, 0, 1)

    def replace_best(loss, bloss, xx, bx):
        if bloss is None:
            return loss.clone().detach(), xx.clone().detach()
        replace = bloss < loss
        bx[replace] = xx[replace].clone().detach()
        bloss[replace] = loss[replace]
        return bloss, bx

    for _ in range(steps):
        xa = xa.clone().detach().requires_grad_(True)
        losses = F.cross_entropy(model(xa), y, reduction="none")
        (grad,) = torch.autograd.grad(losses.mean(), [xa])
        with torch.no_grad():
            if use_best:
                best_loss, best_x = replace_best(losses.detach(), best_loss, xa, best_x)
            if constraint == "l2":
                xa = xa + step_size * grad / (_l2_norm(grad) + 1e-10)
            else:
                xa = xa + step_size * torch.sign(grad)
            xa = project(xa)
    if not use_best:
        return xa.detach()
    with torch.no_grad():
        losses = F.cross_entropy(model(xa), y, reduction="none")
        best_loss, best_x = replace_best(losses, best_loss, xa, best_x)
    return best_x.detach()


def pgd_at_step(model, optimizer, x, y, eps, step_size, steps, constraint="l2", use_best=True):
    """One training step of the library: eval-mode attack, train-mode cross-entropy at ``x_adv``,
    backward, ``optimizer.step()``. Returns ``(loss, x_adv)``."""
    model.eval()
    x_adv = robustness_attack(model, x, y, eps, step_size, steps, constraint, use_best)
    model.train()
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x_adv), y)
    loss.backward()
    optimizer.step()
    return loss.detach(), x_adv


def trades_step(model, optimizer, x, y, noise, eps, step_size, steps, beta, distance="l_inf"):
    """One TRADES training step with the start noise given (``0.001 * randn`` in the reference).
    Returns ``(loss, x_adv)``."""
    criterion_kl = torch.nn.KLDivLoss(reduction="sum")
    model.eval()
    n = len(x)
    if distance == "l_inf":
        x_adv = x.detach() + noise
        for _ in range(steps):
            x_adv.requires_grad_()
            with torch.enable_grad():
                loss_kl = criterion_kl(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1))
            grad = torch.autograd.grad(loss_kl, [x_adv])[0]
            x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
            x_adv = torch.clamp(x_adv, 0.0, 1.0)
    else:
        delta = noise.clone().detach().requires_grad_(True)
        optimizer_delta = torch.optim.SGD([delta], lr=eps / steps * 2)
        for _ in range(steps):
            adv = x + delta
            optimizer_delta.zero_grad()
            with torch.enable_grad():
                loss = (-1) * criterion_kl(F.log_softmax(model(adv), dim=1), F.softmax(model(x), dim=1))
            loss.backward()
            grad_norms = delta.grad.reshape(n, -1).norm(p=2, dim=1)  # the reference's .view, on any layout
            delta.grad.div_(grad_norms.view(-1, *([1] * (x.dim() - 1))))
            if (grad_norms == 0).any():
                delta.grad[grad_norms == 0] = torch.randn_like(delta.grad[grad_norms == 0])
            optimizer_delta.step()
            delta.data.add_(x)
            delta.data.clamp_(0, 1).sub_(x)
            delta.data.renorm_(p=2, dim=0, maxnorm=eps)
        x_adv = (x + delta).detach()
    model.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    optimizer.zero_grad()
    logits = model(x)
    loss_natural = F.cross_entropy(logits, y)
    loss_robust = (1.0 / n) * criterion_kl(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1))
    loss = loss_natural + beta * loss_robust
    loss.backward()
    optimizer.step()
    return loss.detach(), x_adv

"""An independent, plain PyTorch APGD (Croce & Hein, ICML 2020, Algorithm 1), one example at a time.

Written from the paper and the conventions of its authors' code (fra31/auto-attack,
``autopgd_base.py``), not from advalign_jax: it keeps the whole loss history and evaluates the
checkpoint conditions literally as the paper writes them (a sum over the window of
``1[f(x(i+1)) > f(x(i))]``; the step size and best loss compared with their values at the previous
checkpoint), with the code's three departures from the paper's text spelled out where they apply:
``<=`` instead of ``<`` in condition 1, ``f(x(0))`` read as 0 in the first window's first comparison
(the code's zero-initialised history; with N = 1 that entry is f(x(1)) itself), and condition 2 off
at the first checkpoint. The random start is given (draws cannot be shared across frameworks).
Intended for float64 models.
"""

from fractions import Fraction
import math

import numpy as np
import torch
import torch.nn.functional as F


def code_schedule(n_iter):
    """The original code's checkpoints: [0, w_1, w_2, ...] (integer windows 0.22N, -0.03N, >= 0.06N)."""
    w1 = int(0.22 * n_iter) if int(0.22 * n_iter) >= 1 else 1
    smallest = int(0.06 * n_iter) if int(0.06 * n_iter) >= 1 else 1
    decrement = int(0.03 * n_iter) if int(0.03 * n_iter) >= 1 else 1
    marks = [0]
    length = w1
    while True:
        nxt = marks[-1] + length
        if nxt > n_iter:
            return marks
        marks.append(nxt)
        length = length - decrement
        if length < smallest:
            length = smallest


def paper_schedule(n_iter):
    """The paper's w_j = ceil(p_j * N) with exact fractions."""
    ps = [Fraction(0), Fraction(22, 100)]
    while ps[-1] <= 1:
        ps.append(ps[-1] + max(ps[-1] - ps[-2] - Fraction(3, 100), Fraction(6, 100)))
    marks = []
    for p in ps:
        if p <= 1:
            w = math.ceil(p * n_iter)
            if not marks or w != marks[-1]:
                marks.append(w)
    return marks


def ce(z, y, t=None):
    return F.cross_entropy(z[None], torch.tensor([y]))


def dlr(z, y, t=None):
    s = torch.sort(z, descending=True).values
    best_other = max(z[i] for i in range(len(z)) if i != y)
    return -(z[y] - best_other) / (s[0] - s[2] + 1e-12)


def dlr_targeted(z, y, t):
    s = torch.sort(z, descending=True).values
    return -(z[y] - z[t]) / (s[0] - (s[2] + s[3]) / 2 + 1e-12)


LOSSES = {"ce": ce, "dlr": dlr, "dlr-targeted": dlr_targeted}


def _project(v, x0, eps, norm):
    if norm == "linf":
        v = torch.minimum(torch.maximum(v, x0 - eps), x0 + eps)
    else:
        d = v - x0
        n = torch.linalg.vector_norm(d)
        v = x0 + d / (n + 1e-12) * min(eps, float(n))
    return v.clamp(0.0, 1.0)


def _direction(g, norm):
    return torch.sign(g) if norm == "linf" else g / (torch.linalg.vector_norm(g) + 1e-12)


def apgd_single(model, x0, y, eps, x_start, n_iter, norm="linf", loss="ce", target=None, rho=0.75,
                alpha=0.75, keep="last"):
    """One run for one example (x0: one image, no batch axis). Returns a dict: x_adv, success,
    x_max, f_max, xs (x(1)..x(N)), steps (after each iteration's checkpoint decision), losses."""
    x0 = torch.tensor(np.array(x0))
    fn = LOSSES[loss]
    marks = code_schedule(n_iter)

    def evaluate(x):
        x = x.clone().requires_grad_(True)
        z = model(x[None])[0]
        f = fn(z, y, target)
        (g,) = torch.autograd.grad(f, [x])
        return float(f.detach()), g.detach(), int(torch.argmax(z.detach()))

    x_cur = torch.tensor(np.array(x_start))
    x_old = x_cur.clone()
    f0, g_cur, pred = evaluate(x_cur)
    history = [f0]  # history[k] = f(x(k))
    x_max, g_max, f_max = x_cur.clone(), g_cur.clone(), f0
    eta = 2.0 * eps
    misclassified = [x_cur.clone()] if pred != y else []
    record = {}  # checkpoint index j -> (eta before the decision, f_max)
    xs, steps = [], []
    for k in range(n_iter):
        a = 1.0 if k == 0 else alpha
        z = _project(x_cur + eta * _direction(g_cur, norm), x0, eps, norm)
        x_new = _project(x_cur + a * (z - x_cur) + (1 - a) * (x_cur - x_old), x0, eps, norm)
        f, g, pred = evaluate(x_new)
        history.append(f)
        xs.append(x_new.clone())
        if pred != y:
            misclassified.append(x_new.clone())
        if f > f_max:
            x_max, g_max, f_max = x_new.clone(), g.clone(), f
        x_old, x_cur, g_cur = x_cur, x_new, g
        if k + 1 in marks[1:]:
            j = marks.index(k + 1)
            lo, hi = marks[j - 1], marks[j]

            def value(i):  # f(x(i)), with the code's zero for f(x(0))
                if i == 0:
                    return 0.0 if n_iter > 1 else history[1]
                return history[i]

            count = sum(1 for i in range(lo, hi) if value(i + 1) > value(i))
            condition1 = count <= rho * (hi - lo)
            condition2 = False
            if j >= 2:
                eta_prev, fmax_prev = record[j - 1]
                condition2 = eta_prev == eta and fmax_prev == f_max
            record[j] = (eta, f_max)
            if condition1 or condition2:
                eta = eta / 2.0
                x_cur, g_cur = x_max.clone(), g_max.clone()
        steps.append(eta)
    success = len(misclassified) > 0
    if success:
        x_adv = misclassified[0] if keep == "first" else misclassified[-1]
    else:
        x_adv = x_max
    return dict(x_adv=x_adv.numpy(), success=success, x_max=x_max.numpy(), f_max=f_max,
                xs=np.stack([v.numpy() for v in xs]), steps=np.array(steps), losses=np.array(history[1:]))


def apgd_full(model, x0, y, eps, starts, n_iter, norm="linf", loss="ce", n_restarts=1, n_targets=9,
              rho=0.75, alpha=0.75, keep="last", targets=None):
    """All runs for one example; ``starts[r]`` is run r's starting point (targets in the outer loop,
    restarts inner; ``targets``: the target classes in order, default the classes ranked 2nd, 3rd,
    ... by the clean logits). Already misclassified -> (x0, True). Returns (x_adv, success)."""
    x0 = np.asarray(x0)
    with torch.no_grad():
        z = model(torch.tensor(x0)[None])[0]
    if int(torch.argmax(z)) != y:
        return x0, True
    if targets is None:
        targets = [int(i) for i in torch.argsort(z, descending=True, stable=True)][1:n_targets + 1]
    runs = n_restarts * (len(targets) if loss == "dlr-targeted" else 1)
    best, best_f = x0, -math.inf
    for r in range(runs):
        target = targets[r // n_restarts] if loss == "dlr-targeted" else None
        out = apgd_single(model, x0, y, eps, starts[r], n_iter, norm, loss, target, rho, alpha, keep)
        if out["success"]:
            return out["x_adv"], True
        if out["f_max"] > best_f:
            best, best_f = out["x_max"], out["f_max"]
    return best, False

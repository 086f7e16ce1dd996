"""Square Attack under Linf and L2: AutoAttack's black-box attack, one compiled loop with per-example state.

Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient black-box adversarial
attack via random search" (ECCV 2020), as AutoAttack runs it: ``autoattack/square.py`` of
fra31/auto-attack (the current version; torchattacks 3.5.1 ports an earlier one, see below), with
AutoAttack's settings: 5,000 queries, ``p_init = 0.8``, the margin loss, 1 restart, and the square-size
schedule *not* rescaled to the query budget (``resc_schedule=False``). Square uses only the model's
outputs: no gradient, so gradient masking does not stop it.

**Loss** (:func:`margin_and_loss`): the margin ``m = z_y - max_{j != y} z_j`` (the point is broken
when ``m <= 0``) and the loss minimised, ``m`` itself (``'margin'``) or ``-CE`` (``'ce'``).

**Square size** (:func:`p_schedule`, :func:`square_sizes`): at iteration ``i`` (``0, 1, ...``) the
fraction ``p(i)`` of pixels a window covers is ``p_init`` for ``i <= 10``, then halves after
iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000 and 8000 (``p_init / 512`` beyond 8000); with
``rescale_schedule`` the iteration is first mapped to ``int(i / n_queries * 10000)``. The window side
is ``s = max(round(sqrt(p * h * w)), 1)`` (L2: at least 3 and odd), at most ``min(h, w)``.

**Linf** (:func:`linf_proposal`): start ``x_best = clip(x + eps * v)`` with vertical stripes ``v``,
one random sign per column and channel; each iteration adds ``2 eps`` times one random sign per
channel on a random ``s x s`` window of ``x_best``, then projects onto the eps-box and the pixel box.

**L2** (:func:`l2_proposal`): start ``x + eps * normalise(delta)`` where ``delta`` tiles the image with
``s0 = h // 5``-sized windows (offset ``(h - 5 s0) // 2``), each holding the pattern ``eta(s0)`` (or
its transpose, at random) times one random sign per channel. ``eta(s)`` (:func:`eta_pattern`): the top
``s // 2`` rows and the bottom rows each hold concentric rectangles with weights ``sum_{k >= m}
1/(k+1)^2`` at Chebyshev distance ``m`` from their centre, the bottom one negated, each half then the
whole normalised to unit L2 norm. Each iteration draws two windows W1, W2; on W1 the new perturbation
is ``eta(s) * sign + delta_W1 / ||delta_W1||``, rescaled per channel to
``sqrt(max(eps^2 - ||delta||^2, 0) / c + ||delta_{W1 u W2}||_c^2)``; W2 is zeroed, W1 set, and the
proposal is ``clip(x + eps * normalise(delta))``. (Before the rescaling, ``||delta||`` becomes exactly
eps: the mass taken from W1 u W2 is returned to W1, plus the unused budget.)

**Acceptance**, per example still unbroken: the proposal replaces ``x_best`` when its loss is lower
than the best loss, or when it is misclassified (``m <= 0``); the best loss is updated only when lower.
A point stops being attacked once broken; the loop ends when every point is broken or after
``n_queries`` iterations (one query for the start plus one per iteration, per point, as the code
counts them).

**Where this differs from the authors' code, and why**: their code draws one window position (and,
Linf, one sign per channel) per iteration and uses it for the whole batch; here every example draws its
own, from ``fold_in(key, index)``, so an example's result does not depend on its batch mates (for a
batch of one the two coincide, which is how ``tests/attacks/test_square.py`` compares them step by step: the
same draws fed to both). Window positions are drawn, as in their code, from ``{0, ..., h - s - 1}``
(the last position is never used unless ``s = h``). Points the attack does not break are returned
unchanged, as by their code.

torchattacks 3.5.1 ports the earlier version of the authors' file, which differs in two places: its L2
rescaling uses the whole-image norm of ``delta`` on ``W1 u W2`` where the current code (and this module)
uses the norm per channel, and it does not cap ``s`` at ``min(h, w)``. The tests compare L2 with
torchattacks on one-channel images, where the two norms coincide, and check the per-channel budget
identity above by hand for three channels.

Every loop is a ``lax`` loop (compile time does not depend on ``n_queries``); the square sizes and
L2 patterns are tables computed once for the schedule.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from advalign_jax.attacks.apgd import L2, LINF, NORMALISE_EPS, _per_example
from advalign_jax.attacks.apgd_losses import _take, ce_loss

LOSSES = ("margin", "ce")
SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128), (8000, 256))


@dataclasses.dataclass(frozen=True)
class SquareConfig:
    """Square's hyperparameters (AutoAttack's values by default)."""

    norm: str = LINF
    n_queries: int = 5000
    n_restarts: int = 1
    p_init: float = 0.8
    loss: str = "margin"
    rescale_schedule: bool = False
    clip: Optional[tuple] = (0.0, 1.0)

    def __post_init__(self):
        if self.norm not in (L2, LINF):
            raise ValueError(f"Square norm must be 'l2' or 'linf', got {self.norm!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"Square loss must be one of {LOSSES}, got {self.loss!r}")
        if self.n_queries < 1:
            raise ValueError(f"n_queries must be at least 1, got {self.n_queries}")
        if self.n_restarts < 1:
            raise ValueError(f"n_restarts must be at least 1, got {self.n_restarts}")
        if not 0.0 < self.p_init <= 1.0:
            raise ValueError(f"p_init must be in (0, 1], got {self.p_init}")


SQUARE = SquareConfig()  # AutoAttack "standard" and "plus": 5,000 queries, 1 restart


# ----------------------------------------------------------------------------------------------------
# The schedule and the L2 window pattern (static tables)
# ----------------------------------------------------------------------------------------------------


def p_schedule(i: int, n_queries: int, p_init: float, rescale: bool = False) -> float:
    """The fraction of pixels of the window at iteration ``i`` (module docstring)."""
    if rescale:
        i = int(i / n_queries * 10000)
    for last, divisor in reversed(SCHEDULE):
        if i > last:
            return p_init / (2 * divisor)
    return p_init


def square_size(p: float, h: int, w: int, c: int, norm: str) -> int:
    """The window side for fraction ``p`` on an ``h x w x c`` image, as the authors' code rounds it."""
    n_features = c * h * w
    if norm == LINF:
        s = max(int(round(math.sqrt(p * n_features / c))), 1)
    else:
        s = max(int(round(math.sqrt(p * n_features / c))), 3)
        s = s + 1 if s % 2 == 0 else s
    return min(s, min(h, w))


def square_sizes(cfg: SquareConfig, h: int, w: int, c: int) -> np.ndarray:
    """(n_queries,) int: the window side at every iteration."""
    return np.array([square_size(p_schedule(i, cfg.n_queries, cfg.p_init, cfg.rescale_schedule), h, w, c, cfg.norm)
                     for i in range(cfg.n_queries)], np.int32)


def _rectangles(rows: int, cols: int) -> np.ndarray:
    """Concentric rectangles: weight ``sum_{k=m}^{K-1} 1/(k+1)^2`` at Chebyshev distance ``m`` from
    ``(rows // 2, cols // 2)``, ``K = max(rows // 2, cols // 2) + 1``; unit L2 norm."""
    if rows == 0 or cols == 0:
        return np.zeros((rows, cols))
    big_k = max(rows // 2, cols // 2) + 1
    tail = np.cumsum([1.0 / (k + 1) ** 2 for k in range(big_k)][::-1])[::-1]  # tail[m] = sum_{k>=m}
    m = np.maximum(np.abs(np.arange(rows) - rows // 2)[:, None], np.abs(np.arange(cols) - cols // 2)[None, :])
    out = tail[m]
    return out / np.sqrt(np.sum(out ** 2))


def eta_pattern(s: int) -> np.ndarray:
    """The L2 window pattern ``eta(s)`` (s, s), float64, unit L2 norm (module docstring)."""
    out = np.concatenate([_rectangles(s // 2, s), -_rectangles(s - s // 2, s)], axis=0)
    return out / np.sqrt(np.sum(out ** 2))


def _pattern_table(sizes, width: int) -> np.ndarray:
    """Patterns for ``sizes``, zero-padded to (width, width): (len(sizes), 2, width, width) with the
    transposed pattern at [:, 1]."""
    table = np.zeros((len(sizes), 2, width, width))
    for j, s in enumerate(sizes):
        table[j, 0, :s, :s] = eta_pattern(int(s))
        table[j, 1, :s, :s] = eta_pattern(int(s)).T
    return table


# ----------------------------------------------------------------------------------------------------
# Loss, windows and proposals (one example: x (H, W, C))
# ----------------------------------------------------------------------------------------------------


def margin_and_loss(logits, y, loss: str = "margin"):
    """Per-example margin ``z_y - max_{j != y} z_j`` and the loss Square minimises (margin or -CE)."""
    z = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    others = jnp.where(jax.nn.one_hot(y, z.shape[1], dtype=bool), -jnp.inf, z)
    margin = _take(z, y) - jnp.max(others, axis=1)
    return margin, (margin if loss == "margin" else -ce_loss(z, y))


def window(h: int, w: int, top, left, s):
    """(h, w) bool: the ``s x s`` window at ``(top, left)``."""
    rows = (jnp.arange(h) >= top) & (jnp.arange(h) < top + s)
    cols = (jnp.arange(w) >= left) & (jnp.arange(w) < left + s)
    return rows[:, None] & cols[None, :]


def place(pattern, h: int, w: int, top, left):
    """``pattern`` (P, P) placed with its corner at ``(top, left)`` on a zero (h, w) canvas (cut at the
    border; the pattern is zero beyond its size)."""
    size = pattern.shape[0]
    r = jnp.arange(h) - top
    c = jnp.arange(w) - left
    inside = ((r >= 0) & (r < size))[:, None] & ((c >= 0) & (c < size))[None, :]
    return jnp.where(inside, pattern[jnp.clip(r, 0, size - 1)][:, jnp.clip(c, 0, size - 1)], 0.0)


def _clip(x, clip):
    return x if clip is None else jnp.clip(x, clip[0], clip[1])


def _l2(v, axes=None):
    return jnp.sqrt(jnp.sum(v * v, axis=axes, keepdims=True))


def linf_start(x, eps, stripes, clip):
    """``clip(x + eps * stripes)``; ``stripes`` (W, C) signs, constant down each column."""
    return _clip(x + eps * stripes[None].astype(x.dtype), clip)


def linf_proposal(x, x_best, eps, s, draws, clip):
    """``x_best`` plus ``2 eps * sign_c`` on the window, projected onto the eps-box and the pixel box."""
    h, w = x.shape[:2]
    win = window(h, w, draws["top"], draws["left"], s)[..., None]
    new = x_best + jnp.where(win, 2.0 * eps * draws["signs"].astype(x.dtype), 0.0)
    return _clip(jnp.clip(new, x - eps, x + eps), clip)


def l2_start(x, eps, patterns, flips, signs, s0: int, clip):
    """``clip(x + eps * normalise(delta))`` with ``delta`` the grid of ``eta(s0)`` windows (row-major,
    ``h // s0`` by ``w // s0``, from ``offset = (h - 5 s0) // 2``; cut at the border); ``patterns``
    (2, s0, s0): eta(s0) and its transpose; ``flips`` (n_windows,), ``signs`` (n_windows, C)."""
    h, w, _ = x.shape
    offset = (h - 5 * s0) // 2
    rows, cols = jnp.arange(h) - offset, jnp.arange(w) - offset
    grid_r, grid_c = h // s0, w // s0
    inside = (((rows >= 0) & (rows // s0 < grid_r))[:, None]) & (((cols >= 0) & (cols // s0 < grid_c))[None, :])
    k = jnp.clip(rows // s0, 0, grid_r - 1)[:, None] * grid_c + jnp.clip(cols // s0, 0, grid_c - 1)[None, :]
    value = patterns[flips[k], (rows % s0)[:, None], (cols % s0)[None, :]]  # (h, w)
    delta = jnp.where(inside[..., None], value[..., None].astype(x.dtype) * signs[k].astype(x.dtype), 0.0)
    return _clip(x + eps * delta / (_l2(delta) + NORMALISE_EPS), clip)


def l2_proposal(x, x_best, eps, s, pattern, draws, clip):
    """The L2 proposal of the module docstring; ``pattern`` (P, P): eta(s), transposed if drawn."""
    delta = l2_window_update(x_best - x, eps, s, pattern, draws)
    return _clip(x + eps * delta / (_l2(delta) + NORMALISE_EPS), clip)


def l2_window_update(delta, eps, s, pattern, draws):
    """The perturbation ``delta`` (H, W, C) after one L2 update, before its final normalisation: W2
    zeroed, W1 set to the rescaled pattern plus W1's old direction (module docstring)."""
    h, w, c = delta.shape
    w1 = window(h, w, draws["top"], draws["left"], s)[..., None]
    w2 = window(h, w, draws["top2"], draws["left2"], s)[..., None]
    norm_w1 = _l2(jnp.where(w1, delta, 0.0), (0, 1))  # (1, 1, C)
    norm_union = _l2(jnp.where(w1 | w2, delta, 0.0), (0, 1))
    norm_image = _l2(delta)
    new = place(pattern, h, w, draws["top"], draws["left"])[..., None].astype(delta.dtype) * \
        draws["signs"].astype(delta.dtype)
    new = jnp.where(w1, new + delta / (NORMALISE_EPS + norm_w1), 0.0)
    budget = jnp.sqrt(jnp.maximum(eps ** 2 - norm_image ** 2, 0.0) / c + norm_union ** 2)
    new = new / (NORMALISE_EPS + _l2(new, (0, 1))) * budget
    return jnp.where(w1, new, jnp.where(w2, 0.0, delta))


# ----------------------------------------------------------------------------------------------------
# Random draws: per example, per iteration
# ----------------------------------------------------------------------------------------------------


def _example_key(key, restart, index):
    return jax.random.fold_in(jax.random.fold_in(key, restart), index)


def start_draws(key, shape, cfg: SquareConfig) -> dict:
    """One example's draws for the start (``key`` its own key): Linf ``stripes`` (W, C) signs;
    L2 ``flips`` (n_windows,) in {0, 1} and ``signs`` (n_windows, C)."""
    h, w, c = shape
    k = jax.random.fold_in(key, 0)
    if cfg.norm == LINF:
        return {"stripes": jax.random.rademacher(k, (w, c), jnp.int32)}
    s0 = h // 5
    n = (h // s0) * (w // s0)
    kf, ks = jax.random.split(k)
    return {"flips": jax.random.bernoulli(kf, 0.5, (n,)).astype(jnp.int32),
            "signs": jax.random.rademacher(ks, (n, c), jnp.int32)}


def step_draws(key, i, s, shape, norm: str) -> dict:
    """One example's draws at iteration ``i``: window corners ``top``, ``left`` uniform in
    ``{0, ..., h - s - 1}`` (``{0}`` when ``s = h``), ``signs`` (C,); L2 also ``top2``, ``left2``
    (the second window) and ``flip`` (transpose eta)."""
    h, w, c = shape
    k = jax.random.split(jax.random.fold_in(key, i + 1), 6)
    out = {"top": jax.random.randint(k[0], (), 0, jnp.maximum(h - s, 1)),
           "left": jax.random.randint(k[1], (), 0, jnp.maximum(w - s, 1)),
           "signs": jax.random.rademacher(k[2], (c,), jnp.int32)}
    if norm == L2:
        out.update(top2=jax.random.randint(k[3], (), 0, jnp.maximum(h - s, 1)),
                   left2=jax.random.randint(k[4], (), 0, jnp.maximum(w - s, 1)),
                   flip=jax.random.bernoulli(k[5], 0.5).astype(jnp.int32))
    return out


# ----------------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------------


def square_run(logits_fn: Callable, x, y, eps, cfg: SquareConfig, key=None, index=None, mask=None,
               restart: int = 0, trace: bool = False) -> dict:
    """One Square run on images ``x`` (N, H, W, C). Returns per-example ``x_best``, ``margin`` (the
    best margin), ``loss``, ``queries`` (int) and ``success`` (``margin <= 0``); with ``trace=True``
    the loop makes every iteration (points still stop changing once broken) and also returns
    ``trace_margin`` (n_queries, N): the margin of each proposal, and ``trace_accept`` (n_queries, N).
    Examples outside ``mask`` are not attacked."""
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    if x.ndim != 4:
        raise ValueError(f"Square attacks images (N, H, W, C); got shape {x.shape}")
    n, h, w, c = x.shape
    if cfg.norm == L2 and h < 5:
        raise ValueError(f"Square L2 tiles the start with windows of side h // 5: images need h >= 5, got {h}")
    key = jax.random.PRNGKey(0) if key is None else key
    index = jnp.arange(n) if index is None else jnp.asarray(index)
    mask = jnp.ones(n, bool) if mask is None else jnp.asarray(mask, bool)
    eps_b = _per_example(eps, x)
    keys = jax.vmap(lambda i: _example_key(key, restart, i))(index)
    sizes_np = square_sizes(cfg, h, w, c)
    sizes = jnp.asarray(sizes_np)

    start = jax.vmap(lambda k: start_draws(k, (h, w, c), cfg))(keys)
    if cfg.norm == LINF:
        x_best = jax.vmap(lambda xi, e, st: linf_start(xi, e, st, cfg.clip))(x, eps_b, start["stripes"])
    else:
        s0 = h // 5
        pats0 = jnp.asarray(_pattern_table([s0], s0)[0], x.dtype)
        x_best = jax.vmap(lambda xi, e, f, sg: l2_start(xi, e, pats0, f, sg, s0, cfg.clip))(
            x, eps_b, start["flips"], start["signs"])
        distinct = sorted(set(sizes_np.tolist()))
        table = jnp.asarray(_pattern_table(distinct, max(distinct)), x.dtype)
        slot = jnp.asarray(np.searchsorted(distinct, sizes_np).astype(np.int32))
    x_best = jnp.where(mask.reshape(-1, 1, 1, 1), x_best, x)
    margin, loss = margin_and_loss(logits_fn(x_best), y, cfg.loss)
    queries = jnp.where(mask, 1, 0).astype(jnp.int32)

    def propose(i, xb):
        s = sizes[i]
        d = jax.vmap(lambda k: step_draws(k, i, s, (h, w, c), cfg.norm))(keys)
        if cfg.norm == LINF:
            return jax.vmap(lambda xi, b, e, dd: linf_proposal(xi, b, e, s, dd, cfg.clip))(x, xb, eps_b, d)
        pats = table[slot[i]]  # (2, P, P)
        return jax.vmap(lambda xi, b, e, dd: l2_proposal(xi, b, e, s, pats[dd["flip"]], dd, cfg.clip))(
            x, xb, eps_b, d)

    def step(i, state):
        xb, m, l, q = state
        active = mask & (m > 0)
        x_new = propose(i, xb)
        m_new, l_new = margin_and_loss(logits_fn(x_new), y, cfg.loss)
        lower = l_new < l
        accept = active & (lower | (m_new <= 0))
        xb = jnp.where(accept.reshape(-1, 1, 1, 1), x_new, xb)
        m = jnp.where(accept, m_new, m)
        l = jnp.where(active & lower, l_new, l)
        return (xb, m, l, q + active.astype(jnp.int32)), (m_new, accept)

    state = (x_best, margin, loss, queries)
    if trace:
        state, (trace_margin, trace_accept) = jax.lax.scan(lambda st, i: step(i, st), state,
                                                           jnp.arange(cfg.n_queries))
    else:
        def cond(carry):
            i, st = carry
            return (i < cfg.n_queries) & jnp.any(mask & (st[1] > 0))

        _, state = jax.lax.while_loop(cond, lambda carry: (carry[0] + 1, step(carry[0], carry[1])[0]),
                                      (jnp.asarray(0), state))
    x_best, margin, loss, queries = state
    out = dict(x_best=x_best, margin=margin, loss=loss, queries=queries, success=mask & (margin <= 0))
    if trace:
        out.update(trace_margin=trace_margin, trace_accept=trace_accept)
    return out


# ----------------------------------------------------------------------------------------------------
# Restarts
# ----------------------------------------------------------------------------------------------------


def square(logits_fn: Callable, x, y, eps, cfg: SquareConfig = SQUARE, key=None, index=None, mask=None):
    """Runs Square (all restarts, each on the points not yet broken); returns ``(x_adv, success)``.

    ``eps`` scalar or (N,); ``key`` the random draws (default ``PRNGKey(0)``); ``index`` (N,) each
    example's id for its draws (default 0..N-1); ``mask`` (N,) bool the examples to attack.
    ``success``: misclassified at ``x_adv``; points not broken, outside ``mask`` or already
    misclassified are returned unchanged. Wrap in ``jax.jit`` (``cfg`` static) to compile."""
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    n = x.shape[0]
    key = jax.random.PRNGKey(0) if key is None else key
    index = jnp.arange(n) if index is None else jnp.asarray(index)
    mask = jnp.ones(n, bool) if mask is None else jnp.asarray(mask, bool)
    wrong0 = jnp.argmax(logits_fn(x), axis=1) != y
    to_attack = mask & ~wrong0

    def one_run(r, carry):
        x_out, done = carry
        active = to_attack & ~done

        def attack(_):
            res = square_run(logits_fn, x, y, eps, cfg, key, index, active, restart=r)
            broken = active & (jnp.argmax(logits_fn(res["x_best"]), axis=1) != y)
            return jnp.where(broken.reshape(-1, 1, 1, 1), res["x_best"], x_out), done | broken

        return jax.lax.cond(jnp.any(active), attack, lambda _: carry, None)

    return jax.lax.fori_loop(0, cfg.n_restarts, one_run, (x, wrong0))

"""The unit-sensitivity search (advalign_jax.evaluation.sensitivity.optimize) against closed-form maxima
(linear and ReLU units, with and without the [0, 1] box; the box case also solved by scipy's SLSQP), an
independent PyTorch float64 implementation written from the module's specification
(tests/references/torch_sensitivity.py) on a small conv net with the same weights, and checks of what
the procedure claims: more restarts never lower the estimate, every result lies in the eps-ball and the
box, the 2 eps phase finds what a plain eps search cannot, the step shrinks by exactly ``decay`` after
each iteration without progress, and bad settings fail with one line naming the key.

Everything runs in float64 (``jax.enable_x64``) on tiny problems."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch_sensitivity as tsens
from scipy import optimize as sopt

from advalign_jax.errors import ConfigError
from advalign_jax.evaluation.sensitivity.optimize import (
    SearchConfig,
    item_sensitivity,
    maximise,
    run_grid,
    uniform_ball,
)

ROUNDING = 1e-12  # relative float64 slack allowed above a true maximum


def _keys(b, seed=0):
    """``b`` raw (uint32 pairs) random keys, made in NumPy so that no key-splitting program is compiled."""
    return jnp.asarray(np.random.default_rng(seed + 1000).integers(0, 2 ** 32, size=(b, 2), dtype=np.uint32))


def _np(a):
    return np.asarray(a)


def _cfg(**settings):
    """A :class:`SearchConfig` whose phases run as a plain compiled loop (``unroll=1``): the cheapest to
    compile for these small checks; the result does not depend on it (checked in
    :func:`test_the_step_shrinks_by_decay_after_each_iteration_without_progress`)."""
    settings.setdefault("unroll", 1)
    return SearchConfig(**settings)


def _compiled_maximise(objective, x, eps, config, init=None):
    """:func:`maximise` under ``jit``, as the evaluator runs it (for searches that draw no random starts:
    one compilation is much cheaper here than the many small ones of eager dispatch)."""
    return jax.jit(lambda x_, e_, k_, i_: maximise(objective, x_, e_, k_, config, init=i_))(
        x, eps, _keys(x.shape[0]), init)


def _linear(w, bias):
    """A layer of linear units ``r_u(x) = w_u . x + b_u`` on flattened images, in JAX."""
    w, bias = jnp.asarray(w), jnp.asarray(bias)
    return lambda images: images.reshape(images.shape[0], -1) @ w + bias


# Every random-start search here runs 4 items x 2 x 3 restarts on (6, 6, 3) images, the shapes of the
# conv-net tests too: JAX then compiles the random draws once for the whole file.
B, R, SHAPE = 4, 3, (6, 6, 3)
D = 108

# ------------------------------------------------------------------------------------------ analytic


@pytest.mark.parametrize("start", ["random", "zero"])
def test_a_linear_unit_reaches_eps_times_the_norm_of_its_weights(start):
    """``r(x) = w . x + b`` without a box: ``max_{||d|| <= eps} |w . d| = eps ||w||_2`` (Cauchy-Schwarz), for
    either sign. The estimate reaches it to 1e-4 and never exceeds it (float64 rounding only)."""
    rng = np.random.default_rng(1)
    w, bias = rng.normal(size=(D, 5)), rng.normal(size=5)
    x = rng.normal(size=(B,) + SHAPE)
    unit = np.array([0, 2, 4, 2])
    eps = np.array([0.05, 0.5, 3.0, 7.0])
    with jax.enable_x64(True):
        out = item_sensitivity(_linear(w, bias), jnp.asarray(x), jnp.asarray(unit), jnp.asarray(eps), _keys(B),
                               _cfg(restarts=R, steps=20, start=start, clip=None))
        out = {k: _np(v) for k, v in out.items()}
    truth = eps * np.linalg.norm(w[:, unit], axis=0)
    assert np.all(out["sensitivity"] <= truth * (1 + ROUNDING))
    np.testing.assert_allclose(out["sensitivity"], truth, rtol=1e-4)
    np.testing.assert_allclose(out["clean"], np.einsum("bd,db->b", x.reshape(B, -1), w[:, unit]) + bias[unit],
                               rtol=1e-12)
    # the reported point is the one of the estimate: |r(x + d) - r(x)| there, inside the ball
    np.testing.assert_allclose(out["sign"] * (out["response"] - out["clean"]), out["sensitivity"], rtol=1e-10)
    assert np.all(out["norm"] <= eps * (1 + 1e-9)) and set(np.unique(out["sign"])) <= {-1, 1}
    assert np.all((out["restart"] >= 0) & (out["restart"] < R))


@pytest.mark.parametrize("start", ["random", "zero"])
def test_a_relu_unit_alive_at_the_image_or_dead_in_the_whole_wide_ball(start):
    """``r(x) = relu(z(x))``, ``z = w . x + b``. Over the eps-ball ``w . d`` takes every value of
    ``[-a, a]``, ``a = eps ||w||``, and relu is monotone, so the maximum is
    ``max(relu(z + a) - relu(z), relu(z) - relu(z - a))``:

    - ``z > 0``: the increase is ``(z + a) - z = a``, the decrease ``z - max(z - a, 0) = min(z, a) <= a``:
      the maximum is ``a``;
    - ``z <= -a``: both are 0 (the unit is 0 on the whole ball).

    Alive units (``z = kappa a``, kappa > 0) reach ``a`` to 1e-4 and never exceed it: from random starts when
    the unit is alive in the whole wide ball (kappa > 2, so every gradient is ``w``), from zero starts for
    small kappa too (the + run walks towards ``+w`` where the unit stays alive). A unit with
    ``z <= -3 a`` is dead in the whole 2 eps ball: every gradient is zero, no step is taken, and the estimate
    is exactly 0. ``z = -0.5 a`` from the zero start: the truth is ``a / 2`` (the unit comes alive inside
    the ball), but the gradient at the start is zero, so the estimate is 0: a lower bound, as documented."""
    rng = np.random.default_rng(2)
    w = rng.normal(size=(D, B))  # item i reads unit i, whose bias sets its z
    x = rng.uniform(-1, 1, size=(B,) + SHAPE)
    eps = np.array([0.1, 0.4, 1.0, 2.5])
    kappa = {"random": np.array([2.5, 10.0, -3.0, -10.0]), "zero": np.array([0.3, 1.5, -0.5, -3.0])}[start]
    a = eps * np.linalg.norm(w, axis=0)
    bias = kappa * a - np.einsum("bd,db->b", x.reshape(B, -1), w)
    with jax.enable_x64(True):
        wj, bj = jnp.asarray(w), jnp.asarray(bias)
        out = item_sensitivity(lambda im: jax.nn.relu(im.reshape(im.shape[0], -1) @ wj + bj), jnp.asarray(x),
                               jnp.arange(B), jnp.asarray(eps), _keys(B, 5),
                               _cfg(restarts=R, steps=20, start=start, clip=None))
        sens = _np(out["sensitivity"])
    z = kappa * a
    truth = np.maximum(np.maximum(z + a, 0) - np.maximum(z, 0), np.maximum(z, 0) - np.maximum(z - a, 0))
    alive, dead = z > 0, z <= -2 * a
    assert np.all(sens <= truth * (1 + ROUNDING))
    np.testing.assert_allclose(sens[alive], a[alive], rtol=1e-4)
    assert np.all(sens[dead] == 0.0) and np.all(truth[dead] == 0.0)
    if start == "zero":
        assert sens[2] == 0.0 and truth[2] == pytest.approx(0.5 * a[2], rel=1e-12)


def _box_truth(w, x, eps, lo=0.0, hi=1.0, slsqp=True):
    """``max |w . d|`` over ``||d|| <= eps``, ``lo <= x + d <= hi`` (``x`` inside the box): for each sign the
    maximiser of ``s w . d`` is ``clip(lam s w, lo - x, hi - x)`` with ``lam >= 0`` where the norm is eps (the
    KKT conditions of this separable concave problem; ``lam`` by Brent's root finder); the better sign
    cross-checked with scipy's SLSQP on the problem itself (``slsqp``)."""
    w, lower, upper = w.ravel(), lo - x.ravel(), hi - x.ravel()
    best, best_sign = -np.inf, 0.0
    for s in (1.0, -1.0):
        ws = s * w

        def at(lam, ws=ws):
            return np.clip(lam * ws, lower, upper)

        far = 1e12
        if np.linalg.norm(at(far)) <= eps:
            kkt = ws @ at(far)
        else:
            lam = sopt.brentq(lambda t: np.linalg.norm(at(t)) - eps, 0.0, far, xtol=1e-300, rtol=1e-15, maxiter=2000)
            kkt = ws @ at(lam)
        if kkt > best:
            best, best_sign = kkt, s
    if slsqp:
        ws = best_sign * w
        res = sopt.minimize(lambda z: -ws @ z, np.zeros_like(ws), jac=lambda z: -ws, method="SLSQP",
                            bounds=list(zip(lower, upper)),
                            constraints=[{"type": "ineq", "fun": lambda z: eps ** 2 - z @ z, "jac": lambda z: -2 * z}],
                            options={"ftol": 1e-10, "maxiter": 500})
        # (SLSQP may stop at its precision limit with status 8: judge its point, not its flag)
        assert np.linalg.norm(res.x) <= eps * (1 + 1e-8) and np.all(res.x >= lower - 1e-10) and np.all(
            res.x <= upper + 1e-10)
        assert abs(ws @ res.x - best) <= 1e-7 * max(1.0, abs(best))
    return max(best, 0.0)


@pytest.mark.parametrize("case", ["faces", "inside"])
def test_a_linear_unit_in_the_unit_box(case):
    """``r(x) = w . x + b`` with ``x + d`` clipped into [0, 1], the maximum over ball ∩ box (:func:`_box_truth`).

    - ``faces``: pixels on the box's faces (0 or 1) or at 0.5, eps < 0.5: a face pixel can only move
      inwards, a 0.5 pixel never reaches a face, so for sign s the maximum is ``eps ||w_F||`` over the pixels
      ``F`` that can move along ``s w`` (:func:`_box_truth` agrees to 1e-12); the estimate reaches it to 1e-4;
    - ``inside``: pixels anywhere in [0, 1] (a quarter on each face) with larger eps, where the box cuts the
      ball at interior pixels (truth from the KKT form, checked by SLSQP): the estimate stays a lower bound
      (never above the truth), within 10% of it. Projection *then* clip is not the projection onto
      ball ∩ box, and the search creeps along the faces: 20 steps fall 0.05%, 1%, 2% and 6% short at
      eps = 0.3, 0.8, 1.5, 2.5 here (300 steps: 0.8% at 2.5), and the reference implementation of the same
      procedure falls short by the same amounts."""
    rng = np.random.default_rng(3 if case == "faces" else 4)
    w, bias = rng.normal(size=(D, 4)), rng.normal(size=4)
    if case == "faces":
        x = rng.choice([0.0, 0.5, 1.0], size=(B,) + SHAPE)
        eps = np.array([0.1, 0.3, 0.45, 0.2])
    else:
        x = rng.uniform(0, 1, size=(B,) + SHAPE)
        m = rng.uniform(size=x.shape)
        x[m < 0.25], x[m > 0.75] = 0.0, 1.0
        eps = np.array([0.3, 0.8, 1.5, 2.5])
    unit = np.array([0, 1, 3, 2])
    with jax.enable_x64(True):
        out = item_sensitivity(_linear(w, bias), jnp.asarray(x), jnp.asarray(unit), jnp.asarray(eps), _keys(B, 7),
                               _cfg(restarts=R, steps=20, clip=(0.0, 1.0)))
        sens = _np(out["sensitivity"])
    truth = np.array([_box_truth(w[:, u], xi, e, slsqp=case == "inside") for u, xi, e in zip(unit, x, eps)])
    assert np.all(sens <= truth * (1 + ROUNDING))
    if case == "faces":
        for i in range(B):  # the closed form
            wi, xi = w[:, unit[i]], x[i].ravel()
            movable = [(xi == 0.5) | ((xi == 0) & (s * wi > 0)) | ((xi == 1) & (s * wi < 0)) for s in (1, -1)]
            assert truth[i] == pytest.approx(eps[i] * max(np.linalg.norm(wi[f]) for f in movable), rel=1e-12)
        np.testing.assert_allclose(sens, truth, rtol=1e-4)
    else:
        assert np.all(sens >= 0.9 * truth)


# ------------------------------------------------------------------------------ the PyTorch reference


def _net_weights(seed=0):
    rng = np.random.default_rng(seed)
    return {"w1": rng.normal(size=(3, 3, 3, 4)) * 0.5, "b1": rng.normal(size=4) * 0.1,
            "w2": rng.normal(size=(64, 5)) * 0.3, "b2": rng.normal(size=5) * 0.1}


def _jax_net(p, act):
    """conv 3x3 (3 -> 4, valid) -> act -> dense (64 -> 5) -> tanh, on NHWC (M, 6, 6, 3) images."""
    w1, b1, w2, b2 = (jnp.asarray(p[k]) for k in ("w1", "b1", "w2", "b2"))
    a = {"softplus": jax.nn.softplus, "relu": jax.nn.relu}[act]

    def net(images):
        h = jax.lax.conv_general_dilated(images, w1, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        h = a(h + b1)
        return jnp.tanh(h.reshape(h.shape[0], -1) @ w2 + b2)

    return net


def _torch_net(p, act):
    """The same net in PyTorch (NCHW inside, NHWC images and NHWC flattening outside)."""
    w1 = torch.as_tensor(p["w1"]).permute(3, 2, 0, 1)  # HWIO -> OIHW
    b1, w2, b2 = (torch.as_tensor(p[k]) for k in ("b1", "w2", "b2"))
    a = {"softplus": F.softplus, "relu": F.relu}[act]

    def net(images):
        h = a(F.conv2d(images.permute(0, 3, 1, 2), w1, b1))
        return torch.tanh(h.permute(0, 2, 3, 1).reshape(h.shape[0], -1) @ w2 + b2)

    return net


def _items(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, size=(4, 6, 6, 3))
    x[0, :2] = 0.0  # pixels on the box's faces
    x[1, 3:, :, 1] = 1.0
    return x, np.array([0, 2, 4, 1]), np.array([0.1, 0.3, 0.6, 1.0])


def _ball_draw(rng, n, shape, radius):
    z = rng.normal(size=(n,) + shape)
    u = rng.uniform(size=n) ** (1.0 / math.prod(shape))
    return z / np.linalg.norm(z.reshape(n, -1), axis=1).reshape((n,) + (1,) * len(shape)) * (radius * u).reshape(
        (n,) + (1,) * len(shape))


@pytest.mark.parametrize("act", ["softplus", "relu"])
def test_maximise_equals_the_reference_run_for_run(act):
    """Both sides run the same 2R runs per item (sign-major: run k and k + R from the same start, drawn here
    uniformly in the 2 eps ball) on the same float64 net: every run's phase-2 best value to 1e-8, its point to
    1e-8, and each item's chosen (sign, restart)."""
    p = _net_weights(0)
    x, unit, eps = _items(0)
    b, r, steps = 4, 3, 12
    rng = np.random.default_rng(11)
    starts = np.stack([_ball_draw(rng, r, (6, 6, 3), 2 * e) for e in eps])  # (B, R, 6, 6, 3)
    sign, restart = (_np(a) for a in run_grid(r))
    runs_x = np.repeat(x, 2 * r, axis=0)
    runs_init = starts[:, restart].reshape((b * 2 * r, 6, 6, 3))
    runs_unit, runs_eps, runs_sign = np.repeat(unit, 2 * r), np.repeat(eps, 2 * r), np.tile(sign, b)
    with jax.enable_x64(True):
        net = _jax_net(p, act)
        clean = _np(net(jnp.asarray(x)))[np.arange(b), unit]
        units_j, signs_j, base_j = jnp.asarray(runs_unit), jnp.asarray(runs_sign), jnp.asarray(np.repeat(clean, 2 * r))

        def objective(images):
            return signs_j * (jnp.take_along_axis(net(images), units_j[:, None], axis=1)[:, 0] - base_j)

        value, delta = _compiled_maximise(objective, jnp.asarray(runs_x), jnp.asarray(runs_eps),
                                          _cfg(restarts=r, steps=steps), init=jnp.asarray(runs_init))
        value, delta = _np(value), _np(delta)
    ref = tsens.item_sensitivity(_torch_net(p, act), x, unit, eps, starts, steps)
    tv = ref["values"].numpy()
    np.testing.assert_allclose(value.reshape(b, 2 * r), tv, rtol=1e-8, atol=1e-13)
    np.testing.assert_allclose(ref["clean"].numpy(), clean, rtol=1e-12)
    best = np.argmax(value.reshape(b, 2 * r), axis=1)
    np.testing.assert_array_equal(sign[best], ref["sign"].numpy())
    np.testing.assert_array_equal(restart[best], ref["restart"].numpy())
    np.testing.assert_allclose(delta.reshape(b, 2 * r, 6, 6, 3)[np.arange(b), best], ref["delta"].numpy(), atol=1e-8)
    assert np.all(value.reshape(b, 2 * r).max(axis=1) > 0)  # every item moves its unit


def test_item_sensitivity_equals_the_reference_with_the_same_starts():
    """``item_sensitivity``'s own starts (restart k of an item from ``fold_in(key, k)``, uniform in the 2 eps
    ball) drawn again with ``uniform_ball`` and handed to the reference: the estimate to 1e-8, the chosen
    sign and restart, the norm, the response reached and the clean response."""
    p = _net_weights(1)
    x, unit, eps = _items(1)
    b, r, steps = 4, 3, 12
    keys = _keys(b, 21)
    with jax.enable_x64(True):
        out = item_sensitivity(_jax_net(p, "softplus"), jnp.asarray(x), jnp.asarray(unit), jnp.asarray(eps), keys,
                               _cfg(restarts=r, steps=steps))
        out = {k: _np(v) for k, v in out.items()}
        # the documented rule for run (item i, sign, restart k): uniform_ball from fold_in(key_i, k) in the 2 eps ball
        restart = run_grid(r)[1]
        run_keys = jax.vmap(lambda key: jax.vmap(lambda k: jax.random.fold_in(key, k))(restart))(keys)
        draws = jax.vmap(lambda k, rad: uniform_ball(k, (1, 6, 6, 3), rad[None], jnp.float64)[0])(
            run_keys.reshape(b * 2 * r, -1), jnp.repeat(jnp.asarray(2 * eps), 2 * r))
        draws = _np(draws).reshape(b, 2 * r, 6, 6, 3)
    np.testing.assert_array_equal(draws[:, :r], draws[:, r:])  # both signs of a restart share it
    starts = draws[:, :r]
    assert np.all(np.linalg.norm(starts.reshape(b, r, -1), axis=2) <= 2 * eps[:, None] * (1 + 1e-12))
    ref = {k: v.numpy() for k, v in tsens.item_sensitivity(_torch_net(p, "softplus"), x, unit, eps, starts,
                                                            steps).items()}
    np.testing.assert_allclose(out["sensitivity"], ref["sensitivity"], rtol=1e-8)
    np.testing.assert_array_equal(out["sign"], ref["sign"])
    np.testing.assert_array_equal(out["restart"], ref["restart"])
    for k in ("norm", "response", "clean"):
        np.testing.assert_allclose(out[k], ref[k], rtol=1e-8, err_msg=k)


# ------------------------------------------------------------------------------ what the procedure claims


def test_more_restarts_never_lower_the_estimate():
    """Restart k's start comes from ``fold_in(key, k)`` and runs are independent, so R' = 6 restarts contain
    the runs of R = 3 restarts: the estimate can only grow. Two items, each with two keys, R = 3 for the four
    in one batch; R' = 6 for one key of each in a batch of two (which also relies on an item's result not
    depending on the rest of its batch)."""
    p = _net_weights(2)
    rng = np.random.default_rng(4)
    x = np.repeat(rng.uniform(0, 1, size=(2, 6, 6, 3)), 2, axis=0)
    unit, eps = np.array([0, 0, 3, 3]), np.array([0.5, 0.5, 1.5, 1.5])
    keys = _keys(4, 3)
    with jax.enable_x64(True):
        net = _jax_net(p, "softplus")

        def estimate(items, restarts):
            return _np(item_sensitivity(net, jnp.asarray(x[items]), jnp.asarray(unit[items]),
                                        jnp.asarray(eps[items]), keys[items],
                                        _cfg(restarts=restarts, steps=8))["sensitivity"])

        few = estimate(np.arange(4), 3)[[0, 2]]
        more = estimate(np.array([0, 2]), 6)
    assert np.all(more >= few * (1 - ROUNDING)), (few, more)
    assert np.any(more > few * (1 + 1e-9)), (few, more)  # and the extra restarts do find more here


def test_every_result_lies_in_the_eps_ball_and_the_box():
    """``wide = 2``: phase 1 roams the 2 eps ball, but the returned perturbations (phase 2's) have norm <= eps
    (1e-9 slack) and ``x + delta`` in [0, 1] (1e-12 slack: ``x + (clip(x + d) - x)`` may round by an ulp)."""
    p = _net_weights(3)
    rng = np.random.default_rng(5)
    x = rng.choice([0.0, 0.02, 0.5, 0.98, 1.0], size=(24, 6, 6, 3))
    eps = np.tile([0.1, 0.5, 2.0, 4.0], 6)
    unit = np.arange(24) % 5
    with jax.enable_x64(True):
        net = _jax_net(p, "softplus")
        units_j = jnp.asarray(unit)
        sign = jnp.asarray(np.where(np.arange(24) % 2 == 0, 1.0, -1.0))

        def objective(images):
            return sign * jnp.take_along_axis(net(images), units_j[:, None], axis=1)[:, 0]

        _, delta = maximise(objective, jnp.asarray(x), jnp.asarray(eps), _keys(24, 9),
                                _cfg(restarts=1, steps=10, wide=2.0))
        delta = _np(delta)
    norms = np.linalg.norm(delta.reshape(24, -1), axis=1)
    assert np.all(norms <= eps * (1 + 1e-9))
    assert np.all(x + delta >= -1e-12) and np.all(x + delta <= 1 + 1e-12)
    assert np.all(norms > 0.5 * eps)  # the points did move (most of the way to the sphere here)


def _ring(eps, module):
    """A unit on 2-pixel images ``(u, v)`` (``x = 0``) built so that the 2 eps phase matters:

    ``r(d) = u + m(|d|) K (1 - u / |d|) + H exp(-|d - c|^2 / s^2)``, ``m`` the smoothstep from 0 at
    ``|d| = eps`` to 1 at ``1.5 eps`` (zero inside the eps-ball), ``c = (-eps, 0)``, ``K = H = 10 eps``,
    ``s = 0.35 eps``. Inside the eps-ball it is ``u`` plus a narrow bump on the far side: from a start near 0
    the gradient points to ``+u`` and an eps-ball search climbs to the sphere's local maximum ``(eps, 0)``
    (value ~ eps) and stays; the global maximum on the ball is the bump (~ H - eps). Outside the ball the
    ring term makes ``r`` increase along each circle away from ``+u``: the 2 eps phase walks round the
    ring to ``(-2 eps, 0)``, whose projection ``(-eps, 0)`` is the bump's top."""
    k_ring, h, s = 10 * eps, 10 * eps, 0.35 * eps
    if module == "jax":
        sq, ex, clip = jnp.sqrt, jnp.exp, jnp.clip
    else:
        sq, ex, clip = torch.sqrt, torch.exp, torch.clamp

    def r(images):
        u, v = images[:, 0], images[:, 1]
        rad = sq(u * u + v * v + 1e-300)
        t = clip((rad - eps) / (0.5 * eps), 0.0, 1.0)
        m = 3 * t ** 2 - 2 * t ** 3
        return u + m * k_ring * (1 - u / rad) + h * ex(-((u + eps) ** 2 + v ** 2) / s ** 2)

    return r


def test_the_wide_phase_finds_what_an_eps_search_cannot():
    """On :func:`_ring` from the same start ``(0, 0.3 eps)``, with the same ``steps``: ``wide = 2`` reaches the
    bump (> 0.9 (H - eps)); ``wide = 1`` stays at the local maximum ``(eps, 0)`` (value <= eps) even with twice
    the steps, so it is the radius, not the extra phase's iterations, that helps (a one-phase run with
    ``steps`` iterations is the start of the run with ``2 steps``: its best value is no larger). The reference
    agrees."""
    eps, steps = 0.5, 20
    start = np.array([[0.0, 0.3 * eps]])
    got = {}
    with jax.enable_x64(True):
        unit = _ring(eps, "jax")
        x = jnp.zeros((1, 2))
        base = unit(x)
        for wide, n in ((2.0, steps), (1.0, 2 * steps)):
            v, d = _compiled_maximise(lambda im: unit(im) - base, x, jnp.asarray([eps]),
                                      _cfg(steps=n, wide=wide, clip=None), init=jnp.asarray(start))
            got[wide, n] = (float(v[0]), _np(d)[0])
    h = 10 * eps
    assert got[2.0, steps][0] > 0.9 * (h - eps) and got[2.0, steps][1][0] < -0.99 * eps
    assert got[1.0, 2 * steps][0] <= eps and got[1.0, 2 * steps][1][0] > 0.99 * eps
    assert got[2.0, steps][0] > 5 * got[1.0, 2 * steps][0]
    tunit = _ring(eps, "torch")
    tx = torch.zeros(1, 2, dtype=torch.float64)
    for wide, n in got:
        tv, _ = tsens.maximise(lambda im: tunit(im) - tunit(tx), tx, eps, start, n, wide, 0.9, None)
        assert float(tv[0]) == pytest.approx(got[wide, n][0], rel=1e-8)


def test_the_step_shrinks_by_decay_after_each_iteration_without_progress():
    """A concave 1-D unit ``f(d) = c^2 - (d - c)^2`` (the + objective of ``r(x) = -(x - c)^2`` at ``x = 0``),
    ``c = 0.3``, zero start, ``wide = 1``, two runs: ``eps = 1`` and ``eps = 0.5``.

    ``eps = 1``, decay 0.9, by hand: the candidates ``0 + 0.9^k`` (k = 0..4: 1, 0.9, 0.81, 0.729, 0.6561) are all
    worse than ``f(0) = 0`` (they need ``d < 2c = 0.6``), so the best point stays 0 for steps <= 5; the 6th,
    ``0.9^5 = 0.59049``, is better and becomes the best point (the step is kept); the 7th, ``0.59049 - 0.59049
    = 0``, is worse; the 8th, ``0.59049 - 0.9^6 = 0.059049``, is better. The reference's record shows every
    rejected iteration multiplying the step by exactly 0.9 and each accepted one keeping it, and its best
    points equal ours for steps 5, 6, 7, 8 and 12.

    With a fixed step (decay 1) ``eps = 0.5`` goes to ``0.5`` and then proposes ``0`` for ever (value 0.05, the
    optimum is ``c^2 = 0.09``), ``eps = 1`` never moves (value 0); with decay 0.9 both reach ``c^2`` to 1e-4.

    The module's default (short phases unrolled) gives the same points as the plain loop the other tests
    use."""
    c = 0.3

    def search(steps, decay, **extra):
        with jax.enable_x64(True):
            v, d = _compiled_maximise(lambda im: c * c - (im[:, 0] - c) ** 2, jnp.zeros((2, 1)),
                                      jnp.asarray([1.0, 0.5]),
                                      _cfg(steps=steps, wide=1.0, decay=decay, start="zero", clip=None, **extra))
            return _np(v), _np(d)[:, 0]

    by_hand = {5: 0.0, 6: 0.9 ** 5, 7: 0.9 ** 5, 8: 0.9 ** 5 - 0.9 ** 6}
    ours = {steps: search(steps, 0.9)[1] for steps in (5, 6, 7, 8, 12)}
    for steps, want in by_hand.items():
        assert ours[steps][0] == pytest.approx(want, abs=1e-15), steps
    history = []
    tsens.maximise(lambda im: c * c - (im[:, 0] - c) ** 2, torch.zeros(2, 1, dtype=torch.float64),
                   torch.tensor([1.0, 0.5], dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64), 12, 1.0,
                   0.9, None, history=history)
    for (_, alpha, up), (_, nxt, _) in itertools.pairwise(history):
        np.testing.assert_array_equal(nxt.numpy(), np.where(up.numpy(), alpha.numpy(), alpha.numpy() * 0.9))
    assert [bool(h[2][0]) for h in history[:8]] == [False] * 5 + [True, False, True]
    for steps, d in ours.items():
        _, td = tsens.maximise(lambda im: c * c - (im[:, 0] - c) ** 2, torch.zeros(2, 1, dtype=torch.float64),
                               torch.tensor([1.0, 0.5], dtype=torch.float64), torch.zeros(2, 1, dtype=torch.float64),
                               steps, 1.0, 0.9, None)
        np.testing.assert_allclose(d, td.numpy()[:, 0], rtol=0, atol=1e-15, err_msg=str(steps))
    np.testing.assert_allclose(search(8, 0.9, unroll=None)[1], ours[8], rtol=0, atol=1e-15)
    fixed_v, fixed_d = search(200, 1.0)
    np.testing.assert_array_equal(fixed_d, [0.0, 0.5])
    assert fixed_v[1] == pytest.approx(0.05, rel=1e-12) and abs(fixed_v[1] / c ** 2 - 1) > 1e-4
    annealed_v, _ = search(200, 0.9)
    assert np.all(annealed_v <= c * c * (1 + ROUNDING))
    np.testing.assert_allclose(annealed_v, c * c, rtol=1e-4)


# ------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize("bad, key", [
    ({"restarts": 0}, "restarts"), ({"restarts": -2}, "restarts"), ({"steps": 0}, "steps"),
    ({"wide": 0.5}, "wide"), ({"wide": 0.0}, "wide"), ({"wide": math.inf}, "wide"), ({"wide": math.nan}, "wide"),
    ({"decay": 0.0}, "decay"), ({"decay": 1.5}, "decay"), ({"decay": -0.9}, "decay"), ({"decay": math.nan}, "decay"),
    ({"start": "uniform"}, "start"), ({"start": ""}, "start"), ({"clip": (1.0, 0.0)}, "clip"),
    ({"clip": (0.5, 0.5)}, "clip"), ({"clip": (0.0,)}, "clip"), ({"clip": (0.0, math.nan)}, "clip"),
    ({"steps": math.inf}, "steps"), ({"restarts": math.nan}, "restarts"), ({"restarts": 1.5}, "restarts"),
    ({"restarts": "3"}, "restarts"), ({"clip": 5}, "clip"), ({"wide": "2"}, "wide"), ({"unroll": 0}, "unroll"),
])
def test_bad_settings_fail_with_one_line_naming_the_key(bad, key):
    """Each out-of-range setting raises :class:`ConfigError` whose message is one line naming ``search.<key>``."""
    with pytest.raises(ConfigError) as err:
        SearchConfig(**bad)
    message = str(err.value)
    assert "\n" not in message and f"search.{key}" in message


def test_good_settings_are_accepted():
    for ok in ({}, {"restarts": 1, "steps": 1, "wide": 1.0, "decay": 1.0, "start": "zero", "clip": None},
               {"wide": 3.5, "decay": 1e-3, "clip": (-1.0, 1.0)}):
        SearchConfig(**ok)

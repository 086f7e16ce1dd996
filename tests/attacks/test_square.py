"""Square: the square-size schedule, the L2 window pattern and the L2 budget by hand; against the authors'
code as torchattacks 3.5.1 ports it (``attacks/square.py``) step by step, with the same random draws fed
to both (a batch of one, where the port's shared windows are the example's own): window positions,
proposals' margins, accepted updates, the returned points and the queries used."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advalign_jax.attacks import square as S

H = W = 8
K = 6


def _weights(c, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(H * W * c, 24)) / 4, rng.normal(size=24) * 0.1, rng.normal(size=(24, K)) / 2,
            rng.normal(size=K) * 0.1]


def _mlp(weights):
    w1, b1, w2, b2 = weights

    def logits_fn(x):
        return jax.nn.relu(x.reshape(x.shape[0], -1) @ w1 + b1) @ w2 + b2

    return logits_fn


@pytest.fixture()
def torch64():
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchattacks")
    default, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield torch
    torch.set_default_dtype(default)
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------
# By hand
# --------------------------------------------------------------------------------------------------


def test_schedule_by_hand(torch64):
    """AutoAttack's schedule on a 32x32x3 image (5,000 queries, not rescaled): p = 0.8 for i <= 10,
    halved after 10, 50, 200, 500, 1000, 2000, 4000; side round(sqrt(p * 1024)): 29, 20, 14, 10, 7, 5,
    4, 3 (sqrt = 28.6, 20.2, 14.3, 10.1, 7.16, 5.06, 3.58, 2.53); L2 sides odd and at least 3."""
    cfg = S.SquareConfig(n_queries=5000)
    sizes = S.square_sizes(cfg, 32, 32, 3)
    edges = [0, 10, 11, 50, 51, 200, 201, 500, 501, 1000, 1001, 2000, 2001, 4000, 4001, 4999]
    assert [int(sizes[i]) for i in edges] == [29, 29, 20, 20, 14, 14, 10, 10, 7, 7, 5, 5, 4, 4, 3, 3]
    l2 = S.square_sizes(S.SquareConfig(norm="l2", n_queries=5000), 32, 32, 3)
    assert [int(l2[i]) for i in edges] == [29, 29, 21, 21, 15, 15, 11, 11, 7, 7, 5, 5, 5, 5, 3, 3]
    # rescaled to 100 queries: iteration i counts as int(i / 100 * 10000) = 100 i
    assert [S.p_schedule(i, 100, 0.8, True) for i in (0, 1, 3, 6, 11, 21, 41, 61, 81)] == pytest.approx(
        [0.8, 0.2, 0.1, 0.05, 0.025, 0.0125, 0.00625, 0.003125, 0.0015625])
    assert S.square_size(1.0, 5, 5, 3, "linf") == 5 and S.square_size(1.0, 6, 6, 1, "l2") == 6  # capped at h
    from torchattacks import Square

    for rescale, n in ((False, 10000), (True, 700)):
        atk = Square(torch64.nn.Linear(1, 1), n_queries=n, resc_schedule=rescale)
        assert all(S.p_schedule(i, n, 0.8, rescale) == atk.p_selection(i) for i in range(n))


def test_eta_pattern_by_hand(torch64, monkeypatch):
    """eta(3): the top row (1 x 3, centre column 1) holds 1 + 1/4 at the centre and 1/4 beside it; the
    bottom 2 x 3 block (centre (1, 1)) 1 + 1/4 at the centre, 1/4 elsewhere; each normalised, the bottom
    negated, then the whole normalised (each half norm 1/sqrt(2))."""
    top = np.array([0.25, 1.25, 0.25]) / np.sqrt(1.6875)
    bottom = -np.array([[0.25, 0.25, 0.25], [0.25, 1.25, 0.25]]) / np.sqrt(1.875)
    np.testing.assert_allclose(S.eta_pattern(3), np.vstack([top, bottom]) / np.sqrt(2), atol=1e-15)
    from torchattacks import Square

    atk = Square(torch64.nn.Linear(1, 1), norm="L2")
    monkeypatch.setattr(torch64, "rand", lambda *a, **k: torch64.tensor([0.25]))  # no transposition
    for s in range(3, 16):
        np.testing.assert_allclose(S.eta_pattern(s), atk.eta(s).numpy(), atol=1e-14)


def test_l2_update_keeps_the_budget_per_channel():
    """After one L2 update, on three channels: outside the two windows nothing changes, W2 \\ W1 is
    zeroed, and per channel W1 holds sqrt(max(eps^2 - ||delta||^2, 0) / c + ||delta_{W1 u W2}||_c^2),
    so the whole perturbation has norm exactly eps."""
    rng = np.random.default_rng(0)
    eps, s = 1.0, 3
    with jax.enable_x64(True):
        delta = rng.normal(size=(H, W, 3))
        delta *= 0.6 * eps / np.linalg.norm(delta)
        draws = {"top": 1, "left": 2, "top2": 2, "left2": 4, "signs": jnp.array([1, -1, 1])}
        new = np.asarray(S.l2_window_update(jnp.asarray(delta), eps, s, jnp.asarray(S.eta_pattern(s)), draws))
    w1 = np.zeros((H, W), bool)
    w1[1:4, 2:5] = True
    w2 = np.zeros((H, W), bool)
    w2[2:5, 4:7] = True
    outside = ~(w1 | w2)
    np.testing.assert_array_equal(new[outside], delta[outside])
    np.testing.assert_array_equal(new[w2 & ~w1], 0.0)
    budget = (eps ** 2 - np.sum(delta ** 2)) / 3 + np.sum(delta[w1 | w2] ** 2, axis=0)
    np.testing.assert_allclose(np.sum(new[w1] ** 2, axis=0), budget, rtol=1e-9)  # up to the 1e-12 guards
    np.testing.assert_allclose(np.linalg.norm(new), eps, rtol=1e-9)


# --------------------------------------------------------------------------------------------------
# Against the authors' code
# --------------------------------------------------------------------------------------------------


def _uniform_for_sign(v):
    return 0.5 + 0.25 * np.asarray(v, np.float64)  # sign(2 u - 1) = v


def _uniform_for_int(v, n):
    return np.array([(v + 0.5) / n if n > 0 else 0.5])  # int(n u) = v


@functools.partial(jax.jit, static_argnums=(2, 3))
def _all_step_draws(key, sizes, shape, norm):
    return jax.vmap(lambda i, s: S.step_draws(key, i, s, shape, norm))(jnp.arange(sizes.shape[0]), sizes)


def _their_draws(key, cfg, shape):
    """Our draws for one example of ``shape`` (h, w, c), as the uniform numbers the port turns into the
    same choices, in the order it asks for them."""
    h, w, c = shape
    start = S.start_draws(key, shape, cfg)
    out = []
    if cfg.norm == "linf":
        out.append(_uniform_for_sign(np.asarray(start["stripes"]).T.reshape(1, c, 1, w)))
    else:
        for flip, signs in zip(np.asarray(start["flips"]), np.asarray(start["signs"])):
            out += [np.array([0.75 if flip else 0.25]), _uniform_for_sign(signs.reshape(1, c, 1, 1))]
    sizes = S.square_sizes(cfg, h, w, c)
    every = _all_step_draws(key, jnp.asarray(sizes), shape, cfg.norm)
    for i, s in enumerate(sizes):
        d = {k: np.asarray(v[i]) for k, v in every.items()}
        out += [_uniform_for_int(int(d["top"]), h - s), _uniform_for_int(int(d["left"]), w - s)]
        if cfg.norm == "l2":
            out += [_uniform_for_int(int(d["top2"]), h - s), _uniform_for_int(int(d["left2"]), w - s),
                    np.array([0.75 if int(d["flip"]) else 0.25]), _uniform_for_sign(d["signs"].reshape(1, c, 1, 1))]
        else:
            out.append(_uniform_for_sign(d["signs"].reshape(c, 1, 1)))
    return out


@pytest.mark.parametrize("norm,c", [("linf", 3), ("l2", 1)])
def test_steps_match_the_authors_code_float64(torch64, monkeypatch, norm, c):
    """Each example run through the port alone, its torch.rand calls answered with our draws: every
    proposal's margin, the queries used, the returned point. (L2 on one channel, where the port's older
    whole-window rescaling and the current per-channel one coincide.) The schedule is rescaled to the
    60 queries so that every square size occurs."""
    import torchattacks

    weights = _weights(c)
    eps = {"linf": 0.05, "l2": 0.3}[norm]
    cfg = S.SquareConfig(norm=norm, n_queries=60, rescale_schedule=True)
    key = jax.random.PRNGKey(3)
    x = np.random.default_rng(100).uniform(0, 1, size=(6, H, W, c))
    with jax.enable_x64(True):
        f = _mlp(weights)
        y = np.asarray(jnp.argmax(f(x), 1))
        res = jax.jit(lambda x, y: S.square_run(f, x, y, eps, cfg, key, trace=True))(x, y)
        res = {k: np.asarray(v) for k, v in res.items()}
        draws = [_their_draws(S._example_key(key, 0, i), cfg, (H, W, c)) for i in range(len(x))]
    w1 = weights[0].reshape(H, W, c, -1).transpose(2, 0, 1, 3).reshape(H * W * c, -1)  # NCHW rows

    class Net(torch64.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch64.nn.ParameterList([torch64.nn.Parameter(torch64.tensor(a)) for a in [w1] + weights[1:]])

        def forward(self, z):
            return torch64.relu(z.reshape(z.shape[0], -1) @ self.p[0] + self.p[1]) @ self.p[2] + self.p[3]

    broken, accepted, steps_total = 0, 0, 0
    for e in range(len(x)):
        queue = list(draws[e])

        def rand(*shape, **kwargs):
            want = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (list, tuple)) else shape
            u = queue.pop(0)
            assert u.shape == tuple(want)
            return torch64.tensor(u)

        monkeypatch.setattr(torch64, "rand", rand)
        atk = torchattacks.Square(Net().eval(), norm="Linf" if norm == "linf" else "L2", eps=eps, n_queries=60,
                                  resc_schedule=True)
        atk.init_hyperparam(torch64.zeros(1, c, H, W))
        margins, measure = [], atk.margin_and_loss

        def record(z, label):
            m, loss = measure(z, label)
            margins.append(float(m[0]))
            return m, loss

        atk.margin_and_loss = record
        queries, best = atk.attack_single_run(torch64.tensor(x[e:e + 1].transpose(0, 3, 1, 2)),
                                              torch64.tensor(y[e:e + 1]))
        monkeypatch.undo()
        steps = len(margins) - 1  # the first margin is the start's
        assert int(queries[0]) == int(res["queries"][e]) == steps + 1
        np.testing.assert_allclose(res["trace_margin"][:steps, e], margins[1:], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(res["x_best"][e], best.numpy()[0].transpose(1, 2, 0), atol=1e-12)
        accepted += int(res["trace_accept"][:steps, e].sum())
        steps_total += steps
        broken += bool(res["success"][e])
        assert bool(res["success"][e]) == (margins[-1] <= 0)
    assert 0 < broken < len(x) and 0 < accepted < steps_total  # both outcomes of both decisions


# --------------------------------------------------------------------------------------------------
# The attack: batch independence, restarts, feasibility
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_attack_is_per_example_and_feasible(norm):
    f = _mlp([a.astype(np.float32) for a in _weights(3)])
    x = np.random.default_rng(5).uniform(0, 1, size=(10, H, W, 3)).astype(np.float32)
    y = np.array(jnp.argmax(f(x), 1))
    y[0] = (y[0] + 1) % K  # a clean mistake
    eps = {"linf": 0.05, "l2": 0.4}[norm]
    cfg = S.SquareConfig(norm=norm, n_queries=40, n_restarts=2)
    run = jax.jit(lambda x, y, i: S.square(f, x, y, eps, cfg, key=jax.random.PRNGKey(1), index=i))
    full, ok = map(np.asarray, run(x, y, np.arange(10)))
    order = np.random.default_rng(0).permutation(10)
    part, ok_part = map(np.asarray, run(x[order], y[order], order))
    np.testing.assert_array_equal(part, full[order])
    np.testing.assert_array_equal(ok_part, ok[order])
    assert ok[0] and 0 < ok[1:].sum() < 9
    np.testing.assert_array_equal(ok, np.asarray(jnp.argmax(f(full), 1)) != y)
    d = (full - x).reshape(10, -1)
    size = np.abs(d).max(1) if norm == "linf" else np.linalg.norm(d, axis=1)
    assert np.all(size <= eps * (1 + 1e-5)) and full.min() >= 0 and full.max() <= 1
    np.testing.assert_array_equal(full[~ok], x[~ok])  # not broken: unchanged
    # the early-stopping loop and the full-length traced loop agree; a second restart breaks more
    one = S.SquareConfig(norm=norm, n_queries=40)
    loop = jax.jit(lambda x, y: S.square_run(f, x, y, eps, one, jax.random.PRNGKey(1)))(x, y)
    traced = jax.jit(lambda x, y: S.square_run(f, x, y, eps, one, jax.random.PRNGKey(1), trace=True))(x, y)
    for k in ("x_best", "margin", "queries"):
        np.testing.assert_array_equal(np.asarray(loop[k]), np.asarray(traced[k]))
    assert np.asarray(loop["queries"]).max() <= 41
    assert np.all(np.asarray(loop["success"])[1:] <= ok[1:])  # what the first restart breaks stays broken


def test_config_errors():
    for bad in (dict(norm="l1"), dict(loss="hinge"), dict(n_queries=0), dict(p_init=0.0), dict(n_restarts=0)):
        with pytest.raises(ValueError):
            S.SquareConfig(**bad)
    with pytest.raises(ValueError, match="h >= 5"):
        S.square_run(lambda z: z.reshape(z.shape[0], -1)[:, :3], np.zeros((1, 4, 4, 1)), np.zeros(1, int), 0.1,
                     S.SquareConfig(norm="l2", n_queries=2))

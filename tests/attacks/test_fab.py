"""FAB and FAB-T: the projections and the step by hand, and against the authors' code as torchattacks
3.5.1 ports it (``attacks/fab.py``, the same code as fra31/auto-attack's ``fab_base.py`` and
``fab_projections.py``) in float64: the projections on random hyperplanes, every iterate of a run, and
the full attack with targets and restarts (random starts fed to both)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advalign_jax.attacks import fab as F
from advalign_jax.attacks.apgd import random_start

H, W, C, K = 4, 4, 3, 6
D = H * W * C


def _weights(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(D, 24)) / 4, rng.normal(size=24) * 0.1, rng.normal(size=(24, K)) / 2,
            rng.normal(size=K) * 0.1]


def _mlp(weights):
    w1, b1, w2, b2 = weights

    def logits_fn(x):
        return jax.nn.relu(x.reshape(x.shape[0], -1) @ w1 + b1) @ w2 + b2

    return logits_fn


def _data(n=8, seed=100):
    return np.random.default_rng(seed).uniform(0, 1, size=(n, H, W, C))


@pytest.fixture()
def torch64(monkeypatch):
    """torch in float64, with the FAB port's ``.float()`` casts kept in float64 (it casts its inputs
    to float32, which a float64 model cannot take)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchattacks")
    default = torch.get_default_dtype()
    threads = torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    monkeypatch.setattr(torch.Tensor, "float", lambda self: self.to(torch.float64))
    yield torch
    torch.set_default_dtype(default)
    torch.set_num_threads(threads)


def _torch_net(torch, weights):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.ParameterList([torch.nn.Parameter(torch.tensor(a)) for a in weights])

        def forward(self, x):  # NHWC flattened, as the JAX model (the port is layout-agnostic)
            return torch.relu(x.reshape(x.shape[0], -1) @ self.p[0] + self.p[1]) @ self.p[2] + self.p[3]

    return Net().eval()


# --------------------------------------------------------------------------------------------------
# By hand
# --------------------------------------------------------------------------------------------------


def test_projections_by_hand():
    """p = (0.5, 0.2, 0.9), w = (1, 2, -1): <w, p> = 0, rooms (towards lowering <w, .>) 0.5, 0.2, 0.1."""
    p = jnp.array([[0.5, 0.2, 0.9]] * 4)
    w = jnp.array([[1.0, 2.0, -1.0]] * 4)
    # Linf, b = -0.6 (c = 0.6): g(l) = min(l, .5) + 2 min(l, .2) + min(l, .1); g(.1) = .4, g(.2) = .7,
    # so on [.1, .2] 3 l + .1 = .6, l = 1/6: d = (-1/6, -1/6, +.1). b = -1.5 is out of reach (g <= 1): full room.
    # b = +0.3: c = -0.3, signs flipped, rooms towards raising <w, .>: .5, .8, .9: 4 l = .3 (l <= .5).
    d = np.asarray(jax.jit(F.project_linf)(p, w, jnp.array([-0.6, -1.5, 0.3, 0.0])))
    np.testing.assert_allclose(d[0], [-1 / 6, -1 / 6, 0.1], atol=1e-7)
    np.testing.assert_allclose(d[1], [-0.5, -0.2, 0.1], atol=1e-7)
    np.testing.assert_allclose(d[2], [0.075, 0.075, -0.075], atol=1e-7)
    np.testing.assert_allclose(d[3], [0.0, 0.0, 0.0], atol=1e-7)  # already on the hyperplane
    # L2: d_i = -sign(w_i) min(a |w_i|, room_i), g(a) = min(a, .5) + 2 min(2a, .2) + min(a, .1)
    # (breakpoints .5, .1, .1). b = -.45: 6a = .45, a = .075: d = -a w. b = -.7: past a = .1,
    # a + .4 + .1 = .7, a = .2: d = (-.2, -.2, +.1). b = -1.5: out of reach: full room.
    d = np.asarray(jax.jit(F.project_l2)(p, w, jnp.array([-0.45, -0.7, -1.5, 0.0])))
    np.testing.assert_allclose(d[0], [-0.075, -0.15, 0.075], atol=1e-7)
    np.testing.assert_allclose(d[1], [-0.2, -0.2, 0.1], atol=1e-7)
    np.testing.assert_allclose(d[2], [-0.5, -0.2, 0.1], atol=1e-7)
    np.testing.assert_allclose(d[3], [0.0, 0.0, 0.0], atol=1e-7)


def test_fab_t_steps_by_hand():
    """A linear two-class model, logit of class 1 minus class 0 = 2 x1 + x2 - 2 (the linearisation is
    exact), from x_o = (0.5, 0.5), Linf, FAB-T towards class 1.

    Iteration 1 (x = x_o): the hyperplane 2 x1 + x2 = 2; both projections are d = (1/6, 1/6) (3 l = .5),
    a1 = a2, alpha = min(1/2, 0.1) = 0.1: x(1) = x_o + 1.05 d = (0.675, 0.675), misclassified (margin
    0.025) at distance 0.175: kept, then pulled back to x_o + 0.9 (x(1) - x_o) = (0.6575, 0.6575).
    Iteration 2: f = -0.0275, d1 = (0.0275/3) (1, 1), d2 = (1/6, 1/6), alpha = a1 / (a1 + a2) =
    0.0275 / (0.0275 + 0.5) (below 0.1): x(2) = (x + 1.05 d1)(1 - alpha) + (x_o + 1.05 d2) alpha =
    0.66754 (1, 1), misclassified (margin 0.0026) and closer (0.16754): the new best point."""
    def f(z):
        z = z.reshape(z.shape[0], -1)
        return jnp.stack([jnp.zeros(z.shape[0]), 2 * z[:, 0] + z[:, 1] - 2.0], axis=1)

    x0 = jnp.array([[0.5, 0.5]])
    cfg = F.FABConfig(norm="linf", n_iter=2, targeted=True, n_target_classes=1)
    with jax.enable_x64(True):
        x0 = x0.astype(jnp.float64)
        res = jax.jit(lambda x: F.fab_run(f, x, jnp.array([0]), x, cfg, jnp.array([1]), trace=True))(x0)
        trace = np.asarray(res["trace_x"])[:, 0]
        np.testing.assert_allclose(trace[0], [0.675, 0.675], atol=1e-12)
        assert bool(res["trace_adv"][0, 0]) and bool(res["trace_adv"][1, 0])
        np.testing.assert_allclose(float(res["trace_alpha"][0, 0]), 0.1, atol=1e-12)
        back = 0.5 + 0.9 * 0.175
        a1, a2 = 0.0275 / 3, 1 / 6
        alpha = a1 / (a1 + a2)
        expect = (back + 1.05 * a1) * (1 - alpha) + (0.5 + 1.05 * a2) * alpha
        np.testing.assert_allclose(float(res["trace_alpha"][1, 0]), alpha, atol=1e-12)
        np.testing.assert_allclose(trace[1], [expect, expect], atol=1e-12)
        np.testing.assert_allclose(expect, 0.66754, atol=1e-5)
        np.testing.assert_allclose(float(res["dist"][0]), expect - 0.5, atol=1e-12)
        np.testing.assert_allclose(np.asarray(res["x_best"])[0], [expect, expect], atol=1e-12)
    # alpha_max caps the pull towards x_o; the boundary of the nearest class is the one crossed
    w, df = F.boundary(jnp.array([[0.0, 1.0, 3.0]]), jnp.array([[[1.0, 0.0], [3.0, 0.0], [0.0, 1.0]]]),
                       jnp.array([1]), "linf")
    # classes 0 and 2: |df| / ||dg||_1 = 1 / 2 and 2 / 4; ties resolve to the first (class 0)
    np.testing.assert_allclose(np.asarray(w), [[-2.0, 0.0]])
    np.testing.assert_allclose(np.asarray(df), [-1.0])


def test_newton_and_sorted_roots_agree(monkeypatch):
    rng = np.random.default_rng(1)
    p = rng.uniform(0, 1, size=(8, 200))
    p[rng.uniform(size=p.shape) < 0.2] = 0.0  # pixels at the bound: breakpoints at 0
    w = rng.normal(size=p.shape) * rng.choice([0.01, 1.0, 100.0], size=p.shape)
    b = (w * p).sum(1) + rng.normal(size=8) * np.abs(w).sum(1) * 0.05
    with jax.enable_x64(True):
        args = tuple(map(jnp.asarray, (p, w, b)))
        for project in (F.project_linf, F.project_l2):
            newton = np.asarray(jax.jit(project)(*args))
            monkeypatch.setattr(F, "NEWTON_STEPS", 1)  # not enough: the sorted breakpoints decide
            sorted_ = np.asarray(jax.jit(project)(*args))
            monkeypatch.undo()
            np.testing.assert_allclose(newton, sorted_, atol=1e-12)
            reach = np.abs((w * (p + newton)).sum(1) - b)
            assert np.all(reach < 1e-8) and np.all(p + newton >= -1e-12) and np.all(p + newton <= 1 + 1e-12)


# --------------------------------------------------------------------------------------------------
# Against the authors' code
# --------------------------------------------------------------------------------------------------


def test_projections_match_the_authors_code_float64(torch64):
    from torchattacks.attacks.fab import projection_l2, projection_linf

    rng = np.random.default_rng(0)
    n, d = 64, 48
    p = rng.uniform(0, 1, size=(n, d))
    at_bound = rng.uniform(size=(n, d)) < 0.2
    p[at_bound] = rng.choice([0.0, 1.0], size=int(at_bound.sum()))
    w = rng.normal(size=(n, d))
    b = (w * p).sum(1) + rng.normal(size=n) * rng.choice([0.1, 1.0, 5.0, 20.0], size=n)
    with jax.enable_x64(True):
        for ours, theirs in ((F.project_linf, projection_linf), (F.project_l2, projection_l2)):
            mine = np.asarray(ours(jnp.asarray(p), jnp.asarray(w), jnp.asarray(b)))
            ref = theirs(torch64.tensor(p), torch64.tensor(w), torch64.tensor(b)).numpy()
            np.testing.assert_allclose(mine, ref, atol=1e-10)
    reach = np.abs((w * (p + mine)).sum(1) - b) < 1e-9
    assert 0 < reach.sum() < n  # feasible and out-of-reach hyperplanes both exercised


def _trace_their_run(torch, weights, x, y, norm, targeted, target_rank, n_iter):
    """The port's single run (``attack_single_run(_targeted)``), recording every iterate it checks."""
    import torchattacks

    atk = torchattacks.FAB(_torch_net(torch, weights), norm="Linf" if norm == "linf" else "L2", eps=1.0,
                           steps=n_iter, multi_targeted=targeted, n_classes=K)
    atk.target_class = target_rank
    seen, check = [], atk._get_predicted_label

    def record(z):
        seen.append(z.detach().clone().numpy())
        return check(z)

    atk._get_predicted_label = record
    run = atk.attack_single_run_targeted if targeted else atk.attack_single_run
    out = run(torch.tensor(x), torch.tensor(y)).numpy()
    return np.stack(seen[1:]), out  # the first call checks the clean points


@pytest.mark.parametrize("norm,targeted", [("linf", True), ("l2", False)])
def test_run_iterates_match_the_authors_code_float64(torch64, norm, targeted):
    """Every iterate of one run (before its backward step) and the closest misclassified point, FAB-T
    towards the 3rd-ranked class or untargeted. No decision of the run is within 1e-9 of the boundary,
    so the comparison does not depend on rounding."""
    n_iter = 10
    weights = _weights()
    x = _data()
    with jax.enable_x64(True):
        f = _mlp(weights)
        logits = np.asarray(f(x))
        y = logits.argmax(1)
        target = np.argsort(logits, 1)[:, -3] if targeted else None
        cfg = F.FABConfig(norm=norm, n_iter=n_iter, targeted=targeted)
        res = jax.jit(lambda x, y, t: F.fab_run(f, x, y, x, cfg, t, trace=True))(
            x, y, None if target is None else jnp.asarray(target))
        res = {k: np.asarray(v) for k, v in res.items()}
        z = np.asarray(jax.vmap(f)(res["trace_x"]))  # (n_iter, N, K)
    others = np.where(np.arange(K) == y[:, None], -np.inf, z)
    margins = others.max(-1) - z[:, np.arange(len(x)), y]  # > 0: misclassified (targeted runs too)
    assert np.abs(margins).min() > 1e-9
    iterates, returned = _trace_their_run(torch64, weights, x, y, norm, targeted, 3, n_iter)
    np.testing.assert_allclose(res["trace_x"], iterates, atol=1e-11)
    np.testing.assert_array_equal(res["trace_adv"], margins > 0)
    np.testing.assert_allclose(np.where(res["found"][:, None, None, None], res["x_best"], x), returned, atol=1e-11)
    assert res["trace_adv"].any() and not res["trace_adv"].all()


@pytest.mark.parametrize("norm,targeted,restarts", [("linf", True, 1), ("l2", False, 2)])
def test_attack_matches_the_authors_code_float64(torch64, monkeypatch, norm, targeted, restarts):
    """The whole attack: FAB-T over all 5 targets of a 6-class model (targets outer), or untargeted FAB
    with a random restart (its start drawn by us and fed to the port), each run on the points not yet
    broken within eps; the returned points and the verdicts, and the restart's own run."""
    import torchattacks

    n_iter, eps = 6, {"linf": 0.03, "l2": 0.2}[norm]
    weights = _weights(1)
    x = _data(12, seed=7)
    key = jax.random.PRNGKey(5)
    cfg = F.FABConfig(norm=norm, n_iter=n_iter, targeted=targeted, n_target_classes=K - 1, n_restarts=restarts)
    with jax.enable_x64(True):
        f = _mlp(weights)
        y = np.asarray(jnp.argmax(f(x), 1)).copy()
        y[0] = (y[0] + 1) % K  # a clean mistake: not attacked
        x_adv, ok = map(np.asarray, jax.jit(lambda x, y: F.fab(f, x, y, eps, cfg, key=key))(x, y))
        # the restart's direction (fab_start = clip(x + eps/2 * direction)), unclipped, and its run
        direction = np.asarray(random_start(jax.random.fold_in(key, 1), jnp.zeros_like(x), 1.0, norm, clip=None))
        if restarts > 1:
            start = F.fab_start(jax.random.fold_in(key, 1), jnp.asarray(x), eps, cfg)
            restart_run = jax.jit(lambda x, y, s: F.fab_run(f, x, y, s, cfg))(x, y, start)
    atk = torchattacks.FAB(_torch_net(torch64, weights), norm="Linf" if norm == "linf" else "L2", eps=eps,
                           steps=n_iter, n_restarts=restarts, multi_targeted=targeted, n_classes=K)
    rows, fed = [], []
    single = atk.attack_single_run

    def tracked(x_in, y_in, use_rand_start=False):  # which examples the port attacks now
        rows[:] = [int(np.flatnonzero((x.reshape(len(x), -1) == r.reshape(1, -1)).all(1))[0])
                   for r in x_in.numpy()]
        return single(x_in, y_in, use_rand_start=use_rand_start)

    def draw(*shape, **kwargs):  # the port normalises t itself: the same start
        fed.append(list(rows))
        t = direction[rows]
        return torch64.tensor((t + 1) / 2 if norm == "linf" else t)

    atk.attack_single_run = tracked
    monkeypatch.setattr(torch64, "rand", draw)
    monkeypatch.setattr(torch64, "randn", draw)
    theirs = atk.perturb(torch64.tensor(x), torch64.tensor(y)).numpy()
    assert len(fed) == restarts - 1  # one random start, for the restart only
    z = np.asarray(_mlp(weights)(theirs)).argmax(1)
    np.testing.assert_array_equal(ok, z != y)
    np.testing.assert_allclose(x_adv, theirs, atol=1e-10)
    assert ok[0] and 0 < ok[1:].sum() < len(x) - 1
    d = (x_adv - x).reshape(len(x), -1)
    size = np.abs(d).max(1) if norm == "linf" else np.linalg.norm(d, axis=1)
    assert np.all(size <= eps + 1e-12) and x_adv.min() >= 0 and x_adv.max() <= 1
    if restarts > 1:  # the restart's own run from the fed start, on every correctly classified point
        rows[:] = list(range(1, len(x)))
        run = single(torch64.tensor(x[1:]), torch64.tensor(y[1:]), use_rand_start=True).numpy()
        ours = np.where(np.asarray(restart_run["found"])[1:, None, None, None], np.asarray(restart_run["x_best"])[1:],
                        x[1:])
        np.testing.assert_allclose(ours, run, atol=1e-10)
        assert not np.allclose(ours, np.where(ok[1:, None, None, None], x_adv[1:], x[1:]))


# --------------------------------------------------------------------------------------------------
# Batch independence, feasibility, compile size, errors
# --------------------------------------------------------------------------------------------------


def test_batch_independence_and_feasibility():
    f = _mlp([a.astype(np.float32) for a in _weights()])
    x = _data(12).astype(np.float32)
    y = np.asarray(jnp.argmax(f(x), 1))
    cfg = F.FABConfig(norm="l2", n_iter=5, n_restarts=2)
    run = jax.jit(lambda x, y, i: F.fab(f, x, y, 0.3, cfg, key=jax.random.PRNGKey(2), index=i))
    full, ok = map(np.asarray, run(x, y, np.arange(12)))
    order = np.random.default_rng(0).permutation(12)  # other positions, other batch mates' order
    part, ok_part = map(np.asarray, run(x[order], y[order], order))
    np.testing.assert_allclose(part, full[order], atol=1e-5)
    np.testing.assert_array_equal(ok_part, ok[order])
    assert 0 < ok.sum() < 12
    size = np.linalg.norm((full - x).reshape(12, -1), axis=1)
    assert np.all(size <= 0.3 * (1 + 1e-5)) and np.all(size[~ok] == 0)
    np.testing.assert_array_equal(ok, np.asarray(jnp.argmax(f(full), 1)) != y)


def test_compile_size_and_errors():
    f = _mlp([a.astype(np.float32) for a in _weights()])
    x = _data(2).astype(np.float32)
    y = np.zeros(2, np.int32)
    sizes = [len(str(jax.make_jaxpr(lambda x, y: F.fab(f, x, y, 0.1, F.FABConfig(n_iter=n, targeted=True,
                                                                              n_target_classes=t)))(x, y)))
             for n, t in ((5, 2), (500, 5))]
    assert abs(sizes[0] - sizes[1]) < 40
    for bad in (dict(norm="l1"), dict(n_iter=0), dict(beta=0.0), dict(clip=None), dict(alpha_max=2.0)):
        with pytest.raises(ValueError):
            F.FABConfig(**bad)
    with pytest.raises(ValueError, match="FAB-T"):
        F.fab(f, x, y, 0.1, F.FABConfig(), targets=jnp.zeros(2, jnp.int32))

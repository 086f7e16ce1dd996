"""PGD and the minimal-eps search against independent PyTorch implementations of the same conventions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import importlib


from advalign_jax.attacks import PGDConfig, ReferenceSearch, doubling_search, pgd, reference_search
from reference_attacks import TorchMLP, alignment_attack, madry_pgd, reference_protocol

pgd_lib = importlib.import_module("advalign_jax.attacks.pgd")  # the module (the package exports the function)

H, W, C, K = 6, 6, 3, 5


@pytest.fixture(scope="module")
def mlp():
    rng = np.random.default_rng(0)
    w1 = (rng.normal(size=(H * W * C, 32)) / 6).astype(np.float32)
    b1 = (rng.normal(size=32) * 0.1).astype(np.float32)
    w2 = (rng.normal(size=(32, K)) / 3).astype(np.float32)
    b2 = (rng.normal(size=K) * 0.1).astype(np.float32)

    def logits_fn(x):
        h = jax.nn.relu(x.reshape(x.shape[0], -1) @ w1 + b1)
        return h @ w2 + b2

    return logits_fn, TorchMLP(w1, b1, w2, b2)


def _data(n=8, seed=1):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, size=(n, H, W, C)).astype(np.float32), rng.integers(0, K, size=n)


@pytest.mark.parametrize("norm,eps,step", [("l2", 0.7, 0.2), ("linf", 0.05, 0.01)])
@pytest.mark.parametrize("targeted", [False, True])
@pytest.mark.parametrize("loss", ["ce", "margin"])
@pytest.mark.parametrize("use_best", [False, True])
def test_pgd_matches_madry_conventions(mlp, norm, eps, step, targeted, loss, use_best):
    f, torch_model = mlp
    x, y = _data()
    cfg = PGDConfig(norm=norm, steps=7, step_size=step, targeted=targeted, loss=loss, use_best=use_best)
    ours = np.asarray(jax.jit(lambda x, y: pgd(f, x, y, eps, cfg)[0])(x, y))
    ref = madry_pgd(torch_model, x, y, eps, step, 7, norm=norm, targeted=targeted, use_best=use_best, loss=loss)
    np.testing.assert_allclose(ours, ref, atol=2e-5)
    d = (ours - x).reshape(len(x), -1)
    bound = np.linalg.norm(d, axis=1) if norm == "l2" else np.abs(d).max(1)
    assert np.all(bound <= eps * (1 + 1e-5)) and ours.min() >= 0 and ours.max() <= 1


@pytest.mark.parametrize("projection", ["sphere", "accumulate"])
def test_alignment_study_projections(mlp, projection):
    f, torch_model = mlp
    x, y = _data(4)
    cfg = PGDConfig(norm="l2", steps=3, step_size=0.5, projection=projection)
    ours = np.asarray(pgd(f, x, y, 1.5, cfg)[0])
    for i in range(4):
        ref = alignment_attack(torch_model, x[i:i + 1], y[i:i + 1], 1.5, projection=projection)
        np.testing.assert_allclose(ours[i:i + 1], ref, atol=2e-5)
    if projection == "sphere":  # on the sphere unless clipping cut it
        norms = np.linalg.norm((ours - x).reshape(4, -1), axis=1)
        assert np.all(norms <= 1.5 + 1e-4)


def test_random_starts(mlp):
    f, _ = mlp
    x = np.full((400, H, W, C), 0.5, np.float32)
    eps = 0.3
    key = jax.random.PRNGKey(3)
    dim = H * W * C
    for kind in ("sphere", "ball", "box"):
        cfg = PGDConfig(norm="l2" if kind != "box" else "linf", random_start=kind)
        start = np.asarray(pgd_lib.random_start(key, jnp.asarray(x), eps, cfg))
        d = (start - x).reshape(len(x), -1)
        if kind == "sphere":
            np.testing.assert_allclose(np.linalg.norm(d, axis=1), eps, rtol=1e-5)
        elif kind == "ball":
            r = np.linalg.norm(d, axis=1) / eps
            assert r.max() <= 1 + 1e-6
            # uniform in the ball: r**dim is uniform on [0, 1]
            u = np.sort(r ** dim)
            assert np.abs(u - (np.arange(len(u)) + 0.5) / len(u)).max() < 0.1
        else:
            assert np.abs(d).max() <= eps + 1e-6 and d.min() < -0.9 * eps and d.max() > 0.9 * eps
    box = PGDConfig(norm="l2", random_start="box", start_radius=8 / 255)
    start = np.asarray(pgd_lib.random_start(key, jnp.asarray(x), 0.5, box))
    assert np.abs(start - x).max() <= 8 / 255 + 1e-6  # PAG's evaluation: +-8/255 per pixel


def test_trajectory_from_a_random_start_matches_reference(mlp):
    f, torch_model = mlp
    x, y = _data()
    cfg = PGDConfig(norm="l2", steps=5, step_size=0.1, random_start="sphere")
    key = jax.random.PRNGKey(5)
    ours = np.asarray(pgd(f, x, y, 0.5, cfg, key=key)[0])
    start = np.asarray(pgd_lib.random_start(jax.random.split(key, 1)[0], jnp.asarray(x), 0.5, cfg))
    ref = madry_pgd(torch_model, x, y, 0.5, 0.1, 5, x_start=start)
    np.testing.assert_allclose(ours, ref, atol=2e-5)


def test_relative_step_and_per_example_eps(mlp):
    f, torch_model = mlp
    x, y = _data()
    eps = np.linspace(0.1, 1.0, len(x)).astype(np.float32)
    cfg = PGDConfig(norm="l2", steps=4, step_size=0.25, relative_step=True)
    ours = np.asarray(pgd(f, x, y, eps, cfg)[0])
    ref = madry_pgd(torch_model, x, y, eps, 0.25 * eps, 4)
    np.testing.assert_allclose(ours, ref, atol=2e-5)
    for i in (0, 5):  # the same radius alone gives the same result
        alone = np.asarray(pgd(f, x[i:i + 1], y[i:i + 1], eps[i], cfg)[0])
        np.testing.assert_allclose(alone[0], ours[i], atol=1e-6)


def test_restarts_keep_the_first_success(mlp):
    f, _ = mlp
    x, y = _data(16)
    cfg = PGDConfig(norm="l2", steps=3, step_size=0.1, random_start="ball", restarts=3)
    x_adv, ok = pgd(f, x, y, 0.6, cfg, key=jax.random.PRNGKey(0))
    single = PGDConfig(norm="l2", steps=3, step_size=0.1, random_start="ball")
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    runs = [np.asarray(pgd_lib._single_run(f, jnp.asarray(x), jnp.asarray(y), pgd_lib._per_example(0.6, jnp.asarray(x)), k, single)) for k in keys]
    succ = [np.asarray(jnp.argmax(f(r), 1)) != y for r in runs]
    for i in range(len(x)):
        first = next((k for k in range(3) if succ[k][i]), 2)
        np.testing.assert_array_equal(np.asarray(x_adv)[i], runs[first][i])
        assert bool(ok[i]) == any(s[i] for s in succ)


def test_compile_size_does_not_grow_with_steps(mlp):
    f, _ = mlp
    x, y = _data(2)
    sizes = []
    for steps in (3, 300):
        cfg = PGDConfig(norm="l2", steps=steps, step_size=0.1)
        jaxpr = jax.make_jaxpr(lambda x, y: pgd(f, x, y, 0.5, cfg))(x, y)
        sizes.append(len(str(jaxpr)))
    assert sizes[0] == sizes[1] or abs(sizes[0] - sizes[1]) < 10


def test_bad_attack_configs():
    with pytest.raises(ValueError):
        PGDConfig(norm="l1")
    with pytest.raises(ValueError):
        PGDConfig(norm="linf", projection="sphere")
    with pytest.raises(ValueError):
        PGDConfig(steps=0)
    with pytest.raises(ValueError):
        PGDConfig(step_size=-1.0)


# --------------------------------------------------------------------------------------------------
# The minimal-eps search
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weak_mlp():
    """An MLP whose decisions flip at radii spread over both bisection branches."""
    rng = np.random.default_rng(7)
    w1 = (rng.normal(size=(H * W * C, 16)) / 20).astype(np.float32)
    b1 = np.zeros(16, np.float32)
    w2 = (rng.normal(size=(16, K)) * 0.6).astype(np.float32)
    b2 = (rng.normal(size=K) * 0.3).astype(np.float32)

    def logits_fn(x):
        return jax.nn.relu(x.reshape(x.shape[0], -1) @ w1 + b1) @ w2 + b2

    return logits_fn, TorchMLP(w1, b1, w2, b2)


def test_vectorised_search_equals_the_per_image_protocol(weak_mlp):
    f, torch_model = weak_mlp
    x, _ = _data(24, seed=3)
    y = np.array(jnp.argmax(f(x), 1))
    y[:3] = (y[:3] + 1) % K  # three misclassified images
    out = jax.jit(lambda x, y: reference_search(f, x, y))(x, y)
    out = {k: np.asarray(v) for k, v in out.items()}
    seen_branches = set()
    for i in range(len(x)):
        ref = reference_protocol(torch_model, x[i:i + 1], y[i:i + 1])
        if ref is None:
            assert not out["correct"][i]
            continue
        assert out["correct"][i]
        if ref == "unfooled":
            assert not out["fooled"][i]
            continue
        eps, x_adv, pred = ref
        seen_branches.add(eps <= 1.0)
        assert out["fooled"][i]
        assert out["eps"][i] == pytest.approx(eps, rel=1e-6)
        assert out["pred"][i] == pred
        np.testing.assert_allclose(out["x_adv"][i], x_adv[0], atol=3e-5)
    assert seen_branches == {True, False}  # both bisection branches exercised


def test_search_is_batch_independent_and_shards(weak_mlp):
    from advalign_jax import parallel

    f, _ = weak_mlp
    x, _ = _data(16, seed=4)
    y = np.asarray(jnp.argmax(f(x), 1))
    run = jax.jit(lambda x, y: reference_search(f, x, y))
    full = {k: np.asarray(v) for k, v in run(x, y).items()}
    alone = {k: np.asarray(v) for k, v in run(x[5:6], y[5:6]).items()}
    for k in full:
        np.testing.assert_allclose(alone[k][0], full[k][5], atol=1e-6)
    mesh = parallel.make_mesh()
    xs, ys = parallel.shard_batch((x, y), mesh)
    sharded = {k: np.asarray(v) for k, v in run(xs, ys).items()}
    for k in full:
        np.testing.assert_allclose(sharded[k], full[k], atol=1e-6)


def test_doubling_search_finds_a_tight_bound(weak_mlp):
    f, _ = weak_mlp
    x, _ = _data(12, seed=5)
    y = np.asarray(jnp.argmax(f(x), 1))
    cfg = PGDConfig(norm="l2", steps=10, step_size=0.1, relative_step=True)
    out = {k: np.asarray(v) for k, v in jax.jit(lambda x, y: doubling_search(f, x, y, cfg, eps0=0.1,
                                                                               max_doublings=8, steps=12))(x, y).items()}
    assert out["fooled"].sum() >= 8
    for i in np.flatnonzero(out["fooled"]):
        eps, lower = out["eps"][i], out["eps_lower"][i]
        d = np.linalg.norm((out["x_adv"][i] - x[i]).ravel())
        assert d <= eps * (1 + 1e-5) and out["pred"][i] != y[i]
        # 12 bisection steps after the doubling: the bracket is 1/4096 of the last doubling gap
        assert eps - lower <= max(lower, 0.1) / 4096 * (1 + 1e-4)
        assert bool(pgd(f, x[i:i + 1], y[i:i + 1], eps, cfg)[1][0])
        if lower > 0:
            assert not bool(pgd(f, x[i:i + 1], y[i:i + 1], lower, cfg)[1][0])


def test_reference_search_counts():
    from advalign_jax.attacks.search import attacks_per_image, forward_equivalents_per_image

    assert ReferenceSearch().bisection_steps == 7 and attacks_per_image() == 9
    assert forward_equivalents_per_image() == 91

"""AutoAttack: the versions as the authors set them; survivors compacted with unchanged results; the
standard ensemble's per-stage robust accuracy against the authors' attacks (torchattacks 3.5.1) run as a
cascade on the same model, with the same random draws, on a model where each stage breaks points; a
gradient-masking model on which the gradient-based stages fail, Square succeeds and the checks fire;
the other checks by hand; EOT over a randomised model's draws."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advalign_jax.attacks import autoattack as AA
from advalign_jax.attacks import fab as F
from advalign_jax.attacks import square as S
from advalign_jax.attacks.apgd import APGDConfig, apgd, apgd_run, random_start
from advalign_jax.attacks.fab import FABConfig
from advalign_jax.evaluation import robust as R


def test_versions_follow_the_authors_settings():
    """``set_version`` of fra31/auto-attack: standard = APGD-CE (1 restart), APGD-T (9 targets), FAB-T
    (9 targets), Square (5,000 queries); plus = APGD-CE, APGD-DLR (5 restarts each), FAB (5 restarts),
    Square, APGD-T, FAB-T; rand = APGD-CE, APGD-DLR with 20 EOT draws. 100 iterations throughout."""
    std = AA.version_stages("standard", "l2")
    assert [n for n, _ in std] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    (_, ce), (_, t), (_, ft), (_, sq) = std
    assert (ce.loss, ce.n_iter, ce.n_restarts, ce.norm, ce.eot_iter) == ("ce", 100, 1, "l2", 1)
    assert (t.loss, t.n_iter, t.n_restarts, t.n_target_classes) == ("dlr-targeted", 100, 1, 9)
    assert (ft.targeted, ft.n_iter, ft.n_restarts, ft.n_target_classes, ft.alpha_max, ft.eta, ft.beta) == (
        True, 100, 1, 9, 0.1, 1.05, 0.9)
    assert (sq.n_queries, sq.n_restarts, sq.p_init, sq.loss, sq.rescale_schedule) == (5000, 1, 0.8, "margin", False)
    plus = dict(AA.version_stages("plus", "linf"))
    assert list(plus) == ["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]
    assert plus["apgd-ce"].n_restarts == plus["apgd-dlr"].n_restarts == plus["fab"].n_restarts == 5
    assert plus["apgd-dlr"].loss == "dlr" and not plus["fab"].targeted and plus["fab-t"].n_restarts == 1
    rand = AA.version_stages("rand", "linf")
    assert [(n, c.loss, c.eot_iter, c.n_restarts) for n, c in rand] == [("apgd-ce", "ce", 20, 1),
                                                                          ("apgd-dlr", "dlr", 20, 1)]
    five = [AA.fit_to_classes(c, 5) for _, c in std]
    assert [AA.targets_asked(c) for c in five] == [0, 4, 4, 0]
    with pytest.raises(ValueError, match="at least 4 classes"):
        AA.fit_to_classes(t, 3)
    with pytest.raises(ValueError):
        AA.version_stages("fast")


# --------------------------------------------------------------------------------------------------
# Survivors
# --------------------------------------------------------------------------------------------------


def test_survivors_are_compacted_and_results_unchanged():
    """APGD-T on 5 survivors of 16, attacked 4 at a time: 2 chunks run (not 4), and every example
    gets what the whole batch with the others masked gives it (its draws follow its index)."""
    rng = np.random.default_rng(0)
    w1, w2 = rng.normal(size=(48, 24)) / 4, rng.normal(size=(24, 6)) / 2
    with jax.enable_x64(True):
        def f(z):
            return jax.nn.relu(z.reshape(z.shape[0], -1) @ w1) @ w2

        x = rng.uniform(0, 1, size=(16, 4, 4, 3))
        y = np.asarray(jnp.argmax(f(x), 1))
        active = np.zeros(16, bool)
        active[[1, 4, 7, 12, 15]] = True
        index = np.arange(100, 116)
        cfg = APGDConfig(loss="dlr-targeted", n_iter=6, n_target_classes=3)
        key = jax.random.PRNGKey(3)
        eps = jnp.full(16, 0.05)

        def attack(xx, yy, ii, ee, mm):
            return apgd(f, xx, yy, ee, cfg, key=key, index=ii, mask=mm)

        xs, ok, runs = jax.jit(lambda *a: AA.on_survivors(attack, *a, chunk=4))(x, y, index, eps, active)
        masked, ok_masked = jax.jit(lambda x, y: attack(x, y, index, eps, active))(x, y)
    assert int(runs) == 2
    np.testing.assert_array_equal(np.asarray(ok), np.asarray(ok_masked) & active)
    np.testing.assert_allclose(np.asarray(xs)[active], np.asarray(masked)[active], rtol=0, atol=1e-13)
    np.testing.assert_array_equal(np.asarray(xs)[~active], x[~active])
    assert 0 < np.asarray(ok).sum() < 5


# --------------------------------------------------------------------------------------------------
# The standard ensemble against the authors' attacks
# --------------------------------------------------------------------------------------------------

H, W, C, K = 6, 6, 3, 10
D = H * W * C


def _stage_model():
    """A ReLU network plus a branch on the input quantised to 1/32 (invisible to gradients): with two
    APGD iterations, each of the four stages breaks points the previous ones left."""
    rng = np.random.default_rng(3)
    w1 = rng.normal(size=(D, 32)) / np.sqrt(D) * 2
    b1, w2 = rng.normal(size=32) * 0.1, rng.normal(size=(32, K)) / 2
    a = rng.normal(size=(D, K)) / np.sqrt(D) * 8.0

    def f(x):
        flat = x.reshape(x.shape[0], -1)
        return jax.nn.relu(flat @ w1 + b1) @ w2 + (jnp.round(flat * 32) / 32) @ a

    return f, (w1, b1, w2, a)


def _torch_stage_model(torch, weights):
    """The same function on NCHW inputs (the layout the Square port needs), weights reordered."""
    w1, b1, w2, a = weights
    nchw = lambda m: m.reshape(H, W, C, -1).transpose(2, 0, 1, 3).reshape(D, -1)  # noqa: E731

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.ParameterList([torch.nn.Parameter(torch.tensor(v)) for v in (nchw(w1), b1, w2, nchw(a))])

        def forward(self, z):
            flat = z.reshape(z.shape[0], -1)
            return torch.relu(flat @ self.p[0] + self.p[1]) @ self.p[2] + (torch.round(flat * 32) / 32) @ self.p[3]

    return Net().eval()


def test_standard_ensemble_matches_the_authors_attacks_float64(monkeypatch):
    """AutoAttack "standard" (APGD 2 iterations, FAB-T 10, Square 100 queries, 9 targets) against a
    cascade of the port's APGD, APGDT, FAB (multi-targeted) and Square, each run on the points the
    previous ones left: the same stage breaks the same points, so the robust accuracy after each stage
    is the same. The random starts of APGD and APGD-T are ours, fed to the port; Square runs one point at
    a time there with our draws (the port shares one window across its batch)."""
    torch = pytest.importorskip("torch")
    torchattacks = pytest.importorskip("torchattacks")
    from test_square import _their_draws

    eps, key = 0.02, jax.random.PRNGKey(0)
    stages = AA.version_stages("standard", "linf", n_iter=2, fab_iter=10, n_queries=100)
    f, weights = _stage_model()
    x = np.random.default_rng(100).uniform(0, 1, size=(64, H, W, C))
    with jax.enable_x64(True):
        y = np.asarray(jnp.argmax(f(x), 1))
        ours = jax.jit(lambda x, y: AA.autoattack(f, x, y, eps, stages, key=key, chunk=16))(x, y)
        ours = {k: np.asarray(v) for k, v in ours.items()}
        # the APGD starts' directions for every example: stage s, run r draws from fold_in(fold_in(key, s), r)
        starts = {(s, r): np.asarray(random_start(jax.random.fold_in(jax.random.fold_in(key, s), r),
                                                  jnp.zeros_like(x), 1.0, "linf", clip=None)).transpose(0, 3, 1, 2)
                  for s, runs in ((0, 1), (1, 9)) for r in range(runs)}
        square_draws = {i: _their_draws(S._example_key(jax.random.fold_in(key, 3), 0, i), stages[3][1], (H, W, C))
                        for i in range(len(x))}

    default, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    monkeypatch.setattr(torch.Tensor, "float", lambda self: self.to(torch.float64))
    try:
        net = _torch_stage_model(torch, weights)
        xt = np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # the FAB port views input gradients: C order
        flat = xt.reshape(len(x), -1)
        now = {"rows": [], "run": (0, 0), "queue": []}

        def rows_of(batch):
            return [int(np.flatnonzero((flat == r.reshape(1, -1)).all(1))[0]) for r in batch.reshape(len(batch), -1)]

        def rand(*shape, **kwargs):
            if now["queue"]:  # Square: one example's draws, in order
                return torch.tensor(now["queue"].pop(0))
            return torch.tensor((starts[now["run"]][now["rows"]] + 1) / 2)  # APGD: 2 rand - 1 = direction

        monkeypatch.setattr(torch, "rand", rand)
        apgd_ce = torchattacks.APGD(net, norm="Linf", eps=eps, steps=2, n_restarts=1, loss="ce")
        apgd_t = torchattacks.APGDT(net, norm="Linf", eps=eps, steps=2, n_restarts=1, n_classes=K)
        fab_t = torchattacks.FAB(net, norm="Linf", eps=eps, steps=10, multi_targeted=True, n_classes=K)
        for stage, atk in ((0, apgd_ce), (1, apgd_t)):
            single = atk.attack_single_run

            def tracked(x_in, y_in, single=single, atk=atk, stage=stage):
                now["rows"] = rows_of(x_in.numpy())
                now["run"] = (stage, getattr(atk, "target_class", 2) - 2)
                return single(x_in, y_in)

            atk.attack_single_run = tracked

        def square(idx):
            out = []
            for i in idx:
                now["queue"] = list(square_draws[i])
                atk = torchattacks.Square(net, norm="Linf", eps=eps, n_queries=100, resc_schedule=False)
                out.append(atk(torch.tensor(xt[i:i + 1]), torch.tensor(y[i:i + 1])).detach().numpy())
                now["queue"] = []
            return np.concatenate(out)

        def port(atk):
            return lambda idx: atk(torch.tensor(np.ascontiguousarray(xt[idx])), torch.tensor(y[idx])).detach().numpy()

        with torch.no_grad():
            robust = net(torch.tensor(xt)).argmax(1).numpy() == y
        broken_by = np.full(len(x), -1)
        for s, run in enumerate((port(apgd_ce), port(apgd_t), port(fab_t), square)):
            idx = np.flatnonzero(robust)
            adv = run(idx)
            with torch.no_grad():
                broken = net(torch.tensor(adv)).argmax(1).numpy() != y[idx]
            broken_by[idx[broken]] = s
            robust[idx[broken]] = False
    finally:
        torch.set_default_dtype(default)
        torch.set_num_threads(threads)
    # FAB walks onto the decision boundary, where some of its decisions are ties that rounding settles:
    # points whose FAB-T verdict rests on such a decision are left out (the others do not depend on them)
    with jax.enable_x64(True):
        fragile = _fab_fragile(f, x, y, ours["robust_after"][1], eps, stages[2][1])
    assert fragile.sum() <= 4
    keep = ~fragile
    np.testing.assert_array_equal(ours["stage"][keep], broken_by[keep])
    assert all((broken_by[keep] == s).sum() >= 1 for s in range(4))  # every stage matters on this model
    after = [float(np.mean(r)) for r in ours["robust_after"]]
    assert after == sorted(after, reverse=True) and after[0] > after[-1]
    np.testing.assert_array_equal(ours["robust"][keep], broken_by[keep] == -1)


def _fab_fragile(f, x, y, survivors, eps, cfg, tie=1e-9):
    """(N,) bool: survivors whose FAB-T verdict depends on rounding: taking its targets in order, a
    decision within ``tie`` of the boundary (which changes the rest of the run) comes before any clear
    misclassification within eps."""
    targets = jnp.argsort(-f(x), axis=1)[:, 1:cfg.n_target_classes + 1]
    run = jax.jit(lambda t: F.fab_run(f, x, y, x, cfg, t, trace=True)["trace_x"])
    runs = np.stack([np.asarray(run(targets[:, k])) for k in range(targets.shape[1])])  # (targets, n_iter, N, ...)
    z = np.asarray(jax.jit(jax.vmap(f))(runs.reshape((-1,) + runs.shape[2:]))).reshape(runs.shape[:3] + (-1,))
    n = len(x)
    margin = np.where(np.arange(z.shape[-1]) == y[:, None], -np.inf, z).max(-1) - z[..., np.arange(n), y]
    size = np.abs(np.asarray(runs) - x).reshape(margin.shape + (-1,)).max(-1)
    fragile = np.zeros(n, bool)
    for i in np.flatnonzero(np.asarray(survivors)):
        for k in range(margin.shape[0]):
            ties = np.flatnonzero(np.abs(margin[k, :, i]) <= tie)
            clear = np.flatnonzero((margin[k, :, i] > tie) & (size[k, :, i] <= eps))
            first_tie = ties[0] if len(ties) else np.inf
            first_clear = clear[0] if len(clear) else np.inf
            if first_clear < first_tie:
                break  # broken, whatever rounding does later
            if first_tie < np.inf:
                fragile[i] = True
                break
    return fragile


# --------------------------------------------------------------------------------------------------
# Gradient masking and the checks
# --------------------------------------------------------------------------------------------------


def _masked_model():
    """A linear model on the input quantised to 1/32: its input gradient is zero everywhere."""
    d = 8 * 8 * 3
    a = np.random.default_rng(0).normal(size=(d, K)) / np.sqrt(d)

    def apply_fn(v, z):
        return (jnp.round(z.reshape(z.shape[0], -1) * 32) / 32) @ v["a"]

    pool = np.random.default_rng(1).uniform(0, 1, size=(400, 8, 8, 3)).astype(np.float32)
    z = np.sort(np.asarray(apply_fn({"a": a}, pool)), 1)
    margin = z[:, -1] - z[:, -2]
    x = pool[(margin > 0.1) & (margin < 0.3)][:24]  # beyond random noise at 8/255, within an optimised reach
    return apply_fn, {"a": a.astype(np.float32)}, x


def test_gradient_masking_model_fails_white_box_and_the_checks_fire(caplog):
    apply_fn, variables, x = _masked_model()
    y = np.asarray(jnp.argmax(apply_fn(variables, x), 1))
    attack = R.autoattack_attack("linf", 8 / 255, n_iter=3, n_target_classes=9, fab_iter=3, n_queries=300)
    with caplog.at_level(logging.WARNING, logger="advalign_jax.autoattack"):
        result = R.evaluate_robustness(apply_fn, variables, x, y, [attack], batch_size=24)
    s = result.summary["attacks"][attack.name]
    after = s["after_stage"]
    assert after["apgd-ce"] == after["apgd-t"] == after["fab-t"] == result.summary["clean_accuracy"] == 1.0
    assert after["square"] < 0.8  # the black-box stage breaks what the gradient-based ones could not
    assert np.all(result.per_example["grad_zero"])
    assert {"zero_gradient", "square_gain"} <= set(s["checks"])
    assert "small_perturbation" not in s["checks"] and "randomized" not in s["checks"]
    warned = caplog.text
    assert "zero_gradient" in warned and "square_gain" in warned and "24 of 24 points" in warned
    rows = R.summary_rows("masked", result.summary, 1.0)
    assert "square_gain" in rows[0]["checks"] and "zero_gradient" in rows[-1]["checks"]
    assert [r["stage"] for r in rows] == ["", "apgd-ce", "apgd-t", "fab-t", "square", ""]
    assert all(r["stage_time_s"] >= 0 for r in rows)


def test_checks_by_hand():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(12, 5))
    x = rng.uniform(0, 1, size=(6, 12))
    y = np.asarray(jnp.argmax(x @ a, 1))
    assert AA.check_randomized(lambda z: z @ a, x, y) is None
    noisy = np.random.default_rng(1)
    assert "randomised" in AA.check_randomized(lambda z: z @ a + noisy.normal(size=(len(z), 5)) * 1e-2, x, y)
    assert "probabilities" in AA.check_probabilities(jax.nn.softmax(x @ a))
    assert AA.check_probabilities(x @ a) is None
    assert "outside the box [0, 1]" in AA.check_input_range(x * 255, (0.0, 1.0))
    assert AA.check_input_range(x, (0.0, 1.0)) is None and AA.check_input_range(x * 255, None) is None
    msg = AA.check_n_classes(5, AA.version_stages("standard", "linf"))
    assert "apgd-t 9, fab-t 9" in msg and "(4)" in msg
    assert AA.check_n_classes(10, AA.version_stages("standard", "linf")) is None
    # Square took robust accuracy from 50% to 49.9% (0.1 points: no) or 49% (1 point: yes)
    assert AA.check_square_gain({"clean": 0.9, "apgd-ce": 0.6, "apgd-t": 0.5, "fab-t": 0.5, "square": 0.499}) is None
    assert "1.00 points" in AA.check_square_gain({"apgd-ce": 0.6, "apgd-t": 0.5, "fab-t": 0.5, "square": 0.49})
    # points broken by a later stage at under half the radius: FAB-T at 0.3 eps (yes), APGD-CE's own (no)
    names = ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert AA.check_small_perturbation([0, 1, -1, 3], [0.1, 1.0, 0.0, 1.0], 1.0, names) is None
    assert "fab-t 1" in AA.check_small_perturbation([0, 2, 2, -1], [0.1, 0.3, 0.9, 0.0], 1.0, names)
    assert AA.check_zero_gradients(0, 10) is None and "3 of 10" in AA.check_zero_gradients(3, 10)
    found = AA.run_checks(lambda z: jax.nn.softmax(z @ a), x * 2, y, AA.version_stages("standard", "linf"))
    assert set(found) == {"probabilities", "input_range", "n_classes"}
    assert "randomized" not in AA.run_checks(lambda z: z @ a + noisy.normal(size=(len(z), 5)), x, y, (), version="rand")


def test_eot_averages_the_draws_of_a_randomised_model():
    """APGD on a model with a random input mask (a fresh draw per forward pass): with eot_iter = 4 the
    first step follows the sign of the mean of the 4 draws' gradients (``fold_in(fold_in(model_key, 0),
    j)``), the loss is the last draw's; the ``rand`` version runs end to end."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(12, 5))

    def f(z, key):
        keep = jax.random.bernoulli(key, 0.5, z.shape[1:]).astype(z.dtype)
        return (z * keep) @ a

    x = rng.uniform(0.2, 0.8, size=(3, 12))
    y = np.asarray(jnp.argmax(x @ a, 1))
    model_key = jax.random.PRNGKey(7)
    cfg = APGDConfig(n_iter=1, eot_iter=4, clip=None)
    with jax.enable_x64(True):
        res = jax.jit(lambda x, y: apgd_run(f, x, y, 0.05, x, cfg, trace=True, model_key=model_key))(x, y)

        def grad(j):
            k = jax.random.fold_in(jax.random.fold_in(model_key, 0), j)
            return jax.grad(lambda z: jnp.sum(-jax.nn.log_softmax(f(z, k))[np.arange(3), y]))(x)

        mean = sum(grad(j) for j in range(4)) / 4
        np.testing.assert_allclose(np.asarray(res["trace_x"][0]), x + 0.05 * np.sign(mean), atol=1e-12)
        assert not np.allclose(np.sign(grad(0)), np.sign(mean))  # the draws differ
        stages = AA.version_stages("rand", "linf", n_iter=3, eot_iter=2, clip=None)
        out = jax.jit(lambda x, y: AA.autoattack(f, x, y, 0.3, stages, model_key=model_key))(x, y)
    assert out["robust_after"].shape == (2, 3)
    with pytest.raises(ValueError, match="APGD only"):
        AA.run_stage(f, x, y, 0.1, FABConfig(), jax.random.PRNGKey(0), model_key=model_key)

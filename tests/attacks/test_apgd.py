"""APGD: against an independent PyTorch implementation (tests/references/reference_apgd.py) and, when torchattacks
is installed, the authors' code as it ports it; the checkpoint schedule and the halving rule by hand,
the DLR losses by their formulas, and APGD at least as strong as PGD on a trained model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from advalign_jax.attacks import apgd as A
from advalign_jax.attacks.pgd import PGDConfig, pgd
from reference_apgd import apgd_full, apgd_single, code_schedule, paper_schedule
from reference_attacks import TorchMLP

H, W, C, K = 4, 4, 3, 6
EPS = {"linf": 0.02, "l2": 0.2}  # radii at which the random MLP below is fooled on some points only


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The references run tiny models: one thread avoids PyTorch's thread start-up and contention costs
    (tens of milliseconds per call on a busy machine)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _weights(dtype):
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(H * W * C, 24)) / 4
    b1 = rng.normal(size=24) * 0.1
    w2 = rng.normal(size=(24, K)) / 2
    b2 = rng.normal(size=K) * 0.1
    return [a.astype(dtype) for a in (w1, b1, w2, b2)]


def _mlp(weights):
    w1, b1, w2, b2 = weights

    def logits_fn(x):
        return jax.nn.relu(x.reshape(x.shape[0], -1) @ w1 + b1) @ w2 + b2

    return logits_fn


def _data(n=8, dtype=np.float64, seed=0):
    x = np.random.default_rng(seed + 100).uniform(0, 1, size=(n, H, W, C)).astype(dtype)
    return x


# --------------------------------------------------------------------------------------------------
# Schedule, halving rule and losses by hand
# --------------------------------------------------------------------------------------------------


def test_checkpoint_schedule_by_hand():
    # p: 0, .22, .41 (=.22+.19), .57 (+.16), .70 (+.13), .80 (+.10), .87 (+.07), .93 (+.06), .99 (+.06)
    assert A.checkpoints(100) == (0, 22, 41, 57, 70, 80, 87, 93, 99)
    assert A.paper_checkpoints(100) == (0, 22, 41, 57, 70, 80, 87, 93, 99)
    assert A.checkpoints(1000) == A.paper_checkpoints(1000) == (0, 220, 410, 570, 700, 800, 870, 930, 990)
    # N = 50: the code's windows 11, 10, 9, 8, 7 (int(0.22*50)=11, int(0.03*50)=1, int(0.06*50)=3);
    # the paper: ceil(50 p) = 11, 21 (20.5), 29 (28.5), 35, 40, 44 (43.5), 47 (46.5), 50 (49.5)
    assert A.checkpoints(50) == (0, 11, 21, 30, 38, 45)
    assert A.paper_checkpoints(50) == (0, 11, 21, 29, 35, 40, 44, 47, 50)
    # N = 10: windows 2, 1, 1, ...; the paper: 3 (2.2), 5 (4.1), 6 (5.7), 7, 8, 9 (8.7), 10 (9.3, 9.9)
    assert A.checkpoints(10) == (0, 2, 3, 4, 5, 6, 7, 8, 9, 10)
    assert A.paper_checkpoints(10) == (0, 3, 5, 6, 7, 8, 9, 10)
    assert A.checkpoints(1) == (0, 1)
    for n in range(1, 301):  # the reference's own loops
        assert list(A.checkpoints(n)) == code_schedule(n), n
        assert list(A.paper_checkpoints(n)) == paper_schedule(n), n


def _window(start_value, best, ups, downs, new_best):
    """``downs`` decreasing values then ``ups`` increasing ones, ending above ``best`` (new_best) or
    below it."""
    vals, v = [], start_value
    for _ in range(downs):
        v -= 1.0
        vals.append(v)
    end = best + 1.0 if new_best else best - 0.5
    assert end > v
    for k in range(1, ups + 1):
        vals.append(v + (end - v) * k / ups)
    return vals


def test_halving_rule_by_hand():
    """N = 100: windows 22, 19, 16, 13, 10, 7, 6, 6, thresholds 0.75 x window = 16.5, 14.25, 12, 9.75,
    7.5, 5.25, 4.5, 4.5; halve when #increases <= threshold, or when the step was not halved at the
    previous checkpoint and the best loss did not grow since."""
    # Window 1: f(x1) = 101 (an increase over the code's zero), then 16 more increases: 17 > 16.5 -> keep.
    seq = [101.0] + _window(101.0, 101.0, ups=16, downs=5, new_best=True)
    plan = [  # (window, ups, new best?, halved?) for windows 2..8
        (19, 14, True, True),    # 14 <= 14.25 -> halve (condition 1)
        (16, 12, True, True),    # 12 <= 12 -> halve (condition 1 is '<=')
        (13, 10, True, False),   # 10 > 9.75; halved last time -> keep
        (10, 8, False, True),    # 8 > 7.5, but not halved last time and no new best -> halve (condition 2)
        (7, 6, True, False),     # 6 > 5.25; halved last time -> keep
        (6, 5, True, False),     # 5 > 4.5; new best -> keep
        (6, 5, False, True),     # 5 > 4.5, no new best, not halved last time -> halve (condition 2)
    ]
    for h, ups, new_best, _ in plan:
        seq += _window(seq[-1], max(seq), ups=ups, downs=h - ups, new_best=new_best)
    seq += [0.0]  # iteration 100: no checkpoint
    assert len(seq) == 100
    losses = np.asarray(seq)
    columns = np.stack([losses, losses - 1000.0, losses], axis=1)
    halves = np.asarray(A.halving_decisions(columns, np.array([100.0, -900.0, 200.0]), 100))
    assert sorted(np.flatnonzero(halves[:, 0])) == [40, 56, 79, 98]
    # negative losses: f(x1) > 0 fails, 16 <= 16.5 -> also halved at the first checkpoint
    assert sorted(np.flatnonzero(halves[:, 1])) == [21, 40, 56, 79, 98]
    # f(x0) = 200 is never beaten: condition 2 is off at the first checkpoint (no halving at 21), then
    # holds wherever the step was not halved at the previous checkpoint (79, and now 92)
    assert sorted(np.flatnonzero(halves[:, 2])) == [40, 56, 79, 92]


def test_dlr_losses_by_hand():
    z = jnp.array([[1.0, 4.0, 2.0, 0.5, 3.0]] * 3)
    # sorted: 4, 3, 2, 1, 0.5 -> z_pi1 - z_pi3 = 2, z_pi1 - (z_pi3 + z_pi4) / 2 = 2.5
    np.testing.assert_allclose(A.dlr_loss(z, jnp.array([2, 1, 3])), [-(2 - 4) / 2, -(4 - 3) / 2, -(0.5 - 4) / 2],
                               rtol=1e-6)
    np.testing.assert_allclose(A.targeted_dlr_loss(z, jnp.array([1, 1, 2]), jnp.array([4, 3, 1])),
                               [-(4 - 3) / 2.5, -(4 - 0.5) / 2.5, -(2 - 4) / 2.5], rtol=1e-6)
    np.testing.assert_allclose(A.ce_loss(z, jnp.array([1, 1, 1])),
                               -np.log(np.exp(4) / np.exp([1, 4, 2, 0.5, 3]).sum()) * np.ones(3), rtol=1e-6)
    np.testing.assert_array_equal(A.top_targets(z, 3), [[4, 2, 0]] * 3)
    flat = jnp.array([[1.0, 1.0, 1.0, 1.0]])  # all equal: the 1e-12 keeps it finite
    assert np.isfinite(np.asarray(A.dlr_loss(flat, jnp.array([0]))[0]))
    with pytest.raises(ValueError, match="at least 3"):
        A.dlr_loss(jnp.zeros((1, 2)), jnp.array([0]))
    with pytest.raises(ValueError, match="at least 4"):
        A.targeted_dlr_loss(jnp.zeros((1, 3)), jnp.array([0]), jnp.array([1]))
    with pytest.raises(ValueError, match="needs at least 10 classes"):
        A.top_targets(jnp.zeros((1, 6)), 9)


def test_random_start_and_configs():
    x = jnp.full((64, H, W, C), 0.5)
    start = jax.jit(A.random_start, static_argnames=("norm",))
    for norm, eps in (("linf", 0.1), ("l2", 0.4)):
        d = np.asarray(start(jax.random.PRNGKey(0), x, eps, norm) - x).reshape(64, -1)
        size = np.abs(d).max(1) if norm == "linf" else np.linalg.norm(d, axis=1)
        np.testing.assert_allclose(size, eps, rtol=1e-5)  # on the sphere of the norm
    a = start(jax.random.PRNGKey(0), x, 0.1, "linf", index=jnp.arange(10, 74))
    b = start(jax.random.PRNGKey(0), x, 0.1, "linf", index=jnp.arange(12, 76)[::-1])
    np.testing.assert_array_equal(a[2:6], b[::-1][:4])  # draws follow the index, not the position
    for bad in (dict(norm="l1"), dict(loss="margin"), dict(n_iter=0), dict(keep="best"), dict(rho=0.0)):
        with pytest.raises(ValueError):
            A.APGDConfig(**bad)
    assert A.APGD_T.n_runs == 9 and A.APGD_CE.n_runs == 1


# --------------------------------------------------------------------------------------------------
# Against the independent reference
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm,loss", [("linf", "ce"), ("linf", "dlr-targeted"), ("l2", "ce"), ("l2", "dlr"),
                                       ("l2", "dlr-targeted")])
def test_run_matches_reference_float64(norm, loss):
    """Step sizes, every iterate and the returned point of one run, from the same start."""
    eps, n_iter = EPS[norm], 40  # checkpoints 8, 15, 21, 26, 30, 33, 35, 37, 39
    weights = _weights(np.float64)
    torch_model = TorchMLP(*weights)
    x = _data()
    with jax.enable_x64(True):
        f = _mlp(weights)
        y = np.asarray(jnp.argmax(f(x), 1))
        start = np.asarray(A.random_start(jax.random.PRNGKey(1), jnp.asarray(x), eps, norm))
        target = np.asarray(A.top_targets(f(x), 3)[:, 1])  # the 3rd-ranked class
        cfg = A.APGDConfig(norm=norm, n_iter=n_iter, loss=loss)
        res = jax.jit(lambda x, y, s, t: A.apgd_run(f, x, y, eps, s, cfg, t, trace=True))(x, y, start, target)
        res = {k: np.asarray(v) for k, v in res.items()}
        assert res["trace_x"].dtype == np.float64
    halvings, fooled = 0, 0
    for i in range(len(x)):
        ref = apgd_single(torch_model, x[i], int(y[i]), eps, start[i], n_iter, norm, loss, int(target[i]))
        np.testing.assert_array_equal(res["trace_step"][:, i], ref["steps"])
        np.testing.assert_allclose(res["trace_x"][:, i], ref["xs"], atol=1e-9)
        np.testing.assert_allclose(res["trace_loss"][:, i], ref["losses"], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(res["x_adv"][i], ref["x_adv"], atol=1e-9)
        np.testing.assert_allclose(res["x_best"][i], ref["x_max"], atol=1e-9)
        assert bool(res["success"][i]) == ref["success"]
        halvings += len(set(ref["steps"])) - 1
        fooled += ref["success"]
    assert halvings >= len(x)  # the halving rule was exercised
    assert 0 < fooled < len(x)  # both returned-point branches were exercised


def test_keep_first_and_last_match_reference_float64():
    norm, eps, n_iter = "linf", 0.03, 30
    weights = _weights(np.float64)
    x = _data()
    with jax.enable_x64(True):
        f = _mlp(weights)
        y = np.asarray(jnp.argmax(f(x), 1))
        start = np.asarray(A.random_start(jax.random.PRNGKey(2), jnp.asarray(x), eps, norm))
        first = A.apgd_run(f, x, y, eps, start, A.APGDConfig(norm=norm, n_iter=n_iter, keep="first"))
        last = A.apgd_run(f, x, y, eps, start, A.APGDConfig(norm=norm, n_iter=n_iter))  # the default
    differ = 0
    for i in range(len(x)):
        ref_first = apgd_single(TorchMLP(*weights), x[i], int(y[i]), eps, start[i], n_iter, norm, keep="first")
        ref_last = apgd_single(TorchMLP(*weights), x[i], int(y[i]), eps, start[i], n_iter, norm, keep="last")
        np.testing.assert_allclose(np.asarray(first["x_adv"][i]), ref_first["x_adv"], atol=1e-9)
        np.testing.assert_allclose(np.asarray(last["x_adv"][i]), ref_last["x_adv"], atol=1e-9)
        differ += not np.allclose(ref_first["x_adv"], ref_last["x_adv"])
    assert differ > 0


def test_restarts_and_targets_match_reference_float64():
    """APGD-T with 2 restarts per target (runs: targets outer, restarts inner; the first run that
    fools an example is kept, else the best loss), the default and explicit targets."""
    loss, restarts = "dlr-targeted", 2
    norm, eps, n_iter = "l2", 0.15, 12
    weights = _weights(np.float64)
    x = _data(10, seed=3)
    cfg = A.APGDConfig(norm=norm, n_iter=n_iter, loss=loss, n_restarts=restarts, n_target_classes=3)
    key = jax.random.PRNGKey(4)
    with jax.enable_x64(True):
        f = _mlp(weights)
        y = np.array(jnp.argmax(f(x), 1))
        y[:2] = (y[:2] + 1) % K  # two points the model already misclassifies
        x_adv, ok = jax.jit(lambda x, y: A.apgd(f, x, y, eps, cfg, key=key))(x, y)
        starts = np.asarray(A.run_starts(key, jnp.asarray(x), eps, cfg))
    assert starts.shape[0] == cfg.n_runs
    fooled = 0
    for i in range(len(x)):
        ref_x, ref_ok = apgd_full(TorchMLP(*weights), x[i], int(y[i]), eps, starts[:, i], n_iter, norm, loss,
                                  n_restarts=restarts, n_targets=3)
        np.testing.assert_allclose(np.asarray(x_adv[i]), ref_x, atol=1e-9)
        assert bool(ok[i]) == ref_ok
        fooled += ref_ok and i >= 2
    np.testing.assert_array_equal(np.asarray(x_adv[:2]), x[:2])  # not attacked
    assert 0 < fooled < len(x) - 2
    # explicit targets: the 4th- then the 2nd-ranked class
    with jax.enable_x64(True):
        chosen = np.asarray(A.top_targets(f(x), 3))[:, ::-2]
        x_adv, ok = jax.jit(lambda x, y, t: A.apgd(f, x, y, eps, cfg, key=key, targets=t))(x, y, chosen)
    for i in range(len(x)):
        ref_x, ref_ok = apgd_full(TorchMLP(*weights), x[i], int(y[i]), eps, starts[:, i], n_iter, norm, loss,
                                  n_restarts=restarts, targets=[int(t) for t in chosen[i]])
        np.testing.assert_allclose(np.asarray(x_adv[i]), ref_x, atol=1e-9)
        assert bool(ok[i]) == ref_ok


def test_float32_run_follows_reference():
    """float32 against the float64 reference: iterates agree to float32 precision up to the first
    checkpoint (later, near-equal losses may tip a decision either way); the verdicts agree."""
    norm, eps, n_iter = "linf", EPS["linf"], 20  # first checkpoint after 4 iterations
    weights = _weights(np.float64)
    x = _data()
    f = _mlp(_weights(np.float32))
    x32 = x.astype(np.float32)
    y = np.asarray(jnp.argmax(f(x32), 1))
    start = np.asarray(A.random_start(jax.random.PRNGKey(1), jnp.asarray(x32), eps, norm))
    res = jax.jit(lambda x, y, s: A.apgd_run(f, x, y, eps, s, A.APGDConfig(norm=norm, n_iter=n_iter),
                                             trace=True))(x32, y, start)
    assert res["trace_x"].dtype == jnp.float32
    for i in range(len(x)):
        ref = apgd_single(TorchMLP(*weights), x[i], int(y[i]), eps, start[i].astype(np.float64), n_iter, norm)
        np.testing.assert_allclose(np.asarray(res["trace_x"][:4, i]), ref["xs"][:4], atol=1e-6)
        assert bool(res["success"][i]) == ref["success"]


@pytest.mark.parametrize("norm,loss,n_iter", [("linf", "ce", 100), ("linf", "dlr", 100), ("linf", "dlr-targeted", 100),
                                              ("l2", "ce", 10)])
def test_matches_the_authors_code_float64(monkeypatch, norm, loss, n_iter):
    """Against the authors' APGD as torchattacks 3.5.1 ports it (AutoAttack's ``autopgd_base.py``,
    2020), same start (its random draw replaced by ours), float64: the best point, the returned
    misclassified point, f_max and the verdicts. (Run when torchattacks is installed: ``pip install
    --no-deps torchattacks==3.5.1``.) Linf over 100 iterations agrees to rounding; L2 only over a few
    iterations, because that port adds 1e-12 to the norm in its second projection and the normalised
    L2 step amplifies such differences over many iterations. (Its APGD-T L2 step uses example 0's
    step size for the whole batch, so L2 APGD-T is not compared.)"""
    torchattacks = pytest.importorskip("torchattacks")
    import torch

    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        eps = {"linf": 0.03, "l2": 0.25}[norm]
        k = 10
        rng = np.random.default_rng(0)
        weights = [rng.normal(size=(H * W * C, 24)) / 4, rng.normal(size=24) * 0.1, rng.normal(size=(24, k)) / 2,
                   rng.normal(size=k) * 0.1]

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.p = torch.nn.ParameterList([torch.nn.Parameter(torch.tensor(a)) for a in weights])

            def forward(self, x):
                return torch.relu(x.reshape(x.shape[0], -1) @ self.p[0] + self.p[1]) @ self.p[2] + self.p[3]

        x = _data(32)
        with jax.enable_x64(True):
            f = _mlp(weights)
            y = np.asarray(jnp.argmax(f(x), 1))
            draw = rng.uniform(-1, 1, size=x.shape) if norm == "linf" else rng.normal(size=x.shape)
            if loss == "dlr-targeted":
                atk = torchattacks.APGDT(Net().eval(), norm="Linf", eps=eps, steps=n_iter, n_classes=k)
                atk.target_class = 3  # the 3rd-ranked class
                target = jnp.asarray(np.argsort(np.asarray(f(x)), 1)[:, -3])
            else:
                atk = torchattacks.APGD(Net().eval(), norm=norm.capitalize() if norm == "l2" else "Linf", eps=eps,
                                        steps=n_iter, loss=loss)
                target = None
            monkeypatch.setattr(torch, "rand", lambda *a, **kw: torch.tensor((draw + 1) / 2))  # 2 rand - 1 = draw
            monkeypatch.setattr(torch, "randn", lambda *a, **kw: torch.tensor(draw))
            x_max, acc, f_max, x_fooled = (t.detach().numpy() for t in atk.attack_single_run(torch.tensor(x),
                                                                                              torch.tensor(y)))
            monkeypatch.undo()
            start = np.clip(x + eps * np.asarray(A.normalise(jnp.asarray(draw), norm)), 0, 1)
            res = A.apgd_run(f, x, y, eps, start, A.APGDConfig(norm=norm, n_iter=n_iter, loss=loss), target)
            res = {key: np.asarray(v) for key, v in res.items()}
    finally:
        torch.set_default_dtype(default_dtype)
    fooled = ~acc.astype(bool)
    np.testing.assert_array_equal(res["success"], fooled)
    assert 0 < fooled.sum() < len(x)
    np.testing.assert_allclose(res["x_best"], x_max, atol=1e-10)
    np.testing.assert_allclose(res["loss_best"], f_max, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(res["x_adv"][fooled], x_fooled[fooled], atol=1e-10)


# --------------------------------------------------------------------------------------------------
# Batch independence, feasibility, compile size
# --------------------------------------------------------------------------------------------------


def test_batch_independence_per_example_eps_and_feasibility():
    f = _mlp(_weights(np.float32))
    x = np.concatenate([_data(12, np.float32, seed=5), _data(9, np.float32, seed=6)])
    y = np.asarray(jnp.argmax(f(x), 1))
    eps_of = np.linspace(0.5, 1.5, len(x)).astype(np.float32)  # per-example radii (x EPS[norm])
    first, other = np.arange(12), np.array([9, 3, 4] + list(range(12, 21)))  # new batch mates, new positions
    for norm in ("linf", "l2"):
        cfg = A.APGDConfig(norm=norm, n_iter=15, loss="dlr-targeted", n_target_classes=2)
        run = jax.jit(lambda x, y, e, i, m: A.apgd(f, x, y, e, cfg, key=jax.random.PRNGKey(7), index=i, mask=m))
        eps = eps_of * EPS[norm]
        everything = np.ones(12, bool)
        full, ok = run(x[first], y[first], eps[first], first, everything)
        part, ok_part = run(x[other], y[other], eps[other], other, everything)
        full, ok, part, ok_part = map(np.asarray, (full, ok, part, ok_part))
        np.testing.assert_allclose(part[:3], full[[9, 3, 4]], atol=1e-6)
        np.testing.assert_array_equal(ok_part[:3], ok[[9, 3, 4]])
        assert 0 < ok.sum() < 12
        d = (full - x[first]).reshape(12, -1)
        size = np.abs(d).max(1) if norm == "linf" else np.linalg.norm(d, axis=1)
        assert np.all(size <= eps[first] * (1 + 1e-5)) and full.min() >= 0 and full.max() <= 1
        np.testing.assert_array_equal(ok, np.asarray(jnp.argmax(f(full), 1)) != y[first])
        masked, ok_masked = map(np.asarray, run(x[first], y[first], eps[first], first, np.arange(12) < 6))
        np.testing.assert_array_equal(masked[6:], x[6:12])  # outside the mask: untouched
        assert not ok_masked[6:].any()
        np.testing.assert_allclose(masked[:6], full[:6], atol=1e-6)


def test_compile_size_does_not_grow_with_iterations():
    f = _mlp(_weights(np.float32))
    x = _data(2, np.float32)
    y = np.zeros(2, np.int32)
    sizes = []
    for n_iter, targets in ((10, 2), (1000, 5)):
        cfg = A.APGDConfig(n_iter=n_iter, loss="dlr-targeted", n_target_classes=targets, n_restarts=3)
        sizes.append(len(str(jax.make_jaxpr(lambda x, y: A.apgd(f, x, y, 0.1, cfg))(x, y))))
    assert abs(sizes[0] - sizes[1]) < 40  # only the digits of a few constants differ


# --------------------------------------------------------------------------------------------------
# At least as strong as PGD on a trained model
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_model():
    from advalign_jax.data.images import load_arrays

    x_train, y_train = load_arrays("digits", "train")
    x_test, y_test = load_arrays("digits", "test")
    d = x_train[0].size
    rng = np.random.default_rng(0)
    params = {"w1": jnp.asarray(rng.normal(size=(d, 48)) / np.sqrt(d), jnp.float32), "b1": jnp.zeros(48),
              "w2": jnp.asarray(rng.normal(size=(48, 10)) / 7, jnp.float32), "b2": jnp.zeros(10)}

    def apply(p, x):
        return jax.nn.relu(x.reshape(x.shape[0], -1) @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    opt = optax.adam(1e-2)

    @jax.jit
    def step(p, s, x, y):
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean()  # noqa: E731
        g = jax.grad(loss)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = opt.init(params)
    for _ in range(300):
        idx = rng.integers(0, len(x_train), 128)
        params, state = step(params, state, x_train[idx], y_train[idx])
    return (lambda x: apply(params, x)), x_test[:160], y_test[:160]


@pytest.mark.parametrize("norm,eps", [("linf", 0.08), ("l2", 1.0)])
def test_apgd_at_least_as_strong_as_pgd(digits_model, norm, eps):
    f, x, y = digits_model
    clean = float(np.mean(np.asarray(jnp.argmax(f(x), 1)) == y))
    assert clean > 0.9
    n = 25
    pgd_cfg = PGDConfig(norm=norm, steps=n, step_size=2.5 / n, relative_step=True, use_best=True)
    x_pgd, _ = jax.jit(lambda x, y: pgd(f, x, y, eps, pgd_cfg))(x, y)
    robust_pgd = float(np.mean(np.asarray(jnp.argmax(f(x_pgd), 1)) == y))
    x_apgd, ok = jax.jit(lambda x, y: A.apgd(f, x, y, eps, A.APGDConfig(norm=norm, n_iter=n)))(x, y)
    robust_apgd = float(np.mean(np.asarray(jnp.argmax(f(x_apgd), 1)) == y))
    assert robust_apgd == pytest.approx(1 - float(np.mean(np.asarray(ok))))
    assert 0.05 < robust_pgd < clean  # an informative radius
    assert robust_apgd <= robust_pgd

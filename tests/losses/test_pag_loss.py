"""The PAG loss (advalign_jax.losses.pag) against an independent PyTorch version of the official loss
(tests/references/torch_pag_reference.py): value and parameter gradient (double backprop), with and without
BatchNorm, K-subsets, augmentation, reductions, eps on zero vectors, and the one-forward-pass property."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_pag_reference as tref
from advalign_jax.errors import ConfigError
from advalign_jax.losses import pag as P
from advalign_jax.models.base import Model, batch_norm

C, N, H, W = 5, 4, 6, 6
ACTS = {"tanh": jnp.tanh, "relu": jax.nn.relu, "sin": jnp.sin}


class JaxTinyCNN(nn.Module):
    """The same function as tests/references/torch_pag_reference.TinyCNN, NHWC."""

    num_classes: int = C
    use_bn: bool = False
    act: str = "tanh"

    @nn.compact
    def __call__(self, x, train: bool = False):
        act = ACTS[self.act]
        x = nn.Conv(6, (3, 3), padding=((1, 1), (1, 1)), name="conv1")(x)
        if self.use_bn:
            x = batch_norm(train, "bn1")(x)
        x = act(x)
        x = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(x)
        if self.use_bn:
            x = batch_norm(train, "bn2")(x)
        x = act(x)
        return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=(1, 2)))


def _np(t):
    return t.detach().numpy().astype(np.float32)


def make_pair(use_bn=False, act="tanh", seed=0):
    """A torch model and the JAX model with the same weights (and variables)."""
    torch.manual_seed(seed)
    tm = tref.TinyCNN(C, use_bn, act)
    params = {"conv1": {"kernel": _np(tm.conv1.weight.permute(2, 3, 1, 0)), "bias": _np(tm.conv1.bias)},
              "conv2": {"kernel": _np(tm.conv2.weight.permute(2, 3, 1, 0)), "bias": _np(tm.conv2.bias)},
              "head": {"kernel": _np(tm.head.weight.T), "bias": _np(tm.head.bias)}}
    variables = {"params": params}
    if use_bn:
        with torch.no_grad():  # non-trivial affine parameters and running statistics
            for bn in (tm.bn1, tm.bn2):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.3, 0.3)
                bn.running_mean.uniform_(-0.2, 0.2)
                bn.running_var.uniform_(0.5, 1.5)
        variables["batch_stats"] = {}
        for name, bn in (("bn1", tm.bn1), ("bn2", tm.bn2)):
            params[name] = {"scale": _np(bn.weight), "bias": _np(bn.bias)}
            variables["batch_stats"][name] = {"mean": _np(bn.running_mean), "var": _np(bn.running_var)}
    model = Model("tiny", JaxTinyCNN(C, use_bn, act), C, (H, W, 3), {})
    return tm, model, variables


def make_data(seed=0, n=N):
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(n, H, W, 3)).astype(np.float32)
    y = rng.integers(0, C, size=n).astype(np.int32)
    targets = rng.normal(size=(n, C, H, W, 3)).astype(np.float32)
    return x, y, targets


def to_nchw(a):
    return torch.tensor(np.moveaxis(np.asarray(a), -1, -3).copy())


def torch_grads(tm, use_bn):
    names = [("conv1", "kernel", tm.conv1.weight, (2, 3, 1, 0)), ("conv1", "bias", tm.conv1.bias, None),
             ("conv2", "kernel", tm.conv2.weight, (2, 3, 1, 0)), ("conv2", "bias", tm.conv2.bias, None),
             ("head", "kernel", tm.head.weight, "T"), ("head", "bias", tm.head.bias, None)]
    if use_bn:
        names += [(b, k, getattr(getattr(tm, b), w), None) for b in ("bn1", "bn2")
                  for k, w in (("scale", "weight"), ("bias", "bias"))]
    out = {}
    for mod, leaf, p, perm in names:
        g = p.grad
        g = g.T if perm == "T" else (g.permute(*perm) if perm else g)
        out[(mod, leaf)] = _np(g)
    return out


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def run_torch(tm, x, y, targets, classes, pag_coeff, aug_ce=None, aug_pag=None, train=True):
    tm.zero_grad()
    tm.train(train)
    loss, parts = tref.official_pag_loss(tm, to_nchw(x), to_nchw(targets), torch.tensor(y, dtype=torch.long),
                                         torch.tensor(np.asarray(classes), dtype=torch.long), pag_coeff,
                                         aug_ce, aug_pag)
    loss.backward()
    return float(loss.detach()), parts


def run_jax(model, variables, x, y, targets, cfg, classes=None, key=None, augment=None, x_ce=None,
            train=True):
    def loss(params, state):
        v = {"params": params}

        def apply_fn(st, images):
            if train:
                return model.apply_train({**v, **st}, images)
            return model.apply({**v, **st}, images), st

        return P.pag_loss(apply_fn, state, jnp.asarray(x), jnp.asarray(y), jnp.asarray(targets), cfg,
                          key=key, classes=classes, augment=augment, x_ce=x_ce)

    state = {k: v for k, v in variables.items() if k != "params"}
    (value, (new_state, metrics)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        variables["params"], state)
    return float(value), grads, new_state, metrics


def assert_same_grads(jax_grads, t_grads, tol=1e-5):
    """Relative error per parameter; a leaf whose true gradient vanishes (a conv bias before
    BatchNorm: rounding noise only) is measured against 1% of the whole gradient's norm."""
    total = np.sqrt(sum(np.sum(np.square(g.astype(np.float64))) for g in t_grads.values()))
    for (mod, leaf), g in t_grads.items():
        diff = np.linalg.norm(np.asarray(jax_grads[mod][leaf], np.float64) - g)
        rel = diff / max(np.linalg.norm(g), 1e-2 * total)
        assert rel < tol, (mod, leaf, rel)


# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("semantics", ["shared", "replicated"])
@pytest.mark.parametrize("k", [C, 3])
def test_matches_official_without_batchnorm(semantics, k):
    """No batch coupling: both semantics equal the official replicated loss (value and gradient),
    with a fixed crop+flip applied inside the differentiated function."""
    tm, model, variables = make_pair(use_bn=False, act="tanh")
    x, y, targets = make_data(1)
    classes = P.select_classes(jax.random.PRNGKey(3), N, C, k)
    top, left, flip = 1, 3, True  # one draw for the whole batch, as torchvision on a 4-D tensor
    aug_t = lambda t: tref.crop_flip(t, top, left, flip, padding=2, fill=0.5)  # noqa: E731
    augment = lambda key, im: P.crop_flip(im, (top, left), flip, padding=2, fill=0.5)  # noqa: E731
    t_val, _ = run_torch(tm, x, y, targets, classes, 1.5, aug_t, aug_t)
    cfg = P.PAGConfig.official(1.5, num_targets=k)
    cfg = dataclasses.replace(cfg, semantics=semantics)
    j_val, grads, _, metrics = run_jax(model, variables, x, y, targets, cfg, classes=classes,
                                       key=jax.random.PRNGKey(0), augment=augment)
    assert abs(j_val - t_val) / abs(t_val) < 1e-5, (j_val, t_val)
    assert_same_grads(grads, torch_grads(tm, False))
    assert float(metrics["alignment"]) > 0.5  # a non-trivial term


def test_batchnorm_replicated_is_official_shared_differs_only_through_bn():
    tm, model, variables = make_pair(use_bn=True, act="relu", seed=1)
    x, y, targets = make_data(2)
    classes = np.tile(np.arange(C), (N, 1))
    x_ce = np.asarray(P.crop_flip(jnp.asarray(x), (2, 0), True, padding=2, fill=0.5))
    aug_ce = lambda t: tref.crop_flip(t, 2, 0, True, padding=2, fill=0.5)  # noqa: E731
    aug_pag = lambda t: tref.crop_flip(t, 1, 3, False, padding=2, fill=0.5)  # noqa: E731
    augment = lambda key, im: P.crop_flip(im, (1, 3), False, padding=2, fill=0.5)  # noqa: E731
    t_val, _ = run_torch(tm, x, y, targets, classes, 1.5, aug_ce, aug_pag)
    t_mean = {"bn1": _np(tm.bn1.running_mean), "bn2": _np(tm.bn2.running_mean)}
    cfg = P.PAGConfig.official(1.5, num_targets=C)
    j_val, grads, new_state, _ = run_jax(model, variables, x, y, targets, cfg, key=jax.random.PRNGKey(0),
                                         augment=augment, x_ce=jnp.asarray(x_ce))
    assert abs(j_val - t_val) / abs(t_val) < 1e-5, (j_val, t_val)
    assert_same_grads(grads, torch_grads(tm, True))
    for name in ("bn1", "bn2"):  # running means updated twice, as the official step does
        m0 = variables["batch_stats"][name]["mean"]
        assert _rel(new_state["batch_stats"][name]["mean"], t_mean[name]) < 1e-5
        assert _rel(new_state["batch_stats"][name]["mean"], m0) > 1e-3

    # The shared forward pass differs from the official semantics under training-mode BatchNorm...
    shared = dataclasses.replace(cfg, semantics="shared")
    s_val, _, s_state, _ = run_jax(model, variables, x, y, targets, shared, key=jax.random.PRNGKey(0),
                                   augment=augment)
    ta_val, _ = run_torch(tm, x, y, targets, classes, 1.5, aug_pag, aug_pag)  # same augmentation for CE
    assert abs(s_val - ta_val) / abs(ta_val) > 1e-4
    # ... and only through BatchNorm: with BatchNorm on fixed statistics (inference mode) it equals the
    # official loss (torch in eval mode), and the two JAX semantics coincide.
    tm2, model2, variables2 = make_pair(use_bn=True, act="relu", seed=1)
    te_val, _ = run_torch(tm2, x, y, targets, classes, 1.5, aug_pag, aug_pag, train=False)
    e_val, e_grads, _, _ = run_jax(model2, variables2, x, y, targets, shared, key=jax.random.PRNGKey(0),
                                   augment=augment, train=False)
    r_val, r_grads, _, _ = run_jax(model2, variables2, x, y, targets, cfg, key=jax.random.PRNGKey(0),
                                   augment=augment, train=False)
    assert abs(e_val - te_val) / abs(te_val) < 1e-5
    assert abs(r_val - e_val) / abs(e_val) < 1e-5
    assert_same_grads(e_grads, torch_grads(tm2, True))
    # the shared step updates the running statistics once
    m0 = variables["batch_stats"]["bn1"]["mean"]
    assert not np.allclose(s_state["batch_stats"]["bn1"]["mean"], new_state["batch_stats"]["bn1"]["mean"])
    assert not np.allclose(s_state["batch_stats"]["bn1"]["mean"], m0)


def test_zero_target_is_finite_and_matches_official():
    """A zero target (OI: the representative image itself) gives cos 0 and finite gradients."""
    tm, model, variables = make_pair(act="tanh", seed=2)
    x, y, targets = make_data(3)
    targets[0, y[0]] = 0.0
    targets[1] = 0.0
    classes = np.tile(np.arange(C), (N, 1))
    t_val, parts = run_torch(tm, x, y, targets, classes, 2.0)
    j_val, grads, _, _ = run_jax(model, variables, x, y, targets, P.PAGConfig.official(2.0, C))
    assert np.isfinite(j_val) and abs(j_val - t_val) / abs(t_val) < 1e-5
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
    assert_same_grads(grads, torch_grads(tm, False))
    assert float(parts["cos"][0 * C + y[0]].detach()) == 0.0


def test_cosine_eps_matches_torch_value_and_gradient():
    rng = np.random.default_rng(0)
    b = rng.normal(size=(6, 10)).astype(np.float32)
    a = rng.normal(size=(6, 10)).astype(np.float32)
    a[1] = 0.0                      # zero vector
    a[2] *= 1e-10                   # norm below eps
    b[3] = 0.0
    a[4], b[4] = 0.0, 0.0
    a[5] *= 1e-3
    ta, tb = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)
    tc = torch.nn.CosineSimilarity(dim=1)(ta, tb)
    w = rng.normal(size=6).astype(np.float32)
    (tc * torch.tensor(w)).sum().backward()
    jc = P.cosine_similarity(jnp.asarray(a), jnp.asarray(b))
    np.testing.assert_allclose(np.asarray(jc), _np(tc), rtol=1e-5, atol=1e-7)
    assert float(jc[1]) == float(jc[3]) == float(jc[4]) == 0.0
    ga, gb = jax.grad(lambda u, v: jnp.sum(P.cosine_similarity(u, v) * w), argnums=(0, 1))(a, b)
    for ours, theirs in ((ga, ta.grad), (gb, tb.grad)):
        assert np.all(np.isfinite(np.asarray(ours)))
        for i in range(6):
            assert _rel(ours[i], _np(theirs[i])) < 1e-5 or np.abs(_np(theirs[i])).max() == 0, i
    # an eps of 1e-8 on each norm, not on the product: ||a|| = 1e-5, ||b|| = 1e-5 still gives 1
    tiny = np.full((1, 4), 5e-6, np.float32)
    assert abs(float(P.cosine_similarity(tiny, tiny)[0]) - 1.0) < 1e-6


def test_reductions_and_official_weight():
    rng = np.random.default_rng(4)
    cos = jnp.asarray(rng.uniform(-1, 1, size=(7, C)).astype(np.float32))
    mean_term = float(P.alignment_term(cos, "mean"))
    sum_term = float(P.alignment_term(cos, "sum", C))
    brute = sum(1.0 - np.mean(np.asarray(cos)[:, c]) for c in range(C))  # the paper's sum over classes
    assert abs(mean_term - (1 - np.mean(np.asarray(cos)))) < 1e-6
    assert abs(sum_term - brute) < 1e-5
    assert abs(sum_term - C * mean_term) < 1e-5
    # the official weight 10 * pag_coeff on the mean term is the paper's lambda = pag_coeff when C = 10
    cos10 = jnp.asarray(rng.uniform(-1, 1, size=(7, 10)).astype(np.float32))
    off = P.PAGConfig.official(1.5)
    paper = P.PAGConfig.paper(1.5)
    assert abs(off.weight * float(P.alignment_term(cos10, off.reduction, 10))
               - paper.weight * float(P.alignment_term(cos10, paper.reduction, 10))) < 1e-5
    with pytest.raises(ConfigError):
        P.PAGConfig(reduction="max")
    with pytest.raises(ConfigError):
        P.PAGConfig(num_targets=11).targets_per_image(10)


def test_select_classes_subsets():
    cls = np.asarray(P.select_classes(jax.random.PRNGKey(0), 4000, 10, 3))
    assert cls.shape == (4000, 3) and cls.dtype == np.int32
    assert cls.min() >= 0 and cls.max() < 10
    assert all(len(set(r)) == 3 for r in cls[:500])
    freq = np.bincount(cls.ravel(), minlength=10) / cls.size
    assert np.abs(freq - 0.1).max() < 0.015
    first = np.bincount(cls[:, 0], minlength=10) / len(cls)  # random order too
    assert np.abs(first - 0.1).max() < 0.025
    np.testing.assert_array_equal(P.select_classes(None, 2, 4), [[0, 1, 2, 3]] * 2)
    other = np.asarray(P.select_classes(jax.random.PRNGKey(1), 4000, 10, 3))
    assert (other != cls).any()


def test_subset_sum_mode_and_unit_scale_agree_with_official():
    """K < C with the paper's 'sum' reduction = C x the official mean term; grad_scale 'unit' gives the
    same value (the norms here are far above eps)."""
    tm, model, variables = make_pair(act="tanh", seed=3)
    x, y, targets = make_data(5)
    classes = P.select_classes(jax.random.PRNGKey(7), N, C, 2)
    t_val, parts = run_torch(tm, x, y, targets, classes, 0.7)
    t_ce = float(parts["ce"].detach())
    cfg = P.PAGConfig(weight=0.7 * 10 / C, reduction="sum", num_targets=2, grad_scale="unit")
    j_val, grads, _, metrics = run_jax(model, variables, x, y, targets, cfg, classes=classes)
    assert abs(float(metrics["ce"]) - t_ce) < 1e-5 * abs(t_ce)
    assert abs(j_val - t_val) / abs(t_val) < 1e-5
    assert_same_grads(grads, torch_grads(tm, False))


def test_class_input_gradients_equal_per_class_gradients():
    """The vmapped K-cotangent VJP equals one jax.grad per class (BatchNorm in training mode too)."""
    _, model, variables = make_pair(use_bn=True, act="tanh", seed=4)
    x, _, _ = make_data(6)
    classes = P.select_classes(jax.random.PRNGKey(2), N, C, 3)

    def forward(xi):
        return model.apply_train(variables, xi)

    grads, logits, new_state = jax.jit(lambda xi: P.class_input_gradients(forward, xi, classes, 0.5))(
        jnp.asarray(x))

    @jax.jit
    def per_class(xi):
        def f(v, k):
            lp = jax.nn.log_softmax(forward(v)[0])
            return 0.5 * jnp.sum(lp[jnp.arange(N), classes[:, k]])

        return jnp.stack([jax.grad(f)(xi, k) for k in range(3)], axis=1)

    assert _rel(grads, per_class(jnp.asarray(x))) < 1e-5
    assert logits.shape == (N, C) and "batch_stats" in new_state
    rgrads, rlogits, _ = jax.jit(lambda xi: P.replicated_class_input_gradients(forward, xi, classes, 0.5))(
        jnp.asarray(x))
    assert rgrads.shape == grads.shape and rlogits.shape == (3 * N, C)


def _count(jaxpr, name):
    total = 0
    for eqn in jaxpr.eqns:
        total += eqn.primitive.name == name
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (list, tuple)) else [v]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += _count(inner, name)
    return total


@pytest.mark.parametrize("semantics,passes", [("shared", 1), ("replicated", 2)])
def test_one_forward_pass(semantics, passes):
    _, model, variables = make_pair(act="sin", seed=5)
    x, y, targets = make_data(7)
    calls = []

    def loss(params):
        def apply_fn(st, images):
            calls.append(images.shape)
            return model.apply_train({"params": params}, images)

        cfg = P.PAGConfig(semantics=semantics, num_targets=3)
        return P.pag_loss(apply_fn, {}, jnp.asarray(x), jnp.asarray(y), jnp.asarray(targets), cfg,
                          key=jax.random.PRNGKey(0))[0]

    jaxpr = jax.make_jaxpr(loss)(variables["params"])
    assert len(calls) == passes
    if semantics == "shared":
        assert calls == [(N, H, W, 3)]
    else:
        assert calls == [(N, H, W, 3), (3 * N, H, W, 3)]
    # two sin layers per forward pass; the K input-gradients add no forward computation
    assert _count(jaxpr.jaxpr, "sin") == 2 * passes
    calls.clear()
    jax.make_jaxpr(jax.grad(loss))(variables["params"])
    assert len(calls) == passes


def test_crop_flip_matches_numpy_and_is_linear():
    rng = np.random.default_rng(8)
    x = rng.normal(size=(3, 5, 7, 2)).astype(np.float32)
    offsets = np.array([[0, 0], [4, 2], [1, 3]])
    flips = np.array([False, True, True])
    out = np.asarray(P.crop_flip(jnp.asarray(x), offsets, flips, padding=2, fill=0.25))
    for i in range(3):
        xp = np.pad(x[i], ((2, 2), (2, 2), (0, 0)), constant_values=0.25)
        want = xp[offsets[i, 0]:offsets[i, 0] + 5, offsets[i, 1]:offsets[i, 1] + 7]
        want = want[:, ::-1] if flips[i] else want
        np.testing.assert_array_equal(out[i], want)
        # the same draw through the torch reference (per-batch form)
        t = tref.crop_flip(torch.tensor(np.moveaxis(x[i:i + 1], -1, 1)), offsets[i, 0], offsets[i, 1],
                           bool(flips[i]), padding=2, fill=0.25)
        np.testing.assert_array_equal(np.moveaxis(t.numpy(), 1, -1)[0], want)
    # gradient: 1 on the pixels inside the crop window, 0 on those cropped away
    g = np.asarray(jax.grad(lambda v: jnp.sum(P.crop_flip(v, offsets, flips, 2, 0.25)))(jnp.asarray(x)))
    for i in range(3):
        mask = np.zeros((5 + 4, 7 + 4))
        mask[offsets[i, 0]:offsets[i, 0] + 5, offsets[i, 1]:offsets[i, 1] + 7] = 1
        np.testing.assert_array_equal(g[i, ..., 0], mask[2:-2, 2:-2])
    o, f = P.sample_crop_flip(jax.random.PRNGKey(0), 64, padding=4, per_example=False)
    assert len(np.unique(np.asarray(o), axis=0)) == 1 and len(np.unique(np.asarray(f))) == 1
    o, f = P.sample_crop_flip(jax.random.PRNGKey(0), 256, padding=4)
    assert np.asarray(o).min() == 0 and np.asarray(o).max() == 8 and 0 < np.asarray(f).mean() < 1


def test_bad_arguments():
    x, y, targets = make_data(9)

    def apply_fn(st, images):
        return jnp.zeros((images.shape[0], C)), st

    with pytest.raises(ValueError, match="do not fit"):
        P.pag_loss(apply_fn, {}, x, y, targets[:, :, :3], P.PAGConfig())
    with pytest.raises(ValueError, match="key"):
        P.pag_loss(apply_fn, {}, x, y, targets, P.PAGConfig(num_targets=2))
    with pytest.raises(ValueError, match="x_ce"):
        P.pag_loss(apply_fn, {}, x, y, targets, P.PAGConfig(), x_ce=x)


class _Recording:
    """A model whose training-mode passes record the images they see (``jax.debug.callback``)."""

    def __init__(self, model):
        self.model, self.seen = model, []

    def apply_train(self, variables, images, rng=None):
        jax.debug.callback(lambda a: self.seen.append(np.asarray(a)), images)
        return self.model.apply_train(variables, images, rng=rng)


def _the_one_draw(x, seen, padding):
    """The single (offsets, flip) of crop_flip that maps every image of ``x`` to ``seen``, or None."""
    found = [((i, j), f) for i in range(2 * padding + 1) for j in range(2 * padding + 1) for f in (False, True)
             if np.array_equal(np.asarray(P.crop_flip(jnp.asarray(x), (i, j), f, padding, 0.5)), seen)]
    return found[0] if len(found) == 1 else None


def test_official_semantics_objective_is_the_official_step():
    """The PAG objective with the official semantics (configs/pag_cifar10_*.py:official: objective
    semantics 'replicated', per_example_augment False): the cross-entropy pass sees the batch under ONE
    crop and flip, the alignment pass sees the K-fold replicated batch under ONE other draw, and loss,
    parameter gradient and BatchNorm statistics equal the PyTorch version of the official step given
    those two draws."""
    from advalign_jax.training.config_blocks import objective_block
    from advalign_jax.training.objectives import pag as objective

    tm, model, variables = make_pair(use_bn=True, act="relu", seed=4)
    x, y, targets = make_data(6)
    cfg = objective_block("pag", pag_weight=15.0, reduction="mean", num_targets=0, semantics="replicated",
                          target_source="precomputed", augment_padding=2, augment_fill=0.5,
                          per_example_augment=False)
    batch = {"image": jnp.asarray(x), "label": jnp.asarray(y), "targets": jnp.asarray(targets),
             "index": jnp.arange(N), "step": jnp.int32(0)}
    state = {"batch_stats": variables["batch_stats"]}
    rng = jax.random.PRNGKey(11)
    recording = _Recording(model)
    objective.loss(recording, variables["params"], state, batch, rng, cfg)
    jax.effects_barrier()
    ce_seen, pag_seen = recording.seen
    assert ce_seen.shape == x.shape and pag_seen.shape == (N * C,) + x.shape[1:]
    draw_ce = _the_one_draw(x, ce_seen, 2)
    draw_pag = _the_one_draw(np.repeat(x, C, axis=0), pag_seen, 2)
    assert draw_ce is not None and draw_pag is not None and draw_ce != draw_pag

    def aug(draw):
        (top, left), flip = draw
        return lambda t: tref.crop_flip(t, top, left, flip, padding=2, fill=0.5)

    t_val, _ = run_torch(tm, x, y, targets, np.tile(np.arange(C), (N, 1)), 1.5, aug(draw_ce), aug(draw_pag))

    def loss(params):
        return objective.loss(model, params, state, batch, rng, cfg)

    (j_val, (new_state, _)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    assert abs(float(j_val) - t_val) / abs(t_val) < 1e-5, (float(j_val), t_val)
    assert_same_grads(grads, torch_grads(tm, True))
    for name in ("bn1", "bn2"):  # running means updated by both passes, as the official step does
        m0 = variables["batch_stats"][name]["mean"]
        assert _rel(new_state["batch_stats"][name]["mean"], _np(getattr(tm, name).running_mean)) < 1e-5
        assert _rel(new_state["batch_stats"][name]["mean"], m0) > 1e-3
    # ours (the default): one pass, one draw per image, shared by both terms
    ours = objective_block("pag", pag_weight=15.0, num_targets=0, target_source="precomputed", augment_padding=2,
                           augment_fill=0.5)
    recording = _Recording(model)
    objective.loss(recording, variables["params"], state, batch, rng, ours)
    jax.effects_barrier()
    assert len(recording.seen) == 1 and _the_one_draw(x, recording.seen[0], 2) is None


# ----------------------------------------------------------------------------------------------------
# The two orders of differentiation (PAGConfig.differentiation) give the same loss and gradient
# ----------------------------------------------------------------------------------------------------


# XLA:CPU's cheapest compilation: these checks run each program once, so compiling dominates.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


class _Float64Model:
    """A registry model applied in float64 end to end (``Model.apply_train`` returns float32 logits)."""

    def __init__(self, model):
        self.model, self.num_classes = model, model.num_classes

    def apply_train(self, variables, images, rng=None):
        logits, state = self.model.module.apply(variables, images, train=True, mutable=["batch_stats"])
        return logits, dict(state)


@functools.lru_cache(maxsize=1)
def _tiny_resnet():
    """A one-block-per-stage CIFAR ResNet (training-mode BatchNorm) computing in float64, 8x8 inputs, C
    classes; its variables (non-trivial running statistics) and a batch, as float64 NumPy arrays."""
    from advalign_jax.models.registry import get_model

    model = get_model("cifar_resnet18", num_classes=C, stage_sizes=(1, 1), widths=(4, 8), input_size=8,
                      dtype="float64")
    init = jax.jit(lambda key: model.module.init(key, jnp.zeros((1, 8, 8, 3)), train=False),
                   compiler_options=FAST_COMPILE)
    variables = jax.tree.map(lambda a: np.asarray(a, np.float64), dict(init(jax.random.PRNGKey(0))))
    rng = np.random.default_rng(12)
    variables["batch_stats"] = jax.tree.map(lambda a: rng.uniform(0.5, 1.5, a.shape), variables["batch_stats"])
    x = rng.uniform(size=(N, 8, 8, 3))
    y = rng.integers(0, C, size=N).astype(np.int32)
    targets = rng.normal(size=(N, C, 8, 8, 3))
    return model, variables, x, y, targets


def _tiny_resnet_f64():
    """:func:`_tiny_resnet` as float64 JAX arrays (call under ``jax.enable_x64``)."""
    model, variables, x, y, targets = _tiny_resnet()
    variables, x, targets = jax.tree.map(jnp.asarray, (variables, x, targets))
    return _Float64Model(model), variables, x, jnp.asarray(y), targets


def _assert_orders_agree(run, tol=1e-10):
    """``run(order) -> (value, grads, new_state, metrics)``: the two orders agree to ``tol`` relative
    (per parameter leaf; a leaf whose gradient vanishes, such as a conv bias before BatchNorm, against
    1e-3 of the whole gradient's norm)."""
    (va, ga, sa, ma), (vb, gb, sb, mb) = (jax.tree.map(np.asarray, run(order)) for order in P.DIFFERENTIATIONS)
    assert abs(float(va) - float(vb)) <= tol * abs(float(va)), (float(va), float(vb))
    assert abs(float(ma["loss"]) - float(va)) <= tol * abs(float(va))  # the value: CE + weight * align
    la, lb = jax.tree.leaves(ga), jax.tree.leaves(gb)
    assert len(la) == len(lb) and all(a.dtype == np.float64 for a in la)
    total = np.sqrt(sum(np.sum(np.square(a)) for a in la))
    assert total > 0
    for a, b in zip(la, lb):
        rel = np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-3 * total)
        assert rel < tol, rel
    for a, b in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
        assert _rel(b, a) < tol
    return ma


@pytest.mark.parametrize("semantics,k,augmented", [("shared", 3, True), ("replicated", 3, True),
                                                   ("shared", C, False)])
def test_reverse_over_forward_equals_reverse_over_reverse(semantics, k, augmented):
    """float64, training-mode BatchNorm: loss, full parameter gradient and new BatchNorm state of the
    two orders of differentiation agree to 1e-10, for both semantics, with a K-subset of the classes
    and an augmentation inside the loss."""
    with jax.enable_x64(True):
        model, variables, x, y, targets = _tiny_resnet_f64()
        state = {"batch_stats": variables["batch_stats"]}
        augment = P.make_crop_flip(2, fill=0.5) if augmented else None

        def run(order):
            cfg = P.PAGConfig(weight=15.0, num_targets=k, semantics=semantics, differentiation=order)

            def loss(params):
                apply_fn = lambda st, im: model.apply_train({"params": params, **st}, im)  # noqa: E731
                return P.pag_loss(apply_fn, state, x, y, targets, cfg, key=jax.random.PRNGKey(4),
                                  augment=augment)

            (value, (new_state, metrics)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True),
                                                           compiler_options=FAST_COMPILE)(variables["params"])
            return value, grads, new_state, metrics

        metrics = _assert_orders_agree(run)
        assert float(metrics["alignment"]) > 0.5  # a non-trivial term


def test_objective_orders_agree_with_a_warm_weight():
    """The PAG objective reads ``differentiation`` from its config block; with a warm-up weight (a traced
    value) both orders still give the same loss and gradient."""
    from advalign_jax.training.config_blocks import objective_block
    from advalign_jax.training.objectives import pag as objective

    assert objective_block("pag").differentiation == "auto"  # PAG's 'auto' is the faster measured order
    assert objective.pag_config(objective_block("pag")).differentiation == objective.AUTO_DIFFERENTIATION
    with jax.enable_x64(True):
        model, variables, x, y, targets = _tiny_resnet_f64()
        state = {"batch_stats": variables["batch_stats"]}
        batch = {"image": x, "label": y, "targets": targets, "index": jnp.arange(N), "step": jnp.int32(0)}

        def run(order):
            cfg = objective_block("pag", pag_weight=15.0, num_targets=2, target_source="precomputed",
                                  warm_steps=5, warm_weight=4.0, augment_padding=2, differentiation=order)
            assert objective.pag_config(cfg).differentiation == order

            def loss(params):
                return objective.loss(model, params, state, batch, jax.random.PRNGKey(2), cfg)

            (value, (new_state, metrics)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True),
                                                           compiler_options=FAST_COMPILE)(variables["params"])
            return value, grads, new_state, metrics

        metrics = _assert_orders_agree(run)
        assert float(metrics["pag_weight"]) == 4.0
    with pytest.raises(ConfigError, match="differentiation"):
        objective.pag_config(objective_block("pag", differentiation="forward"))

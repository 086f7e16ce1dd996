"""PAG target sources (advalign_jax.losses.pag_targets) against brute-force NumPy, file round trips in
every layout and format, the bad-input errors, and the score-based builder against class-conditional
Gaussians whose scores are known in closed form."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advalign_jax.errors import DataError
from advalign_jax.losses import pag_targets as T
from advalign_jax.data import target_files as F


def _data(n=30, shape=(4, 4, 3), c=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(n,) + shape).astype(np.float32)
    y = (np.arange(n) % c).astype(np.int32)
    rng.shuffle(y)
    return x, y


# ---------------------------------------------------------------------------------------------------- OI, CM


def test_one_image_and_class_mean_match_numpy():
    x, y = _data()
    reps, idx = T.one_image_representatives(x, y, 3)
    for c in range(3):
        first = [i for i in range(len(y)) if y[i] == c][0]
        assert idx[c] == first
        np.testing.assert_array_equal(reps[c], x[first])
    reps2, idx2 = T.one_image_representatives(x, y, 3, seed=5)
    assert all(y[idx2[c]] == c for c in range(3))
    g = np.asarray(T.representative_targets(jnp.asarray(x), jnp.asarray(reps)))
    for n in range(len(x)):
        for c in range(3):
            np.testing.assert_allclose(g[n, c], reps[c] - x[n], atol=1e-7)
    assert np.abs(g[idx[1], 1]).max() == 0.0  # OI: the representative's own target is zero

    cm = T.class_mean_representatives(x, y, 3)
    for c in range(3):
        members = x[y == c].astype(np.float64) - 0.5
        m = members.mean(0)
        s = np.mean([np.linalg.norm(v) for v in members]) / np.linalg.norm(m)
        np.testing.assert_allclose(cm[c], 0.5 + s * m, rtol=1e-5, atol=1e-6)
        assert abs(np.linalg.norm(cm[c] - 0.5) - np.mean([np.linalg.norm(v) for v in members])) < 1e-4
    plain = T.class_mean_representatives(x, y, 3, scale=1.0)
    np.testing.assert_allclose(plain[2], x[y == 2].mean(0), rtol=1e-6)
    twice = T.class_mean_representatives(x, y, 3, scale=2.0, center=0.0)
    np.testing.assert_allclose(twice[0], 2 * x[y == 0].mean(0), rtol=1e-6)
    with pytest.raises(DataError, match="class 3 has no image"):
        T.one_image_representatives(x, y, 4)


# ---------------------------------------------------------------------------------------------------- NN


def brute_nn(q, q_ids, bank, bank_ids):
    """For each query and class: the first bank entry of least exact squared distance (float64),
    skipping padding and the query itself."""
    n, c = len(q), bank.shape[0]
    out_ids = np.full((n, c), -1)
    targets = np.zeros((n, c) + q.shape[1:], np.float32)
    for i in range(n):
        for k in range(c):
            best, best_j = np.inf, -1
            for j in range(bank.shape[1]):
                if bank_ids[k, j] < 0 or bank_ids[k, j] == q_ids[i]:
                    continue
                d = np.sum((q[i].astype(np.float64) - bank[k, j]) ** 2)
                if d < best:
                    best, best_j = d, j
            if best_j >= 0:
                out_ids[i, k] = bank_ids[k, best_j]
                targets[i, k] = bank[k, best_j] - q[i]
    return targets, out_ids


@pytest.mark.parametrize("chunk", [1, 3, 5, 64])
def test_nearest_neighbour_matches_brute_force(chunk):
    x, y = _data(n=23, seed=1)
    bank, bank_ids = T.nearest_neighbour_bank(x, y, 3)  # classes of 7, 8, 8 entries: padding included
    assert (bank_ids == -1).sum() == 3 * bank_ids.shape[1] - 23
    q_ids = np.arange(len(x)).astype(np.int32)
    t, ids, d = T.nearest_neighbour(jnp.asarray(x), jnp.asarray(q_ids), jnp.asarray(bank),
                                    jnp.asarray(bank_ids), chunk_size=chunk)
    want_t, want_ids = brute_nn(x, q_ids, bank, bank_ids)
    np.testing.assert_array_equal(np.asarray(ids), want_ids)
    np.testing.assert_allclose(np.asarray(t), want_t, atol=1e-6)
    assert all(ids[i, y[i]] != i for i in range(len(x)))  # self excluded
    np.testing.assert_allclose(np.asarray(d), np.sum(want_t.reshape(23, 3, -1) ** 2, -1), rtol=1e-4)


def test_nearest_neighbour_ties_go_to_the_first_entry_and_empty_classes():
    rng = np.random.default_rng(2)
    q = rng.uniform(size=(4, 6)).astype(np.float32)
    base = rng.uniform(size=(7, 6)).astype(np.float32) + 3.0  # far from the queries
    bank = np.stack([base, base.copy()])
    # class 0: the nearest image appears three times (positions 2, 5, 6) across chunk boundaries
    near = q[0] + 0.01
    for j in (2, 5, 6):
        bank[0, j] = near
    ids = np.arange(14, dtype=np.int32).reshape(2, 7) + 100
    ids[1, :] = -1  # class 1 has no admissible entry
    for chunk in (1, 2, 3, 4, 7):
        t, got, d = T.nearest_neighbour(jnp.asarray(q), jnp.asarray(np.arange(4, dtype=np.int32)),
                                        jnp.asarray(bank), jnp.asarray(ids), chunk_size=chunk)
        assert int(got[0, 0]) == 102, chunk
        assert (np.asarray(got[:, 1]) == -1).all() and np.isinf(np.asarray(d[:, 1])).all()
        assert np.abs(np.asarray(t[:, 1])).max() == 0.0
    _, want = brute_nn(q, np.arange(4), bank, ids)
    np.testing.assert_array_equal(np.asarray(got), want)
    # excluding x itself when x is its own exact duplicate's twin: the twin is found, not x
    bank2 = np.stack([np.concatenate([q[:1], q[:1], base[:2]])])
    ids2 = np.array([[0, 1, 2, 3]], np.int32)
    _, got2, d2 = T.nearest_neighbour(jnp.asarray(q[:1]), jnp.asarray([0]), jnp.asarray(bank2),
                                      jnp.asarray(ids2), chunk_size=3)
    assert int(got2[0, 0]) == 1 and float(d2[0, 0]) < 1e-6


def test_nearest_neighbour_dataset_and_sample_sets():
    x, y = _data(n=40, shape=(2,), seed=3)
    x = x * 100.0  # toy-like scale: the distances must stay exact enough about the bank's centre
    t, ids = T.nearest_neighbour_targets_dataset(x, y, 3, chunk_size=4, query_batch=16)
    bank, bank_ids = T.nearest_neighbour_bank(x, y, 3)
    want_t, want_ids = brute_nn(x, np.arange(40), bank, bank_ids)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(t, want_t, atol=1e-4)
    sb, sid = T.nearest_neighbour_bank(x, y, 3, sample_size=5, seed=1)
    assert sb.shape[:2] == (3, 5) and (sid >= 0).all()
    for c in range(3):
        assert (y[sid[c]] == c).all() and (np.diff(sid[c]) > 0).all()
        np.testing.assert_array_equal(sb[c], x[sid[c]])


# ---------------------------------------------------------------------------------------------------- SBG


def test_score_based_targets_on_gaussian_classes():
    """p(x | y) = N(mu_y, s^2 I) with prior pi: at noise level abar, x_t | y ~ N(sqrt(abar) mu_y, v I),
    v = abar s^2 + 1 - abar, and grad log p(y | x_t) = (m_y - sum_j w_j m_j) / v with m = sqrt(abar) mu
    and w the posterior at x_t. The eps-models below are exact (scores by autodiff of the densities)."""
    rng = np.random.default_rng(4)
    c, d, s, abar = 4, 5, 0.7, 0.6
    mu = rng.normal(size=(c, d)).astype(np.float32) * 2
    prior = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    v = abar * s * s + 1 - abar
    m = math.sqrt(abar) * mu

    mj = jnp.asarray(m)

    def log_cond(xt, y):
        return -jnp.sum((xt - mj[y]) ** 2) / (2 * v)

    def log_marg(xt):
        return jax.scipy.special.logsumexp(jnp.log(prior) - jnp.sum((xt[None] - mj) ** 2, -1) / (2 * v))

    def eps_cond(xt, t, y):
        assert t.shape == (xt.shape[0],)
        return -math.sqrt(1 - abar) * jax.vmap(jax.grad(log_cond))(xt, y)

    def eps_uncond(xt, t):
        return -math.sqrt(1 - abar) * jax.vmap(jax.grad(log_marg))(xt)

    x = rng.normal(size=(6, d)).astype(np.float32)
    noise = rng.normal(size=(6, d)).astype(np.float32)
    xt = math.sqrt(abar) * x + math.sqrt(1 - abar) * noise
    logits = np.log(prior) - ((xt[:, None] - m[None]) ** 2).sum(-1) / (2 * v)
    w = np.exp(logits - logits.max(1, keepdims=True))
    w /= w.sum(1, keepdims=True)
    want = (m[None] - (w @ m)[:, None]) / v  # (N, C, D)
    for per_call in (None, 3, 1):
        g = T.score_based_targets(jnp.asarray(x), eps_cond, eps_uncond, abar, c, t=250, noise=noise,
                                  classes_per_call=per_call)
        np.testing.assert_allclose(np.asarray(g), want, rtol=1e-4, atol=1e-5)
    # several draws are averaged; a key draws them
    noise2 = rng.normal(size=(3, 6, d)).astype(np.float32)
    g2 = T.score_based_targets(x, eps_cond, eps_uncond, abar, c, t=1, noise=noise2)
    singles = [T.score_based_targets(x, eps_cond, eps_uncond, abar, c, t=1, noise=z) for z in noise2]
    np.testing.assert_allclose(np.asarray(g2), np.mean(singles, axis=0), rtol=1e-5, atol=1e-6)
    g3 = T.score_based_targets(x, eps_cond, eps_uncond, abar, c, t=1, key=jax.random.PRNGKey(0),
                               num_samples=2)
    assert g3.shape == (6, c, d) and np.isfinite(np.asarray(g3)).all()


# ---------------------------------------------------------------------------------------------------- files


def _set(n=5, c=3, shape=(4, 4, 3), seed=5):
    rng = np.random.default_rng(seed)
    return (rng.uniform(size=(n,) + shape).astype(np.float32),
            rng.normal(size=(n, c) + shape).astype(np.float32), rng.integers(0, c, n).astype(np.int32))


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("ext", [".npy", ".npz"])
def test_array_file_round_trips(tmp_path, layout, ext):
    images, targets, labels = _set()
    path = str(tmp_path / f"t{ext}")
    F.save_targets(path, images, targets, labels if ext == ".npz" else None, layout=layout)
    raw = np.load(path) if ext == ".npy" else np.load(path)["data"]
    assert raw.shape == ((5, 4, 4, 4, 3) if layout == "nhwc" else (5, 4, 3, 4, 4))
    np.testing.assert_array_equal(raw[:, 0], images if layout == "nhwc" else np.moveaxis(images, -1, 1))
    got = F.load_targets(path, num_classes=3, image_shape=(4, 4, 3), labels=labels if ext == ".npy" else None)
    np.testing.assert_array_equal(got.images, images)
    np.testing.assert_array_equal(got.targets, targets)
    np.testing.assert_array_equal(got.labels, labels)
    assert got.num_classes == 3
    explicit = F.load_targets(path, layout=layout)
    np.testing.assert_array_equal(explicit.targets, targets)


def test_official_layout_and_torch_file(tmp_path):
    torch = pytest.importorskip("torch")
    images, targets, labels = _set(n=4, c=10, shape=(32, 32, 3))
    stacked = F.stack_targets(images, targets, "nchw")
    assert stacked.shape == (4, 11, 3, 32, 32)  # the official SBG files
    torch.save(torch.tensor(stacked), tmp_path / "c10_sbg_data.pt")
    torch.save(torch.tensor(labels), tmp_path / "c10_sbg_label.pt")
    got = F.load_targets(str(tmp_path / "c10_sbg_data.pt"), num_classes=10,
                         labels_path=str(tmp_path / "c10_sbg_label.pt"))
    np.testing.assert_array_equal(got.targets, targets)
    np.testing.assert_array_equal(got.labels, labels)
    np.testing.assert_allclose(F.rescale_images(2 * images - 1), images, atol=1e-6)


def test_points_layout(tmp_path):
    x = np.random.default_rng(0).normal(size=(7, 2)).astype(np.float32)
    y = np.arange(7) % 2
    g, _ = T.nearest_neighbour_targets_dataset(x, y, 2, chunk_size=2, query_batch=4)
    F.save_targets(str(tmp_path / "toy.npz"), x, g, y)
    got = F.load_targets(str(tmp_path / "toy.npz"), num_classes=2, image_shape=(2,))
    np.testing.assert_array_equal(got.targets, g)


def test_tfrecord_round_trip(tmp_path):
    images, targets, labels = _set(n=7)
    paths = F.write_target_records(str(tmp_path), "pag", images, targets, labels, num_shards=3)
    assert len(paths) == 3
    got = F.read_target_records(paths, num_classes=3, image_shape=(4, 4, 3))
    np.testing.assert_array_equal(got.images, images)
    np.testing.assert_array_equal(got.targets, targets)
    np.testing.assert_array_equal(got.labels, labels)
    batches = list(F.iter_target_records(paths, batch_size=3))
    assert [len(b["index"]) for b in batches] == [3, 3, 1]
    nolab = F.write_target_records(str(tmp_path / "b"), "pag", images, targets)
    assert F.read_target_records(nolab).labels is None
    with pytest.raises(DataError, match="already exists"):
        F.write_target_records(str(tmp_path), "pag", images, targets, labels, num_shards=3)


def test_bad_inputs_give_one_line_errors(tmp_path):
    images, targets, labels = _set()
    stacked = F.stack_targets(images, targets)
    with pytest.raises(DataError, match=r"holds 3 target gradients per image but the data has 10 classes"):
        F.split_stacked(stacked, num_classes=10, source="f.npy")
    with pytest.raises(DataError, match=r"images of shape \(4, 4, 3\).*\(32, 32, 3\)"):
        F.split_stacked(stacked, image_shape=(32, 32, 3), source="f.npy")
    with pytest.raises(DataError, match="expected an array of shape"):
        F.split_stacked(stacked[:, 0], source="f.npy")
    with pytest.raises(DataError, match="5 images but 4 labels"):
        F.split_stacked(stacked, labels=labels[:4], source="f.npy")
    with pytest.raises(DataError, match="cannot tell NCHW from NHWC"):
        F.split_stacked(np.zeros((2, 3, 3, 5, 3), np.float32), source="f.npy")
    bad = stacked.copy()
    bad[3, 2, 1, 1, 0] = np.nan
    path = str(tmp_path / "bad.npy")
    np.save(path, bad)
    with pytest.raises(DataError) as err:
        F.load_targets(path)
    msg = str(err.value)
    assert msg == f"{path}: the target gradient of image 3 for class 1 holds non-finite values"
    assert "\n" not in msg
    bad = stacked.copy()
    bad[1, 0, 0, 0, 0] = np.inf
    with pytest.raises(DataError, match="image 1 holds non-finite"):
        F.split_stacked(bad, source="f.npy")
    # TFRecords: a non-finite target names the file and the record; a wrong class count too
    bad_t = targets.copy()
    bad_t[4, 0, 0, 0, 0] = np.inf
    paths = F.write_target_records(str(tmp_path / "r"), "bad", images, bad_t, labels)
    with pytest.raises(DataError, match=r"bad-0.tfrecords: record 4 \(image 4\): the target gradient "
                                        r"for class 0"):
        F.read_target_records(paths)
    paths = F.write_target_records(str(tmp_path / "r2"), "ok", images, targets, labels)
    with pytest.raises(DataError, match=r"ok-0.tfrecords: record 0: holds 3 target gradients per image "
                                        r"but the data has 10 classes"):
        F.read_target_records(paths, num_classes=10)
    with pytest.raises(DataError, match="no such file"):
        F.load_targets(str(tmp_path / "missing.npy"))
    with pytest.raises(DataError, match="do not fit"):
        F.write_target_records(str(tmp_path / "r3"), "x", images, targets[:, :, :2])


@pytest.mark.parametrize("kind", ["npz", "npy", "tfrecords"])
def test_a_truncated_target_file_is_one_line(tmp_path, kind):
    """A target file cut short (a copy interrupted, a full disk) is named in one line that says what
    to do, with no library text."""
    rng = np.random.default_rng(0)
    x = rng.random((6, 4, 4, 3)).astype(np.float32)
    t = rng.normal(size=(6, 3, 4, 4, 3)).astype(np.float32)
    if kind == "tfrecords":
        path = F.write_target_records(str(tmp_path), "t", x, t)[0]
    else:
        path = F.save_targets(str(tmp_path / f"t.{kind}"), x, t)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:int(len(data) * 0.6)])
    with pytest.raises(DataError) as err:
        if kind == "tfrecords":
            F.read_target_records([path])
        else:
            F.load_targets(path)
    message = str(err.value)
    assert message.count("\n") == 0 and path in message, message
    assert "cut short" in message and "Op:" not in message and "[" not in message, message

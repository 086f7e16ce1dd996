"""The neural-site readout (advalign_jax.evaluation.sensitivity.readout) against sklearn's own estimators
and an independent loop written here (split indices from sklearn's ShuffleSplit, Pearson r by the
formula, medians and means in NumPy), cases with known answers, the recordings reader, and every bad
input's one-line error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps
from sklearn.cross_decomposition import PLSRegression
from sklearn.linear_model import Ridge
from sklearn.model_selection import ShuffleSplit

from advalign_jax.data.tf_env import import_tf
from advalign_jax.errors import ConfigError, DataError
from advalign_jax.evaluation.sensitivity.readout import Readout, fit_readout, load_recordings

WHERE = "V4 readout"


def _data(n=40, d=6, s=4, noise=0.5, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = x @ rng.normal(size=(d, s)) + noise * rng.normal(size=(n, s)) + rng.normal(size=s) * 3
    return x, y


def _sklearn(method, n_components, alpha):
    return PLSRegression(n_components=n_components, scale=False) if method == "pls" else Ridge(alpha=alpha)


@pytest.mark.parametrize("method", ["pls", "ridge"])
def test_apply_equals_sklearn_predict_on_all_images(method):
    x, y = _data()
    readout = fit_readout(x, y, method=method, n_components=3, alpha=2.0)
    assert isinstance(readout, Readout) and readout.method == method
    assert readout.weights.shape == (6, 4) and readout.bias.shape == (4,) and readout.weights.dtype == np.float64
    reference = _sklearn(method, 3, 2.0).fit(x, y)
    x_new = np.random.default_rng(9).normal(size=(7, 6)) * 2
    for feats in (x, x_new):
        want = reference.predict(feats)
        got = readout.apply(feats)
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-8 * np.abs(want).max())
    batched = readout.apply(x_new.reshape(1, 7, 6))
    np.testing.assert_allclose(batched[0], reference.predict(x_new), rtol=1e-8, atol=1e-8)


def test_pls_components_are_capped_at_the_features():
    x, y = _data(d=4)
    readout = fit_readout(x, y)  # 25 components asked, 4 features: 4 used
    want = PLSRegression(n_components=4, scale=False).fit(x, y).predict(x)
    np.testing.assert_allclose(readout.apply(x), want, rtol=1e-8, atol=1e-8 * np.abs(want).max())


def test_apply_in_jax_inside_jit_in_the_features_dtype():
    x, y = _data()
    readout = fit_readout(x, y, method="ridge")
    out = jax.jit(readout.apply)(jnp.asarray(x, jnp.float32))
    assert out.dtype == jnp.float32 and out.shape == (40, 4)
    np.testing.assert_allclose(np.asarray(out), readout.apply(x), rtol=1e-4, atol=1e-4)
    assert readout.apply(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.bfloat16
    grad = jax.grad(lambda f: readout.apply(f)[:, 1].sum())(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(grad[0]), readout.weights[:, 1], rtol=1e-5)


def _pearson_by_formula(a, b):
    a, b = a - a.mean(), b - b.mean()
    den = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / den) if den > 0 else float("nan")  # a constant side: undefined


@pytest.mark.parametrize("method,seed", [("pls", 0), ("ridge", 3)])
def test_cross_validation_equals_an_independent_loop(method, seed):
    x, y = _data(n=30, d=5, s=5, noise=2.0)
    readout = fit_readout(x, y, method=method, n_components=2, splits=6, train_fraction=0.8, seed=seed, alpha=0.5)
    r = np.zeros((6, 5))
    folds = list(ShuffleSplit(n_splits=6, train_size=0.8, random_state=seed).split(x))
    for k, (train, test) in enumerate(folds):
        assert len(train) == 24 and len(test) == 6
        pred = _sklearn(method, 2, 0.5).fit(x[train], y[train]).predict(x[test])
        for s in range(5):
            r[k, s] = _pearson_by_formula(pred[:, s], y[test, s])
    medians = np.median(r, axis=1)
    np.testing.assert_allclose(readout.split_scores, medians, rtol=0, atol=1e-12)
    np.testing.assert_allclose(readout.predictivity, r.mean(axis=0), rtol=0, atol=1e-12)
    assert readout.score == pytest.approx(medians.mean(), abs=1e-12)
    assert readout.score_error == pytest.approx(medians.std(ddof=0), abs=1e-12)
    assert readout.valid.all() and readout.left_out == 0
    # and one split's r from scipy
    train, test = folds[2]
    pred = _sklearn(method, 2, 0.5).fit(x[train], y[train]).predict(x[test])
    assert sps.pearsonr(pred[:, 3], y[test, 3]).statistic == pytest.approx(r[2, 3], abs=1e-12)


def test_a_site_constant_on_a_test_fold_is_skipped_there_as_brain_score_skips_nan():
    x, y = _data(n=20, d=3, s=3)
    folds = list(ShuffleSplit(n_splits=8, train_size=0.8, random_state=1).split(x))
    y[:, 2] = 0.0
    y[[folds[0][0][0], folds[0][1][0]], 2] = [2.0, 1.0]  # constant on the test folds without these two
    readout = fit_readout(x, y, method="ridge", splits=8, train_fraction=0.8, seed=1)
    r = np.full((8, 3), np.nan)
    for k, (train, test) in enumerate(folds):
        pred = Ridge(alpha=1.0).fit(x[train], y[train]).predict(x[test])
        for s in range(3):
            if np.ptp(y[test, s]) > 0:
                r[k, s] = _pearson_by_formula(pred[:, s], y[test, s])
    assert np.isnan(r[:, 2]).any() and not np.isnan(r[:, 2]).all() and readout.valid.all()
    np.testing.assert_allclose(readout.split_scores, np.nanmedian(r, axis=1), rtol=0, atol=1e-12)
    np.testing.assert_allclose(readout.predictivity, np.nanmean(r, axis=0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["pls", "ridge"])
def test_linear_responses_are_predicted_and_noise_is_not(method):
    x, y = _data(n=60, d=5, s=4, noise=1e-6)
    exact = fit_readout(x, y, method=method, alpha=1e-6)
    assert exact.score > 0.999 and (exact.predictivity > 0.999).all()
    for seed in range(3):
        rng = np.random.default_rng(100 + seed)
        noise = fit_readout(rng.normal(size=(200, 5)), rng.normal(size=(200, 9)), method=method, seed=seed)
        assert abs(noise.score) < 0.3, (seed, noise.score)


@pytest.mark.parametrize("offset", [0.0, 3.7, 1e6])
def test_zero_variance_sites_are_left_out_and_counted(offset):
    x, y = _data(n=30, s=3)
    flat = np.full(30, offset)
    flat[::2] += offset * 1e-15  # roundoff-level variation still counts as constant
    with_flat = np.column_stack([y[:, 0], flat, y[:, 1:]])
    readout = fit_readout(x, with_flat, n_components=3)
    alone = fit_readout(x, y, n_components=3)
    assert readout.left_out == 1 and readout.valid.tolist() == [True, False, True, True]
    assert np.isnan(readout.predictivity[1]) and (readout.weights[:, 1] == 0).all()
    assert readout.bias[1] == pytest.approx(flat.mean(), rel=1e-12, abs=1e-300)
    np.testing.assert_allclose(readout.predictivity[[0, 2, 3]], alone.predictivity, rtol=0, atol=1e-12)
    np.testing.assert_allclose(readout.split_scores, alone.split_scores, rtol=0, atol=1e-12)
    np.testing.assert_allclose(readout.apply(x)[:, [0, 2, 3]], alone.apply(x), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(readout.apply(x)[:, 1], flat.mean(), rtol=1e-12)


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_load_recordings_npz(tmp_path):
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, size=(5, 4, 3, 3), dtype=np.uint8)
    responses = rng.normal(size=(5, 2))
    rec = load_recordings(_write_npz(tmp_path / "u8.npz", images=u8, responses=responses))
    assert rec.images.dtype == np.float32 and rec.images.shape == (5, 4, 3, 3)
    np.testing.assert_array_equal(rec.images, u8.astype(np.float32) / 255)
    np.testing.assert_array_equal(rec.responses, responses)
    assert rec.responses.dtype == np.float64 and rec.sites == ("site0", "site1") and rec.path.endswith("u8.npz")
    floats = rng.random(size=(5, 4, 3, 3)).astype(np.float64)
    rec = load_recordings(_write_npz(tmp_path / "f.npz", images=floats, responses=responses,
                                     sites=np.array(["V4_a", "IT_b"])))
    np.testing.assert_array_equal(rec.images, floats.astype(np.float32))
    assert rec.sites == ("V4_a", "IT_b")
    grey = u8[..., 0]
    for name, images in (("grey.npz", grey), ("grey1.npz", grey[..., None])):
        rec = load_recordings(_write_npz(tmp_path / name, images=images, responses=responses.astype(np.float32)))
        assert rec.images.shape == (5, 4, 3, 3)
        for c in range(3):
            np.testing.assert_array_equal(rec.images[..., c], grey.astype(np.float32) / 255)
        assert rec.responses.dtype == np.float64


def _example(tf, image_bytes, responses, names=None):
    feature = {"image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_bytes])),
               "responses": tf.train.Feature(float_list=tf.train.FloatList(value=list(responses)))}
    if names is not None:
        feature["site_names"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[n.encode() for n in names]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _write_records(tf, path, images, responses, names=None, encode=None):
    encode = encode or (lambda im: tf.io.encode_png(im).numpy())
    with tf.io.TFRecordWriter(str(path)) as writer:
        for image, row in zip(images, responses):
            writer.write(_example(tf, encode(image), row, names))
    return str(path)


def test_load_recordings_tfrecord(tmp_path):
    tf = import_tf()
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(6, 5, 4, 3), dtype=np.uint8)
    responses = rng.normal(size=(6, 3))
    want_responses = responses.astype(np.float32).astype(np.float64)  # float_list holds float32
    _write_records(tf, tmp_path / "a.tfrecord-00000-of-00002", images[:4], responses[:4], ["x", "y", "z"])
    _write_records(tf, tmp_path / "a.tfrecord-00001-of-00002", images[4:], responses[4:], ["x", "y", "z"])
    rec = load_recordings(str(tmp_path / "a.tfrecord*"))
    np.testing.assert_array_equal(rec.images, images.astype(np.float32) / 255)
    np.testing.assert_array_equal(rec.responses, want_responses)
    assert rec.sites == ("x", "y", "z")
    grey = images[..., :1]
    one = _write_records(tf, tmp_path / "grey.tfrecord", grey, responses)
    rec = load_recordings(one)
    np.testing.assert_array_equal(rec.images, np.repeat(grey, 3, axis=-1).astype(np.float32) / 255)
    assert rec.sites == ("site0", "site1", "site2")
    jpeg = _write_records(tf, tmp_path / "jpeg.tfrecord", images, responses,
                          encode=lambda im: tf.io.encode_jpeg(im, quality=95).numpy())
    decoded = np.stack([tf.io.decode_jpeg(tf.io.encode_jpeg(im, quality=95)).numpy() for im in images])
    np.testing.assert_array_equal(load_recordings(jpeg).images, decoded.astype(np.float32) / 255)


def _one_line(err):
    text = str(err.value)
    assert "\n" not in text and text.strip() == text and text, text
    return text


def _bad_recordings(tmp_path, name, **arrays):
    images = np.zeros((4, 3, 3, 3), np.uint8)
    base = {"images": images, "responses": np.ones((4, 2))}
    base.update(arrays)
    return _write_npz(tmp_path / name, **{k: v for k, v in base.items() if v is not None})


def test_load_recordings_bad_input(tmp_path):
    cases = [
        (str(tmp_path / "absent.npz"), "absent.npz: no such recordings file"),
        (str(tmp_path / "absent.tfrecord"), "absent.tfrecord: no such recordings file"),
        (_bad_recordings(tmp_path, "nokey.npz", responses=None), "missing key.*responses"),
        (_bad_recordings(tmp_path, "count.npz", responses=np.ones((5, 2))), "5 rows .* 4 images"),
        (_bad_recordings(tmp_path, "flat.npz", responses=np.ones(4)), r"shape \(4,\); expected a 2-D"),
        (_bad_recordings(tmp_path, "rank.npz", images=np.zeros((4, 3), np.uint8)),
         r"wrong rank or channel count, shape \(4, 3\)"),
        (_bad_recordings(tmp_path, "rgba.npz", images=np.zeros((4, 3, 3, 4), np.uint8)),
         r"wrong rank or channel count, shape \(4, 3, 3, 4\)"),
        (_bad_recordings(tmp_path, "range.npz", images=np.full((4, 3, 3, 3), 2.0)), r"lie in \[0, 1\]"),
        (_bad_recordings(tmp_path, "sites.npz", sites=np.array(["a"])), "sites must be 2 distinct names"),
    ]
    nan = np.ones((4, 2))
    nan[1, 1] = np.nan
    nan[3, 0] = np.inf
    cases.append((_bad_recordings(tmp_path, "nan.npz", responses=nan),
                  "2 responses are NaN or infinite; the first is image 1, site 1"))
    (tmp_path / "junk.tfrecord").write_bytes(b"not a record at all")
    cases.append((str(tmp_path / "junk.tfrecord"), "junk.tfrecord: cannot read the records"))
    tf = import_tf()
    with tf.io.TFRecordWriter(str(tmp_path / "noimage.tfrecord")) as writer:
        writer.write(tf.train.Example(features=tf.train.Features(feature={
            "responses": tf.train.Feature(float_list=tf.train.FloatList(value=[1.0]))})).SerializeToString())
    cases.append((str(tmp_path / "noimage.tfrecord"), "record 0 has no 'image' bytes feature"))
    for path, match in cases:
        with pytest.raises(DataError, match=match) as err:
            load_recordings(path)
        assert _one_line(err).startswith(path), (path, str(err.value))


def test_fit_readout_bad_input():
    x, y = _data(n=20)
    config = [
        (dict(method="cca"), "unknown readout method 'cca'"),
        (dict(n_components=0), "n_components must be an integer >= 1, got 0"),
        (dict(splits=1), "splits must be an integer >= 2, got 1"),
        (dict(train_fraction=1.0), r"train_fraction must be a number in \(0, 1\)"),
        (dict(train_fraction=0.0), r"train_fraction must be a number in \(0, 1\)"),
        (dict(alpha=-1.0), "alpha must be a number >= 0"),
    ]
    for kwargs, match in config:
        with pytest.raises(ConfigError, match=match) as err:
            fit_readout(x, y, where=WHERE, **kwargs)
        assert _one_line(err).startswith(WHERE + ": ")
    nan_x, nan_y = x.copy(), y.copy()
    nan_x[3, 2] = np.nan
    nan_y[5, 1] = np.inf
    data = [
        ((x, y[:19]), {}, "features cover 20 images but responses cover 19"),
        ((x[:3], y[:3]), {}, "3 images; a cross-validated readout needs at least 4"),
        ((nan_x, y), {}, "1 features are NaN or infinite; the first is image 3, column 2"),
        ((x, nan_y), {}, "1 responses are NaN or infinite; the first is image 5, column 1"),
        ((x, np.full((20, 3), 2.0)), {}, "all 3 sites have zero variance"),
        ((x[:10], y[:10]), {}, "leave 9 train and 1 test images per split"),
        ((x, y), dict(train_fraction=0.05), "leave 1 train and 19 test"),
        ((x[:, 0], y), {}, r"features have shape \(20,\); expected a 2-D"),
    ]
    for args, kwargs, match in data:
        with pytest.raises(DataError, match=match) as err:
            fit_readout(*args, where=WHERE, **kwargs)
        assert _one_line(err).startswith(WHERE + ": ")
    readout = fit_readout(x, y, method="ridge")
    with pytest.raises(DataError, match="features have 5 values per image; the readout was fitted on 6"):
        readout.apply(x[:, :5])

"""Neural sites through a model: a linear readout from a layer's features to recorded responses.

Guo et al. (ICML 2022, "Adversarially trained neural representations may already be as robust as
corresponding biological neural representations") measure unit-level adversarial sensitivity on model
"sites": linear readouts of a layer fitted to recorded neural responses, as Brain-Score maps models to
neurons (Schrimpf et al. 2018, "Brain-Score: Which artificial neural network for object recognition is
most brain-like?", bioRxiv 407007). :func:`fit_readout` follows github.com/brain-score/vision,
``brainscore_vision/metrics/regression_correlation/metric.py`` (``CrossRegressedCorrelation``,
``pls_regression``, ``ridge_regression``) and ``brainscore_vision/metric_helpers/transformations.py``
(``CrossValidation``, ``Split``):

- mapping: ``PLSRegression(n_components=25, scale=False)`` (``pls_regression``'s defaults, capped at
  ``min(train images, features)``) or ``Ridge(alpha=1)``, one multi-output estimator for all sites;
- splits: ``ShuffleSplit(splits, train_size=train_fraction, random_state=seed)`` over the images in the
  given order (``floor(train_fraction * N)`` train, the rest test). Brain-Score stratifies by an
  ``object_name`` coordinate by default; recordings here have no object labels, so the splits are not
  stratified (its ``stratification_coord=None``). Its default ``random_state`` is 1, ours 0;
- per split ``k`` and site ``s``, ``p`` the test images' prediction by the estimator fitted on the train
  images and ``y`` their recording: ``r_ks = sum_i (p_i - mean p)(y_i - mean y) / sqrt(sum_i (p_i -
  mean p)^2 sum_i (y_i - mean y)^2)`` (Pearson r, as ``scipy.stats.pearsonr``; NaN if a side is constant);
- ``m_k = median_s r_ks`` (a split's score), ``score = (1/K) sum_k m_k`` (Brain-Score's centre), NaN
  skipped in both (as xarray skips it there); ``score_error = std_k m_k`` (population std, ``ddof=0``;
  Brain-Score's ``error`` is that over ``sqrt(K)``); a site's predictivity is ``(1/K) sum_k r_ks``.

Sites that do not vary over the images (std at most ``1e-12`` times their mean's magnitude) are left out
of every fit and median: ``valid`` False, predictivity NaN, weights zero, bias the constant response;
:attr:`Readout.left_out` counts them for the caller to report. The final readout is the same estimator
fitted on all images as the map ``features @ weights + bias`` (``weights = coef_.T``, ``bias =
predict(0)``: sklearn's PLS predicts ``(X - x_mean) @ coef_.T + intercept_``), which
:meth:`Readout.apply` evaluates in NumPy, or in ``jax.numpy`` on JAX arrays (inside ``jit`` too).
:func:`load_recordings` reads images and (images x sites) responses from ``.npz`` or TFRecord files (a
``tf.train.Example`` per image: ``image`` PNG/JPEG bytes, ``responses`` floats, ``site_names`` optional).
"""

from __future__ import annotations

import dataclasses
import os
import re
import zipfile

import jax.numpy as jnp
import numpy as np
from google.protobuf.message import DecodeError
from sklearn.cross_decomposition import PLSRegression
from sklearn.linear_model import Ridge
from sklearn.model_selection import ShuffleSplit

from advalign_jax.data.tf_env import import_tf
from advalign_jax.errors import ConfigError, DataError

METHODS = ("pls", "ridge")
MIN_IMAGES = 4
_CONSTANT_RELATIVE = 1e-12


@dataclasses.dataclass(frozen=True)
class Recordings:
    """Images (N, H, W, 3) float32 in [0, 1], their responses (N, S) float64, S site names, the source."""
    images: np.ndarray
    responses: np.ndarray
    sites: tuple
    path: str


@dataclasses.dataclass(frozen=True)
class Readout:
    """A fitted linear readout, features (..., D) -> sites (..., S), with its cross-validated quality."""
    weights: np.ndarray
    bias: np.ndarray
    method: str
    predictivity: np.ndarray
    split_scores: np.ndarray
    valid: np.ndarray

    @property
    def score(self) -> float:
        """Brain-Score's centre: the mean over splits of the split scores (NaN splits skipped)."""
        return _finite(self.split_scores, np.mean)

    @property
    def score_error(self) -> float:
        """The population standard deviation (``numpy.std``, ``ddof=0``) over splits of the split scores
        (NaN splits skipped); Brain-Score's ``error`` is this over ``sqrt(splits)``."""
        return _finite(self.split_scores, np.std)

    @property
    def left_out(self) -> int:
        """How many sites were left out (no variance over the images)."""
        return int(np.count_nonzero(~self.valid))

    def apply(self, features):
        """``features @ weights + bias`` over the last axis, in the features' float dtype (NumPy arrays
        stay NumPy; anything else, JAX arrays and tracers included, goes through ``jax.numpy``)."""
        features = features if hasattr(features, "shape") else np.asarray(features)
        if features.shape[-1] != self.weights.shape[0]:
            raise DataError(f"readout: features have {features.shape[-1]} values per image; the readout was "
                            f"fitted on {self.weights.shape[0]}")
        if isinstance(features, np.ndarray):
            dtype = np.result_type(features.dtype, np.float32)
            return features.astype(dtype, copy=False) @ self.weights.astype(dtype) + self.bias.astype(dtype)
        features = jnp.asarray(features)
        dtype = features.dtype if jnp.issubdtype(features.dtype, jnp.floating) else jnp.float32
        out = jnp.matmul(features.astype(dtype), jnp.asarray(self.weights, dtype), precision="highest")
        return out + jnp.asarray(self.bias, dtype)


def _finite(values: np.ndarray, reduce) -> float:
    """``reduce`` of the finite values; NaN when there is none."""
    values = values[np.isfinite(values)]
    return float(reduce(values)) if values.size else float("nan")


def _pearson(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Pearson r of each column pair (module docstring); NaN where either column is constant."""
    p = pred - pred.mean(axis=0)
    y = target - target.mean(axis=0)
    den = np.sqrt((p * p).sum(axis=0) * (y * y).sum(axis=0))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, np.clip((p * y).sum(axis=0) / den, -1.0, 1.0), np.nan)


def _estimator(method: str, n_components: int, alpha: float):
    return PLSRegression(n_components=n_components, scale=False) if method == "pls" else Ridge(alpha=alpha)


def _number(value, integer=False) -> float:
    """``value`` as a float; NaN for anything that is not a real number (or not an integer)."""
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    return float(value) if isinstance(value, kinds) and not isinstance(value, bool) else float("nan")


def _check_config(where, method, n_components, splits, train_fraction, alpha):
    if method not in METHODS:
        raise ConfigError(f"{where}: unknown readout method {method!r}; expected one of {METHODS}")
    for name, value, ok, want in (
            ("n_components", n_components, _number(n_components, True) >= 1, "an integer >= 1"),
            ("splits", splits, _number(splits, True) >= 2, "an integer >= 2"),
            ("train_fraction", train_fraction, 0.0 < _number(train_fraction) < 1.0, "a number in (0, 1)"),
            ("alpha", alpha, _number(alpha) >= 0.0, "a number >= 0 (the ridge penalty)")):
        if not ok:
            raise ConfigError(f"{where}: {name} must be {want}, got {value!r}")


def _check_data(where, features, responses):
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(responses, dtype=np.float64)
    for name, a, shape in (("features", x, "(images, features)"), ("responses", y, "(images, sites)")):
        if a.ndim != 2 or not a.shape[1]:
            raise DataError(f"{where}: {name} have shape {a.shape}; expected a 2-D {shape} matrix")
        _nonfinite(where, name, a, "column")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{where}: features cover {x.shape[0]} images but responses cover {y.shape[0]}")
    if x.shape[0] < MIN_IMAGES:
        raise DataError(f"{where}: {x.shape[0]} images; a cross-validated readout needs at least {MIN_IMAGES}")
    return x, y


def fit_readout(features, responses, method="pls", n_components=25, splits=10, train_fraction=0.9,
                seed=0, alpha=1.0, where="readout") -> Readout:
    """Fits the readout from ``features`` (N, D) to ``responses`` (N, S) and cross-validates it (module
    docstring). Raises :class:`ConfigError` for bad settings and :class:`DataError` for bad arrays,
    one line each, prefixed with ``where``."""
    _check_config(where, method, n_components, splits, train_fraction, alpha)
    x, y = _check_data(where, features, responses)
    n, d = x.shape
    mean, std = y.mean(axis=0), y.std(axis=0)
    valid = std > _CONSTANT_RELATIVE * np.abs(mean)
    if not valid.any():
        raise DataError(f"{where}: all {y.shape[1]} sites have zero variance over the {n} images; nothing to fit")
    n_train = int(np.floor(float(train_fraction) * n))  # ShuffleSplit's train size; the rest is the test
    n_test = n - n_train
    if n_test < 2 or n_train < 2:
        raise DataError(f"{where}: {n} images with train_fraction {train_fraction} leave {n_train} train and "
                        f"{n_test} test images per split; a fold needs at least 2 (use more images)")
    folds = ShuffleSplit(n_splits=int(splits), train_size=float(train_fraction), random_state=seed).split(np.zeros(n))
    components = int(min(n_components, n_train, d))
    yv = y[:, valid]
    r = np.full((int(splits), y.shape[1]), np.nan)
    for k, (train, test) in enumerate(folds):
        estimator = _estimator(method, components, alpha).fit(x[train], yv[train])
        r[k, valid] = _pearson(estimator.predict(x[test]), yv[test])
    split_scores = np.array([_finite(row, np.median) for row in r])
    predictivity = np.array([_finite(column, np.mean) for column in r.T])
    estimator = _estimator(method, components, alpha).fit(x, yv)
    weights = np.zeros((d, y.shape[1]))
    weights[:, valid] = np.asarray(estimator.coef_, dtype=np.float64).reshape(-1, d).T
    bias = mean.copy()
    bias[valid] = np.asarray(estimator.predict(np.zeros((1, d))), dtype=np.float64).reshape(-1)
    return Readout(weights=weights, bias=bias, method=method, predictivity=predictivity,
                   split_scores=split_scores, valid=valid)


def _line(text) -> str:  # the first line of an error's text, without TensorFlow's op decorations
    lines = re.sub(r"\{\{[^}]*\}\}|\[Op:[^\]]*\].*", "", str(text)).strip().splitlines()
    return lines[0] if lines else type(text).__name__


def _read_npz(path: str):
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as err:  # ValueError: neither a zip nor an .npy file
        reason = _line(err) if isinstance(err, OSError) else "not a zip archive of .npy arrays"
        raise DataError(f"{path}: no such recordings file" if isinstance(err, FileNotFoundError) else
                        f"{path}: not a readable .npz file ({reason})") from None
    with data:
        missing = [k for k in ("images", "responses") if k not in data.files]
        if missing:
            raise DataError(f"{path}: missing key(s) {', '.join(missing)}; the file has {sorted(data.files)} "
                            "(expected 'images', 'responses' and optionally 'sites')")
        try:
            return data["images"], data["responses"], (data["sites"] if "sites" in data.files else None)
        except (ValueError, OSError, EOFError) as err:  # a damaged array, or objects (pickle is refused)
            raise DataError(f"{path}: an array cannot be read ({_line(err)}); store numbers and strings") from None


def _read_tfrecords(path: str):
    tf = import_tf()
    files = sorted(tf.io.gfile.glob(path))
    if not files:
        raise DataError(f"{path}: no such recordings file (no file matches)")
    images, rows, names = [], [], None
    try:
        for i, raw in enumerate(tf.data.TFRecordDataset(files).as_numpy_iterator()):
            feature = tf.train.Example.FromString(raw).features.feature
            if "image" not in feature or not feature["image"].bytes_list.value:
                raise DataError(f"{path}: record {i} has no 'image' bytes feature (PNG or JPEG)")
            if "responses" not in feature or not feature["responses"].float_list.value:
                raise DataError(f"{path}: record {i} has no 'responses' float_list feature")
            row = np.asarray(feature["responses"].float_list.value, dtype=np.float64)
            if rows and row.size != rows[0].size:
                raise DataError(f"{path}: record {i} has {row.size} responses but record 0 has {rows[0].size}")
            image = tf.io.decode_image(feature["image"].bytes_list.value[0], expand_animations=False).numpy()
            if images and image.shape[:2] != images[0].shape[:2]:
                raise DataError(f"{path}: record {i} has a {image.shape[0]}x{image.shape[1]} image but record 0 "
                                f"has {images[0].shape[0]}x{images[0].shape[1]}")
            if names is None and "site_names" in feature and feature["site_names"].bytes_list.value:
                names = [b.decode("utf-8", "replace") for b in feature["site_names"].bytes_list.value]
            images.append(image.astype(np.float32) / 65535 if image.dtype == np.uint16 else image)
            rows.append(row)
    except tf.errors.OpError as err:
        raise DataError(f"{path}: cannot read the records ({_line(err.message)})") from None
    except DecodeError as err:
        raise DataError(f"{path}: a record is not a tf.train.Example ({_line(err)})") from None
    if not rows:
        raise DataError(f"{path}: no records")
    return np.stack(images), np.stack(rows), names


def _nonfinite(where: str, name: str, values: np.ndarray, column: str) -> None:
    """One DataError line counting the NaN/inf values and naming the first, if there are any."""
    bad = ~np.isfinite(values)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise DataError(f"{where}: {int(bad.sum())} {name} are NaN or infinite; the first is image {i}, {column} {j}")


def _checked(path: str, images, responses, sites) -> Recordings:
    images = np.asarray(images)
    images = images[..., None] if images.ndim == 3 else images
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or not images.shape[0]:
        raise DataError(f"{path}: images of the wrong rank or channel count, shape {images.shape}; expected "
                        "(images, height, width, 3) RGB, or (images, height, width) or (..., 1) grey")
    images = np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255
    elif np.issubdtype(images.dtype, np.floating):
        images = images.astype(np.float32)
        if not (np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1):
            raise DataError(f"{path}: float images must be finite and lie in [0, 1]")
    else:
        raise DataError(f"{path}: images are {images.dtype}; expected uint8 0..255 or float in [0, 1]")
    responses = np.asarray(responses)
    if responses.dtype.kind not in "iuf":
        raise DataError(f"{path}: responses are {responses.dtype}; expected numbers")
    if responses.ndim != 2 or not responses.shape[1]:
        raise DataError(f"{path}: responses have shape {responses.shape}; expected a 2-D (images, sites) matrix")
    if responses.shape[0] != images.shape[0]:
        raise DataError(f"{path}: responses have {responses.shape[0]} rows (images) but there are "
                        f"{images.shape[0]} images")
    responses = responses.astype(np.float64)
    _nonfinite(path, "responses", responses, "site")
    names = np.asarray([f"site{j}" for j in range(responses.shape[1])] if sites is None else sites)
    if names.dtype.kind not in "US" or names.shape != (responses.shape[1],) or len(set(names.tolist())) < names.size:
        raise DataError(f"{path}: sites must be {responses.shape[1]} distinct names (strings), one per response "
                        f"column; got {names.dtype} of shape {names.shape}")
    sites = tuple(n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names.tolist())
    return Recordings(images=images, responses=responses, sites=sites, path=path)


def load_recordings(path: str) -> Recordings:
    """Reads recordings from an ``.npz`` file (``images``, ``responses``, optional ``sites``) or from a
    TFRecord file or glob (module docstring). Bad input raises one :class:`DataError` line naming the file."""
    path = os.fspath(path)
    if path.endswith(".npz"):
        images, responses, sites = _read_npz(path)
    else:
        images, responses, sites = _read_tfrecords(path)
    return _checked(path, images, responses, sites)

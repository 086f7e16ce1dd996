"""The reference preprocessing against the harmonization package's TF functions, NumPy and SciPy."""

import numpy as np
import pytest
from scipy import signal

import reference_harmonization as ref
from advalign_jax.data import preprocess, records
from advalign_jax.data.tf_env import import_tf

tf = import_tf()


def _bilinear_half_pixel(x: np.ndarray, out: int) -> np.ndarray:
    """Independent NumPy bilinear resize, half-pixel centres, no antialias (TF2 semantics).

    Source coordinate of output pixel i: (i + 0.5) * in / out - 0.5 (in float32, as TF computes it);
    the lower neighbour is clamped at 0 and the upper at in - 1; weights are the fractional part.
    """
    def weights(n_in):
        scale = np.float32(n_in) / np.float32(out)
        c = ((np.arange(out, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)).astype(np.float64)
        f = np.floor(c)
        lo = np.clip(f, 0, n_in - 1).astype(int)
        hi = np.clip(np.ceil(c), 0, n_in - 1).astype(int)
        return lo, hi, (c - f)

    lo_r, hi_r, wr = weights(x.shape[0])
    lo_c, hi_c, wc = weights(x.shape[1])
    rows = x[lo_r] * (1 - wr)[:, None, None] + x[hi_r] * wr[:, None, None]
    return rows[:, lo_c] * (1 - wc)[None, :, None] + rows[:, hi_c] * wc[None, :, None]


def test_gaussian_kernel_matches_reference_and_spec():
    ours = preprocess.gaussian_kernel()
    theirs = ref.load("common.blur").gaussian_kernel().numpy()[:, :, 0, 0]
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-9)
    assert ours.shape == (10, 10)
    assert np.unravel_index(np.argmax(ours), ours.shape) == (4, 5)  # off-centre peak (spec)
    assert abs(ours.sum() - 1) < 1e-6
    assert 0.0084 < ours.min() < ours.max() < 0.0110  # nearly a box filter at sigma 10


def test_gaussian_blur_matches_reference_and_scipy(rng):
    heat = rng.uniform(0, 255, size=(64, 64, 1)).astype(np.float32)
    kernel = preprocess.gaussian_kernel()
    ours = preprocess.gaussian_blur(tf.constant(heat), kernel).numpy()
    theirs = ref.load("common.blur").gaussian_blur(tf.constant(heat), ref.load("common.blur").gaussian_kernel())
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-5, atol=1e-5)
    # Independent: cross-correlation with TF SAME padding = 4 zeros before, 5 after.
    padded = np.pad(heat[..., 0].astype(np.float64), ((4, 5), (4, 5)))
    expected = signal.correlate2d(padded, kernel.astype(np.float64), mode="valid")
    np.testing.assert_allclose(ours[..., 0], expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("size_in,size_out", [(256, 224), (256, 64), (64, 224), (224, 224)])
def test_bilinear_resize_is_half_pixel_without_antialias(rng, size_in, size_out):
    x = rng.uniform(0, 255, size=(size_in, size_in, 2)).astype(np.float32)
    ours = preprocess.resize(tf.constant(x), size_out).numpy()
    np.testing.assert_allclose(ours, _bilinear_half_pixel(x.astype(np.float64), size_out), rtol=1e-5, atol=1e-3)


def _jpeg_record(rng, label=3):
    image = rng.integers(0, 256, size=(256, 256, 3)).astype(np.uint8)
    yy, xx = np.mgrid[0:256, 0:256]
    heat = (255 * np.exp(-((yy - 100) ** 2 + (xx - 140) ** 2) / 2000.0)).astype(np.uint8)
    return records.encode_example(image, heat, label, records.JPEG)


def test_full_jpeg_pipeline_matches_reference_loader(rng):
    serialized = _jpeg_record(rng)
    ref_image, ref_heat, ref_label = ref.load("common.clickme_dataset").parse_clickme_prototype(serialized)
    ex = records.parse_example_tf(tf.constant(serialized), num_classes=1000)
    assert int(ex["status"]) == 0
    image = preprocess.preprocess_image(ex["image"]).numpy()
    heat = preprocess.preprocess_heatmap(ex["heatmap"]).numpy()
    assert image.shape == (224, 224, 3) and heat.shape == (224, 224, 1)
    np.testing.assert_allclose(image, ref_image.numpy(), rtol=1e-5, atol=1e-5 * 255)
    np.testing.assert_allclose(heat, ref_heat.numpy(), rtol=1e-5, atol=1e-5 * 255)
    assert int(ex["label"]) == int(np.argmax(ref_label.numpy())) == 3


def test_raw_heatmap_pipeline_matches_reference_steps(rng):
    """The raw-float32 encoding goes through the same steps (the reference only decodes JPEG)."""
    image = rng.uniform(0, 255, size=(224, 224, 3)).astype(np.float32)
    heat = rng.uniform(0, 255, size=(224, 224)).astype(np.float32)
    ex = records.parse_example_tf(tf.constant(records.encode_example(image, heat, 7, records.RAW)), 1000)
    np.testing.assert_array_equal(ex["image"].numpy(), image)  # raw bytes are exact
    blur = ref.load("common.blur")
    expected = tf.image.resize(heat[..., None], (64, 64), method="bilinear")
    expected = blur.gaussian_blur(expected, blur.gaussian_kernel())
    expected = tf.image.resize(expected, (224, 224), method="bilinear").numpy()
    np.testing.assert_allclose(preprocess.preprocess_heatmap(ex["heatmap"]).numpy(), expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(preprocess.preprocess_image(ex["image"]).numpy(), image, atol=1e-4)  # 224->224


def test_minmax_normalise_formula_and_zero_map(rng):
    heat = rng.uniform(3, 200, size=(16, 16, 1)).astype(np.float32)
    expected = (heat - heat.min()) / ((heat - heat.min()).max() + 1e-5)
    np.testing.assert_allclose(preprocess.minmax_normalise(tf.constant(heat)).numpy(), expected, rtol=1e-6)
    zeros = preprocess.minmax_normalise(tf.zeros((16, 16, 1))).numpy()
    assert np.all(zeros == 0) and np.all(np.isfinite(zeros))


def test_random_resized_crop_flip_is_shared_by_image_and_map(rng):
    image = rng.uniform(0, 255, size=(224, 224, 3)).astype(np.float32)
    heat = image[..., 1:2].copy()  # the map is a copy of the green channel
    for s in range(8):
        out_img, out_map = preprocess.random_resized_crop_flip(tf.constant(image), tf.constant(heat),
                                                               tf.constant([s, 7], tf.int64))
        np.testing.assert_allclose(out_map.numpy()[..., 0], out_img.numpy()[..., 1], atol=1e-4)
        assert out_img.shape == (224, 224, 3)
    a = preprocess.random_resized_crop_flip(tf.constant(image), tf.constant(heat), tf.constant([1, 2], tf.int64))
    b = preprocess.random_resized_crop_flip(tf.constant(image), tf.constant(heat), tf.constant([1, 2], tf.int64))
    np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())  # stateless: same seed, same crop


def test_crop_area_and_aspect_ranges(rng):
    """Crop boxes drawn by the sampler respect area 0.08..1 and aspect 3/4..4/3."""
    areas, aspects = [], []
    for s in range(200):
        _, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            [256, 256, 4], bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=[s, 0],
            min_object_covered=0.0, aspect_ratio_range=(0.75, 4 / 3), area_range=(0.08, 1.0),
            max_attempts=10, use_image_if_no_bounding_boxes=True)
        h, w = int(size[0]), int(size[1])
        areas.append(h * w / 256 ** 2)
        aspects.append(w / h)
    assert 0.07 < min(areas) and max(areas) <= 1.0
    assert min(aspects) > 0.7 and max(aspects) < 1.4

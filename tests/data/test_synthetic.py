"""Synthetic ClickMe: deterministic, the map marks the object, the spurious cue is controllable."""

import numpy as np
import pytest

from advalign_jax.data import synthetic


def test_deterministic_and_order_free():
    spec = synthetic.SynthSpec(size=64, seed=5, spurious=0.5)
    a = [synthetic.make_example(i, spec) for i in (0, 1, 2)]
    b = [synthetic.make_example(i, spec) for i in (2, 1, 0)][::-1]
    for (ia, ha, la), (ib, hb, lb) in zip(a, b):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(ha, hb)
        assert la == lb
    other = synthetic.make_example(0, synthetic.SynthSpec(size=64, seed=6, spurious=0.5))
    assert not np.array_equal(other[0], a[0][0])


def test_values_and_map_localisation():
    spec = synthetic.SynthSpec(size=96)
    for i in range(20):
        image, heat, label = synthetic.make_example(i, spec)
        assert image.shape == (96, 96, 3) and heat.shape == (96, 96) and label == i % 10
        assert 0 <= image.min() and image.max() <= 255 and heat.max() == pytest.approx(255, rel=1e-5)
        # The map is concentrated: most of its mass lies in a small part of the image.
        flat = np.sort(heat.ravel())[::-1]
        top = np.searchsorted(np.cumsum(flat), 0.9 * flat.sum())
        assert top < 0.35 * flat.size
        # The object sits under the map: pixels under the map differ from the rest of the image.
        inside = heat > 128
        assert np.abs(image[inside].mean(0) - image[heat < 5].mean(0)).max() > 5


def _cue_colour(image, cue):
    if cue == "patch":  # the centre of the corner square
        s = image.shape[0]
        c = int(s * (synthetic.PATCH[0] + synthetic.PATCH[1]) / 2)
        return image[c - 1:c + 2, c - 1:c + 2].reshape(-1, 3).mean(0)
    return np.concatenate([image[-4:].reshape(-1, 3), image[:, -4:].reshape(-1, 3)]).mean(0)


@pytest.mark.parametrize("cue,spurious,low,high", [("patch", 1.0, 0.95, 1.01), ("patch", 0.0, -0.01, 0.4),
                                                   ("tint", 1.0, 0.9, 1.01), ("tint", 0.0, -0.01, 0.4),
                                                   ("none", 0.0, -0.01, 0.4)])
def test_spurious_cue_predicts_the_label_when_asked(cue, spurious, low, high):
    """A nearest-centroid classifier on the cue's colour alone: near-perfect only with the cue."""
    spec = synthetic.SynthSpec(size=64, cue=cue, spurious=spurious)
    train = [synthetic.make_example(i, spec) for i in range(60)]
    test = [synthetic.make_example(i, spec) for i in range(1000, 1040)]
    probe = "patch" if cue == "patch" else "tint"
    feats = np.array([_cue_colour(im, probe) for im, _, _ in train])
    labels = np.array([l for _, _, l in train])
    centroids = np.stack([feats[labels == c].mean(0) for c in range(10)])
    hits = [np.argmin(((centroids - _cue_colour(im, probe)) ** 2).sum(1)) == l for im, _, l in test]
    assert low <= np.mean(hits) <= high


def test_bad_spec():
    with pytest.raises(ValueError):
        synthetic.SynthSpec(num_classes=99)
    with pytest.raises(ValueError):
        synthetic.SynthSpec(spurious=1.5)
    with pytest.raises(ValueError):
        synthetic.SynthSpec(cue="none", spurious=0.5)
    with pytest.raises(ValueError):
        synthetic.SynthSpec(cue="stripes")


@pytest.mark.parametrize("cue,spurious", [("patch", 0.0), ("patch", 0.9), ("tint", 0.5)])
def test_cue_swap_changes_only_the_cue(cue, spurious):
    """``cue_class`` repaints the cue and nothing else; ``example_cue`` is the cue drawn; the patch's
    pixels are ``cue_region``; the same seed and index give the same image whatever ``spurious`` is,
    but for the cue."""
    spec = synthetic.SynthSpec(size=64, seed=3, cue=cue, spurious=spurious)
    rows, cols = synthetic.cue_region(64)
    region = np.zeros((64, 64), bool)
    region[rows, cols] = True
    for i in range(12):
        image, heat, label = synthetic.make_example(i, spec)
        drawn = synthetic.example_cue(i, spec)
        same = synthetic.make_example(i, spec, cue_class=drawn)
        np.testing.assert_array_equal(same[0], image)
        other, other_heat, other_label = synthetic.make_example(i, spec, cue_class=(drawn + 1) % 10)
        np.testing.assert_array_equal(other_heat, heat)
        assert other_label == label
        changed = np.any(other != image, axis=-1)
        if cue == "patch":
            assert changed[region].all() and not changed[~region].any()
            colour = synthetic._class_colour((drawn + 1) % 10, 10) * 0.9 * 255
            np.testing.assert_allclose(other[rows, cols].reshape(-1, 3).mean(0), colour, atol=1e-3)
        else:
            assert changed.mean() > 0.5  # the tint colours the background
    uninformative = synthetic.SynthSpec(size=64, seed=3, cue=cue, spurious=0.0)
    for i in range(12):
        a = synthetic.make_example(i, spec)[0]
        b = synthetic.make_example(i, uninformative, cue_class=synthetic.example_cue(i, spec))[0]
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="cue_class"):
        synthetic.make_example(0, spec, cue_class=10)


def test_cue_region_is_the_patch_rule():
    for size in (32, 64, 224, 256):
        rows, _ = synthetic.cue_region(size)
        inside = [j for j in range(size) if synthetic.PATCH[0] <= j / size < synthetic.PATCH[1]]
        assert list(range(size))[rows] == inside

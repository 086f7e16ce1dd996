"""Test set-up: 8 simulated CPU devices (before JAX starts), small synthetic shards as fixtures."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The independent implementations the tests compare against, importable by module name from every folder.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "references"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

try:  # the PyTorch references run tiny ops, where one thread is much faster than several
    import torch  # noqa: E402

    torch.set_num_threads(1)
except ImportError:
    pass

from advalign_jax.data import records, synthetic, writer  # noqa: E402


def _write_synth(out_dir, prefix, encoding, n, size, shards, num_classes=10, seed=0, spurious=0.0):
    spec = synthetic.SynthSpec(num_classes=num_classes, size=size, seed=seed, spurious=spurious)

    def example(i):
        image, heatmap, label = synthetic.make_example(i, spec)
        return records.encode_example(image, heatmap, label, encoding)

    return writer.write_shards(str(out_dir), prefix, shards, n, example)


@pytest.fixture(scope="session")
def jpeg_shards(tmp_path_factory):
    """3 JPEG-256 shards (harmonization encoding), 20 records, labels 0..9."""
    return _write_synth(tmp_path_factory.mktemp("jpeg"), "train", records.JPEG, 20, 256, 3)


@pytest.fixture(scope="session")
def raw_shard(tmp_path_factory):
    """1 raw-float32 224 file (adversarial-alignment encoding), 6 records."""
    return _write_synth(tmp_path_factory.mktemp("raw"), "clickme_test", records.RAW, 6, 224, 1)


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory):
    """4 JPEG shards of 64-px images, 26 records: fast reader tests."""
    return _write_synth(tmp_path_factory.mktemp("small"), "train", records.JPEG, 26, 64, 4)


@pytest.fixture
def rng():
    return np.random.default_rng(0)

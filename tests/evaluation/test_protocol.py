"""The evaluation protocol: every example once whatever the batch size, the padding masked, the same
rows on 8 devices as on one, done batches skipped, against a plain NumPy loop over the examples."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advalign_jax import parallel
from advalign_jax.errors import ConfigError, DataError
from advalign_jax.evaluation.protocol import ArraySource, Evaluator, evaluate_all, round_batch, run_batches


def _data(n=23, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4, 4, 3)).astype(np.float32), rng.integers(0, 5, size=n).astype(np.int32)


def _evaluator(calls):
    """Per example: the sum of its pixels and whether it exceeds its label (a per-example function:
    batch mates never matter)."""
    fn = jax.jit(lambda v, x, y: {"total": jnp.sum(x, axis=(1, 2, 3)) * v["scale"],
                                  "above": jnp.sum(x, axis=(1, 2, 3)) * v["scale"] > y})

    def batch_fn(variables, b):
        calls.append(int(b["x"].shape[0]))
        return fn(variables, b["x"], b["y"])

    def rows(meta, host):
        return [{"img": int(meta["index"][k]), "label": int(meta["label"][k]), "total": float(host["total"][k]),
                 "above": bool(host["above"][k])} for k in np.flatnonzero(meta["mask"])]

    return Evaluator(batch_fn=batch_fn, inputs=("x", "y"), rows=rows, summarise=lambda rs: sorted(rs, key=lambda r: r["img"]))


def _expected(x, y, scale):
    totals = x.astype(np.float64).sum(axis=(1, 2, 3)) * scale
    return [(i, int(y[i]), float(totals[i]), bool(totals[i] > y[i])) for i in range(len(y))]


@pytest.mark.parametrize("batch_size", [1, 5, 8, 23, 100])
def test_every_example_once_with_its_padding_masked(batch_size):
    x, y = _data()
    calls = []
    source = ArraySource({"x": x, "y": y}, batch_size)
    rows = evaluate_all(_evaluator(calls), {"scale": np.float32(2.0)}, source)
    assert [r["img"] for r in rows] == list(range(23))
    want = _expected(x, y, 2.0)
    for r, (i, label, total, above) in zip(rows, want):
        assert r["label"] == label and r["total"] == pytest.approx(total, rel=1e-5) and r["above"] == above
    b = min(batch_size, 23)
    assert calls == [b] * len(calls) and len(calls) == -(-23 // b)  # one shape: the last batch is padded


def test_eight_devices_give_the_single_device_rows():
    x, y = _data(n=30, seed=1)
    mesh = parallel.make_mesh()
    assert mesh.devices.size == 8
    source = ArraySource({"x": x, "y": y}, 12, mesh)
    assert source.batch_size == 16 == round_batch(12, mesh)  # rounded up to the 8 devices
    sharded = evaluate_all(_evaluator([]), {"scale": np.float32(0.5)}, source, mesh)
    single = evaluate_all(_evaluator([]), {"scale": np.float32(0.5)}, ArraySource({"x": x, "y": y}, 12))
    assert [(r["img"], r["label"], r["above"]) for r in sharded] == [(r["img"], r["label"], r["above"]) for r in single]
    np.testing.assert_allclose([r["total"] for r in sharded], [r["total"] for r in single], rtol=1e-6)


def test_done_batches_are_skipped_and_not_computed():
    x, y = _data()
    calls = []
    evaluator = _evaluator(calls)
    done = set(range(10))  # the first two batches of 5
    results = list(run_batches(evaluator, {"scale": np.float32(1.0)}, ArraySource({"x": x, "y": y}, 5),
                               skip=lambda meta: all(int(i) in done for i in meta["index"][meta["mask"]])))
    assert [r.skipped for r in results] == [True, True, False, False, False] and len(calls) == 3
    assert results[0].host == {} and list(results[2].meta["index"]) == [10, 11, 12, 13, 14]
    assert list(results[-1].meta["mask"]) == [True, True, True, False, False]  # 20, 21, 22 and two pads


def test_bad_sources_are_one_line():
    x, y = _data()
    with pytest.raises(DataError, match="different numbers of examples"):
        ArraySource({"x": x, "y": y[:5]}, 4)
    with pytest.raises(DataError, match="no examples"):
        ArraySource({"x": x[:0], "y": y[:0]}, 4)
    with pytest.raises(ConfigError, match="batch_size must be positive"):
        ArraySource({"x": x, "y": y}, 0)

"""Meshes and placement: a sharded computation on 8 simulated devices equals the 1-device result."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from advalign_jax import parallel


def _step(params, batch):
    """A small data-parallel step: per-example conv features, a mean loss and its gradient."""
    def loss(p):
        y = jax.lax.conv_general_dilated(batch["x"], p["w"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        per_example = jnp.mean(jnp.tanh(y) ** 2, axis=(1, 2, 3)) * batch["mask"]
        return per_example.sum() / batch["mask"].sum(), per_example

    (value, per_example), grad = jax.value_and_grad(loss, has_aux=True)(params)
    return value, per_example, grad


def test_eight_simulated_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize("model_axis", [1, 2])
def test_sharded_step_equals_single_device(rng, model_axis):
    params = {"w": rng.normal(size=(3, 3, 3, 4)).astype(np.float32)}
    batch = {"x": rng.normal(size=(16, 12, 12, 3)).astype(np.float32),
             "mask": (np.arange(16) < 13).astype(np.float32)}
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh = parallel.make_mesh(model_axis_size=model_axis if len(devices) > 1 else 1, devices=devices)
        p = parallel.replicate(params, mesh)
        b = parallel.shard_batch(batch, mesh)
        assert b["x"].sharding.spec[0] == parallel.DATA_AXIS
        out = jax.jit(_step, out_shardings=(parallel.replicated(mesh), parallel.data_sharding(mesh),
                                            parallel.replicated(mesh)))(p, b)
        if len(devices) > 1:
            assert len(out[1].sharding.device_set) == 8
        results.append(jax.tree.map(np.asarray, out))
    one, eight = results
    np.testing.assert_allclose(eight[1], one[1], rtol=1e-6)  # per-example: identical math
    np.testing.assert_allclose(eight[0], one[0], rtol=1e-6)  # reductions: same up to summation order
    np.testing.assert_allclose(eight[2]["w"], one[2]["w"], rtol=1e-5, atol=1e-7)


def test_mesh_shapes_and_batch_checks():
    mesh = parallel.make_mesh(model_axis_size=2)
    assert mesh.shape == {"data": 4, "model": 2}
    with pytest.raises(ValueError, match="must divide"):
        parallel.make_mesh(model_axis_size=3)
    parallel.check_batch_size(8, mesh)
    with pytest.raises(ValueError, match="multiple of the 4 data-parallel devices"):
        parallel.check_batch_size(6, mesh)


def test_to_host_round_trip(rng):
    mesh = parallel.make_mesh()
    x = rng.normal(size=(8, 3)).astype(np.float32)
    np.testing.assert_array_equal(parallel.to_host(parallel.shard_batch(x, mesh)), x)


def test_initialize_distributed_is_a_no_op_when_disabled():
    parallel.initialize_distributed(False)
    assert jax.process_count() == 1

"""``models.fingerprint``: the identity of the function a checkpoint computes."""

import hashlib
import json
import shutil

import jax
import numpy as np

from advalign_jax.models import fingerprint, get_model, load_model, save_model


def test_fingerprint_tells_variables_apart_and_survives_a_move(tmp_path):
    model = get_model("mlp2")
    a = model.init(jax.random.PRNGKey(0))
    b = model.init(jax.random.PRNGKey(1))
    fa = fingerprint(model.name, model.options, a)
    assert len(fa) == 64 and fa != fingerprint(model.name, model.options, b)
    # One changed number, or the same numbers as another architecture's options, is another function.
    nudged = jax.tree.map(np.array, a)
    nudged["params"]["fc1"]["bias"][0] += 1e-3
    assert fingerprint(model.name, model.options, nudged) != fa
    assert fingerprint(model.name, {**model.options, "hidden": 33}, a) != fa
    # Saved, moved to another directory and reloaded: the same fingerprint.
    first = save_model(str(tmp_path / "here"), model, a)
    (tmp_path / "elsewhere").mkdir()
    moved = shutil.move(first, str(tmp_path / "elsewhere" / "there"))
    reloaded, variables = load_model(moved)
    assert fingerprint(reloaded.name, reloaded.options, variables) == fa


def test_fingerprint_is_the_documented_digest():
    variables = {"params": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}}
    h = hashlib.sha256()
    h.update(json.dumps({"arch": "x", "options": {"k": [1, 2]}}, sort_keys=True).encode())
    h.update(b"['params']['w']")
    h.update(b"<f4(2, 3)")
    h.update(variables["params"]["w"].tobytes())
    assert fingerprint("x", {"k": (1, 2)}, variables) == h.hexdigest()

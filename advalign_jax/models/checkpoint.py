"""Model checkpoints: an orbax checkpoint of the variables plus ``model.json`` saying what they are.

Layout of a model directory (what ``advalign-jax convert`` and training write, what every command
loads by path)::

    DIR/model.json     {"format": "advalign_jax.model", "version": 1, "arch": ..., "options": {...},
                        "source": ..., "num_params": ...}
    DIR/variables/     orbax checkpoint of {"params": ..., "batch_stats": ...}

:func:`load_model` rebuilds the architecture from ``model.json`` and checks every variable's shape
against it, listing all mismatches at once. :func:`fingerprint` identifies the function a checkpoint
computes (architecture, options and every variable's bytes).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from advalign_jax.errors import AdvalignError
from advalign_jax.models import registry
from advalign_jax.models.base import InputNorm, Model, count_params
from advalign_jax.models.importers import ImportMismatch, _flat_shapes

FORMAT = "advalign_jax.model"
VERSION = 1


def _json_options(options: Mapping[str, Any]) -> dict:
    out = {}
    for k, v in options.items():
        if isinstance(v, InputNorm):
            v = v.to_dict()
        elif isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out


def _from_json_options(options: Mapping[str, Any]) -> dict:
    out = dict(options)
    if isinstance(out.get("norm"), Mapping):
        out["norm"] = InputNorm.from_dict(out["norm"])
    return {k: tuple(v) if isinstance(v, list) else v for k, v in out.items()}


def _local_checkpointer():
    """An orbax checkpointer that this process uses on its own: in a multi-process run a model directory
    is written by one process and read by each process by itself, with no barrier across processes."""
    if jax.process_count() == 1:
        return ocp.StandardCheckpointer()
    me = jax.process_index()
    return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"local{me}"))


def save_model(path: str, model: Model, variables: Mapping, source: str = "", overwrite: bool = False) -> str:
    """Writes ``variables`` of ``model`` to the directory ``path`` (atomically: written beside it, then
    renamed)."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not overwrite:
        raise AdvalignError(f"{path} already exists (pass --overwrite to replace it)")
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        state = {k: v for k, v in variables.items() if k in ("params", "batch_stats")}
        state = jax.tree.map(np.asarray, state)
        with _local_checkpointer() as ckptr:
            ckptr.save(os.path.join(tmp, "variables"), state)
        meta = {"format": FORMAT, "version": VERSION, "arch": model.name,
                "options": _json_options(model.options), "source": source,
                "num_params": count_params(state)}
        with open(os.path.join(tmp, "model.json"), "w") as f:
            json.dump(meta, f, indent=1)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_meta(path: str) -> dict:
    meta_path = os.path.join(path, "model.json")
    if not os.path.isdir(path):
        raise AdvalignError(f"{path}: not a model directory (expected a folder written by "
                            "`advalign-jax convert` or by training)")
    if not os.path.isfile(meta_path):
        raise AdvalignError(f"{path}: no model.json; not an advalign_jax model checkpoint")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except ValueError:
        raise AdvalignError(f"{meta_path}: not valid JSON") from None
    if meta.get("format") != FORMAT:
        raise AdvalignError(f"{meta_path}: not an advalign_jax model description")
    return meta


def check_shapes(variables: Mapping, model: Model, what: str) -> None:
    """Raises ImportMismatch listing every variable whose presence or shape differs from the model's."""
    want = {k: tuple(v.shape) for k, v in _flat_shapes(model.variable_shapes()).items()}
    have = {k: tuple(np.shape(v)) for k, v in _flat_shapes(variables).items()}
    missing = [k for k in want if k not in have]
    unexpected = [k for k in have if k not in want]
    misshaped = [f"{k} {have[k]} (model: {want[k]})" for k in want if k in have and have[k] != want[k]]
    if missing or unexpected or misshaped:
        parts = [f"{len(items)} {label}: {'; '.join(items[:8])}" + (" ..." if len(items) > 8 else "")
                 for label, items in (("missing", missing), ("unexpected", unexpected),
                                      ("mis-shaped", misshaped)) if items]
        raise ImportMismatch(f"{what} does not fit {model.name} ({model.num_classes} classes): "
                             + " | ".join(parts))


def load_model(path: str, arch: Optional[str] = None, **overrides: Any) -> tuple[Model, dict]:
    """(model, variables) from a model directory.

    ``arch`` (optional) must match the checkpoint's architecture; ``overrides`` change build options
    that do not affect the variables (``dtype``, ``remat``) or must agree with them (``num_classes``).
    """
    path = os.path.abspath(path)
    meta = read_meta(path)
    options = _from_json_options(meta["options"])
    if arch is not None and arch != meta["arch"]:
        raise AdvalignError(f"{path} holds a {meta['arch']} ({options.get('num_classes')} classes), "
                            f"not a {arch}")
    if "num_classes" in overrides and overrides["num_classes"] != options.get("num_classes"):
        raise AdvalignError(f"{path} holds a {meta['arch']} with {options.get('num_classes')} classes, "
                            f"not {overrides['num_classes']}")
    model = registry.get_model(meta["arch"], **{**options, **overrides})
    with _local_checkpointer() as ckptr:
        try:
            variables = ckptr.restore(os.path.join(path, "variables"))
        except Exception as err:  # orbax raises several types for unreadable directories
            raise AdvalignError(f"{path}: the variables could not be read ({type(err).__name__})") from None
    variables = jax.tree.map(np.asarray, dict(variables))
    check_shapes(variables, model, path)
    return model, variables


def fingerprint(arch: str, options: Mapping[str, Any], variables) -> str:
    """sha256 of the architecture, its options and every variable (path, dtype, shape, bytes): two
    checkpoints share a fingerprint only if they compute the same function.

    The digest takes ``json.dumps({"arch": arch, "options": options}, sort_keys=True)`` (the options made
    JSON-plain, other types as ``str``), then for each leaf of ``variables`` in ``jax.tree_util`` order
    its ``keystr`` path, ``dtype.str`` + shape and its C-contiguous bytes; so it does not depend on where
    the checkpoint is stored or how often it was saved and reloaded.
    """
    h = hashlib.sha256()
    plain = json.loads(json.dumps(options.to_dict() if hasattr(options, "to_dict") else options, default=str))
    h.update(json.dumps({"arch": arch, "options": plain}, sort_keys=True, default=str).encode())
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()

"""Reading checkpoint files into flat ``{name: array}`` dicts.

Readers (each returns a flat dict of NumPy arrays keyed by the source's own parameter names):

- :func:`read_safetensors`: ``.safetensors`` parsed with NumPy alone (F32/F16/BF16/integer tensors);
- :func:`read_torch`: ``.pth`` / ``.pt`` / ``.bin`` PyTorch state dicts (needs ``torch``), including the
  ``robustness`` library's ``DataParallel(AttackerModel)`` checkpoints
  (:mod:`advalign_jax.models.robustness_format`);
- :func:`read_keras_h5`: Keras ``.h5`` files, whole saved models or weights only, Keras 2 or 3
  (names like ``conv1_conv/kernel``; Keras 2's ``:0`` suffix dropped);
- :func:`read_keras_archive`: Keras 3 ``.keras`` archives (loaded with Keras itself).

:func:`read` picks the reader from the file's content, not only its name, and says in one line what the
file held; :func:`read_checkpoint` returns only ``(family, weights)``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import zipfile
from typing import Any, Mapping, Optional

import h5py
import numpy as np

try:
    from numpy._core import multiarray as _multiarray  # NumPy 2
except ImportError:  # NumPy 1.26
    from numpy.core import multiarray as _multiarray

from advalign_jax.data.tf_env import import_tf
from advalign_jax.errors import AdvalignError
from advalign_jax.models import robustness_format

_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
                       "I8": "i1", "U8": "u1", "BOOL": "?"}


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint file held: ``family`` ('torch', 'keras' or 'robustness': which importer of an
    architecture applies), the flat ``weights``, and for the one-line report ``kind`` (the format, e.g.
    'PyTorch state dict'), ``count`` (tensors of the model) and ``notes`` (what else was read or
    dropped)."""

    family: str
    weights: dict
    kind: str
    count: int
    notes: str = ""

    def summary(self, arch: str) -> str:
        return f"{self.kind}: {self.count} tensors for {arch}" + (f", {self.notes}" if self.notes else "")


def read_safetensors(path: str) -> dict:
    """A ``.safetensors`` file as {name: float32/int array}, with NumPy only (BF16 widened to float32).

    Format: 8-byte little-endian header length, a JSON header ``{name: {dtype, shape, data_offsets}}``,
    then the raw little-endian tensor bytes.
    """
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        raise AdvalignError(f"{path}: not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", raw[:8])
    try:
        header = json.loads(raw[8:8 + n])
    except (ValueError, UnicodeDecodeError):
        raise AdvalignError(f"{path}: not a safetensors file (no JSON header)") from None
    data = memoryview(raw)[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = info["dtype"]
        if dtype == "BF16":
            bits = np.frombuffer(data[start:end], "<u2").astype(np.uint32) << 16
            array = bits.view(np.float32)
        elif dtype in _SAFETENSORS_DTYPES:
            array = np.frombuffer(data[start:end], _SAFETENSORS_DTYPES[dtype])
        else:
            raise AdvalignError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        out[name] = np.array(array).reshape(info["shape"])
    return out


# NumPy scalars and arrays that training scripts store beside the weights (an accuracy, a step count):
# plain numbers, which torch's weights-only unpickler refuses unless they are allowed by name (under
# NumPy 1's module name and NumPy 2's, whichever wrote the file).
_NUMPY_GLOBALS = (np.ndarray, np.dtype, *(type(np.dtype(t)) for t in ("f8", "f4", "f2", "i8", "i4", "i2", "i1",
                                                                      "u8", "u4", "u2", "u1", "?")),
                  *((getattr(_multiarray, fn), f"numpy.{core}.multiarray.{fn}") for fn in ("scalar", "_reconstruct")
                    for core in ("core", "_core")))


def _load_torch(path: str) -> Any:
    """The object of a torch file, loaded with torch's weights-only unpickler (tensors, containers,
    numbers; never arbitrary code)."""
    try:
        import torch  # optional: only to read PyTorch files
    except ImportError:
        raise AdvalignError(f"{path}: reading PyTorch files needs torch (pip install torch); or save the "
                            "state dict as .safetensors, which is read without it") from None
    try:
        with torch.serialization.safe_globals(list(_NUMPY_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors vary across versions
        first = str(err).splitlines()[0] if str(err) else ""
        raise AdvalignError(f"{path}: not a PyTorch checkpoint ({type(err).__name__}: {first})") from None


def _torch_state(obj: Any, path: str) -> dict:
    """{name: array} of the state dict in a loaded torch object: unwraps ``state_dict``/``model``/
    ``model_state_dict``/``net`` wrappers and drops DataParallel's ``module.`` prefix."""
    for key in ("state_dict", "model", "model_state_dict", "net"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise AdvalignError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    out = {}
    for name, value in obj.items():
        if hasattr(value, "detach"):
            if value.is_floating_point():
                value = value.detach().float().numpy()
            else:
                value = value.detach().numpy()
            out[name[len("module."):] if name.startswith("module.") else name] = np.asarray(value)
    if not out:
        raise AdvalignError(f"{path}: holds no tensors")
    return out


def read_torch(path: str) -> dict:
    """A PyTorch state dict (``.pth``/``.pt``/``.bin``) as {name: array}; unwraps ``state_dict``/``model``
    wrappers and DataParallel's ``module.`` prefix (a robustness-library checkpoint is returned as
    :func:`read` returns its weights)."""
    return _read_torch(path).weights


def _read_torch(path: str) -> Checkpoint:
    obj = _load_torch(path)
    state = _torch_state(obj, path)
    if robustness_format.is_robustness_state(state):
        epoch = _number(obj.get("epoch")) if isinstance(obj, Mapping) else None
        return _robustness(state, path, "robustness-library checkpoint" + (f" (epoch {epoch})" if epoch is not None
                                                                            else ""))
    return Checkpoint("torch", state, "PyTorch state dict", len(state))


def _robustness(state: Mapping, path: str, kind: str) -> Checkpoint:
    weights, count = robustness_format.split_state(state, path)
    return Checkpoint("robustness", weights, kind, count, robustness_format.describe(weights))


def _number(value) -> Optional[int]:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def read_keras_h5(path: str) -> dict:
    """A Keras ``.h5`` (whole model or weights only; Keras 2 or Keras 3 legacy format) as
    {'layer/weight': array}."""
    try:
        f = h5py.File(path, "r")
    except OSError:
        raise AdvalignError(f"{path}: not an HDF5 file") from None
    with f:
        root = f["model_weights"] if "model_weights" in f else f
        if "layer_names" not in root.attrs:
            if "layers" in f:
                raise AdvalignError(f"{path}: a Keras 3 '.weights.h5' file, whose layers are unnamed; "
                                    "convert the '.keras' archive or a model saved as legacy '.h5'")
            raise AdvalignError(f"{path}: an HDF5 file but not a Keras model or weights file")
        out = {}
        for layer in _strings(root.attrs["layer_names"]):
            group = root[layer]
            for weight in _strings(group.attrs.get("weight_names", [])):
                key = weight[:-2] if weight.endswith(":0") else weight
                if not key.startswith(layer + "/") and "/" not in key:
                    key = f"{layer}/{key}"
                if key in out:
                    key = f"{layer}/{key}"
                out[key] = np.asarray(group[weight])
    if not out:
        raise AdvalignError(f"{path}: a Keras file without weights")
    return out


def read_keras_archive(path: str) -> dict:
    """A Keras 3 ``.keras`` archive, loaded with Keras, as {'layer/weight': array}."""
    import_tf()
    import keras  # optional and heavy: only to read .keras archives, after TensorFlow is set up

    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as err:
        raise AdvalignError(f"{path}: Keras could not load this archive ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}); save the model as legacy "
                            "'.h5' instead") from None
    out = {}
    for layer in model.layers:
        for weight in layer.weights:
            base = weight.path.split("/")[-1] if hasattr(weight, "path") else weight.name.split("/")[-1]
            out[f"{layer.name}/{base.split(':')[0]}"] = np.asarray(weight.numpy())
    return out


def _strings(values) -> list:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def detect_format(path: str) -> str:
    """'safetensors', 'torch', 'keras_h5' or 'keras_archive' from the file's first bytes."""
    if not os.path.isfile(path):
        raise AdvalignError(f"{path}: file not found")
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        return "keras_h5"
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile:
            raise AdvalignError(f"{path}: a damaged zip archive, not a checkpoint") from None
        if "config.json" in names and "model.weights.h5" in names:
            return "keras_archive"
        if any(n.endswith("data.pkl") for n in names):
            return "torch"
        raise AdvalignError(f"{path}: a zip archive that is neither a PyTorch nor a Keras checkpoint")
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":  # a legacy (non-zip) torch pickle
        return "torch"
    raise AdvalignError(f"{path}: not a checkpoint (expected .safetensors, a PyTorch .pth/.bin, "
                        "a Keras .h5 or a .keras archive)")


READERS = {"safetensors": read_safetensors, "torch": read_torch, "keras_h5": read_keras_h5,
           "keras_archive": read_keras_archive}
FAMILY = {"safetensors": "torch", "torch": "torch", "keras_h5": "keras", "keras_archive": "keras"}
KINDS = {"safetensors": "safetensors file", "keras_h5": "Keras .h5 file", "keras_archive": "Keras archive"}


def read(path: str) -> Checkpoint:
    """The checkpoint in ``path``, its format detected from the content (see :func:`detect_format`); a
    torch file in the robustness library's layout has family 'robustness'."""
    fmt = detect_format(path)
    if fmt == "torch":
        return _read_torch(path)
    weights = READERS[fmt](path)
    if fmt == "safetensors":  # a robustness-library state dict saved as safetensors
        state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in weights.items()}
        if robustness_format.is_robustness_state(state):
            return _robustness(state, path, "robustness-library state dict (safetensors)")
    return Checkpoint(FAMILY[fmt], weights, KINDS[fmt], len(weights))


def read_checkpoint(path: str) -> tuple[str, dict]:
    """(family, flat weights) where family is 'torch' (timm/torchvision names), 'keras' or 'robustness'
    (the classifier's torch names plus the normaliser; see :mod:`~advalign_jax.models.robustness_format`)."""
    checkpoint = read(path)
    return checkpoint.family, checkpoint.weights

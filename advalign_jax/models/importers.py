"""Weight import: reading checkpoint files into flat ``{name: array}`` dicts, and readable mapping tables.

Readers (each returns a flat dict of NumPy arrays keyed by the source's own parameter names):

- :func:`read_safetensors`: ``.safetensors`` parsed with NumPy alone (F32/F16/BF16/integer tensors);
- :func:`read_torch`: ``.pth`` / ``.pt`` / ``.bin`` PyTorch state dicts (needs ``torch``);
- :func:`read_keras_h5`: Keras ``.h5`` files, whole saved models or weights only, Keras 2 or 3
  (names like ``conv1_conv/kernel``; Keras 2's ``:0`` suffix dropped);
- :func:`read_keras_archive`: Keras 3 ``.keras`` archives (loaded with Keras itself).

:func:`read_checkpoint` picks the reader from the file's content, not only its name.

Mapping: an architecture describes its import as a list of :class:`Rule` (target path in the flax
variables, source name, transform). :func:`assemble` applies the table and collects **every**
missing, unexpected and mis-shaped tensor before failing, in one :class:`ImportMismatch`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import zipfile
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from advalign_jax.errors import AdvalignError


class ImportMismatch(AdvalignError):
    """A checkpoint that does not fit the architecture; the message lists every mismatch."""


# ----------------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
                       "I8": "i1", "U8": "u1", "BOOL": "?"}


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


def read_torch(path: str) -> dict:
    """A PyTorch state dict (``.pth``/``.pt``/``.bin``) as {name: array}; unwraps ``state_dict``/``model``
    wrappers and DataParallel's ``module.`` prefix."""
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
        raise AdvalignError(f"{path}: reading PyTorch files needs torch (pip install torch); or save the "
                            "state dict as .safetensors, which is read without it") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors vary across versions
        raise AdvalignError(f"{path}: not a PyTorch checkpoint ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''})") from None
    for key in ("state_dict", "model", "model_state_dict", "net"):
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping):
        raise AdvalignError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    out = {}
    for name, value in obj.items():
        if hasattr(value, "detach"):
            value = value.detach().to(torch.float32).numpy() if value.is_floating_point() else value.numpy()
            out[name[len("module."):] if name.startswith("module.") else name] = np.asarray(value)
    if not out:
        raise AdvalignError(f"{path}: holds no tensors")
    return out


def read_keras_h5(path: str) -> dict:
    """A Keras ``.h5`` (whole model or weights only; Keras 2 or Keras 3 legacy format) as
    {'layer/weight': array}."""
    import h5py  # pylint: disable=import-outside-toplevel

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
    from advalign_jax.data.tf_env import import_tf  # pylint: disable=import-outside-toplevel

    import_tf()
    import keras  # pylint: disable=import-outside-toplevel

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


def read_checkpoint(path: str) -> tuple[str, dict]:
    """(family, flat weights) where family is 'torch' (timm/torchvision names) or 'keras'."""
    fmt = detect_format(path)
    return FAMILY[fmt], READERS[fmt](path)


# ----------------------------------------------------------------------------------------------------
# Mapping tables
# ----------------------------------------------------------------------------------------------------

def _conv_torch(w):  # (O, I, kh, kw) -> (kh, kw, I, O); depthwise (C, 1, kh, kw) -> (kh, kw, 1, C)
    return np.transpose(w, (2, 3, 1, 0))


def _dense_torch(w):  # (out, in) -> (in, out)
    return np.transpose(w, (1, 0))


def _dwconv_keras(w):  # Keras depthwise (kh, kw, C, 1) -> flax grouped conv (kh, kw, 1, C)
    return np.transpose(w, (0, 1, 3, 2))


TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda w: w,
    "conv_torch": _conv_torch,
    "dense_torch": _dense_torch,
    "dwconv_keras": _dwconv_keras,
}


@dataclasses.dataclass(frozen=True)
class Rule:
    """One row of a mapping table: ``target`` ('params/stem/conv/kernel') <- ``source`` name.

    ``transform`` is a key of :data:`TRANSFORMS` or a function of the source array(s); ``source`` may
    be a tuple of names when several source tensors make one target (e.g. a fused qkv weight).
    """

    target: str
    source: str | tuple
    transform: str | Callable = "identity"

    def apply(self, arrays):
        fn = TRANSFORMS[self.transform] if isinstance(self.transform, str) else self.transform
        return fn(*arrays) if isinstance(self.source, tuple) else fn(arrays[0])


def torch_conv(target: str, source: str, bias: bool = False) -> list:
    rules = [Rule(f"params/{target}/kernel", f"{source}.weight", "conv_torch")]
    if bias:
        rules.append(Rule(f"params/{target}/bias", f"{source}.bias"))
    return rules


def torch_dense(target: str, source: str) -> list:
    return [Rule(f"params/{target}/kernel", f"{source}.weight", "dense_torch"),
            Rule(f"params/{target}/bias", f"{source}.bias")]


def torch_bn(target: str, source: str) -> list:
    return [Rule(f"params/{target}/scale", f"{source}.weight"), Rule(f"params/{target}/bias", f"{source}.bias"),
            Rule(f"batch_stats/{target}/mean", f"{source}.running_mean"),
            Rule(f"batch_stats/{target}/var", f"{source}.running_var")]


def torch_ln(target: str, source: str) -> list:
    return [Rule(f"params/{target}/scale", f"{source}.weight"), Rule(f"params/{target}/bias", f"{source}.bias")]


def keras_conv(target: str, source: str, bias: bool = True, depthwise: bool = False) -> list:
    if depthwise:
        rules = [Rule(f"params/{target}/kernel", f"{source}/depthwise_kernel", "dwconv_keras")]
    else:
        rules = [Rule(f"params/{target}/kernel", f"{source}/kernel")]
    if bias:
        rules.append(Rule(f"params/{target}/bias", f"{source}/bias"))
    return rules


def keras_dense(target: str, source: str) -> list:
    return [Rule(f"params/{target}/kernel", f"{source}/kernel"), Rule(f"params/{target}/bias", f"{source}/bias")]


def keras_bn(target: str, source: str, scale: bool = True, center: bool = True) -> list:
    rules = [Rule(f"batch_stats/{target}/mean", f"{source}/moving_mean"),
             Rule(f"batch_stats/{target}/var", f"{source}/moving_variance")]
    if scale:
        rules.append(Rule(f"params/{target}/scale", f"{source}/gamma"))
    if center:
        rules.append(Rule(f"params/{target}/bias", f"{source}/beta"))
    return rules


def keras_ln(target: str, source: str) -> list:
    return [Rule(f"params/{target}/scale", f"{source}/gamma"), Rule(f"params/{target}/bias", f"{source}/beta")]


def _flat_shapes(tree, prefix=()) -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat_shapes(v, prefix + (k,)))
        else:
            out["/".join(prefix + (k,))] = v
    return out


def _unflatten(flat: Mapping) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def assemble(rules: Sequence[Rule], source: Mapping[str, np.ndarray], expected: Mapping,
             ignore: Iterable[str] = (), what: str = "checkpoint") -> dict:
    """Builds variables from ``source`` with ``rules``; ``expected`` is the model's variable-shape tree.

    Raises :class:`ImportMismatch` listing every source tensor a rule needs that is missing, every
    source tensor no rule uses (except names containing a string of ``ignore``), every tensor whose
    shape differs from the model's, and every model variable no rule fills.
    """
    shapes = _flat_shapes(expected)
    ignore = tuple(ignore)
    missing, misshaped, unfilled = [], [], []
    used = set()
    out = {}
    for rule in rules:
        names = rule.source if isinstance(rule.source, tuple) else (rule.source,)
        absent = [n for n in names if n not in source]
        if absent:
            missing.extend(absent)
            continue
        used.update(names)
        array = np.asarray(rule.apply([source[n] for n in names]))
        if rule.target not in shapes:
            misshaped.append(f"{'+'.join(names)} -> {rule.target} (no such variable in the model)")
            continue
        want = tuple(shapes[rule.target].shape)
        if tuple(array.shape) != want:
            misshaped.append(f"{'+'.join(names)} {tuple(array.shape)} -> {rule.target} expects {want}")
            continue
        out[rule.target] = array.astype(shapes[rule.target].dtype)
    unexpected = [n for n in source if n not in used and not any(s in n for s in ignore)]
    unfilled = [t for t in shapes if t not in out and not any(t == r.target for r in rules)]
    if missing or unexpected or misshaped or unfilled:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped),
                             ("not provided", unfilled)):
            if items:
                shown = "; ".join(items[:12]) + (f"; ... ({len(items) - 12} more)" if len(items) > 12 else "")
                parts.append(f"{len(items)} {label}: {shown}")
        raise ImportMismatch(f"{what} does not fit: " + " | ".join(parts))
    return _unflatten(out)


def infer_num_classes(source: Mapping[str, np.ndarray], head_name: str, family: str) -> Optional[int]:
    """Number of classes from the head's bias (or weight), if the head is present."""
    for key in (f"{head_name}.bias", f"{head_name}/bias"):
        if key in source:
            return int(source[key].shape[0])
    for key, axis in ((f"{head_name}.weight", 0), (f"{head_name}/kernel", -1)):
        if key in source:
            return int(source[key].shape[axis])
    return None


@dataclasses.dataclass(frozen=True)
class Importer:
    """How one source family's checkpoints map onto an architecture.

    ``rules(model)`` returns the mapping table for the built model; ``infer(weights)`` reads build
    options off the checkpoint (``num_classes`` from the head, variants); ``ignore`` lists substrings of
    source names that carry nothing to import (``num_batches_tracked``); ``norm`` is the input
    normalisation that checkpoints of this family expect unless the user says otherwise.
    ``rename(weights)`` (optional) returns the weights under canonical names before the table is
    applied, for sources whose names vary between library versions (auto-numbered Keras variables,
    nested-layer prefixes); ``infer`` still sees the original names.
    """

    rules: Callable
    infer: Callable[[Mapping], dict] = lambda weights: {}
    ignore: tuple = ()
    norm: Optional[str] = None
    description: str = ""
    rename: Optional[Callable[[Mapping], dict]] = None

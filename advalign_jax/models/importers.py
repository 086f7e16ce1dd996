"""Weight import: readable mapping tables from a checkpoint's names onto the flax variables.

An architecture describes its import as a list of :class:`Rule` (target path in the flax variables,
source name, transform) and registers an :class:`Importer` per source family. :func:`assemble` applies
the table and collects **every** missing, unexpected and mis-shaped tensor before failing, in one
:class:`ImportMismatch`.

Reading the files is :mod:`advalign_jax.models.readers` (its public functions are importable from here
too: ``importers.read_checkpoint``, ``importers.detect_format``, ``importers.read_safetensors``, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from advalign_jax.errors import AdvalignError
from advalign_jax.models import robustness_format
from advalign_jax.models.readers import (FAMILY, READERS, Checkpoint, detect_format, read,  # noqa: F401
                                         read_checkpoint, read_keras_archive, read_keras_h5, read_safetensors,
                                         read_torch)


class ImportMismatch(AdvalignError):
    """A checkpoint that does not fit the architecture; the message lists every mismatch."""


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


def robustness_importer(torch_importer: Importer) -> Importer:
    """The importer of robustness-library checkpoints (:mod:`~advalign_jax.models.robustness_format`) for
    an architecture whose classifier that library saves under the names ``torch_importer`` reads: the
    same table, and the input normalisation taken from the checkpoint's own normaliser
    (``(x - new_mean) / new_std``) instead of the family default."""
    infer = torch_importer.infer
    return dataclasses.replace(
        torch_importer, infer=lambda weights: {**infer(weights), "norm": robustness_format.checkpoint_norm(weights)},
        ignore=tuple(torch_importer.ignore) + robustness_format.NORMALISER, norm=None,
        description=f"robustness-library checkpoints (DataParallel(AttackerModel), their own normaliser); "
                    f"classifier: {torch_importer.description}")

"""The checkpoint layout of the Madry lab's ``robustness`` library (and microsoft/robust-models-transfer).

Those libraries train and release their robust models (Engstrom, Ilyas, Salman, Santurkar, Tsipras,
"Robustness (Python library)", 2019, github.com/MadryLab/robustness; Salman et al., "Do Adversarially
Robust ImageNet Models Transfer Better?", NeurIPS 2020, github.com/microsoft/robust-models-transfer) as a
torch file (``checkpoint.pt.best``, ``checkpoint.pt.latest`` or any name) holding::

    {'model': state dict of DataParallel(AttackerModel), 'optimizer': ..., 'schedule': ..., 'epoch': int, ...}

(``'state_dict'`` instead of ``'model'`` in older files). ``AttackerModel`` (``robustness/attacker.py``)
holds the classifier as ``model``, the input normaliser as ``normalizer`` and an ``Attacker`` that holds
the same classifier object again (``attacker.model``) with its own copy of the normaliser
(``attacker.normalize``). So the keys are::

    module.model.<classifier name>            the classifier (torchvision or robustness.cifar_models names)
    module.attacker.model.<classifier name>   the same tensors again
    module.normalizer.new_mean, .new_std      shape (3, 1, 1)
    module.attacker.normalize.new_mean, ...   the same normaliser again

and the model computes ``classifier((clamp(x, 0, 1) - new_mean) / new_std)`` on images ``x`` in [0, 1]
(``robustness/tools/helpers.py``, ``InputNormalize``). The import keeps the classifier's tensors under
their own names plus the normaliser as ``normalizer.new_mean`` / ``normalizer.new_std`` of shape (3,),
which the architecture's ``robustness`` importer turns into the model's :class:`InputNorm`
(``(x - mean) / std``; the clamp is the identity on the [0, 1] images every attack here keeps to).

This module reads the layout only (plain dicts of arrays, after the reader has dropped DataParallel's
``module.`` prefix); it has no dependency on torch.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from advalign_jax.errors import AdvalignError
from advalign_jax.models.base import InputNorm

MODEL = "model."
ATTACKER = "attacker.model."
MEAN = "normalizer.new_mean"
STD = "normalizer.new_std"
NORMALISER = (MEAN, STD)
ATTACKER_NORMALISER = ("attacker.normalize.new_mean", "attacker.normalize.new_std")


def is_robustness_state(state: Mapping) -> bool:
    """Whether a state dict (``module.`` already dropped) is an ``AttackerModel``'s: it has the attacker's
    copy of the classifier or the normaliser's buffers."""
    return any(k.startswith(ATTACKER) or k in NORMALISER for k in state)


def split_state(state: Mapping[str, np.ndarray], path: str) -> tuple[dict, int]:
    """(weights, number of classifier tensors) of an ``AttackerModel`` state dict.

    ``weights`` holds the classifier's tensors under their own names, the normaliser as
    ``normalizer.new_mean`` / ``normalizer.new_std`` of shape (3,), and any other tensor under its name
    (for the importer to report). Raises :class:`AdvalignError` (one line) when the classifier is absent,
    when ``model`` and ``attacker.model`` do not hold the same names, or when the normaliser is missing
    or not 3 positive standard deviations.
    """
    model = {k[len(MODEL):]: v for k, v in state.items() if k.startswith(MODEL)}
    attacker = {k[len(ATTACKER):] for k in state if k.startswith(ATTACKER)}
    where = f"{path}: a robustness-library checkpoint (DataParallel(AttackerModel) state dict)"
    if not model:
        raise AdvalignError(f"{where} without the classifier (no module.model.* tensors)")
    if attacker != set(model):
        only_model = sorted(set(model) - attacker)
        only_attacker = sorted(attacker - set(model))
        parts = [f"{len(names)} only in module.{label}: {'; '.join(names[:4])}" + (" ..." if len(names) > 4 else "")
                 for label, names in (("model", only_model), ("attacker.model", only_attacker)) if names]
        raise AdvalignError(f"{where} whose classifier and attacker copies differ in names ({' | '.join(parts)}); "
                            "the file is damaged or was edited")
    absent = [k for k in NORMALISER if k not in state]
    if absent:
        raise AdvalignError(f"{where} without its normaliser (no module.{' or module.'.join(absent)}); the "
                            "input normalisation the model was trained with is unknown")
    mean, std = (np.asarray(state[k], np.float64).reshape(-1) for k in NORMALISER)
    if mean.shape != (3,) or std.shape != (3,) or not np.all(std > 0):
        raise AdvalignError(f"{where} whose normaliser is not 3 means and 3 positive standard deviations "
                            f"(new_mean {np.shape(state[MEAN])}, new_std {np.shape(state[STD])})")
    known = set(NORMALISER) | set(ATTACKER_NORMALISER)
    others = {k: v for k, v in state.items() if not k.startswith((MODEL, ATTACKER)) and k not in known}
    weights = {**model, **others, MEAN: np.asarray(state[MEAN], np.float32).reshape(3),
               STD: np.asarray(state[STD], np.float32).reshape(3)}
    return weights, len(model)


def checkpoint_norm(weights: Mapping[str, np.ndarray]) -> InputNorm:
    """The model's input normalisation ``(x - new_mean) / new_std`` from the checkpoint's normaliser."""
    mean, std = (tuple(float(v) for v in np.asarray(weights[k]).reshape(3)) for k in NORMALISER)
    return InputNorm(mean, std)


def describe(weights: Mapping[str, np.ndarray]) -> str:
    """What the import takes from the wrapper besides the classifier, for the one-line report."""
    norm = checkpoint_norm(weights)
    fmt = lambda values: "(" + ", ".join(f"{v:.4g}" for v in values) + ")"  # noqa: E731
    return f"normaliser mean {fmt(norm.mean)} std {fmt(norm.std)}; the duplicate attacker copy ignored"

"""``advalign-jax convert``: a timm/torchvision/Keras/robustness-library checkpoint -> an advalign_jax model
directory."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from advalign_jax.errors import AdvalignError
from advalign_jax.models import importers, readers, registry
from advalign_jax.models.base import Model
from advalign_jax.models.checkpoint import save_model

# How the error messages name each family of checkpoints.
FAMILY_NAMES = {"torch": "torch", "keras": "keras", "robustness": "robustness-library"}


@dataclasses.dataclass(frozen=True)
class Conversion:
    """What :func:`convert_checkpoint` did: the built ``model``, the directory ``path`` it wrote, and
    ``found``, one line saying what the source file held."""

    model: Model
    path: str
    found: str


def import_weights(weights: Mapping, family: str, arch: str, what: str = "checkpoint",
                   **overrides: Any) -> tuple[Model, dict]:
    """(model, variables) from flat source weights of ``family`` ('torch', 'keras' or 'robustness')."""
    definition = registry.get_def(arch)
    importer = definition.importers.get(family)
    if importer is None:
        have = ", ".join(sorted(definition.importers)) or "none"
        able = [name for name in registry.list_models() if family in registry.get_def(name).importers]
        label = FAMILY_NAMES.get(family, family)
        raise AdvalignError(f"{what}: {arch} has no importer for {label} checkpoints (it has: {have}); the "
                            f"architectures that import them: {', '.join(able) or 'none'}")
    options = dict(importer.infer(weights))
    if importer.norm is not None:
        options["norm"] = importer.norm
    for key, value in overrides.items():
        if value is not None:
            options[key] = value
    model = registry.get_model(arch, **options)
    if importer.rename is not None:
        weights = importer.rename(weights)
    variables = importers.assemble(importer.rules(model), weights, model.variable_shapes(),
                                   ignore=importer.ignore, what=f"{what} (as {arch})")
    return model, variables


def convert_checkpoint(source: str, arch: str, out: str, overwrite: bool = False, **overrides: Any) -> Conversion:
    """Reads ``source``, maps it onto ``arch`` and writes the model directory ``out``; nothing is
    written when the file does not fit."""
    registry.get_def(arch)  # unknown names fail before the file is read
    checkpoint = readers.read(source)
    model, variables = import_weights(checkpoint.weights, checkpoint.family, arch, what=source, **overrides)
    path = save_model(out, model, variables, source=source, overwrite=overwrite)
    return Conversion(model, path, checkpoint.summary(arch))


def convert(source: str, arch: str, out: str, overwrite: bool = False, **overrides: Any) -> tuple[Model, str]:
    """(model, directory written): :func:`convert_checkpoint` without the report."""
    done = convert_checkpoint(source, arch, out, overwrite=overwrite, **overrides)
    return done.model, done.path

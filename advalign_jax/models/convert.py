"""``advalign-jax convert``: a timm/torchvision/Keras checkpoint -> an advalign_jax model directory."""

from __future__ import annotations

from typing import Any, Mapping

from advalign_jax.errors import AdvalignError
from advalign_jax.models import importers, registry
from advalign_jax.models.base import Model
from advalign_jax.models.checkpoint import save_model


def import_weights(weights: Mapping, family: str, arch: str, what: str = "checkpoint",
                   **overrides: Any) -> tuple[Model, dict]:
    """(model, variables) from flat source weights of ``family`` ('torch' or 'keras')."""
    definition = registry.get_def(arch)
    importer = definition.importers.get(family)
    if importer is None:
        have = ", ".join(sorted(definition.importers)) or "none"
        raise AdvalignError(f"{what}: {arch} has no importer for {family} checkpoints (it has: {have})")
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


def convert(source: str, arch: str, out: str, overwrite: bool = False, **overrides: Any) -> tuple[Model, str]:
    """Reads ``source``, maps it onto ``arch`` and writes the model directory ``out``."""
    registry.get_def(arch)  # unknown names fail before the file is read
    family, weights = importers.read_checkpoint(source)
    model, variables = import_weights(weights, family, arch, what=source, **overrides)
    return model, save_model(out, model, variables, source=source, overwrite=overwrite)

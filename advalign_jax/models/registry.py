"""The model registry: every ``MODELS`` dict in the files of ``advalign_jax/models/``.

Adding an architecture is adding a file that defines ``MODELS = {name: ModelDef(...)}``; nothing
central is edited. Names are lower-case (``resnet50``, ``vit_b16``, ``small_cnn``).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import os
import pkgutil
from typing import Any

from advalign_jax.errors import AdvalignError
from advalign_jax.models.base import Model, ModelDef, get_norm

_NOT_ARCHITECTURES = {"base", "registry", "checkpoint", "importers", "readers", "robustness_format", "convert"}
_PACKAGE = __name__.rpartition(".")[0]  # advalign_jax.models: the architecture files sit beside this one


@functools.lru_cache(maxsize=None)
def _all() -> dict:
    """{name: ModelDef} of every ``MODELS`` dict in the modules of this file's directory (imported by
    dotted name, so the registry never imports its own package)."""
    found: dict[str, ModelDef] = {}
    for info in pkgutil.iter_modules([os.path.dirname(os.path.abspath(__file__))]):
        if info.name in _NOT_ARCHITECTURES or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{_PACKAGE}.{info.name}")
        for name, definition in getattr(module, "MODELS", {}).items():
            if name in found:
                raise RuntimeError(f"model {name!r} is registered twice ({info.name})")
            found[name] = definition
    return found


def list_models() -> list[str]:
    return sorted(_all())


def get_def(name: str) -> ModelDef:
    models = _all()
    if name not in models:
        close = difflib.get_close_matches(name, models, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(models))}"
        raise AdvalignError(f"unknown model {name!r}{hint}")
    return models[name]


def get_model(name: str, **overrides: Any) -> Model:
    """Builds a registered model; ``overrides`` replace its default options.

    Common options: ``num_classes``, ``input_size``, ``norm`` (a name from ``base.NORMS`` or an
    ``InputNorm``), ``dtype`` (``'float32'`` or ``'bfloat16'``), ``remat`` (bool).
    """
    definition = get_def(name)
    unknown = set(overrides) - set(definition.options)
    if unknown:
        raise AdvalignError(f"model {name!r} has no option {sorted(unknown)[0]!r}; its options: "
                            f"{', '.join(sorted(definition.options))}")
    options = {**definition.options, **overrides}
    build_options = {k: v for k, v in options.items() if k not in ("input_size", "input_shape")}
    if "norm" in build_options:
        build_options["norm"] = get_norm(options["norm"])
    module = definition.build(**build_options)
    if "input_shape" in options:
        input_shape = tuple(int(d) for d in options["input_shape"])
    else:
        input_shape = (int(options["input_size"]), int(options["input_size"]), 3)
    return Model(name=name, module=module, num_classes=int(options["num_classes"]),
                 input_shape=input_shape, options=options)

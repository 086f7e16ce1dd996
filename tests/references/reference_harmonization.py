"""Loads the reference TensorFlow functions of the ``harmonization`` 0.0.9 package (PyPI).

The package's top-level ``__init__`` imports model libraries that no longer install, so its
submodules are loaded on their own: a bare package object stands in for ``harmonization`` and the
requested submodules are executed from the installed files. Install with
``pip install --no-deps harmonization==0.0.9`` (the test set-up in the Makefile does).
"""

import importlib
import importlib.util
import pathlib
import sys
import types

_NAME = "_harmonization_reference"


def _root() -> pathlib.Path:
    spec = importlib.util.find_spec("harmonization")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the reference package is missing: pip install --no-deps harmonization==0.0.9")
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def load(submodule: str):
    """``load('common.blur')`` -> the module object of harmonization/common/blur.py."""
    root = _root()
    if _NAME not in sys.modules:
        pkg = types.ModuleType(_NAME)
        pkg.__path__ = [str(root)]
        sys.modules[_NAME] = pkg
    parts = submodule.split(".")
    for depth in range(1, len(parts)):  # bare parent packages, so that their __init__ does not run
        name = ".".join([_NAME, *parts[:depth]])
        if name not in sys.modules:
            sub = types.ModuleType(name)
            sub.__path__ = [str(root.joinpath(*parts[:depth]))]
            sys.modules[name] = sub
    return importlib.import_module(f"{_NAME}.{submodule}")

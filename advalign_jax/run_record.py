"""What made a run's results, and the one rule for resuming a run.

**The rule** (training and every evaluation alike): a rerun on a workdir that holds results resumes only
if every value of its config equals the one the results were made with, except the keys its job
declares *changeable*: keys that decide where and how fast the work runs, or what is drawn from the
results afterwards, never what a result row or a checkpoint holds (``workdir``, ``num_devices``,
``distributed``, the models list of a ClickMe evaluation whose entries are checked one by one, the
bootstrap of the summaries, a training run's ``total_steps``...). Any other difference is refused in one
line naming the first differing key (:func:`check_resumable`). A key added to the configs after a
workdir was written is accepted when the current value is the one that computes what that workdir
computed (the ``added`` keys a job passes, e.g. the trainer's
:data:`advalign_jax.training.checkpoints.ADDED_KEYS`).

**The records**: an evaluation writes ``WORKDIR/config.json`` (the config without its changeable keys)
and ``WORKDIR/models.json`` (each result name's checkpoint path and fingerprint,
:func:`advalign_jax.models.checkpoint.fingerprint`) with its first result (:class:`RunRecord`), so a run
that failed before producing any does not hold its workdir; a training checkpoint carries the same
values in its metadata (:func:`advalign_jax.training.checkpoints.run_meta`).
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional, Sequence

from advalign_jax import store
from advalign_jax.errors import AdvalignError

def plain(value):
    """JSON-plain nested dicts/lists of a value (a ConfigDict, a tuple, ...)."""
    return json.loads(json.dumps(value.to_dict() if hasattr(value, "to_dict") else value, default=str))


def resumable_part(config, changeable: Sequence[str]) -> dict:
    """The config's values without its ``changeable`` top-level keys: what a resumed run must agree on."""
    full = plain(config)
    return {k: v for k, v in full.items() if k not in changeable}


def first_difference(a, b, key: str) -> str:
    """``KEY: A there, B now`` for the first leaf where two nested values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return first_difference(a.get(k), b.get(k), f"{key}.{k}" if key else k)
    return f"{key}: {a!r} there, {b!r} now"


def differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Every leaf key (dotted) whose value differs between two nested dicts."""
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k), current.get(k)
        name = f"{prefix}{k}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, name + ".")
        elif a != b:
            out.append(name)
    return out


_MISSING = object()


def _get(tree: dict, dotted: str, default=None):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return default
        tree = tree[part]
    return tree


def changed_keys(saved: dict, current: dict, added: Optional[dict] = None) -> list[str]:
    """:func:`differences`, less those under a key of ``added`` (``{dotted key: value}``: keys added to
    the configs after runs were recorded, each with the value that computes what those runs computed)
    that the saved config lacks and the current one holds at that value."""
    added = added or {}

    def neutral(k: str) -> bool:
        for a, value in added.items():
            if (k == a or k.startswith(a + ".")) and _get(saved, a, _MISSING) is _MISSING:
                return _get(current, a, _MISSING) == value
        return False

    return [k for k in differences(saved, current) if not neutral(k)]


def check_resumable(saved: dict, current: dict, refuse: Callable[[str], str], limit: int = 1,
                    added: Optional[dict] = None) -> None:
    """Raises :class:`AdvalignError` with ``refuse(described differences)`` when the two configs differ
    anywhere (:func:`changed_keys`); ``limit``: how many differing keys the line names."""
    changed = changed_keys(saved, current, added)
    if changed:
        shown = "; ".join(first_difference(_get(saved, k), _get(current, k), k) for k in changed[:limit])
        more = f" and {len(changed) - limit} more" if len(changed) > limit else ""
        raise AdvalignError(refuse(shown + more))


class RunRecord:
    """``WORKDIR/config.json`` (the config without its ``changeable`` keys) and ``WORKDIR/models.json``
    (the checkpoint behind each result name)."""

    def __init__(self, workdir: str, config, changeable: Sequence[str]):
        self.workdir = workdir
        self.path = os.path.join(workdir, "config.json")
        self.models_path = os.path.join(workdir, "models.json")
        self.current = resumable_part(config, changeable)
        self._written = False

    def check(self, has_results: bool) -> None:
        """Refuses a workdir whose results were made with another config (the rule of the module
        docstring). A record without results (a run that failed before its first result) is replaced."""
        saved = store.read_json(self.path)
        if saved is None or not has_results:
            return
        check_resumable(saved, self.current, lambda what: (
            f"{self.workdir} holds results of a different configuration ({what}); use another "
            "--config.workdir or remove that folder"))
        self._written = True

    def commit(self) -> None:
        """Writes config.json (once, with the first result)."""
        if not self._written:
            store.atomic_write_json(self.path, self.current)
            self._written = True

    def saved_models(self) -> dict:
        return store.read_json(self.models_path, {}) or {}

    def check_models(self, entries: dict, has_results: Callable[[str], bool],
                     advice: str = "give it another directory name or use another --config.workdir") -> None:
        """``entries``: {result name: {'path': ..., 'fingerprint': ...}}. A name whose stored results
        came from another checkpoint is refused (the line ends with ``advice``)."""
        saved = self.saved_models()
        for name, entry in entries.items():
            old = saved.get(name)
            if old and old.get("fingerprint") != entry["fingerprint"] and has_results(name):
                raise AdvalignError(
                    f"{self.workdir} holds results named {name!r} of the checkpoint {old.get('path')} "
                    f"(fingerprint {old.get('fingerprint', '?')[:12]}), but {entry['path']} (fingerprint "
                    f"{entry['fingerprint'][:12]}) is another model; {advice}")

    def commit_model(self, name: str, entry: dict) -> None:
        saved = self.saved_models()
        if saved.get(name) != entry:
            saved[name] = entry
            store.atomic_write_json(self.models_path, saved)

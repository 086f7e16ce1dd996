"""The images a ClickMe evaluation shows in its panels, kept across resumed runs."""

from __future__ import annotations

import json
import os

import numpy as np

from advalign_jax import store


class PanelStore:
    """The images shown in ``panels/<model>.png``: the first ``n`` eligible images in record order,
    whatever batches a (resumed) run computed. Their pictures are kept in ``panels/<model>.npz`` so that
    a resumed run draws the same panels."""

    def __init__(self, path: str, n: int, load: bool = True):
        self.path, self.n = path, n
        self.items: dict[int, dict] = {}
        self.changed = False
        self.drawn = False  # drawn again in this run
        if load and os.path.exists(path):
            try:
                with np.load(path, allow_pickle=False) as z:
                    meta = json.loads(str(z["meta"]))
                    for i, m in enumerate(meta):
                        self.items[int(m["img"])] = {**m, **{k: z[f"{i}/{k}"] for k in m["arrays"]}}
            except (OSError, ValueError, KeyError):
                self.items = {}  # a damaged file: the panels are drawn again from what this run computes

    def wants(self, img: int) -> bool:
        return self.n > 0 and img not in self.items and (len(self.items) < self.n or img < max(self.items))

    def offer(self, item: dict) -> None:
        self.items[int(item["img"])] = item
        for img in sorted(self.items)[self.n:]:
            del self.items[img]
        self.changed = True

    def panels(self) -> list[dict]:
        return [self.items[i] for i in sorted(self.items)]

    def save(self) -> None:
        arrays, meta = {}, []
        for i, img in enumerate(sorted(self.items)):
            item = self.items[img]
            names = [k for k, v in item.items() if isinstance(v, np.ndarray)]
            meta.append({**{k: plain_scalar(v) for k, v in item.items() if k not in names}, "arrays": names})
            arrays.update({f"{i}/{k}": item[k] for k in names})
        store.atomic_write(self.path, lambda f: np.savez(f, meta=json.dumps(meta), **arrays), binary=True)
        self.changed = False


def plain_scalar(v):
    """A NumPy scalar as the Python value (for the panels' JSON metadata)."""
    return v.item() if isinstance(v, np.generic) else v

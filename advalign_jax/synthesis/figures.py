"""Image grids a person looks at: one PNG per task and model (matplotlib, written atomically)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from advalign_jax.evaluation.figures import pyplot, save_figure


def grid(path: str, rows: Sequence[np.ndarray], row_labels: Sequence[str], title: str = "",
         col_labels: Optional[Sequence[str]] = None, cell: float = 1.1) -> None:
    """``rows``: a list of (K, H, W, C) image arrays in [0, 1] (rows may be shorter than the longest);
    each row labelled on its left."""
    plt = pyplot()
    ncol = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), ncol, figsize=(cell * ncol + 0.9, cell * len(rows) + 0.5), squeeze=False)
    for i, (images, label) in enumerate(zip(rows, row_labels)):
        for j in range(ncol):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(images):
                image = np.clip(np.asarray(images[j], np.float32), 0.0, 1.0)
                ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray" if image.shape[-1] == 1 else None,
                          interpolation="nearest")
            else:
                ax.axis("off")
            if j == 0:
                ax.set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
            if i == 0 and col_labels is not None and j < len(col_labels):
                ax.set_title(col_labels[j], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)

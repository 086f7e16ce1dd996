"""Where a model's input-gradient, its attack and its decision sit on a shortcut patch: the measures of
the harmonizer study in docs/demonstration.md (``scripts/shortcut_mechanism.py`` runs them).

For a model ``f`` (logits), images ``x`` (N, H, W, C), labels ``y``, the input-gradient of the
true-class logit ``g = d f_y / d x`` and a patch mask ``P`` (H, W), the *share* of a non-negative map
``m`` (N, H, W) is ``sum(m P) / sum(m)`` per image (:func:`patch_share`; a uniform map has the patch's
area). :func:`gradient_measures` gives the shares of the harmonizer loss's saliency
``standardize_cut(mean_c g)``, of the part its cut removes ``standardize_cut(-mean_c g)``, of
``max_c |g|``, ``mean_c |g|``, each ``|g_c|``, and of an L2 PGD perturbation's ``delta^2``; and the
channel agreement ``sum |mean_c g| / sum mean_c |g|`` on and off the patch (1: the channels' gradients
have one sign; 0: they cancel in the channel mean).

:func:`swap_measures` compares the patch's effect on the decision with what the gradient at the image
predicts. With ``x_swap`` the image with only its patch repainted in class ``k``'s colour and the margin
``m(x) = f_y(x) - f_k(x)``: ``margin = m(x)``, ``swap_change = m(x_swap) - m(x)``, its first-order
prediction ``swap_first_order = grad m(x) . (x_swap - x)`` (Taylor), ``swap_at_midpoint =
m((x + x_swap) / 2) - m(x)`` and ``follows = [argmax f(x_swap) = k]``. For a model linear in the patch
``swap_first_order = swap_change`` and the midpoint change is half of it; a response that is flat at the
image's own colour and steep near another has ``|swap_first_order|`` and the midpoint change well below
that (``tests/evaluation/test_shortcut.py`` checks both cases).

:func:`loss_leverage` asks how much the harmonizer's alignment term
(:func:`advalign_jax.losses.harmonization.alignment_term`, with a given channel reduction) depends on
the patch: per image, ``1 - align(s (1 - P), h) / align(s, h)`` with ``s`` the reduced gradient and ``h``
the human map as training reads it, i.e. the share of the term that would go if the model had no
gradient on the patch. A small leverage means the loss has little to gain from moving the gradient off
the patch, whatever the model's reliance on it.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from advalign_jax.attacks.pgd import PGDConfig, pgd
from advalign_jax.data import embedded_files
from advalign_jax.data.reader import ClickMeReader, ReaderConfig
from advalign_jax.data.synthetic import cue_region
from advalign_jax.errors import DataError
from advalign_jax.evaluation import cue_swap
from advalign_jax.losses.harmonization import alignment_term, reduce_saliency, standardize_cut

GRADIENT_MEASURES = ("mean_cut", "mean_negative", "absmax", "abs_mean", "channel_R", "channel_G", "channel_B",
                     "attack", "cancellation_patch", "cancellation_elsewhere")
SWAP_MEASURES = ("margin", "swap_change", "swap_first_order", "swap_at_midpoint", "follows")
LEVERAGE_MEASURES = ("leverage_mean", "leverage_absmax", "leverage_mean_abs")


def patch_mask(size: int) -> np.ndarray:
    """The synthetic data's patch (:func:`advalign_jax.data.synthetic.cue_region`) as a 0/1 (size, size) map."""
    rs, cs = cue_region(size)
    mask = np.zeros((size, size), np.float32)
    mask[rs, cs] = 1.0
    return mask


def patch_share(m, mask):
    """Per image: the share of the non-negative map ``m`` (N, H, W) inside ``mask`` (H, W); NaN for an
    all-zero map."""
    total = jnp.sum(m, axis=(1, 2))
    return jnp.where(total > 0, jnp.sum(m * mask, axis=(1, 2)) / jnp.where(total > 0, total, 1.0), jnp.nan)


def gradient_measures(logits_fn, x, y, mask, eps: float = 1.0) -> dict:
    """The gradient and attack shares of the module docstring, per image. The attack: untargeted L2 PGD
    of radius ``eps``, 20 steps of ``eps / 8`` (the ``robustness`` library's normalised steps)."""
    g = true_class_gradient(logits_fn, x, y)
    s = jnp.mean(g, axis=-1)
    out = {"mean_cut": patch_share(standardize_cut(s), mask), "mean_negative": patch_share(standardize_cut(-s), mask),
           "absmax": patch_share(jnp.max(jnp.abs(g), axis=-1), mask),
           "abs_mean": patch_share(jnp.mean(jnp.abs(g), axis=-1), mask)}
    for c, name in enumerate("RGB"[:g.shape[-1]]):
        out[f"channel_{name}"] = patch_share(jnp.abs(g[..., c]), mask)
    cfg = PGDConfig(norm="l2", steps=20, step_size=eps / 8, projection="renorm", random_start="none")
    x_adv, _ = pgd(logits_fn, x, y, eps, cfg)
    out["attack"] = patch_share(jnp.sum((x_adv - x) ** 2, axis=-1), mask)
    agree, spread = jnp.abs(s), jnp.mean(jnp.abs(g), axis=-1)
    for name, m in (("cancellation_patch", mask), ("cancellation_elsewhere", 1.0 - mask)):
        out[name] = jnp.sum(agree * m, axis=(1, 2)) / jnp.sum(spread * m, axis=(1, 2))
    return out


def swap_measures(logits_fn, x, x_swap, y, k) -> dict:
    """The margin to the painted class ``k``, its change under the swap, the gradient's first-order
    prediction of the change, the change halfway and whether the copy is classified as ``k``, per image."""
    rows = jnp.arange(x.shape[0])

    def margin(z):
        logits = logits_fn(z)
        return logits[rows, y] - logits[rows, k], logits

    (m, logits), vjp = jax.vjp(margin, x)
    (g,) = vjp((jnp.ones_like(m), jnp.zeros_like(logits)))
    m_swap, logits_swap = margin(x_swap)
    m_mid, _ = margin(0.5 * (x + x_swap))
    return {"margin": m, "swap_change": m_swap - m, "swap_first_order": jnp.sum(g * (x_swap - x), axis=(1, 2, 3)),
            "swap_at_midpoint": m_mid - m, "follows": (jnp.argmax(logits_swap, -1) == k).astype(jnp.float32)}


def true_class_gradient(logits_fn, x, y):
    """``g = d f_y / d x`` (N, H, W, C), the gradient every measure of this module starts from."""
    logits, vjp = jax.vjp(logits_fn, x)
    (g,) = vjp(jax.nn.one_hot(y, logits.shape[-1], dtype=logits.dtype))
    return g


def loss_leverage(g, maps, mask, reductions=("mean", "absmax", "mean_abs"), levels: int = 5) -> dict:
    """Per image and channel reduction of the gradient ``g`` (:func:`true_class_gradient`):
    ``1 - align(s (1 - P), h) / align(s, h)`` (module docstring); keys ``leverage_<reduction>``."""
    one = jnp.ones((1,), jnp.float32)
    term = jax.vmap(lambda s, h: alignment_term(s[None], h[None], one, levels))
    out = {}
    for r in reductions:
        s = reduce_saliency(g, r)
        full, without = term(s, maps), term(s * (1.0 - mask), maps)
        out[f"leverage_{r}"] = jnp.where(full > 0, 1.0 - without / jnp.where(full > 0, full, 1.0), jnp.nan)
    return out


def read_records(files: Sequence[str], size: int, num_classes: int = 10, minmax_maps: bool = False) -> tuple:
    """Images, labels and human maps of the records in ``files`` read at ``size`` (the evaluations'
    reader; ``minmax_maps=True``: the maps as training reads them)."""
    images, labels, maps = [], [], []
    for batch in ClickMeReader(ReaderConfig(files=tuple(files), batch_size=32, num_classes=num_classes,
                                            image_size=size, minmax_maps=minmax_maps),
                               process_index=0, process_count=1):
        keep = np.asarray(batch["mask"], bool)
        images.append(np.asarray(batch["image"])[keep])
        labels.append(np.asarray(batch["label"])[keep])
        maps.append(np.asarray(batch["heatmap"])[keep])
    return np.concatenate(images), np.concatenate(labels).astype(np.int32), np.concatenate(maps)


def embedded_swap_copies(folder: str, log=print) -> tuple:
    """The cue-swap copies of the embedded validation shard, written into ``folder``
    (:func:`advalign_jax.evaluation.cue_swap.write_variants`): (their files, the painted class per record)."""
    data = cue_swap.find(embedded_files("val"), 10)
    if data is None:
        raise DataError("the embedded validation shard is not a synthetic shard with a patch cue")
    files = cue_swap.write_variants(data, np.ones(len(data.label), bool), folder, log=log)
    if files is None:
        raise DataError("the synthetic generator does not reproduce the embedded validation shard")
    return files["swap"], data.swap

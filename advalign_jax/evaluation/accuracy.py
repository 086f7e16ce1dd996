"""Clean top-1 accuracy on ClickMe records: the trainer's periodic evaluation of ``eval_data``.

``accuracy = (1 / N) sum_i [argmax_c f(x_i)_c = y_i]`` over the N real records of the evaluation data
(every record once: the reader pads the last batch and its ``mask`` marks the real ones), computed on
the evaluation protocol (:mod:`advalign_jax.evaluation.protocol`) with the model in inference mode.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from advalign_jax.data.config_block import reader_config
from advalign_jax.data.reader import ClickMeReader
from advalign_jax.evaluation.protocol import Evaluator, evaluate_all, real, round_batch


@functools.lru_cache(maxsize=8)
def accuracy_evaluator(apply_fn: Callable) -> Evaluator:
    """The evaluator of clean accuracy: per record ``correct`` (0/1); the summary is their mean. Cached
    per ``apply_fn(variables, images) -> logits``, so a periodic evaluation compiles once."""
    predict = jax.jit(lambda v, x: jnp.argmax(apply_fn(v, x), axis=-1))

    def rows(meta, host):
        return [{"img": int(meta["index"][k]), "correct": int(host["pred"][k] == meta["label"][k])}
                for k in real(meta)]

    return Evaluator(batch_fn=lambda v, b: {"pred": predict(v, b["image"])}, inputs=("image",), rows=rows,
                     summarise=lambda rs: sum(r["correct"] for r in rs) / max(len(rs), 1), columns=("img", "correct"))


def clickme_accuracy(apply_fn: Callable, variables, eval_block, mesh) -> float:
    """Top-1 accuracy over the records of an ``eval_data`` block (:func:`advalign_jax.data.config_block.data_block`),
    read in evaluation mode in batches of ``eval_block.batch_size`` rounded to the mesh."""
    procs = jax.process_count()
    per_process = round_batch(max(1, int(eval_block.batch_size) // procs) * procs, mesh) // procs
    reader = ClickMeReader(reader_config(eval_block, per_process_batch=per_process))
    return evaluate_all(accuracy_evaluator(apply_fn), variables, reader, mesh)

"""Harmonization recipe: vit_b16.

The neural harmonizer recipe for vit_b16 (``advalign-jax train``); see
:mod:`advalign_jax.training.recipes` for every value and where it comes from.

Commands. One GPU node (all local GPUs, data-parallel)::

    advalign-jax train --config configs/harmonize_vit_b16.py \
        --config.model.init_from=checkpoints/vit_b16 \
        --config.data.files="('/data/clickme/train-*.tfrecords',)" \
        --config.eval_data.files="('/data/clickme/val-*.tfrecords',)" \
        --config.data.tfds_data_dir=/data/tfds

A TPU pod: the same command on every host, with ``--config.distributed=true`` (each host reads its own
shard files; Cloud TPU's coordinator is found automatically), e.g.
``gcloud compute tpus tpu-vm ssh POD --worker=all --command="cd advalign_jax && .venv/bin/advalign-jax
train --config configs/harmonize_vit_b16.py --config.distributed=true ..."``.

Expected result: the released harmonized ViT-B/16 reached about 75.7% top-1 and 72.5% of the human
ceiling. The run writes ``results/harmonize_vit_b16/`` (checkpoints every 2000 steps, metrics.csv,
TensorBoard, the final model directory); rerunning the command resumes.

Variants (``:ARG``):
  runlocal    two CPU steps on the embedded shard at 32 px (the wiring only; tests run it).
"""

from advalign_jax.training.recipes import harmonization_recipe


def get_config(arg: str = ""):
    return harmonization_recipe("vit_b16", arg, batch_size=256)

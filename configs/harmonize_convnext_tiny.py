"""Harmonization recipe: convnext_tiny.

The neural harmonizer recipe for convnext_tiny (``advalign-jax train``); see
:mod:`advalign_jax.training.recipes` for every value and where it comes from.

Commands. One GPU node (all local GPUs, data-parallel)::

    advalign-jax train --config configs/harmonize_convnext_tiny.py \
        --config.model.init_from=checkpoints/convnext_tiny \
        --config.data.files="('/data/clickme/train-*.tfrecords',)" \
        --config.eval_data.files="('/data/clickme/val-*.tfrecords',)" \
        --config.data.tfds_data_dir=/data/tfds

A TPU pod: the same command on every host, with ``--config.distributed=true`` (each host reads its own
shard files; Cloud TPU's coordinator is found automatically), e.g.
``gcloud compute tpus tpu-vm ssh POD --worker=all --command="cd advalign_jax && .venv/bin/advalign-jax
train --config configs/harmonize_convnext_tiny.py --config.distributed=true ..."``.

Expected result: the lab's best harmonized model (a ConvNeXt) reached about 74% of the human ceiling.
The run writes ``results/harmonize_convnext_tiny/`` (checkpoints every 2000 steps, metrics.csv,
TensorBoard, the final model directory); rerunning the command resumes.

Variants (``:ARG``):
  runlocal    two CPU steps on the embedded shard at 32 px (the wiring only; tests run it).
"""

from advalign_jax.training.recipes import harmonization_recipe


def get_config(arg: str = ""):
    return harmonization_recipe("convnext_tiny", arg, batch_size=1024)

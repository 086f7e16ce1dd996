"""Robust accuracy of a classifier on in-memory images: clean, PGD, APGD, FAB, Square and AutoAttack.

An evaluation is a list of attacks, each with a name and a radius:

- :class:`PGDAttack`: any :class:`~advalign_jax.attacks.pgd.PGDConfig` (Madry-lab conventions),
  untargeted, or targeted at class ``(y + 1) mod C`` (``target='next'``: the other class of a binary
  task, the PAG toy evaluation); :func:`pgd_attack` builds the usual evaluation (``steps`` steps of
  ``2.5 eps / steps``, best-loss iterate, no random start) and :data:`PAG_EPOCH_EVAL` the PAG
  official per-epoch check (untargeted L2, eps 0.5, 7 steps of ``1.5 eps / 7``, random start uniform
  in ``+-8/255`` per pixel, last iterate; ``../shared/spec/pag.md``; PAG's mean cross-entropy and our
  per-example one give the same normalised L2 step).
- :class:`Cascade`: stages run as AutoAttack runs its attacks, each on the points still robust
  after the previous ones (:mod:`advalign_jax.attacks.autoattack`); a stage is APGD
  (:class:`~advalign_jax.attacks.apgd.APGDConfig`), FAB (:class:`~advalign_jax.attacks.fab.FABConfig`)
  or Square (:class:`~advalign_jax.attacks.square.SquareConfig`). :func:`autoattack_attack` builds
  AutoAttack itself, ``standard`` (APGD-CE, APGD-T with 9 targets, FAB-T with 9 targets, Square
  with 5,000 queries: the field's robustness number), ``plus`` or ``rand``; :func:`single_attack`
  one of its attacks on its own; :func:`autoattack_whitebox` its APGD-CE + APGD-T part. With C classes
  the targeted stages use ``min(9, C - 1)`` targets. Each stage attacks only the survivors of the
  previous ones, gathered at the front of the batch and attacked a chunk at a time (a quarter of the
  batch by default), so the later stages cost what their survivors cost; the results are those of
  attacking the whole batch with the others masked (every example's draws come from its index).

Default radii are RobustBench's for CIFAR-sized images: L2 0.5, Linf 8/255 (:data:`ROBUSTBENCH_EPS`).

**What is reported** (AutoAttack's convention): an example is *robust* under an attack when the
model classifies it correctly both clean and at the attack's returned point (the prediction is
recomputed there, as AutoAttack's final check does); robust accuracy is the fraction of robust
examples, so it never exceeds the clean accuracy. ``adversarial_accuracy`` (correct at the returned
point whatever the clean prediction: the ``robustness`` library's and PAG's number) is reported too,
the robust accuracy after each stage of a cascade and the time each stage took (RobustBench's report:
clean accuracy, robust accuracy after each attack, the final figure), and ``robust_to_all``: the
fraction robust under every attack of the list (the per-example worst case). Every attack and every
stage is its own compiled function; its time is the wall-clock time of its calls, compilation
excluded (the job's ``wall_time_s`` includes it).

**Checks** (AutoAttack's, :mod:`advalign_jax.attacks.autoattack`): before the attacks, on the first
batch, whether the model looks randomised (two forward passes differ), whether its outputs look like
probabilities, whether inputs lie outside the pixel box, whether a targeted stage asks for more targets
than there are classes; after them, points with a zero input gradient, Square breaking points the
gradient-based stages could not, and later stages breaking points far inside the radius. Each check
that fires is logged as a warning and named in the summary's ``checks`` column.

:func:`iter_batches` runs a list of attacks over a dataset in batches of a fixed size (the last one
padded, with a mask, so no example is dropped and one compiled function serves every batch),
optionally sharding each batch over a device mesh (:mod:`advalign_jax.parallel`);
:func:`evaluate_robustness` collects them and :func:`epoch_metrics` gives the trainer's per-epoch
numbers. Every random draw of an example comes from its dataset index (``fold_in``), and the model
must be in inference mode, so an example's result does not depend on its batch mates, the batch size
or the number of devices (up to floating-point summation order).

**The job** (:func:`evaluate`, ``advalign-jax evaluate-robust``, ``configs/robustness.py``): one model
directory, one dataset from :func:`advalign_jax.data.images.load_arrays` (or ``embedded``: the
embedded synthetic ClickMe records the demonstration checkpoints were trained on), the attacks of
``config.attacks``. Files in ``config.workdir``: ``per_example.csv`` (``img,label,clean_pred,grad_zero``
(1 if the input gradient of the cross-entropy is exactly zero), then per attack ``NAME/pred``,
``NAME/robust`` (0/1), ``NAME/norm`` (perturbation norm in the attack's norm) and for cascades
``NAME/stage`` (the stage that flipped the example, ``none`` if none), then ``robust_to_all``),
written batch by batch; ``summary.csv`` (one row per attack, per cascade stage and ``all``:
``model,attack,stage,norm,eps,num_examples,clean_accuracy,robust_accuracy,adversarial_accuracy,
max_perturbation,wall_time_s,stage_time_s,checks``); ``config.json`` and ``models.json`` (the
result-deciding config values and the checkpoint's fingerprint, written with the first result);
``time.json``. A rerun with the same configuration resumes where the last one stopped (results do not
depend on the batching, so a resumed run gives the same files; ``max_examples`` is not part of the
configuration a workdir is tied to, so a run can be extended to more examples later). The files go
through the crash-safe store (:mod:`advalign_jax.store`) as the ClickMe evaluations' do: one run per
workdir, whole rows (a torn one is dropped and recomputed), atomic summaries, a rerun over another
configuration or another checkpoint refused in one line, process 0 the only writer.

The code is split by concern: the attack specifications in
:mod:`~advalign_jax.evaluation.robust_attacks`, the batch function in
:mod:`~advalign_jax.evaluation.robust_batch`, the loop over a dataset and the summary here, the
resumable job in :mod:`~advalign_jax.evaluation.robust_job`, its files in
:mod:`~advalign_jax.evaluation.robust_io`. Every public name stays importable from this module.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import numpy as np

from advalign_jax import parallel
from advalign_jax.attacks import autoattack as AA
from advalign_jax.errors import ConfigError, DataError
from advalign_jax.evaluation.robust_attacks import (  # noqa: F401  (re-exported)
    ATTACK_KINDS, PAG_EPOCH_EVAL, ROBUSTBENCH_EPS, SINGLE, STAGE_CONFIGS, TARGETS, APGDCascade, Attack, Cascade,
    PGDAttack, _check_attacks, _fit_to_classes, attacks_from_config, autoattack_attack, autoattack_whitebox,
    default_attacks, pgd_attack, single_attack)
from advalign_jax.evaluation.robust_batch import (  # noqa: F401  (re-exported)
    DEFAULT_CHUNKS, BatchFn, _attack_key, _records, batch_outputs, cascade_stage, make_batch_fn)
from advalign_jax.evaluation.robust_io import (  # noqa: F401  (re-exported)
    SUMMARY_COLUMNS, arrays_from_csv, csv_rows, format_summary, per_example_columns, summary_rows)

_JOB_NAMES = ("RESULT_KEYS", "load_data", "model_name")


# ----------------------------------------------------------------------------------------------------
# A dataset
# ----------------------------------------------------------------------------------------------------


def _arrays(images, labels, batch_size: int) -> tuple:
    """Checked inputs: float32 images and int32 labels of the same length, a positive batch size."""
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim < 2 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(f"images {images.shape} and labels {labels.shape} must hold the same number of examples")
    if images.shape[0] == 0:
        raise DataError("no examples to evaluate")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    return (images.astype(np.float32) if images.dtype != np.float32 else images), labels.astype(np.int32)


def iter_batches(apply_fn: Callable, variables: Any, images, labels, attacks: Sequence[Attack],
                 batch_size: int = 256, key=None, mesh=None, keep_adversarial: bool = False,
                 skip: Optional[Callable] = None, chunks: int = DEFAULT_CHUNKS) -> Iterator[tuple]:
    """Yields ``(index, records, seconds)`` for each batch: ``index`` the dataset positions of its
    examples, ``records`` host arrays over them (``clean_pred``, ``grad_zero``, ``label``,
    ``clean_correct``, ``NAME/pred``, ``NAME/robust``, ``NAME/norm``, ``NAME/stage`` for cascades,
    ``NAME/x_adv`` if kept, ``robust_to_all``), ``seconds`` the batch's times (:class:`BatchFn`).

    ``apply_fn(variables, x) -> logits`` in inference mode (``model.apply``); images NHWC (or any
    (N, ...) inputs); ``key`` the PRNG key of all random draws (default ``PRNGKey(0)``); ``mesh``: a
    :func:`~advalign_jax.parallel.make_mesh` mesh to shard each batch over (the batch size is rounded
    up to a multiple of its data-parallel size; every process passes the full dataset and computes its
    slice of each batch); ``skip(index) -> bool``: batches not to compute (resume; decided the same on
    every process); ``chunks``: cascade stages attack their survivors in pieces of ``1 / chunks`` of
    the batch.
    """
    attacks = _check_attacks(attacks)
    images, labels = _arrays(images, labels, batch_size)
    n = images.shape[0]
    procs, pid = jax.process_count(), jax.process_index()
    if mesh is None and procs > 1:
        raise ConfigError("a multi-process evaluation needs a mesh")
    unit = math.lcm(parallel.data_parallel_size(mesh), procs) if mesh is not None else 1
    batch_size = math.ceil(min(batch_size, n) / unit) * unit  # no larger than the data needs
    if mesh is not None:
        variables = parallel.replicate(variables, mesh)
    per_process = batch_size // procs
    key = jax.random.PRNGKey(0) if key is None else key
    fn = make_batch_fn(apply_fn, attacks, keep_adversarial, mesh, batch_size, int(chunks))
    for b in range(math.ceil(n / batch_size)):
        index = np.arange(b * batch_size, min((b + 1) * batch_size, n))
        if skip is not None and parallel.all_processes(skip(index)):
            continue
        local = np.arange(b * batch_size, (b + 1) * batch_size)[pid * per_process:(pid + 1) * per_process]
        batch = {"x": images[np.minimum(local, n - 1)], "y": labels[np.minimum(local, n - 1)],
                 "index": local.astype(np.int32), "mask": local < n}
        if mesh is not None:
            batch = parallel.shard_batch(batch, mesh)
        out = fn(variables, batch["x"], batch["y"], batch["index"], batch["mask"], key)
        seconds = out.pop("seconds")
        host = parallel.to_host(out) if mesh is not None else jax.tree.map(np.asarray, out)
        host = {k: v[:len(index)] for k, v in host.items()}
        yield index, _records(host, labels[index], attacks), seconds


def add_seconds(total: dict, seconds: dict) -> dict:
    """Accumulates per-batch times (``{(attack, stage): s}``) into ``total``."""
    for k, v in seconds.items():
        total[k] = total.get(k, 0.0) + float(v)
    return total


@dataclasses.dataclass
class RobustnessResult:
    """``summary`` (:func:`summarise`) and ``per_example``: arrays over the dataset (``index`` and
    the records of :func:`iter_batches`)."""

    summary: dict
    per_example: dict

    def format(self) -> str:
        lines = [f"{'attack':<24} {'norm':<5} {'eps':>8} {'robust acc':>11} {'time (s)':>9}",
                 f"{'clean':<24} {'':<5} {'':>8} {100 * self.summary['clean_accuracy']:>10.2f}%"]
        for name, s in self.summary["attacks"].items():
            lines.append(f"{name:<24} {s['norm']:<5} {s['eps']:>8.4f} {100 * s['robust_accuracy']:>10.2f}% "
                         f"{s.get('seconds', float('nan')):>9.2f}")
            for stage, acc in s.get("after_stage", {}).items():
                lines.append(f"  after {stage:<16} {'':<5} {'':>8} {100 * acc:>10.2f}% "
                             f"{s.get('stage_seconds', {}).get(stage, float('nan')):>9.2f}")
            if s.get("checks"):
                lines.append(f"  checks: {', '.join(s['checks'])}")
        lines.append(f"{'all (worst case)':<24} {'':<5} {'':>8} {100 * self.summary['robust_to_all']:>10.2f}%")
        return "\n".join(lines)


def summarise(per_example: dict, attacks: Sequence[Attack], checks: Optional[dict] = None,
              seconds: Optional[dict] = None) -> dict:
    """``n``, ``clean_accuracy``, ``robust_to_all``, ``checks`` (``{name: message}``: the checks made
    before the attacks (``checks``) and ``zero_gradient``) and per attack (``attacks``) a dict:
    ``robust_accuracy``, ``adversarial_accuracy``, ``norm``, ``eps``, ``max_perturbation``,
    ``seconds``, ``checks`` (the global ones and the attack's own), and for cascades ``after_stage``
    (the robust accuracy after each stage) and ``stage_seconds``. ``seconds``: ``{(attack, stage):
    seconds}`` (:class:`BatchFn`)."""
    n = len(per_example["label"])
    seconds = seconds or {}

    def mean(a):
        return float(np.mean(a)) if n else float("nan")

    found = dict(checks or {})
    if "grad_zero" in per_example:
        msg = AA.check_zero_gradients(int(np.sum(per_example["grad_zero"])), n)
        if msg:
            found["zero_gradient"] = msg
    summary = {"n": n, "clean_accuracy": mean(per_example["clean_correct"]),
               "robust_to_all": mean(per_example["robust_to_all"]), "checks": found, "attacks": {}}
    shared = {k: v for k, v in found.items() if k != "n_classes"}  # about the model and data: every attack
    for a in attacks:
        s = {"robust_accuracy": mean(per_example[f"{a.name}/robust"]),
             "adversarial_accuracy": mean(per_example[f"{a.name}/pred"] == per_example["label"]),
             "norm": a.norm, "eps": float(a.eps),
             "max_perturbation": float(np.max(per_example[f"{a.name}/norm"])) if n else 0.0,
             "seconds": seconds.get((a.name, ""), float("nan")), "checks": dict(shared)}
        if isinstance(a, Cascade):
            stage = per_example[f"{a.name}/stage"]
            ok = np.asarray(per_example["clean_correct"], bool).copy()
            s["after_stage"], s["stage_seconds"] = {}, {}
            for j, (stage_name, _) in enumerate(a.stages):
                ok &= stage != j
                s["after_stage"][stage_name] = mean(ok)
                s["stage_seconds"][stage_name] = seconds.get((a.name, stage_name), float("nan"))
            own = {"square_gain": AA.check_square_gain(s["after_stage"]),
                   "small_perturbation": AA.check_small_perturbation(stage, per_example[f"{a.name}/norm"], a.eps,
                                                                     [name for name, _ in a.stages])}
            if any(AA.targets_asked(cfg) for _, cfg in a.stages):
                own["n_classes"] = found.get("n_classes")
            s["checks"].update({k: v for k, v in own.items() if v})
        summary["attacks"][a.name] = s
    return summary


def pre_checks(apply_fn: Callable, variables: Any, images, labels, attacks: Sequence[Attack], clip,
               batch_size: int = 256) -> dict:
    """The checks made before the attacks (:func:`~advalign_jax.attacks.autoattack.run_checks`) on the
    first ``batch_size`` examples (the input range on all of them): ``{name: message}``."""
    x = np.asarray(images[:batch_size], np.float32)
    y = np.asarray(labels[:batch_size])
    fwd = jax.jit(apply_fn)
    stages = [st for a in attacks if isinstance(a, Cascade) for st in a.stages]
    rand_only = all(isinstance(a, Cascade) and a.version == "rand" for a in attacks) and attacks
    found = AA.run_checks(lambda z: fwd(variables, z), x, y, stages, None, "rand" if rand_only else "standard")
    msg = AA.check_input_range(np.asarray(images), clip)
    if msg:
        found["input_range"] = msg
    return found


def evaluate_robustness(apply_fn: Callable, variables: Any, images, labels, attacks: Optional[Sequence[Attack]] = None,
                        batch_size: int = 256, key=None, mesh=None, keep_adversarial: bool = False,
                        progress: bool = False, checks: bool = True, clip=(0.0, 1.0),
                        chunks: int = DEFAULT_CHUNKS) -> RobustnessResult:
    """Runs ``attacks`` (default :func:`default_attacks`) on every example (see :func:`iter_batches`);
    returns a :class:`RobustnessResult`. ``checks``: run AutoAttack's checks (logged as warnings and
    listed in the summary), with ``clip`` the pixel box of the input-range check."""
    attacks = _check_attacks(default_attacks() if attacks is None else attacks)
    images, labels = _arrays(images, labels, batch_size)
    found = pre_checks(apply_fn, variables, images, labels, attacks, clip, batch_size) if checks else {}
    chunks_, seconds = [], {}
    total = math.ceil(len(labels) / max(batch_size, 1))
    for b, (index, rec, sec) in enumerate(iter_batches(apply_fn, variables, images, labels, attacks, batch_size, key,
                                                       mesh, keep_adversarial, chunks=chunks)):
        chunks_.append(rec)
        add_seconds(seconds, sec)
        if progress:
            print(f"robustness: batch {b + 1}/{total}", file=sys.stderr)
    per_example = {k: np.concatenate([c[k] for c in chunks_]) for k in chunks_[0]}
    per_example["index"] = np.arange(len(per_example["label"]))
    summary = summarise(per_example, attacks, found, seconds)
    if checks:
        warn_all(summary)
    return RobustnessResult(summary, per_example)


def warn_all(summary: dict, already: Sequence[str] = ()) -> None:
    """Logs every fired check of a summary once (global ones, then each attack's own), except those
    named in ``already`` (logged before)."""
    AA.warn({k: v for k, v in summary["checks"].items() if k not in already})
    for name, s in summary["attacks"].items():
        AA.warn({k: v for k, v in s.get("checks", {}).items() if k not in summary["checks"] and k not in already}, name)


def clean_accuracy(apply_fn: Callable, variables: Any, images, labels, batch_size: int = 256, mesh=None) -> float:
    """Top-1 accuracy on ``images`` (batched; the same loop with no attack)."""
    return evaluate_robustness(apply_fn, variables, images, labels, attacks=(), batch_size=batch_size,
                               mesh=mesh, checks=False).summary["clean_accuracy"]


def epoch_metrics(apply_fn: Callable, variables: Any, images, labels, attacks: Sequence[Attack] = (PAG_EPOCH_EVAL,),
                  mesh=None, batch_size: int = 256, key=None) -> dict:
    """The trainer's per-epoch numbers on a held-out array set: ``eval_accuracy`` (clean),
    ``eval_robust_accuracy`` (robust under every attack, AutoAttack's convention) and, with several
    attacks, ``eval_robust_accuracy/NAME`` for each. The compiled batch function is cached, so calling
    this every epoch compiles once."""
    result = evaluate_robustness(apply_fn, variables, images, labels, attacks, batch_size=batch_size, key=key,
                                 mesh=mesh, checks=False)
    s = result.summary
    out = {"eval_accuracy": s["clean_accuracy"], "eval_robust_accuracy": s["robust_to_all"]}
    if len(s["attacks"]) > 1:
        out.update({f"eval_robust_accuracy/{name}": a["robust_accuracy"] for name, a in s["attacks"].items()})
    return out


# ----------------------------------------------------------------------------------------------------
# The job: advalign-jax evaluate-robust (advalign_jax.evaluation.robust_job)
# ----------------------------------------------------------------------------------------------------


def evaluate(config, progress: bool = True, log: Optional[Callable[[str], None]] = None) -> list:
    """Runs the job of the module docstring (:func:`advalign_jax.evaluation.robust_job.evaluate`);
    returns the summary rows on process 0 (every process computes, process 0 writes)."""
    from advalign_jax.evaluation import robust_job  # pylint: disable=import-outside-toplevel

    return robust_job.evaluate(config, progress=progress, log=log)


def __getattr__(name: str):
    """The job's other names (``RESULT_KEYS``, ``load_data``, ``model_name``), loaded on first use."""
    if name in _JOB_NAMES:
        from advalign_jax.evaluation import robust_job  # pylint: disable=import-outside-toplevel

        return getattr(robust_job, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

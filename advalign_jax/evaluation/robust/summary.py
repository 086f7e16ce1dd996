"""The robust-accuracy summary: AutoAttack's bookkeeping over per-example records, and its checks.

:func:`summarise` turns the per-example records of a list of attacks (:func:`advalign_jax.evaluation.
robust.files.arrays_from_rows`) into the summary: clean accuracy, per attack the robust accuracy (correct
clean and at the attack's returned point), the adversarial accuracy, the largest perturbation, the
robust accuracy after each stage of a cascade and each stage's time, and the checks that fired.
:func:`pre_checks` runs AutoAttack's checks before the attacks, :func:`warn_all` logs the fired ones.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from advalign_jax.attacks import autoattack as AA
from advalign_jax.evaluation.robust.attacks import Attack, Cascade


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


def warn_all(summary: dict, already: Sequence[str] = ()) -> None:
    """Logs every fired check of a summary once (global ones, then each attack's own), except those
    named in ``already`` (logged before)."""
    AA.warn({k: v for k, v in summary["checks"].items() if k not in already})
    for name, s in summary["attacks"].items():
        AA.warn({k: v for k, v in s.get("checks", {}).items() if k not in summary["checks"] and k not in already}, name)

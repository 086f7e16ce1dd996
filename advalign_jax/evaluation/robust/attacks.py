"""Attack specifications of the robust-accuracy evaluation: what to run, not how.

:class:`PGDAttack` and :class:`Cascade` (AutoAttack-style stages, each on the points still robust after
the previous ones), the constructors (:func:`pgd_attack`, :func:`autoattack_whitebox`,
:func:`autoattack_attack`, :func:`single_attack`, :data:`PAG_EPOCH_EVAL`, :func:`default_attacks`),
:func:`attacks_from_config` (the ``KIND-NORM`` strings of ``configs/robustness.py``) and the checks
of a list of attacks (:func:`check_attacks`, :func:`fit_to_classes`). The package docstring of
:mod:`advalign_jax.evaluation.robust` describes the evaluation as a whole.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

from advalign_jax.attacks import autoattack as AA
from advalign_jax.attacks.apgd import APGDConfig
from advalign_jax.attacks.fab import FABConfig
from advalign_jax.attacks.pgd import PGDConfig
from advalign_jax.attacks.square import SquareConfig
from advalign_jax.errors import ConfigError

ROBUSTBENCH_EPS = {"l2": 0.5, "linf": 8.0 / 255.0}
TARGETS = ("none", "next")
STAGE_CONFIGS = (APGDConfig, FABConfig, SquareConfig)

# ----------------------------------------------------------------------------------------------------
# Attacks
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PGDAttack:
    """PGD with ``config`` at radius ``eps``; ``target``: ``'none'`` (untargeted on the label) or
    ``'next'`` (targeted at class ``(y + 1) mod C``; ``config.targeted`` must say so)."""

    name: str
    eps: float
    config: PGDConfig
    target: str = "none"

    def __post_init__(self):
        if self.target not in TARGETS:
            raise ConfigError(f"attack {self.name!r}: target must be one of {TARGETS}, got {self.target!r}")
        if self.config.targeted != (self.target == "next"):
            raise ConfigError(f"attack {self.name!r}: target={self.target!r} needs PGDConfig(targeted="
                              f"{self.target == 'next'})")

    @property
    def norm(self) -> str:
        return self.config.norm


@dataclasses.dataclass(frozen=True)
class Cascade:
    """Stages ``((stage_name, config), ...)`` at radius ``eps``, each on the points still robust after
    the previous ones (all stages share one norm); ``version``: the AutoAttack version it is
    (``standard``, ``plus``, ``rand``), or ``''``."""

    name: str
    eps: float
    stages: tuple
    version: str = ""

    def __post_init__(self):
        if not self.stages:
            raise ConfigError(f"attack {self.name!r}: a cascade needs at least one stage")
        for _, cfg in self.stages:
            if not isinstance(cfg, STAGE_CONFIGS):
                raise ConfigError(f"attack {self.name!r}: a stage must be an APGD, FAB or Square config, got {cfg!r}")
        norms = {cfg.norm for _, cfg in self.stages}
        if len(norms) != 1:
            raise ConfigError(f"attack {self.name!r}: the stages mix norms {sorted(norms)}")
        names = [s for s, _ in self.stages]
        if len(set(names)) != len(names) or "none" in names:
            raise ConfigError(f"attack {self.name!r}: stage names {names} must be distinct and not 'none'")

    @property
    def norm(self) -> str:
        return self.stages[0][1].norm


Attack = Union[PGDAttack, Cascade]


def _radius(norm: str, eps: Optional[float]) -> float:
    if norm not in ROBUSTBENCH_EPS:
        raise ConfigError(f"norm must be 'l2' or 'linf', got {norm!r}")
    return ROBUSTBENCH_EPS[norm] if eps is None else float(eps)


def clip_range(clip) -> Optional[tuple]:
    """The ``clip`` config value as ``(low, high)``, or None for ``()`` (no clipping)."""
    return None if clip is None or len(clip) == 0 else tuple(float(v) for v in clip)


def pgd_attack(norm: str, eps: Optional[float] = None, steps: int = 20, step_factor: float = 2.5,
               random_start: bool = False, use_best: bool = True, clip=(0.0, 1.0),
               name: Optional[str] = None) -> PGDAttack:
    """The ``robustness`` library's evaluation PGD: ``steps`` steps of ``step_factor * eps / steps``,
    the best-loss iterate, random start (sphere for L2, box for Linf) only if asked."""
    eps = _radius(norm, eps)
    start = ("sphere" if norm == "l2" else "box") if random_start else "none"
    try:
        cfg = PGDConfig(norm=norm, steps=int(steps), step_size=float(step_factor) / int(steps), relative_step=True,
                        random_start=start, use_best=bool(use_best), clip=clip_range(clip))
    except (ValueError, ZeroDivisionError) as err:
        raise ConfigError(f"pgd: {err}") from None
    return PGDAttack(name or f"pgd{steps}-{norm}", eps, cfg)


def autoattack_whitebox(norm: str, eps: Optional[float] = None, n_iter: int = 100, n_target_classes: int = 9,
                        n_restarts: int = 1, clip=(0.0, 1.0), stages=("apgd-ce", "apgd-t"),
                        name: Optional[str] = None) -> Cascade:
    """APGD-CE then APGD-T (targeted DLR, ``n_target_classes`` targets), AutoAttack "standard"'s
    gradient-based part; ``stages`` picks a part of it (:func:`autoattack_attack` is the whole)."""
    eps = _radius(norm, eps)
    try:
        made = {"apgd-ce": APGDConfig(norm=norm, n_iter=int(n_iter), n_restarts=int(n_restarts), loss="ce",
                                      clip=clip_range(clip)),
                "apgd-t": APGDConfig(norm=norm, n_iter=int(n_iter), n_restarts=int(n_restarts), loss="dlr-targeted",
                                     n_target_classes=int(n_target_classes), clip=clip_range(clip))}
    except ValueError as err:
        raise ConfigError(f"apgd: {err}") from None
    return Cascade(name or f"apgd-ce+t-{norm}", eps, tuple((s, made[s]) for s in stages))


def autoattack_attack(norm: str, eps: Optional[float] = None, version: str = "standard", n_iter: int = 100,
                      n_target_classes: int = 9, fab_iter: int = 100, n_queries: int = 5000, restarts: int = 5,
                      eot_iter: int = 20, clip=(0.0, 1.0), name: Optional[str] = None) -> Cascade:
    """AutoAttack ``version`` (``standard``, ``plus``, ``rand``) at radius ``eps`` (RobustBench's by
    default), with AutoAttack's budgets by default (:func:`~advalign_jax.attacks.autoattack.version_stages`)."""
    eps = _radius(norm, eps)
    clip = clip_range(clip)
    try:
        stages = AA.version_stages(version, norm, n_iter=int(n_iter), n_target_classes=int(n_target_classes),
                                   n_queries=int(n_queries), restarts=int(restarts), eot_iter=int(eot_iter),
                                   fab_iter=int(fab_iter), clip=clip)
    except ValueError as err:
        raise ConfigError(f"autoattack: {err}") from None
    if clip is None and any(isinstance(cfg, FABConfig) for _, cfg in stages):
        raise ConfigError("autoattack: FAB projects within the pixel box; set clip (e.g. (0.0, 1.0))")
    suffix = "" if version == "standard" else f"-{version}"
    return Cascade(name or f"autoattack{suffix}-{norm}", eps, stages, version)


SINGLE = ("apgd-ce", "apgd-t", "apgd-dlr", "fab", "fab-t", "square")


def single_attack(kind: str, norm: str, eps: Optional[float] = None, n_iter: int = 100, n_restarts: int = 1,
                  n_target_classes: int = 9, fab_iter: int = 100, fab_restarts: int = 1, n_queries: int = 5000,
                  p_init: float = 0.8, square_restarts: int = 1, clip=(0.0, 1.0),
                  name: Optional[str] = None) -> Cascade:
    """One of AutoAttack's attacks on its own (``kind`` in :data:`SINGLE`), as a one-stage cascade."""
    eps = _radius(norm, eps)
    clip = clip_range(clip)
    try:
        if kind.startswith("apgd"):
            loss = {"apgd-ce": "ce", "apgd-t": "dlr-targeted", "apgd-dlr": "dlr"}[kind]
            cfg = APGDConfig(norm=norm, n_iter=int(n_iter), n_restarts=int(n_restarts), loss=loss,
                             n_target_classes=int(n_target_classes), clip=clip)
        elif kind.startswith("fab"):
            if clip is None:
                raise ValueError("FAB projects within the pixel box; set clip (e.g. (0.0, 1.0))")
            cfg = FABConfig(norm=norm, n_iter=int(fab_iter), n_restarts=int(fab_restarts), targeted=kind == "fab-t",
                            n_target_classes=int(n_target_classes), clip=clip)
        elif kind == "square":
            cfg = SquareConfig(norm=norm, n_queries=int(n_queries), p_init=float(p_init),
                               n_restarts=int(square_restarts), clip=clip)
        else:
            raise ValueError(f"unknown attack {kind!r}; use one of {SINGLE}")
    except ValueError as err:
        raise ConfigError(f"{kind}: {err}") from None
    return Cascade(name or f"{kind}-{norm}", eps, ((kind, cfg),))


# PAG's official per-epoch robustness check.
PAG_EPOCH_EVAL = PGDAttack("pag-pgd7-l2", 0.5, PGDConfig(norm="l2", steps=7, step_size=1.5 * 0.5 / 7,
                                                        random_start="box", start_radius=8.0 / 255.0))


def default_attacks() -> list:
    """PGD-20 under L2 and Linf, then APGD-CE + APGD-T under L2 and Linf, at RobustBench's radii."""
    return [pgd_attack("l2"), pgd_attack("linf"), autoattack_whitebox("l2"), autoattack_whitebox("linf")]


ATTACK_KINDS = ("pgd", "apgd", "apgd-ce", "apgd-t", "apgd-dlr", "fab", "fab-t", "square", "autoattack",
                "autoattack-plus", "autoattack-rand")


def attacks_from_config(c) -> tuple:
    """The attacks of ``c.attacks``, each ``KIND-NORM`` (KIND in :data:`ATTACK_KINDS`: ``pgd``,
    ``apgd`` (APGD-CE then APGD-T), one attack of AutoAttack alone, or ``autoattack`` (standard),
    ``autoattack-plus``, ``autoattack-rand``; NORM: ``l2``, ``linf``), at radii ``c.eps.l2`` /
    ``c.eps.linf`` with the budgets of the ``pgd``, ``apgd``, ``fab``, ``square`` and ``autoattack``
    blocks; the attack's name is the string itself."""
    specs = (c.attacks,) if isinstance(c.attacks, str) else tuple(c.attacks)
    if not specs:
        raise ConfigError("config.attacks is empty: name at least one attack (e.g. 'autoattack-linf')")
    attacks = []
    for spec in specs:
        kind, _, norm = str(spec).rpartition("-")
        if kind not in ATTACK_KINDS or norm not in ROBUSTBENCH_EPS:
            raise ConfigError(f"config.attacks: unknown attack {spec!r}; use KIND-NORM with KIND in "
                              f"{', '.join(ATTACK_KINDS)} and NORM l2 or linf (e.g. 'autoattack-linf')")
        eps = float(c.eps[norm])
        if kind == "pgd":
            attacks.append(pgd_attack(norm, eps, steps=c.pgd.steps, step_factor=c.pgd.step_factor,
                                      random_start=c.pgd.random_start, use_best=c.pgd.use_best, clip=c.clip,
                                      name=spec))
        elif kind == "apgd":
            attacks.append(autoattack_whitebox(norm, eps, n_iter=c.apgd.n_iter,
                                               n_target_classes=c.apgd.n_target_classes, n_restarts=c.apgd.n_restarts,
                                               clip=c.clip, name=spec))
        elif kind.startswith("autoattack"):
            version = kind.partition("-")[2] or "standard"
            attacks.append(autoattack_attack(norm, eps, version, n_iter=c.apgd.n_iter,
                                             n_target_classes=c.apgd.n_target_classes, fab_iter=c.fab.n_iter,
                                             n_queries=c.square.n_queries, restarts=c.autoattack.plus_restarts,
                                             eot_iter=c.autoattack.eot_iter, clip=c.clip, name=spec))
        else:
            attacks.append(single_attack(kind, norm, eps, n_iter=c.apgd.n_iter, n_restarts=c.apgd.n_restarts,
                                         n_target_classes=c.apgd.n_target_classes, fab_iter=c.fab.n_iter,
                                         fab_restarts=c.fab.n_restarts, n_queries=c.square.n_queries,
                                         p_init=c.square.p_init, square_restarts=c.square.n_restarts, clip=c.clip,
                                         name=spec))
    return check_attacks(attacks)


def check_attacks(attacks: Sequence[Attack]) -> tuple:
    attacks = tuple(attacks)
    names = [a.name for a in attacks]
    for a in attacks:
        if not isinstance(a, (PGDAttack, Cascade)):
            raise ConfigError(f"unknown attack {a!r}: use PGDAttack or Cascade")
        if not a.name or "/" in a.name or "," in a.name or a.name == "all":
            raise ConfigError(f"attack name {a.name!r} must be non-empty, not 'all', and contain no '/' or ','")
        if not a.eps > 0:
            raise ConfigError(f"attack {a.name!r}: eps must be positive, got {a.eps}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"two attacks are named {dup[0]!r}; results are filed by name")
    return attacks


def fit_to_classes(cfg, num_classes: int, name: str):
    """A stage on C classes: ``min(n_target_classes, C - 1)`` targets; the DLR losses need 3 (4) classes."""
    try:
        return AA.fit_to_classes(cfg, num_classes)
    except ValueError as err:
        hint = "; use apgd-ce or pgd" if "classes" in str(err) else ""
        raise ConfigError(f"attack {name!r}: {err}{hint}") from None

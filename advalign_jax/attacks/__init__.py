"""Attacks: compiled, batched PGD (L2/Linf), the minimal-perturbation searches, and AutoAttack.

- :mod:`advalign_jax.attacks.pgd`: :class:`PGDConfig`, :func:`pgd` (Madry-lab conventions, the
  adversarial-alignment projections, per-example radii);
- :mod:`advalign_jax.attacks.search`: the reference minimal-eps protocol and a generic doubling +
  bisection search;
- :mod:`advalign_jax.attacks.apgd`: APGD-CE, APGD-DLR and APGD-T (``apgd.apgd``, :class:`APGDConfig`);
- :mod:`advalign_jax.attacks.fab`: FAB and FAB-T (``fab.fab``, :class:`FABConfig`);
- :mod:`advalign_jax.attacks.square`: the Square Attack (``square.square``, :class:`SquareConfig`);
- :mod:`advalign_jax.attacks.autoattack`: the standard, plus and rand ensembles
  (``autoattack.autoattack``, :func:`version_stages`) and AutoAttack's checks.

(The attack functions are reached through their modules: a function here named like its module would
hide the module.)
"""

from advalign_jax.attacks.apgd import APGDConfig
from advalign_jax.attacks.autoattack import version_stages
from advalign_jax.attacks.fab import FABConfig
from advalign_jax.attacks.pgd import PGDConfig, pgd, pgd_with_logits
from advalign_jax.attacks.search import REFERENCE_ATTACK, ReferenceSearch, doubling_search, reference_search
from advalign_jax.attacks.square import SquareConfig

__all__ = ["PGDConfig", "pgd", "pgd_with_logits", "REFERENCE_ATTACK", "ReferenceSearch", "doubling_search",
           "reference_search", "APGDConfig", "FABConfig", "SquareConfig", "version_stages"]

"""Attacks: compiled, batched PGD (L2/Linf) and the minimal-perturbation searches.

- :mod:`advalign_jax.attacks.pgd`: :class:`PGDConfig`, :func:`pgd` (Madry-lab conventions, the
  adversarial-alignment projections, per-example radii);
- :mod:`advalign_jax.attacks.search`: the reference minimal-eps protocol and a generic doubling +
  bisection search.
"""

from advalign_jax.attacks.pgd import PGDConfig, pgd, pgd_with_logits
from advalign_jax.attacks.search import REFERENCE_ATTACK, ReferenceSearch, doubling_search, reference_search

__all__ = ["PGDConfig", "pgd", "pgd_with_logits", "REFERENCE_ATTACK", "ReferenceSearch", "doubling_search",
           "reference_search"]

"""Models: Flax architectures as pure functions of ``(variables, images)``, their registry, weight import
and checkpoints.

>>> from advalign_jax.models import get_model, load_model
>>> model = get_model("resnet18", num_classes=10)
>>> variables = model.init(jax.random.PRNGKey(0))
>>> logits = model.apply(variables, images)          # images: (N, H, W, 3) RGB in [0, 1]

See :mod:`advalign_jax.models.base` for the conventions every architecture follows.
"""

from advalign_jax.models.base import InputNorm, Model, ModelDef, NORMS
from advalign_jax.models.checkpoint import fingerprint, load_model, save_model
from advalign_jax.models.registry import get_def, get_model, list_models

__all__ = ["InputNorm", "Model", "ModelDef", "NORMS", "fingerprint", "get_def", "get_model", "list_models",
           "load_model", "save_model"]

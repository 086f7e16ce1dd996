"""What every model in the zoo is: a pure function of ``(variables, images)``.

Conventions shared by all architectures:

- **Input**: NHWC RGB in [0, 1]. Each model normalises its input itself (:class:`InputNorm`), so an
  attack radius means the same thing for every model.
- **Output**: float32 logits, shape (N, num_classes).
- **Modes**: ``model.apply(variables, x)`` is inference mode (BatchNorm uses running statistics,
  dropout off); ``model.apply_train(variables, x)`` is training mode and returns
  ``(logits, new_state)`` where ``new_state`` holds the updated BatchNorm statistics (``{}`` for
  models without BatchNorm).
- **Accelerator options** (module attributes every architecture accepts): ``dtype`` is the compute
  dtype (``jnp.bfloat16`` computes in bfloat16 with float32 parameters), ``remat`` wraps every block
  in ``jax.checkpoint`` (rematerialisation, for the double-backprop losses).
- **Intermediates**: architectures ``sow`` one activation per stage (named ``<stage>_out``) into the ``'intermediates'``
  collection (``model.intermediates(variables, x)``), which the weight-import tests compare, and
  ``features``, the penultimate features (the head's input).
- **Fake ReLU**: the architectures whose penultimate features come out of a ReLU have a module field
  ``fake_relu`` (default False): when set, that last ReLU is :func:`fake_relu` (the ``robustness``
  library's ``FakeReLU``: ReLU forward, identity backward), so a feature at 0 still has a gradient, as
  the library's ``model(x, with_latent=True, fake_relu=True)``. :func:`with_fake_relu` gives such a model.

An architecture module defines flax modules and registers :class:`ModelDef` entries in its module-level
``MODELS`` dict; :mod:`advalign_jax.models.registry` finds them (adding a model is adding a file).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from advalign_jax.errors import ConfigError

Variables = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class InputNorm:
    """``x -> (channels(x) * scale - mean) / std``; x is RGB in [0, 1].

    ``bgr`` reverses the channel order first (Caffe-style models). ``mean`` and ``std`` are in the
    scaled units.
    """

    mean: tuple = (0.0, 0.0, 0.0)
    std: tuple = (1.0, 1.0, 1.0)
    scale: float = 1.0
    bgr: bool = False

    def __call__(self, x):
        if self.bgr:
            x = x[..., ::-1]
        dtype = stat_dtype(x)
        mean = jnp.asarray(self.mean, dtype)
        std = jnp.asarray(self.std, dtype)
        return (x.astype(dtype) * self.scale - mean) / std

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std), "scale": self.scale, "bgr": self.bgr}

    @classmethod
    def from_dict(cls, d: Mapping) -> "InputNorm":
        return cls(tuple(d["mean"]), tuple(d["std"]), float(d["scale"]), bool(d["bgr"]))


# Named normalisations (with where each comes from).
NORMS = {
    # torchvision/timm and the harmonized Keras models: (x/255 - mean) / std on ImageNet statistics.
    "imagenet": InputNorm((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # Keras ResNet50 / VGG16 'caffe' preprocessing: BGR, 0..255, ImageNet means subtracted.
    "caffe": InputNorm((103.939, 116.779, 123.68), (1.0, 1.0, 1.0), scale=255.0, bgr=True),
    # Keras 'tf' preprocessing (ResNet50V2, MobileNet...): x/127.5 - 1.
    "inception": InputNorm((1.0, 1.0, 1.0), (1.0, 1.0, 1.0), scale=2.0),
    # PAG's CIFAR models: mean 0.5, std 0.5 (images in [-1, 1]).
    "half": InputNorm((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    # CIFAR-10 statistics of the robustness library (MadryLab/robustness, datasets.py, CIFAR) and of
    # kuangliu/pytorch-cifar.
    "cifar10": InputNorm((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    # Keras EfficientNet / ConvNeXt with their built-in Rescaling + Normalization (see those files).
    "none": InputNorm(),
}


def get_norm(norm: str | InputNorm | Mapping) -> InputNorm:
    if isinstance(norm, InputNorm):
        return norm
    if isinstance(norm, Mapping):
        return InputNorm.from_dict(norm)
    if norm not in NORMS:
        raise ValueError(f"unknown input normalisation {norm!r}; known: {', '.join(NORMS)}")
    return NORMS[norm]


def maybe_remat(block: type, enabled: bool, static_argnums: Sequence[int] = (2,)) -> type:
    """``nn.remat(block)`` when enabled. ``static_argnums`` counts ``self`` as 0, so ``(2,)`` marks the
    ``train`` flag of ``__call__(self, x, train)`` static. Parameter names are unchanged."""
    return nn.remat(block, static_argnums=tuple(static_argnums)) if enabled else block


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """A registered architecture.

    ``build(**options)`` returns the flax module; ``options`` holds the defaults (``num_classes``,
    ``input_size``, ``norm`` and architecture specifics), any of which a user may override.
    ``importers`` maps a source family (``'torch'``, ``'keras'``, ``'robustness'``) to an
    :class:`advalign_jax.models.importers.Importer` (the mapping table from that family's names).
    """

    name: str
    build: Callable[..., nn.Module]
    options: Mapping[str, Any]
    description: str = ""
    importers: Mapping[str, Callable] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A built model: the flax module plus what is needed to call it purely."""

    name: str
    module: nn.Module
    num_classes: int
    input_shape: tuple  # one example's shape, e.g. (224, 224, 3); (2,) for the toy MLP
    options: Mapping[str, Any]

    @property
    def input_size(self) -> int:
        """Side of the (square) input image."""
        return int(self.input_shape[0])

    def dummy_input(self, batch_size: int = 1):
        return jnp.zeros((batch_size, *self.input_shape), jnp.float32)

    def init(self, rng, batch_size: int = 1) -> dict:
        """Fresh variables (``{'params': ..., 'batch_stats': ...}``) for a random key."""
        def init(rng, x):  # one compiled program, not one per parameter shape
            variables = self.module.init({"params": rng, "dropout": rng}, x, train=False)
            return {k: v for k, v in variables.items() if k != "intermediates"}

        return jax.jit(init)(rng, self.dummy_input(batch_size))

    def variable_shapes(self) -> dict:
        """Shapes and dtypes of the variables, without allocating them (``jax.eval_shape``)."""
        return jax.eval_shape(lambda: self.init(jax.random.PRNGKey(0)))

    @property
    def has_state(self) -> bool:
        return "batch_stats" in self.variable_shapes()

    def apply(self, variables: Variables, images, **kwargs):
        """Logits in inference mode: the model as a pure function of (variables, images)."""
        out = self.module.apply(_params_and_state(variables), images, train=False, **kwargs)
        return out.astype(jnp.float32)

    def apply_train(self, variables: Variables, images, rng=None):
        """(logits, new_state) in training mode; new_state holds updated BatchNorm statistics."""
        rngs = {"dropout": rng} if rng is not None else {}
        mutable = ["batch_stats"] if "batch_stats" in variables else []
        out = self.module.apply(_params_and_state(variables), images, train=True, mutable=mutable or False,
                                rngs=rngs)
        logits, state = out if mutable else (out, {})
        return logits.astype(jnp.float32), dict(state)

    def intermediates(self, variables: Variables, images) -> dict:
        """{name: activation} of the per-stage activations the architecture sows (inference mode)."""
        _, state = self.module.apply(_params_and_state(variables), images, train=False,
                                     mutable=["intermediates"])
        flat = {}
        for path, value in _flatten(state.get("intermediates", {})):
            flat["/".join(path)] = value[0] if isinstance(value, tuple) else value
        return flat

    def logits_fn(self, variables: Variables) -> Callable:
        """``images -> logits`` with the variables bound (for attacks and saliency)."""
        return lambda images: self.apply(variables, images)


@jax.custom_vjp
def fake_relu(x):
    """``max(x, 0)`` forward, the identity backward (MadryLab/robustness ``robustness/tools/custom_modules.py``,
    ``FakeReLU``: ``forward: input.clamp(min=0)``, ``backward: grad_output``)."""
    return jnp.maximum(x, 0)


fake_relu.defvjp(lambda x: (jnp.maximum(x, 0), None), lambda _, g: (g,))


def last_relu(x, fake: bool):
    """The ReLU before an architecture's penultimate features: :func:`fake_relu` when ``fake``."""
    return fake_relu(x) if fake else nn.relu(x)


def with_fake_relu(model: "Model") -> "Model":
    """The same model (same variables) whose last ReLU before the penultimate features is
    :func:`fake_relu`; one line naming the architecture where it has no such ReLU."""
    if "fake_relu" not in {f.name for f in dataclasses.fields(model.module)}:
        raise ConfigError(f"fake_relu: model {model.name} has no ReLU before its penultimate features (its "
                          f"features come out of a normalisation or another activation); set fake_relu=False")
    return dataclasses.replace(model, module=model.module.clone(fake_relu=True))


def _params_and_state(variables: Variables) -> dict:
    return {k: v for k, v in variables.items() if k in ("params", "batch_stats")}


def _flatten(tree, prefix=()):
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _flatten(v, prefix + (str(k),))
    else:
        yield prefix, tree


def compute_dtype(name) -> Any:
    """'float32' / 'bfloat16' / 'float16' (or a dtype) -> the jnp dtype used for activations.

    'float64' is accepted for verification against float64 references (it needs ``jax_enable_x64``,
    e.g. ``with jax.enable_x64(True):``, and float64 variables); normalisation and statistics then run
    in float64 too (:func:`stat_dtype`).
    """
    dtype = jnp.dtype(name)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16),
                     jnp.dtype(jnp.float64)):
        raise ValueError(f"compute dtype must be float32, bfloat16, float16 or float64, got {name}")
    return dtype


def stat_dtype(x) -> Any:
    """The dtype of normalisations and statistics: float32, or float64 for a float64 input."""
    return jnp.promote_types(x.dtype, jnp.float32)


def count_params(variables: Variables) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(variables.get("params", {}))))


# ----------------------------------------------------------------------------------------------------
# Layers shared by several architectures
# ----------------------------------------------------------------------------------------------------


class Normalize(nn.Module):
    """The model's own input normalisation (no parameters)."""

    norm: InputNorm

    def __call__(self, x):
        return self.norm(x)


def torch_pad(kernel: int, dilation: int = 1) -> tuple:
    """PyTorch's symmetric ``padding=k//2`` as flax explicit padding."""
    p = dilation * (kernel - 1) // 2
    return ((p, p), (p, p))


def tf_same_pad(size: int, kernel: int, stride: int) -> tuple:
    """TensorFlow "SAME" padding for one spatial axis: total ``max((ceil(n/s)-1)*s + k - n, 0)``,
    split with the extra pixel after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return (total // 2, total - total // 2)


def batch_norm(train: bool, name: str, momentum: float = 0.9, epsilon: float = 1e-5, dtype=jnp.float32,
               axis_name: Optional[str] = None) -> nn.BatchNorm:
    """BatchNorm with PyTorch-style defaults: ``momentum=0.9`` here is PyTorch's 0.1 (Keras uses 0.99)."""
    return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=epsilon, dtype=dtype,
                        name=name, axis_name=axis_name)

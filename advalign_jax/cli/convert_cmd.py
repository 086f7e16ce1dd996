"""``advalign-jax convert`` and ``advalign-jax models``."""

from __future__ import annotations

import argparse

from advalign_jax.errors import AdvalignError
from advalign_jax.models.base import NORMS, count_params
from advalign_jax.models.checkpoint import load_model
from advalign_jax.models.convert import convert_checkpoint
from advalign_jax.models.registry import get_def, list_models


def add_parser(sub) -> None:
    conv = sub.add_parser(
        "convert", help="import a timm/torchvision/Keras/robustness-library checkpoint as an advalign_jax model",
        description="Read a checkpoint (.safetensors, PyTorch .pth/.bin, a robustness-library "
                    "checkpoint.pt.best, Keras .h5 or .keras), map its parameter names onto a registered "
                    "architecture, check every shape, and write a model directory (orbax variables + "
                    "model.json) that every command loads by path.",
        epilog="Example: advalign-jax convert --arch resnet50 --from resnet50.safetensors --out "
               "checkpoints/resnet50")
    conv.add_argument("--arch", required=True, help="registered architecture (see `advalign-jax models`)")
    conv.add_argument("--from", dest="source", required=True, help="checkpoint file to import")
    conv.add_argument("--out", required=True, help="model directory to write")
    conv.add_argument("--num-classes", type=int, help="classes of the head (default: read off the checkpoint)")
    conv.add_argument("--norm", help=f"input normalisation ({', '.join(NORMS)}); default: what checkpoints of "
                                     "this format expect (a robustness-library checkpoint: its own normaliser)")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing model directory")
    conv.set_defaults(func=run_convert)

    lst = sub.add_parser("models", help="list the registered architectures",
                         description="List every registered architecture with its default options "
                                     "and the checkpoint formats it imports.")
    lst.set_defaults(func=run_models)


def run_convert(args: argparse.Namespace) -> int:
    if args.num_classes is not None and args.num_classes < 1:
        raise AdvalignError(f"--num-classes must be positive, got {args.num_classes}")
    done = convert_checkpoint(args.source, args.arch, args.out, overwrite=args.overwrite,
                              num_classes=args.num_classes, norm=args.norm)
    model, path = done.model, done.path
    _, variables = load_model(path)
    print(f"{args.source}: {done.found}")
    print(f"wrote {path}: {model.name}, {model.num_classes} classes, input {model.input_shape}, "
          f"{count_params(variables):,} parameters")
    return 0


def run_models(args: argparse.Namespace) -> int:
    for name in list_models():
        d = get_def(name)
        imports = ", ".join(sorted(d.importers)) or "-"
        opts = ", ".join(f"{k}={v}" for k, v in d.options.items() if k in ("num_classes", "input_size", "norm"))
        print(f"{name:24s} {d.description}  [{opts}; imports: {imports}]")
    return 0

"""Optional: our torch importers against the real timm models (not part of the test suite).

    pip install timm            # plus torchvision; or see below
    python scripts/verify_timm.py [--size 224] [--models resnet18 vit_ti16 ...]

For each pair (our architecture, timm model): timm builds the model with random weights (BatchNorm
statistics and biases randomised too, so the check means something), its state dict is saved as
``.safetensors``, imported with our importer, and both are compared in float32 on the same random
[0, 1] input (timm's side normalised with its default mean/std): the logits relative to their scale and
the input-gradient of the true-class logit, relative, with the share of pixels within 1e-4 (at 224 px a
few ReLU or max-pool units of the deep plain networks sit within float32 rounding of their kink, which
moves the gradient of a few pixels in any float32 implementation).

timm imports torchvision at import time, but none of the compared models uses it. Where torchvision
is not installed (its PyPI build needs the CUDA build of torch), ``--torchvision-standin`` registers an
import-only stand-in that satisfies those imports and fails if anything from it is ever called.
"""

import argparse
import importlib.abc
import importlib.machinery
import os
import sys
import tempfile
import types

import numpy as np

PAIRS = {
    "resnet18": "resnet18", "resnet50": "resnet50", "vgg16": "vgg16", "vgg16_bn": "vgg16_bn",
    "efficientnet_b0": "efficientnet_b0", "vit_ti16": "vit_tiny_patch16_224", "vit_s16": "vit_small_patch16_224",
    "vit_b16": "vit_base_patch16_224", "convnext_tiny": "convnext_tiny",
}


def install_torchvision_standin():
    """Import-only stand-in for torchvision: every attribute is a class that raises when used."""
    class Meta(type):
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return Meta(name, (Unusable,), {})

    class Unusable(metaclass=Meta):
        def __init__(self, *a, **k):
            raise RuntimeError("the torchvision stand-in was used: install torchvision")

    class Module(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return Meta(name, (Unusable,), {})

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, fullname, path, target=None):
            if fullname == "torchvision" or fullname.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            return None

        def create_module(self, spec):
            module = Module(spec.name)
            module.__path__, module.__version__ = [], "0.0"
            return module

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, Finder())


def randomise_(net, seed):
    import torch  # pylint: disable=import-outside-toplevel

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(0.5 + torch.rand(t.shape, generator=g))
            elif name.endswith(("running_mean", "bias")) or "gamma" in name or name.endswith(("cls_token", "pos_embed")):
                t.add_(0.1 * torch.randn(t.shape, generator=g))
    return net


def compare(ours_name, timm_name, size, seed=0):
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    import timm  # pylint: disable=import-outside-toplevel
    import torch  # pylint: disable=import-outside-toplevel
    from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel

    from advalign_jax.models.importers import read_checkpoint  # pylint: disable=import-outside-toplevel
    from advalign_jax.models.convert import import_weights  # pylint: disable=import-outside-toplevel

    torch.manual_seed(seed)
    net = randomise_(timm.create_model(timm_name, pretrained=False), seed).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "w.safetensors")
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, path)
        family, weights = read_checkpoint(path)
        model, variables = import_weights(weights, family, ours_name, what=path)
    cfg = net.pretrained_cfg if hasattr(net, "pretrained_cfg") else {}
    mean = np.asarray(cfg.get("mean", (0.485, 0.456, 0.406)), np.float32)
    std = np.asarray(cfg.get("std", (0.229, 0.224, 0.225)), np.float32)
    norm = model.module.norm
    if not (np.allclose(norm.mean, mean) and np.allclose(norm.std, std)):
        raise SystemExit(f"{ours_name}: our default normalisation {norm} differs from timm's {mean}/{std}")
    rng = np.random.default_rng(seed)
    x = rng.uniform(size=(2, size, size, 3)).astype(np.float32)
    labels = np.array([3, 7])
    xt = torch.tensor(np.transpose(x, (0, 3, 1, 2)), requires_grad=True)
    logits_t = net((xt - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])
    (g_t,) = torch.autograd.grad(logits_t[torch.arange(2), torch.tensor(labels)].sum(), xt)
    g_t = np.transpose(g_t.numpy(), (0, 2, 3, 1))
    f = jax.jit(model.apply)
    logits = np.asarray(f(variables, x))
    g = np.asarray(jax.grad(lambda z: jnp.sum(jnp.take_along_axis(f(variables, z), labels[:, None], 1)))(x))
    lt = logits_t.detach().numpy()
    logit_err = np.abs(logits - lt).max() / np.abs(lt).max()
    grad_err = np.abs(g - g_t).max() / np.abs(g_t).max()
    within = float(np.mean(np.abs(g - g_t) <= 1e-4 * np.abs(g_t).max()))
    return logit_err, grad_err, within


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--models", nargs="+", default=list(PAIRS))
    parser.add_argument("--torchvision-standin", action="store_true")
    args = parser.parse_args()
    if args.torchvision_standin:
        install_torchvision_standin()
    print(f"| ours | timm | logits (rel. to scale) | input-gradient (rel.) | pixels within 1e-4 |")
    print("|---|---|---|---|---|")
    for name in args.models:
        le, ge, within = compare(name, PAIRS[name], args.size)
        print(f"| {name} | {PAIRS[name]} | {le:.1e} | {ge:.1e} | {100 * within:.2f}% |", flush=True)


if __name__ == "__main__":
    main()

"""PAG's CIFAR models (cifar_resnet18, cifar_vit) against plain PyTorch references (tests/references/torch_cifar.py).

Each reference is randomised (BatchNorm statistics, norm affines, biases), saved as .pth and .safetensors
with the official parameter names, converted through the command line, reloaded, and compared on the
same [0, 1] input (the torch side applies (x - 0.5) / 0.5 in front): logits, one activation per stage
and the input-gradient of the true-class logit, float32, 1e-4 of the reference's scale.

Our side runs under ``jax.jit`` with the flax module as a static argument, so each distinct model is
compiled once for the whole file (the models' ``apply`` is ``module.apply(variables, x, train=False)``).
"""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from advalign_jax.cli.main import main
from advalign_jax.models import get_model, load_model, save_model
from advalign_jax.models.convert import import_weights
from model_checks import assert_close, random_images, rel_err, torch_true_class_grad
from torch_cifar import TorchCifarResNet, TorchCifarViT, randomise

REFERENCES = {"cifar_resnet18": TorchCifarResNet, "cifar_vit": TorchCifarViT}


# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------

def nchw(x):
    return torch.tensor(np.transpose(np.asarray(x, np.float32), (0, 3, 1, 2)))


def nhwc(t):
    a = t.detach().numpy()
    return np.transpose(a, (0, 2, 3, 1)) if a.ndim == 4 else a


def state_arrays(net):
    return {k: v.detach().numpy() for k, v in net.state_dict().items()}


def torch_forward(net, x):
    """(logits, stages) of the reference on our [0, 1] NHWC input, PAG's normalisation in front."""
    with torch.no_grad():
        logits, stages = net((nchw(x) - 0.5) / 0.5)
    return logits.numpy(), {k: nhwc(v) for k, v in stages.items()}


@functools.partial(jax.jit, static_argnums=0)
def logits_of(module, variables, x):
    return module.apply(variables, x, train=False).astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def logits_stages_grad(module, variables, x, labels):
    """Inference-mode logits, sown stage activations, and d(sum of true-class logits)/dx, in one program."""
    def picked(x):
        logits, state = module.apply(variables, x, train=False, mutable=["intermediates"])
        return jnp.sum(jnp.take_along_axis(logits, labels[:, None], axis=1)), (logits, state["intermediates"])

    (_, (logits, stages)), grad = jax.value_and_grad(picked, has_aux=True)(x)
    return logits, {k: v[0] for k, v in stages.items() if k != "features"}, grad  # stages only


@functools.partial(jax.jit, static_argnums=0)
def train_logits_state_grad(module, variables, x, labels):
    """Training-mode logits, updated batch statistics, and the input-gradient of the true-class logits."""
    def picked(x):
        logits, state = module.apply(variables, x, train=True, mutable=["batch_stats"])
        return jnp.sum(jnp.take_along_axis(logits, labels[:, None], axis=1)), (logits, state["batch_stats"])

    (_, (logits, stats)), grad = jax.value_and_grad(picked, has_aux=True)(x)
    return logits, stats, grad


@functools.partial(jax.jit, static_argnums=0)
def train_logits(module, variables, x, rng):
    return module.apply(variables, x, train=True, rngs={"dropout": rng})


@functools.partial(jax.jit, static_argnums=0)
def param_grad(module, variables, x):
    """Gradient of a small training-mode loss with respect to the parameters."""
    def loss(params):
        logits, _ = module.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
        return jnp.mean(logits ** 2)

    return jax.grad(loss)(variables["params"])


@pytest.fixture(scope="module", params=sorted(REFERENCES))
def converted(request, tmp_path_factory):
    """(arch, torch reference, {format: converted model dir}) for both checkpoint formats."""
    arch = request.param
    torch.manual_seed(0)
    net = randomise(REFERENCES[arch](), seed=1).eval()
    d = tmp_path_factory.mktemp(arch)
    state = net.state_dict()
    torch.save(state, d / "w.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(d / "w.safetensors"))
    paths = {}
    for fmt in ("pth", "safetensors"):
        paths[fmt] = str(d / f"model_{fmt}")
        assert main(["convert", "--arch", arch, "--from", str(d / f"w.{fmt}"), "--out", paths[fmt]]) == 0
    return arch, net, paths


# ----------------------------------------------------------------------------------------------------
# Both models
# ----------------------------------------------------------------------------------------------------

def test_matches_the_torch_reference(converted):
    arch, net, paths = converted
    model, variables = load_model(paths["pth"], arch=arch)
    assert model.module.norm.mean == (0.5, 0.5, 0.5) and model.module.norm.std == (0.5, 0.5, 0.5)
    assert model.num_classes == 10 and model.input_shape == (32, 32, 3)
    x = random_images(0, 2, 32)
    labels = np.array([3, 8])
    ref_logits, ref_stages = torch_forward(net, x)
    logits, stages, grad = logits_stages_grad(model.module, variables, x, labels)
    assert_close(logits, ref_logits, what=f"{arch} logits")
    assert set(stages) == set(ref_stages)
    for name, ref in ref_stages.items():
        assert_close(stages[name], ref, what=f"{arch} {name}")
    ref_grad, _ = torch_true_class_grad(lambda t: net((t - 0.5) / 0.5)[0], x, labels)
    assert_close(grad, ref_grad, what=f"{arch} input-gradient")


def test_both_formats_and_the_saved_checkpoint_are_exact(converted, tmp_path):
    arch, net, paths = converted
    _, direct = import_weights(state_arrays(net), "torch", arch)
    x = random_images(1, 2, 32)
    outputs = []
    for fmt in ("pth", "safetensors"):
        model, variables = load_model(paths[fmt])
        assert jax.tree.structure(variables) == jax.tree.structure(direct)
        for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(direct)):
            np.testing.assert_array_equal(a, b)
        outputs.append(np.asarray(logits_of(model.module, variables, x)))
    path = save_model(str(tmp_path / "again"), model, variables)
    again, restored = load_model(path)
    outputs.append(np.asarray(logits_of(again.module, restored, x)))
    np.testing.assert_array_equal(outputs[0], outputs[1])
    np.testing.assert_array_equal(outputs[0], outputs[2])


def test_bfloat16_is_close_to_float32(converted):
    arch, _, paths = converted
    f32, variables = load_model(paths["pth"])
    bf16, _ = load_model(paths["pth"], dtype="bfloat16")
    x = random_images(1, 2, 32)
    low = logits_of(bf16.module, variables, x)
    assert low.dtype == jnp.float32
    assert jax.tree.leaves(variables["params"])[0].dtype == jnp.float32
    assert_close(low, logits_of(f32.module, variables, x), tol=5e-2, what=f"{arch} bfloat16 logits")


SMALL = {  # reduced variants of the same architectures: (reference, options the importer cannot infer)
    "cifar_resnet18": (lambda: TorchCifarResNet(7, (1, 2, 1, 1), (8, 16, 24, 32)), {}),
    "cifar_vit": (lambda: TorchCifarViT(5, image=16, patch=2, width=48, layers=2, heads=4, mlp_width=96,
                                        cls=False, scale_by="width"), {"heads": 4}),
}


@pytest.fixture(scope="module", params=sorted(SMALL))
def small(request):
    """(arch, torch reference, model, variables) of a reduced variant, imported from the reference's
    state dict (whose names and shapes give every option but the ViT's number of heads)."""
    arch = request.param
    reference, overrides = SMALL[arch]
    torch.manual_seed(2)
    net = randomise(reference(), seed=3).eval()
    model, variables = import_weights(state_arrays(net), "torch", arch, **overrides)
    return arch, net, model, variables


def test_variants_are_read_off_the_checkpoint(small):
    arch, net, model, variables = small
    expected = {"cifar_resnet18": dict(num_classes=7, stage_sizes=(1, 2, 1, 1), widths=(8, 16, 24, 32)),
                "cifar_vit": dict(num_classes=5, input_size=16, patch_size=2, hidden=48, num_layers=2,
                                  mlp_hidden=96, cls_token=False)}[arch]
    assert {k: model.options[k] for k in expected} == expected
    x = random_images(6, 2, model.input_size)
    assert_close(logits_of(model.module, variables, x), torch_forward(net, x)[0], what=f"{arch} variant logits")


def test_remat_gives_the_same_parameter_gradient(small):
    # On the reduced variants: rematerialisation wraps every block the same way at any size.
    arch, _, model, variables = small
    remat = get_model(arch, **{**model.options, "remat": True})
    x = random_images(3, 2, model.input_size)
    blocks = model.options["num_layers"] if arch == "cifar_vit" else sum(model.options["stage_sizes"])
    traced = str(jax.make_jaxpr(lambda p: remat.module.apply({**variables, "params": p}, x))(variables["params"]))
    assert traced.count("remat") == blocks  # one rematerialised call per block
    g1 = param_grad(model.module, variables, x)
    g2 = param_grad(remat.module, variables, x)
    assert jax.tree.structure(g1) == jax.tree.structure(g2)
    # Per tensor, 1e-4 of its scale, plus 1e-6 of the largest gradient: some tensors' gradients are
    # zero in exact arithmetic (the attention key bias: softmax ignores a per-query constant) and
    # hold only rounding noise.
    floor = 1e-6 * max(float(np.max(np.abs(u))) for u in jax.tree.leaves(g1))
    for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(v, u, rtol=0, atol=1e-4 * float(np.max(np.abs(u))) + floor,
                                   err_msg=f"{arch} remat gradient {jax.tree_util.keystr(path)}")


# ----------------------------------------------------------------------------------------------------
# cifar_resnet18: BatchNorm training mode
# ----------------------------------------------------------------------------------------------------

def test_resnet_training_mode_matches_torch(converted):
    arch, net, paths = converted
    if arch != "cifar_resnet18":
        pytest.skip("BatchNorm training mode: ResNet only")
    model, variables = load_model(paths["pth"])
    x = random_images(4, 4, 32)
    labels = np.array([0, 7, 2, 5])
    trained = copy.deepcopy(net).train()
    ref_logits, _ = torch_forward(trained, x)  # updates trained's running statistics (momentum 0.1)
    logits, stats, _ = train_logits_state_grad(model.module, variables, x, labels)
    assert_close(logits, ref_logits, what="train-mode logits")
    # Running statistics: PyTorch's momentum 0.1 (flax convention 0.9) and unbiased running variance.
    _, expected = import_weights(state_arrays(trained), "torch", arch)
    for (path, ours), theirs, old in zip(jax.tree_util.tree_leaves_with_path(stats),
                                         jax.tree.leaves(expected["batch_stats"]),
                                         jax.tree.leaves(variables["batch_stats"])):
        assert not np.allclose(theirs, old)  # the statistics did move
        assert_close(ours, theirs, what=f"running statistic {jax.tree_util.keystr(path)}")
    # The input-gradient in training mode (batch statistics in the graph, as in PAG's double backprop),
    # compared in float64 on both sides. In training mode one ReLU whose pre-activation lies within
    # float32 rounding of zero changes the batch statistics' backward for every pixel, so two float32
    # implementations (or one on two CPUs) can differ by 1e-2 where the function itself is that
    # non-smooth; in float64 such a tie is out of reach and both sides compute the same function.
    double = copy.deepcopy(net).train().double()
    ref_grad, ref_logits64 = torch_true_class_grad(lambda t: double((t - 0.5) / 0.5)[0], x.astype(np.float64),
                                                   labels)
    with jax.enable_x64(True):
        model64, _ = load_model(paths["pth"], dtype="float64")
        variables64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
        logits64, _, grad64 = train_logits_state_grad(model64.module, variables64, x.astype(np.float64), labels)
        assert grad64.dtype == jnp.float64
        logits64, grad64 = np.asarray(logits64), np.asarray(grad64)
    assert_close(logits64, ref_logits64, tol=1e-10, what="train-mode logits, float64")
    assert_close(grad64, ref_grad, tol=1e-8, what="train-mode input-gradient, float64")


def test_a_resnet_checkpoint_is_not_a_vit(converted, tmp_path, capsys):
    arch, net, _ = converted
    if arch != "cifar_resnet18":
        pytest.skip("one direction suffices")
    torch.save(net.state_dict(), tmp_path / "rn.pth")
    code = main(["convert", "--arch", "cifar_vit", "--from", str(tmp_path / "rn.pth"), "--out",
                 str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0, err
    assert "as cifar_vit" in err and "does not fit" in err
    assert "missing: emb.weight" in err and "unexpected: conv1.weight" in err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------
# cifar_vit: the attention-scale quirk, the patch order, dropout
# ----------------------------------------------------------------------------------------------------

def test_vit_attention_scale_quirk_and_patch_order(converted):
    arch, net, paths = converted
    if arch != "cifar_vit":
        pytest.skip("ViT only")
    x = random_images(1, 2, 32)
    # The reference's patch order is the official one: unfold rows, then columns, channels last
    # (PAG's ViT._to_words).
    t = nchw(x)
    official = t.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 4, 5, 1).reshape(2, 64, -1)
    torch.testing.assert_close(net.words(t), official, rtol=0, atol=0)

    width, variables = load_model(paths["pth"])
    head_dim, _ = load_model(paths["pth"], attn_scale="head_dim")
    assert width.options["attn_scale"] == "width"
    standard = TorchCifarViT(scale_by="head_dim").eval()
    standard.load_state_dict(net.state_dict())
    ref_standard, ref_width = torch_forward(standard, x)[0], torch_forward(net, x)[0]
    ours_width = logits_of(width.module, variables, x)
    assert_close(logits_of(head_dim.module, variables, x), ref_standard, what="head_dim-scaled logits")
    assert rel_err(ref_standard, ref_width) > 1e-3  # the quirk changes the function (measured: 2e-2)
    assert rel_err(logits_of(head_dim.module, variables, x), ours_width) > 1e-3



def test_vit_dropout_is_random_and_training_only(small):
    arch, _, plain, variables = small
    if arch != "cifar_vit":
        pytest.skip("ViT only")
    dropped = get_model(arch, **{**plain.options, "dropout": 0.1})  # dropout acts the same at any size
    x = random_images(1, 2, plain.input_size)
    ref = logits_of(plain.module, variables, x)
    np.testing.assert_array_equal(np.asarray(logits_of(dropped.module, variables, x)), np.asarray(ref))
    a = train_logits(dropped.module, variables, x, jax.random.PRNGKey(0))
    b = train_logits(dropped.module, variables, x, jax.random.PRNGKey(1))
    assert rel_err(a, ref) > 1e-3 and rel_err(a, b) > 1e-3
    # Without dropout, training mode is inference mode (no BatchNorm): through the Model API, whose
    # training mode returns an empty state for models without BatchNorm.
    logits, state = plain.apply_train(variables, x)
    assert state == {}
    assert_close(logits, ref, tol=1e-5, what="ViT training-mode logits")

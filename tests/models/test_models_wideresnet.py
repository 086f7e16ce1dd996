"""WideResNet (TRADES layout) against the plain PyTorch build of that layout (tests/references/torch_wideresnet.py).

WRN-10-1 (one block per group: block1's with the identity shortcut, block2's and block3's with the 1x1
shortcut on the activated input and stride 2; WRN-16-2 for two blocks per group), random weights,
BatchNorm statistics and affine parameters randomised, saved as TRADES saves it (with the unused ``sub_block1``) and from ``DataParallel``
(``module.`` prefix), converted through the command line and compared on the same [0, 1] input (no
normalisation on either side): inference-mode logits and stage activations in float32 (1e-4 of the
reference's scale), the input-gradient of the true-class logit in float64 (float32 rounding near a
ReLU kink is not compared), and training mode in float64 (batch statistics, updated running
statistics with PyTorch's momentum and unbiased variance, input-gradient through the batch statistics).
"""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from advalign_jax.cli.main import main
from advalign_jax.errors import AdvalignError
from advalign_jax.models import get_def, get_model, load_model
from advalign_jax.models.base import count_params
from advalign_jax.models.convert import import_weights
from model_checks import assert_close, random_images, rel_err, torch_true_class_grad
from torch_wideresnet import TorchWideResNet, randomise


def nchw(x, dtype=torch.float32):
    return torch.tensor(np.transpose(np.asarray(x), (0, 3, 1, 2))).to(dtype)


def state_arrays(net, prefix=""):
    return {prefix + k: v.detach().numpy() for k, v in net.state_dict().items()}


# XLA's CPU backend optimisations off: these small programs compile several times faster; the
# computation is the same.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _forward(module, train, with_grad, variables, x, labels, rng):
    collection = "batch_stats" if train else "intermediates"

    def picked(x):
        logits, state = module.apply(variables, x, train=train, mutable=[collection], rngs={"dropout": rng})
        return jnp.sum(jnp.take_along_axis(logits, labels[:, None], axis=1)), (logits, state[collection])

    if not with_grad:
        return picked(x)[1]
    (_, (logits, state)), grad = jax.value_and_grad(picked, has_aux=True)(x)
    return logits, state, grad


_PROGRAMS = {}


def run(module, variables, x, train, labels=None, rng=None):
    """(logits, sown stages or updated batch statistics) and, given ``labels``, d(sum of true-class
    logits)/dx; one compiled program per model, mode and argument shapes."""
    with_grad = labels is not None
    args = ({k: variables[k] for k in ("params", "batch_stats")}, np.asarray(x),
            np.zeros(len(x), np.int32) if labels is None else np.asarray(labels),
            jax.random.PRNGKey(0) if rng is None else rng)
    key = (module, train, with_grad, str(jax.tree.map(lambda a: (np.shape(a), str(np.asarray(a).dtype)), args)))
    if key not in _PROGRAMS:
        _PROGRAMS[key] = jax.jit(functools.partial(_forward, module, train, with_grad)).lower(*args).compile(
            compiler_options=FAST_COMPILE)
    return jax.tree.map(np.asarray, _PROGRAMS[key](*args))


@pytest.fixture(scope="module")
def wrn(tmp_path_factory):
    """(torch WRN-10-1, {'plain': dir, 'dataparallel': dir}) converted through the CLI."""
    torch.manual_seed(0)
    net = randomise(TorchWideResNet(depth=10, widen_factor=1, num_classes=10), seed=1).eval()
    d = tmp_path_factory.mktemp("wrn")
    torch.save(net.state_dict(), d / "model-wideres-epoch76.pt")
    torch.save(torch.nn.DataParallel(net).state_dict(), d / "dp.pt")
    dirs = {}
    for name, source in (("plain", "model-wideres-epoch76.pt"), ("dataparallel", "dp.pt")):
        dirs[name] = str(d / name)
        assert main(["convert", "--arch", "wrn34_10", "--from", str(d / source), "--out", dirs[name]]) == 0
    return net, dirs


def float64(model_dir, variables):
    model64, _ = load_model(model_dir, dtype="float64")
    return model64, jax.tree.map(lambda a: np.asarray(a, np.float64), variables)


def test_wrn_matches_torch_in_inference_mode(wrn):
    net, dirs = wrn
    model, variables = load_model(dirs["plain"])
    assert (model.options["depth"], model.options["widen_factor"], model.num_classes) == (10, 1, 10)
    assert model.module.norm.mean == (0.0, 0.0, 0.0) and model.module.norm.std == (1.0, 1.0, 1.0)
    # Both kinds of block: block1's maps 16 -> 16 channels (identity shortcut, no convShortcut), block2's
    # and block3's change width and stride (1x1 shortcut on the activated input).
    assert "conv_shortcut" not in variables["params"]["block1_0"]
    assert {"conv_shortcut"} <= set(variables["params"]["block2_0"]) & set(variables["params"]["block3_0"])
    x = random_images(0, 3, 32)
    labels = np.array([3, 8, 0])
    logits, stages = run(model.module, variables, x, False)
    with torch.no_grad():
        ref_stages = {k: np.transpose(v.numpy(), (0, 2, 3, 1)) for k, v in net.stages(nchw(x)).items()}
        ref_logits = net(nchw(x)).numpy()
    assert_close(logits, ref_logits, what="WRN-10-1 logits")
    assert set(stages) - {"features"} == set(ref_stages)  # the stages, besides the penultimate features
    for name, ref in ref_stages.items():
        assert_close(stages[name][0], ref, what=f"WRN-10-1 {name}")
    # The DataParallel checkpoint gives the same variables.
    _, dp = load_model(dirs["dataparallel"])
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(dp)):
        np.testing.assert_array_equal(a, b)
    # Input-gradient, float64 on both sides.
    ref_grad, _ = torch_true_class_grad(copy.deepcopy(net).double(), x.astype(np.float64), labels)
    with jax.enable_x64(True):
        model64, variables64 = float64(dirs["plain"], variables)
        _, _, grad64 = run(model64.module, variables64, x.astype(np.float64), False, labels)
    assert grad64.dtype == np.float64
    assert_close(grad64, ref_grad, tol=1e-8, what="WRN-10-1 input-gradient, float64")
    stage_error = max(rel_err(stages[name][0], ref) for name, ref in ref_stages.items())
    print(f"WRN-10-1: logits {rel_err(logits, ref_logits):.1e}, stages {stage_error:.1e}, input-gradient "
          f"(float64) {rel_err(grad64, ref_grad):.1e}")


def test_wrn_training_mode_matches_torch(wrn):
    # Training mode (batch statistics in the graph, running statistics updated), float64 on both sides:
    # logits, updated running statistics, and the input-gradient through the batch statistics.
    net, dirs = wrn
    _, variables = load_model(dirs["plain"])
    x = random_images(4, 4, 32).astype(np.float64)
    labels = np.array([0, 7, 2, 5])
    trained = copy.deepcopy(net).train().double()
    ref_grad, ref_logits = torch_true_class_grad(trained, x, labels)  # updates the running statistics
    _, expected = import_weights(state_arrays(trained), "torch", "wrn34_10")
    with jax.enable_x64(True):
        model64, variables64 = float64(dirs["plain"], variables)
        logits, stats, grad = run(model64.module, variables64, x, True, labels)
    assert_close(logits, ref_logits, tol=1e-10, what="WRN train-mode logits, float64")
    assert_close(grad, ref_grad, tol=1e-8, what="WRN train-mode input-gradient, float64")
    for (path, ours), theirs, old in zip(jax.tree_util.tree_leaves_with_path(stats),
                                         jax.tree.leaves(expected["batch_stats"]),
                                         jax.tree.leaves(variables["batch_stats"])):
        assert not np.allclose(theirs, old)  # the statistics did move (PyTorch's momentum 0.1)
        assert_close(ours, theirs, tol=1e-6, what=f"running statistic {jax.tree_util.keystr(path)}")


def test_wrn_16_2_is_read_off_the_checkpoint():
    # Two blocks per group (layer.0 and layer.1), widen factor 2, 7 classes; a DataParallel state dict
    # passed in memory.
    torch.manual_seed(3)
    net = randomise(TorchWideResNet(depth=16, widen_factor=2, num_classes=7), seed=4).eval()
    weights = state_arrays(net, prefix="module.")
    assert "module.sub_block1.layer.1.conv2.weight" in weights  # TRADES's unused group, ignored
    model, variables = import_weights(weights, "torch", "wrn28_10")
    assert (model.options["depth"], model.options["widen_factor"], model.num_classes) == (16, 2, 7)
    x = random_images(5, 2, 32)
    logits, _ = run(model.module, variables, x, False)
    with torch.no_grad():
        assert_close(logits, net(nchw(x)).numpy(), what="WRN-16-2 logits")


def test_dropout_only_in_training_mode(wrn):
    _, dirs = wrn
    plain, variables = load_model(dirs["plain"])
    dropped, _ = load_model(dirs["plain"], drop_rate=0.3)
    x = random_images(4, 4, 32)
    np.testing.assert_array_equal(run(dropped.module, variables, x, False, rng=jax.random.PRNGKey(1))[0],
                                  run(plain.module, variables, x, False)[0])
    a = run(dropped.module, variables, x, True, rng=jax.random.PRNGKey(1))[0]
    b = run(dropped.module, variables, x, True, rng=jax.random.PRNGKey(2))[0]
    ref = run(plain.module, variables, x, True)[0]
    assert rel_err(a, ref) > 1e-3 and rel_err(a, b) > 1e-3


def test_registered_sizes_and_names_match_the_trades_layout():
    # WRN-34-10 and WRN-28-10 at full size, without allocating: the torch build on the meta device.
    counts = {}
    for arch, depth in (("wrn34_10", 34), ("wrn28_10", 28)):
        with torch.device("meta"):
            ref = TorchWideResNet(depth=depth, widen_factor=10)
        state = {k for k in ref.state_dict() if not k.startswith("sub_block1.") and not k.endswith("num_batches_tracked")}
        model = get_model(arch)
        used = sum(int(np.prod(p.shape)) for p in ref.parameters()) - \
            sum(int(np.prod(p.shape)) for p in ref.sub_block1.parameters())
        counts[arch] = count_params(model.variable_shapes())
        assert counts[arch] == used
        assert {r.source for r in get_def(arch).importers["torch"].rules(model)} == state
        assert get_def(arch).options["norm"] == "none" and get_def(arch).options["drop_rate"] == 0.0
    assert counts["wrn34_10"] == 46_160_474  # the WRN-34-10 of TRADES and of the robustness benchmarks


def test_bad_depth_and_wrong_checkpoint(wrn, tmp_path, capsys):
    with pytest.raises(AdvalignError, match="depth must be 6 n \\+ 4"):
        get_model("wrn34_10", depth=33)
    net, _ = wrn
    torch.save({k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}, tmp_path / "nohead.pt")
    assert main(["convert", "--arch", "wrn34_10", "--from", str(tmp_path / "nohead.pt"), "--out",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "2 missing: fc.weight; fc.bias" in err, err
    assert not (tmp_path / "o").exists()


def test_bfloat16_and_remat(wrn):
    _, dirs = wrn
    model, variables = load_model(dirs["plain"])
    bf16, _ = load_model(dirs["plain"], dtype="bfloat16")
    x = random_images(7, 3, 32)
    low = run(bf16.module, variables, x, False)[0]  # the module's output: computed in bfloat16
    assert low.dtype == jnp.bfloat16 and jax.tree.leaves(variables["params"])[0].dtype == np.float32
    assert_close(low.astype(np.float32), run(model.module, variables, x, False)[0], tol=5e-2, what="WRN bfloat16 logits")
    remat, _ = load_model(dirs["plain"], remat=True)
    traced = str(jax.make_jaxpr(lambda p: remat.module.apply({**variables, "params": p}, x))(variables["params"]))
    assert traced.count("remat") == 3  # one rematerialised call per block

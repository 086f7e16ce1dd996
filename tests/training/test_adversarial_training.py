"""Adversarial training objectives (PGD-AT and TRADES) against independent PyTorch versions of the
reference steps (tests/references/torch_adversarial.py), in float64 on both sides: one training step of
each gives the same parameters and BatchNorm statistics; the attack runs in inference mode and leaves the
statistics alone; bad configs are one line."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

import torch_adversarial as tref
from advalign_jax.cli.main import main
from advalign_jax.config import load_config
from advalign_jax.errors import ConfigError
from advalign_jax.training import objectives
from advalign_jax.training.config_blocks import objective_block
from advalign_jax.training.objectives import adversarial, trades
from advalign_jax.training.seed_sweep import sweep
from advalign_jax.training.trainer import train

C, N, H = 4, 6, 6


class TorchNet(torch.nn.Module):
    """conv3x3(3->5) BN tanh, conv3x3(5->6) BN tanh, spatial mean, linear(6->C). A smooth activation: with
    ReLU, input-gradient components that cancel to about 1e-17 in one framework are exactly 0 in the
    other, and a sign step then moves that pixel differently; tanh keeps every component well away from 0."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 5, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(5)
        self.conv2 = torch.nn.Conv2d(5, 6, 3, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(6)
        self.head = torch.nn.Linear(6, C)

    def forward(self, x):
        x = torch.tanh(self.bn1(self.conv1(x)))
        x = torch.tanh(self.bn2(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


def _bn(train, name):
    """The zoo's BatchNorm (PyTorch's momentum and epsilon), computing in the input's dtype (float64) with
    the two-pass batch variance PyTorch uses (flax's default E[x^2] - E[x]^2 loses digits to cancellation)."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, use_fast_variance=False,
                        name=name)


class JaxNet(nn.Module):
    """The same function, NHWC."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = jnp.tanh(_bn(train, "bn1")(nn.Conv(5, (3, 3), padding=((1, 1), (1, 1)), name="conv1")(x)))
        x = jnp.tanh(_bn(train, "bn2")(nn.Conv(6, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(x)))
        return nn.Dense(C, name="head")(jnp.mean(x, axis=(1, 2)))


class Model:
    """The model interface the objectives use (``apply``, ``apply_train``), in the arrays' own dtype."""

    name, num_classes = "net", C

    def __init__(self):
        self.module = JaxNet()

    def apply(self, variables, x):
        return self.module.apply(variables, x, train=False)

    def apply_train(self, variables, x, rng=None):  # pylint: disable=unused-argument
        out, state = self.module.apply(variables, x, train=True, mutable=["batch_stats"])
        return out, dict(state)


def _pair(seed=0):
    torch.manual_seed(seed)
    tm = TorchNet().double()
    with torch.no_grad():
        for bn in (tm.bn1, tm.bn2):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 1.5)
    return tm, _variables(tm)


def _variables(tm):
    t = lambda a: np.asarray(a.detach().numpy(), np.float64)  # noqa: E731
    params = {"conv1": {"kernel": t(tm.conv1.weight.permute(2, 3, 1, 0)), "bias": t(tm.conv1.bias)},
              "conv2": {"kernel": t(tm.conv2.weight.permute(2, 3, 1, 0)), "bias": t(tm.conv2.bias)},
              "head": {"kernel": t(tm.head.weight.T), "bias": t(tm.head.bias)}}
    stats = {}
    for name, bn in (("bn1", tm.bn1), ("bn2", tm.bn2)):
        params[name] = {"scale": t(bn.weight), "bias": t(bn.bias)}
        stats[name] = {"mean": t(bn.running_mean), "var": t(bn.running_var)}
    return {"params": params, "batch_stats": stats}


def _data(seed=0):
    rng = np.random.default_rng(seed)
    # not too close to the box's edges, so clipping matters only for the attack's own steps
    return rng.uniform(0.05, 0.95, size=(N, H, H, 3)), rng.integers(0, C, size=N).astype(np.int32)


def _nchw(a):
    return torch.tensor(np.transpose(np.asarray(a), (0, 3, 1, 2)), dtype=torch.float64)


def _cfg(name, **adversarial):
    block = objective_block(name)
    block.adversarial.update(adversarial)
    return block


def _jax_step(cfg, variables, x, y, lr, rng):
    """One SGD step of the objective (the trainer's step: the loss's gradient w.r.t. the parameters)."""
    model = Model()
    objective = objectives.get(cfg.name)
    state = {"batch_stats": variables["batch_stats"]}

    def loss_fn(params):
        return objective.loss(model, params, state, {"image": x, "label": y, "step": jnp.int32(0)}, rng, cfg)

    (loss, (new_state, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    params = jax.tree.map(lambda p, g: p - lr * g, variables["params"], grads)
    return float(loss), params, new_state["batch_stats"], metrics


def _compare(tm, params, stats, rtol=1e-9):
    """The parameters and the BatchNorm running means after the step (running variances are flax's, from
    the biased batch variance where PyTorch's use the unbiased one: a convention of every model here)."""
    want = _variables(tm)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want["params"])):
        np.testing.assert_allclose(np.asarray(a), b, rtol=rtol, atol=1e-12)
    for name in ("bn1", "bn2"):
        np.testing.assert_allclose(np.asarray(stats[name]["mean"]), want["batch_stats"][name]["mean"], rtol=rtol,
                                   atol=1e-12)


@pytest.mark.parametrize("constraint, eps, step, use_best", [("l2", 0.5, 0.2, True), ("linf", 0.03, 0.01, True),
                                                             ("l2", 0.5, 0.2, False)])
def test_one_pgd_at_step_is_the_robustness_library_step(constraint, eps, step, use_best):
    tm, variables = _pair()
    x, y = _data()
    lr = 0.1
    with jax.enable_x64(True):
        cfg = _cfg("adversarial", constraint=constraint, eps=eps, step_size=step, steps=5, use_best=use_best)
        loss, params, stats, metrics = _jax_step(cfg, variables, jnp.asarray(x), jnp.asarray(y), lr,
                                                 jax.random.PRNGKey(0))
    opt = torch.optim.SGD(tm.parameters(), lr=lr)
    tloss, _ = tref.pgd_at_step(tm, opt, _nchw(x), torch.tensor(y, dtype=torch.long), eps, step, 5, constraint,
                                use_best)
    assert loss == pytest.approx(float(tloss), rel=1e-10)
    _compare(tm, params, stats)
    assert float(metrics["eps"]) == eps and 0 <= float(metrics["clean_accuracy"]) <= 1


@pytest.mark.parametrize("distance", ["linf", "l2"])
def test_one_trades_step_is_the_reference_step(distance):
    tm, variables = _pair(seed=1)
    x, y = _data(seed=1)
    lr, eps, step, steps, beta = 0.1, (0.031 if distance == "linf" else 0.5), 0.007, 4, 6.0
    rng = jax.random.PRNGKey(3)
    with jax.enable_x64(True):
        cfg = _cfg("trades", constraint=distance, eps=eps, step_size=step, steps=steps, beta=beta)
        # the start noise the objective draws: 0.001 N(0, I) from the attack's key (pgd's first restart key)
        k_attack = jax.random.split(rng)[0]
        noise = trades.START_STD * jax.random.normal(jax.random.split(k_attack, 1)[0], x.shape, jnp.float64)
        loss, params, stats, metrics = _jax_step(cfg, variables, jnp.asarray(x), jnp.asarray(y), lr, rng)
    opt = torch.optim.SGD(tm.parameters(), lr=lr)
    tloss, _ = tref.trades_step(tm, opt, _nchw(x), torch.tensor(y, dtype=torch.long), _nchw(noise), eps, step,
                                steps, beta, "l_inf" if distance == "linf" else "l_2")
    assert loss == pytest.approx(float(tloss), rel=1e-10)
    _compare(tm, params, stats)
    assert float(metrics["kl"]) > 0


def test_the_attack_leaves_batchnorm_statistics_and_the_loss_updates_them_once():
    _, variables = _pair()
    x, y = _data()
    model = Model()
    cfg = _cfg("adversarial", constraint="l2", eps=0.5, step_size=0.2, steps=3)
    with jax.enable_x64(True):
        x, y = jnp.asarray(x), jnp.asarray(y)
        attack, eps = adversarial.attack_config(cfg.adversarial)
        x_adv = adversarial.adversarial_examples(model, variables, x, y, jax.random.PRNGKey(0), attack, eps)
        _, once = model.apply_train(variables, x_adv)
        _, (new_state, _) = adversarial.loss(model, variables["params"], {"batch_stats": variables["batch_stats"]},
                                             {"image": x, "label": y, "step": jnp.int32(0)}, jax.random.PRNGKey(0), cfg)
    for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(once)):  # one update, from the adversarial batch
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    norms = np.sqrt(np.sum(np.square(np.asarray(x_adv - x)), axis=(1, 2, 3)))
    assert np.all(norms <= 0.5 * (1 + 1e-9)) and np.all((np.asarray(x_adv) >= 0) & (np.asarray(x_adv) <= 1))


def test_the_radius_warms_up():
    assert float(adversarial.eps_multiplier(0, 10)) == 0.0 and float(adversarial.eps_multiplier(5, 10)) == 0.5
    assert float(adversarial.eps_multiplier(50, 10)) == 1.0 and float(adversarial.eps_multiplier(3, 0)) == 1.0


@pytest.mark.parametrize("name, key, value, message", [
    ("adversarial", "eps", 0.0, "objective.adversarial.eps must be a positive finite number"),
    ("adversarial", "eps", float("nan"), "objective.adversarial.eps must be a positive finite number"),
    ("adversarial", "step_size", -1.0, "objective.adversarial.step_size must be a positive"),
    ("adversarial", "constraint", "l1", "objective.adversarial.constraint must be one of l2, linf"),
    ("adversarial", "regularizer", "mixup", "objective.adversarial.regularizer must be one of"),
    ("trades", "beta", -1.0, "objective.adversarial.beta must be a finite number >= 0"),
    ("trades", "eps", float("inf"), "objective.adversarial.eps must be a positive finite number"),
])
def test_bad_configs_are_one_line(name, key, value, message):
    config = ml_collections.ConfigDict({"objective": _cfg(name, **{key: value})})
    with pytest.raises(ConfigError, match=message):
        objectives.get(name).validate(config, Model())


def test_trades_needs_a_distribution_over_classes():
    one = Model()
    one.num_classes = 1
    with pytest.raises(ConfigError, match="softmax distributions over classes"):
        trades.validate(ml_collections.ConfigDict({"objective": _cfg("trades")}), one)


# ----------------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------------

RUNLOCAL = ["train", "--config", "configs/adversarial_digits.py:runlocal", "--no-progress"]
# A short budget of the digits recipe on a narrow CNN, trained 3 seeds at once (the seed sweep: each seed is
# what `advalign-jax train --config.seed=S` computes): enough for the effect, well inside its margins.
SHORT = ["model.options.widths=(8, 16, 32)", "total_steps=250", "schedule.base_lr=0.003", "data.batch_size=32",
         "arrays.eval_limit=100", "eval_attack.steps=10", "objective.adversarial.steps=2",
         "objective.adversarial.step_size=0.6"]


def test_adversarial_training_on_digits_is_robust_where_vanilla_is_not():
    """Over 3 seeds each, under the recipe's evaluation attack (L2 PGD, eps 1.0): every vanilla model
    keeps at most 20 of 100 held-out digits, every adversarially trained one at least 60, at a clean
    accuracy of at least 85 (on the development machine: vanilla 0, 0, 0; PGD-AT 88, 88, 81; clean 97-99)."""
    kept = {}
    for variant in ("vanilla", "pgd"):
        result = sweep(load_config(f"configs/adversarial_digits.py:{variant}", SHORT), [0, 1, 2])
        assert result["n"] == 100 and result["finite"].all()
        kept[variant] = (result["clean_correct"], result["kept_robust"])
    assert kept["vanilla"][1].max() <= 20, kept
    assert kept["pgd"][1].min() >= 60 and kept["pgd"][0].min() >= 85, kept


@pytest.mark.parametrize("objective", ["adversarial", "trades"])
def test_the_digits_recipe_trains_resumes_and_its_model_is_evaluated(tmp_path, objective):
    work = tmp_path / "w"
    config = load_config("configs/adversarial_digits.py:runlocal",
                         [f"workdir={work}", f"objective.name={objective}"])
    straight = load_config("configs/adversarial_digits.py:runlocal",
                           [f"workdir={tmp_path / 'straight'}", f"objective.name={objective}"])
    full = train(straight, progress=False, log=lambda *a: None)
    assert train(config, progress=False, stop_after=3, log=lambda *a: None)["adversarial_accuracy"] >= 0
    resumed = train(config, progress=False, log=lambda *a: None)
    for key in ("loss", "clean_accuracy", "adversarial_accuracy", "eval_robust_accuracy"):
        assert resumed[key] == full[key], key  # the same steps, bitwise, after the interruption
    assert main(["evaluate-robust", "--config", "configs/robustness.py:runlocal", "--no-progress",
                 f"--config.model_dir={resumed['export']}", "--config.data.source=digits", "--config.max_examples=16",
                 "--config.attacks=('pgd-l2',)", "--config.eps.l2=1.0", "--config.batch_size=16",
                 f"--config.workdir={tmp_path / 'robust'}"]) == 0


@pytest.mark.parametrize("override, key", [("objective.adversarial.eps=0.0", "objective.adversarial.eps"),
                                           ("objective.adversarial.constraint=l1", "objective.adversarial.constraint"),
                                           ("objective.adversarial.beta=-1.0", "objective.adversarial.beta")])
def test_a_bad_adversarial_config_is_one_line_and_writes_nothing(tmp_path, capsys, override, key):
    name = "trades" if "beta" in override else "adversarial"
    code = main(RUNLOCAL + [f"--config.workdir={tmp_path / 'w'}", f"--config.objective.name={name}",
                            f"--config.{override}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and key in err, err
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------------------------------
# The published recipes: their values, and their wiring on narrow copies
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, expect", [
    ("configs/adversarial_cifar10_resnet50.py:l2",
     {"model.name": "cifar_resnet50", "objective.name": "adversarial", "objective.adversarial.eps": 0.5,
      "objective.adversarial.step_size": 0.1, "objective.adversarial.steps": 7, "data.batch_size": 128,
      "optimizer.weight_decay": 5e-4, "schedule.boundaries": (50.0, 100.0), "total_steps": 150 * 390}),
    ("configs/adversarial_cifar10_resnet50.py:linf",
     {"objective.adversarial.constraint": "linf", "objective.adversarial.eps": 8 / 255,
      "objective.adversarial.step_size": 0.01}),
    ("configs/adversarial_imagenet_resnet50.py:l2",
     {"model.name": "resnet50", "objective.adversarial.eps": 3.0, "objective.adversarial.step_size": 0.5,
      "data.batch_size": 256, "optimizer.weight_decay": 1e-4, "data.clickme_weight": 0.0,
      "data.mix_sources": ("tfds:imagenet2012:train",)}),
    ("configs/trades_cifar10_wrn.py",
     {"model.name": "wrn34_10", "objective.name": "trades", "objective.adversarial.eps": 0.031,
      "objective.adversarial.step_size": 0.007, "objective.adversarial.steps": 10, "objective.adversarial.beta": 6.0,
      "optimizer.weight_decay": 2e-4, "schedule.boundaries": (74.0,), "total_steps": 76 * 390,
      "eval_attack.step_size": 0.003}),
])
def test_the_recipes_hold_the_published_values(path, expect):
    config = load_config(path)
    for dotted, value in expect.items():
        got = config
        for part in dotted.split("."):
            got = got[part]
        assert (tuple(got) if isinstance(value, tuple) else got) == pytest.approx(value), dotted


@pytest.mark.parametrize("path", ["configs/adversarial_cifar10_resnet50.py:runlocal",
                                  "configs/adversarial_imagenet_resnet50.py:runlocal",
                                  "configs/trades_cifar10_wrn.py:runlocal"])
def test_the_recipes_wiring_trains_on_narrow_copies(tmp_path, path):
    config = load_config(path, [f"workdir={tmp_path / 'w'}"])
    out = train(config, progress=False, log=lambda *a: None)
    assert np.isfinite(out["loss"]) and 0 <= out["adversarial_accuracy"] <= 1
    assert (tmp_path / "w" / "model").is_dir()

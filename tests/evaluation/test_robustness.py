"""The robust-accuracy evaluator: padded batches drop nothing, results do not depend on the batch or
the number of devices, the cascade and the summary follow AutoAttack's bookkeeping, presets and config;
``advalign-jax evaluate-robust`` end to end (files, resume after an interruption, bad input)."""

import csv
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from advalign_jax import parallel
from advalign_jax.attacks import autoattack as AA
from advalign_jax.attacks.apgd import APGDConfig, apgd
from advalign_jax.attacks.fab import FABConfig
from advalign_jax.attacks.pgd import PGDConfig, pgd
from advalign_jax.attacks.square import SquareConfig
from advalign_jax.cli.main import main
from advalign_jax.config import load_config
from advalign_jax.errors import ConfigError, DataError
from advalign_jax.evaluation import robust as R
from advalign_jax.evaluation.robust import evaluator as robust_evaluator_module
from advalign_jax.evaluation.robust.attacks import fit_to_classes
from advalign_jax.evaluation.robust.sequence import _attack_key
from interrupts import interrupt_on_call

H, W, C, K = 4, 4, 3, 10
N = 19


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    variables = {"w1": (rng.normal(size=(H * W * C, 32)) / 4).astype(np.float32),
                 "w2": (rng.normal(size=(32, K)) / 2).astype(np.float32)}

    def apply_fn(v, x):
        return jax.nn.relu(x.reshape(x.shape[0], -1) @ v["w1"]) @ v["w2"]

    x = rng.uniform(0, 1, size=(N, H, W, C)).astype(np.float32)
    y = np.asarray(jnp.argmax(apply_fn(variables, x), 1)).copy()
    y[:3] = (y[:3] + 1) % K  # three clean mistakes
    attacks = [R.pgd_attack("linf", 0.02, steps=5),
               dataclasses.replace(R.PAG_EPOCH_EVAL, eps=0.15),  # random start: per-example draws
               R.autoattack_whitebox("l2", 0.06, n_iter=8, n_target_classes=3)]
    return apply_fn, variables, x, y, attacks


def _run(setup, **kwargs):
    apply_fn, variables, x, y, attacks = setup
    return R.evaluate_robustness(apply_fn, variables, x, y, attacks, key=jax.random.PRNGKey(3),
                                 keep_adversarial=True, **kwargs)


@pytest.fixture(scope="module")
def one_batch(setup):
    return _run(setup, batch_size=64)  # one batch of 19, no padding, no mesh


def _same_records(a, b):
    assert set(a) == set(b)
    for k in a:
        if a[k].dtype.kind == "f":
            np.testing.assert_allclose(a[k], b[k], atol=2e-6, err_msg=k)
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _untimed(summary):
    """A summary without its wall-clock times."""
    out = dict(summary, attacks={})
    for name, s in summary["attacks"].items():
        out["attacks"][name] = {k: v for k, v in s.items() if k not in ("seconds", "stage_seconds")}
    return out


def test_padded_batches_on_eight_devices(setup, one_batch):
    eight = _run(setup, batch_size=8, mesh=parallel.make_mesh(devices=jax.devices()))  # 8 + 8 + 3 (padded)
    assert eight.summary["n"] == N
    np.testing.assert_array_equal(eight.per_example["index"], np.arange(N))
    np.testing.assert_array_equal(eight.per_example["label"], setup[3])
    _same_records(eight.per_example, one_batch.per_example)  # other batch mates, positions, devices
    assert _untimed(eight.summary) == _untimed(one_batch.summary)


def test_records_follow_autoattack_bookkeeping(setup, one_batch):
    apply_fn, variables, x, y, attacks = setup
    rec, summary = one_batch.per_example, one_batch.summary
    clean_pred = np.asarray(jnp.argmax(apply_fn(variables, x), 1))
    np.testing.assert_array_equal(rec["clean_pred"], clean_pred)
    np.testing.assert_array_equal(rec["clean_correct"], clean_pred == y)
    assert summary["clean_accuracy"] == pytest.approx(np.mean(clean_pred == y))
    every = clean_pred == y
    for a in attacks:
        x_adv = rec[f"{a.name}/x_adv"]
        pred = np.asarray(jnp.argmax(apply_fn(variables, x_adv), 1))
        np.testing.assert_array_equal(rec[f"{a.name}/pred"], pred)  # recomputed at the returned point
        robust = rec[f"{a.name}/robust"]
        np.testing.assert_array_equal(robust, (clean_pred == y) & (pred == y))
        every &= robust
        d = (x_adv - x).reshape(N, -1)
        size = np.abs(d).max(1) if a.norm == "linf" else np.linalg.norm(d, axis=1)
        np.testing.assert_allclose(rec[f"{a.name}/norm"], size, rtol=1e-5, atol=1e-7)
        assert size.max() <= a.eps * (1 + 1e-5) and x_adv.min() >= 0 and x_adv.max() <= 1
        s = summary["attacks"][a.name]
        assert s["robust_accuracy"] == pytest.approx(robust.mean())
        assert s["adversarial_accuracy"] == pytest.approx(np.mean(pred == y))
        assert s["robust_accuracy"] <= summary["clean_accuracy"]
        assert 0 < s["robust_accuracy"] < summary["clean_accuracy"]  # informative radii
    np.testing.assert_array_equal(rec["robust_to_all"], every)
    assert summary["robust_to_all"] == pytest.approx(every.mean())
    cascade = attacks[2]
    stage = rec[f"{cascade.name}/stage"]
    robust = rec[f"{cascade.name}/robust"]
    x_adv = rec[f"{cascade.name}/x_adv"]
    np.testing.assert_array_equal(x_adv[:3], x[:3])  # clean mistakes are not attacked
    assert np.all(stage[:3] == -1) and not robust[:3].any()
    np.testing.assert_array_equal(robust, (stage == -1) & rec["clean_correct"])
    assert set(stage[rec["clean_correct"]]) == {-1, 0, 1}  # each stage flips some, some survive
    after = summary["attacks"][cascade.name]["after_stage"]
    assert list(after) == ["apgd-ce", "apgd-t"]
    assert summary["clean_accuracy"] >= after["apgd-ce"] > after["apgd-t"] == summary["attacks"][cascade.name][
        "robust_accuracy"]
    unchanged = stage == -1
    np.testing.assert_array_equal(x_adv[unchanged], x[unchanged])
    # the cascade is APGD-CE on every clean-correct point, then APGD-T on the survivors
    f = lambda z: apply_fn(variables, z)  # noqa: E731
    key = _attack_key(jax.random.PRNGKey(3), cascade.name)
    ok = clean_pred == y
    x_ce, fooled_ce = apgd(f, x, y, cascade.eps, cascade.stages[0][1], key=jax.random.fold_in(key, 0), mask=ok)
    np.testing.assert_array_equal(stage == 0, ok & np.asarray(fooled_ce))
    np.testing.assert_allclose(x_adv[stage == 0], np.asarray(x_ce)[stage == 0], atol=1e-6)
    assert "apgd-ce+t-l2" in one_batch.format() and "worst case" in one_batch.format()


def test_targeted_pgd_and_epoch_metrics(setup):
    apply_fn, variables, x, y, _ = setup
    f = lambda z: apply_fn(variables, z)  # noqa: E731
    cfg = PGDConfig(norm="l2", steps=6, step_size=0.05, targeted=True)
    attack = R.PGDAttack("next", 0.3, cfg, target="next")
    result = R.evaluate_robustness(apply_fn, variables, x, y, [attack], batch_size=8)
    x_adv, _ = pgd(f, x, (y + 1) % K, 0.3, cfg)  # aimed at the next class
    pred = np.asarray(jnp.argmax(f(x_adv), 1))
    np.testing.assert_array_equal(result.per_example["next/pred"], pred)
    assert 0 < np.mean(pred == (y + 1) % K) < 1
    metrics = R.epoch_metrics(apply_fn, variables, x, y, [attack], batch_size=8)
    assert metrics == {"eval_accuracy": result.summary["clean_accuracy"],
                       "eval_robust_accuracy": result.summary["attacks"]["next"]["robust_accuracy"]}
    two = R.epoch_metrics(apply_fn, variables, x, y, [attack, R.pgd_attack("linf", 0.02, steps=2)], batch_size=8)
    assert set(two) == {"eval_accuracy", "eval_robust_accuracy", "eval_robust_accuracy/next",
                        "eval_robust_accuracy/pgd2-linf"}
    assert two["eval_robust_accuracy"] <= min(two["eval_robust_accuracy/next"], two["eval_robust_accuracy/pgd2-linf"])
    with pytest.raises(ConfigError, match="targeted"):
        R.PGDAttack("bad", 0.3, cfg)  # a targeted config needs target='next'


def test_apgd_t_on_few_classes():
    rng = np.random.default_rng(1)
    w = {"w": rng.normal(size=(H * W * C, 5)).astype(np.float32)}
    apply5 = lambda v, z: z.reshape(z.shape[0], -1) @ v["w"]  # noqa: E731
    x = rng.uniform(0, 1, size=(6, H, W, C)).astype(np.float32)
    y = np.asarray(jnp.argmax(apply5(w, x), 1))
    nine = R.autoattack_whitebox("linf", 0.05, n_iter=4, stages=("apgd-t",))  # 9 targets asked, 4 possible
    assert fit_to_classes(nine.stages[0][1], 5, "x").n_target_classes == 4
    assert fit_to_classes(nine.stages[0][1], 50, "x").n_target_classes == 9
    few = R.evaluate_robustness(apply5, w, x, y, [nine, R.pgd_attack("linf", 0.05, steps=2)]).summary
    assert few["n"] == 6 and "n_classes" in few["checks"]  # AutoAttack's check: more targets than classes
    assert "n_classes" in few["attacks"][nine.name]["checks"] and "n_classes" not in few["attacks"]["pgd2-linf"]["checks"]
    three = {"w": w["w"][:, :3]}
    with pytest.raises(ConfigError, match="at least 4 classes"):
        R.evaluate_robustness(apply5, three, x, y % 3, [nine])


def test_clean_accuracy_and_errors(setup):
    apply_fn, variables, x, y, _ = setup
    acc = R.clean_accuracy(apply_fn, variables, x, y, batch_size=7)
    assert acc == pytest.approx(np.mean(np.asarray(jnp.argmax(apply_fn(variables, x), 1)) == y))
    with pytest.raises(DataError):
        R.evaluate_robustness(apply_fn, variables, x, y[:5], attacks=())
    with pytest.raises(ConfigError, match="named"):
        R.evaluate_robustness(apply_fn, variables, x, y, attacks=[R.pgd_attack("l2"), R.pgd_attack("l2")])
    with pytest.raises(ConfigError, match="mix norms"):
        R.Cascade("mixed", 0.1, (("a", APGDConfig(norm="l2")), ("b", APGDConfig(norm="linf"))))
    with pytest.raises(ConfigError, match="eps"):
        R.evaluate_robustness(apply_fn, variables, x, y, attacks=[R.pgd_attack("l2", -1.0)])


def test_presets_and_config():
    pag = R.PAG_EPOCH_EVAL.config
    assert R.PAG_EPOCH_EVAL.eps == 0.5
    assert (pag.norm, pag.steps, pag.random_start, pag.use_best, pag.targeted) == ("l2", 7, "box", False, False)
    assert pag.step_size == pytest.approx(1.5 * 0.5 / 7) and not pag.relative_step
    assert pag.start_radius == pytest.approx(8 / 255) and pag.projection == "ball" and pag.clip == (0.0, 1.0)
    radii = {(a.norm, type(a).__name__): a.eps for a in R.default_attacks()}
    assert radii == {("l2", "PGDAttack"): 0.5, ("linf", "PGDAttack"): 8 / 255, ("l2", "Cascade"): 0.5,
                     ("linf", "Cascade"): 8 / 255}
    aa = R.autoattack_whitebox("linf")
    (ce_name, ce), (t_name, t) = aa.stages
    assert (ce_name, ce.loss, ce.n_iter, ce.n_restarts, ce.keep) == ("apgd-ce", "ce", 100, 1, "last")
    assert (t_name, t.loss, t.n_iter, t.n_target_classes, t.n_restarts) == ("apgd-t", "dlr-targeted", 100, 9, 1)
    p = R.pgd_attack("linf", steps=20)
    assert p.config.relative_step and p.config.step_size * p.eps == pytest.approx(2.5 * (8 / 255) / 20)
    assert p.config.use_best and p.config.random_start == "none"
    # the config file builds the same attacks: PGD-20 and AutoAttack "standard" with the authors' budgets
    attacks = R.attacks_from_config(load_config("configs/robustness.py"))
    assert [a.name for a in attacks] == ["pgd-l2", "pgd-linf", "autoattack-l2", "autoattack-linf"]
    assert attacks[1].config == R.pgd_attack("linf").config and attacks[1].eps == 8 / 255
    assert attacks[3].stages == AA.version_stages("standard", "linf") and attacks[2].eps == 0.5
    assert attacks[2].stages == R.autoattack_attack("l2").stages and attacks[2].version == "standard"
    more = R.attacks_from_config(load_config("configs/robustness.py", [
        "attacks=('apgd-linf', 'fab-t-linf', 'fab-l2', 'square-l2', 'apgd-dlr-linf', 'autoattack-plus-linf', "
        "'autoattack-rand-l2')"]))
    assert more[0].stages == R.autoattack_whitebox("linf").stages
    assert [[s for s, _ in a.stages] for a in more[1:5]] == [["fab-t"], ["fab"], ["square"], ["apgd-dlr"]]
    assert more[1].stages[0][1] == FABConfig(norm="linf", targeted=True) and more[3].stages[0][1] == SquareConfig("l2")
    assert more[5].stages == AA.version_stages("plus", "linf") and more[5].version == "plus"
    assert more[6].stages == AA.version_stages("rand", "l2") and more[6].version == "rand"
    local = R.attacks_from_config(load_config("configs/robustness.py:runlocal", ["attacks=('apgd-ce-l2',)",
                                                                                 "clip=()"]))
    assert [s for s, _ in local[0].stages] == ["apgd-ce"] and local[0].stages[0][1].clip is None
    budgets = R.attacks_from_config(load_config("configs/robustness.py:runlocal", ["attacks=('autoattack-linf',)"]))
    assert [(c.n_iter if not isinstance(c, SquareConfig) else c.n_queries) for _, c in budgets[0].stages] == [5, 5, 5, 100]
    for bad in ("apgd-l1", "fab-x-linf", "pgd", "autoattack-fast-linf"):
        with pytest.raises(ConfigError, match="unknown attack"):
            R.attacks_from_config(load_config("configs/robustness.py", [f"attacks=('{bad}',)"]))
    with pytest.raises(ConfigError, match="pixel box"):
        R.attacks_from_config(load_config("configs/robustness.py", ["attacks=('fab-t-linf',)", "clip=()"]))


# --------------------------------------------------------------------------------------------------
# advalign-jax evaluate-robust
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    """A small CNN for 16x16x3 digits, trained for a few steps (about 60% test accuracy)."""
    from advalign_jax.data.images import load_arrays
    from advalign_jax.models import get_model, save_model

    model = get_model("small_cnn", num_classes=10, widths=(8, 16), patch=4, input_size=16)
    rng = np.random.default_rng(0)

    def fill(path, shape):  # He-normal kernels (faster than tracing the initialisers on a busy CPU)
        name = path[-1].key
        if name == "kernel":
            return (rng.normal(size=shape.shape) * np.sqrt(2 / np.prod(shape.shape[:-1]))).astype(np.float32)
        return np.full(shape.shape, 1.0 if name in ("scale", "var") else 0.0, np.float32)

    variables = jax.tree_util.tree_map_with_path(fill, model.variable_shapes())
    x, y = load_arrays("digits", "train")
    opt = optax.adam(1e-2)

    @jax.jit
    def step(v, s, xb, yb):
        def loss(p):
            logits, state = model.apply_train({**v, "params": p}, xb)
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), state

        (_, state), g = jax.value_and_grad(loss, has_aux=True)(v["params"])
        u, s = opt.update(g, s, v["params"])
        return {**v, **state, "params": optax.apply_updates(v["params"], u)}, s

    state = opt.init(variables["params"])
    for _ in range(30):
        idx = rng.integers(0, len(x), 64)
        variables, state = step(variables, state, x[idx], y[idx])
    return save_model(str(tmp_path_factory.mktemp("robust") / "digits_cnn"), model, variables)


def _cli(checkpoint, workdir, *extra, attacks="('pgd-l2', 'apgd-linf')"):
    return main(["evaluate-robust", "--config", "configs/robustness.py:runlocal", "--no-progress",
                 f"--config.model_dir={checkpoint}", f"--config.workdir={workdir}", "--config.data.source=digits",
                 "--config.max_examples=24", "--config.eps.l2=0.5", f"--config.eps.linf={8 / 255}",
                 f"--config.attacks={attacks}", *extra])


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cli_writes_results_and_resumes(digits_checkpoint, tmp_path, capsys, monkeypatch):
    assert _cli(digits_checkpoint, tmp_path / "straight", "--config.batch_size=8") == 0
    out = capsys.readouterr().out
    assert "apgd-linf" in out and "summary.csv" in out
    rows = _read(tmp_path / "straight" / "per_example.csv")
    assert [int(r["img"]) for r in rows] == list(range(24))
    assert list(rows[0]) == ["img", "label", "clean_pred", "grad_zero", "pgd-l2/pred", "pgd-l2/robust", "pgd-l2/norm",
                             "apgd-linf/pred", "apgd-linf/robust", "apgd-linf/norm", "apgd-linf/stage", "robust_to_all"]
    clean = np.array([r["clean_pred"] == r["label"] for r in rows])
    for name in ("pgd-l2", "apgd-linf"):
        robust = np.array([int(r[f"{name}/robust"]) for r in rows], bool)
        np.testing.assert_array_equal(robust, clean & np.array([r[f"{name}/pred"] == r["label"] for r in rows]))
    assert {r["apgd-linf/stage"] for r in rows} <= {"none", "apgd-ce", "apgd-t"}
    summary = _read(tmp_path / "straight" / "summary.csv")
    assert [(r["attack"], r["stage"]) for r in summary] == [("pgd-l2", ""), ("apgd-linf", ""), ("apgd-linf", "apgd-ce"),
                                                            ("apgd-linf", "apgd-t"), ("all", "")]
    assert float(summary[0]["clean_accuracy"]) == pytest.approx(clean.mean(), abs=1e-6)
    assert 0.4 < clean.mean() and float(summary[1]["robust_accuracy"]) < clean.mean()  # a model worth attacking
    for r in summary[:2]:
        mine = [int(e[f"{r['attack']}/robust"]) for e in rows]
        assert float(r["robust_accuracy"]) == pytest.approx(np.mean(mine), abs=1e-6)
    assert float(summary[-1]["robust_accuracy"]) == pytest.approx(np.mean([int(e["robust_to_all"]) for e in rows]),
                                                                  abs=1e-6)

    # interrupted during its second batch of 16, then resumed with another batch size
    real = robust_evaluator_module.compiled_sequence
    monkeypatch.setattr(robust_evaluator_module, "compiled_sequence", interrupt_on_call(real))
    assert _cli(digits_checkpoint, tmp_path / "resumed", "--config.batch_size=16") == 130
    assert len(_read(tmp_path / "resumed" / "per_example.csv")) == 16  # the first batch was kept
    with open(tmp_path / "resumed" / "per_example.csv", "a") as f:
        f.write("17,3,")  # a row cut short by the interruption
    monkeypatch.setattr(robust_evaluator_module, "compiled_sequence", real)
    assert _cli(digits_checkpoint, tmp_path / "resumed", "--config.batch_size=8") == 0  # computes 16..23 only
    resumed = _read(tmp_path / "resumed" / "per_example.csv")
    # same rows, in order, none twice (norms up to float32 sums: other batch sizes per device)
    exact = lambda rs: [{k: v for k, v in r.items() if not k.endswith("/norm")} for r in rs]  # noqa: E731
    assert exact(resumed) == exact(rows)
    for name in ("pgd-l2", "apgd-linf"):
        np.testing.assert_allclose([float(r[f"{name}/norm"]) for r in resumed],
                                   [float(r[f"{name}/norm"]) for r in rows], rtol=1e-5)
    drop = lambda rs: [{k: v for k, v in r.items()  # noqa: E731
                        if k not in ("wall_time_s", "stage_time_s", "max_perturbation")} for r in rs]
    assert drop(_read(tmp_path / "resumed" / "summary.csv")) == drop(summary)


def test_cli_autoattack_writes_the_per_stage_table(digits_checkpoint, tmp_path, capsys):
    """AutoAttack "standard" (runlocal budgets) through the command: the four stages' robust accuracy and
    time in summary.csv and the printed table, the stage that broke each point in per_example.csv."""
    assert _cli(digits_checkpoint, tmp_path / "aa", "--config.batch_size=24", f"--config.eps.linf={2 / 255}",
                attacks="('autoattack-linf',)") == 0
    out = capsys.readouterr().out
    assert "time_s" in out and "checks" in out and "fab-t" in out and "square" in out
    summary = _read(tmp_path / "aa" / "summary.csv")
    assert list(summary[0]) == R.SUMMARY_COLUMNS
    assert [(r["attack"], r["stage"]) for r in summary] == [
        ("autoattack-linf", ""), ("autoattack-linf", "apgd-ce"), ("autoattack-linf", "apgd-t"),
        ("autoattack-linf", "fab-t"), ("autoattack-linf", "square"), ("all", "")]
    after = [float(r["robust_accuracy"]) for r in summary[1:5]]
    assert after == sorted(after, reverse=True) and after[-1] == float(summary[0]["robust_accuracy"])
    assert float(summary[0]["clean_accuracy"]) > after[0] > 0  # APGD-CE breaks some points, not all
    times = [float(r["stage_time_s"]) for r in summary[1:5]]
    assert all(t >= 0 for t in times) and float(summary[0]["stage_time_s"]) >= sum(times) - 1e-3
    rows = _read(tmp_path / "aa" / "per_example.csv")
    stages = [r["autoattack-linf/stage"] for r in rows]
    assert set(stages) <= {"none", "apgd-ce", "apgd-t", "fab-t", "square"} and "apgd-ce" in stages
    robust = np.array([int(r["autoattack-linf/robust"]) for r in rows], bool)
    np.testing.assert_array_equal(robust, np.array([r["clean_pred"] == r["label"] and s == "none"
                                                    for r, s in zip(rows, stages)]))
    assert np.mean(robust) == pytest.approx(after[-1], abs=1e-6)


@pytest.mark.parametrize("override,message", [
    ("--config.model_dir=/nonexistent/model", "not a model directory"),
    ("--config.data.source=imagenet_typo", "unknown data source 'imagenet_typo'"),
    ("--config.attacks=('apgd-l1',)", "unknown attack 'apgd-l1'"),
    ("--config.data.source=toy2d", "gives inputs of shape (2,) but the model takes (16, 16, 3)"),
    ("--config.apgd.n_iter=0", "n_iter must be at least 1"),
    ("--config.stage_chunks=0", "stage_chunks must be positive"),
])
def test_cli_bad_input_is_one_line(digits_checkpoint, tmp_path, capsys, override, message):
    code = _cli(digits_checkpoint, tmp_path / "w", override)
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("advalign-jax: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "w" / "per_example.csv").exists() and not (tmp_path / "w" / "config.json").exists()

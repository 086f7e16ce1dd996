"""The adversarial-alignment run: files and columns, resume without duplicates, bad input."""

import csv

import jax
import numpy as np
import pytest

from advalign_jax.cli.main import main
from advalign_jax.config import load_config
from advalign_jax.evaluation import adversarial_alignment as aa
from advalign_jax.models import get_model, save_model
from interrupts import interrupt_on_call


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = get_model("small_cnn", num_classes=10)
    return save_model(str(tmp_path_factory.mktemp("ck") / "cnn"), model, model.init(jax.random.PRNGKey(0)))


def _config(checkpoint, workdir, *extra):
    return load_config("configs/adversarial_alignment.py:runlocal",
                       [f"models=('small_cnn={checkpoint}',)", f"workdir={workdir}", *extra])


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_run_writes_the_reference_columns(checkpoint, tmp_path):
    summary = aa.evaluate(_config(checkpoint, tmp_path / "w"), progress=False)
    per_image = _read(tmp_path / "w" / "per_image" / "cnn.csv")
    assert list(per_image[0])[:8] == ["model", "img", "label", "pred", "eps", "l2", "linf", "spearman"]
    assert sorted(int(r["img"]) for r in per_image) == list(range(8))
    rows = _read(tmp_path / "w" / "summary.csv")
    assert list(rows[0])[:10] == ["model", "num_correct", "avg_eps", "std_eps", "avg_l2", "std_l2", "avg_linf",
                                  "std_linf", "avg_spearman", "std_spearman"]
    attacked = [r for r in per_image if r["status"] == "attacked"]
    assert int(rows[0]["num_correct"]) == sum(r["status"] != "misclassified" for r in per_image)
    if attacked:
        assert float(rows[0]["avg_l2"]) == pytest.approx(np.mean([float(r["l2"]) for r in attacked]), rel=1e-5)
        assert float(rows[0]["std_eps"]) == pytest.approx(np.std([float(r["eps"]) for r in attacked]), rel=1e-5, abs=1e-9)
    for name in ("tolerance_vs_alignment.png", "config.json"):
        assert (tmp_path / "w" / name).exists()
    assert summary[0]["num_images"] == 8


def test_resume_after_an_interruption(checkpoint, tmp_path, monkeypatch):
    one = ("num_devices=1",)  # batches of 4: two batches for 8 images
    aa.evaluate(_config(checkpoint, tmp_path / "straight", *one), progress=False)
    real = aa.make_batch_fn
    monkeypatch.setattr(aa, "make_batch_fn", interrupt_on_call(real))
    with pytest.raises(KeyboardInterrupt):
        aa.evaluate(_config(checkpoint, tmp_path / "resumed", *one), progress=False)
    assert len(_read(tmp_path / "resumed" / "per_image" / "cnn.csv")) == 4  # the first batch was kept
    with open(tmp_path / "resumed" / "per_image" / "cnn.csv", "a") as f:
        f.write("cnn,5,3,")  # a row cut short by the interruption
    monkeypatch.setattr(aa, "make_batch_fn", real)
    aa.evaluate(_config(checkpoint, tmp_path / "resumed", *one), progress=False)
    a = _read(tmp_path / "straight" / "per_image" / "cnn.csv")
    b = _read(tmp_path / "resumed" / "per_image" / "cnn.csv")
    assert sorted(map(str, a), key=str) == sorted(map(str, b), key=str)  # same rows, none twice
    sa, sb = _read(tmp_path / "straight" / "summary.csv")[0], _read(tmp_path / "resumed" / "summary.csv")[0]
    assert {k: v for k, v in sa.items() if k != "wall_time_s"} == {k: v for k, v in sb.items() if k != "wall_time_s"}


def test_workdir_of_another_configuration_is_refused(checkpoint, tmp_path, capsys):
    aa.evaluate(_config(checkpoint, tmp_path / "w"), progress=False)
    before = (tmp_path / "w" / "per_image" / "cnn.csv").read_text()
    code = main(["evaluate", "--config", "configs/adversarial_alignment.py:runlocal", "--no-progress",
                 f"--config.models=('small_cnn={checkpoint}',)", f"--config.workdir={tmp_path / 'w'}",
                 "--config.attack.steps=5"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "different configuration (attack.steps: 3 there, 5 now)" in err and err.count("\n") == 0
    assert (tmp_path / "w" / "per_image" / "cnn.csv").read_text() == before


@pytest.mark.parametrize("override,message", [
    ("models=('resnet9000=/nowhere',)", "not a model directory"),
    ("attack.steps=0", "attack.steps must be at least 1"),
    ("search.gate_eps=-1.0", "search.gate_eps (an attack radius) must be positive"),
    ("attack.step_size=0.0", "attack.step_size must be positive"),
    ("models=('bad entry',)", "must look like 'ARCH=CHECKPOINT_DIR'"),
])
def test_bad_input_is_one_line_and_writes_nothing(checkpoint, tmp_path, capsys, override, message):
    code = main(["evaluate", "--config", "configs/adversarial_alignment.py:runlocal", "--no-progress",
                 f"--config.models=('small_cnn={checkpoint}',)", f"--config.workdir={tmp_path / 'w'}",
                 f"--config.{override}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and err.count("\n") == 0, err
    assert not (tmp_path / "w").exists()


def test_checkpoint_of_another_architecture(checkpoint, tmp_path, capsys):
    code = main(["evaluate", "--config", "configs/adversarial_alignment.py:runlocal", "--no-progress",
                 f"--config.models=('mlp2={checkpoint}',)", f"--config.workdir={tmp_path / 'w'}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "holds a small_cnn (10 classes), not a mlp2" in err
    code = main(["evaluate", "--config", "configs/adversarial_alignment.py:runlocal", "--no-progress",
                 f"--config.models=('small_cnn={checkpoint}',)", f"--config.workdir={tmp_path / 'w'}",
                 "--config.data.num_classes=5"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "has 10 classes but the data has 5" in err
    assert not (tmp_path / "w").exists()

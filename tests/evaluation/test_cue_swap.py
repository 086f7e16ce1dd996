"""The cue-swap test, the summaries' intervals, the paired comparisons and the figures' axes.

- The repainted copies: made by the generator with only the cue changed, read by a reader with the
  evaluation's settings, they differ from the originals only around the patch, in the painted colour.
- Through ``advalign-jax evaluate`` with two models: the cue columns, the copies' predictions (the
  model run on the copies as a reader gives them), the summary intervals (the bootstrap of the
  per-image values) and ``comparison.csv`` (paired differences; Wilcoxon p-values from scipy on the
  per-image CSVs).
"""

import csv
import math

import jax
import numpy as np
import pytest
from scipy import stats as sps

from advalign_jax.cli.main import main
from advalign_jax.data import embedded_files, synthetic
from advalign_jax.data.reader import ClickMeReader, ReaderConfig
from advalign_jax.evaluation import cue_swap, metrics, stats
from advalign_jax.evaluation.figures import honest_limits
from advalign_jax.evaluation.summaries import COMPARISON_COLUMNS
from advalign_jax.evaluation import human_alignment as ha
from advalign_jax.models import get_model, load_model, save_model

SIZE = 64


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _reader(files, **kw):
    return ClickMeReader(ReaderConfig(files=tuple(files), batch_size=16, num_classes=10, image_size=SIZE,
                                      heatmap_pipeline="as_stored", **kw), process_index=0, process_count=1)


def test_the_embedded_shard_is_found_with_its_cues():
    data = cue_swap.find(embedded_files("val"), 10)
    spec = synthetic.SynthSpec(num_classes=10, size=256, seed=1, cue="patch", spurious=0.0)
    assert data is not None and len(data.cue) == 128
    for i in range(0, 128, 7):
        assert data.cue[i] == synthetic.example_cue(i, spec) and data.label[i] == i % 10
        assert data.swap[i] == cue_swap.swap_class(i, i % 10, 10) != i % 10
    assert set(data.swap[data.label == 3].tolist()) == set(range(10)) - {3}  # every other class in turn
    assert cue_swap.find(embedded_files("val"), 5) is None  # another class count: not this data


def test_the_copies_differ_from_the_originals_only_in_the_patch(tmp_path):
    data = cue_swap.find(embedded_files("val"), 10)
    needed = np.zeros(128, bool)
    needed[:12] = True
    files = cue_swap.write_variants(data, needed, str(tmp_path))
    original = next(iter(_reader(embedded_files("val"))))
    rows, cols = synthetic.cue_region(SIZE)
    near = np.zeros((SIZE, SIZE), bool)  # the patch and the pixels the resize blends with it
    near[rows.start - 1:rows.stop + 1, cols.start - 1:cols.stop + 1] = True
    for variant, painted in (("swap", data.swap), ("congruent", data.label)):
        copy = next(iter(_reader(files[variant])))
        np.testing.assert_array_equal(copy["index"], original["index"])
        np.testing.assert_array_equal(copy["label"], original["label"])
        np.testing.assert_array_equal(copy["heatmap"], original["heatmap"])
        for k in range(12):
            diff = np.abs(copy["image"][k] - original["image"][k]).max(axis=-1)
            assert diff[~near].max() < 2 / 255  # the same pixels up to JPEG blocks touching the patch
            colour = synthetic._class_colour(int(painted[k]), 10) * 0.9
            np.testing.assert_allclose(copy["image"][k][rows.start + 1:rows.stop - 1, cols.start + 1:cols.stop - 1]
                                       .reshape(-1, 3).mean(0), colour, atol=0.03)
        np.testing.assert_array_equal(copy["image"][12:], original["image"][12:])  # not needed: the stored records


def test_data_that_the_generator_does_not_reproduce_gets_no_test(tmp_path):
    data = cue_swap.find(embedded_files("val"), 10)
    data.specs = [synthetic.SynthSpec(num_classes=10, size=256, seed=99, cue="patch")]  # another seed
    lines = []
    assert cue_swap.write_variants(data, np.ones(128, bool), str(tmp_path), lines.append) is None
    assert "does not reproduce record 0" in lines[0]


def test_region_fraction_against_numpy(rng):
    m = rng.uniform(0, 1, (4, 16, 16)).astype(np.float32)
    m[2] = 0.0
    region = np.zeros((16, 16), np.float32)
    region[1:4, 2:5] = 1
    got = np.asarray(metrics.region_fraction(m, region))
    want = [m[i][1:4, 2:5].sum() / m[i].sum() for i in (0, 1, 3)]
    np.testing.assert_allclose(got[[0, 1, 3]], want, rtol=1e-5)
    assert np.isnan(got[2])


@pytest.mark.parametrize("seed", range(20))
def test_honest_limits_keep_a_gap_inside_the_noise_small(seed):
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0.2, 0.5, 3)
    half = rng.uniform(0.001, 0.05, 3)
    lo, hi = honest_limits(centres, centres - half, centres + half, min_span=0.5, bounds=(-1, 1))
    assert -1 <= lo and hi <= 1 and lo <= min(centres - half) and max(centres + half) <= hi
    assert hi - lo >= 0.5 and hi - lo >= 4 * (2 * half.max())
    overlapping = [(i, j) for i in range(3) for j in range(3) if abs(centres[i] - centres[j]) <= half[i] + half[j]]
    for i, j in overlapping:  # a gap within the intervals spans at most a quarter of the axis
        assert abs(centres[i] - centres[j]) <= (hi - lo) / 4 + 1e-12
    lo, hi = honest_limits([3.0], [2.5], [3.2], min_span=0.0, bounds=(0, math.inf), include=0.0)
    assert lo == 0.0 and hi > 3.2


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    base = tmp_path_factory.mktemp("two")
    paths = []
    for seed, name in ((0, "cnn_a"), (1, "cnn_b")):
        model = get_model("small_cnn", num_classes=10, input_size=SIZE, patch=4)
        paths.append(save_model(str(base / name), model, model.init(jax.random.PRNGKey(seed))))
    return paths


def test_evaluate_with_two_models_writes_intervals_swaps_and_comparisons(two_checkpoints, tmp_path, capsys):
    work = tmp_path / "w"
    code = main(["evaluate", "--config", "configs/adversarial_alignment.py:runlocal", "--no-progress",
                 f"--config.models=('small_cnn={two_checkpoints[0]}', 'small_cnn={two_checkpoints[1]}')",
                 f"--config.workdir={work}", "--config.bootstrap.resamples=3000", "--config.max_images=12"])
    assert code == 0
    out = capsys.readouterr().out
    assert "paired differences on the same images" in out and "cue-swap acc" in out
    data = cue_swap.find(embedded_files("val"), 10)
    copies = cue_swap.write_variants(data, np.ones(128, bool), str(tmp_path / "copies"))
    boot = {"resamples": 3000, "confidence": 0.95, "seed": 0}
    per_model = {}
    for path in two_checkpoints:
        name = path.rsplit("/", 1)[-1]
        rows = sorted(_read(work / "per_image" / f"{name}.csv"), key=lambda r: int(r["img"]))
        per_model[name] = rows
        assert [int(r["img"]) for r in rows] == list(range(12))
        assert [int(r["cue"]) for r in rows] == data.cue[:12].tolist()
        assert [int(r["swap_cue"]) for r in rows] == data.swap[:12].tolist()
        model, variables = load_model(path)
        for variant, column in (("swap", "swap_pred"), ("congruent", "congruent_pred")):
            batch = next(iter(_reader(copies[variant])))
            pred = np.argmax(np.asarray(model.apply(variables, batch["image"][:12])), axis=-1)
            assert [int(r[column]) for r in rows] == pred.tolist()
        summary = {r["model"]: r for r in _read(work / "summary.csv")}[name]
        attacked = [r for r in rows if r["status"] == "attacked"]
        for key, column in (("avg_eps", "eps"), ("avg_spearman", "spearman"), ("avg_cue_mass", "cue_mass")):
            values = [float(r[column]) for r in attacked if np.isfinite(float(r[column]))]
            if values:
                low, high = stats.bootstrap_interval(values, **boot)
                assert float(summary[f"{key}_low"]) == pytest.approx(low, rel=1e-5, abs=1e-6)
                assert float(summary[f"{key}_high"]) == pytest.approx(high, rel=1e-5, abs=1e-6)
        swap_ok = [float(int(r["swap_pred"]) == int(r["label"])) for r in rows]
        assert float(summary["cue_swap_accuracy"]) == pytest.approx(np.mean(swap_ok), abs=1e-6)
        assert float(summary["cue_swap_accuracy_low"]) == pytest.approx(stats.bootstrap_interval(swap_ok, **boot)[0],
                                                                         abs=1e-6)
    comparison = _read(work / "comparison.csv")
    assert list(comparison[0]) == COMPARISON_COLUMNS
    assert [r["metric"] for r in comparison] == ["eps", "spearman", "dice", "cue_mass", "cue_swap_correct"]
    a, b = per_model["cnn_a"], per_model["cnn_b"]
    for r in comparison:
        assert (r["model_a"], r["model_b"]) == ("cnn_a", "cnn_b")
        value = {"cue_swap_correct": cue_swap.swap_correct}.get(
            r["metric"], lambda row, m=r["metric"]: float(row[m]) if row["status"] == "attacked" else math.nan)
        va, vb = np.array([value(x) for x in a]), np.array([value(x) for x in b])
        keep = np.isfinite(va) & np.isfinite(vb)
        assert int(r["num_pairs"]) == keep.sum()
        if keep.sum() == 0:
            continue
        d = vb[keep] - va[keep]
        assert float(r["diff"]) == pytest.approx(d.mean(), rel=1e-5, abs=1e-6)
        if np.any(d != 0):
            assert float(r["wilcoxon_p"]) == pytest.approx(sps.wilcoxon(vb[keep], va[keep]).pvalue, rel=1e-4)
        else:
            assert float(r["wilcoxon_p"]) == 1.0
        low, high = stats.bootstrap_interval(d, **boot)
        assert float(r["diff_low"]) == pytest.approx(low, rel=1e-5, abs=1e-6)
    for name in ("tolerance_vs_alignment.png", "perturbations.png", "panels/cnn_a.png", "panels/cnn_b.png"):
        assert (work / name).stat().st_size > 1000
    # a rerun changes nothing (and writes nothing: a finished run reopens read-only)
    before = {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()}
    assert main(["evaluate", "--config", "configs/adversarial_alignment.py:runlocal", "--no-progress",
                 f"--config.models=('small_cnn={two_checkpoints[0]}', 'small_cnn={two_checkpoints[1]}')",
                 f"--config.workdir={work}", "--config.bootstrap.resamples=3000", "--config.max_images=12"]) == 0
    assert {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()} == before


def test_evaluate_clickme_with_two_models(two_checkpoints, tmp_path):
    from advalign_jax.config import load_config

    config = load_config("configs/human_alignment.py:runlocal", [
        f"models=('small_cnn={two_checkpoints[0]}', 'small_cnn={two_checkpoints[1]}')", f"workdir={tmp_path / 'w'}",
        "bootstrap.resamples=2000"])
    summary = ha.evaluate(config, progress=False)
    assert len(summary) == 2 and {c["metric"] for c in summary.comparison} == set(ha.COMPARISON_METRICS)
    text = ha.format_summary(summary)
    assert "human alignment" in text and "paired differences" in text
    rows = {p: _read(tmp_path / "w" / "per_image" / f"{p}.csv") for p in ("cnn_a", "cnn_b")}
    assert all(int(r["swap_cue"]) >= 0 and 0 <= float(r["cue_mass"]) <= 1 for r in rows["cnn_a"])
    for name in ("alignment.png", "saliency.png", "comparison.csv"):
        assert (tmp_path / "w" / name).exists()

"""``advalign-jax evaluate-sensitivity`` (``configs/sensitivity.py``): the unit-level adversarial
sensitivity of every model of ``config.models`` on the same images, in one resumable workdir.

For each model: its units (:mod:`~advalign_jax.evaluation.sensitivity.units`: a layer's units, or the
sites of a readout fitted to ``config.recordings``, :mod:`~advalign_jax.evaluation.sensitivity.readout`),
their clean responses, ``sigma`` and the random-pair baseline, then every (eps, unit, image) item is
estimated by :func:`~advalign_jax.evaluation.sensitivity.optimize.item_sensitivity`: one compiled
program per model whose batch holds ``batch_size`` items x ``2 x restarts`` runs, sharded over the
devices by the evaluation protocol (:func:`~advalign_jax.evaluation.protocol.run_batches`), inside an
:class:`~advalign_jax.evaluation.job.EvaluationJob`: rows appended whole per batch, done batches
skipped on a rerun, a rerun over another configuration refused, a model name tied to its checkpoint's
fingerprint. An item's random starts come from its (eps, unit, image) key and the seed, so a result
does not depend on the batching and every model is measured from the same starts. Files:
:mod:`~advalign_jax.evaluation.sensitivity.files`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from advalign_jax import parallel
from advalign_jax.errors import ConfigError, DataError
from advalign_jax.evaluation.job import EvaluationJob, default_log
from advalign_jax.evaluation.robust.job import load_data
from advalign_jax.evaluation.protocol import ArraySource, Evaluator, real, run_batches
from advalign_jax.evaluation.sensitivity import files, stats
from advalign_jax.evaluation.sensitivity.optimize import SearchConfig, item_sensitivity
from advalign_jax.evaluation.sensitivity.readout import fit_readout, load_recordings
from advalign_jax.evaluation.sensitivity.units import layer_units, make_units
from advalign_jax.evaluation.summaries import bootstrap_options
from advalign_jax.models import fingerprint, load_model

# Config keys a resumed run may change (advalign_jax.run_record): the models (each result name is tied to its
# checkpoint's fingerprint), the batching, the summaries' bootstrap, where it runs.
CHANGEABLE = ("models", "workdir", "batch_size", "bootstrap", "distributed", "num_devices")
TARGET_KINDS = ("quantile", "sigma", "value")


@dataclasses.dataclass(frozen=True)
class Grid:
    """The items of one model: ``item = (e * num_units + u) * num_images + i``."""

    eps: tuple
    num_units: int
    num_images: int
    targeted: bool

    def __len__(self) -> int:
        return len(self.eps) * self.num_units * self.num_images

    def unpack(self, item: int) -> tuple:
        rest, i = divmod(item, self.num_images)
        e, u = divmod(rest, self.num_units)
        return e, u, i


def parse_models(models) -> list:
    """``'NAME=MODEL_DIR'`` entries -> ``[(name, path)]`` (results are filed under NAME)."""
    if isinstance(models, str):
        models = (models,)
    if not models:
        raise ConfigError("config.models is empty: give at least one 'NAME=MODEL_DIR'")
    out = []
    for entry in models:
        name, sep, path = str(entry).partition("=")
        if not sep or not name.strip() or not path.strip() or "/" in name:
            raise ConfigError(f"config.models entry {entry!r} must look like 'NAME=MODEL_DIR' "
                              "(e.g. 'standard=checkpoints/resnet50')")
        out.append((name.strip(), path.strip()))
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"config.models: the name {dup[0]!r} is given twice")
    return out


def search_config(config) -> SearchConfig:
    s = config.search
    clip = tuple(float(v) for v in config.clip) if len(config.clip) else None
    return SearchConfig(restarts=int(s.restarts), steps=int(s.steps), wide=float(s.wide), decay=float(s.decay),
                        start=str(s.start), clip=clip)


def check_config(config) -> tuple:
    """``(search, eps, targeted)``, every option checked before anything is loaded or written."""
    eps = tuple(float(e) for e in config.eps)
    if not eps:
        raise ConfigError("config.eps is empty: give the radii, e.g. --config.eps='(0.5, 1.0)'")
    bad = [e for e in eps if not (math.isfinite(e) and e > 0)]
    if bad:
        raise ConfigError(f"config.eps: every radius must be positive and finite, got {bad[0]}")
    if len(set(eps)) != len(eps):
        raise ConfigError("config.eps lists a radius twice")
    if int(config.batch_size) < 1:
        raise ConfigError(f"batch_size must be positive, got {config.batch_size}")
    if config.mode not in ("untargeted", "targeted"):
        raise ConfigError(f"mode must be 'untargeted' or 'targeted', got {config.mode!r}")
    targeted = config.mode == "targeted"
    if targeted:
        if config.target.kind not in TARGET_KINDS:
            raise ConfigError(f"target.kind must be one of {', '.join(TARGET_KINDS)}, got {config.target.kind!r}")
        if config.target.kind == "quantile" and not 0 <= float(config.target.level) <= 1:
            raise ConfigError(f"target.level must be in [0, 1] for kind 'quantile', got {config.target.level}")
        if not float(config.target.tolerance) > 0:
            raise ConfigError(f"target.tolerance must be positive, got {config.target.tolerance}")
    return search_config(config), eps, targeted


def _images(config, model) -> tuple:
    """``(images, fit_images, responses, site names)``: the images measured, and for a readout the
    recordings' images and responses it is fitted on (every recorded image; the first ``max_examples``
    are measured), resized to the model's input; without recordings the configured data's first
    ``max_examples`` images and ``(None, None, ())``."""
    if not config.recordings:
        x, _ = load_data(config, model)
        return x.astype(np.float32), None, None, ()
    rec = load_recordings(config.recordings)
    x = rec.images
    if tuple(x.shape[1:]) != tuple(model.input_shape):
        size = tuple(model.input_shape[:2])
        x = np.asarray(jax.image.resize(jnp.asarray(x), (len(x), *size, x.shape[-1]), "linear", antialias=True))
    x = np.clip(x, 0.0, 1.0).astype(np.float32)
    limit = int(config.max_examples)
    return (x[:limit] if limit > 0 else x), x, rec.responses, rec.sites


@dataclasses.dataclass
class _Model:
    name: str
    path: str
    model: object
    variables: object
    entry: dict
    images: np.ndarray
    units: object
    clean: np.ndarray  # (units, images)
    readout_r: float
    sites: tuple  # every site of the recordings (readout), or ()


def _prepare(config, name: str, path: str, log) -> _Model:
    model, variables = load_model(path, dtype=config.dtype)
    options = {k: v for k, v in model.options.items() if k != "dtype"}
    entry = {"path": path, "fingerprint": fingerprint(model.name, options, variables)}
    x, fit_x, responses, sites = _images(config, model)
    if len(x) < 2:
        raise DataError(f"{name}: {len(x)} image(s) to measure; sigma and the baseline need at least 2")
    u = config.units
    readout, readout_r = None, float("nan")
    if responses is not None:
        features = layer_units(model, variables, config.layer, u.reduce, fit_x)
        r = config.readout
        readout = fit_readout(features, responses, method=r.method, n_components=int(r.n_components),
                              splits=int(r.splits), train_fraction=float(r.train_fraction), seed=int(config.seed),
                              alpha=float(r.alpha), where=f"{name}: readout")
        if readout.left_out:
            log(f"{name}: {readout.left_out} site(s) with zero variance over the images left out of the readout")
        readout_r = readout.score
    units = make_units(model, variables, config.layer, u.reduce, int(u.count), int(u.seed), tuple(u.indices),
                       readout=readout, site_names=sites)
    fn = jax.jit(units.response)
    clean = np.concatenate([np.asarray(fn(variables, x[i:i + 256])) for i in range(0, len(x), 256)]).T
    if not np.all(np.isfinite(clean)):
        raise DataError(f"{name}: the units' clean responses are not finite on {int((~np.isfinite(clean)).sum())} "
                        f"(unit, image) pairs")
    return _Model(name, path, model, variables, entry, x, units, clean.astype(np.float64), readout_r, tuple(sites))


def _targets(config, clean: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """(units,) the targeted mode's level per unit."""
    t, level = config.target, float(config.target.level)
    if t.kind == "quantile":
        return np.quantile(clean, level, axis=1)
    if t.kind == "sigma":
        return clean.mean(axis=1) + level * sigma
    return np.full(clean.shape[0], level)


class _ItemSource(ArraySource):
    """The items of one model as batches; each batch gathers its images."""

    def __init__(self, grid: Grid, images, targets, batch_size: int, mesh):
        n = len(grid)
        item = np.arange(n)
        e, rest = np.divmod(item, grid.num_units * grid.num_images)
        u, i = np.divmod(rest, grid.num_images)
        super().__init__({"item": item.astype(np.int32), "unit": u.astype(np.int32), "img": i.astype(np.int32),
                          "eps": np.asarray(grid.eps, np.float32)[e], "target": targets[u].astype(np.float32)},
                         batch_size, mesh)
        self.images = images

    def __iter__(self):
        for batch in super().__iter__():
            batch["x"] = self.images[batch["img"]]
            yield batch


def _evaluator(m: _Model, search: SearchConfig, targeted: bool, seed: int) -> Evaluator:
    base = jax.random.PRNGKey(seed)

    def batch_fn(variables, inputs):
        keys = jax.vmap(lambda k: jax.random.fold_in(base, k))(inputs["item"])
        return item_sensitivity(lambda im: m.units.response(variables, im), inputs["x"], inputs["unit"],
                                inputs["eps"], keys, search, inputs["target"] if targeted else None)

    def rows(meta, host):
        return [{"item": int(meta["index"][k])} | {c: host[c][k] for c in ("sensitivity", "response", "sign",
                                                                           "restart", "norm")}
                for k in real(meta)]

    return Evaluator(batch_fn=jax.jit(batch_fn), inputs=("x", "unit", "eps", "item", "target"), rows=rows,
                     summarise=lambda rows: rows, columns=files.ITEM_COLUMNS)


def _run_model(config, job, mesh, m: _Model, search, eps, targeted, progress) -> tuple:
    """Measures every item of one model not yet in its row file; returns ``(grid, rows, sigma, valid,
    baseline, targets)``."""
    sigma = stats.unit_sigma(m.clean)
    valid = stats.valid_units(sigma, m.clean)
    if not valid.all():
        job.log(f"{m.name}: {int((~valid).sum())} unit(s) with zero spread over the images left out of the means "
                f"(first: {m.units.names[int(np.flatnonzero(~valid)[0])]})")
    baseline = stats.pair_baseline(m.clean, sigma)
    targets = _targets(config, m.clean, sigma) if targeted else np.full(len(sigma), np.nan)
    grid = Grid(eps, len(m.units.names), len(m.images), targeted)
    rows = job.open_rows(job.path("per_item", f"{m.name}.csv"), files.ITEM_COLUMNS, files.valid_row, key="item")
    source = _ItemSource(grid, m.images, targets, int(config.batch_size), mesh)
    evaluator = _evaluator(m, search, targeted, int(config.seed))
    done = job.done(rows, len(grid))
    bar = tqdm(total=len(grid), initial=int(done.sum()), desc=f"sensitivity {m.name}", unit="item",
               disable=not (progress and job.writer), file=sys.stderr)
    try:
        for result in run_batches(evaluator, m.variables, source, mesh,
                                  skip=lambda meta: bool(done[meta["index"][real(meta)]].all())):
            if result.skipped:
                continue
            new = []
            for r in evaluator.rows(result.meta, result.host):
                if done[r["item"]]:
                    continue
                e, u, i = grid.unpack(r["item"])
                new.append({"item": r["item"], "image": i, "unit": m.units.names[u], "eps": eps[e],
                            "clean": float(m.clean[u, i]),
                            "sensitivity": (abs(float(r["response"]) - float(m.clean[u, i])) if targeted
                                            else float(r["sensitivity"])),
                            "response": float(r["response"]), "sign": int(r["sign"]), "restart": int(r["restart"]),
                            "norm": float(r["norm"]), "target": float(targets[u]) if targeted else ""})
            job.append(rows, new, m.name, m.entry)
            done[result.meta["index"][real(result.meta)]] = True
            bar.update(len(new))
    finally:
        bar.close()
    return grid, rows, sigma, valid, baseline


def evaluate(config, progress: bool = True, log: Optional[Callable[[str], None]] = None) -> list:
    """Runs the job (the module docstring); returns the summary rows on process 0 (``[]`` elsewhere)."""
    search, eps, targeted = check_config(config)
    specs = parse_models(config.models)
    boot = bootstrap_options(config)
    mesh = parallel.job_mesh(config)
    # every model, its images and units (and readout) checked before the workdir is touched
    prepared = [_prepare(config, name, path, log or default_log) for name, path in specs]
    with EvaluationJob(config, CHANGEABLE, log) as job:
        if job.writer:
            has = {m.name: os.path.exists(job.path("per_item", f"{m.name}.csv")) for m in prepared}
            job.check(any(has.values()), {m.name: m.entry for m in prepared}, lambda n: has.get(n, False))
        results = {m.name: _run_model(config, job, mesh, m, search, eps, targeted, progress) for m in prepared}
        if not job.writer:
            return []
        return _write_summaries(config, job, prepared, results, boot, targeted)


def _write_summaries(config, job, prepared, results, boot, targeted) -> list:
    summary, norm_tables, readout_rows = [], {}, []
    for m in prepared:
        grid, rows, sigma, valid, baseline = results[m.name]
        missing = len(grid) - sum(1 for k in rows.rows if int(k) < len(grid))
        if missing:
            raise DataError(f"{rows.path}: {missing} items missing after the run")
        summary += files.summary_rows(m.name, grid, m.units, rows.rows, sigma, valid, baseline, m.readout_r,
                                      float(config.target.tolerance), boot,
                                      m.units.readout.left_out if m.units.readout is not None else 0)
        sens, _ = files.tables(rows.rows, grid)
        keep = valid & (sigma > 0)
        norm_tables[m.name] = [sens[e][keep] / sigma[keep][:, None] for e in range(len(grid.eps))]
        if m.units.readout is not None:
            ro = m.units.readout
            readout_rows += [{"model": m.name, "site": s, "predictivity": float(ro.predictivity[k]),
                              "used": int(bool(ro.valid[k]))} for k, s in enumerate(_site_names(m))]
    changed = job.write_csv(job.path("summary.csv"), files.SUMMARY_COLUMNS, summary)
    names = [m.name for m in prepared]
    if len(names) > 1:
        paired = {m.name: (m.units.names if m.units.readout is not None else None) for m in prepared}
        comparison = files.comparison_rows(names, {n: results[n][0] for n in names}, norm_tables, paired, boot)
        job.write_csv(job.path("comparison.csv"), files.COMPARISON_COLUMNS, comparison)
    if readout_rows:
        job.write_csv(job.path("readout.csv"), files.READOUT_COLUMNS, readout_rows)
    job.draw(job.path("sensitivity.png"), changed, lambda path: files.plot(path, summary, targeted))
    return summary



def _site_names(m: _Model) -> list:
    return list(m.sites) or [f"site{k}" for k in range(m.units.readout.weights.shape[1])]

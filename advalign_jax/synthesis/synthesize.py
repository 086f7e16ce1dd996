"""``advalign-jax synthesize`` (``configs/synthesize.py``): robust models as image generators.

For every model of ``config.models`` (``NAME=MODEL_DIR``) and every task of ``config.tasks``
(:mod:`advalign_jax.synthesis.ops` has the formulas and their sources):

- ``generate``: ``per_class`` samples of each class of ``generate.classes`` (all by default): a seed
  (``generate.seeds``: ``class``, from the class's Gaussian fitted on the training split, the papers'
  recipe; ``pooled``, from one Gaussian of all training images, which carries no class; ``noise``,
  ``clamp(randn / 20 + 0.5, 0, 1)``), then the targeted L2 attack towards the class;
- ``invert``: the first ``invert.count`` images of the evaluation split, inverted from noise seeds
  through the representation;
- ``interpolate``: ``interpolate.pairs`` pairs of evaluation images (image ``2k`` and ``2k + 1``), their
  representations blended at ``interpolate.alphas`` and inverted;
- ``visualize``: ``visualize.count`` units of the representation (a seeded sample, or
  ``visualize.units``), each maximised from ``visualize.seeds`` seeds, half evaluation images, half noise.

Files, under ``workdir/NAME/``: ``TASK.csv`` (one row per item), ``TASK.npz`` (the seeds and the
results, in item order), ``TASK.png`` (the grid: seeds and results per class, image, pair or unit);
``workdir/summary.csv`` one row per model and task: for ``generate`` the source model's own accuracy on
its images and, with ``config.judge`` (an independent model directory), the judge's accuracy with its
95% Wilson interval (and on the seeds, the baseline the generation starts from) and the Frechet distance between the judge's penultimate features of the generated
images and of as many real evaluation images of the same classes; for the other tasks the mean final
loss (matching loss, or the unit's value) with its bootstrap interval.

The run is an :class:`~advalign_jax.evaluation.job.EvaluationJob` (one process owns the workdir, a rerun
with another recipe is refused, a model name is tied to its checkpoint's fingerprint) and each task's
items go through :func:`advalign_jax.synthesis.items.run_items` (sharded over the devices, resumable
batch by batch).
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import scipy.linalg
import scipy.stats

from advalign_jax import parallel
from advalign_jax.errors import ConfigError, DataError
from advalign_jax.evaluation.job import EvaluationJob, default_log
from advalign_jax.evaluation.robust.job import load_data
from advalign_jax.evaluation.sensitivity.job import parse_models
from advalign_jax.evaluation.sensitivity.units import select_units
from advalign_jax.evaluation.stats import mean_with_interval
from advalign_jax.models import fingerprint, load_model
from advalign_jax.synthesis import ops
from advalign_jax.synthesis.figures import grid
from advalign_jax.synthesis.items import assemble, l2_distance, run_items, save_arrays
from advalign_jax.synthesis.representation import representation

TASKS = ("generate", "invert", "interpolate", "visualize")
SEED_KINDS = ("class", "pooled", "noise")  # generation seeds: the class's Gaussian, one of all images, noise
CHANGEABLE = ("models", "workdir", "batch_size", "judge", "distributed", "num_devices")
SUMMARY_COLUMNS = ("model", "task", "items", "own_accuracy", "seed_judge_accuracy", "judge_accuracy", "judge_low", "judge_high",
                   "judge_frechet", "loss_mean", "loss_low", "loss_high", "l2_change")


def check_config(config) -> dict:
    """The recipes per task, every option checked before anything is loaded or written."""
    tasks = tuple(config.tasks)
    if not tasks:
        raise ConfigError(f"config.tasks is empty: give some of {', '.join(TASKS)}")
    for t in tasks:
        if t not in TASKS:
            raise ConfigError(f"config.tasks: unknown task {t!r}; use {', '.join(TASKS)}")
    if int(config.batch_size) < 1:
        raise ConfigError(f"batch_size must be positive, got {config.batch_size}")
    out = {}
    for t in tasks:
        block = config[t]
        try:
            out[t] = ops.Recipe(float(block.eps), float(block.step_size), int(block.steps), bool(block.use_best))
        except ValueError as err:
            raise ConfigError(f"{t}: {err}") from None
    if "generate" in tasks:
        if int(config.generate.per_class) < 1:
            raise ConfigError(f"generate.per_class must be positive, got {config.generate.per_class}")
        if int(config.generate.grain) < 1:
            raise ConfigError(f"generate.grain must be at least 1, got {config.generate.grain}")
        if config.generate.seeds not in SEED_KINDS:
            raise ConfigError(f"generate.seeds must be one of {', '.join(SEED_KINDS)}, got {config.generate.seeds!r}")
    for t, key in (("invert", "count"), ("interpolate", "pairs"), ("visualize", "count"), ("visualize", "seeds")):
        if t in tasks and int(config[t][key]) < 1:
            raise ConfigError(f"{t}.{key} must be positive, got {config[t][key]}")
    if "interpolate" in tasks and not len(config.interpolate.alphas):
        raise ConfigError("interpolate.alphas is empty")
    return out


def _split(config, model, split: str, limit: int = 0):
    view = ml_collections.ConfigDict({"data": {"source": config.data.source, "split": split,
                                               "data_dir": config.data.data_dir}, "max_examples": limit})
    return load_data(view, model)


def _check_classes(name: str, model, labels: np.ndarray, source: str) -> None:
    classes = int(labels.max()) + 1
    if classes != model.num_classes:
        raise ConfigError(f"{name}: the model has {model.num_classes} classes but data.source={source!r} has "
                          f"{classes}")


def _wilson(k: int, n: int) -> tuple:
    ci = scipy.stats.binomtest(int(k), int(n)).proportion_ci(0.95, method="wilson")
    return float(ci.low), float(ci.high)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` between the Gaussians fitted to two
    feature sets (Heusel et al. 2017, the FID's formula, here in a judge model's feature space)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(sa @ sb)
    root = root.real if np.iscomplexobj(root) else root
    return float(mu @ mu + np.trace(sa + sb - 2.0 * root))


class _Source:
    """A model of ``config.models``, its data, its representation."""

    def __init__(self, config, name: str, path: str):
        self.name, self.path = name, path
        self.model, self.variables = load_model(path, dtype=config.dtype)
        options = {k: v for k, v in self.model.options.items() if k != "dtype"}
        self.entry = {"path": path, "fingerprint": fingerprint(self.model.name, options, self.variables)}
        tasks = tuple(config.tasks)
        self.rep = None
        if set(tasks) - {"generate"}:
            self.rep = representation(self.model, self.variables, config.layer, bool(config.fake_relu))
        self.eval_x, self.eval_y = _split(config, self.model, config.data.split)
        _check_classes(name, self.model, self.eval_y, config.data.source)
        self.gaussians = None
        if "generate" in tasks and config.generate.seeds != "noise":
            x, y = _split(config, self.model, config.data.train_split, int(config.generate.fit_limit))
            _check_classes(name, self.model, y, config.data.source)
            classes = np.asarray(_generate_classes(config, self), np.int32)
            if config.generate.seeds == "pooled":  # one Gaussian of every training image, filed as class 0
                y, classes = np.zeros_like(y), np.zeros(1, np.int32)
            try:
                self.gaussians = ops.class_gaussians(x, y, classes, int(config.generate.grain))
            except ValueError as err:
                raise DataError(f"{name}: generate: {err}") from None


def _generate_classes(config, src: _Source) -> tuple:
    """The classes to generate (``generate.classes``, or every class of the model), checked."""
    classes = tuple(int(c) for c in config.generate.classes) or tuple(range(src.model.num_classes))
    bad = [c for c in classes if not 0 <= c < src.model.num_classes]
    if bad:
        raise ConfigError(f"generate.classes: class {bad[0]} is not one of model {src.name}'s "
                          f"{src.model.num_classes} classes (0-{src.model.num_classes - 1})")
    return classes


def _items(config, src: _Source, task: str) -> dict:
    """The items of one task: ``{key: (n, ...)}``."""
    if task == "generate":
        return {"cls": np.repeat(np.asarray(_generate_classes(config, src), np.int32), int(config.generate.per_class))}
    n_eval = len(src.eval_x)
    if task == "invert":
        n = int(config.invert.count)
        if n > n_eval:
            raise ConfigError(f"invert.count={n}: the evaluation split holds {n_eval} images")
        return {"x": src.eval_x[:n], "y": src.eval_y[:n]}
    if task == "interpolate":
        n = int(config.interpolate.pairs)
        if 2 * n > n_eval:
            raise ConfigError(f"interpolate.pairs={n}: the evaluation split holds {n_eval} images")
        return {"xa": src.eval_x[0:2 * n:2], "xb": src.eval_x[1:2 * n:2]}
    v = config.visualize
    dim = int(jax.eval_shape(src.rep, src.variables, jnp.zeros((1, *src.model.input_shape), jnp.float32)).shape[1])
    try:
        units = select_units(dim, int(v.count), int(config.seed), tuple(int(u) for u in v.units))
    except ConfigError as err:
        raise ConfigError(f"visualize: {err}") from None
    seeds = int(v.seeds)
    unit = np.repeat(np.asarray(units, np.int32), seeds)
    kind = np.tile((np.arange(seeds) >= (seeds + 1) // 2).astype(np.int32), len(units))  # 0: an image, 1: noise
    image = np.tile(np.arange(seeds) % max(1, n_eval), len(units))
    return {"unit": unit, "noise": kind, "x": src.eval_x[image]}


def _batch_fn(config, src: _Source, task: str, rec: ops.Recipe) -> Callable:
    base = jax.random.PRNGKey(int(config.seed))
    logits_fn = src.model.logits_fn

    def keys(items):
        return jax.vmap(lambda i: jax.random.fold_in(base, i))(items)

    if task == "generate":
        g, kind = src.gaussians, config.generate.seeds
        shape = tuple(src.model.input_shape)

        def fn(variables, inputs):
            k = keys(inputs["item"])
            if kind == "noise":
                seeds = jax.vmap(lambda key: ops.noise_seeds(key, shape))(k)
            else:
                c = inputs["cls"] if kind == "class" else jnp.zeros_like(inputs["cls"])
                seeds = jax.vmap(lambda key, ci: ops.sample_seeds(key, g, ci[None])[0])(k, c)
            x, logits = ops.generate(logits_fn(variables), seeds, inputs["cls"], rec)
            return {"seed": seeds, "image": x, "logits": logits}
    elif task == "invert":
        def fn(variables, inputs):
            x0 = inputs["x"]
            seeds = jax.vmap(lambda k: ops.noise_seeds(k, x0.shape[1:], x0.dtype))(keys(inputs["item"]))
            rep = lambda im: src.rep(variables, im)  # noqa: E731
            x, loss = ops.match(rep, rep(x0), seeds, rec)
            return {"seed": seeds, "image": x, "loss": loss}
    elif task == "interpolate":
        alphas = tuple(float(a) for a in config.interpolate.alphas)

        def fn(variables, inputs):
            x, loss = ops.interpolate(lambda im: src.rep(variables, im), inputs["xa"], inputs["xb"], alphas, rec)
            return {"image": x, "loss": loss}
    else:
        def fn(variables, inputs):
            x0 = inputs["x"]
            noise = jax.vmap(lambda k: ops.noise_seeds(k, x0.shape[1:], x0.dtype))(keys(inputs["item"]))
            seeds = jnp.where(inputs["noise"].reshape((-1,) + (1,) * (x0.ndim - 1)) > 0, noise, x0)
            rep = lambda im: src.rep(variables, im)  # noqa: E731
            x, value = ops.visualize(rep, seeds, inputs["unit"], rec)
            start = jnp.take_along_axis(rep(seeds), inputs["unit"][:, None], axis=1)[:, 0]
            return {"seed": seeds, "image": x, "value": value, "start": start}
    return jax.jit(fn)


ROW_COLUMNS = {
    "generate": ("item", "class", "predicted", "confidence", "l2_change"),
    "invert": ("item", "label", "loss", "l2_change"),
    "interpolate": ("item", "loss_mean", "loss_max"),
    "visualize": ("item", "unit", "seed", "start", "value", "l2_change"),
}
OUTPUTS = {"generate": ("seed", "image", "logits"), "invert": ("seed", "image", "loss"),
           "interpolate": ("image", "loss"), "visualize": ("seed", "image", "value")}


def _rows_fn(task: str, items: dict) -> Callable:
    def rows(idx, host):
        out = []
        change = l2_distance(host["image"], host["seed"]) if "seed" in host else None
        for k, i in enumerate(idx):
            r = {"item": int(i)}
            if task == "generate":
                logits = np.asarray(host["logits"][k], np.float64)
                p = np.exp(logits - logits.max())
                c = int(items["cls"][i])
                r.update({"class": c, "predicted": int(np.argmax(logits)), "confidence": float(p[c] / p.sum()),
                          "l2_change": float(change[k])})
            elif task == "invert":
                r.update({"label": int(items["y"][i]), "loss": float(host["loss"][k]),
                          "l2_change": float(change[k])})
            elif task == "interpolate":
                r.update({"loss_mean": float(np.mean(host["loss"][k])), "loss_max": float(np.max(host["loss"][k]))})
            else:
                r.update({"unit": int(items["unit"][i]), "seed": "noise" if items["noise"][i] else "image",
                          "start": float(host["start"][k]), "value": float(host["value"][k]),
                          "l2_change": float(change[k])})
            out.append(r)
        return out
    return rows


def _pairs(groups, arrays: dict, name: str):
    """Per group (class or unit), a row of seeds and a row of results."""
    rows, labels = [], []
    values = np.asarray(groups)
    for g in dict.fromkeys(int(v) for v in values):
        at = np.flatnonzero(values == g)
        rows += [arrays["seed"][at], arrays["image"][at]]
        labels += [f"{name} {g}\nseed", f"{name} {g}\nresult"]
    return rows, labels


def _figure(config, task: str, src: _Source, items: dict, arrays: dict, path: str) -> None:
    if task == "generate":
        grid(path, *_pairs(items["cls"], arrays, "class"), title=f"{src.name}: class-conditional generation")
    elif task == "invert":
        grid(path, [items["x"], arrays["seed"], arrays["image"]], ["target", "seed", "inverted"],
             title=f"{src.name}: representation inversion")
    elif task == "interpolate":
        alphas = [f"a={float(a):g}" for a in config.interpolate.alphas]
        grid(path, list(arrays["image"]), [f"pair {k}" for k in range(len(arrays["image"]))],
             title=f"{src.name}: interpolation", col_labels=alphas)
    else:
        grid(path, *_pairs(items["unit"], arrays, "unit"), title=f"{src.name}: feature visualisation")


class _Judge:
    """An independent model: its predictions and penultimate features."""

    def __init__(self, config):
        self.path = config.judge
        self.model, self.variables = load_model(config.judge, dtype=config.dtype)
        self._fn = jax.jit(lambda v, x: (self.model.apply(v, x), self.model.intermediates(v, x)["features"]))

    def __call__(self, images: np.ndarray) -> tuple:
        logits, feats = [], []
        for i in range(0, len(images), 256):
            lo, fe = self._fn(self.variables, jnp.asarray(images[i:i + 256]))
            logits.append(np.asarray(lo))
            feats.append(np.asarray(fe).reshape(len(lo), -1))
        return np.concatenate(logits), np.concatenate(feats)


def _summary(task: str, src: _Source, items: dict, arrays: dict, rows: dict, judge: Optional[_Judge]) -> dict:
    r = {"model": src.name, "task": task, "items": len(rows)}
    values = list(rows.values())
    if task == "generate":
        own = np.array([int(v["predicted"]) == int(v["class"]) for v in values])
        r["own_accuracy"] = float(own.mean())
        r["l2_change"] = float(np.mean([float(v["l2_change"]) for v in values]))
        if judge is not None:
            logits, feats = judge(arrays["image"])
            hits = int((np.argmax(logits, axis=1) == items["cls"]).sum())
            r["judge_accuracy"] = hits / len(items["cls"])
            r["judge_low"], r["judge_high"] = _wilson(hits, len(items["cls"]))
            r["seed_judge_accuracy"] = float(np.mean(np.argmax(judge(arrays["seed"])[0], axis=1) == items["cls"]))
            real_idx = np.concatenate([np.flatnonzero(src.eval_y == c)[:int((items["cls"] == c).sum())]
                                       for c in np.unique(items["cls"])])
            _, real_feats = judge(src.eval_x[real_idx])
            if len(real_feats) >= 2 and len(feats) >= 2:
                r["judge_frechet"] = frechet_distance(feats, real_feats)
        return r
    key = {"invert": "loss", "interpolate": "loss_mean", "visualize": "value"}[task]
    r["loss_mean"], r["loss_low"], r["loss_high"] = mean_with_interval([float(v[key]) for v in values])
    if task != "interpolate":
        r["l2_change"] = float(np.mean([float(v["l2_change"]) for v in values]))
    return r


def _run_task(config, job, mesh, src: _Source, task: str, items: dict, rec: ops.Recipe,
              progress: bool) -> Optional[dict]:
    folder = job.path(src.name)
    rows, computed = run_items(job, mesh, src.variables, items, _batch_fn(config, src, task, rec), tuple(items) + ("item",),
                     OUTPUTS[task], _rows_fn(task, items), ROW_COLUMNS[task], os.path.join(folder, f"{task}.csv"),
                     os.path.join(folder, "parts", task), int(config.batch_size), src.name, src.entry,
                     desc=f"{task} {src.name}", progress=progress)
    if not job.writer:
        return None
    n = len(next(iter(items.values())))
    arrays = assemble(os.path.join(folder, "parts", task), n, OUTPUTS[task])
    npz = os.path.join(folder, f"{task}.npz")
    fresh = computed or not os.path.exists(npz)  # a finished task reopened rewrites nothing
    if fresh:
        save_arrays(npz, {**{k: np.asarray(v) for k, v in items.items()}, **arrays})
    job.draw(os.path.join(folder, f"{task}.png"), fresh, lambda p: _figure(config, task, src, items, arrays, p))
    return {"items": items, "arrays": arrays, "rows": rows}


def synthesize(config, progress: bool = True, log: Optional[Callable[[str], None]] = None) -> list:
    """Runs every task for every model (the module docstring); returns the summary rows on process 0
    (``[]`` elsewhere)."""
    recipes = check_config(config)
    specs = parse_models(config.models)
    mesh = parallel.job_mesh(config)
    sources = [_Source(config, name, path) for name, path in specs]  # every model checked before writing
    items = {(src.name, task): _items(config, src, task) for src in sources for task in recipes}
    judge = _Judge(config) if config.judge else None
    with EvaluationJob(config, CHANGEABLE, log or default_log) as job:
        if job.writer:
            has = {s.name: os.path.isdir(job.path(s.name)) for s in sources}
            job.check(any(has.values()), {s.name: s.entry for s in sources}, lambda n: has.get(n, False))
        summary = []
        for src in sources:
            for task, rec in recipes.items():
                done = _run_task(config, job, mesh, src, task, items[src.name, task], rec, progress)
                if done is not None:
                    summary.append(_summary(task, src, done["items"], done["arrays"], done["rows"], judge))
        if not job.writer:
            return []
        job.write_csv(job.path("summary.csv"), SUMMARY_COLUMNS, summary)
        return summary

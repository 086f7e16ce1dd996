"""The train state and one training step: what ``advalign-jax train`` and the seed sweep both run.

The state is a plain pytree ``{'step', 'params', 'opt_state'}`` (plus ``'batch_stats'`` for models with
BatchNorm). One step: the objective's loss at the batch (:mod:`advalign_jax.training.objectives`; the
step's random key is ``fold_in(base_key, step)``, so a resumed run draws what an uninterrupted one
draws), its gradient with respect to the parameters, the optimizer's update; the BatchNorm statistics
are those the objective's training-mode forward pass returns.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from advalign_jax.models import get_model


def build_model(config):
    """The model of ``config.model`` (with the run's ``dtype`` and ``remat``)."""
    options = config.model.options.to_dict()
    return get_model(config.model.name, **options, dtype=config.dtype, remat=bool(config.remat))


def init_state(model, tx, rng) -> dict:
    """The initial train state for ``rng`` (the model's initialisers, the optimizer's initial state)."""
    variables = model.init(rng)
    state = {"step": jnp.zeros((), jnp.int32), "params": variables["params"], "opt_state": tx.init(variables["params"])}
    if "batch_stats" in variables:
        state["batch_stats"] = variables["batch_stats"]
    return state


def train_step(model, objective, objective_cfg, tx, lr, state, batch, context, base_key) -> tuple:
    """One step; returns ``(new_state, loss, metrics)``: the objective's metrics plus ``learning_rate``
    and ``grad_norm`` (the global norm of the parameter gradient). ``context``: the objective's per-run
    constants (``objective.prepare``), or None."""
    step_key = jax.random.fold_in(base_key, state["step"])
    batch = {**batch, "step": state["step"]}  # objectives with step-dependent weights read it
    model_state = {"batch_stats": state["batch_stats"]} if "batch_stats" in state else {}

    def loss_fn(params):
        if context is None:
            return objective.loss(model, params, model_state, batch, step_key, objective_cfg)
        return objective.loss(model, params, model_state, batch, step_key, objective_cfg, context)

    (loss, (new_model_state, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}
    if "batch_stats" in state:
        new["batch_stats"] = new_model_state["batch_stats"]
    metrics = {**metrics, "learning_rate": lr(state["step"]), "grad_norm": optax.global_norm(grads)}
    return new, loss, metrics


def variables_of(state) -> dict:
    """The model variables (``params``, and ``batch_stats`` if any) of a train state."""
    return {k: state[k] for k in ("params", "batch_stats") if k in state}

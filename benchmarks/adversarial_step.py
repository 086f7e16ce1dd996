"""The adversarial training steps (PGD-AT and TRADES) against PyTorch steps written the way the reference
libraries write them, on the same model, batch and attack budget K, in one run on the same machine.

    python benchmarks/adversarial_step.py [--batch 64] [--k 7] [--repeats 5] [--no-torch]

On PAG's CIFAR ResNet-18 (32x32, 10 classes; tests/references/torch_cifar.py's PyTorch module, imported
through our torch importer, so both frameworks hold the same random weights), one full training step:

- ``plain step``: the parameter gradient of cross-entropy (training-mode BatchNorm): the unit of cost;
- ``PGD-AT step``: our ``adversarial`` objective (K L2 PGD steps in inference mode, then the
  cross-entropy at ``x_adv`` in training mode; the library's CIFAR attack: eps 0.5, steps of eps / 5)
  and its gradient, one compiled program;
- ``TRADES step``: our ``trades`` objective (K Linf steps on the KL in inference mode; the clean and the
  adversarial training-mode passes, beta 6) and its gradient;
- the references: ``tests/references/torch_adversarial.pgd_at_step`` (the ``robustness`` library's
  ``Attacker`` loop and step) and ``trades_step`` (TRADES's ``trades_loss``), eager PyTorch on the same
  threads.

The arithmetic floor, from our own measured pieces: a PGD-AT step is K attack passes (``attack pass``:
the input-gradient of the cross-entropy in inference mode) plus one training step of the loss; a
TRADES step K attack passes plus two training-mode passes (about two plain steps). The table prints each
step's time, its floor from those pieces, and ours vs PyTorch (PyTorch's time over ours: the speed-up,
the median of interleaved rounds).
"""

import argparse
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "references"))
sys.path.insert(0, os.path.dirname(__file__))

from timing import interleaved_times, ratio_summary  # noqa: E402  (benchmarks/timing.py)

from advalign_jax.models import get_model  # noqa: E402
from advalign_jax.models.checkpoint import load_model  # noqa: E402
from advalign_jax.models.convert import convert  # noqa: E402
from advalign_jax.training import objectives  # noqa: E402
from advalign_jax.training.config_blocks import objective_block  # noqa: E402

NUM_CLASSES = 10
L2_EPS, LINF_EPS, LINF_STEP, BETA = 0.5, 8 / 255, 2 / 255, 6.0


def nets(seed=0):
    """The PyTorch CIFAR ResNet-18 (random weights, training mode) and ours with the same weights; None
    for the PyTorch side when torch or tests/references/ is unavailable."""
    try:
        import torch  # optional: the reference side

        import torch_cifar  # the reference PyTorch module (tests/references/)
    except ImportError:
        model = get_model("cifar_resnet18", num_classes=NUM_CLASSES)
        return None, model, dict(model.init(jax.random.PRNGKey(seed)))
    net = torch_cifar.randomise(torch_cifar.TorchCifarResNet(), seed=seed).train()
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(net.state_dict(), os.path.join(tmp, "w.pth"))
        convert(os.path.join(tmp, "w.pth"), "cifar_resnet18", os.path.join(tmp, "ours"))
        model, variables = load_model(os.path.join(tmp, "ours"))
    return net, model, variables


def objective_cfg(name: str, k: int):
    cfg = objective_block(name)
    if name == "adversarial":
        cfg.adversarial.update(dict(constraint="l2", eps=L2_EPS, step_size=L2_EPS / 5, steps=k))
    else:
        cfg.adversarial.update(dict(constraint="linf", eps=LINF_EPS, step_size=LINF_STEP, steps=k, beta=BETA))
    return cfg


def step_fn(model, variables, name, k, x, y):
    """Our whole training step's gradient (the objective's loss and its parameter gradient), compiled."""
    objective = objectives.get(name)
    cfg = objective_cfg(name, k)
    state = {"batch_stats": variables["batch_stats"]}
    batch = {"image": jnp.asarray(x), "label": jnp.asarray(y), "step": jnp.int32(0)}

    def loss(p):
        return objective.loss(model, p, state, batch, jax.random.PRNGKey(0), cfg)

    grad = jax.jit(jax.grad(lambda p: loss(p)[0]))
    return lambda: jax.block_until_ready(grad(variables["params"]))


def plain_fn(model, variables, x, y):
    return step_fn(model, variables, "ce", 0, x, y)


def attack_pass_fn(model, variables, x, y):
    """One pass of the attack: the input-gradient of the cross-entropy in inference mode."""
    def ce(z):
        logits = model.apply(variables, z)
        return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(y)[:, None], axis=1))

    grad = jax.jit(jax.grad(ce))
    return lambda: jax.block_until_ready(grad(jnp.asarray(x)))


def torch_fns(net, x, y, k):
    import torch  # optional: the reference side

    import torch_adversarial as ref  # the reference steps (tests/references/)

    class Logits(torch.nn.Module):  # the reference module also returns its stage activations
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, t):
            return self.inner(t)[0]

    model = Logits(net)
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    ty = torch.from_numpy(y.astype(np.int64))
    opt = torch.optim.SGD(net.parameters(), lr=0.0)  # lr 0: every round steps from the same weights
    noise = 0.001 * torch.randn_like(tx)

    def plain():
        model.train()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(tx), ty).backward()
        opt.step()

    def attack_pass():
        model.eval()
        xa = tx.clone().requires_grad_(True)
        torch.autograd.grad(torch.nn.functional.cross_entropy(model(xa), ty, reduction="sum"), [xa])

    def pgd_at():
        ref.pgd_at_step(model, opt, tx, ty, L2_EPS, L2_EPS / 5, k, "l2", True)

    def trades():
        ref.trades_step(model, opt, tx, ty, noise, LINF_EPS, LINF_STEP, k, BETA, "l_inf")

    return {"plain": plain, "attack_pass": attack_pass, "adversarial": pgd_at, "trades": trades}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--k", type=int, default=7, help="attack steps inside the training step (default 7)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--no-torch", action="store_true", help="only our steps")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(args.batch, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, NUM_CLASSES, size=args.batch).astype(np.int32)
    net, model, variables = nets()
    ours = {"plain": plain_fn(model, variables, x, y), "attack_pass": attack_pass_fn(model, variables, x, y),
            "adversarial": step_fn(model, variables, "adversarial", args.k, x, y),
            "trades": step_fn(model, variables, "trades", args.k, x, y)}
    fns = {f"ours/{k}": v for k, v in ours.items()}
    if net is not None and not args.no_torch:
        import torch  # optional: the reference side

        torch.set_num_threads(os.cpu_count() or 1)
        fns.update({f"torch/{k}": v for k, v in torch_fns(net, x, y, args.k).items()})
    times = interleaved_times(fns, args.repeats)
    med = {name: float(np.median(t)) for name, t in times.items()}
    a, p_ = med["ours/attack_pass"], med["ours/plain"]
    floors = {"plain": p_, "attack_pass": a, "adversarial": args.k * a + p_, "trades": args.k * a + 2 * p_}
    print(f"# adversarial training steps, CIFAR ResNet-18, batch {args.batch}, K = {args.k}, "
          f"{jax.devices()[0].device_kind}, {os.cpu_count()} CPU threads, median of {args.repeats} rounds")
    print("| step | ours (s) | ours / plain | floor from our pieces (s) | PyTorch (s) | PyTorch / plain | "
          "ours vs PyTorch |")
    print("|---|---|---|---|---|---|---|")
    rows = (("plain", "plain CE step"), ("attack_pass", "attack pass (input-gradient, inference mode)"),
            ("adversarial", f"PGD-AT step (L2, K={args.k})"), ("trades", f"TRADES step (Linf, K={args.k})"))
    for name, label in rows:
        row = (f"| {label} | {med['ours/' + name]:.3f} | {med['ours/' + name] / med['ours/plain']:.2f} | "
               f"{floors[name]:.3f} |")
        if f"torch/{name}" in med:
            speed, lo, hi = ratio_summary(times[f"torch/{name}"], times[f"ours/{name}"])
            row += (f" {med['torch/' + name]:.3f} | {med['torch/' + name] / med['torch/plain']:.2f} | "
                    f"{speed:.2f}x [{lo:.2f}, {hi:.2f}] |")
        else:
            row += " - | - | - |"
        print(row)


if __name__ == "__main__":
    main()

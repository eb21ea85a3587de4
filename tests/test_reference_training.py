"""The optimizer against the reference trainer's, step for step (needs PyTorch).

Same weights, same batches: K SGD steps of `steps.train_step` with
`optim.create_optimizer`, and K steps of a transcription of the reference
training step (its functional forward in training mode, cross-entropy, its
`create_optimizer`: parameter groups, coupled weight decay, momentum 0.9, and a
new optimizer at the learning-rate boundary). The parameters must agree after
every step. The weight decay is set large so that decoupled decay, decay of the
wrong leaves, or a momentum that survives the boundary would each show; the
last test checks that they do.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from dirac_jax import optim, steps, torch_checkpoint
from dirac_jax import torch_reference as ref

torch = pytest.importorskip("torch")

STEPS = 6
BOUNDARY = 3  # lr x0.2 and a new reference optimizer from this step on
LR, WD, BATCH = 0.1, 0.05, 16


def _config(variant):
    return ml_collections.ConfigDict(
        dict(
            learning_rate=LR,
            weight_decay=WD,
            weight_decay_on="all" if variant == "v1" else "kernels",
            momentum=0.9,
            lr_boundaries=(BOUNDARY / STEPS,),
            lr_decay=0.2,
            lr_schedule="reference",
            num_train_steps=STEPS,
            num_epochs=0,
        )
    )


def _batches(seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(STEPS):
        x = rng.normal(size=(BATCH, 3, 32, 32)).astype(np.float32)
        yield x, rng.integers(0, 10, size=BATCH)


def _reference_run(flat, variant):
    """The reference: params after each step, as flat dicts of numpy arrays."""
    flat = {k: v.clone() for k, v in flat.items()}
    trainable = {
        k: v.requires_grad_(True)
        for k, v in flat.items()
        if not (k.startswith("eye") or k.endswith(("running_mean", "running_var")))
    }
    opt = ref.reference_optimizer(trainable, LR, WD, variant)
    history = []
    for step, (x, y) in enumerate(_batches()):
        if step == BOUNDARY:  # on_start_epoch: a new optimizer with lr * lr_decay_ratio
            opt = ref.reference_optimizer(trainable, opt.param_groups[0]["lr"] * 0.2, WD, variant)
        opt.zero_grad()
        logits = ref.reference_forward(torch.from_numpy(x), flat, train=True)
        torch.nn.functional.cross_entropy(logits, torch.from_numpy(y)).backward()
        opt.step()
        history.append({k: v.detach().clone() for k, v in flat.items()})
    return history


def _jax_run(model, variables, tx, lr_fn):
    state = steps.TrainState.create(
        apply_fn=model.apply, params=variables["params"], tx=tx,
        batch_stats=variables["batch_stats"],
    )  # fmt: skip
    step = jax.jit(
        functools.partial(steps.train_step, learning_rate_fn=lr_fn, dataset_name="cifar10", seed=0)
    )
    history = []
    for x, y in _batches():
        batch = {"image": jnp.asarray(x.transpose(0, 2, 3, 1)), "label": jnp.asarray(y)}
        state, _ = step(state, batch)
        history.append(jax.device_get(state.params))
    return history


def _max_rel_error(ours, theirs, initial) -> float:
    """The largest difference of a leaf, relative to that leaf's size before training.

    Relative to the initial size, not the current one: a scalar `b` that passes
    near zero would otherwise turn float32 rounding into a large ratio.
    """
    errors = jax.tree.map(
        lambda a, b, c: float(np.max(np.abs(a - b)) / (np.max(np.abs(c)) + 1e-12)),
        ours, theirs, initial,
    )  # fmt: skip
    return max(jax.tree.leaves(errors))


def _setup(variant):
    flat = ref.reference_params(10, 0.5, "cifar", 10, seed=1, variant=variant)
    model, variables = torch_checkpoint.load_reference(flat)
    config = _config(variant)
    lr_fn = optim.create_learning_rate_fn(config, steps_per_epoch=STEPS)
    return flat, model, variables, config, lr_fn


@pytest.mark.parametrize("variant", ["v2", "v1"])
def test_sgd_steps_equal_the_reference_training_step(variant):
    flat, model, variables, config, lr_fn = _setup(variant)
    tx = optim.create_optimizer(config, lr_fn, steps_per_epoch=STEPS)
    ours = _jax_run(model, variables, tx, lr_fn)
    theirs = _reference_run(flat, variant)
    for step, (p, t) in enumerate(zip(ours, theirs, strict=True)):
        expected = torch_checkpoint.load_reference(t)[1]["params"]
        # float32 through 6 steps of BN-normalized training in two frameworks: measured
        # 2e-7 (v2) and 1e-6 (v1) here, up to 1.5e-4 for v1's scalar b in other XLA set-ups
        # (its gradient sums a whole kernel); every deviation below moves it by > 3e-2.
        assert _max_rel_error(p, expected, variables["params"]) < 5e-4, step
    # The steps moved the weights by far more than the tolerance.
    assert _max_rel_error(variables["params"], expected, variables["params"]) > 1e-2


def test_the_comparison_detects_each_plausible_deviation():
    flat, model, variables, config, lr_fn = _setup("v2")
    theirs = torch_checkpoint.load_reference(_reference_run(flat, "v2")[-1])[1]["params"]
    mask = functools.partial(optim.weight_decay_mask, scope="kernels")
    deviations = {
        # Decoupled (AdamW-style) decay: wd * w added after the momentum.
        "decoupled": optax.chain(
            optax.trace(0.9),
            optax.add_decayed_weights(WD, mask=mask),
            optax.scale_by_learning_rate(lr_fn),
        ),
        # The momentum kept across the boundary.
        "no restart": optim.create_optimizer(config, lr_fn, steps_per_epoch=None),
        # Decay on a, b and BN too.
        "decay all": optax.chain(
            optax.add_decayed_weights(WD),
            optim.reset_at_steps(optax.trace(0.9), (BOUNDARY,)),
            optax.scale_by_learning_rate(lr_fn),
        ),
    }
    for name, tx in deviations.items():
        ours = _jax_run(model, variables, tx, lr_fn)[-1]
        assert _max_rel_error(ours, theirs, variables["params"]) > 1e-2, name

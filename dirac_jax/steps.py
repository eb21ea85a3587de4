"""The train state, the jitted train and eval steps, and the one metrics function.

`train_step` and `eval_step` run under `jit` on a global batch sharded on the
mesh's `"data"` axis (`sharding`); parameters, optimizer and BatchNorm state are
replicated, and XLA inserts the cross-device reductions, so BatchNorm
normalizes over the global batch with no `pmean` and a step on 8 devices
computes what it computes on one. uint8 images (small datasets, resident on the
devices) are augmented and normalized inside the step, keyed by
`(config.seed, step)` only; streamed float images arrive ready.
`classification_metrics` is the one metrics function, and `evaluate_batches`
the one evaluation loop, of the trainer's evaluation and of
`python -m dirac_jax.evaluate`; both report `top1`, `top5`, `loss` and `count`.

Soft symmetry (the slides): `config.symmetry_penalty` (lambda) adds
`lambda * models.network_symmetry_penalty(model, params, p)` (slides eq. 3 over the
convs `model.symmetric_layers()` names) to the loss.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state as flax_train_state
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dirac_jax import data, models
from dirac_jax.optim import create_optimizer, project_kernels
from dirac_jax.sharding import host_copies, replicated

__all__ = [
    "TrainState",
    "augment_and_normalize",
    "augment_key",
    "classification_metrics",
    "compile_steps",
    "create_train_state",
    "cross_entropy_loss",
    "eval_step",
    "evaluate_batches",
    "summarize_metrics",
    "symmetry_penalty_term",
    "train_step",
]

_AUGMENT_STREAM = 0  # fold_in tag of the augmentation key, so other uses get other streams.


class TrainState(flax_train_state.TrainState):
    """Flax's TrainState (step, params, opt_state) plus the BatchNorm statistics."""

    batch_stats: Any = None


def create_train_state(
    config,
    model,
    key: jax.Array,
    image_shape,
    learning_rate_fn: optax.Schedule,
    mesh=None,
    steps_per_epoch: int | None = None,
) -> TrainState:
    """Initializes parameters, BN statistics and optimizer state.

    Args:
      config: the training config (optimizer fields).
      model: from `create_model`.
      key: the init key (the trainer uses `jax.random.key(config.seed)`).
      image_shape: `(H, W, C)` of one input image.
      learning_rate_fn: from `create_learning_rate_fn`.
      mesh: if given, every array is created replicated on this mesh.
      steps_per_epoch: places the momentum restarts of `lr_schedule="reference"`
        (`create_optimizer`); None: no restarts.

    Returns:
      A `TrainState` at step 0.
    """
    tx = create_optimizer(config, learning_rate_fn, steps_per_epoch)

    def init(key):
        variables = model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
        params = variables["params"]
        return jnp.zeros((), jnp.int32), params, variables.get("batch_stats", {}), tx.init(params)

    out_shardings = None if mesh is None else replicated(mesh)
    step, params, batch_stats, opt_state = jax.jit(init, out_shardings=out_shardings)(key)
    return TrainState(
        step=step,
        apply_fn=model.apply,
        params=params,
        tx=tx,
        opt_state=opt_state,
        batch_stats=batch_stats,
    )


def cross_entropy_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy with integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def augment_key(seed: int, step: jax.Array) -> jax.Array:
    """The augmentation key of a step: a function of `(seed, step)` only."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), _AUGMENT_STREAM)


def augment_and_normalize(images, key, *, dataset_name: str, augment: bool):
    """uint8 images to normalized float32, with CIFAR augmentation if `augment`."""
    if augment:
        images = data.augment(key, images)
    return data.normalize(images, dataset_name)


def train_step(
    state: TrainState,
    batch: dict,
    *,
    learning_rate_fn: optax.Schedule,
    dataset_name: str,
    seed: int,
    augment: bool = True,
    max_norm: float = 0.0,
    symmetry_penalty: tuple[float, Callable] | None = None,
):
    """One SGD step on a global batch; run it under `jit` with the batch sharded.

    Args:
      state: the current state (replicated).
      batch: `{"image", "label"}`. uint8 images (small datasets) are augmented
        and normalized here, keyed by `(seed, state.step)`; float images
        (ImageNet) are used as they are.
      learning_rate_fn: only for logging the step's learning rate.
      dataset_name: selects the normalization statistics.
      seed: the run seed.
      augment: reflect-pad 4, random crop, random flip (uint8 images only).
      max_norm: > 0 projects every kernel to filter norm <= max_norm after the
        update (PlainNet eq. 2).
      symmetry_penalty: `(lambda, fn)` adds `lambda * fn(params)` to the loss,
        the soft symmetry constraint (`fn` = `models.network_symmetry_penalty` bound to
        the model); None: no penalty.

    Returns:
      `(new_state, metrics)` with scalar `loss` (the cross-entropy), `accuracy`
      and `learning_rate`, and `symmetry_penalty` (`fn(params)` before the
      update) when one is given.
    """
    images = batch["image"]
    if images.dtype == jnp.uint8:
        key = augment_key(seed, state.step)
        images = augment_and_normalize(images, key, dataset_name=dataset_name, augment=augment)

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        logits, updates = state.apply_fn(variables, images, train=True, mutable=["batch_stats"])
        loss = cross_entropy_loss(logits, batch["label"])
        penalty = jnp.zeros((), jnp.float32)
        if symmetry_penalty is not None:
            penalty = symmetry_penalty[1](params)
        total = loss + symmetry_penalty[0] * penalty if symmetry_penalty is not None else loss
        return total, (logits, updates["batch_stats"], loss, penalty)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, (logits, batch_stats, loss, penalty)), grads = grad_fn(state.params)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    if max_norm > 0:
        new_state = new_state.replace(params=project_kernels(new_state.params, max_norm))
    metrics_ = {
        "loss": loss,
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
        "learning_rate": learning_rate_fn(state.step),
    }
    if symmetry_penalty is not None:
        metrics_["symmetry_penalty"] = penalty
    return new_state, metrics_


def eval_step(state: TrainState, batch: dict, *, dataset_name: str) -> dict:
    """Sums of loss and correct predictions over the unmasked examples of a batch.

    Args:
      state: the state (BN uses the running statistics).
      batch: `{"image", "label", "mask"}`; `mask` is False for padding examples.
      dataset_name: normalization statistics for uint8 images.

    Returns:
      `classification_metrics` of the batch's logits: `{"loss_sum", "top1",
      "top5", "count"}`; sum these over batches, then divide.
    """
    images = batch["image"]
    if images.dtype == jnp.uint8:
        images = data.normalize(images, dataset_name)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits = state.apply_fn(variables, images, train=False)
    return classification_metrics(logits, batch["label"], batch["mask"])


def classification_metrics(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict:
    """Sums over the unmasked examples of a batch: cross-entropy, top-1 and top-5 hits, count.

    The one metrics function of the trainer's eval (`eval_step`) and of
    `python -m dirac_jax.evaluate`. The logits are cast to float32 first, and a
    hit is the label among the indices `lax.top_k` returns: strict, so of tied
    logits (frequent in bfloat16) the lower class index ranks first, the same
    way in both. Top-5 is top-all for fewer than 5 classes.

    Args:
      logits: `(N, classes)`, any float dtype.
      labels: `(N,)` int class indices.
      mask: `(N,)` bool, False for padding examples.

    Returns:
      `{"loss_sum": float32, "top1": int32, "top5": int32, "count": int32}`.

    Examples:
      >>> import jax.numpy as jnp
      >>> logits = jnp.array([[0.1, 0.5, 0.5, 0.9], [1.0, 0.0, 0.0, 0.0]])
      >>> m = classification_metrics(logits, jnp.array([2, 0]), jnp.array([True, True]))
      >>> int(m["top1"]), int(m["count"])
      (1, 2)
      >>> m = classification_metrics(logits[:1, :3], jnp.array([2]), jnp.array([True]))
      >>> int(m["top1"])  # classes 1 and 2 tie; the lower index ranks first
      0
    """
    logits = logits.astype(jnp.float32)
    k = min(5, logits.shape[-1])
    hits = jax.lax.top_k(logits, k)[1] == labels[:, None]
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return {
        "loss_sum": jnp.sum(jnp.where(mask, losses, 0.0)),
        "top1": jnp.sum((hits[:, 0] & mask).astype(jnp.int32)),
        "top5": jnp.sum((jnp.any(hits, axis=-1) & mask).astype(jnp.int32)),
        "count": jnp.sum(mask.astype(jnp.int32)),
    }


def _gather(arrays: data.ArrayDataset, idx):
    return {"image": arrays.images[idx], "label": arrays.labels[idx]}


def compile_steps(
    config,
    mesh: Mesh,
    learning_rate_fn,
    dataset_name: str,
    in_memory: bool = True,
    *,
    model=None,
):
    """The jitted train and eval functions for `mesh`.

    In-memory data: `train_fn(state, arrays, idx)` and `eval_fn(state, arrays,
    idx, mask)`, with `arrays` the replicated `ArrayDataset` and `idx`, `mask`
    sharded on `"data"`; `config.augment` turns the in-step augmentation on.
    Streamed data (augmented on the hosts): `train_fn(state, batch)` and
    `eval_fn(state, batch)`. The train function donates the state.
    `config.symmetry_penalty > 0` adds the soft symmetry constraint of
    `model`, the run's model (`config_schema.create_model`), to the loss; only
    then is `model` needed.
    """
    rep, batched = replicated(mesh), NamedSharding(mesh, P("data"))
    step = functools.partial(
        train_step,
        learning_rate_fn=learning_rate_fn,
        dataset_name=dataset_name,
        seed=int(config.seed),
        augment=in_memory and bool(config.augment),
        max_norm=float(config.max_norm),
        symmetry_penalty=symmetry_penalty_term(config, model),
    )
    evaluate_batch = functools.partial(eval_step, dataset_name=dataset_name)
    if in_memory:
        train_fn = jax.jit(
            lambda state, arrays, idx: step(state, _gather(arrays, idx)),
            in_shardings=(rep, rep, batched),
            out_shardings=(rep, rep),
            donate_argnums=0,
        )
        eval_fn = jax.jit(
            lambda state, arrays, idx, mask: evaluate_batch(
                state, {**_gather(arrays, idx), "mask": mask}
            ),
            in_shardings=(rep, rep, batched, batched),
            out_shardings=rep,
        )
    else:
        train_fn = jax.jit(
            step, in_shardings=(rep, batched), out_shardings=(rep, rep), donate_argnums=0
        )
        eval_fn = jax.jit(evaluate_batch, in_shardings=(rep, batched), out_shardings=rep)
    return train_fn, eval_fn


def symmetry_penalty_term(config, model) -> tuple[float, Callable] | None:
    """`(lambda, params -> penalty)` of the run's model, or None when it is off.

    Raises:
      ValueError: the penalty is on and `model` is None.
    """
    lam = float(config.symmetry_penalty)
    if lam <= 0:
        return None
    if model is None:
        raise ValueError(
            f"config.symmetry_penalty={lam} needs the run's model: pass model= to compile_steps."
        )
    p = float(config.symmetry_penalty_p)
    return lam, functools.partial(models.network_symmetry_penalty, model, p=p)


def summarize_metrics(totals: dict) -> dict:
    """Means of `classification_metrics` summed over batches: `{"top1", "top5", "loss", "count"}`.

    `loss_sum` becomes the mean `loss`; every other sum but `count` becomes its
    share of `count` (e.g. `dirac_jax.evaluate`'s `agree`).

    Examples:
      >>> summarize_metrics({"loss_sum": 3.0, "top1": 3, "top5": 4, "count": 4})
      {'top1': 0.75, 'top5': 1.0, 'loss': 0.75, 'count': 4}
    """
    count = int(totals["count"])
    out = {k: float(v) / count for k, v in totals.items() if k not in ("loss_sum", "count")}
    return {**out, "loss": float(totals["loss_sum"]) / count, "count": count}


def evaluate_batches(
    eval_fn: Callable, state: Any, batches, expected_count: int | None = None
) -> dict:
    """The one evaluation loop: metrics over every example of the eval batches exactly once.

    The trainer's evaluation and `dirac_jax.evaluate` both run it. `eval_fn`
    returns `classification_metrics` sums for a batch, or a dict of them (one
    per net: `dirac_jax.evaluate` runs the unfolded and the folded net on the
    same batch); the sums are added over the batches and then divided
    (`summarize_metrics`).

    Args:
      eval_fn: `eval_fn(state, *args)` for each `args` of `batches`, e.g. from
        `compile_steps`.
      state: the state, or whatever `eval_fn` takes first.
      batches: iterable of `eval_fn`'s arguments after `state`; padding
        examples are masked out.
      expected_count: if given, the number of examples the batches must hold.

    Returns:
      `{"top1", "top5", "loss", "count"}` (top-1 and top-5 accuracy, mean
      cross-entropy, examples), or a dict of them with `eval_fn`'s keys.

    Raises:
      AssertionError: the masks counted a different number of examples than
        `expected_count` (a bug in the input pipeline).
    """
    totals = None
    for args in batches:
        out = eval_fn(state, *args)
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = host_copies(totals)
    if "count" in totals:
        results = summarize_metrics(totals)
        counts = {results["count"]}
    else:
        results = {k: summarize_metrics(v) for k, v in totals.items()}
        counts = {r["count"] for r in results.values()}
    if expected_count is not None and counts != {expected_count}:
        raise AssertionError(
            f"evaluation counted {sorted(counts)} examples, the test set has {expected_count}."
        )
    return results

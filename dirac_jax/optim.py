"""The learning-rate schedule, the weight-decay mask, the momentum reset and the optimizer.

SGD with momentum and coupled weight decay, as the reference training code
(where it differs from the papers' prose, the prose's choice is a config
option): weight decay on conv and linear kernels only (v2; the v1 recipe decays
every parameter, `weight_decay_on="all"`), step learning-rate decay placed as
the reference places it, with the momentum restarted at each decay
(`lr_schedule="reference"`; `"fractions"` keeps it). Every function takes a
config completed by `config_schema.validate_config` (or `with_defaults`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dirac_jax import param
from dirac_jax.config_schema import WEIGHT_DECAY_SCOPES, total_steps

__all__ = [
    "ResetState",
    "create_learning_rate_fn",
    "create_optimizer",
    "is_kernel",
    "lr_boundary_steps",
    "project_kernels",
    "reset_at_steps",
    "weight_decay_mask",
]


def lr_boundary_steps(config, steps_per_epoch: int) -> tuple[int, ...]:
    """The steps at which the learning rate is multiplied by `lr_decay`.

    `lr_boundaries` are fractions of training. With `lr_schedule="reference"`
    (the default) an epoch-counted run (`num_train_steps <= 0`) decays where the
    reference code does: its `epoch_step` list `[60, 120, 160]` is checked
    against the 1-based number of the epoch about to start, so the rate drops
    at the start of epoch 60, after 59 full epochs, i.e. at step
    `(round(f * num_epochs) - 1) * steps_per_epoch`. A run counted in steps
    (`num_train_steps > 0`, e.g. the quickstart) has no epochs to shift by and
    decays at `int(f * total_steps)`, which is also where
    `lr_schedule="fractions"` always decays (the paper's prose, "at epochs 60,
    120 and 160", read as after that many epochs).

    Examples:
      >>> import ml_collections
      >>> c = ml_collections.ConfigDict(dict(lr_boundaries=(0.3, 0.6, 0.8), num_epochs=200,
      ...     num_train_steps=-1, lr_schedule="reference"))
      >>> lr_boundary_steps(c, steps_per_epoch=10)
      (590, 1190, 1590)
      >>> c.lr_schedule = "fractions"
      >>> lr_boundary_steps(c, steps_per_epoch=10)
      (600, 1200, 1600)
    """
    total = total_steps(config, steps_per_epoch)
    by_epochs = config.lr_schedule == "reference" and not config.num_train_steps > 0
    steps = []
    for fraction in config.lr_boundaries:
        if by_epochs:
            epoch = max(1, round(fraction * config.num_epochs))
            steps.append(max(1, (epoch - 1) * steps_per_epoch))
        else:
            steps.append(max(1, int(fraction * total)))
    return tuple(steps)


def create_learning_rate_fn(config, steps_per_epoch: int) -> optax.Schedule:
    """Step decay: `learning_rate` times `lr_decay` at each of `lr_boundary_steps`.

    Boundaries are fractions of the total number of steps (`total_steps`), so a
    shorter run set by `num_train_steps` decays at the same relative points. The
    CIFAR recipe is (0.3, 0.6, 0.8) x0.2, i.e. epochs 60/120/160 of 200; ImageNet
    (0.3, 0.6, 0.9) x0.1. The factor applies from the boundary step on.

    Examples:
      >>> import ml_collections
      >>> c = ml_collections.ConfigDict(dict(learning_rate=0.1, lr_boundaries=(0.3, 0.6, 0.8),
      ...     lr_decay=0.2, num_train_steps=100, num_epochs=0, lr_schedule="reference"))
      >>> fn = create_learning_rate_fn(c, steps_per_epoch=10)
      >>> [round(float(fn(s)), 6) for s in (0, 29, 30, 60, 80, 99)]
      [0.1, 0.1, 0.02, 0.004, 0.0008, 0.0008]
    """
    decay = float(config.lr_decay)
    scales: dict[int, float] = {}
    for boundary in lr_boundary_steps(config, steps_per_epoch):
        # Boundaries that coincide on a very short run compound instead of overwriting.
        scales[boundary] = scales.get(boundary, 1.0) * decay
    return optax.piecewise_constant_schedule(float(config.learning_rate), scales)


def _leaf_name(path) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))


def is_kernel(path, leaf) -> bool:
    """Conv kernels (`w`, raw or Dirac's) and linear kernels (`kernel`)."""
    name = _leaf_name(path)
    return name == "kernel" or (name == "w" and np.ndim(leaf) > 1)


def _is_decayed(path, leaf) -> bool:
    """`is_kernel`, and the raw numbers of symmetric kernels (`v`, `q`, `lambda`, ...).

    The reference decays every tensor of more than one dimension; in these
    models those are exactly the conv and linear weights, including every raw
    piece of a `param.symmetric` kernel (Dirac's `a`, `b` and BN's are vectors).
    """
    return is_kernel(path, leaf) or np.ndim(leaf) > 1


def weight_decay_mask(params, scope: str = "kernels"):
    """True for the leaves weight decay applies to.

    `scope="kernels"`: conv and linear kernels only, as the reference v2 code
    (it decays tensors of more than one dimension) and DiracNets v2 sec. 2 (no
    weight decay on `a` and `b`); BN parameters and biases are not decayed.
    The raw numbers of a symmetric kernel (`param.symmetric`) are decayed.
    `scope="all"`: every parameter, as the reference v1 code (one SGD group
    with weight decay) and DiracNets v1, which decays the scalar `a` and `b`.

    Examples:
      >>> import numpy as np
      >>> p = {"conv": {"w": np.ones((3, 3, 2, 2)), "a": np.ones(2), "b": np.ones(2)},
      ...      "bn": {"scale": np.ones(2)}, "fc": {"kernel": np.ones((2, 3)), "bias": np.ones(3)}}
      >>> mask = weight_decay_mask(p)
      >>> mask["conv"], mask["bn"], mask["fc"]
      ({'a': False, 'b': False, 'w': True}, {'scale': False}, {'bias': False, 'kernel': True})
      >>> all(jax.tree.leaves(weight_decay_mask(p, "all")))
      True
    """
    if scope not in WEIGHT_DECAY_SCOPES:
        raise ValueError(f"unknown weight decay scope {scope!r}; expected {WEIGHT_DECAY_SCOPES}.")
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: scope == "all" or _is_decayed(path, leaf), params
    )


class ResetState(NamedTuple):
    """The state of `reset_at_steps`: the updates so far and the wrapped state."""

    count: jax.Array  # updates applied so far, i.e. the step the next update is
    inner: optax.OptState  # the wrapped transformation's state


def reset_at_steps(inner: optax.GradientTransformation, steps) -> optax.GradientTransformation:
    """`inner` whose state is zeroed before the update of each step in `steps`.

    Around `optax.trace` this is the reference trainer's re-creation of
    `torch.optim.SGD` at every learning-rate boundary: the momentum buffer
    starts again from the first gradient after it.
    """
    steps = tuple(int(s) for s in steps)

    def init(params):
        return ResetState(jnp.zeros((), jnp.int32), inner.init(params))

    def update(updates, state, params=None):
        reset = jnp.isin(state.count, jnp.asarray(steps, jnp.int32)) if steps else False
        inner_state = jax.tree.map(lambda x: jnp.where(reset, jnp.zeros_like(x), x), state.inner)
        updates, inner_state = inner.update(updates, inner_state, params)
        return updates, ResetState(optax.safe_increment(state.count), inner_state)

    return optax.GradientTransformation(init, update)


def create_optimizer(
    config, learning_rate_fn: optax.Schedule, steps_per_epoch: int | None = None
) -> optax.GradientTransformation:
    """SGD with momentum and PyTorch-style (coupled) L2 weight decay, as the reference.

    `wd * w` joins the gradient before the momentum, as in
    `torch.optim.SGD(weight_decay=...)`; the buffer is `m <- momentum * m + g`
    and the step `-lr * m`. The decayed leaves are `weight_decay_mask` with
    `config.weight_decay_on`. With `lr_schedule="reference"` (and
    `steps_per_epoch` given) the momentum restarts at each learning-rate
    boundary, since the reference creates a new optimizer there.
    """
    mask = functools.partial(weight_decay_mask, scope=str(config.weight_decay_on))
    momentum = optax.trace(decay=float(config.momentum))
    if config.lr_schedule == "reference" and steps_per_epoch:
        momentum = reset_at_steps(momentum, lr_boundary_steps(config, steps_per_epoch))
    return optax.chain(
        optax.add_decayed_weights(float(config.weight_decay), mask=mask),
        momentum,
        optax.scale_by_learning_rate(learning_rate_fn),
    )


def project_kernels(params, c: float):
    """PlainNet eq. 2: every conv and linear kernel's filters projected to norm <= c."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: param.max_norm(x, c) if is_kernel(path, x) else x, params
    )

"""Batch indices of a dataset held on the devices: the epoch order and the eval padding.

The batch of a global step is a function of `(seed, epoch, position)` only, so a
run resumes exactly from its step; the eval batches cover every example once,
the last one padded and masked.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

__all__ = [
    "epoch_permutation",
    "eval_batches",
    "steps_per_epoch",
    "train_batches",
]


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Training steps per epoch: full batches only, the remainder is dropped.

    Args:
      n: dataset size.
      batch_size: global batch size.

    Returns:
      `n // batch_size`.

    Raises:
      ValueError: `batch_size` < 1 or larger than `n` (an epoch would have no step).

    Examples:
      >>> steps_per_epoch(50000, 128)
      390
      >>> divmod(1000, steps_per_epoch(50000, 128))  # (epoch, step in epoch) at step 1000
      (2, 220)
    """
    if batch_size < 1 or batch_size > n:
        raise ValueError(f"steps_per_epoch: need 1 <= batch_size <= n, got {batch_size}, n={n}.")
    return n // batch_size


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the examples in one epoch, a function of (seed, epoch) only.

    Computed on the host with NumPy's PCG64 seeded by `SeedSequence([seed, epoch])`,
    so any epoch is reproduced without replaying the earlier ones (for a given
    NumPy version).

    Args:
      seed: non-negative run seed.
      epoch: non-negative epoch number.
      n: dataset size.

    Returns:
      int32 array, a permutation of `range(n)`.

    Raises:
      ValueError: negative `seed`, `epoch` or `n`.
    """
    if seed < 0 or epoch < 0 or n < 0:
        raise ValueError(f"epoch_permutation: need seed, epoch, n >= 0, got {seed}, {epoch}, {n}.")
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)


def train_batches(
    dataset_size: int, batch_size: int, seed: int, epoch: int, start_step: int = 0
) -> Iterator[np.ndarray]:
    """Index arrays of the training batches of one epoch, optionally from mid-epoch.

    The last partial batch is dropped so every step has the same shape (one jit
    compilation). To resume exactly from global step `s`, use
    `epoch, start_step = divmod(s, steps_per_epoch(dataset_size, batch_size))`.

    Args:
      dataset_size: number of training examples.
      batch_size: global batch size.
      seed: run seed, see `epoch_permutation`.
      epoch: epoch number, see `epoch_permutation`.
      start_step: index of the first batch to yield within the epoch.

    Returns:
      An iterator of int32 arrays of shape (batch_size,): batches `start_step`,
      `start_step + 1`, ... of the epoch.

    Raises:
      ValueError: invalid sizes, or `start_step` outside [0, steps per epoch].
    """
    steps = steps_per_epoch(dataset_size, batch_size)
    if not 0 <= start_step <= steps:
        raise ValueError(f"train_batches: start_step={start_step} not in [0, {steps}].")
    order = epoch_permutation(seed, epoch, dataset_size)[: steps * batch_size]
    # An iterator rather than a generator function: argument errors surface at the call.
    return iter(order.reshape(steps, batch_size)[start_step:])


def eval_batches(n: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Index batches covering all `n` examples exactly once, in order.

    Every batch has the full `batch_size`, so the eval step compiles once: the last
    batch is padded with index 0 and a False mask, which the caller uses to leave
    the padding out of the metrics.

    Args:
      n: dataset size.
      batch_size: examples per batch.

    Returns:
      An iterator of `(indices, mask)`: int32 and bool arrays of shape (batch_size,).

    Raises:
      ValueError: `batch_size` < 1 or `n` < 0.

    Examples:
      >>> for indices, mask in eval_batches(5, 2):
      ...   print(indices, mask)
      [0 1] [ True  True]
      [2 3] [ True  True]
      [4 0] [ True False]
    """
    if batch_size < 1 or n < 0:
        raise ValueError(f"eval_batches: need batch_size >= 1 and n >= 0, got {batch_size}, {n}.")
    num_batches = -(-n // batch_size)
    positions = np.arange(num_batches * batch_size, dtype=np.int32)
    mask = positions < n
    indices = np.where(mask, positions, 0).astype(np.int32)
    return zip(
        indices.reshape(num_batches, batch_size), mask.reshape(num_batches, batch_size), strict=True
    )

"""The mesh, and placing batches and state on it.

Parallelism is `jit` over a one-axis mesh `("data",)` of all devices of all
processes. Global batches are sharded on `"data"`; parameters, optimizer state
and BatchNorm statistics are replicated. A process holds only the rows of a
global batch that its devices hold (`process_rows`); those need not be one
contiguous range, since `jax.make_mesh` orders devices for the physical topology,
and `shard_batch` places each device's rows wherever they sit.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "host_copies",
    "host_copy",
    "make_mesh",
    "process_rows",
    "put_replicated",
    "replicated",
    "shard_batch",
]


def make_mesh(devices=None) -> Mesh:
    """A one-axis `("data",)` mesh over `devices` (default: all devices of all processes).

    `jax.make_mesh` orders the devices for the physical topology (on TPU pods the
    ring of the interconnect), so a host's devices need not be neighbours in the
    mesh; the input pipeline does not assume they are. The axis is `Auto`: the
    step is `jit` with explicit in/out shardings and XLA places the reductions
    (JAX's default, `Explicit`, would make sharding part of every array's type).
    """
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh((len(devices),), ("data",), axis_types=(AxisType.Auto,), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of an array held whole by every device of the mesh."""
    return NamedSharding(mesh, P())


def process_rows(sharding: NamedSharding, global_len: int, devices=None) -> np.ndarray:
    """The rows of a batch-sharded global array that `devices` hold, sorted.

    Args:
      sharding: how the global batch is laid out (batch on axis 0).
      global_len: the global batch size.
      devices: default: this process's devices (`sharding.addressable_devices`).

    Returns:
      int64 array of global row indices. Not necessarily one contiguous range:
      a mesh may interleave the hosts' devices.

    Examples:
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
      >>> process_rows(NamedSharding(mesh, P("data")), 4).tolist()
      [0, 1, 2, 3]
      >>> process_rows(NamedSharding(mesh, P("data")), 4, devices=[]).tolist()
      []
    """
    devices = set(sharding.addressable_devices if devices is None else devices)
    rows = [
        np.arange(global_len)[index[0]]
        for device, index in sharding.devices_indices_map((global_len,)).items()
        if device in devices
    ]
    return np.unique(np.concatenate(rows)) if rows else np.zeros(0, np.int64)


def shard_batch(mesh: Mesh, batch, *, rows: np.ndarray | None = None, global_size: int = 0):
    """A pytree of host arrays as global arrays sharded on the mesh's `"data"` axis.

    Each device receives exactly its rows, wherever they sit in the mesh.

    Args:
      mesh: a mesh with a `"data"` axis.
      batch: numpy arrays with the batch on axis 0.
      rows: None: every process passes the whole global batch (index batches).
        Else the sorted global rows this process holds (`process_rows`), and
        `batch` holds only those rows, in that order.
      global_size: the global batch size (needed with `rows`).

    Returns:
      The same pytree of `jax.Array`s, of the global batch size.
    """
    sharding = NamedSharding(mesh, P("data"))

    def one(x):
        x = np.asarray(x)
        if rows is None:
            return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

        def local(index):
            return x[np.searchsorted(rows, np.arange(global_size)[index[0]])]

        return jax.make_array_from_callback((global_size, *x.shape[1:]), sharding, local)

    return jax.tree.map(one, batch)


def put_replicated(mesh: Mesh, tree):
    """Host arrays as global arrays replicated on every device of the mesh."""
    sharding = replicated(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda index: x[index]),
        tree,
    )


def host_copy(x) -> np.ndarray:
    """A host copy of an array, also of a replicated global array in multi-process runs.

    Examples:
      >>> host_copy(jax.numpy.ones(2))
      array([1., 1.], dtype=float32)
    """
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        x = x.addressable_data(0)
    return np.asarray(x)


def host_copies(tree):
    """`host_copy` of every leaf of a pytree of replicated arrays."""
    return jax.tree.map(host_copy, tree)

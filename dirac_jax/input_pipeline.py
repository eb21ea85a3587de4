"""Input pipelines: what the training loop consumes, from data on the devices or streamed.

Two inputs implement one small interface, `Input` (`create_input` picks one):

* `InMemoryInput`: a small dataset (CIFAR, MNIST-likes) lives on the devices as
  uint8 arrays; a step receives the global batch's indices and gathers and
  augments inside the jitted step (`data.augment`).
* `StreamedInput`: ImageNet-sized datasets, read by index from an image folder
  or a TFDS ArrayRecord dataset (`data.ImageFolder`, `data.TfdsImages`),
  decoded, randomly cropped and flipped in Grain worker processes
  (`grain.MapDataset(...).mp_prefetch`), and handed to the step as uint8 images.

Both feed the same sequence of global batches to a run on any number of hosts:
the batch of step `t` holds the examples `epoch_permutation(seed, epoch)[...]`
of its position in the epoch, and example `r` of it is augmented with the
generator `example_rng(seed, t, r)`. Neither depends on the number of hosts,
devices or workers. A host decodes only the rows its devices hold
(`process_rows`), which need not be contiguous in the global batch: `jax.make_mesh`
orders devices by the physical topology. `shard_batch` places each device's rows.

Resume: the streamed position is the Grain iterator's own state
(`get_state`/`set_state`, which Grain supports for any number of worker
processes), saved with every checkpoint together with where that iterator
began and how many workers it ran on (`TrainBatches.checkpoint_item`,
`TrainBatches.origin`, see `dirac_jax.checkpoint.save`). `TrainBatches.seek(step)`
places the input at any step without a saved state, by starting a new Grain
iterator at that step (the batches are a function of the step alone). Each
streamed batch carries its step, and a batch whose step is not the expected one
raises.

Grain's worker processes ignore SIGTERM: a scheduler that signals the whole
process group (SLURM, Kubernetes, TPU maintenance) reaches the trainer, which
saves and stops them; a worker whose trainer is gone exits by itself.

Example (the training loop's use)::

  inputs = create_input(config, mesh)
  batches = inputs.train_batches()
  batches.seek(start_step)
  for step in range(start_step, num_steps):
      state, metrics = train_fn(state, *next(batches))
  for args in inputs.eval_batches():
      totals = eval_fn(state, *args)
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dirac_jax import data
from dirac_jax.sharding import process_rows, put_replicated, shard_batch

__all__ = [
    "READ_THREADS",
    "EvalBatchMaker",
    "InMemoryInput",
    "Input",
    "StreamedInput",
    "TrainBatchMaker",
    "TrainBatches",
    "calibration_images",
    "close_iterator",
    "create_input",
    "grain_iterator",
]

# Each Grain process (the main one with num_workers=0) decodes with this many threads; PIL
# releases the GIL while it decodes and resizes, so threads overlap the device step.
READ_THREADS = 2
_READ_BUFFER = 4  # batches a process keeps ready
# Grain's MapDataset needs a length: more steps than any run takes.
_MAX_STEPS = 2**40


class Input(Protocol):
    """What the training loop needs from an input; both inputs implement it.

    Attributes:
      name: the dataset name; selects the normalization statistics (`data.normalize`).
      in_memory: True: steps take `(arrays, idx)` / `(arrays, idx, mask)`; False:
        steps take one batch dict `{"image", "label"[, "mask"]}`.
      augment_in_step: whether the train step applies `data.augment` (streamed
        images arrive augmented).
      num_classes, image_shape, num_train, num_test, steps_per_epoch: as named.
    """

    name: str
    in_memory: bool
    augment_in_step: bool
    num_classes: int
    image_shape: tuple[int, int, int]
    num_train: int
    num_test: int
    steps_per_epoch: int

    def train_batches(self) -> TrainBatches:
        """The training batches from step 0 (`seek` to start elsewhere)."""

    def eval_batches(self) -> Iterator[tuple]:
        """Arguments of the eval step after `state`, covering the test set once."""

    def fold_check_images(self, limit: int) -> np.ndarray:
        """The first `limit` test images, normalized float32 NHWC on the host."""


class TrainBatches(Protocol):
    """An iterator of train-step arguments that can be placed at any step.

    Attributes:
      checkpoint_item: what a checkpoint saves as the data position (a Grain
        iterator), or None when the step alone fixes it.
      origin: with `checkpoint_item`, a JSON-able dict saved beside it: the
        step the iterator began at and its number of worker processes.
      position: the step whose batch `next` returns.
    """

    checkpoint_item: Any
    origin: dict | None
    position: int

    def __next__(self) -> tuple: ...

    def seek(self, step: int) -> None:
        """Makes the next batch the one of `step`."""

    def prepare_restore(self, origin: dict, step: int) -> bool:
        """Rebuilds the iterator that a checkpoint's state (saved with `origin`) restores into.

        Returns False, and changes nothing, if that state does not fit this
        input (another number of workers); the caller then `seek`s.
        """

    def close(self) -> None:
        """Stops any worker processes."""


# ---------------------------------------------------------------------------
# Device-resident small datasets.


class InMemoryInput:
    """A small dataset on the devices; train and eval batches are index arrays."""

    in_memory = True
    augment_in_step = True

    def __init__(self, config, mesh: Mesh):
        name, source = config.dataset.name, config.dataset.source
        data_dir = config.dataset.data_dir
        train = data.prepare(data.load(name, source=source, data_dir=data_dir, split="train"))
        test = data.prepare(data.load(name, source=source, data_dir=data_dir, split="test"))
        self.mesh = mesh
        self.name = name
        self.num_classes = train.num_classes
        self.seed = int(config.seed)
        self.batch_size = int(config.batch_size)
        self.eval_batch_size = int(config.eval_batch_size)
        self.image_shape = tuple(train.images.shape[1:])
        self.num_train, self.num_test = len(train), len(test)
        self.steps_per_epoch = data.steps_per_epoch(self.num_train, self.batch_size)
        # Put on the devices once; every step then moves only a batch of indices.
        self.train = put_replicated(mesh, train)
        self.test = put_replicated(mesh, test)
        self._test_host = test

    def train_batches(self) -> TrainBatches:
        return _IndexBatches(self)

    def eval_batches(self) -> Iterator[tuple]:
        for idx, mask in data.eval_batches(self.num_test, self.eval_batch_size):
            yield (self.test, *shard_batch(self.mesh, (idx, mask)))

    def fold_check_images(self, limit: int) -> np.ndarray:
        return np.asarray(data.normalize(self._test_host.images[:limit], self.name))


class _IndexBatches:
    """`(arrays, idx)` of each step: the position is the step, nothing to checkpoint."""

    checkpoint_item = None
    origin = None

    def __init__(self, inputs: InMemoryInput):
        self._inputs = inputs
        self.seek(0)

    def seek(self, step: int) -> None:
        self.position = step
        self._epoch = None

    def __iter__(self):
        return self

    def __next__(self) -> tuple:
        inputs = self._inputs
        epoch, offset = divmod(self.position, inputs.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = data.epoch_permutation(inputs.seed, epoch, inputs.num_train)
        idx = self._order[offset * inputs.batch_size : (offset + 1) * inputs.batch_size]
        self.position += 1
        return (inputs.train, shard_batch(inputs.mesh, idx))

    def prepare_restore(self, origin: dict, step: int) -> bool:
        del origin, step
        return False

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------
# Streamed datasets on Grain.


@dataclasses.dataclass
class TrainBatchMaker:
    """Step -> this host's rows of that step's global batch (picklable, for Grain workers)."""

    source: Any
    rows: np.ndarray
    seed: int
    batch_size: int
    image_size: int

    def __post_init__(self):
        self._cache = None  # (epoch, its permutation)

    def __getstate__(self):
        return {**self.__dict__, "_cache": None}

    def _order(self, epoch: int) -> np.ndarray:
        # Grain's threads call this concurrently: read and replace the pair in one step each.
        cache = self._cache
        if cache is None or cache[0] != epoch:
            cache = (epoch, data.epoch_permutation(self.seed, epoch, len(self.source)))
            self._cache = cache
        return cache[1]

    def __call__(self, step: int) -> dict:
        epoch, offset = divmod(step, len(self.source) // self.batch_size)
        order = self._order(epoch)
        size = self.image_size
        images = np.empty((len(self.rows), size, size, 3), np.uint8)
        labels = np.empty(len(self.rows), np.int32)
        for i, row in enumerate(self.rows):
            record = self.source[int(order[offset * self.batch_size + row])]
            images[i] = data.train_image(
                record["image"], data.example_rng(self.seed, step, int(row)), size
            )
            labels[i] = record["label"]
        return {"image": images, "label": labels, "step": np.int64(step)}


@dataclasses.dataclass
class EvalBatchMaker:
    """Eval batch index -> this host's rows of it; rows past the split's end are masked."""

    source: Any
    rows: np.ndarray
    batch_size: int
    image_size: int

    def __call__(self, index: int) -> dict:
        size = self.image_size
        positions = index * self.batch_size + self.rows
        mask = positions < len(self.source)
        images = np.zeros((len(self.rows), size, size, 3), np.uint8)
        labels = np.zeros(len(self.rows), np.int32)
        for i in np.flatnonzero(mask):
            record = self.source[int(positions[i])]
            images[i] = data.eval_image(record["image"], size)
            labels[i] = record["label"]
        return {"image": images, "label": labels, "mask": mask}


def grain_iterator(maker, start: int, stop: int, num_workers: int):
    """A Grain iterator of `maker(i)` for `i` in `[start, stop)`, decoded by `num_workers`."""
    import grain

    ds = grain.MapDataset.range(start, stop).map(maker)
    ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=_READ_BUFFER)
    )
    if num_workers > 0:
        _default_grain_worker_flag()
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers), worker_init_fn=_init_worker
        )
    return iter(ds)


def _init_worker(index: int, count: int) -> None:
    """Runs first in each Grain worker process: ignore SIGTERM, exit when orphaned.

    A SIGTERM sent to the whole process group is the trainer's to handle (it
    saves a checkpoint, then stops its workers through Grain); a worker killed
    by it would turn that save into a traceback. The process is Grain's, made
    for this input, so its signal disposition is this module's to set. A
    watchdog thread ends the worker once its parent is gone, as the default
    SIGTERM would have.
    """
    del index, count
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(
        target=_exit_when_orphaned, args=(os.getppid(),), name="orphan-watchdog", daemon=True
    ).start()


def _exit_when_orphaned(parent: int, poll_s: float = 1.0) -> None:
    while os.getppid() == parent:
        time.sleep(poll_s)
    os._exit(0)


def _default_grain_worker_flag() -> None:
    """Gives Grain's worker-profiling flag its default value outside an `absl.app` program.

    Grain's `mp_prefetch` reads that absl flag directly, which fails before absl
    has parsed the command line (notebooks, pytest, other launchers).
    """
    from absl import flags

    name = "grain_enable_multiprocess_worker_profiling"
    if not flags.FLAGS.is_parsed() and name in flags.FLAGS and not flags.FLAGS[name].present:
        flags.FLAGS[name].value = flags.FLAGS[name].default
        flags.FLAGS[name].present = 1


class StreamedInput:
    """Encoded images streamed by index through Grain, decoded and augmented on the hosts.

    Config fields: `dataset.name` (normalization statistics; "imagenet2012"),
    `dataset.source` ("folder" or "tfds"), `dataset.data_dir`,
    `dataset.image_size` (the crop, default 224), `dataset.num_workers` (Grain
    worker processes per host; 0 decodes in the training process's threads),
    `batch_size`, `eval_batch_size`, `seed`.

    `train=False` opens the validation split alone, labelled by the training
    split's class folders (`data.folder_classes`), for evaluation: there are no
    training batches then, and `num_train` and `steps_per_epoch` are 0.
    """

    in_memory = False
    augment_in_step = False

    def __init__(self, config, mesh: Mesh, *, train: bool = True):
        dataset = config.dataset
        self.train_source, classes = None, None
        if train:
            self.train_source = data.open_stream(
                dataset.name, dataset.source, "train", dataset.data_dir
            )
            classes = getattr(self.train_source, "classes", None)
        elif dataset.source == "folder" and dataset.data_dir is not None:
            classes = data.folder_classes(dataset.data_dir)
        self.test_source = data.open_stream(
            dataset.name, dataset.source, "val", dataset.data_dir, classes=classes
        )
        self.mesh = mesh
        self.name = dataset.name
        self.num_classes = (self.train_source if train else self.test_source).num_classes
        self.image_size = int(dataset.image_size)
        self.image_shape = (self.image_size, self.image_size, 3)
        self.num_workers = int(dataset.num_workers)
        self.seed = int(config.seed)
        self.batch_size = int(config.batch_size)
        self.eval_batch_size = int(config.eval_batch_size)
        self.num_train = len(self.train_source) if train else 0
        self.num_test = len(self.test_source)
        self.steps_per_epoch = data.steps_per_epoch(self.num_train, self.batch_size) if train else 0
        sharding = NamedSharding(mesh, P("data"))
        self.train_rows = process_rows(sharding, self.batch_size)
        self.eval_rows = process_rows(sharding, self.eval_batch_size)

    def train_batches(self) -> TrainBatches:
        return _StreamBatches(self)

    def _train_iter(self, first_step: int):
        maker = TrainBatchMaker(
            self.train_source, self.train_rows, self.seed, self.batch_size, self.image_size
        )
        return grain_iterator(maker, first_step, _MAX_STEPS, self.num_workers)

    def eval_batches(self) -> Iterator[tuple]:
        maker = EvalBatchMaker(
            self.test_source, self.eval_rows, self.eval_batch_size, self.image_size
        )
        num_batches = -(-self.num_test // self.eval_batch_size)
        batches = grain_iterator(maker, 0, num_batches, self.num_workers)
        try:
            for batch in batches:
                yield (
                    shard_batch(
                        self.mesh, batch, rows=self.eval_rows, global_size=self.eval_batch_size
                    ),
                )
        finally:
            close_iterator(batches)

    def fold_check_images(self, limit: int) -> np.ndarray:
        count = min(limit, self.num_test)
        images = np.stack(
            [data.eval_image(self.test_source[i]["image"], self.image_size) for i in range(count)]
        )
        return np.asarray(data.normalize(images, self.name))


def calibration_images(config, count: int, *, seed: int = 0) -> np.ndarray:
    """`count` images of a streamed run's training split, as `evaluate` sees an image.

    Drawn without replacement by `seed` (the same rule as the stored datasets'
    draw in `dirac_jax.export.calibration_images`), in index order, and decoded
    with the eval transform (`data.eval_image`: the centre crop at
    `dataset.image_size`), so INT8 activation ranges are calibrated on the
    inputs the exported classifier takes. Reads the folder or TFDS source of
    the config, local or in a bucket, in `_CALIBRATION_THREADS` threads (PIL
    decodes and the bucket reads release the GIL).

    Returns:
      uint8 `(min(count, num_train), size, size, 3)`.

    Raises:
      ValueError: `count < 1`, or the source is unknown.
      data.DataNotFoundError: the training split is not where the config says.
    """
    from concurrent.futures import ThreadPoolExecutor

    if count < 1:
        raise ValueError(f"count (calibration images) must be >= 1, got {count}.")
    dataset = config.dataset
    source = data.open_stream(dataset.name, dataset.source, "train", dataset.data_dir)
    picked = np.random.default_rng(seed).choice(
        len(source), size=min(count, len(source)), replace=False
    )
    size = int(dataset.image_size)

    def decode(index) -> np.ndarray:
        return data.eval_image(source[int(index)]["image"], size)

    with ThreadPoolExecutor(_CALIBRATION_THREADS) as pool:
        return np.stack(list(pool.map(decode, np.sort(picked))))


# Calibration reads a few hundred files once: threads hide a bucket's latency per file.
_CALIBRATION_THREADS = 8


def close_iterator(iterator) -> None:
    """Stops a Grain iterator's worker processes now, not at garbage collection."""
    close = getattr(iterator, "close", None)
    if close is not None:
        close()


class _StreamBatches:
    """Grain's iterator of host batches, checked for its step and placed on the mesh.

    The Grain iterator runs over the steps from `first_step` on (0 for a run
    from scratch, the resume step after a `seek`) and is created on first use,
    so placing it starts no worker process twice.
    """

    def __init__(self, inputs: StreamedInput):
        self._inputs = inputs
        self._iterator = None
        self.first_step = 0
        self.position = 0

    @property
    def checkpoint_item(self):
        """The Grain iterator (its state is the input position a checkpoint saves)."""
        if self._iterator is None:
            self._iterator = self._inputs._train_iter(self.first_step)
        return self._iterator

    @property
    def origin(self) -> dict:
        return {"first_step": self.first_step, "num_workers": self._inputs.num_workers}

    def seek(self, step: int) -> None:
        self.close()
        self.first_step = self.position = step

    def prepare_restore(self, origin: dict, step: int) -> bool:
        if origin.get("num_workers") != self._inputs.num_workers:
            return False
        self.close()
        self.first_step, self.position = int(origin["first_step"]), step
        return True

    def close(self) -> None:
        if self._iterator is not None:
            close_iterator(self._iterator)
            self._iterator = None

    def __iter__(self):
        return self

    def __next__(self) -> tuple:
        batch = next(self.checkpoint_item)
        step = int(batch.pop("step"))
        if step != self.position:
            raise RuntimeError(
                f"the input pipeline is at step {step} but training is at step "
                f"{self.position}: the data position restored with the checkpoint does not "
                "match its training state. Move that checkpoint away, or start a new --workdir."
            )
        self.position += 1
        inputs = self._inputs
        return (
            shard_batch(inputs.mesh, batch, rows=inputs.train_rows, global_size=inputs.batch_size),
        )


def create_input(config, mesh: Mesh) -> Input:
    """`StreamedInput` for the datasets in `data.STREAMED_DATASETS`, else `InMemoryInput`."""
    if config.dataset.name in data.STREAMED_DATASETS:
        return StreamedInput(config, mesh)
    return InMemoryInput(config, mesh)

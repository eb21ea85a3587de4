"""What a training run reports: a progress bar, metrics.jsonl, TensorBoard events and plots.

`MetricWriter` writes every record twice, as one JSON object per line in
`workdir/metrics.jsonl` (easy to read back with `read_metrics`) and as
TensorBoard scalars in `workdir` (tensorboardX). Only process 0 of a
multi-process run writes. The workdir may be local or in a bucket
(`gs://...`, through `etils.epath` and the `gcs` extra). At the end of a run
`plot_curves` and `plot_dirac_scales` turn the records into `curves.png` and
`dirac_scales.png`.

A record is `{"step": int, "kind": "train" | "eval", ...}`; train records carry
`train_loss`, `train_top1`, `learning_rate`, `images_per_s`; eval records
carry `test_loss`, `test_top1`, `test_top5` and, for Dirac-parameterized models, the
per-layer means `dirac_a` and `dirac_b` (`{layer: mean}`, DiracNets fig. 2).
`read_metrics` reads the names of earlier releases as these
(`workdir.current_metric_names`).

Example:
  >>> import tempfile
  >>> workdir = tempfile.mkdtemp()
  >>> writer = MetricWriter(workdir, tensorboard=False)
  >>> writer.write({"step": 10, "kind": "train", "train_loss": 2.0})
  >>> writer.close()
  >>> read_metrics(workdir)
  [{'step': 10, 'kind': 'train', 'train_loss': 2.0}]
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
from typing import Any

import numpy as np
import tqdm

from dirac_jax import _paths
from dirac_jax.sharding import host_copy
from dirac_jax.workdir import METRICS_FILE, current_metric_names

__all__ = [
    "MetricWriter",
    "ProgressBar",
    "dirac_scale_means",
    "layer_group",
    "own_info_only",
    "plot_curves",
    "plot_dirac_scales",
    "pyplot",
    "read_metrics",
]


# This package's folder, as its modules' code objects name their files.
_PACKAGE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "")


@functools.lru_cache(maxsize=256)
def _in_package(pathname: str) -> bool:
    path = os.path.abspath(pathname)
    if path.startswith(_PACKAGE_DIR):
        return True
    # A module imported through a symlinked or relative sys.path entry.
    return os.path.realpath(path).startswith(os.path.realpath(_PACKAGE_DIR))


def own_info_only(record: logging.LogRecord) -> bool:
    """A log filter for the command lines: this package's INFO lines, everyone's warnings.

    Libraries log a lot at INFO (orbax: every stage of every save; jax: the
    backends it did not find), most of them through absl's one logger, so a
    logger's name does not tell them apart: a record is this package's when
    the file that logged it lies in this package's folder (not merely under
    some folder named dirac_jax, such as a checkout holding its `.venv`). Add
    it to the absl handler of a program, e.g.
    `absl.logging.get_absl_handler().addFilter(own_info_only)`; the library
    itself never installs it.
    """
    return record.levelno >= logging.WARNING or _in_package(record.pathname)


def _natural_key(name: str):
    # "group0/block10" sorts after "group0/block9": compare the numbers as numbers.
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def dirac_scale_means(params: Any) -> dict[str, dict[str, float]]:
    """Per-layer means of the Dirac scales `a` and `b`, in depth order (DiracNets fig. 2).

    Every subtree of `params` holding both an `"a"` and a `"b"` leaf is a Dirac
    parameterized conv (v2 eq. 5: per-channel vectors; v1 eq. 4: scalars).

    Args:
      params: a params pytree of nested dicts (replicated global arrays are fine).

    Returns:
      `{"a": {layer: mean}, "b": {layer: mean}}`, layers named by their path
      (e.g. `"group0/block0/conv"`) and ordered by depth; empty dicts if the
      model has no Dirac convs.

    Examples:
      >>> import numpy as np
      >>> dirac_scale_means({"g": {"block10": {"a": np.ones(2), "b": np.zeros(2)},
      ...                          "block9": {"a": np.full(2, 3.0), "b": np.ones(2)}}})
      {'a': {'g/block9': 3.0, 'g/block10': 1.0}, 'b': {'g/block9': 1.0, 'g/block10': 0.0}}
    """
    found: dict[str, tuple[float, float]] = {}

    def visit(tree, path):
        if not hasattr(tree, "items"):
            return
        if "a" in tree and "b" in tree:
            found["/".join(path)] = tuple(float(np.mean(host_copy(tree[k]))) for k in ("a", "b"))
        for key, sub in tree.items():
            visit(sub, (*path, str(key)))

    visit(params, ())
    names = sorted(found, key=_natural_key)
    return {"a": {n: found[n][0] for n in names}, "b": {n: found[n][1] for n in names}}


class MetricWriter:
    """Writes records to `workdir/metrics.jsonl` and TensorBoard; a no-op when disabled.

    On resume from step `start_step`, records of later steps (written before an
    unclean stop) are dropped from metrics.jsonl and purged from TensorBoard, so
    each step appears once.

    A bucket object cannot be appended to: in a `gs://` workdir each record
    rewrites metrics.jsonl whole (one upload per log step), and tensorboardX
    uploads its event file through google-cloud-storage, which honours
    `STORAGE_EMULATOR_HOST` like gcsfs.

    Args:
      workdir: the run directory, local or `gs://...`.
      start_step: the step training starts from (0, or the restored step).
      enabled: False on all but process 0.
      tensorboard: also write TensorBoard events.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        start_step: int = 0,
        enabled: bool = True,
        tensorboard: bool = True,
    ):
        self.enabled = enabled
        self.path = _paths.resolve(workdir) / METRICS_FILE
        self._file = None
        self._lines = None  # a bucket's metrics.jsonl, rewritten whole at each record
        self._tb = None
        if not enabled:
            return
        kept = [json.dumps(r) + "\n" for r in read_metrics(workdir) if r["step"] <= start_step]
        if _paths.is_uri(self.path):
            self._lines = kept
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("w")
            self._file.writelines(kept)
        if tensorboard:
            from tensorboardX import SummaryWriter

            # purge_step drops events of steps >= start_step left by an unclean stop.
            purge = start_step + 1 if start_step else None
            self._tb = SummaryWriter(os.fspath(self.path.parent), purge_step=purge)

    def write(self, record: dict) -> None:
        """Appends one record (needs "step" and "kind"); nested dicts become TB scalar groups."""
        if not self.enabled:
            return
        line = json.dumps(record, allow_nan=True) + "\n"
        if self._lines is not None:
            self._lines.append(line)
            self.path.write_text("".join(self._lines))
        else:
            self._file.write(line)
            self._file.flush()
        if self._tb is not None:
            step = int(record["step"])
            for key, value in record.items():
                if key in ("step", "kind"):
                    continue
                if isinstance(value, dict):
                    for layer, v in value.items():
                        self._tb.add_scalar(f"{key}/{layer}", v, step)
                else:
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """The records of `workdir/metrics.jsonl` in order (an empty list if there is none).

    A torn last line (the process was killed mid-write) is skipped. Metric
    names of earlier releases read as today's (`workdir.current_metric_names`).
    """
    path = _paths.resolve(workdir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(current_metric_names(json.loads(line)))
        except json.JSONDecodeError:
            continue
    return records


class ProgressBar:
    """A tqdm bar over training steps with images/s and ETA; silent when not on a TTY.

    Args:
      total: the last step.
      initial: the step training starts from.
      enabled: False on all but process 0.
      images_per_step: the global batch size.
    """

    def __init__(
        self, total: int, initial: int = 0, enabled: bool = True, images_per_step: int = 1
    ):
        # Counted in steps but shown in images (unit_scale), so tqdm's own rate is images/s
        # and its ETA is live between log steps. disable=None turns it off when stderr is
        # not a terminal (logs, CI).
        self._bar = tqdm.tqdm(
            total=total,
            initial=initial,
            unit="img",
            unit_scale=images_per_step,
            dynamic_ncols=True,
            disable=None if enabled else True,
        )

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def set_postfix(self, **values) -> None:
        self._bar.set_postfix(values, refresh=False)

    def close(self) -> None:
        self._bar.close()


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def _figure(ncols: int, width: float = 5.0):
    plt = pyplot()
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, 3.8), squeeze=False)
    return plt, fig, axes[0]


def plot_curves(records: list[dict], path: str | os.PathLike) -> None:
    """Train and test loss and top-1 accuracy against step, saved as an image at `path`."""
    plt, fig, (ax_loss, ax_acc) = _figure(2)
    for kind, prefix, style in (("train", "train", "-"), ("eval", "test", "o-")):
        rows = [r for r in records if r.get("kind") == kind]
        steps = [r["step"] for r in rows]
        for ax, metric in ((ax_loss, "loss"), (ax_acc, "top1")):
            values = [r.get(f"{prefix}_{metric}", math.nan) for r in rows]
            if rows:
                ax.plot(steps, values, style, label=prefix, markersize=3)
    for ax, name in ((ax_loss, "loss"), (ax_acc, "top-1 accuracy")):
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_loss.set_yscale("log")
    fig.tight_layout()
    _paths.save_figure(fig, path, dpi=100)
    plt.close(fig)


def layer_group(layer: str) -> str:
    """`"group1/block3/conv"` -> `"group1"`; layers outside a group form one group."""
    head = layer.split("/", 1)[0]
    return head if head.startswith("group") else "other"


def plot_dirac_scales(
    records: list[dict], path: str | os.PathLike, steps_per_epoch: int | None = None
) -> bool:
    """Per-layer mean `a` and `b` against training time, as DiracNets v2 fig. 2.

    One column per group of blocks, `a` on top and `b` below; one line per
    layer, its colour the darker the deeper the layer sits in its group (the
    figure's convention). The x axis is the epoch when `steps_per_epoch` is
    given, else the step.

    Returns:
      False (and writes nothing) when no record has Dirac scales, e.g. for a WRN.
    """
    evals = [r for r in records if r.get("kind") == "eval" and r.get("dirac_a")]
    if not evals:
        return False
    layers = list(evals[-1]["dirac_a"])
    groups: dict[str, list[str]] = {}
    for layer in layers:
        groups.setdefault(layer_group(layer), []).append(layer)
    x = [r["step"] / steps_per_epoch if steps_per_epoch else r["step"] for r in evals]
    plt = pyplot()
    fig, axes = plt.subplots(
        2, len(groups), figsize=(3.6 * len(groups), 5.6), squeeze=False, sharex=True
    )
    for col, (group, members) in enumerate(groups.items()):
        cmap = plt.get_cmap(("Blues", "Oranges", "Greens", "Purples", "Greys")[col % 5])
        for row, (key, label) in enumerate((("dirac_a", "mean a"), ("dirac_b", "mean b"))):
            ax = axes[row][col]
            for i, layer in enumerate(members):
                values = [r[key].get(layer, math.nan) for r in evals]
                shade = 0.35 + 0.65 * (i + 1) / len(members)
                ax.plot(x, values, color=cmap(shade), linewidth=1.2)
            ax.set_title(f"{group}: {label}" if row == 0 else "", fontsize=9)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            if row == 1:
                ax.set_xlabel("epoch" if steps_per_epoch else "step")
    fig.suptitle("per-layer mean a and b (darker: deeper in the group)", fontsize=10)
    fig.tight_layout()
    _paths.save_figure(fig, path, dpi=100)
    plt.close(fig)
    return True

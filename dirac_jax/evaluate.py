r"""Evaluate a trained workdir on its test split, unfolded and folded.

  python -m dirac_jax.evaluate --workdir=W
  python -m dirac_jax.evaluate --workdir=W --onnx=model.onnx

Restores only the parameters and BatchNorm statistics of the latest checkpoint
(not the optimizer state) and loads only the test split. Prints, and writes to
`W/eval.json`, top-1 and top-5 accuracy and the mean cross-entropy of the
trained net (in the run's compute dtype, as during training) and of its
float32 fold (DiracNets v2 sec. 1), which is what `dirac_jax.export` writes.
Small datasets are fed as stored (uint8) through `workdir.preprocess`, the
input side the exported models carry; ImageNet's validation split comes from
the training input pipeline (`input_pipeline.StreamedInput`: Grain, the
center crop, no TensorFlow).

The metrics are the trainer's own (`steps.classification_metrics`: strict
top-k on float32 logits), so `eval.json` and the run's `summary.json` agree,
bfloat16 runs included. Any number of devices serves: the batch (by default
the run's `eval_batch_size`) is rounded up to a multiple of this host's
devices, sharded over them, and the parameters are replicated on them. The
workdir may be local or in a bucket (`gs://...`, the `gcs` extra).

With `--onnx`, an exported ONNX classifier of the run (float32 or INT8,
`dirac_jax.export`) is run by onnxruntime on the same stored test images and
reported beside the JAX nets, with the share of its top-1 predictions that
agree with the float32 fold's.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dirac_jax import (
    _paths,
    config_schema,
    data,
    fold,
    input_pipeline,
    models,
    sharding,
    steps,
    workdir,
)

__all__ = [
    "batch_for_devices",
    "evaluate_workdir",
    "main",
    "onnx_logits",
]

# Names of the previous release -> the one name now; they raise an AttributeError naming it.
_RENAMED = {"metrics_of": "dirac_jax.steps.classification_metrics"}


def __getattr__(name: str):
    if name in _RENAMED:
        raise AttributeError(f"dirac_jax.evaluate.{name} was removed: use {_RENAMED[name]}.")
    raise AttributeError(f"module 'dirac_jax.evaluate' has no attribute {name!r}")


def batch_for_devices(batch_size: int, num_devices: int) -> int:
    """`batch_size` rounded up to a multiple of `num_devices` (the mesh shards it evenly).

    Examples:
      >>> batch_for_devices(500, 8), batch_for_devices(100, 16), batch_for_devices(3, 1)
      (504, 112, 3)
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    return -(-batch_size // num_devices) * num_devices


def _small_batches(config, batch_size: int, mesh) -> Iterator[tuple]:
    """(uint8 stored images, labels, mask) batches of the whole test split, the last padded."""
    del mesh  # host arrays; the jitted step places them
    source = config.dataset.get("source", "auto") or "auto"
    test = data.load(
        config.dataset.name, source=source, data_dir=config.dataset.get("data_dir"), split="test"
    )
    for idx, mask in data.eval_batches(len(test), batch_size):
        yield test.images[idx], test.labels[idx], mask


def _imagenet_batches(config, batch_size: int, mesh) -> Iterator[tuple]:
    """The validation split streamed by the training input pipeline (Grain, uint8 crops).

    Only that split is opened: a folder tree's `train/` is listed for its class
    names, none of its images.
    """
    config = config.copy_and_resolve_references()
    config.eval_batch_size = batch_size
    inputs = input_pipeline.StreamedInput(config, mesh, train=False)
    for (batch,) in inputs.eval_batches():
        yield batch["image"], batch["label"], batch["mask"]


def onnx_logits(session, images: np.ndarray) -> np.ndarray:
    """Logits of an onnxruntime session of an exported classifier on uint8 images."""
    (inp,) = session.get_inputs()
    return session.run(None, {inp.name: np.asarray(images)})[0]


def _onnx_session(onnx_path):
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError(
            f"evaluating an ONNX file needs onnxruntime ({e}): pip install 'dirac_jax[onnx]'."
        ) from e
    path = _paths.resolve(onnx_path)  # local, or in a bucket: onnxruntime gets the bytes
    if not path.is_file():
        raise FileNotFoundError(
            f"no ONNX file {path}; write one with python -m dirac_jax.export --format=onnx."
        )
    try:
        return ort.InferenceSession(path.read_bytes(), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types for a bad file
        raise ValueError(f"onnxruntime cannot load {path} as ONNX: {e}") from e


def evaluate_workdir(
    path: str | os.PathLike,
    *,
    batch_size: int | None = None,
    onnx: str | pathlib.Path | None = None,
) -> dict:
    """Evaluates the run in `path` on its test split; writes `path/eval.json`.

    Args:
      path: a training workdir, local or `gs://...`.
      batch_size: images per forward pass, rounded up to a multiple of this
        host's devices (`batch_for_devices`); None: the run's
        `eval_batch_size`, so the logits are those of the trainer's eval.

    Returns:
      `{"step", "dataset", "unfolded": {...}, "folded": {...} or None,
      "symmetrized": {...} or None}`, each with `top1`, `top5`, `loss` (mean
      cross-entropy) and `count`. `folded` is the float32 net of
      `fold.deployable` (a chain, or a WRN/ResNet with its kernels computed
      once), None for a model that does not fold (PlainNet); `symmetrized`,
      the net with its symmetric convs projected by `param.symmetrize`, is
      None unless the run trained with the soft symmetry penalty
      (`config.symmetry_penalty > 0`). With `onnx`, also `"onnx"`: the ONNX
      file's metrics, its path and `agree`, the share of its top-1 predictions
      equal to the float32 fold's (the unfolded net's if the model does not
      fold).

    Raises:
      workdir.WorkdirError, checkpoint.CheckpointError: as `workdir.load`.
      data.DataNotFoundError: the test split is not where the config says.
      FileNotFoundError, ValueError: `onnx` is missing or not loadable.
    """
    session = None if onnx is None else _onnx_session(onnx)
    model, variables, config, step = workdir.load_run(path)
    mesh = sharding.make_mesh(jax.local_devices())
    if batch_size is None:
        batch_size = int(config.get("eval_batch_size") or config.batch_size)
    batch_size = batch_for_devices(batch_size, mesh.size)
    imagenet = config.dataset.name in data.STREAMED_DATASETS
    if imagenet:
        prepare: Callable = lambda x: data.normalize(x, config.dataset.name)
    else:
        prepare = lambda x: workdir.preprocess(x, config)
    nets = {"unfolded": lambda v, x: model.apply(v, x, train=False)}
    params = {"unfolded": variables}
    if config.model.name in config_schema.FOLDABLE_MODELS:
        nets["folded"], params["folded"] = fold.deployable(model, variables)
    if config.get("symmetry_penalty", 0.0) > 0:
        # Projected inside the jitted step: the trainer's eval jits the projection on its own.
        nets["symmetrized"] = lambda v, x: model.apply(
            {**v, "params": models.symmetrize_params(model, v["params"])}, x, train=False
        )
        params["symmetrized"] = variables

    reference = "folded" if "folded" in nets else "unfolded"
    metrics = steps.classification_metrics  # the trainer's, so eval.json and summary.json agree
    replicated, batched = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    params = jax.device_put(params, replicated)  # one copy on each of this host's devices

    @functools.partial(jax.jit, in_shardings=(replicated, *[batched] * 3), out_shardings=replicated)
    def step_fn(all_params, images, labels, mask):
        x = prepare(images)
        return {k: metrics(nets[k](all_params[k], x), labels, mask) for k in nets}

    @jax.jit
    def onnx_step(all_params, images, labels, mask, logits):
        out = metrics(logits, labels, mask)
        expected = nets[reference](all_params[reference], prepare(images))
        same = jnp.argmax(logits, -1) == jnp.argmax(expected, -1)
        return {**out, "agree": jnp.sum(same & mask)}

    def eval_fn(all_params, images, labels, mask):
        out = step_fn(all_params, images, labels, mask)
        if session is not None:
            logits = onnx_logits(session, images)
            out["onnx"] = onnx_step(all_params, images, labels, mask, logits)
        return out

    batches = _imagenet_batches if imagenet else _small_batches
    # The trainer's evaluation loop; `agree` comes back as a share of the images.
    totals = steps.evaluate_batches(eval_fn, params, batches(config, batch_size, mesh))
    result = {
        "step": step,
        "dataset": config.dataset.name,
        "model": config.model.name,
        **{net: totals.get(net) for net in ("unfolded", "folded", "symmetrized")},
        "batch_size": batch_size,
        "devices": mesh.size,
    }
    if session is not None:
        result["onnx"] = {**totals["onnx"], "file": str(onnx)}
        result["onnx_reference"] = reference
    (_paths.resolve(path) / workdir.EVAL_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _line(name: str, m: dict) -> str:
    return (
        f"{name:>9}: top-1 {m['top1']:.4f}  top-5 {m['top5']:.4f}  loss {m['loss']:.4f}  "
        f"({m['count']} images)"
    )


def _define_flags():
    """`(--batch_size, --onnx)`, defined in absl's FLAGS when the command line runs."""
    from absl import flags

    from dirac_jax import _cli

    def define():
        _cli.shared_flags()
        flags.declare_key_flag("workdir")  # required here
        flags.declare_key_flag("verbose")
        batch_size = flags.DEFINE_integer(
            "batch_size",
            None,
            "Images per forward pass, rounded up to a multiple of the devices "
            "(default: the run's eval_batch_size).",
            lower_bound=1,
        )
        onnx = flags.DEFINE_string(
            "onnx", None, "Also evaluate this exported ONNX model (onnxruntime; local or gs://...)."
        )
        return batch_size, onnx

    return _cli.define_once(__name__, define)


def main(argv) -> None:
    """What `python -m dirac_jax.evaluate` runs once absl has parsed the flags."""
    from dirac_jax import _cli

    batch_size, onnx = _define_flags()
    path = _cli.shared_flags()[0].value
    result = _cli.run_workdir_command(
        argv, lambda: evaluate_workdir(path, batch_size=batch_size.value, onnx=onnx.value)
    )
    print(f"{result['model']} on {result['dataset']} test, step {result['step']}:")
    for name in ("unfolded", "folded", "symmetrized"):
        if result[name] is not None:
            print(_line(name, result[name]))
    if "onnx" in result:
        m = result["onnx"]
        agree = f"{m['agree']:.4f} of top-1 as the {result['onnx_reference']} net"
        print(f"{_line('onnx', m)}  agree {agree}  [{m['file']}]")
    print(f"written to {_paths.resolve(path) / workdir.EVAL_FILE}", flush=True)


if __name__ == "__main__":
    import sys

    from dirac_jax import _cli, xla_cpu

    xla_cpu.apply()  # before JAX starts its CPU backend
    _cli.run_command("dirac_jax.evaluate", main, _define_flags, sys.argv)

r"""Evaluate a trained workdir on its test split, unfolded and folded.

  python -m dirac_jax.evaluate --workdir=W

Restores only the parameters and BatchNorm statistics of the latest checkpoint
(not the optimizer state) and loads only the test split. Prints, and writes to
`W/eval.json`, top-1 and top-5 accuracy and the mean cross-entropy of the
trained net (in the run's compute dtype, as during training) and of its
float32 fold (DiracNets v2 sec. 1), which is what `dirac_jax.export` writes.
Small datasets are fed as stored (uint8) through `workdir.preprocess`, the
input side the exported models carry; ImageNet's validation split comes from
the training input pipeline (`input_pipeline.StreamedInput`: Grain, the
center crop, no TensorFlow).
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dirac_jax import data, fold, input_pipeline, models, train, workdir
from dirac_jax._cli import run_workdir_command

__all__ = ["EVAL_FILE", "evaluate_workdir", "main", "metrics_of"]

EVAL_FILE = "eval.json"


def metrics_of(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict:
    """Sums of loss, top-1 and top-5 hits over the unmasked examples of a batch."""
    k = min(5, logits.shape[-1])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    top_k = jax.lax.top_k(logits, k)[1]
    top1 = top_k[:, 0] == labels
    topk = jnp.any(top_k == labels[:, None], axis=-1)
    return {
        "loss_sum": jnp.sum(jnp.where(mask, losses, 0.0)),
        "top1": jnp.sum(top1 & mask),
        "top5": jnp.sum(topk & mask),
        "count": jnp.sum(mask),
    }


def _small_batches(config, batch_size: int) -> Iterator[tuple]:
    """(uint8 stored images, labels, mask) batches of the whole test split, the last padded."""
    source = config.dataset.get("source", "auto") or "auto"
    test = data.load(
        config.dataset.name, source=source, data_dir=config.dataset.get("data_dir"), split="test"
    )
    for idx, mask in data.eval_batches(len(test), batch_size):
        yield test.images[idx], test.labels[idx], mask


def _imagenet_batches(config, batch_size: int) -> Iterator[tuple]:
    """The validation split streamed by the training input pipeline (Grain, uint8 crops)."""
    config = config.copy_and_resolve_references()
    config.eval_batch_size = batch_size
    inputs = input_pipeline.StreamedInput(config, train.make_mesh())
    for (batch,) in inputs.eval_batches():
        yield batch["image"], batch["label"], batch["mask"]


def _summarize(totals: dict) -> dict:
    count = int(totals["count"])
    return {
        "top1": float(totals["top1"]) / count,
        "top5": float(totals["top5"]) / count,
        "loss": float(totals["loss_sum"]) / count,
        "count": count,
    }


def evaluate_workdir(path: str | pathlib.Path, *, batch_size: int = 500) -> dict:
    """Evaluates the run in `path` on its test split; writes `path/eval.json`.

    Args:
      path: a training workdir.
      batch_size: images per forward pass.

    Returns:
      `{"step", "dataset", "unfolded": {...}, "folded": {...} or None,
      "symmetrized": {...} or None}`, each with `top1`, `top5`, `loss` (mean
      cross-entropy) and `count`. `folded` is the float32 net of
      `fold.folded_apply` (a chain, or a WRN/ResNet with its kernels computed
      once), None for a model that does not fold (PlainNet); `symmetrized`,
      the net with its symmetric convs projected by `param.symmetrize`, is
      None unless the run trained with the soft symmetry penalty
      (`config.symmetry_penalty > 0`).

    Raises:
      workdir.WorkdirError, checkpoint.CheckpointError: as `workdir.load`.
      data.DataNotFoundError: the test split is not where the config says.
    """
    model, variables, config, step = workdir.load_run(path)
    imagenet = config.dataset.name == train.IMAGENET
    if imagenet:
        prepare: Callable = lambda x: data.normalize(x, config.dataset.name)
    else:
        prepare = lambda x: workdir.preprocess(x, config)
    nets = {"unfolded": lambda v, x: model.apply(v, x, train=False)}
    params = {"unfolded": variables}
    if config.model.name in train.FOLDABLE_MODELS:
        nets["folded"], params["folded"] = fold.folded_apply(
            model.clone(dtype=jnp.float32), variables
        )
    if config.get("symmetry_penalty", 0.0) > 0:
        projected = jax.jit(lambda p: models.symmetrize_params(model, p))(variables["params"])
        params["symmetrized"] = {**variables, "params": projected}
        nets["symmetrized"] = nets["unfolded"]

    @jax.jit
    def step_fn(all_params, images, labels, mask):
        x = prepare(images)
        return {k: metrics_of(nets[k](all_params[k], x), labels, mask) for k in nets}

    batches = _imagenet_batches if imagenet else _small_batches
    totals = None
    for images, labels, mask in batches(config, batch_size):
        out = step_fn(params, images, labels, mask)
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.tree.map(np.asarray, totals)
    result = {
        "step": step,
        "dataset": config.dataset.name,
        "model": config.model.name,
        "unfolded": _summarize(totals["unfolded"]),
        "folded": _summarize(totals["folded"]) if "folded" in totals else None,
        "symmetrized": _summarize(totals["symmetrized"]) if "symmetrized" in totals else None,
    }
    (pathlib.Path(path) / EVAL_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _line(name: str, m: dict) -> str:
    return (
        f"{name:>9}: top-1 {m['top1']:.4f}  top-5 {m['top5']:.4f}  loss {m['loss']:.4f}  "
        f"({m['count']} images)"
    )


def main(argv=None) -> None:
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "A training workdir (config.json and checkpoints/).")
    flags.DEFINE_integer("batch_size", 500, "Images per forward pass.")
    flags.mark_flags_as_required(["workdir"])

    def run(argv):
        f = flags.FLAGS
        result = run_workdir_command(
            argv, lambda: evaluate_workdir(f.workdir, batch_size=f.batch_size)
        )
        print(f"{result['model']} on {result['dataset']} test, step {result['step']}:")
        for name in ("unfolded", "folded", "symmetrized"):
            if result[name] is not None:
                print(_line(name, result[name]))
        print(f"written to {pathlib.Path(f.workdir) / EVAL_FILE}", flush=True)

    app.run(run, argv)


if __name__ == "__main__":
    from dirac_jax import xla_cpu

    xla_cpu.apply()  # before JAX starts its CPU backend
    main()

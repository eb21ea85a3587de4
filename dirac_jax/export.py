r"""Fold a trained workdir and write it as a deployable model.

  python -m dirac_jax.export --workdir=W --format=onnx --out=model.onnx
  python -m dirac_jax.export --workdir=W --format=stablehlo --out=model.stablehlo
  python -m dirac_jax.export --workdir=W --format=reference --out=diracnet.pth

The net is folded in float32 (DiracNets v2 sec. 1: the Dirac parameterization
and BatchNorm become plain conv filters and biases; a residual WRN or ResNet
keeps its shortcuts and BNs, and its symmetric or `I + W` kernels become plain
kernels, `fold.fold_kernels`), then written:

* `onnx`: the whole classifier, uint8 NHWC images at the stored size in (for
  ImageNet the eval crop), logits out; padding and normalization inside the
  graph (`dirac_jax.onnx_export`: `to_onnx` for chains, `residual_to_onnx` for
  WRN and ResNet).
* `stablehlo` (every foldable net, residual ones too): the same classifier
  serialized with `jax.export`, any batch size
  (`dirac_jax.interop.export_stablehlo`; load with `load_stablehlo`).
* `reference` (DiracNet chains): the state dict of the published PyTorch
  `DiracNet` module (ImageNet stem only; `dirac_jax.interop.export_reference_folded`), as a
  `torch.save` file, or `.npz` when `--out` ends so. It holds weights only:
  the PyTorch module expects normalized float input.
"""

from __future__ import annotations

import pathlib

import jax.numpy as jnp
import numpy as np

from dirac_jax import data, fold, interop, onnx_export, train, workdir
from dirac_jax._cli import run_workdir_command

__all__ = ["FORMATS", "classifier", "export_workdir", "fold_workdir", "main"]

FORMATS = ("onnx", "stablehlo", "reference")


def fold_workdir(path: str | pathlib.Path):
    """The trained net of a workdir, folded in float32 (`fold.folded_apply`).

    Returns:
      `(apply, folded, config)`: `apply(folded, images)` computes the logits of
      normalized images. `folded` is a `fold.FoldedNet` for a chain (DiracNet,
      MobileNet) and the variables of the kernel-folded net for a residual one
      (WRN, ResNet: `fold.fold_kernels`).

    Raises:
      ValueError: the run's model does not fold (PlainNet).
      workdir.WorkdirError, checkpoint.CheckpointError: as `workdir.load`.
    """
    model, variables, config = _load_foldable(path)
    apply, folded = fold.folded_apply(model, variables)
    return apply, folded, config


def _load_foldable(path):
    """`(model in float32, variables, config)` of a run whose model folds; else ValueError."""
    config = workdir.read_config(path)  # fail before reading a checkpoint that cannot fold
    if config.model.name not in train.FOLDABLE_MODELS:
        raise ValueError(
            f"the run in {path} trained a {config.model.name!r}, which does not fold; folding, "
            f"and so export, needs one of {train.FOLDABLE_MODELS}. Evaluate it unfolded with "
            "python -m dirac_jax.evaluate."
        )
    model, variables, config = workdir.load(path)
    return model.clone(dtype=jnp.float32), variables, config


def classifier(apply, folded, config):
    """`uint8 images at the stored size -> logits` of a folded net: the exported function."""
    return lambda images: apply(folded, workdir.preprocess(images, config))


def _pad(config) -> tuple[tuple[int, int], tuple[int, int]]:
    (h, w, _), (th, tw, _) = workdir.input_shape(config), workdir.model_input_shape(config)
    dh, dw = th - h, tw - w
    return ((dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2))


def _write_reference(folded, out: pathlib.Path) -> None:
    state_dict = interop.export_reference_folded(folded)
    if out.suffix == ".npz":
        np.savez(out, **state_dict)
        return
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"writing {out} with torch.save needs PyTorch ({e}): pip install 'dirac_jax[torch]', "
            "or give --out a .npz name."
        ) from e
    torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, out)


def export_workdir(path: str | pathlib.Path, fmt: str, out: str | pathlib.Path) -> pathlib.Path:
    """Folds the run in `path` and writes it to `out` in format `fmt`.

    Args:
      path: a training workdir.
      fmt: one of `FORMATS` (module docstring).
      out: the file to write; its folder is created.

    Returns:
      The path written.

    Raises:
      ValueError: an unknown format, a model that does not fold, or (reference)
        a net that is not the published ImageNet chain.
      ImportError: onnx (format onnx) or torch (reference, not `.npz`) missing.
      workdir.WorkdirError, checkpoint.CheckpointError: as `workdir.load`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {FORMATS}.")
    config = workdir.read_config(path)
    chain = config.model.name in train.CHAIN_MODELS
    residual = config.model.name in train.FOLDABLE_MODELS and not chain
    if residual and fmt == "reference":
        raise ValueError(
            f"the run in {path} trained a {config.model.name!r}, a residual net; the reference "
            "format is the published PyTorch DiracNet. Write it with --format=onnx or "
            "--format=stablehlo."
        )
    model, variables, config = _load_foldable(path)
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        mean, std = data.MEAN_STD[config.dataset.name]
        side = {"input_shape": workdir.input_shape(config), "pad": _pad(config)}
        side.update(mean=mean, std=std)  # the uint8 input side of either writer
        if residual:  # the residual writer folds the kernels itself
            proto = onnx_export.residual_to_onnx(model, variables, **side)
        else:
            proto = onnx_export.to_onnx(fold.folded_apply(model, variables)[1], **side)
        out.write_bytes(proto.SerializeToString())
        return out
    apply, folded = fold.folded_apply(model, variables)
    if fmt == "stablehlo":
        blob = interop.export_stablehlo(
            classifier(apply, folded, config), (1, *workdir.input_shape(config)), dtype=jnp.uint8
        )
        out.write_bytes(blob)
    else:
        _write_reference(folded, out)
    return out


def main(argv=None) -> None:
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "A training workdir (config.json and checkpoints/).")
    flags.DEFINE_enum("format", "onnx", FORMATS, "What to write.")
    flags.DEFINE_string("out", None, "The file to write.")
    flags.mark_flags_as_required(["workdir", "out"])

    def run(argv):
        f = flags.FLAGS
        written = run_workdir_command(argv, lambda: export_workdir(f.workdir, f.format, f.out))
        print(f"wrote the folded {f.format} model of {f.workdir} to {written}", flush=True)

    app.run(run, argv)


if __name__ == "__main__":
    from dirac_jax import xla_cpu

    xla_cpu.apply()  # before JAX starts its CPU backend
    main()

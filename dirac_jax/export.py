r"""Fold a trained workdir and write it as a deployable model.

  python -m dirac_jax.export --workdir=W --format=onnx --out=model.onnx
  python -m dirac_jax.export --workdir=W --format=onnx --quantize=int8 --out=model.int8.onnx
  python -m dirac_jax.export --workdir=W --format=stablehlo --out=model.stablehlo
  python -m dirac_jax.export --workdir=W --format=reference --out=diracnet.pth

The net is folded in float32 (DiracNets v2 sec. 1: the Dirac parameterization
and BatchNorm become plain conv filters and biases; a residual WRN or ResNet
keeps its shortcuts and BNs, and its symmetric or `I + W` kernels become plain
kernels, `fold.fold_kernels`), then written:

* `onnx`: the whole classifier, uint8 NHWC images at the stored size in (for
  ImageNet the eval crop), logits out; padding and normalization inside the
  graph (`dirac_jax.formats.onnx_graph`: `to_onnx` for chains, `residual_to_onnx` for
  WRN and ResNet).
  With `--quantize=int8` the ONNX model is quantized by onnxruntime (QDQ:
  int8 weights, int8 activations with percentile ranges calibrated on
  `--calibration_images` training images; `--per_tensor` for one weight
  scale per tensor). A
  DiracNet is then folded with its identity kept apart (`fold.fold(...,
  identity_apart=True)`): INT8 conv of `s b W_norm` plus the exact
  float32 `s a x`, so the identity's tap does not set the weights' int8 step,
  and the block outputs that the identities carry stay float32
  (`--stream=int8` rounds them too; `dirac_jax.quantize`).
* `stablehlo` (every foldable net, residual ones too): the same classifier
  serialized with `jax.export`, any batch size
  (`dirac_jax.formats.stablehlo.export_stablehlo`; load with `load_stablehlo`), for the
  `--platforms` it names (default: this host's), e.g. `--platforms=cpu,cuda`
  or `--platforms=tpu` for an artifact written on a CPU host that loads on
  the accelerator.
* `reference` (DiracNet chains): the state dict of the published PyTorch
  `DiracNet` module (ImageNet stem only;
  `dirac_jax.formats.state_dict.export_reference_folded`), as a `torch.save`
  file, or `.npz` when `--out` ends so. It holds weights only: the PyTorch
  module expects normalized float input.

The workdir, and `--out`, may be local or in a bucket (`gs://...`, the `gcs`
extra).
"""

from __future__ import annotations

import io
import os

import jax.numpy as jnp
import numpy as np

from dirac_jax import _paths, config_schema, data, fold, formats, workdir
from dirac_jax import quantize as quantize_lib

__all__ = [
    "FORMATS",
    "PLATFORMS",
    "QUANTIZE",
    "calibration_images",
    "classifier",
    "export_workdir",
    "fold_workdir",
    "main",
    "onnx_model",
]

FORMATS = ("onnx", "stablehlo", "reference")
# What `--platforms` of a StableHLO export may name (`jax.export`'s platform names).
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
QUANTIZE = ("none", "int8")


def fold_workdir(path: str | os.PathLike):
    """The trained net of a workdir, folded in float32 (`fold.deployable`).

    Returns:
      `(apply, folded, config)`: `apply(folded, images)` computes the logits of
      normalized images. `folded` is a `folded.FoldedNet` for a chain (DiracNet,
      MobileNet) and the variables of the kernel-folded net for a residual one
      (WRN, ResNet: `fold.fold_kernels`).

    Raises:
      ValueError: the run's model does not fold (PlainNet).
      workdir.WorkdirError, checkpoint.CheckpointError: as `workdir.load`.
    """
    model, variables, config = _load_foldable(path)
    apply, folded = fold.deployable(model, variables)
    return apply, folded, config


def _load_foldable(path):
    """`(model, variables, config)` of a run whose model folds; else ValueError.

    The model keeps the run's dtype: every fold computes in float32 whatever it
    (`fold.deployable`, `fold.fold`, `fold.fold_kernels`).
    """
    config = workdir.read_config(path)  # fail before reading a checkpoint that cannot fold
    if config.model.name not in config_schema.FOLDABLE_MODELS:
        raise ValueError(
            f"the run in {path} trained a {config.model.name!r}, which does not fold; folding, and "
            f"so export, needs one of {config_schema.FOLDABLE_MODELS}. Evaluate it unfolded with "
            "python -m dirac_jax.evaluate."
        )
    return workdir.load(path)


def classifier(apply, folded, config):
    """`uint8 images at the stored size -> logits` of a folded net: the exported function."""
    return lambda images: apply(folded, workdir.preprocess(images, config))


def _pad(config) -> tuple[tuple[int, int], tuple[int, int]]:
    (h, w, _), (th, tw, _) = workdir.input_shape(config), workdir.model_input_shape(config)
    dh, dw = th - h, tw - w
    return ((dh // 2, dh - dh // 2), (dw // 2, dw - dw // 2))


def _write_reference(folded, out) -> None:
    state_dict = formats.state_dict.export_reference_folded(folded)
    buffer = io.BytesIO()  # numpy and torch write local files only; epath writes either
    if out.suffix == ".npz":
        np.savez(buffer, **state_dict)
        out.write_bytes(buffer.getvalue())
        return
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"writing {out} with torch.save needs PyTorch ({e}): pip install 'dirac_jax[torch]', "
            "or give --out a .npz name."
        ) from e
    torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, buffer)
    out.write_bytes(buffer.getvalue())


def onnx_model(model, variables, config, *, identity_apart: bool = False):
    """The float32 ONNX classifier (`onnx.ModelProto`) of a loaded foldable run.

    `identity_apart` folds a DiracNet's block convs with their identity apart
    (`fold.fold`); it changes nothing for other nets.
    """
    mean, std = data.MEAN_STD[config.dataset.name]
    side = {"input_shape": workdir.input_shape(config), "pad": _pad(config)}
    side.update(mean=mean, std=std)  # the uint8 input side of either writer
    if config.model.name not in config_schema.CHAIN_MODELS:  # the residual writer folds the kernels
        return formats.onnx_graph.residual_to_onnx(model, variables, **side)
    folded = fold.fold(model, variables, identity_apart=identity_apart)
    return formats.onnx_graph.to_onnx(folded, **side)


def calibration_images(config, count: int, *, seed: int = 0) -> np.ndarray:
    """`count` uint8 images of the run's training split, drawn at random, as the export takes them.

    A small dataset's stored images; a streamed one's (ImageNet folder or
    ArrayRecord, local or in a bucket) decoded with the eval centre crop that
    `evaluate` applies (`input_pipeline.calibration_images`). Either way the
    draw is a function of `seed` alone.

    Raises:
      ValueError: `count < 1`.
      data.DataNotFoundError: the training split is not where the config says.
    """
    if count < 1:
        raise ValueError(f"count (calibration images) must be >= 1, got {count}.")
    if config.dataset.name in data.STREAMED_DATASETS:
        from dirac_jax import input_pipeline

        return input_pipeline.calibration_images(config, count, seed=seed)
    source = config.dataset.get("source", "auto") or "auto"
    split = data.load(
        config.dataset.name, source=source, data_dir=config.dataset.get("data_dir"), split="train"
    )
    rng = np.random.default_rng(seed)
    picked = rng.choice(len(split.images), size=min(count, len(split.images)), replace=False)
    return np.asarray(split.images[np.sort(picked)])


def export_workdir(
    path: str | os.PathLike,
    fmt: str,
    out: str | os.PathLike,
    *,
    quantize: quantize_lib.Int8Options | None = None,
    platforms: tuple[str, ...] | None = None,
) -> os.PathLike:
    """Folds the run in `path` and writes it to `out` in format `fmt`.

    Args:
      path: a training workdir.
      fmt: one of `FORMATS` (module docstring).
      out: the file to write; its folder is created.
      quantize: format onnx only: write the INT8 QDQ model of
        `dirac_jax.quantize.quantize_onnx` with these options
        (`quantize.Int8Options()`: the defaults), identity apart for
        DiracNets; None: float32.
      platforms: format stablehlo: the `PLATFORMS` the artifact runs on; None:
        this host's backend.

    Returns:
      The path written.

    Raises:
      ValueError: an unknown format or platform, platforms for a format other
        than stablehlo, quantize for a format other than onnx, a model that
        does not fold, or (reference) a net that is not the published ImageNet
        chain.
      ImportError: onnx (format onnx) or torch (reference, not `.npz`) missing.
      workdir.WorkdirError, checkpoint.CheckpointError: as `workdir.load`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; expected one of {FORMATS}.")
    if quantize is not None and not isinstance(quantize, quantize_lib.Int8Options):
        raise TypeError(f"quantize must be a quantize.Int8Options or None, got {quantize!r}.")
    if quantize is not None and fmt != "onnx":
        raise ValueError(f"INT8 quantization writes ONNX; export format 'onnx', not {fmt!r}.")
    if platforms is not None:
        platforms = tuple(platforms)
        unknown = [p for p in platforms if p not in PLATFORMS]
        if fmt != "stablehlo" or unknown or not platforms:
            raise ValueError(
                f"platforms={platforms}: a 'stablehlo' export runs on any of {PLATFORMS}, e.g. "
                f"('cpu', 'cuda') (got format {fmt!r})."
            )
    config = workdir.read_config(path)
    chain = config.model.name in config_schema.CHAIN_MODELS
    residual = config.model.name in config_schema.FOLDABLE_MODELS and not chain
    if residual and fmt == "reference":
        raise ValueError(
            f"the run in {path} trained a {config.model.name!r}, a residual net; the reference "
            "format is the published PyTorch DiracNet. Write it as 'onnx' or 'stablehlo'."
        )
    model, variables, config = _load_foldable(path)
    out = _paths.resolve(out)
    if not _paths.is_uri(out):  # a bucket has no folders to create
        out.parent.mkdir(parents=True, exist_ok=True)
    if quantize is not None:
        images = calibration_images(config, quantize.calibration_images, seed=config.seed)
        proto = onnx_model(model, variables, config, identity_apart=True)
        return quantize_lib.quantize_onnx(proto, out, images, **quantize.quantize_kwargs())
    if fmt == "onnx":
        out.write_bytes(onnx_model(model, variables, config).SerializeToString())
        return out
    apply, folded = fold.deployable(model, variables)
    if fmt == "stablehlo":
        blob = formats.stablehlo.export_stablehlo(
            classifier(apply, folded, config),
            (1, *workdir.input_shape(config)),
            dtype=jnp.uint8,
            platforms=platforms,
        )
        out.write_bytes(blob)
    else:
        _write_reference(folded, out)
    return out


def _define_flags() -> dict:
    """The command line's flags, defined in absl's FLAGS when it runs (once per process)."""
    from absl import flags

    from dirac_jax import _cli

    def define():
        _cli.shared_flags()
        flags.declare_key_flag("workdir")  # required here
        flags.declare_key_flag("verbose")
        return {
            "format": flags.DEFINE_enum("format", "onnx", FORMATS, "What to write."),
            "out": flags.DEFINE_string("out", None, "The file to write (local or gs://...)."),
            "platforms": flags.DEFINE_list(
                "platforms",
                None,
                f"stablehlo: where the artifact runs, of {PLATFORMS} (default: here).",
            ),
            "quantize": flags.DEFINE_enum(
                "quantize", "none", QUANTIZE, "int8: an INT8 (QDQ) ONNX model."
            ),
            "calibration_images": flags.DEFINE_integer(
                "calibration_images", 512, "Training images that calibrate INT8.", lower_bound=1
            ),
            "per_tensor": flags.DEFINE_boolean(
                "per_tensor", False, "INT8: one weight scale per tensor, not per channel."
            ),
            "calibration": flags.DEFINE_enum(
                "calibration", "percentile", quantize_lib.CALIBRATIONS, "INT8 activation ranges."
            ),
            "activations": flags.DEFINE_enum(
                "activations", "int8", quantize_lib.ACTIVATIONS, "INT8 activations' type."
            ),
            "stream": flags.DEFINE_enum(
                "stream",
                "float",
                quantize_lib.STREAMS,
                "INT8 DiracNet: keep the block outputs its identities carry in float32 (only "
                "the convs' inputs and outputs are rounded), or round them to int8 too.",
            ),
            "reduce_range": flags.DEFINE_boolean(
                "reduce_range",
                False,
                "INT8: 7-bit weights, for x86 CPUs without VNNI, whose int8 kernels can saturate.",
            ),
        }

    return _cli.define_once(__name__, define)


def main(argv) -> None:
    """What `python -m dirac_jax.export` runs once absl has parsed the flags."""
    from absl import app

    from dirac_jax import _cli

    f = {name: holder.value for name, holder in _define_flags().items()}
    path = _cli.shared_flags()[0].value
    if f["out"] is None:
        raise app.UsageError("--out is required: the file to write, e.g. --out=model.onnx.")
    if os.path.isdir(f["out"]):
        raise app.UsageError(
            f"--out={f['out']} is a folder; give the file to write, e.g. "
            f"--out={os.path.join(f['out'], 'model.onnx')}."
        )
    int8_flags = ("calibration_images", "per_tensor", "calibration", "activations", "stream")
    int8_flags += ("reduce_range",)
    if f["quantize"] == "none":
        given = [n for n in int8_flags if _flag_given(n)]
        if given:
            raise app.UsageError(f"--{given[0]} is an INT8 option; add --quantize=int8.")
    if f["quantize"] != "none" and f["format"] != "onnx":
        raise app.UsageError("--quantize=int8 writes ONNX; use it with --format=onnx.")
    if f["platforms"] is not None and f["format"] != "stablehlo":
        raise app.UsageError("--platforms is for --format=stablehlo.")
    unknown = [p for p in f["platforms"] or () if p not in PLATFORMS]
    if unknown or f["platforms"] == []:
        raise app.UsageError(
            f"--platforms={','.join(f['platforms'])}: name some of {PLATFORMS}, e.g. "
            "--platforms=cpu,cuda."
        )
    options = None
    if f["quantize"] == "int8":
        options = quantize_lib.Int8Options(
            calibration_images=f["calibration_images"],
            per_channel=not f["per_tensor"],
            calibration=f["calibration"],
            activations=f["activations"],
            stream=f["stream"],
            reduce_range=f["reduce_range"],
        )

    def work():
        with _cli.quantizer_chatter_hidden():
            return export_workdir(
                path, f["format"], f["out"], quantize=options, platforms=f["platforms"]
            )

    written = _cli.run_workdir_command(argv, work)
    kind = f["format"] if options is None else f"{f['format']} int8"
    print(f"wrote the folded {kind} model of {path} to {written}", flush=True)


def _flag_given(name: str) -> bool:
    from absl import flags

    return flags.FLAGS[name].present


if __name__ == "__main__":
    import sys

    from dirac_jax import _cli, xla_cpu

    xla_cpu.apply()  # before JAX starts its CPU backend
    _cli.run_command("dirac_jax.export", main, _define_flags, sys.argv)

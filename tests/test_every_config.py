"""Every shipped config goes the whole way, at tiny sizes: what a user runs after training.

For each `configs/*.py` (listed from the tree, so a new file is covered):
train -> evaluate -> export (ONNX, INT8 and StableHLO, for the models that fold) ->
evaluate the exported ONNX files -> `dirac_jax.load`. Only the sizes change (depth,
width, steps, batches, the streamed crop) and the data comes from here: synthetic
stand-ins of the small datasets, and for the ImageNet configs a JPEG tree made from
Debian's Fashion-MNIST, decoded by `--grain-workers` Grain processes: 2 by default, as
each stage that reads images starts its own workers; `pytest --grain-workers=32` runs the
configs' own count. One ImageNet config goes through the command lines (`main`, `export
--quantize=int8`, `evaluate --onnx`); the rest calls the same library functions here.

Properties: evaluate's numbers are the summary's, the float32 ONNX file predicts as the
fold (logits within 1e-4), the INT8 file mostly does, and the loaded model computes the
fold's logits.
"""

import json
import math
import os
import pathlib
import subprocess
import sys
import time

import _multihost_worker
import jax.numpy as jnp
import numpy as np
import pytest

import dirac_jax
from dirac_jax import config_schema, data, evaluate, export, quantize, train, workdir
from dirac_jax.formats import stablehlo
from dirac_jax.reproduce import load_config
from dirac_jax.reproduce._grid import apply_overrides

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__")
# The config taken through the command lines: the headline deploy, an ImageNet DiracNet.
CLI_CONFIG = "imagenet_dirac"
_multihost_worker.use_compilation_cache()
NUM_STEPS = 4
CALIBRATION_IMAGES = 64
# The INT8 file's share of the fold's top-1 predictions. Measured on these tiny nets (4
# steps, random stand-in data for the small datasets, so many near-ties): 0.88 (DiracNet
# v1) to 1.0; a broken graph or calibration lands near chance.
INT8_AGREEMENT = 0.8


class _Clock:
    """Prints the seconds of each stage (`pytest -s` shows where the time goes)."""

    def __init__(self, name: str):
        self.name, self.start = name, time.perf_counter()

    def __call__(self, stage: str) -> None:
        now = time.perf_counter()
        print(f"{self.name}: {stage} {now - self.start:.1f} s", flush=True)
        self.start = now


def _depth(config) -> int:
    """The smallest depth of the config's model family (its own if already smaller)."""
    name, own = config.model.name, int(config.model.depth)
    if config.dataset.name in data.STREAMED_DATASETS:
        return min(own, 18)  # the ImageNet DiracNet and ResNet start at 18
    if name == "plainnet":
        return min(own, 5)
    if config.model.get("block") == "bottleneck":
        return min(own, 11)  # 9n+2
    return min(own, 10)  # 6n+4


def _overrides(config, image_tree, grain_workers: int) -> dict:
    """The fields that make a run tiny, as `--config.FIELD` values."""
    streamed = config.dataset.name in data.STREAMED_DATASETS
    tiny = {
        "model.depth": _depth(config),
        "model.width": 0.125 if streamed else 0.25,
        "num_train_steps": NUM_STEPS,
        "log_every_steps": NUM_STEPS,
        "eval_every_steps": NUM_STEPS,
        "checkpoint_every_steps": 0,
        "fold_check_images": 16,
    }
    if streamed:
        tiny.update({
            "dataset.source": "folder", "dataset.data_dir": str(image_tree),
            "dataset.image_size": 32, "dataset.num_workers": grain_workers,
            "batch_size": 8, "eval_batch_size": 16,
        })  # fmt: skip
    else:
        tiny.update({"batch_size": 16, "eval_batch_size": 512})
        # 1024 train and 256 test images: every small dataset's reader is tested elsewhere,
        # and Fashion-MNIST's 10,000 test images would be most of this test's time.
        tiny["dataset.source"] = "synthetic"
    return tiny


def _cli(module, *args, timeout=600):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-m", module, *args]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _top1(summary: dict) -> float:
    return summary["test_top1"]


def _test_images(config, count: int = 32) -> np.ndarray:
    """The first `count` uint8 test images as the exported classifier takes them."""
    if config.dataset.name in data.STREAMED_DATASETS:
        val = data.ImageFolder(
            config.dataset.data_dir, "val", data.folder_classes(config.dataset.data_dir)
        )
        size = int(config.dataset.image_size)
        return np.stack(
            [data.eval_image(val[i]["image"], size) for i in range(min(count, len(val)))]
        )
    test = data.load(config.dataset.name, source=config.dataset.source, split="test")
    return np.asarray(test.images[:count])


def _num_classes(config) -> int:
    if config.dataset.name in data.STREAMED_DATASETS:
        return len(data.folder_classes(config.dataset.data_dir))
    return data.NUM_CLASSES[config.dataset.name]


def _onnx_logits(path, images) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(
        pathlib.Path(path).read_bytes(), providers=["CPUExecutionProvider"]
    )
    return evaluate.onnx_logits(session, images)


def test_every_config_file_is_listed():
    assert len(CONFIGS) >= 12 and CLI_CONFIG in CONFIGS


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_config_goes_from_training_to_deployment(name, image_tree, tmp_path, request):
    config_file = ROOT / "configs" / f"{name}.py"
    config = load_config(config_file)
    overrides = _overrides(config, image_tree, request.config.getoption("--grain-workers"))
    apply_overrides(config, overrides)
    cli = name == CLI_CONFIG
    run = tmp_path / "run"
    foldable = config.model.name in config_schema.FOLDABLE_MODELS

    clock = _Clock(name)
    # Train.
    if cli:
        flags = [f"--config.{k}={v}" for k, v in overrides.items()]
        _cli("dirac_jax.main", f"--config={config_file}", f"--workdir={run}", *flags)
        summary = json.loads((run / workdir.SUMMARY_FILE).read_text())
    else:
        summary = train.train_and_evaluate(config, run)
    assert summary["step"] == NUM_STEPS and math.isfinite(summary["test_loss"]), summary

    clock("train")
    # Export the fold: ONNX (float32 and INT8) and StableHLO.
    out = {kind: tmp_path / f"model.{kind}" for kind in ("onnx", "int8.onnx", "stablehlo")}
    if foldable:
        if cli:  # the headline deploy, INT8 of an ImageNet run, through the command line
            _cli(
                "dirac_jax.export", f"--workdir={run}", "--format=onnx", "--quantize=int8",
                f"--out={out['int8.onnx']}", f"--calibration_images={CALIBRATION_IMAGES}",
            )  # fmt: skip
        else:
            int8 = quantize.Int8Options(calibration_images=CALIBRATION_IMAGES)
            export.export_workdir(run, "onnx", out["int8.onnx"], quantize=int8)
        export.export_workdir(run, "onnx", out["onnx"])
        export.export_workdir(run, "stablehlo", out["stablehlo"])
    clock("export")

    # Evaluate from the checkpoint, with the INT8 file beside the JAX nets (one pass: the
    # float32 ONNX file's logits are compared with the fold's below, which is stronger).
    onnx = [f"--onnx={out['int8.onnx']}"] if foldable else []
    if cli:
        _cli("dirac_jax.evaluate", f"--workdir={run}", *onnx)
        result = json.loads((run / workdir.EVAL_FILE).read_text())
    else:
        result = evaluate.evaluate_workdir(run, onnx=out["int8.onnx"] if foldable else None)
    assert result["unfolded"]["top1"] == _top1(summary)  # the trainer's eval, recomputed
    assert result["unfolded"]["count"] == summary["num_test_examples"]
    assert (result["folded"] is not None) == foldable
    if foldable:
        assert result["onnx_reference"] == "folded"
        assert result["onnx"]["count"] == summary["num_test_examples"]
        print(f"{name}: INT8 agrees with the fold on {result['onnx']['agree']:.4f}")
        assert result["onnx"]["agree"] >= INT8_AGREEMENT, result["onnx"]
    clock("evaluate --onnx")

    model, variables, loaded = dirac_jax.load(run)
    images = _test_images(loaded)
    if not foldable:
        logits = model.apply(variables, workdir.preprocess(images, loaded), train=False)
        assert logits.shape == (len(images), _num_classes(loaded)) and np.isfinite(logits).all()
        return
    # dirac_jax.load: the loaded net (in float32) computes the fold's logits, which the
    # StableHLO artifact and the float32 ONNX file carry.
    folded_logits = np.asarray(stablehlo.load_stablehlo(out["stablehlo"].read_bytes())(images))
    logits = np.asarray(
        model.clone(dtype=jnp.float32).apply(
            variables, workdir.preprocess(images, loaded), train=False
        )
    )
    scale = np.abs(folded_logits).max()
    np.testing.assert_allclose(logits, folded_logits, atol=1e-4 * max(scale, 1.0))
    np.testing.assert_allclose(
        _onnx_logits(out["onnx"], images), folded_logits, atol=1e-4 * max(scale, 1.0)
    )
    clock("load")

"""INT8 export of a streamed (ImageNet-layout) run: calibrated on its training stream.

The calibration images are training files through the eval transform (`data.eval_image`,
the centre crop `evaluate` applies), drawn by the run's seed alone, from a folder tree,
a TFDS ArrayRecord dataset, or a bucket (tests/_gcs.py); the export command line writes
an INT8 model of a small trained DiracNet that agrees with its float32 ONNX export.
"""

import json
import os
import pathlib
import subprocess
import sys

import _image_data
import numpy as np
import onnx
import pytest
from etils import epath

from dirac_jax import data, export, input_pipeline, quantize, train, workdir

ROOT = pathlib.Path(__file__).resolve().parents[1]
SIZE = 32


def _config(tree, source="folder"):
    config = _image_data.tiny_imagenet_config(tree, num_steps=1)
    config.dataset.source = source
    return config


def _eval_images_of(source) -> dict[bytes, str]:
    """Every image of `source` through the eval transform, keyed by its bytes."""
    return {
        data.eval_image(source[i]["image"], SIZE).tobytes(): source[i]["label"]
        for i in range(len(source))
    }


@pytest.mark.parametrize("count", [1, 7, 24, 100])
def test_calibration_images_are_distinct_training_files_through_the_eval_crop(image_tree, count):
    config = _config(image_tree)
    train_split = data.ImageFolder(image_tree, "train")
    val_split = data.ImageFolder(image_tree, "val", train_split.classes)
    train_images = _eval_images_of(train_split)
    assert len(train_images) == len(train_split) == 24  # the tree's files decode apart

    images = input_pipeline.calibration_images(config, count, seed=3)
    assert images.dtype == np.uint8 and images.shape == (min(count, 24), SIZE, SIZE, 3)
    keys = [image.tobytes() for image in images]
    assert len(set(keys)) == len(keys)  # drawn without replacement
    assert all(k in train_images for k in keys)  # the training split, eval-cropped
    assert not set(keys) & set(_eval_images_of(val_split))  # never the split evaluated on
    if count >= len(train_split):
        assert set(keys) == set(train_images)


def test_calibration_draw_is_a_function_of_the_seed(image_tree):
    config = _config(image_tree)
    a = input_pipeline.calibration_images(config, 8, seed=0)
    np.testing.assert_array_equal(a, input_pipeline.calibration_images(config, 8, seed=0))
    # The export's entry point takes the streamed path: same images for the same seed.
    np.testing.assert_array_equal(a, export.calibration_images(config, 8, seed=0))
    b = input_pipeline.calibration_images(config, 8, seed=1)
    assert {x.tobytes() for x in a} != {x.tobytes() for x in b}


def test_calibration_reads_arrayrecord_and_a_bucket_alike(image_tree, tfds_imagenet, gcs):
    local = input_pipeline.calibration_images(_config(image_tree), 10, seed=5)
    # TFDS lists the same files in its own order: the same set of images when all are drawn.
    tfds_config = _config(tfds_imagenet, source="tfds")
    everything = input_pipeline.calibration_images(tfds_config, 1000, seed=5)
    assert {x.tobytes() for x in everything} == set(
        _eval_images_of(data.ImageFolder(image_tree, "train"))
    )
    assert len(input_pipeline.calibration_images(tfds_config, 10, seed=5)) == 10

    bucket = epath.Path(gcs.root("tree"))
    _copy_tree(image_tree, bucket)
    remote = input_pipeline.calibration_images(_config(str(bucket)), 10, seed=5)
    np.testing.assert_array_equal(remote, local)


def test_bad_count_is_one_line(image_tree):
    with pytest.raises(ValueError, match=r"count \(calibration images\) must be >= 1"):
        input_pipeline.calibration_images(_config(image_tree), 0)


def _copy_tree(src, dst: epath.Path) -> None:
    src = pathlib.Path(src)
    for path in src.rglob("*"):
        if path.is_file():
            (dst / path.relative_to(src).as_posix()).write_bytes(path.read_bytes())


def _env(**extra):
    pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": pythonpath, **extra}


def _cli(module, *args):
    cmd = [sys.executable, "-m", module, *args]
    result = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _val_images(tree, size=SIZE):
    classes = data.folder_classes(tree)
    val = data.ImageFolder(tree, "val", classes)
    return np.stack([data.eval_image(val[i]["image"], size) for i in range(len(val))])


def _logits(blob: bytes, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


@pytest.fixture(scope="module")
def streamed_run(image_tree, tmp_path_factory):
    """A DiracNet-18 (width 0.125, 32 px) trained 8 steps on the JPEG tree."""
    path = tmp_path_factory.mktemp("streamed_run")
    config = _image_data.tiny_imagenet_config(image_tree, num_steps=8)
    config.learning_rate = 0.05
    train.train_and_evaluate(config, path)
    return path


@pytest.mark.slow
def test_export_int8_of_a_streamed_run_agrees_with_its_float32_onnx(
    streamed_run, image_tree, tmp_path
):
    f32, int8 = tmp_path / "model.onnx", tmp_path / "model.int8.onnx"
    _cli("dirac_jax.export", f"--workdir={streamed_run}", "--format=onnx", f"--out={f32}")
    printed = _cli(
        "dirac_jax.export", f"--workdir={streamed_run}", "--format=onnx", "--quantize=int8",
        f"--out={int8}", "--calibration_images=16",
    ).stdout  # fmt: skip
    assert "onnx int8" in printed
    model = onnx.load(int8)
    assert any(t.data_type == onnx.TensorProto.INT8 for t in model.graph.initializer)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8

    images = _val_images(image_tree)
    reference = _logits(f32.read_bytes(), images)
    logits = _logits(int8.read_bytes(), images)
    # 12 images, 8 steps: a loose bar that a broken calibration (e.g. the train crops'
    # range, or images at another size) still fails through the logit error.
    assert quantize.agreement(logits, reference) >= 0.75
    assert quantize.logit_error(logits, reference) < 0.2


@pytest.mark.slow
def test_export_int8_of_a_streamed_run_in_a_bucket(streamed_run, image_tree, gcs):
    # The pod's case: workdir and images in a bucket, the INT8 file written there and
    # evaluated from there beside the JAX model.
    root = epath.Path(gcs.root("streamed"))
    tree = root / "images"
    _copy_tree(image_tree, tree)
    run = root / "run"
    _copy_tree(streamed_run, run)
    config = json.loads((run / workdir.CONFIG_FILE).read_text())
    config["dataset"]["data_dir"] = str(tree)
    (run / workdir.CONFIG_FILE).write_text(json.dumps(config))

    int8 = f"{root}/export/model.int8.onnx"
    _cli(
        "dirac_jax.export", f"--workdir={run}", "--format=onnx", "--quantize=int8",
        f"--out={int8}", "--calibration_images=16",
    )  # fmt: skip
    local = epath.Path(streamed_run) / "local.int8.onnx"
    _cli(
        "dirac_jax.export", f"--workdir={streamed_run}", "--format=onnx", "--quantize=int8",
        f"--out={local}", "--calibration_images=16",
    )  # fmt: skip
    # Same training files, same seed: the same calibration, so the same INT8 model.
    images = _val_images(image_tree)
    np.testing.assert_array_equal(
        _logits(epath.Path(int8).read_bytes(), images), _logits(local.read_bytes(), images)
    )
    _cli("dirac_jax.evaluate", f"--workdir={run}", f"--onnx={int8}")
    result = json.loads((run / workdir.EVAL_FILE).read_text())
    assert result["onnx"]["count"] == len(images) and result["onnx"]["file"] == int8
    assert result["onnx"]["agree"] >= 0.75

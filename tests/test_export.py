"""Tests for a trained workdir as a product: load, evaluate, fold and export (ONNX, StableHLO).

One real run (DiracNet-10-0.25 on Fashion-MNIST, 40 steps of the quickstart
config) is trained once per session by `dirac_jax.train.train_and_evaluate`;
the exported models are then run by their own clients (onnxruntime, jax.export)
on the real test images.
"""

import json
import os
import pathlib
import subprocess
import sys

import _multihost_worker
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dirac_jax import data, evaluate, export, fold, models, train, workdir
from dirac_jax.configs import fashion_mnist_dirac
from dirac_jax.formats import onnx_graph, stablehlo

ort = pytest.importorskip("onnxruntime")

ROOT = pathlib.Path(__file__).resolve().parents[1]
FASHION_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
_multihost_worker.use_compilation_cache()


def _skip_without_fashion_mnist():
    # Only the tests of a trained run need the dataset (an accelerator host may lack it).
    if not FASHION_DIR.is_dir():
        pytest.skip("dataset-fashion-mnist not installed")


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    """A finished quickstart-config run, small enough to train in seconds."""
    _skip_without_fashion_mnist()
    config = fashion_mnist_dirac.get_config()
    config.model.width = 0.25
    config.num_train_steps = 40
    config.learning_rate = 0.3
    config.eval_every_steps = 40
    config.log_every_steps = 20
    path = tmp_path_factory.mktemp("run")
    train.train_and_evaluate(config, path)
    return path


@pytest.fixture(scope="session")
def test_split():
    _skip_without_fashion_mnist()
    return data.load("fashion_mnist", split="test")


def _summary(path) -> dict:
    return json.loads((path / workdir.SUMMARY_FILE).read_text())


def _cli(module, *args):
    # The checkout first; a PYTHONPATH set outside stays (launch/device_check.sh puts the
    # wheels a host lacked there).
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )


def test_load_restores_the_trained_model(run_dir, test_split):
    model, variables, config = workdir.load(run_dir)
    assert config.model.name == "diracnet" and config.model.width == 0.25
    assert sorted(variables) == ["batch_stats", "params"]
    x = workdir.preprocess(test_split.images[:512], config)
    logits = model.apply(variables, x, train=False)
    assert logits.shape == (512, 10)
    # The input side of the classifier is the trainer's: data.prepare, then data.normalize.
    prepared = data.normalize(data.prepare(test_split).images[:512], "fashion_mnist")
    np.testing.assert_array_equal(x, prepared)


def test_evaluate_cli_writes_eval_json_matching_the_summary(run_dir):
    result = _cli("dirac_jax.evaluate", f"--workdir={run_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "unfolded: top-1" in result.stdout and "folded: top-1" in result.stdout
    written = json.loads((run_dir / workdir.EVAL_FILE).read_text())
    summary = _summary(run_dir)
    for net in ("unfolded", "folded"):
        m = written[net]
        assert m["count"] == 10_000
        assert m["top1"] == summary["test_top1"]
        assert m["top1"] <= m["top5"] <= 1.0
        np.testing.assert_allclose(m["loss"], summary["test_loss"], rtol=1e-4)
    assert written["step"] == summary["step"] == 40


def test_evaluate_reads_neither_the_training_split_nor_the_optimizer_state(run_dir, monkeypatch):
    load = data.load

    def test_split_only(name, *, split="train", **kwargs):
        assert split == "test", "evaluate must not load the training split"
        return load(name, split=split, **kwargs)

    monkeypatch.setattr(data, "load", test_split_only)
    result = evaluate.evaluate_workdir(run_dir)
    assert result["unfolded"]["top1"] == _summary(run_dir)["test_top1"]
    variables, step = workdir.restore_variables(run_dir)
    assert sorted(variables) == ["batch_stats", "params"] and step == 40


@pytest.mark.accelerator
def test_onnx_export_in_onnxruntime_equals_jax_and_the_summary(run_dir, test_split, tmp_path):
    out = tmp_path / "model.onnx"
    result = _cli("dirac_jax.export", f"--workdir={run_dir}", "--format=onnx", f"--out={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.type == "tensor(uint8)" and inp.shape[1:] == [28, 28, 1]
    # The whole classifier: stored uint8 images in, logits out.
    onnx_logits = session.run(None, {inp.name: test_split.images})[0]
    model, variables, config = workdir.load(run_dir)
    jax_logits = jax.jit(lambda v, x: model.apply(v, workdir.preprocess(x, config), train=False))(
        variables, test_split.images
    )
    np.testing.assert_allclose(onnx_logits, jax_logits, atol=1e-4, rtol=0)
    accuracy = float(np.mean(onnx_logits.argmax(-1) == test_split.labels))
    assert accuracy == _summary(run_dir)["test_top1"]


def test_stablehlo_export_is_the_whole_classifier(run_dir, test_split, tmp_path):
    out = export.export_workdir(run_dir, "stablehlo", tmp_path / "model.stablehlo")
    call = stablehlo.load_stablehlo(out.read_bytes())
    images = test_split.images[:300]
    _, _, config = export.fold_workdir(run_dir)
    model, variables, _ = workdir.load(run_dir)
    expected = model.apply(variables, workdir.preprocess(images, config), train=False)
    np.testing.assert_allclose(call(jnp.asarray(images)), expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(call(jnp.asarray(images[:7])), expected[:7], atol=1e-4, rtol=0)


def test_reference_export_names_what_it_needs(run_dir, tmp_path):
    with pytest.raises(ValueError, match="ImageNet stem"):
        export.export_workdir(run_dir, "reference", tmp_path / "sd.npz")
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export.export_workdir(run_dir, "tflite", tmp_path / "m")


def _command_in_process(module, *argv):
    """`python -m MODULE ARGV` in this process: the flags defined and parsed, then `module.main`."""
    from absl import flags
    from absl.testing import flagsaver

    module._define_flags()
    with flagsaver.flagsaver():
        flags.FLAGS.unparse_flags()
        rest = flags.FLAGS([module.__name__, *argv])
        return module.main(rest)


def test_export_and_evaluate_define_their_flags_when_they_run(tmp_path, capsys):
    from absl import app, flags

    # --help lists what each command defines, and the shared --workdir.
    for module, names in (
        (export, {"workdir", "format", "out", "quantize", "calibration_images", "per_tensor"}),
        (evaluate, {"workdir", "batch_size", "onnx"}),
    ):
        module._define_flags()
        key = {f.name for f in flags.FLAGS.get_key_flags_for_module(module.__name__)}
        assert names <= key, (module.__name__, key)
    with pytest.raises(app.UsageError, match="--workdir is required"):
        _command_in_process(evaluate)
    with pytest.raises(app.UsageError, match="--out is required"):
        _command_in_process(export, f"--workdir={tmp_path}")
    with pytest.raises(app.UsageError, match="unexpected arguments: extra"):
        _command_in_process(evaluate, f"--workdir={tmp_path}", "extra")
    with pytest.raises(SystemExit) as exit_info:
        _command_in_process(export, f"--workdir={tmp_path}", f"--out={tmp_path / 'm.onnx'}")
    assert exit_info.value.code == 1 and "Train first" in capsys.readouterr().err
    assert flags.FLAGS["workdir"].value is None  # flagsaver put the flags back


def test_int8_options_are_one_value_checked_when_built(tmp_path):
    from dirac_jax import quantize

    assert quantize.Int8Options().quantize_kwargs() == {
        "per_channel": True, "calibration": "percentile", "activations": "int8",
        "stream": "float", "reduce_range": False,
    }  # fmt: skip
    with pytest.raises(ValueError, match="unknown stream 'int4'; expected one of"):
        quantize.Int8Options(stream="int4")
    with pytest.raises(ValueError, match="calibration_images must be >= 1, got 0"):
        quantize.Int8Options(calibration_images=0)
    with pytest.raises(ValueError, match="INT8 quantization writes ONNX"):
        export.export_workdir(
            tmp_path, "stablehlo", tmp_path / "m", quantize=quantize.Int8Options()
        )
    with pytest.raises(TypeError, match="quantize must be a quantize.Int8Options"):
        export.export_workdir(tmp_path, "onnx", tmp_path / "m", quantize="int8")


def test_workdir_errors_say_what_to_do(tmp_path):
    with pytest.raises(workdir.WorkdirError, match="not a training workdir. Train first"):
        workdir.load(tmp_path)
    result = _cli("dirac_jax.export", f"--workdir={tmp_path}", f"--out={tmp_path / 'm.onnx'}")
    assert result.returncode == 1
    assert result.stderr.strip().startswith("error:") and "Train first" in result.stderr
    (tmp_path / workdir.CONFIG_FILE).write_text(
        json.dumps(fashion_mnist_dirac.get_config().to_dict())
    )
    with pytest.raises(workdir.WorkdirError, match="no checkpoint to load"):
        workdir.load(tmp_path)


@pytest.mark.parametrize(
    "name, kwargs, shape, pad",
    [
        ("diracnet_v1", dict(depth=10, width=0.25), (28, 28, 1), ((2, 2), (2, 2))),
        ("plain", dict(depth=18, width=0.125, stem="imagenet"), (64, 64, 3), ((0, 0), (0, 0))),
    ],
)
@pytest.mark.accelerator
def test_to_onnx_covers_every_folded_step_kind(name, kwargs, shape, pad):
    # v1 (NCReLU blocks, no head relu) and the ImageNet stem (stride-2 conv, padded max-pool).
    model = models.get_model(name, num_classes=7, **kwargs)
    h, w, c = shape
    size = (h + pad[0][0] + pad[0][1], w + pad[1][0] + pad[1][1], c)
    variables = model.init(jax.random.key(0), jnp.zeros((1, *size)), train=False)
    rng = np.random.default_rng(0)
    stats = jax.tree.map(  # non-trivial BN statistics, so the folded biases matter
        lambda v: np.abs(rng.normal(1.0, 0.3, v.shape)).astype(np.float32),
        variables["batch_stats"],
    )
    variables = {**variables, "batch_stats": stats}
    folded = fold.fold(model, variables)
    mean, std = (0.3,) * c, (0.25,) * c
    onnx_model = onnx_graph.to_onnx(folded, input_shape=shape, pad=pad, mean=mean, std=std)
    images = rng.integers(0, 256, (4, *shape), dtype=np.uint8)
    x = jnp.pad(images, ((0, 0), *pad, (0, 0))).astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(mean)) / jnp.asarray(std)
    expected = fold.apply_folded(folded, x)
    session = ort.InferenceSession(
        onnx_model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    got = session.run(None, {onnx_graph.INPUT_NAME: images})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-5)


def test_preprocess_rejects_images_not_at_the_stored_size():
    config = fashion_mnist_dirac.get_config()
    with pytest.raises(ValueError, match=r"not \(N, \*\(28, 28, 1\)\), the stored fashion_mnist"):
        workdir.preprocess(jnp.zeros((2, 32, 32, 1), jnp.uint8), config)
    assert workdir.model_input_shape(config) == (32, 32, 1)

"""A `gs://` workdir end to end, against a real GCS JSON API on localhost (the `gcs` fixture).

Every test goes through the command lines a pod runs (`dirac_jax.main`, `evaluate`,
`export`) or through the library's own readers, with gcsfs, tensorstore and
google-cloud-storage talking HTTP to gcp-storage-emulator (tests/_gcs.py). Nothing is
mocked.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import _image_data
import jax
import numpy as np
import onnx
import pytest
from etils import epath
from test_checkpoint import _check_sigterm_resume, _main, _saved_tree
from test_train import _finish, _free_port, _train_losses

from dirac_jax import checkpoint, metrics, train
from dirac_jax.formats import stablehlo
from dirac_jax.workdir import CONFIG_FILE, EVAL_FILE, METRICS_FILE, SUMMARY_FILE

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _env(**extra):
    pythonpath = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": pythonpath, **extra}


def _run(module, *args, cwd=ROOT, timeout=300, extra_env=None):
    cmd = [sys.executable, "-m", module, *args]
    env = _env(**(extra_env or {}))
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _names(root: epath.Path) -> set[str]:
    """Every object under `root`, as paths relative to it."""
    names = set()
    for p in root.iterdir():
        if p.is_dir():
            names.update(f"{p.name}/{n}" for n in _names(p))
        else:
            names.add(p.name)
    return names


def test_metric_writer_in_a_bucket_rewrites_and_resumes(gcs):
    # TensorBoard's events are checked through the command line below: tensorboardX's
    # uploader sends the file once more when the process exits, after this server stops.
    root = epath.Path(gcs.root("writer"))
    writer = metrics.MetricWriter(root, tensorboard=False)
    for step in (1, 2, 3):
        writer.write({"step": step, "kind": "train", "train_loss": float(step)})
        # Each record is in the bucket when write returns (no append on GCS: a rewrite).
        assert [r["step"] for r in metrics.read_metrics(root)] == list(range(1, step + 1))
    writer.close()
    assert _names(root) == {METRICS_FILE}
    # A resume from step 2 drops the later record, as it does locally.
    writer = metrics.MetricWriter(root, start_step=2, tensorboard=False)
    writer.write({"step": 3, "kind": "train", "train_loss": 30.0})
    writer.close()
    assert [r["train_loss"] for r in metrics.read_metrics(root)] == [1.0, 2.0, 30.0]


@pytest.mark.slow
def test_a_bf16_run_in_a_bucket_then_evaluate_and_export_from_it(gcs, tmp_path):
    # The command line from an empty working directory: nothing local may appear (pathlib
    # used to make a folder named "gs:" there).
    root = gcs.root("bf16")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    config = f"--config={ROOT / 'configs' / 'cifar_dirac.py'}"
    flags = [f"--workdir={root}", config, *_main("unused", 6)[5:], "--config.half_precision=True"]
    trained = _run("dirac_jax.main", *flags, cwd=cwd)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert f"summary in {root}/summary.json" in trained.stdout
    workdir = epath.Path(root)
    names = _names(workdir)
    for name in (CONFIG_FILE, SUMMARY_FILE, METRICS_FILE, "curves.png",
                 "dirac_scales.png", "checkpoints/6/commit_success.txt"):  # fmt: skip
        assert name in names, sorted(names)
    assert any(n.startswith("events.out.tfevents.") for n in names), sorted(names)
    assert (workdir / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert list(cwd.iterdir()) == []

    evaluated = _run("dirac_jax.evaluate", f"--workdir={root}", cwd=cwd)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads((workdir / EVAL_FILE).read_text())
    summary = json.loads((workdir / SUMMARY_FILE).read_text())
    # One metrics function (strict top-k on float32 logits): a bf16 net's ties count alike.
    assert result["unfolded"]["top1"] == summary["test_top1"]
    assert result["unfolded"]["top5"] == summary["test_top5"]
    assert result["unfolded"]["count"] == summary["num_test_examples"]

    out = f"{root}/export/model.stablehlo"
    exported = _run(
        "dirac_jax.export", f"--workdir={root}", "--format=stablehlo", f"--out={out}",
        "--platforms=cpu,cuda", cwd=cwd,
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr[-3000:]
    blob = epath.Path(out).read_bytes()
    # Written for a GPU as well as this CPU host; it runs here.
    assert jax.export.deserialize(bytearray(blob)).platforms == ("cpu", "cuda")
    logits = stablehlo.load_stablehlo(blob)(np.zeros((2, 32, 32, 3), np.uint8))
    assert logits.shape == (2, 10)

    # INT8 deploy into the bucket, then evaluated from there beside the JAX model.
    int8 = f"{root}/export/model.int8.onnx"
    quantized = _run(
        "dirac_jax.export", f"--workdir={root}", "--format=onnx", "--quantize=int8",
        f"--out={int8}", "--calibration_images=32", cwd=cwd,
    )  # fmt: skip
    assert quantized.returncode == 0, quantized.stderr[-3000:]
    model = onnx.load_from_string(epath.Path(int8).read_bytes())
    assert any(t.data_type == onnx.TensorProto.INT8 for t in model.graph.initializer)
    onnx_eval = _run("dirac_jax.evaluate", f"--workdir={root}", f"--onnx={int8}", cwd=cwd)
    assert onnx_eval.returncode == 0, onnx_eval.stderr[-3000:]
    result = json.loads((workdir / EVAL_FILE).read_text())
    assert result["onnx"]["count"] == summary["num_test_examples"]
    assert result["onnx"]["file"] == int8 and 0.0 <= result["onnx"]["agree"] <= 1.0
    assert list(cwd.iterdir()) == []


@pytest.mark.slow
def test_sigterm_in_a_bucket_then_rerun_resumes_bit_exactly(gcs):
    _check_sigterm_resume(epath.Path(gcs.root("sigterm")), _main, num_steps=20, interrupt_after=5)


@pytest.mark.slow
def test_a_partial_step_in_a_bucket_is_skipped_and_the_run_resumes(gcs):
    # On GCS orbax writes a step in place and marks it finished with commit_success.txt; a
    # save cut short leaves a step without it, which the rerun must skip by itself.
    root = epath.Path(gcs.root("partial"))
    full = subprocess.Popen(
        _main(root / "full", 4), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    stopped = _run("dirac_jax.main", *_main(root / "run", 4)[3:], extra_env={
        train.SIGTERM_TEST_ENV: "2"})  # fmt: skip
    assert stopped.returncode == 0 and "preempted at step 2" in stopped.stdout, stopped.stderr
    step_dir = checkpoint.checkpoint_dir(root / "run")
    assert (step_dir / "2" / "commit_success.txt").is_file()
    partial = step_dir / "4" / checkpoint.STATE_ITEM / "half_written"
    partial.write_bytes(b"\0" * 10)  # no commit_success.txt in 4/

    resumed = _run("dirac_jax.main", *_main(root / "run", 4)[3:])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Skipped the partial checkpoint" in resumed.stderr
    assert "resuming from the latest complete step, 2" in resumed.stderr
    assert (step_dir / "4" / "commit_success.txt").is_file() and not partial.exists()
    out, err = full.communicate(timeout=300)
    assert full.returncode == 0, err[-3000:]
    a, b = (_saved_tree(root / d, 4) for d in ("full", "run"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_two_processes_share_a_bucket_workdir(gcs, image_tree):
    # Two processes of 4 devices, as test_train's, decoding in their own threads (no Grain
    # workers: the same input, fewer processes on a small CPU).
    num_steps, port = 4, _free_port()
    workdir = epath.Path(gcs.root("two"))
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=4", PYTHONFAULTHANDLER="1")
    processes = [
        subprocess.Popen(
            _image_data.imagenet_cli(
                image_tree,
                workdir,
                num_steps,
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    _finish(processes)
    assert sorted(_train_losses(workdir)) == list(range(1, num_steps + 1))
    step_dir = checkpoint.checkpoint_dir(workdir) / str(num_steps)
    assert (step_dir / "commit_success.txt").is_file()
    data_dir = step_dir / checkpoint.DATA_ITEM
    data_files = sorted(p.name for p in data_dir.iterdir() if p.name.startswith("process_"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
    summary = json.loads((workdir / SUMMARY_FILE).read_text())
    assert summary["step"] == num_steps and np.isfinite(summary["test_loss"])
    # The state saved by 2 processes of 4 devices is not restored here: orbax refuses a
    # restore onto this process's 8 devices without target shardings (topology mismatch).
    assert any(p.name != checkpoint.DATA_ITEM for p in step_dir.iterdir() if p.is_dir())


def test_paths_in_a_bucket_stay_uris():
    assert str(checkpoint.checkpoint_dir("gs://b/runs/x")) == "gs://b/runs/x/checkpoints"
    local = checkpoint.checkpoint_dir("runs/x")
    assert local.is_absolute() and re.search(r"runs/x/checkpoints$", str(local))

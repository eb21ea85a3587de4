"""Tests for dirac_jax.train: schedule, weight-decay mask, sharding equivalence, exact eval.

The test process has 8 fake CPU devices (conftest.py). Models are DiracNet-10
with width 0.25 on synthetic 32x32 data unless a test says otherwise.
"""

import importlib.util
import json
import math
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import _image_data
import _multihost_worker
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dirac_jax import (
    checkpoint,
    config_schema,
    data,
    metrics,
    models,
    optim,
    sharding,
    steps,
    train,
    workdir,
)
from dirac_jax.configs import cifar_dirac, fashion_mnist_dirac
from dirac_jax.reproduce._grid import apply_overrides

ROOT = pathlib.Path(__file__).resolve().parents[1]
_multihost_worker.use_compilation_cache()
FASHION_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")


def tiny_config(**overrides) -> ml_collections.ConfigDict:
    return apply_overrides(_multihost_worker.tiny_config(num_steps=8), overrides)


# ---------------------------------------------------------------------------
# Learning-rate schedule and optimizer.


@pytest.mark.parametrize("num_train_steps", [100, 1000, 777])
def test_lr_boundaries_scale_with_num_train_steps(num_train_steps):
    config = cifar_dirac.get_config()
    config.num_train_steps = num_train_steps
    fn = optim.create_learning_rate_fn(config, steps_per_epoch=390)
    boundaries = [int(f * num_train_steps) for f in (0.3, 0.6, 0.8)]
    for i, b in enumerate(boundaries):
        # The rate drops by exactly lr_decay at each boundary step and not a step earlier.
        np.testing.assert_allclose(float(fn(b - 1)), 0.1 * 0.2**i, rtol=1e-6)
        np.testing.assert_allclose(float(fn(b)), 0.1 * 0.2 ** (i + 1), rtol=1e-6)
    np.testing.assert_allclose(float(fn(num_train_steps - 1)), 0.1 * 0.2**3, rtol=1e-6)


@pytest.mark.parametrize("schedule", ["reference", "fractions"])
def test_lr_boundaries_from_epochs_match_reference_epochs(schedule):
    config = cifar_dirac.get_config()  # 200 epochs, x0.2 at epochs 60, 120, 160
    config.lr_schedule = schedule
    spe = 390
    fn = optim.create_learning_rate_fn(config, spe)
    assert config_schema.total_steps(config, spe) == 200 * spe

    def reference_lr(epoch0):
        # The reference trainer: at the start of each epoch, `epoch = state['epoch'] + 1`
        # (1-based) is looked up in epoch_step=[60, 120, 160], and the lr multiplied by 0.2.
        lr = 0.1
        for e in range(epoch0 + 1):
            if e + 1 in (60, 120, 160):
                lr *= 0.2
        return lr

    shift = 0 if schedule == "reference" else 1
    for epoch in (0, 58, 59, 60, 61, 118, 119, 120, 159, 160, 199):
        for step in (epoch * spe, epoch * spe + spe - 1):
            np.testing.assert_allclose(
                float(fn(step)), reference_lr(max(epoch - shift, 0)), rtol=1e-6
            )


def _flat(tree):
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize(
    ("name", "scope"),
    [("diracnet", "kernels"), ("diracnet_v1", "kernels"), ("diracnet_v1", "all"),
     ("plainnet", "kernels")],
)  # fmt: skip
def test_weight_decay_mask_selects_exactly_the_kernels(name, scope):
    model = models.get_model(name, depth=10, width=0.25, num_classes=10)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    mask = _flat(optim.weight_decay_mask(shapes, scope))
    for path, x in _flat(shapes).items():
        # The reference v2 code decays exactly the tensors of more than one dimension.
        expected = scope == "all" or x.ndim > 1
        assert mask[path] == expected, (path, x.shape)
    kinds = {p.rsplit("['", 1)[1].rstrip("']") for p, m in mask.items() if m}
    assert kinds >= {"w", "kernel"} and (scope == "all") == ("scale" in kinds)


def test_momentum_restarts_at_reference_boundaries_only():
    config = tiny_config(learning_rate=1.0, weight_decay=0.0, momentum=0.5)
    config.lr_boundaries, config.lr_decay, config.num_train_steps = (0.5,), 1.0, 6
    params = {"w": jnp.zeros((2, 2))}
    for schedule, restarted in (("reference", True), ("fractions", False)):
        config.lr_schedule = schedule
        tx = optim.create_optimizer(config, lambda step: 1.0, steps_per_epoch=3)
        state = tx.init(params)
        ones = jax.tree.map(jnp.ones_like, params)
        moves = []
        for _ in range(6):
            updates, state = tx.update(ones, state, params)
            moves.append(float(-updates["w"][0, 0]))
        # m <- 0.5 m + 1: 1, 1.5, 1.75; at step 3 the reference starts again from 1.
        expected = [1, 1.5, 1.75, 1, 1.5, 1.75] if restarted else [1, 1.5, 1.75, 1.875]
        np.testing.assert_allclose(moves[: len(expected)], expected)


# ---------------------------------------------------------------------------
# Sharded steps.


def _initial_state(config):
    model = config_schema.create_model(config, 10)
    lr_fn = optim.create_learning_rate_fn(config, steps_per_epoch=4)
    return steps.create_train_state(config, model, jax.random.key(0), (32, 32, 3), lr_fn), lr_fn


def _run_steps(config, mesh, dataset, num_steps, initial=None):
    state, lr_fn = initial or _initial_state(config)
    # From host copies: the step donates its input, which must not alias `initial`.
    state = jax.device_put(jax.device_get(state), NamedSharding(mesh, P()))
    train_fn, _ = steps.compile_steps(config, mesh, lr_fn, "cifar10")
    arrays = sharding.put_replicated(mesh, dataset)
    losses = []
    for step in range(num_steps):
        idx = sharding.shard_batch(mesh, np.arange(16, dtype=np.int32) + 16 * step)
        assert idx.sharding.spec == P("data") and len(idx.addressable_shards) == mesh.size
        state, m = train_fn(state, arrays, idx)
        losses.append(float(m["loss"]))
    return jax.device_get(state.params), jax.device_get(state.batch_stats), losses


def test_train_step_on_8_devices_equals_1_device():
    assert jax.device_count() == 8
    config = tiny_config()
    dataset = data.load("cifar10", source="synthetic", split="train", synthetic_size=64)
    initial = _initial_state(config)
    init_params = jax.device_get(initial[0].params)
    p8, s8, l8 = _run_steps(config, sharding.make_mesh(jax.devices()), dataset, 2, initial)
    p1, s1, l1 = _run_steps(config, sharding.make_mesh(jax.devices()[:1]), dataset, 2, initial)
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    # BN statistics over the global batch, not per device: the running stats agree too.
    for a, b in zip(jax.tree.leaves((p8, s8)), jax.tree.leaves((p1, s1)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # And the steps did something: most parameter tensors moved from their initial values.
    leaves = zip(jax.tree.leaves(p1), jax.tree.leaves(init_params), strict=True)
    moved = [not np.allclose(a, b) for a, b in leaves]
    assert sum(moved) > len(moved) // 2


def test_half_precision_computes_in_bfloat16_and_keeps_float32_params():
    dataset = data.load("cifar10", source="synthetic")
    config = tiny_config(half_precision=True)
    assert config_schema.create_model(config, 10).dtype == jnp.bfloat16
    params, _, half = _run_steps(config, sharding.make_mesh(), dataset, 1)
    _, _, full = _run_steps(tiny_config(), sharding.make_mesh(), dataset, 1)
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
    # Same init and data: the loss differs only by bfloat16 rounding.
    assert half[0] != full[0]
    np.testing.assert_allclose(half[0], full[0], rtol=0.05)


def test_max_norm_projects_every_kernel():
    config = tiny_config(**{"model.name": "plainnet", "max_norm": 0.5})
    params, _, _ = _run_steps(
        config, sharding.make_mesh(), data.load("cifar10", source="synthetic"), 1
    )
    kernels = [
        x for p, x in _flat(params).items() if p.endswith("['w']") or p.endswith("['kernel']")
    ]
    assert kernels
    for k in kernels:
        norms = np.sqrt(np.sum(np.square(k), axis=tuple(range(k.ndim - 1))))
        assert norms.max() <= 0.5 * (1 + 1e-5)
    # The He/uniform-initialized kernels start with larger norms, so the projection acted.
    assert any(
        np.isclose(np.sqrt(np.sum(np.square(k), axis=tuple(range(k.ndim - 1)))), 0.5).any()
        for k in kernels
    )


# ---------------------------------------------------------------------------
# Evaluation.


def test_eval_counts_each_example_once_when_batch_does_not_divide():
    config = tiny_config()
    mesh = sharding.make_mesh()
    test = data.load("cifar10", source="synthetic", split="test", synthetic_size=100)
    model = config_schema.create_model(config, 10)
    lr_fn = optim.create_learning_rate_fn(config, 4)
    state = steps.create_train_state(config, model, jax.random.key(1), (32, 32, 3), lr_fn, mesh)
    _, eval_fn = steps.compile_steps(config, mesh, lr_fn, "cifar10")
    arrays = sharding.put_replicated(mesh, test)
    batches = [(arrays, *sharding.shard_batch(mesh, b)) for b in data.eval_batches(100, 32)]
    assert len(batches) == 4  # 32 + 32 + 32 + 4 real examples
    result = steps.evaluate_batches(eval_fn, state, batches, expected_count=100)
    assert result["count"] == 100
    # The same numbers as one forward pass over exactly the 100 examples.
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    apply = jax.jit(lambda v, x: model.apply(v, data.normalize(x, "cifar10"), train=False))
    logits = apply(variables, test.images)
    labels = jnp.asarray(test.labels)
    loss = float(jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)))
    correct = int(jnp.sum(jnp.argmax(logits, -1) == labels))
    np.testing.assert_allclose(result["loss"], loss, rtol=1e-5)
    assert result["top1"] == correct / 100
    assert set(result) == {"top1", "top5", "loss", "count"}
    with pytest.raises(AssertionError, match=r"counted \[100\] examples"):
        steps.evaluate_batches(eval_fn, state, batches, expected_count=101)


# ---------------------------------------------------------------------------
# Config validation.


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model.depth": 30}, "6n+4"),
        ({"dataset.name": "svhn"}, "unknown dataset 'svhn'"),
        ({"model.name": "vgg"}, "unknown model 'vgg'"),
        ({"batch_size": 12}, "batch_size=12 is not divisible by the 8 devices"),
        ({"eval_batch_size": 100}, "eval_batch_size=100 is not divisible by the 8 devices"),
        ({"lr_boundaries": (0.6, 0.3)}, "lr_boundaries"),
        ({"learning_rate": float("nan")}, "learning_rate"),
    ],
)
def test_validate_config_names_the_problem(overrides, message):
    with pytest.raises(config_schema.ConfigError, match=message.replace("+", r"\+")):
        config_schema.validate_config(tiny_config(**overrides))


def test_the_recorded_config_is_never_read_half_written(tmp_path):
    # Process 0 records config.json while the other processes of the run read it to check
    # their config: a reader must see the old file or the new one, whole. A truncating
    # write was seen to hand a reader an empty file (JSONDecodeError) and hang the run.
    configs = [config_schema.validate_config(tiny_config(log_every_steps=n)) for n in (1, 2)]
    train._check_config_against_workdir(configs[0], tmp_path, resuming=False, record=True)
    stop, errors = threading.Event(), []

    def read():
        while not stop.is_set():
            try:
                train._check_config_against_workdir(
                    configs[0], tmp_path, resuming=True, record=False
                )
            except Exception as e:  # noqa: BLE001 - any failure is the finding
                errors.append(e)
                return

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(2000):
            train._check_config_against_workdir(
                configs[i % 2], tmp_path, resuming=True, record=True
            )
    finally:
        stop.set()
        reader.join()
    assert not errors, errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [workdir.CONFIG_FILE]  # no temp left


def test_a_corrupt_recorded_config_is_one_clear_error_and_kept(tmp_path):
    path = tmp_path / workdir.CONFIG_FILE
    path.write_text('{"model": ')
    config = config_schema.validate_config(tiny_config())
    with pytest.raises(config_schema.ConfigError, match="is not valid JSON") as info:
        train._check_config_against_workdir(config, tmp_path, resuming=True, record=True)
    assert str(path) in str(info.value) and "delete it to resume" in str(info.value)
    assert path.read_text() == '{"model": '


# ---------------------------------------------------------------------------
# One metric vocabulary: top1, top5, loss, count; files of earlier releases still read.


def test_evaluate_batches_sums_several_nets_and_shares_extra_counts():
    def eval_fn(state, logits, labels, mask):
        m = steps.classification_metrics(logits, labels, mask)
        return {"a": m, "b": {**m, "agree": jnp.sum(mask.astype(jnp.int32))}}

    logits = jnp.eye(4)
    batches = [(logits, jnp.array([0, 1, 3, 2]), jnp.array([True, True, True, False]))] * 2
    result = steps.evaluate_batches(eval_fn, None, batches, expected_count=6)
    assert result["a"]["count"] == 6 and result["a"]["top1"] == pytest.approx(4 / 6)
    assert result["b"]["agree"] == 1.0 and set(result["a"]) == {"top1", "top5", "loss", "count"}
    with pytest.raises(AssertionError, match=r"counted \[6\] examples"):
        steps.evaluate_batches(eval_fn, None, batches, expected_count=7)


def test_metric_files_of_earlier_releases_read_with_todays_names(tmp_path):
    old_eval = {"step": 2, "kind": "eval", "test_loss": 1.0, "test_accuracy": 0.5,
                "test_top5_accuracy": 0.9, "test_accuracy_symmetrized": 0.4}  # fmt: skip
    old_train = {"step": 1, "kind": "train", "train_loss": 2.0, "train_accuracy": 0.3}
    lines = [json.dumps(r) for r in (old_train, old_eval)]
    (tmp_path / workdir.METRICS_FILE).write_text("\n".join(lines) + "\n")
    train_record, eval_record = metrics.read_metrics(tmp_path)
    assert train_record == {"step": 1, "kind": "train", "train_loss": 2.0, "train_top1": 0.3}
    assert eval_record == {"step": 2, "kind": "eval", "test_loss": 1.0, "test_top1": 0.5,
                           "test_top5": 0.9, "test_top1_symmetrized": 0.4}  # fmt: skip
    with pytest.raises(workdir.WorkdirError, match="has not finished"):
        workdir.read_summary(tmp_path)
    (tmp_path / workdir.SUMMARY_FILE).write_text(json.dumps({**old_eval, "num_params": 3}))
    summary = workdir.read_summary(tmp_path)
    assert summary["test_top1"] == 0.5 and summary["test_top5"] == 0.9
    assert not any("accuracy" in k for k in summary) and summary["num_params"] == 3
    # Today's names pass through unchanged.
    assert workdir.current_metric_names(eval_record) == eval_record


def test_the_symmetry_penalty_is_the_run_models():
    config = config_schema.with_defaults(tiny_config())
    assert steps.symmetry_penalty_term(config, None) is None  # off: no model needed
    config.model = ml_collections.ConfigDict({"name": "wrn", "depth": 10, "width": 0.25})
    config.symmetry_penalty = 0.1
    with pytest.raises(ValueError, match="needs the run's model"):
        steps.symmetry_penalty_term(config, None)
    model = config_schema.create_model(config, 10)
    lam, penalty = steps.symmetry_penalty_term(config, model)
    params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    assert lam == 0.1
    assert float(penalty(params)) == float(models.network_symmetry_penalty(model, params, p=1.0))


# ---------------------------------------------------------------------------
# Multi-process.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_losses(workdir):
    return {
        r["step"]: r["train_loss"] for r in metrics.read_metrics(workdir) if r["kind"] == "train"
    }


def _start_two_processes(tree, workdir, num_steps, sigterm_process_1_after=None):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONFAULTHANDLER": "1",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}  # fmt: skip
    # The session's persistent compilation cache stays set (tests/conftest.py): the command
    # line turns it off for a multi-process CPU run, and `_finish` checks that it said so.
    envs = [env, dict(env)]
    if sigterm_process_1_after is not None:
        envs[1][train.SIGTERM_TEST_ENV] = str(sigterm_process_1_after)
    return [
        subprocess.Popen(
            _image_data.imagenet_cli(
                tree,
                workdir,
                num_steps,
                "--config.dataset.num_workers=2",
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ),
            cwd=ROOT,
            env=envs[i],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]


def _finish(processes, timeout=300):
    """Waits for `processes`; on a hang, fails with every process's Python stacks.

    Started with PYTHONFAULTHANDLER=1, a process that gets SIGABRT after the deadline prints
    each of its threads' Python stacks to stderr before it dies.
    """
    deadline = time.monotonic() + timeout
    results, hung = [], []
    for p in processes:
        try:
            results.append(p.communicate(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            hung.append(p.pid)
            p.send_signal(signal.SIGABRT)
            results.append(p.communicate(timeout=60))
    if hung:
        pytest.fail(
            f"processes {hung} of {[p.pid for p in processes]} ran past {timeout} s; stacks:\n"
            + "\n".join(f"--- process {i} ---\n{err[-6000:]}" for i, (_, err) in enumerate(results))
        )
    for p, (out, err) in zip(processes, results, strict=True):
        assert p.returncode == 0, (out + err)[-3000:]
        # Each process ran without the persistent cache the test session sets: on CPU only
        # process 0 would load from it, and its early arrival timed out gloo's setup.
        assert "persistent compilation cache off" in err, err[-3000:]
    return [out for out, _ in results]


@pytest.mark.slow
def test_two_processes_match_one_process_through_a_preemption(tmp_path, image_tree):
    # Two processes of 4 devices, each decoding its half of every batch in two Grain worker
    # processes, started from the command line. A SIGTERM to process 1 only, after step 3
    # (the trainer's test hook), stops both at the same step (JAX's sync point); the rerun
    # resumes both from their saved input positions. The loss curve equals one 8-device
    # process's.
    num_steps, interrupt_after = 10, 3
    multi = tmp_path / "multi"
    outs = _finish(
        _start_two_processes(image_tree, multi, num_steps, sigterm_process_1_after=interrupt_after)
    )
    stopped = [int(re.search(r"preempted at step (\d+);", out)[1]) for out in outs]
    assert stopped[0] == stopped[1] and interrupt_after <= stopped[0] < num_steps, outs
    mngr = checkpoint.create_manager(multi)
    assert mngr.latest_step() == stopped[0]
    mngr.close()
    data_dir = checkpoint.checkpoint_dir(multi) / str(stopped[0]) / checkpoint.DATA_ITEM
    assert sorted(p.name for p in data_dir.glob("process_*")) == [
        "process_0-of-2.json", "process_1-of-2.json"
    ]  # fmt: skip
    _finish(_start_two_processes(image_tree, multi, num_steps))

    single = train.train_and_evaluate(
        _image_data.tiny_imagenet_config(image_tree, num_steps), tmp_path / "one"
    )
    multi_losses, single_losses = _train_losses(multi), _train_losses(tmp_path / "one")
    assert sorted(multi_losses) == list(range(1, num_steps + 1)) == sorted(single_losses)
    np.testing.assert_allclose(
        [multi_losses[s] for s in sorted(multi_losses)],
        [single_losses[s] for s in sorted(single_losses)],
        rtol=1e-4,  # gloo and one process sum the gradients in different orders
    )
    summary = json.loads((multi / workdir.SUMMARY_FILE).read_text())
    np.testing.assert_allclose(summary["test_loss"], single["test_loss"], rtol=1e-4)
    assert summary["num_test_examples"] == single["num_test_examples"] == 12


def test_tfds_array_record_source_trains_end_to_end(tmp_path, tfds_imagenet):
    config = _image_data.tiny_imagenet_config(None, 3)
    config.dataset.source, config.dataset.data_dir = "tfds", str(tfds_imagenet)
    summary = train.train_and_evaluate(config, tmp_path)
    assert summary["step"] == 3 and summary["num_test_examples"] == 12
    # The workdir evaluation streams the same validation split as training did.
    from dirac_jax import evaluate

    result = evaluate.evaluate_workdir(tmp_path, batch_size=8)
    assert result["unfolded"]["count"] == result["folded"]["count"] == 12
    assert result["unfolded"]["top1"] == pytest.approx(summary["test_top1"], abs=1e-6)
    assert result["unfolded"]["loss"] == pytest.approx(summary["test_loss"], rel=1e-4)
    assert result["folded"]["loss"] == pytest.approx(summary["test_loss"], rel=1e-3)
    # And it exports: the classifier takes the uint8 eval crops (32 px here).
    from dirac_jax import export, workdir
    from dirac_jax.formats import stablehlo

    out = export.export_workdir(tmp_path, "stablehlo", tmp_path / "model.stablehlo")
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    model, variables, config = workdir.load(tmp_path)
    expected = model.apply(variables, workdir.preprocess(images, config), train=False)
    np.testing.assert_allclose(
        stablehlo.load_stablehlo(out.read_bytes())(images), expected, atol=1e-4, rtol=0
    )
    assert np.isfinite(summary["test_loss"]) and summary["fold_max_abs_error"] < 1e-3
    # TFDS imagenet2012 has 1000 classes: the head is sized from the data.
    assert summary["num_params"] > models.count_params({"w": np.zeros(64 * 1000)})
    assert importlib.util.find_spec("tensorflow") is None and "tensorflow" not in sys.modules


# ---------------------------------------------------------------------------
# Real data.


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_learns_and_writes_every_artifact(tmp_path):
    # The quickstart config, shortened: 150 steps of DiracNet-10-0.5. Measured 0.771 test
    # accuracy on one device (seed 0); the threshold leaves room for other seeds and hosts.
    config = fashion_mnist_dirac.get_config()
    config.num_train_steps = 150
    config.model.width = 0.5
    config.eval_every_steps = 75
    config.log_every_steps = 25
    summary = train.train_and_evaluate(config, tmp_path)
    assert summary["num_test_examples"] == 10000
    assert summary["test_top1"] >= 0.70, summary
    assert summary["fold_max_abs_error"] < 1e-3
    assert summary["step"] == 150
    on_disk = json.loads((tmp_path / workdir.SUMMARY_FILE).read_text())
    assert on_disk["test_top1"] == summary["test_top1"]
    records = metrics.read_metrics(tmp_path)
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [75, 150]
    # Fig. 2 data: one mean a and b per Dirac conv (2 per group x 3 groups for depth 10).
    assert len(evals[-1]["dirac_a"]) == len(evals[-1]["dirac_b"]) == 6
    assert all(math.isfinite(v) for v in evals[-1]["dirac_a"].values())
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(25, 151, 25))
    assert list(tmp_path.glob("events.out.tfevents.*"))
    for name in (workdir.CURVES_FILE, workdir.DIRAC_SCALES_FILE):
        assert (tmp_path / name).stat().st_size > 10_000

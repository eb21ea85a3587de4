"""Tests for dirac_jax.checkpoint and the trainer's resume, preemption and failure paths.

The resume tests interrupt a real `python -m dirac_jax.main` run with SIGTERM at a chosen
step (the trainer's test hook, `train.SIGTERM_TEST_ENV`: no sleeps, no timing) and check
the resumed run ends bit-identical to an uninterrupted one.
"""

import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys
import threading

import _image_data
import _multihost_worker
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dirac_jax import checkpoint, config_schema, metrics, steps, train, workdir

ROOT = pathlib.Path(__file__).resolve().parents[1]
_multihost_worker.use_compilation_cache()


def _tiny(num_steps, **overrides):
    config = _multihost_worker.tiny_config(num_steps)
    # A constant rate: the compiled step is then the same for every num_steps (cache hits).
    config.lr_boundaries = ()
    for key, value in overrides.items():
        config[key] = value
    return config


def _saved_tree(workdir, step):
    """A checkpoint as saved on disk: a nested dict of arrays."""
    mngr = checkpoint.create_manager(workdir)
    try:
        return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))[
            "state"
        ]
    finally:
        mngr.close()


def _digest(directory) -> dict[str, str]:
    directory = pathlib.Path(directory)  # a local checkpoint_dir, walked recursively
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


# ---------------------------------------------------------------------------
# Unit level.


def test_all_finite():
    assert checkpoint.all_finite({"a": jnp.ones(3), "step": jnp.array(2)})
    assert not checkpoint.all_finite({"a": jnp.array([1.0, jnp.nan])})
    assert not checkpoint.all_finite({"a": jnp.ones(2), "b": {"c": jnp.array([jnp.inf])}})


def test_manager_keeps_the_last_checkpoints(tmp_path):
    mngr = checkpoint.create_manager(tmp_path, keep=2)
    for step in (1, 2, 3):
        checkpoint.save(mngr, step, {"w": jnp.full(2, float(step))})
    mngr.wait_until_finished()
    assert mngr.all_steps() == [2, 3]
    restored, step = checkpoint.restore_latest(mngr, {"w": jnp.zeros(2)})
    assert step == 3 and restored["w"].tolist() == [3.0, 3.0]
    mngr.close()


def test_no_checkpoint_returns_the_template(tmp_path):
    mngr = checkpoint.create_manager(tmp_path)
    template = {"w": jnp.zeros(2)}
    state, step = checkpoint.restore_latest(mngr, template)
    assert step == 0 and state is template
    mngr.close()


# ---------------------------------------------------------------------------
# Corrupt and partial checkpoints.


# In-process, orbax's reads abandoned by the failed restore report "Event loop is closed"
# from their threads; the library leaves the process's hooks alone, so pytest sees them.
# The command line drops them (checked below: one line on stderr).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_corrupt_checkpoint_raises_one_clear_error_and_is_not_touched(tmp_path):
    train.train_and_evaluate(_tiny(4, checkpoint_every_steps=2), tmp_path)
    ckpt_dir = checkpoint.checkpoint_dir(tmp_path)
    assert sorted(int(p.name) for p in ckpt_dir.iterdir()) == [2, 4]
    manifest = ckpt_dir / "4" / checkpoint.STATE_ITEM / "manifest.ocdbt"
    manifest.write_bytes(manifest.read_bytes()[:10])  # a torn write
    before = _digest(ckpt_dir)
    with pytest.raises(checkpoint.CheckpointError) as info:
        train.train_and_evaluate(_tiny(4, checkpoint_every_steps=2), tmp_path)
    message = str(info.value)
    assert str(ckpt_dir / "4") in message
    assert "move or delete that step directory" in message and "new --workdir" in message
    assert "\n" not in message
    assert _digest(ckpt_dir) == before  # nothing overwritten, nothing added
    # The command line says the same in one line on stderr, with no traceback.
    cli = subprocess.run(
        [*_main(tmp_path, 4), "--config.lr_boundaries=()", "--config.checkpoint_every_steps=2"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert cli.returncode == 1 and "Traceback" not in cli.stderr, cli.stderr[-3000:]
    assert cli.stderr.startswith("error: the checkpoint ") and cli.stderr.count("\n") == 1
    assert _digest(ckpt_dir) == before


def test_restore_leaves_the_process_hooks_alone(tmp_path, monkeypatch):
    # Library code must not swap sys.unraisablehook or threading.excepthook, even briefly.
    mngr = checkpoint.create_manager(tmp_path)
    state = {"x": jnp.arange(3.0)}
    checkpoint.save(mngr, 1, state)
    mngr.wait_until_finished()
    hooks = (sys.unraisablehook, threading.excepthook)
    seen = []
    restore = mngr.restore

    def spy(*args, **kwargs):
        seen.append((sys.unraisablehook, threading.excepthook))
        return restore(*args, **kwargs)

    monkeypatch.setattr(mngr, "restore", spy)
    restored, step = checkpoint.restore_latest(mngr, state)
    mngr.close()
    assert step == 1 and seen == [hooks]
    np.testing.assert_array_equal(restored["x"], state["x"])


def _write_partial_step(workdir, step) -> pathlib.Path:
    """What a save interrupted by preemption leaves: orbax's tmp directory, half written."""
    partial = pathlib.Path(checkpoint.checkpoint_dir(workdir)) / f"{step}.orbax-checkpoint-tmp-99"
    (partial / checkpoint.STATE_ITEM).mkdir(parents=True)
    (partial / checkpoint.STATE_ITEM / "half_written").write_bytes(b"\0" * 10)
    return partial


def test_partial_step_is_skipped_and_the_run_resumes(tmp_path, caplog, monkeypatch):
    train.train_and_evaluate(_tiny(4, checkpoint_every_steps=2), tmp_path / "full")
    monkeypatch.setenv(train.SIGTERM_TEST_ENV, "2")  # preempted after step 2, saved there
    assert train.train_and_evaluate(_tiny(4, checkpoint_every_steps=2), tmp_path / "run")[
        "preempted"
    ]
    monkeypatch.delenv(train.SIGTERM_TEST_ENV)
    ckpt_dir = pathlib.Path(checkpoint.checkpoint_dir(tmp_path / "run"))
    complete = _digest(ckpt_dir / "2")
    partial = _write_partial_step(tmp_path / "run", 4)
    with caplog.at_level("WARNING"):
        summary = train.train_and_evaluate(_tiny(4, checkpoint_every_steps=2), tmp_path / "run")
    skipped = [r.getMessage() for r in caplog.records if "partial checkpoint" in r.getMessage()]
    assert len(skipped) == 1 and partial.name in skipped[0], skipped
    assert "resuming from the latest complete step, 2" in skipped[0]
    assert summary["step"] == 4 and not partial.exists()
    assert _digest(ckpt_dir / "2") == complete  # the complete step is kept as it was
    for a, b in zip(
        jax.tree.leaves(_saved_tree(tmp_path / "full", 4)),
        jax.tree.leaves(_saved_tree(tmp_path / "run", 4)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------
# A resume is the same run, or refused.


def test_resume_refuses_a_config_that_changes_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv(train.SIGTERM_TEST_ENV, "2")
    first = train.train_and_evaluate(_tiny(4, checkpoint_every_steps=0), tmp_path)
    assert first["preempted"] and first["step"] == 2
    monkeypatch.delenv(train.SIGTERM_TEST_ENV)
    recorded = (tmp_path / workdir.CONFIG_FILE).read_text()
    before = _digest(checkpoint.checkpoint_dir(tmp_path))
    changed = _tiny(4, checkpoint_every_steps=0, learning_rate=0.05, seed=1)
    changed.model.width = 0.5
    with pytest.raises(config_schema.ConfigError) as info:
        train.train_and_evaluate(changed, tmp_path)
    message = str(info.value)
    assert "\n" not in message
    for field in ("learning_rate (0.1 -> 0.05)", "seed (0 -> 1)", "model.width (0.25 -> 0.5)"):
        assert field in message, message
    assert str(tmp_path / workdir.CONFIG_FILE) in message and "new --workdir" in message
    # Refused before any step: nothing written, the recorded config kept.
    assert [r["step"] for r in metrics.read_metrics(tmp_path) if r["kind"] == "train"] == [1, 2]
    assert _digest(checkpoint.checkpoint_dir(tmp_path)) == before
    assert (tmp_path / workdir.CONFIG_FILE).read_text() == recorded
    # Fields that do not change the trajectory are accepted and recorded.
    harmless = _tiny(
        4, checkpoint_every_steps=1, log_every_steps=2, eval_every_steps=3, keep_checkpoints=5,
        fold_check_images=0, eval_batch_size=64, async_checkpointing=False,
    )  # fmt: skip
    harmless.dataset.num_workers = 2
    summary = train.train_and_evaluate(harmless, tmp_path)
    assert summary["step"] == 4 and summary["fold_max_abs_error"] is None
    now = json.loads((tmp_path / workdir.CONFIG_FILE).read_text())
    assert now["log_every_steps"] == 2 and now["dataset"]["num_workers"] == 2


# ---------------------------------------------------------------------------
# Divergence.


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv(train.SIGTERM_TEST_ENV, "4")  # preempted after step 4, saved there
    assert train.train_and_evaluate(_tiny(8, checkpoint_every_steps=2), tmp_path)["preempted"]
    monkeypatch.delenv(train.SIGTERM_TEST_ENV)
    good = _saved_tree(tmp_path, 4)
    # Poison the loss from now on: the resumed run's first step (step 5) diverges.
    loss = steps.cross_entropy_loss
    monkeypatch.setattr(
        steps, "cross_entropy_loss", lambda logits, labels: loss(logits, labels) * jnp.nan
    )
    with pytest.raises(checkpoint.NonFiniteLossError) as info:
        train.train_and_evaluate(_tiny(8, checkpoint_every_steps=2, log_every_steps=3), tmp_path)
    message = str(info.value)
    assert "loss is nan at step 5" in message
    assert f"step 4 in {checkpoint.checkpoint_dir(tmp_path)}" in message
    mngr = checkpoint.create_manager(tmp_path)
    assert mngr.all_steps() == [2, 4]  # step 6 was due but never written
    mngr.close()
    after = _saved_tree(tmp_path, 4)
    for a, b in zip(jax.tree.leaves(good), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)
    assert checkpoint.all_finite(after)
    # And the kept checkpoint resumes: an unpoisoned rerun finishes from it.
    monkeypatch.setattr(steps, "cross_entropy_loss", loss)
    summary = train.train_and_evaluate(_tiny(8, checkpoint_every_steps=2), tmp_path)
    assert summary["step"] == 8 and np.isfinite(summary["test_loss"])


# ---------------------------------------------------------------------------
# Preemption and exact resume, through the command line.


def _main(workdir, num_steps):
    return [
        sys.executable, "-m", "dirac_jax.main", "--config=configs/cifar_dirac.py",
        f"--workdir={workdir}", "--config.dataset.source=synthetic", "--config.model.depth=10",
        "--config.model.width=0.25", "--config.batch_size=16", "--config.eval_batch_size=256",
        f"--config.num_train_steps={num_steps}", "--config.log_every_steps=1",
        "--config.checkpoint_every_steps=7", f"--config.eval_every_steps={num_steps}",
    ]  # fmt: skip


@pytest.mark.accelerator
def test_sigterm_then_rerun_resumes_bit_exactly(tmp_path):
    # On a GPU bit-exactness needs deterministic kernels and no timing-driven algorithm
    # choice: XLA_FLAGS=--xla_gpu_deterministic_ops=true (launch/device_check.sh sets it).
    _check_sigterm_resume(tmp_path, _main, num_steps=50, interrupt_after=8)


@pytest.mark.slow
def test_group_sigterm_then_rerun_resumes_bit_exactly_on_streamed_images(
    tmp_path, image_tree, request
):
    # configs/imagenet_dirac.py end to end on real JPEGs with two Grain worker processes
    # (`pytest --grain-workers=32` for the config's own count): the SIGTERM reaches the
    # whole process group (workers included), the input position (the workers'
    # interleaved iterator state) is saved with the checkpoint, and the rerun skips a
    # partial step and resumes from the saved one.
    workers = request.config.getoption("--grain-workers")

    def command(workdir, num_steps):
        return _image_data.imagenet_cli(
            image_tree, workdir, num_steps, f"--config.dataset.num_workers={workers}",
            "--config.checkpoint_every_steps=5",
        )  # fmt: skip

    _check_sigterm_resume(
        tmp_path, command, num_steps=8, interrupt_after=3, streamed=True, group=True
    )


def _check_sigterm_resume(
    tmp_path, command, num_steps, interrupt_after, streamed=False, group=False
):
    """SIGTERM after step `interrupt_after` (to the whole process group if `group`), rerun,
    and compare with an uninterrupted run; with `streamed`, a partial step is left behind
    too, as a save cut short by the preemption would."""
    # The checkout first; a PYTHONPATH set outside stays (launch/device_check.sh puts the
    # wheels a host lacked there).
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    run = dict(cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    full = subprocess.Popen(command(tmp_path / "full", num_steps), **run)
    hook = f"{interrupt_after}:group" if group else str(interrupt_after)
    broken = subprocess.Popen(
        command(tmp_path / "broken", num_steps),
        **{**run, "env": {**env, train.SIGTERM_TEST_ENV: hook}},
        start_new_session=True,  # its own process group: the trainer and its Grain workers
    )
    out, err = broken.communicate(timeout=300)
    assert broken.returncode == 0, err[-3000:]
    # Every process of the group got the SIGTERM; none died of it. A Grain worker killed by
    # it leaves its shared-memory batches behind (Python's resource tracker reports them)
    # and fails the trainer's next read with a traceback.
    for sign in ("Traceback", "terminated unexpectedly", "leaked shared_memory"):
        assert sign not in err, err[-3000:]
    stopped = int(re.search(r"preempted at step (\d+); rerun the same command to resume", out)[1])
    assert stopped == interrupt_after
    assert not (tmp_path / "broken" / workdir.SUMMARY_FILE).exists()
    mngr = checkpoint.create_manager(tmp_path / "broken")
    assert mngr.latest_step() == stopped  # saved at the preemption step, off the save grid
    mngr.close()
    data_file = pathlib.Path(checkpoint.checkpoint_dir(tmp_path / "broken")) / str(stopped)
    assert (data_file / "data" / "process_0-of-1.json").is_file() == streamed
    if streamed:
        partial = _write_partial_step(tmp_path / "broken", stopped + 1)

    resumed = subprocess.run(command(tmp_path / "broken", num_steps), **run, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    if streamed:
        assert not partial.exists() and "Skipped the partial checkpoint" in resumed.stderr
        assert "with the saved input position" in resumed.stderr
    out, err = full.communicate(timeout=300)
    assert full.returncode == 0, err[-3000:]

    a, b = (
        json.loads((tmp_path / d / workdir.SUMMARY_FILE).read_text()) for d in ("full", "broken")
    )
    assert a["step"] == b["step"] == num_steps
    assert a["test_loss"] == b["test_loss"] and a["test_top1"] == b["test_top1"]
    full_state, resumed_state = (
        _saved_tree(tmp_path / "full", num_steps),
        _saved_tree(tmp_path / "broken", num_steps),
    )
    assert jax.tree.structure(full_state) == jax.tree.structure(resumed_state)
    for x, y in zip(jax.tree.leaves(full_state), jax.tree.leaves(resumed_state), strict=True):
        assert np.array_equal(x, y)
    # The logged losses agree step for step, each step logged exactly once.
    losses = {
        d: [
            (r["step"], r["train_loss"])
            for r in metrics.read_metrics(tmp_path / d)
            if r["kind"] == "train"
        ]
        for d in ("full", "broken")
    }
    assert losses["full"] == losses["broken"]
    assert [s for s, _ in losses["broken"]] == list(range(1, num_steps + 1))

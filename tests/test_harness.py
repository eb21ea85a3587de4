"""The runtime the tests and command lines share: XLA:CPU flags, and a suite that needs no torch."""

import ast
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dirac_jax import xla_cpu

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _jaxlib():
    from importlib import metadata

    return metadata.version("jaxlib")


def test_flags_only_for_the_affected_jaxlib_versions():
    assert xla_cpu.flags_for("0.10.2") == xla_cpu.CPU_FLAGS
    assert xla_cpu.flags_for("0.11.0") == xla_cpu.CPU_FLAGS
    assert xla_cpu.flags_for("0.10.1") == () and xla_cpu.flags_for("0.12.0") == ()


def test_apply_appends_keeps_the_users_value_and_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(xla_cpu, "_installed_jaxlib", lambda: "0.10.2")
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert xla_cpu.apply(env) == xla_cpu.CPU_FLAGS
    assert env["XLA_FLAGS"].split() == [
        "--xla_force_host_platform_device_count=2",
        *xla_cpu.CPU_FLAGS,
    ]
    assert xla_cpu.apply(env) == xla_cpu.CPU_FLAGS  # idempotent
    assert env["XLA_FLAGS"].count("ynn_fusion_type") == 1
    mine = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}
    xla_cpu.apply(mine)
    assert mine["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot"
    off = {xla_cpu.OPT_OUT: "0"}
    assert xla_cpu.apply(off) == () and "XLA_FLAGS" not in off
    monkeypatch.setattr(xla_cpu, "_installed_jaxlib", lambda: "0.12.0")
    untouched = {}
    assert xla_cpu.apply(untouched) == () and untouched == {}


@pytest.mark.parametrize(
    "module",
    [
        "dirac_jax/main.py",
        "dirac_jax/evaluate.py",
        "dirac_jax/export.py",
        "dirac_jax/reproduce/__main__.py",
        "benchmarks/__main__.py",
    ],
)
def test_every_command_line_applies_the_flags(module):
    tree = ast.parse((ROOT / module).read_text())
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "apply"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "xla_cpu"
    ]
    assert calls, f"{module} never calls xla_cpu.apply()"


def test_the_tests_run_with_the_flags_in_force():
    flags = os.environ.get("XLA_FLAGS", "").split()
    for flag in xla_cpu.flags_for(_jaxlib()):
        assert flag in flags


@pytest.mark.skipif(not xla_cpu.flags_for(_jaxlib()), reason="jaxlib has no known YNNPACK defect")
def test_the_ynnpack_segfault_reproducer_runs_under_the_flags():
    # jax-ml/jax#40412: a rank-7 float32 multiply-reduce with a size-1 axis. Under jaxlib
    # 0.10.2's defaults it dies with SIGSEGV on an Eigen worker thread (seen on AMD EPYC
    # and Intel Xeon); with YNNPACK fusions off it computes the right sum.
    program = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        s = (3, 1, 2, 2, 8, 8, 8)
        u = jax.random.normal(jax.random.key(0), s)
        v = jax.random.normal(jax.random.key(1), s)
        got = np.asarray(jax.jit(lambda a, b: jnp.sum(a * b, axis=3))(u, v))
        want = (np.asarray(u, np.float64) * np.asarray(v, np.float64)).sum(3)
        print(float(np.abs(got - want).max()))
        """
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.strip().splitlines()[-1]) < 1e-5


def test_the_jit_reduction_miscompilation_is_absent():
    # jax-ml/jax#39103: on jaxlib 0.10.2's defaults a vmapped matrix-vector product
    # followed by a sum gives a jitted result off by 0.2% at 32,769 rows (float32).
    i = jnp.arange(32_769, dtype=jnp.float32)
    x = jnp.stack((i, jnp.zeros_like(i), jnp.zeros_like(i)), axis=1)
    m = jnp.eye(3)

    def f(x):
        return jax.vmap(lambda row: jnp.sum((m @ row) ** 2))(x)

    assert float(jax.jit(f)(x)[-1]) == float(f(x)[-1]) == 32_768.0**2


def test_arctan_is_right_on_long_arrays():
    # jax-ml/jax#39352: jnp.arctan on 50 or more elements on jaxlib 0.10.2 (AVX-512 CPUs).
    # The project never calls it; this pins the answer on the machine the suite runs on.
    x = np.linspace(-4, 4, 257, dtype=np.float32)
    np.testing.assert_allclose(np.asarray(jnp.arctan(x)), np.arctan(x), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_the_suite_collects_and_runs_without_torch(tmp_path):
    # A package named torch that fails to import stands in for an environment without it.
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    base = [sys.executable, "-m", "pytest", "-p", "no:xdist", "-q"]
    collected = subprocess.run(
        [*base, "--collect-only"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-2000:]
    assert "error" not in collected.stdout.splitlines()[-1].lower(), collected.stdout[-3000:]
    ran = subprocess.run(
        [*base, "-rs", "tests/test_torch_checkpoint.py", "tests/test_reference_training.py",
         "tests/test_bench.py::test_torch_candidates_train_the_same_model",
         "benchmarks/train.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-2000:]
    skips = [line for line in ran.stdout.splitlines() if line.startswith("SKIPPED")]
    assert skips and all("torch" in line for line in skips), ran.stdout[-3000:]
    assert " skipped" in ran.stdout.splitlines()[-1], ran.stdout[-3000:]

"""The wheel is the library: dirac_jax's modules and its configs, nothing else of the checkout.

The benchmarks and the device tooling (`benchmarks/`), the tests and `launch/`
run from a checkout; a user who installs the wheel gets the library, its
command lines (`python -m dirac_jax.main`, ...) and the papers' experiments
(`dirac_jax.reproduce`), which depend on the library alone.
"""

import importlib.util
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# What the checkout holds beside the library; none of it may reach the wheel.
CHECKOUT_ONLY = ("benchmarks", "tests", "launch", "docs", "conftest.py")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel built from a copy of the checkout (so no `build/` is left in it)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    skip = {".git", ".ci", "build", "dist"}
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".*cache", ".venv*", "*.pyc")
    src.mkdir()
    for entry in ROOT.iterdir():
        if entry.name in skip or entry.name.startswith(".venv"):
            continue
        if entry.is_dir():
            shutil.copytree(entry, src / entry.name, ignore=ignore, symlinks=True)
        elif entry.is_file():
            shutil.copy(entry, src / entry.name)
    assert all((src / name).exists() for name in CHECKOUT_ONLY)  # there to be left out
    out = tmp / "out"
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps"]
    if importlib.util.find_spec("setuptools") is not None:
        # The venv's own setuptools, no download; a fresh venv on Python 3.12+ has none, and
        # pip then builds in isolation with setuptools from its index.
        cmd.append("--no-build-isolation")
    subprocess.run([*cmd, "-w", str(out), str(src)], check=True, timeout=300, cwd=tmp)
    (path,) = out.glob("dirac_jax-*.whl")
    with zipfile.ZipFile(path) as z:
        yield z


def _library_files() -> set[str]:
    """The wheel's paths of dirac_jax's modules and of the configs (dirac_jax.configs)."""
    files = {str(p.relative_to(ROOT)) for p in (ROOT / "dirac_jax").rglob("*.py")}
    files |= {f"dirac_jax/configs/{p.name}" for p in (ROOT / "configs").glob("*.py")}
    return files


def test_the_wheel_holds_exactly_the_library_and_its_configs(wheel):
    names = wheel.namelist()
    top = {n.split("/")[0] for n in names}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"dirac_jax"}, sorted(top)
    modules = {n for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert modules == _library_files(), (
        f"in the wheel only: {sorted(modules - _library_files())}; "
        f"missing from it: {sorted(_library_files() - modules)}"
    )
    (meta,) = dist_info
    assert wheel.read(f"{meta}/top_level.txt").decode().split() == ["dirac_jax"]


def test_the_wheel_holds_no_benchmark_device_tooling_tests_or_launch_scripts(wheel):
    # Named checks beside the exact list above, so a failure says what leaked.
    names = wheel.namelist()
    folders = {"benchmarks", "bench", "tests", "launch", "docs"}
    leaked = sorted(n for n in names if folders & set(pathlib.PurePosixPath(n).parts))
    assert not leaked, leaked
    stems = {pathlib.PurePosixPath(n).stem for n in names}
    tooling = {"device_check", "device_sections", "_host_deps", "_timing", "conftest"}
    assert not stems & tooling, sorted(stems & tooling)
    assert not [n for n in names if pathlib.PurePosixPath(n).name.startswith("test_")]
    assert not [n for n in names if n.endswith((".sh", ".md"))]


def test_the_wheel_ships_the_experiments_and_command_lines(wheel):
    # `dirac_jax.reproduce` is part of the product (the papers' claims from an installed
    # wheel), as are the command lines; a wheel without them would pass the exact check only
    # if the tree lost them too, so they are named here.
    names = set(wheel.namelist())
    for module in ("reproduce/__main__.py", "main.py", "evaluate.py", "export.py", "fold.py"):
        assert f"dirac_jax/{module}" in names, module
    assert "dirac_jax/configs/cifar_dirac.py" in names

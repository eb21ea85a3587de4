"""pyproject.toml's lower bounds are the versions CI's floor stack installs and tests.

`launch/test.sh` runs the whole suite on the floor: every dependency pinned by
`launch/constraints.txt`. A lower bound below its pin would promise a version
nothing tests; one above it would make the floor uninstallable. PyTorch is the
one exception: it is not pinned (its CPU wheel comes from a local file, see
launch/test.sh), and its bound is the version of that wheel.
"""

import pathlib
import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parents[1]
UNPINNED = {"torch": Version("2.13")}


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "launch" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and "==" in line:  # `torch @ file://...` names the local wheel (UNPINNED)
            name, version = line.split("==")
            pins[_name(name)] = Version(version)
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [r for group in project["optional-dependencies"].values() for r in group]
    return [Requirement(r) for r in [*project["dependencies"], *extras]]


def _floor(requirement: Requirement) -> Version | None:
    bounds = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
    return bounds[0] if bounds else None


def _floor_mismatches(requirements, pins) -> list[str]:
    wrong = []
    for requirement in requirements:
        name = _name(requirement.name)
        if name == "dirac-jax":  # the project's own extras
            continue
        floor = _floor(requirement)
        pinned = UNPINNED.get(name, pins.get(name))
        if floor is None or pinned is None or floor != pinned:
            wrong.append(f"{requirement} (constraints.txt: {pinned})")
    return wrong


def test_every_lower_bound_is_the_floor_stacks_pin():
    assert _floor_mismatches(_requirements(), _pins()) == []


@pytest.mark.parametrize("requirement", ["jax>=0.7", "jax", "newpackage>=1.0"])
def test_a_bound_nothing_tests_is_caught(requirement):
    assert _floor_mismatches([Requirement(requirement)], _pins()) != []


def test_requires_python_is_the_floor_stacks_python():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"
    assert (
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["target-version"]
        == "py311"
    )

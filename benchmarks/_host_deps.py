"""Which of the project's requirements a host lacks, and the wheels in a folder that supply them.

Run by `launch/device_check.sh` before anything of the project is imported, so
this module uses the standard library and pip's own `packaging` only (it needs
no JAX). `python -m benchmarks._host_deps --wheels DIR` prints the wheel
files to install, one per line, and says on stderr what stays unmet.

What is already installed is used as it is: a requirement is planned from the
folder only when it is absent, or installed at a version outside the project's
range and the folder holds one inside it. The wheels are installed with
`--no-deps`, so the plan follows the requirements of every planned wheel too.
The streamed-input stack (Grain, TFDS, ArrayRecord) is left out: no section of
the device check reads a dataset from disk.

`outside_tested_range` says whether the host's JAX, Flax and Orbax are ones the
test suite has passed on; the device check stops before its first section when
they are not, since a failure there would not say whether the host or the
untested stack is at fault.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
import zipfile
from collections.abc import Iterable
from importlib import metadata

try:  # pip vendors `packaging`, so it is there wherever pip is.
    from packaging.requirements import Requirement
    from packaging.tags import sys_tags
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import InvalidVersion, Version
except ImportError:  # pragma: no cover - depends on the host
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.tags import sys_tags
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename
    from pip._vendor.packaging.version import InvalidVersion, Version

__all__ = [
    "DEVICE_CHECK_EXTRAS",
    "STREAMING",
    "TESTED",
    "TESTED_THROUGH",
    "Plan",
    "installed_versions",
    "outside_tested_range",
    "plan",
    "project_requirements",
    "pinned_floor",
]

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Needed only to stream datasets from disk (the ImageNet pipeline), never by the device check.
STREAMING = ("grain", "tensorflow-datasets", "array-record")
# What the accelerator tests need beyond the project's own requirements.
DEVICE_CHECK_EXTRAS = ("pytest>=8", "onnx>=1.16", "onnxruntime>=1.18")

# The stack whose versions the device check holds to the range the suite has passed on. The
# floor is the pinned stack CI tests (launch/constraints.txt, read by `pinned_floor`); the
# ceiling is the newest stack CI tests, by release prefix: "0.12" takes every 0.12.x, "0.12.12"
# nothing after it. Raise it when CI has passed on a newer release.
TESTED = ("jax", "flax", "orbax-checkpoint")
TESTED_THROUGH = {"jax": "0.12", "flax": "0.12.12", "orbax-checkpoint": "0.12.8"}


def project_requirements(pyproject: pathlib.Path = ROOT / "pyproject.toml") -> list[str]:
    """The project's requirements without `STREAMING`, plus `DEVICE_CHECK_EXTRAS`."""
    try:
        import tomllib
    except ImportError as e:  # Python 3.10
        raise SystemExit("the device check needs Python 3.11 or newer (tomllib)") from e
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    skip = {canonicalize_name(n) for n in STREAMING}
    kept = [d for d in deps if canonicalize_name(Requirement(d).name) not in skip]
    return kept + list(DEVICE_CHECK_EXTRAS)


def pinned_floor(constraints: pathlib.Path = ROOT / "launch" / "constraints.txt") -> dict:
    """`{name: version}` of `TESTED` as `constraints` pins them (`name==version` lines)."""
    pins = {}
    for line in constraints.read_text().splitlines():
        name, sep, version = line.split("#", 1)[0].strip().partition("==")
        if sep and canonicalize_name(name) in TESTED:
            pins[canonicalize_name(name)] = version.strip()
    missing = [n for n in TESTED if n not in pins]
    if missing:
        raise ValueError(f"{constraints} pins no version of {', '.join(missing)}")
    return pins


def installed_versions() -> dict:
    """`{name: version or None}` of `TESTED` in this interpreter (None: not installed)."""
    return {name: _installed(name) for name in TESTED}


def _within(version: str, floor: str, through: str) -> bool:
    release = Version(version).release
    ceiling = Version(through).release
    return release >= Version(floor).release and release[: len(ceiling)] <= ceiling


def outside_tested_range(versions, floor=None, through=None) -> str | None:
    """One line naming what in `versions` is outside the tested range; None if all is in it.

    `versions` maps names of `TESTED` to installed versions (None: not installed);
    `floor` and `through` default to `pinned_floor()` and `TESTED_THROUGH`.

    Examples:
      >>> floor = {"jax": "0.10.2", "flax": "0.12.8", "orbax-checkpoint": "0.12.8"}
      >>> ok = {"jax": "0.12.1", "flax": "0.12.12", "orbax-checkpoint": "0.12.8"}
      >>> outside_tested_range(ok, floor) is None
      True
      >>> print(outside_tested_range(ok | {"flax": "0.13.0"}, floor))
      untested JAX stack: flax 0.13.0 (tested: jax 0.10.2 to 0.12.x, flax 0.12.8 to 0.12.12, ...)
    """
    floor = pinned_floor() if floor is None else floor
    through = TESTED_THROUGH if through is None else through
    bad = []
    for name in TESTED:
        version = versions.get(name)
        if version is None:
            bad.append(f"{name} not installed")
            continue
        try:
            inside = _within(version, floor[name], through[name])
        except InvalidVersion:
            inside = False
        if not inside:
            bad.append(f"{name} {version}")
    if not bad:
        return None
    span = ", ".join(
        f"{n} {floor[n]} to {through[n]}{'.x' if len(Version(through[n]).release) < 3 else ''}"
        for n in TESTED
    )
    return f"untested JAX stack: {', '.join(bad)} (tested: {span})"


class Plan:
    """`wheels` to install; `unmet`: requirements neither installed nor in the folder."""

    def __init__(self):
        self.wheels: list[pathlib.Path] = []
        self.unmet: list[str] = []
        self.outdated: list[str] = []


def _wheel_index(folder: pathlib.Path | None) -> dict[str, list[tuple]]:
    """`{name: [(version, path), ...]}` of the wheels in `folder` this interpreter can install."""
    index: dict[str, list[tuple]] = {}
    if folder is None:
        return index
    supported = set(sys_tags())
    for path in sorted(folder.glob("*.whl")):
        try:
            name, version, _, tags = parse_wheel_filename(path.name)
        except Exception:  # A file that only looks like a wheel is not one to install.
            continue
        if supported.isdisjoint(tags):
            continue
        index.setdefault(name, []).append((version, path))
    for versions in index.values():
        versions.sort(key=lambda v: v[0], reverse=True)
    return index


def _wheel_requires(path: pathlib.Path) -> list[str]:
    """The `Requires-Dist` lines of a wheel's METADATA."""
    with zipfile.ZipFile(path) as z:
        name = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        text = z.read(name).decode("utf-8", "replace")
    return [
        line.split(":", 1)[1].strip()
        for line in text.splitlines()
        if line.startswith("Requires-Dist:")
    ]


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _wanted(req: Requirement, extras: Iterable[str]) -> bool:
    """Whether `req` applies on this interpreter for the given extras of its parent."""
    if req.marker is None:
        return True
    return any(req.marker.evaluate({"extra": e}) for e in ("", *extras))


def plan(requirements: Iterable[str], wheel_dir: pathlib.Path | None) -> Plan:
    """What to install from `wheel_dir` so `requirements` hold here (see the module doc).

    Examples:
      >>> p = plan(["pip"], None)   # installed wherever this runs
      >>> p.wheels, p.unmet
      ([], [])
    """
    index = _wheel_index(wheel_dir)
    result, seen = Plan(), set()
    queue = [(Requirement(r), ()) for r in requirements]
    while queue:
        req, parent_extras = queue.pop(0)
        if not _wanted(req, parent_extras):
            continue
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        have = _installed(name)
        if have is not None and req.specifier.contains(have, prereleases=True):
            # Installed and in range: its extras' requirements must hold too.
            if req.extras:
                for line in metadata.requires(name) or []:
                    sub = Requirement(line)
                    if sub.marker is not None and not sub.marker.evaluate({"extra": ""}):
                        queue.append((sub, tuple(req.extras)))
            continue
        fits = [p for v, p in index.get(name, []) if req.specifier.contains(v, prereleases=True)]
        if fits:
            result.wheels.append(fits[0])
            queue += [(Requirement(r), tuple(req.extras)) for r in _wheel_requires(fits[0])]
        elif have is None:
            result.unmet.append(str(req))
        else:
            result.outdated.append(f"{req} (installed: {have})")
    return result


def _download_hint(names: list[str]) -> str:
    py = f"{sys.version_info[0]}.{sys.version_info[1]}"
    quoted = " ".join(f"'{n}'" for n in names)
    return (
        f"  on a machine with network: pip download --only-binary=:all: --python-version {py} "
        f"--platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d WHEELS {quoted}"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks._host_deps", description=__doc__)
    p.add_argument("--wheels", type=pathlib.Path, default=None, help="folder of wheels.")
    args = p.parse_args(argv)
    if args.wheels is not None and not args.wheels.is_dir():
        print(f"error: --wheels {args.wheels} is not a folder", file=sys.stderr)
        return 2
    result = plan(project_requirements(), args.wheels)
    for path in result.wheels:
        print(path)
    for line in result.outdated:
        print(f"warning: {line} is outside the project's range; using it", file=sys.stderr)
    if result.unmet:
        where = f"in {args.wheels}" if args.wheels else "(no --wheels folder given)"
        print(
            f"error: not installed and no wheel {where}: {', '.join(result.unmet)}\n"
            + _download_hint(result.unmet),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

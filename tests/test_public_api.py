"""The public surface: `__all__` everywhere, no imports of private modules, paper citations.

The rules hold for the library (`dirac_jax/`) and for the benchmarks beside it
(`benchmarks/`), which use the library the way a user does: through its public
names only. The library never imports the benchmarks (the wheel ships without them).
"""

import ast
import importlib
import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

import dirac_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dirac_jax"
BENCHMARKS = ROOT / "benchmarks"  # run from a checkout, not in the wheel


def _files():
    """Every module of the library and of the benchmarks."""
    return sorted([*PACKAGE.rglob("*.py"), *BENCHMARKS.rglob("*.py")])


def _public_modules():
    for path in _files():
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts[-1] == "__main__" or any(p.startswith("_") for p in parts):
            continue
        yield ".".join(parts)


@pytest.mark.parametrize("name", list(_public_modules()))
def test_every_public_module_states_its_api(name):
    module = importlib.import_module(name)
    assert isinstance(getattr(module, "__all__", None), list), f"{name} has no __all__"
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names missing attributes {missing}"


def test_no_module_imports_another_packages_private_modules():
    offenders = []
    for path in _files():
        package = ".".join(path.relative_to(ROOT).parent.parts)
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                parts = name.split(".")
                private = [i for i, p in enumerate(parts) if p.startswith("_")]
                if parts[0] in ("dirac_jax", "benchmarks") and private:
                    owner = ".".join(parts[: private[0]])
                    if owner != package:
                        offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, offenders


def test_the_library_never_imports_the_benchmarks():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            offenders += [
                f"{path.relative_to(ROOT)}:{node.lineno} imports {name}"
                for name in names
                if name.split(".")[0] == "benchmarks"
            ]
    assert not offenders, offenders


def test_docstrings_cite_papers_not_files():
    pattern = re.compile(r"shared/seeds|\b\d{3}_[0-9a-f]{8,}\.txt")
    files = [*_files(), *(ROOT / "configs").glob("*.py"), ROOT / "README.md"]
    cited = [str(p.relative_to(ROOT)) for p in files if pattern.search(p.read_text())]
    assert not cited, f"files that cite unshipped notes: {cited}"


def test_top_level_entry_points():
    from dirac_jax import evaluate, export, models, workdir

    assert dirac_jax.load is workdir.load
    assert dirac_jax.get_model is models.get_model
    with pytest.raises(AttributeError, match=r"fold_net was removed: use dirac_jax\.fold\.fold"):
        dirac_jax.fold_net  # noqa: B018
    assert dirac_jax.evaluate_workdir is evaluate.evaluate_workdir
    assert dirac_jax.export_workdir is export.export_workdir
    assert set(dirac_jax.__all__) <= set(dir(dirac_jax))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dirac_jax.nope  # noqa: B018


# ---------------------------------------------------------------------------
# The layout's rules (docs/layout.md).

MAX_MODULE_LINES = 600


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    parent = name.rpartition(".")[0]
    if not name.startswith("dirac_jax") or not hasattr(importlib.import_module(parent), "__path__"):
        return False
    return importlib.util.find_spec(name) is not None


def _uses(path: pathlib.Path):
    """`(line, module, name)` for every name this file takes from another dirac_jax module.

    Both ways count: `from dirac_jax.m import name` and `m.name` where `m` is
    bound to a dirac_jax module by an import anywhere in the file.
    """
    tree = ast.parse(path.read_text())
    bound = {}  # local name -> dirac_jax module
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dirac_jax"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if _is_module(full):
                    bound[alias.asname or alias.name] = full
                else:
                    yield node.lineno, node.module, alias.name
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("dirac_jax") and alias.asname:
                    bound[alias.asname] = alias.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            module = bound.get(node.value.id)
            if module and not _is_module(f"{module}.{node.attr}"):
                yield node.lineno, module, node.attr


def test_no_module_is_longer_than_the_cap():
    long = {
        str(p.relative_to(ROOT)): n
        for p in _files()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_module_touches_another_modules_private_names():
    offenders = [
        f"{path.relative_to(ROOT)}:{line} uses {module}.{name}"
        for path in _files()
        for line, module, name in _uses(path)
        if name.startswith("_") and not name.startswith("__") and module != _module_name(path)
    ]
    assert not offenders, offenders


def test_what_a_module_uses_of_another_is_in_its_all():
    offenders = []
    for path in _files():
        for line, module, name in _uses(path):
            if module == _module_name(path) or name.startswith("_"):
                continue
            exported = getattr(importlib.import_module(module), "__all__", None)
            if exported is not None and name not in exported:
                offenders.append(f"{path.relative_to(ROOT)}:{line} uses {module}.{name}")
    assert not offenders, offenders


def test_the_attribute_check_sees_private_access(tmp_path):
    # The checks above must be able to fail: a private attribute and a private import.
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from dirac_jax import sharding\nfrom dirac_jax.workdir import _abstract\n"
        "sharding._hidden\n"
    )
    assert sorted(name for _, _, name in _uses(probe)) == ["_abstract", "_hidden"]


@pytest.mark.parametrize("module", ["dirac_jax.evaluate", "dirac_jax.export", "dirac_jax.workdir"])
def test_inference_imports_neither_the_trainer_nor_grain(module):
    code = (
        f"import sys, {module}\n"
        "bad = sorted(n for n in sys.modules\n"
        "             if n == 'dirac_jax.train' or n.split('.')[0] == 'grain')\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "", f"{module} imports {out.stdout.strip()}"


def test_the_package_lists_every_public_top_level_module():
    on_disk = {
        p.stem if p.suffix == ".py" else p.name
        for p in PACKAGE.iterdir()
        if not p.name.startswith("_") and (p.suffix == ".py" or (p / "__init__.py").exists())
    }
    on_disk -= {"main"}  # a command line, run with `python -m`
    missing = on_disk - set(dirac_jax.__all__)
    assert not missing, f"dirac_jax.__all__ (its _SUBMODULES) misses {sorted(missing)}"


def _layout_order() -> list[str]:
    """The module paths of the documentation's Layout page (docs/layout.md), in its order."""
    text = (ROOT / "docs" / "layout.md").read_text()
    return re.findall(r"^- `((?:dirac_jax|benchmarks)/[\w/]+\.py)`", text, flags=re.M)


def test_the_layout_page_lists_exactly_the_tree():
    listed = _layout_order()
    on_disk = {str(p.relative_to(ROOT)) for p in _files() if p.name != "__init__.py"}
    assert len(listed) == len(set(listed)), "a module is listed twice"
    assert set(listed) == on_disk, (
        f"not in docs/layout.md: {sorted(on_disk - set(listed))}; "
        f"listed but gone: {sorted(set(listed) - on_disk)}"
    )


def test_imports_flow_down_the_layout():
    # A module imports only modules listed above it (a package counts at its last module, its
    # __main__ aside).
    order = {}
    for i, path in enumerate(_layout_order()):
        name = _module_name(ROOT / path)
        order[name] = i
        parts = name.split(".")
        for k in range(2, len(parts)):
            if parts[-1] != "__main__":  # a package: where its last module is
                order[".".join(parts[:k])] = i
    climbs = []
    for path in _layout_order():
        here = _module_name(ROOT / path)
        for node in ast.walk(ast.parse((ROOT / path).read_text())):
            targets = []
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module in order | {"dirac_jax": 0, "benchmarks": 0}
            ):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.append(full if full in order else node.module)
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name in order]
            for target in targets:
                if target in order and order[target] > order[here]:
                    climbs.append(f"{path}:{node.lineno} imports {target}")
    assert not climbs, climbs

"""The public surface: `__all__` everywhere, no imports of private modules, paper citations."""

import ast
import importlib
import pathlib
import re

import pytest

import dirac_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dirac_jax"


def _public_modules():
    for path in sorted(PACKAGE.rglob("*.py")):
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
    for path in PACKAGE.rglob("*.py"):
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
                if parts[0] == "dirac_jax" and private:
                    owner = ".".join(parts[: private[0]])
                    if owner != package:
                        offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, offenders


def test_docstrings_cite_papers_not_files():
    pattern = re.compile(r"shared/seeds|\b\d{3}_[0-9a-f]{8,}\.txt")
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "configs").glob("*.py"), ROOT / "README.md"]
    cited = [str(p.relative_to(ROOT)) for p in files if pattern.search(p.read_text())]
    assert not cited, f"files that cite unshipped notes: {cited}"


def test_top_level_entry_points():
    from dirac_jax import evaluate, export, fold, models, workdir

    assert dirac_jax.load is workdir.load
    assert dirac_jax.get_model is models.get_model
    assert dirac_jax.fold_net is fold.fold
    assert dirac_jax.evaluate_workdir is evaluate.evaluate_workdir
    assert dirac_jax.export_workdir is export.export_workdir
    assert set(dirac_jax.__all__) <= set(dir(dirac_jax))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dirac_jax.nope  # noqa: B018

"""The documentation site (docs/, `bash launch/docs.sh`) and the README.

The API reference is docs/api/<module>.rst, one page per public module, each
name of its `__all__` under an autodoc directive. The source-level check here
finds a public name missing from it without building anything; the slow test
builds the site as `launch/docs.sh` does, warnings as errors, and runs the
guides' code.
"""

import ast
import importlib
import inspect
import os
import pathlib
import pkgutil
import re
import subprocess
import sys
import types

import pytest

import dirac_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
API = DOCS / "api"

_DIRECTIVE = re.compile(
    r"^\.\. (?:automodule|currentmodule|auto(?:function|class|data|exception|attribute))::\s+(\S+)",
    re.M,
)


def public_modules() -> list[str]:
    """dirac_jax and every module under it with no `_` in its path (command lines included)."""
    names = {"dirac_jax"}
    for info in pkgutil.walk_packages(dirac_jax.__path__, "dirac_jax."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.add(info.name)
    for name in dirac_jax.__all__:  # dirac_jax.configs lives outside the package folder
        if isinstance(getattr(dirac_jax, name), types.ModuleType):
            names.add(f"dirac_jax.{name}")
    return sorted(names)


def documented_names(page: str) -> tuple[str | None, set[str]]:
    """`(module, names)` of one API page: the module its `automodule` documents, and the
    names its autodoc directives document (relative to the page's `currentmodule`)."""
    module, names = None, set()
    for match in _DIRECTIVE.finditer(page):
        directive = match[0].split("::")[0][3:]
        if directive == "automodule":
            module = match[1]
        elif directive != "currentmodule":
            names.add(match[1])
    return module, names


def missing_from_reference(module: str, page: str | None) -> list[str]:
    """The names of `module.__all__` that its API page does not document."""
    if page is None:
        return [f"{module} (no page docs/api/{module}.rst)"]
    documented_module, names = documented_names(page)
    if documented_module != module:
        return [f"{module} (its page documents {documented_module})"]
    missing = []
    for name in importlib.import_module(module).__all__:
        value = getattr(importlib.import_module(module), name, None)
        if isinstance(value, types.ModuleType):
            if not (API / f"{value.__name__}.rst").exists():
                missing.append(f"{module}.{name} (module without a page)")
        elif name not in names:
            missing.append(f"{module}.{name}")
    return missing


def _page(module: str) -> str | None:
    path = API / f"{module}.rst"
    return path.read_text() if path.exists() else None


def test_every_public_name_is_in_the_api_reference():
    pages = {module: _page(module) for module in public_modules()}
    missing = [m for module, page in pages.items() for m in missing_from_reference(module, page)]
    assert not missing, f"missing from the API reference (add to docs/api/MODULE.rst): {missing}"


def test_the_reference_documents_only_public_names():
    stale = []
    for path in sorted(API.glob("*.rst")):
        module, names = documented_names(path.read_text())
        exported = set(importlib.import_module(module).__all__)
        stale += [f"{path.name}: {n}" for n in sorted(names - exported)]
    assert not stale, f"documented but not in the module's __all__: {stale}"


def test_the_check_fails_when_a_name_is_removed():
    page = _page("dirac_jax.param")
    assert missing_from_reference("dirac_jax.param", page) == []
    without = re.sub(r"^\.\. autofunction:: dirac\n", "", page, flags=re.M)
    assert without != page
    assert missing_from_reference("dirac_jax.param", without) == ["dirac_jax.param.dirac"]
    assert missing_from_reference("dirac_jax.param", None) == [
        "dirac_jax.param (no page docs/api/dirac_jax.param.rst)"
    ]


# An autodoc directive and its indented block (options `:name:` and content), up to the next
# line that is neither blank nor indented.
_ENTRY = re.compile(r"^\.\. (auto\w+)::[ \t]+(\S+)\n((?:(?:[ \t]+.*)?\n)*)", re.M)


def _has_doc_comment(module: types.ModuleType, name: str) -> bool:
    """Whether `module` assigns `name` with a description autodoc shows: a `#:` comment
    right above or on the assignment, or a string right after it."""
    source = inspect.getsource(module)
    lines = source.splitlines()
    body = ast.parse(source).body
    for i, node in enumerate(body):
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        else:
            continue
        if not any(isinstance(t, ast.Name) and t.id == name for t in targets):
            continue
        above = lines[node.lineno - 2].lstrip() if node.lineno > 1 else ""
        inline = re.search(r"\s#:\s", lines[node.end_lineno - 1])
        nxt = body[i + 1] if i + 1 < len(body) else None
        after = isinstance(nxt, ast.Expr) and isinstance(getattr(nxt.value, "value", None), str)
        return above.startswith("#:") or bool(inline) or after
    return False


def _has_docstring(obj) -> bool:
    """Whether a function or class has its own docstring (not a generated or inherited one)."""
    doc = vars(obj).get("__doc__") if inspect.isclass(obj) else obj.__doc__
    if inspect.isclass(obj) and hasattr(obj, "_fields"):  # a NamedTuple's generated one
        generated = f"{obj.__name__}({', '.join(obj._fields)})"
        doc = None if doc == generated else doc
    return bool(doc and doc.strip())


def undescribed(module_name: str, page: str) -> list[str]:
    """The entries of an API page that would render with no description: neither content
    under the directive nor, for a constant, a `#:` comment where the page's module assigns
    it (autodoc reads comments only there), nor, for a function or class, a docstring."""
    module = importlib.import_module(module_name)
    missing = []
    for directive, name, block in _ENTRY.findall(page):
        if directive in ("automodule", "currentmodule"):
            continue
        content = [s for s in block.splitlines() if s.strip() and not s.strip().startswith(":")]
        if content:
            continue
        obj = getattr(module, name, None)
        if directive == "autodata":
            described = _has_doc_comment(module, name)
        else:
            described = _has_docstring(obj)
        if not described:
            missing.append(f"{module_name}.{name}")
    return missing


def test_every_api_entry_has_a_description():
    missing = []
    for path in sorted(API.glob("*.rst")):
        page = path.read_text()
        module, _ = documented_names(page)
        missing += undescribed(module, page)
    assert not missing, (
        "no description (add a `#:` comment on the assignment, or indented text under the "
        f"directive in docs/api/MODULE.rst): {missing}"
    )


def test_the_description_check_fails_without_one(tmp_path, monkeypatch):
    # Content under the directive: a re-exported constant's only description.
    page = _page("dirac_jax.param")
    assert undescribed("dirac_jax.param", page) == []
    entry = re.compile(r"(^\.\. autodata:: SYMMETRIC_KINDS\n)(?:(?:   .*)?\n)*", re.M)
    bare = entry.sub(r"\1\n", page)
    assert bare != page
    assert undescribed("dirac_jax.param", bare) == ["dirac_jax.param.SYMMETRIC_KINDS"]
    # `#:` comments and strings after the assignment, as autodoc reads them.
    (tmp_path / "described_consts.py").write_text(
        '"""Constants."""\n\n#: Described above.\nA = 1\nB = 2  #: Described inline.\nC = 3\n'
        '"""Described after."""\n# A plain comment is not shown.\nD = 4\nE = 5\n'
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    entries = "".join(f".. autodata:: {n}\n\n" for n in "ABCDE")
    assert undescribed("described_consts", entries) == ["described_consts.D", "described_consts.E"]


def test_every_api_page_is_in_the_reference_index():
    index = (API / "index.md").read_text()
    pages = {p.stem for p in API.glob("*.rst")}
    listed = set(re.findall(r"^(dirac_jax[\w.]*)$", index, flags=re.M))
    modules = set(public_modules())
    assert pages == listed == modules, (pages ^ listed) | (pages ^ modules)


def test_the_readme_is_short_and_its_links_exist():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    links = re.findall(r"\]\((?!https?://|#)([^)#]+)", readme)
    assert links, "the README links to the guides"
    absent = [link for link in links if not (ROOT / link).exists()]
    assert not absent, f"README links to missing files: {absent}"


@pytest.mark.slow
def test_the_readmes_taste_of_the_api_runs():
    # The first Python block needs no trained run; the second is the getting-started guide's,
    # which the docs build runs after training.
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["kernel"].shape == (3, 3, 16, 16)
    assert float(namespace["error"]) < 1e-4


@pytest.mark.slow
@pytest.mark.timeout(900)  # two Sphinx builds and the guides' six command lines, one after another
def test_the_site_builds_with_warnings_as_errors_and_the_guides_run(tmp_path):
    # As launch/docs.sh, without the set-up. The guides run on one CPU device, as a user's do.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    for builder in ("html", "doctest"):
        result = subprocess.run(
            [sys.executable, "-m", "sphinx", "-b", builder, "-W", "--keep-going", "-q"]
            + [str(DOCS), str(tmp_path / builder)],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
        )
        output = f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        assert result.returncode == 0, f"{builder}:\n{output}"
    assert (tmp_path / "html" / "api" / "dirac_jax.param.html").exists()
    summary = (tmp_path / "doctest" / "output.txt").read_text()
    assert re.search(r"[1-9]\d* tests", summary) and "0 failures in tests" in summary, summary

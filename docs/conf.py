"""Sphinx configuration for the dirac_jax documentation (`bash launch/docs.sh`).

The build is strict: `-W --keep-going` turns every warning into an error and
`nitpicky` makes every unresolved cross-reference one. It needs no network:
intersphinx is off, so names of other packages (jax, flax, numpy, the standard
library) cannot resolve; `nitpick_ignore` lists each one the docstrings'
signatures mention, by name, so a new unresolved name still fails the build.
"""

import os
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's dirac_jax and benchmarks/

# The guides' code runs in this process (the doctest builder). Set what the command lines set
# before JAX starts its CPU backend: the XLA:CPU flags for jaxlib's known CPU defects
# (dirac_jax.xla_cpu), and no probing of accelerator backends this machine lacks.
from dirac_jax import xla_cpu  # noqa: E402  (imports no JAX)

xla_cpu.apply()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dirac_jax  # noqa: E402

project = "dirac_jax"
author = "dirac_jax authors"
copyright = "the dirac_jax authors"  # noqa: A001
release = version = dirac_jax.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "results/*.md"]
templates_path = []

# The docstrings write `name` for code, as Markdown does.
default_role = "code"

# MyST: `{doctest}`/`{testcode}` fences run under sphinx.ext.doctest; headings get anchors so
# pages link to sections; `$...$` is not needed.
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": False}
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# The guides' blocks run; the docstrings' examples run under pytest (--doctest-modules), so the
# doctest builder skips the docstrings autodoc brings in.
doctest_test_doctest_blocks = ""
doctest_global_setup = ""

html_theme = "furo"
html_title = f"dirac_jax {release}"
html_static_path = []

nitpicky = True
# Names the signatures mention that cannot resolve offline (intersphinx is off, so no other
# package's inventory is read): the standard library's, and jax, numpy, flax, optax, orbax,
# ml_collections and etils types, under the module paths their objects report. Also the
# aliases `dirac_jax.param` writes its types with (`Array`, `PRNGKey`, `Params`, `ArrayTree`:
# plain names for jax.Array and "a pytree", not classes), and one private block class that a
# public signature names. Each is listed by name, so a new unresolved name fails the build.
nitpick_ignore = [
    ("py:class", name)
    for name in (
        # Python's standard library.
        "collections.abc.Callable",
        "collections.abc.Iterator",
        "collections.abc.Mapping",
        "collections.abc.MutableMapping",
        "collections.abc.Sequence",
        "logging.LogRecord",
        "os.PathLike",
        "pathlib.Path",
        # jax and numpy.
        "jax.Array",
        "jax.jaxlib._jax.Array",
        "jax._src.mesh.Mesh",
        "jax.sharding.NamedSharding",
        "np.ndarray",
        "numpy.bool",
        "numpy.ndarray",
        "numpy.number",
        "numpy.random._generator.Generator",
        # flax (a Linen module's dataclass fields `parent` and `name`), optax, orbax.
        "flax.core.frozen_dict.FrozenDict",
        "flax.core.scope.Scope",
        "flax.linen.module.Module",
        "flax.linen.module._Sentinel",
        "optax._src.base.GradientTransformation",
        "optax.OptState",
        "orbax.checkpoint.checkpoint_manager.CheckpointManager",
        # ml_collections and etils.
        "ml_collections.ConfigDict",
        "ml_collections.config_dict.config_dict.ConfigDict",
        "etils.epath.abstract_path.Path",
        # dirac_jax.param's type aliases.
        "Array",
        "ArrayTree",
        "PRNGKey",
        "Params",
        # MobileNet's block, named by a public signature but not public itself.
        "dirac_jax.models._mobilenet.SeparableBlock",
    )
]


# Sphinx names an object by its `__module__`, which for most of the API is a private module
# (`dirac_jax.param._dirac.dirac`). The reference documents each name where users import it,
# so signatures must point there too: give every public function and class the public module
# that exports it (this build's copy of the objects only; the library is not changed).
def _public_homes():
    import importlib
    import inspect

    for name in API_MODULES:
        module = importlib.import_module(name)
        for attribute in getattr(module, "__all__", ()):
            obj = getattr(module, attribute, None)
            home = getattr(obj, "__module__", None) or ""
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and home.startswith(name + "._"):
                obj.__module__ = name


# The modules the API reference covers, one page each (docs/api/<module>.rst); tests/test_docs.py
# checks that every name in each one's __all__ is documented there.
API_MODULES = [
    "dirac_jax",
    *(
        f"dirac_jax.{m}"
        for m in (
            "param layers models fold folded formats formats.onnx_graph formats.stablehlo "
            "formats.state_dict quantize torch_checkpoint torch_reference data input_pipeline "
            "config_schema optim sharding steps train checkpoint metrics workdir xla_cpu "
            "evaluate export main reproduce configs"
        ).split()
    ),
]
_public_homes()


_CODE = re.compile(r"(``[^`]+``|`[^`]+`)([A-Za-z0-9]?)")


def _docstring_fixes(app, what, name, obj, options, lines):
    """Two habits of the docstrings that reST reads otherwise, fixed for the page only."""
    # A constant has no docstring of its own; autodoc would show its type's (tuple's, dict's).
    if what == "data" and lines and "\n".join(lines).strip() == (type(obj).__doc__ or "").strip():
        lines[:] = []
    # "`Transform`s" (a plural after inline code): reST ends inline markup only before a space
    # or punctuation, so the docstrings' Markdown habit becomes "`Transform`\ s" here.
    for i, line in enumerate(lines):
        lines[i] = _CODE.sub(lambda m: m[1] + ("\\ " + m[2] if m[2] else ""), line)


def _summary_abbreviations():
    """The autosummary tables show a docstring's first sentence, cut at ". ". The docstrings
    cite the papers as "DiracNets eq. 5", "sec. 3.4", "fig. 2": not ends of sentences."""
    from sphinx.ext import autosummary

    autosummary.WELL_KNOWN_ABBREVIATIONS = (
        *autosummary.WELL_KNOWN_ABBREVIATIONS,
        *("eq.", "eqs.", "sec.", "fig.", "Eq.", "Sec.", "Fig."),
    )


def _summaries_from_content(app, doctree):
    """An autosummary row shows the first sentence of a docstring or `#:` comment. An entry
    described only by content under its directive (a constant the page's module imports from a
    private one) has neither: its row gets that content's first paragraph."""
    from docutils import nodes
    from sphinx import addnodes
    from sphinx.ext.autosummary import autosummary_table

    described = {}
    for desc in doctree.findall(addnodes.desc):
        content = next(iter(desc.findall(addnodes.desc_content)), None)
        paragraph = next(iter(content.findall(nodes.paragraph)), None) if content else None
        for signature in desc.findall(addnodes.desc_signature):
            for target in signature["ids"]:
                described.setdefault(target, paragraph)
    for table in doctree.findall(autosummary_table):
        for row in table.findall(nodes.row):
            name, text = row.children
            reference = next(iter(name.findall(addnodes.pending_xref)), None)
            paragraph = described.get(reference["reftarget"]) if reference else None
            if paragraph is not None and not text.astext().strip():
                text.children = []
                text += paragraph.deepcopy()


def setup(app):
    _summary_abbreviations()
    app.connect("autodoc-process-docstring", _docstring_fixes)
    app.connect("doctree-read", _summaries_from_content)

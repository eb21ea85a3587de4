"""The training configs, one file per recipe; shipped in the wheel as `dirac_jax.configs`.

Each module has `get_config()`, which returns an `ml_collections.ConfigDict`. Two
also take a variant, the symmetric-kernel mode (`hard`, the default; `soft`;
`none`): `cifar_wrn_symmetric` and `imagenet_resnet_symmetric`, chosen on the
command line as `--config=cifar_wrn_symmetric:soft`. The folder stays at the
repository's top level, and setuptools maps it to the subpackage `dirac_jax.configs`
(pyproject.toml), so variants import their base as `from dirac_jax.configs
import cifar_dirac` in a source tree (editable install) and an installed wheel
alike. The command lines take a config by path (`--config=configs/cifar_dirac.py`)
or, for these shipped ones, by name (`--config=cifar_dirac`): `path` finds it.
"""

import pathlib

__all__ = ["FOLDER", "names", "path"]

FOLDER = pathlib.Path(__file__).resolve().parent


def names() -> list[str]:
    """The shipped configs' names, e.g. `cifar_dirac`."""
    return sorted(p.stem for p in FOLDER.glob("[!_]*.py"))


def path(name: str) -> pathlib.Path:
    """The file of the shipped config `name`; a ValueError names them all if there is none."""
    if name not in names():
        raise ValueError(f"no shipped config {name!r}; one of {', '.join(names())}.")
    return FOLDER / f"{name}.py"

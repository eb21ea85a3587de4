"""dirac_jax: very deep plain convolutional networks through weight parameterization.

DiracNets (arXiv:1706.00388, v1 and v2), the symmetric parameterizations of the
first author's slides (S. Zagoruyko, Dec. 26, 2017), and the PlainNet recipe of
Oyedotun et al., in JAX and Flax.

The package is the library, one concept per module, from the maths down to the
commands that use it:

* The maths and the networks: `param` (weight parameterizations, jax and
  numpy only), `layers` (conv layers with a `param` kernel for Linen, NNX and
  plain JAX), `folded` (a folded net, the fold of one conv and BN, and the
  contract a model that folds satisfies), `models` (the papers' networks).
* Deployment: `fold` (a trained net to a plain conv chain, `fold.deployable`),
  `formats` (ONNX, StableHLO, the reference PyTorch state dict), `quantize`
  (INT8 ONNX of a folded net), `torch_checkpoint` (the authors' PyTorch
  checkpoints imported), `torch_reference` (the reference net in PyTorch).
* Training: `data` (dataset readers and transforms), `input_pipeline`
  (device-resident and Grain-streamed inputs), `config_schema` (a config's
  defaults, validation and model), `optim`, `sharding`, `steps` (the jitted
  train and eval steps and the one evaluation loop), `checkpoint`, `metrics`,
  `workdir` (a run's files; a finished run loaded back), `train` (the loop),
  `xla_cpu` (the XLA:CPU flags the commands set).
* Commands: `evaluate` and `export` (importable functions; the flags are
  defined only when their command line runs), `reproduce` (the papers'
  experiments, runnable from an installed wheel), `configs` (the training
  configs, the repository's `configs/`).

Benchmarks and device tooling are not in the package: they live in the
repository's top-level `benchmarks/`, run from a checkout as
`python -m benchmarks SUITE`.

Entry points, imported on first use so `from dirac_jax import param` stays light:

* `dirac_jax.get_model(name, **kwargs)`: a network by name (`models.get_model`).
* `dirac_jax.train_and_evaluate(config, workdir)`: train a config (`train`).
* `dirac_jax.load(workdir)`: `(model, variables, config)` of a trained run.
* `dirac_jax.evaluate_workdir(workdir)` and `dirac_jax.export_workdir(workdir,
  format, out)`: what `python -m dirac_jax.evaluate` and `python -m
  dirac_jax.export` run.

The folded conv-ReLU chain of a trained net is `dirac_jax.fold.fold(model,
variables)`.

Command lines: `python -m dirac_jax.main` (train), `python -m dirac_jax.evaluate`,
`python -m dirac_jax.export`, `python -m dirac_jax.reproduce`.
"""

import importlib

#: The version of the installed dirac_jax package.
__version__ = "0.1.0"

# name -> (module, attribute): resolved by __getattr__ on first access.
_ENTRY_POINTS = {
    "get_model": ("dirac_jax.models", "get_model"),
    "train_and_evaluate": ("dirac_jax.train", "train_and_evaluate"),
    "load": ("dirac_jax.workdir", "load"),
    "evaluate_workdir": ("dirac_jax.evaluate", "evaluate_workdir"),
    "export_workdir": ("dirac_jax.export", "export_workdir"),
}
# Names of the previous release -> the one name now; they raise an AttributeError naming it.
_RENAMED = {"fold_net": "dirac_jax.fold.fold"}
_SUBMODULES = (
    "checkpoint",
    "config_schema",
    "configs",
    "data",
    "input_pipeline",
    "evaluate",
    "export",
    "fold",
    "folded",
    "formats",
    "layers",
    "metrics",
    "models",
    "optim",
    "param",
    "quantize",
    "reproduce",
    "sharding",
    "steps",
    "torch_checkpoint",
    "torch_reference",
    "train",
    "workdir",
    "xla_cpu",
)

__all__ = ["__version__", *sorted(_ENTRY_POINTS), *_SUBMODULES]


def __getattr__(name: str):
    if name in _ENTRY_POINTS:
        module, attribute = _ENTRY_POINTS[name]
        return getattr(importlib.import_module(module), attribute)
    if name in _SUBMODULES:
        return importlib.import_module(f"dirac_jax.{name}")
    if name in _RENAMED:
        raise AttributeError(f"dirac_jax.{name} was removed: use {_RENAMED[name]}.")
    raise AttributeError(f"module 'dirac_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))

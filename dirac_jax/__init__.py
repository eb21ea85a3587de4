"""dirac_jax: very deep plain convolutional networks through weight parameterization.

DiracNets (arXiv:1706.00388, v1 and v2), the symmetric parameterizations of the
first author's slides (S. Zagoruyko, Dec. 26, 2017), and the PlainNet recipe of
Oyedotun et al., in JAX and Flax.

Subpackages, each one concept: `param` (weight parameterizations, jax and numpy
only), `layers` (conv layers with a `param` kernel for Linen, NNX and plain
JAX), `models` (the papers' networks), `folded` (a folded net: the chain's
steps and the fold of one conv and BN), `fold` (trained net to a plain conv
chain), `formats` (export formats: ONNX, StableHLO, the reference PyTorch
state dict), `torch_checkpoint` (the authors' PyTorch checkpoints imported),
`torch_reference` (the reference net in PyTorch, for tests and benchmarks),
`quantize` (INT8 ONNX of a folded net), `data` (dataset readers and
transforms), `input_pipeline` (device-resident and Grain-streamed inputs),
`config_schema` (a training config's defaults and validation), `optim` (schedule
and optimizer), `sharding` (the mesh and placement), `steps` (the jitted train
and eval steps), `train` (the loop), `checkpoint`, `metrics`, `workdir` (a
run's files; a finished run), `xla_cpu` (the XLA:CPU flags the commands set),
`evaluate` and `export` (its command lines), `reproduce` (the papers'
experiments), `configs` (the training configs, the repository's configs/).

Entry points, imported on first use so `from dirac_jax import param` stays light:

* `dirac_jax.get_model(name, **kwargs)`: a network by name (`models.get_model`).
* `dirac_jax.train_and_evaluate(config, workdir)`: train a config (`train`).
* `dirac_jax.load(workdir)`: `(model, variables, config)` of a trained run.
* `dirac_jax.evaluate_workdir(workdir)` and `dirac_jax.export_workdir(workdir,
  format, out)`: what `python -m dirac_jax.evaluate` and `python -m
  dirac_jax.export` run.
* `dirac_jax.fold_net(model, variables)`: the folded conv-ReLU chain (`fold.fold`).

Command lines: `python -m dirac_jax.main` (train), `python -m dirac_jax.evaluate`,
`python -m dirac_jax.export`, `python -m dirac_jax.bench`.
"""

import importlib

__version__ = "0.1.0"

# name -> (module, attribute): resolved by __getattr__ on first access.
_ENTRY_POINTS = {
    "get_model": ("dirac_jax.models", "get_model"),
    "train_and_evaluate": ("dirac_jax.train", "train_and_evaluate"),
    "load": ("dirac_jax.workdir", "load"),
    "evaluate_workdir": ("dirac_jax.evaluate", "evaluate_workdir"),
    "export_workdir": ("dirac_jax.export", "export_workdir"),
    "fold_net": ("dirac_jax.fold", "fold"),
}
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
    raise AttributeError(f"module 'dirac_jax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))

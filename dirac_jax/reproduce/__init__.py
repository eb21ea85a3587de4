"""The papers' experiments, each one command: `python -m dirac_jax.reproduce NAME`.

  python -m dirac_jax.reproduce depth --preset=cpu --out=runs/reproduce

Each experiment is a grid of ordinary training runs (one workdir per cell and
seed, under `OUT/NAME/`), reported as the median over seeds beside the paper's
figure in `OUT/NAME.md`, `OUT/NAME.json` and `OUT/NAME.png`. Rerunning skips
finished runs and resumes interrupted ones. Experiments: `depth` (DiracNets v2
fig. 1), `scales` (fig. 2), `init` (sec. 3.4), `plainnet` (Oyedotun et al.,
Table 1), `symmetric` (the slides' CIFAR table and figure); presets `smoke`,
`cpu` and `paper` (see `PRESETS`).

This package is part of the library, not an example beside it: checking the
papers' claims from an installed wheel, on the user's own hardware, is part of
what the project offers. It depends on the library alone (the trainer, the
configs, `fold`), never on the benchmarks or a checkout, so it ships in the
wheel; the benchmarks and the device tooling do not (`benchmarks/`).

Example:
  >>> from dirac_jax import reproduce
  >>> plan = reproduce.EXPERIMENTS["depth"].plan("cpu")
  >>> len(plan.cells), tuple(plan.seeds)
  (18, (0, 1, 2))
"""

from dirac_jax.reproduce._experiments import EXPERIMENTS, PRESETS, Experiment
from dirac_jax.reproduce._grid import Cell, Plan, cell_config, load_config, run_plan, summarize
from dirac_jax.reproduce._run import run

__all__ = [
    "EXPERIMENTS",
    "PRESETS",
    "Cell",
    "Experiment",
    "Plan",
    "cell_config",
    "load_config",
    "run",
    "run_plan",
    "summarize",
]

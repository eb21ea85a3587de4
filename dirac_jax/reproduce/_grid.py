"""A grid of ordinary training runs: one workdir per (cell, seed), resumable, with medians.

An experiment is a `Plan`: a list of `Cell`s (a config file plus overrides), the
seeds to repeat each cell with, and the preset's name. `run_plan` trains every
(cell, seed) pair that has no `summary.json` yet, through the same
`train.train_and_evaluate` as `python -m dirac_jax.main`, in
`out/<experiment>/<cell>/seed<k>`. A finished pair is skipped on a rerun and an
interrupted one resumes from its checkpoint, so rerunning the command continues
where it stopped. A run whose loss turns NaN records `diverged.json` and counts
as diverged in the report (it is not retried: training is deterministic).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from dirac_jax import configs as shipped
from dirac_jax.workdir import SUMMARY_FILE, read_summary

DIVERGED_FILE = "diverged.json"


@dataclasses.dataclass(frozen=True)
class Cell:
    """One configuration of an experiment.

    Attributes:
      key: a file-system-safe name, the cell's folder (e.g. `"diracnet-d28"`).
      config: the config file, relative to the configs folder (e.g. `"cifar_dirac.py"`).
      overrides: dotted config fields and values set on top of the file's config.
      labels: what the report shows for the cell (e.g. `{"model": "plain", "depth": 28}`).
      paper: the paper's figure for the cell, as text, or None where it gives none.
      seeds: this cell's seeds where they differ from the plan's (e.g. fewer
        for a costly reference curve).
    """

    key: str
    config: str
    overrides: Mapping[str, Any]
    labels: Mapping[str, Any]
    paper: str | None = None
    seeds: Sequence[int] | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
    """An experiment at one preset: its cells and the seeds each is repeated with."""

    experiment: str
    preset: str
    cells: Sequence[Cell]
    seeds: Sequence[int]

    def cell_seeds(self, cell: Cell) -> tuple[int, ...]:
        return tuple(self.seeds if cell.seeds is None else cell.seeds)


def load_config(path: str | pathlib.Path) -> ml_collections.ConfigDict:
    """`get_config()` of a config file.

    Variants import their base from the shipped configs (`from dirac_jax.configs
    import cifar_dirac`), so a file loads from any folder without touching
    `sys.path`.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist.")
    spec = importlib.util.spec_from_file_location(f"_reproduce_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]):
    """Sets dotted fields (`"model.depth"`) on an unlocked config, creating new ones."""
    for dotted, value in overrides.items():
        *path, last = dotted.split(".")
        target = config
        for name in path:
            target = target[name]
        target[last] = tuple(value) if isinstance(value, list) else value
    return config


def cell_config(cell: Cell, seed: int, configs: pathlib.Path | None = None):
    """The training config of one run: the cell's config file, its overrides, the seed."""
    config = load_config((configs or shipped.FOLDER) / cell.config)
    return apply_overrides(config, {**cell.overrides, "seed": seed})


def workdir(out: pathlib.Path, plan: Plan, cell: Cell, seed: int) -> pathlib.Path:
    return pathlib.Path(out) / plan.experiment / cell.key / f"seed{seed}"


def read_result(wd: pathlib.Path) -> dict | None:
    """The finished run's summary, `{"diverged": True, ...}`, or None if not finished."""
    if (wd / SUMMARY_FILE).is_file():  # metric names of earlier releases read as today's
        return {**read_summary(wd), "diverged": False}
    if (wd / DIVERGED_FILE).is_file():
        return {**json.loads((wd / DIVERGED_FILE).read_text()), "diverged": True}
    return None


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_plan(plan: Plan, out: str | pathlib.Path, configs: pathlib.Path | None = None) -> dict:
    """Trains every unfinished (cell, seed) of `plan` under `out`; returns all results.

    Returns:
      `{cell.key: {seed: result}}` with each run's summary (see
      `train.train_and_evaluate`) plus `"diverged"`, or `{"preempted": True}` if
      a SIGTERM stopped a run (rerun to resume).
    """
    from dirac_jax import checkpoint, train

    out = pathlib.Path(out)

    # Seed by seed: the first seed of every cell comes first, so a grid stopped early
    # already has whole curves to report (`collect`, `--report_only`). Cells with seeds of
    # their own (a costly reference curve with fewer seeds) come after the others.
    def order(cells):
        rounds = max((len(plan.cell_seeds(c)) for c in cells), default=0)
        return [
            (c, plan.cell_seeds(c)[k])
            for k in range(rounds)
            for c in cells
            if k < len(plan.cell_seeds(c))
        ]

    jobs = order([c for c in plan.cells if c.seeds is None])
    jobs += order([c for c in plan.cells if c.seeds is not None])
    results: dict[str, dict[int, dict]] = {cell.key: {} for cell in plan.cells}
    todo = [(c, s) for c, s in jobs if read_result(workdir(out, plan, c, s)) is None]
    _say(
        f"[reproduce {plan.experiment}:{plan.preset}] {len(jobs)} runs of {len(plan.cells)} "
        f"cells, {len(jobs) - len(todo)} done, "
        f"{len(todo)} to run, in {out / plan.experiment}"
    )
    started = time.time()
    for i, (cell, seed) in enumerate(todo):
        wd = workdir(out, plan, cell, seed)
        elapsed = time.time() - started
        eta = f", about {elapsed / i * (len(todo) - i) / 60:.0f} min left" if i else ""
        _say(
            f"[reproduce {plan.experiment}:{plan.preset}] run {i + 1}/{len(todo)}: {cell.key} "
            f"seed {seed} ({len(todo) - i - 1} after it{eta})"
        )
        config = cell_config(cell, seed, configs)
        try:
            summary = train.train_and_evaluate(config, wd)
        except checkpoint.NonFiniteLossError as e:
            wd.mkdir(parents=True, exist_ok=True)
            (wd / DIVERGED_FILE).write_text(json.dumps({"error": str(e)}, indent=2) + "\n")
            _say(f"[reproduce {plan.experiment}] {cell.key} seed {seed} diverged: {e}")
            continue
        if summary.get("preempted"):
            _say(f"[reproduce {plan.experiment}] preempted; rerun the same command to resume.")
            return {"preempted": True}
    for cell, seed in jobs:
        results[cell.key][seed] = read_result(workdir(out, plan, cell, seed))
    return results


def median_or_none(values: Sequence[float | None]) -> float | None:
    """The median of the values that are not None (None if all are).

    Examples:
      >>> median_or_none([0.9, None, 0.7, 0.8])
      0.8
      >>> median_or_none([None]) is None
      True
    """
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def collect(plan: Plan, out: str | pathlib.Path) -> dict:
    """The results of the runs that have finished, without training anything.

    Returns:
      `{cell.key: {seed: result or None}}` (None: not run, or not finished).
    """
    return {
        cell.key: {s: read_result(workdir(out, plan, cell, s)) for s in plan.cell_seeds(cell)}
        for cell in plan.cells
    }


def summarize(plan: Plan, results: dict, chance: float) -> list[dict]:
    """One row per cell: its labels, the paper's figure, and medians over seeds.

    A diverged run counts at chance accuracy (`chance`) in the medians, as a
    net that does not train predicts no better; the row says how many diverged.
    Runs missing from `results` (None: not finished) are left out, and the row's
    `seeds` lists the ones it summarizes (`planned_seeds` all of them).
    """
    rows = []
    for cell in plan.cells:
        planned = plan.cell_seeds(cell)
        seeds = [s for s in planned if results[cell.key].get(s) is not None]
        runs = [results[cell.key][s] for s in seeds]

        def metric(name, runs=runs):
            return [chance if r["diverged"] else r.get(name) for r in runs]

        test = metric("test_top1")
        rows.append(
            {
                "key": cell.key,
                **cell.labels,
                "paper": cell.paper,
                "seeds": list(seeds),
                "planned_seeds": list(planned),
                "test_top1": median_or_none(test),
                "test_top1_min": min((v for v in test if v is not None), default=None),
                "test_top1_max": max((v for v in test if v is not None), default=None),
                "test_top1_seeds": test,
                "train_top1": median_or_none(metric("train_top1")),
                "test_top5": median_or_none(metric("test_top5")),
                # Soft symmetric runs: the net with its kernels projected (`param.symmetrize`).
                "test_top1_symmetrized": median_or_none(metric("test_top1_symmetrized")),
                "num_params": next((r["num_params"] for r in runs if "num_params" in r), None),
                "diverged": sum(r["diverged"] for r in runs),
                "wall_time_s": sum(r.get("wall_time_s", 0.0) for r in runs),
            }
        )
    return rows

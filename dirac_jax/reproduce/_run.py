"""`run`: one experiment at one preset, from the grid of runs to the report files."""

from __future__ import annotations

import json
import pathlib

from dirac_jax import data
from dirac_jax.reproduce import _report
from dirac_jax.reproduce._experiments import EXPERIMENTS, PRESETS, test_time_params
from dirac_jax.reproduce._grid import cell_config, collect, run_plan, summarize


def run(
    name: str, preset: str, out: str | pathlib.Path, configs=None, report_only: bool = False
) -> dict | None:
    """Runs experiment `name` at `preset` under `out` and writes its report.

    Args:
      name: a key of `EXPERIMENTS`.
      preset: one of `PRESETS`.
      out: the output folder; runs go to `out/name/<cell>/seed<k>`.
      configs: the folder of config files (default: this source tree's `configs/`).
      report_only: train nothing; report the runs that have finished (the
        table's "runs" column says how many of the planned ones that is).

    Returns:
      The report `{"experiment", "preset", "claim", "source", "rows"}` also
      written to `out/name.json`, or None if a SIGTERM stopped a run (rerun to
      resume).

    Raises:
      ValueError: an unknown experiment or preset.
    """
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; expected one of {sorted(EXPERIMENTS)}.")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {PRESETS}.")
    experiment = EXPERIMENTS[name]
    plan = experiment.plan(preset)
    out = pathlib.Path(out)
    results = collect(plan, out) if report_only else run_plan(plan, out, configs)
    if results.get("preempted"):
        return None
    config = cell_config(plan.cells[0], plan.seeds[0], configs)
    chance = 1.0 / data.NUM_CLASSES.get(config.dataset.name, 1000)
    rows = summarize(plan, results, chance)
    if name == "symmetric":
        in_channels = data.image_shape(config.dataset.name)[-1]
        num_classes = data.NUM_CLASSES.get(config.dataset.name, 1000)
        for cell, row in zip(plan.cells, rows, strict=True):
            row["test_params"] = test_time_params(cell.overrides, num_classes, in_channels)
    report = {
        "experiment": name,
        "preset": preset,
        "claim": experiment.claim,
        "source": experiment.source,
        "dataset": config.dataset.name,
        "seeds": list(plan.seeds),
        "rows": rows,
        "complete": all(r["seeds"] == r["planned_seeds"] for r in rows),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{name}.png").unlink(missing_ok=True)
    _report.plot(experiment, plan, rows, out, out / f"{name}.png")
    lines = [
        f"# {name} ({preset} preset, {config.dataset.name})",
        "",
        f"Claim ({experiment.source}): {experiment.claim}",
        "",
        f"Command: `python -m dirac_jax.reproduce {name} --preset={preset} --out={out}`",
        "",
        f"Median over seeds {list(plan.seeds)}; a diverged run counts at chance "
        f"({100 * chance:.0f}%). Paper figures are on their own dataset."
        + ("" if report["complete"] else " Not every planned run has finished: see 'runs'."),
        "",
        _report.table(experiment, rows),
        "",
    ]
    if name == "scales":
        lines += [_report.scales_table(plan, out), ""]
    if (out / f"{name}.png").is_file():
        lines.append(f"![{name}]({name}.png)")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    return report

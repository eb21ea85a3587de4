"""Writes an experiment's results: `NAME.md` (table beside the paper), `NAME.json`, `NAME.png`."""

from __future__ import annotations

import json
import math
import pathlib

from dirac_jax import metrics
from dirac_jax.reproduce._experiments import Experiment
from dirac_jax.reproduce._grid import Plan, workdir


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _err(x: float | None) -> str:
    return "-" if x is None else f"{100 * (1 - x):.1f}"


def _spread(row: dict, error: bool) -> str:
    lo, hi = row["test_top1_min"], row["test_top1_max"]
    if lo is None:
        return ""
    if lo is None or len(row["seeds"]) < 2:
        return ""
    if error:
        lo, hi = 1 - hi, 1 - lo
    return f" [{100 * lo:.1f}, {100 * hi:.1f}]"


def table(experiment: Experiment, rows: list[dict]) -> str:
    """A markdown table: the cell's labels, params, our medians and the paper's figure."""
    error = experiment.metric == "test_error"
    labels = [k for k in rows[0] if k not in _NOT_LABELS]
    ours = "test error %" if error else "test acc. %"
    train = "train error %" if error else "train acc. %"
    paper = "paper train / test error %" if error else "paper test acc. %"
    ours = f"ours: {ours} (median [min, max])"
    # Symmetric experiment: parameters as deployed, and the soft runs' projected net.
    test_params = any("test_params" in r for r in rows)
    symmetrized = any(r.get("test_top1_symmetrized") is not None for r in rows)
    head = [*labels, "params"]
    head += ["params at test"] if test_params else []
    head += [ours]
    head += [("test error %" if error else "test acc. %") + ", symmetrized"] if symmetrized else []
    head += [train, paper, "runs", "diverged"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    fmt = _err if error else _pct
    for r in rows:
        cells = [str(r[k]) for k in labels]
        cells += ["-" if r["num_params"] is None else f"{r['num_params']:,}"]
        cells += [f"{r['test_params']:,}"] if test_params else []
        cells += [fmt(r["test_top1"]) + _spread(r, error)]
        cells += [fmt(r.get("test_top1_symmetrized"))] if symmetrized else []
        cells += [
            fmt(r["train_top1"]),
            r["paper"] or "-",
            f"{len(r['seeds'])}/{len(r['planned_seeds'])}",
            f"{r['diverged']}/{len(r['seeds'])}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


_NOT_LABELS = {
    "key", "paper", "seeds", "planned_seeds", "test_top1", "test_top1_min",
    "test_top1_max", "test_top1_seeds", "train_top1", "test_top5",
    "num_params", "diverged", "wall_time_s", "test_top1_symmetrized", "test_params",
}  # fmt: skip


def _plot_depth(rows, path):
    plt = metrics.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model and r["test_top1"] is not None]
        x = [r["depth"] for r in rs]
        y = [100 * r["test_top1"] for r in rs]
        lo = [100 * (r["test_top1"] - r["test_top1_min"]) for r in rs]
        hi = [100 * (r["test_top1_max"] - r["test_top1"]) for r in rs]
        ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=model)
    ax.set_xscale("log")
    ax.set_xticks(sorted({r["depth"] for r in rows}))
    ax.set_xticklabels([str(d) for d in sorted({r["depth"] for r in rows})])
    ax.set_xlabel("depth (layers)")
    ax.set_ylabel("test accuracy % (median, min-max over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _plot_bars(rows, path, error: bool, label_key):
    plt = metrics.pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.5))
    names = [label_key(r) for r in rows]

    def tf(a):
        return math.nan if a is None else 100 * (1 - a) if error else 100 * a

    test = [tf(r["test_top1"]) for r in rows]
    trn = [tf(r["train_top1"]) for r in rows]
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], test, height=0.4, label="test")
    ax.barh([i - 0.2 for i in y], trn, height=0.4, label="train")
    ax.set_yticks(list(y))
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(("error" if error else "accuracy") + " % (median over seeds)")
    ax.grid(alpha=0.3, axis="x")
    ax.legend()
    return fig


def _plot_symmetric(rows):
    """The slides' CIFAR figure as bars: per block type, test (solid) and train accuracy."""
    plt = metrics.pyplot()
    blocks = list(dict.fromkeys(r["block"] for r in rows))
    n = max(sum(r["block"] == b for r in rows) for b in blocks)
    fig, axes = plt.subplots(
        1, len(blocks), figsize=(5 * len(blocks), 0.4 * n + 1.8), sharex=True, squeeze=False
    )
    for ax, block in zip(axes[0], blocks, strict=True):
        rs = [r for r in rows if r["block"] == block]

        def pct(x):
            return math.nan if x is None else 100 * x

        y = range(len(rs))
        ax.barh([i - 0.2 for i in y], [pct(r["test_top1"]) for r in rs], 0.4, label="test")
        ax.barh(
            [i + 0.2 for i in y],
            [pct(r["train_top1"]) for r in rs],
            0.4,
            label="train",
            fill=False,
            hatch="//",
        )
        soft = [(i, r) for i, r in enumerate(rs) if r.get("test_top1_symmetrized") is not None]
        if soft:
            ax.plot(
                [pct(r["test_top1_symmetrized"]) for _, r in soft],
                [i - 0.2 for i, _ in soft],
                "kx",
                label="test, symmetrized",
            )
        base = next((r for r in rs if r["symmetry"] == "none"), None)
        if base is not None and base["test_top1"] is not None:
            ax.axvline(pct(base["test_top1"]), color="k", ls="--", lw=0.8)
        ax.set_yticks(list(y))
        ax.set_yticklabels([f"{r['symmetry']} ({r['num_params'] or 0:,})" for r in rs], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(block, fontsize=9)
        ax.set_xlabel("accuracy % (median over seeds)")
        ax.grid(alpha=0.3, axis="x")
    finite = [100 * r[k] for r in rows for k in ("test_top1", "train_top1") if r[k]]
    if finite:
        axes[0][0].set_xlim(max(0.0, min(finite) - 5), min(100.0, max(finite) + 2))
    axes[0][-1].legend(fontsize=8)
    return fig


def plot(experiment: Experiment, plan: Plan, rows: list[dict], out: pathlib.Path, path):
    """The experiment's figure at `path`."""
    if experiment.name == "scales":
        wd = workdir(out, plan, plan.cells[0], plan.seeds[0])
        if not (wd / "summary.json").is_file():
            return False
        records = metrics.read_metrics(wd)
        steps_per_epoch = json.loads((wd / "summary.json").read_text()).get("steps_per_epoch")
        return metrics.plot_dirac_scales(records, path, steps_per_epoch)
    if experiment.name == "depth":
        fig = _plot_depth(rows, path)
    elif experiment.name == "symmetric":
        fig = _plot_symmetric(rows)
    elif experiment.name == "init":
        fig = _plot_bars(rows, path, False, lambda r: r["init"])
    else:
        fig = _plot_bars(rows, path, True, lambda r: r["key"])
    fig.suptitle(f"{experiment.name} ({plan.preset} preset): {experiment.source}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    metrics.pyplot().close(fig)
    return True


def scales_table(plan: Plan, out: pathlib.Path) -> str:
    """Final per-group means of a and b and the smallest a/b ratio, from the first run."""
    wd = workdir(out, plan, plan.cells[0], plan.seeds[0])
    if not (wd / "summary.json").is_file():
        return "(the run has not finished)"
    evals = [r for r in metrics.read_metrics(wd) if r.get("kind") == "eval" and r.get("dirac_a")]
    first, last = evals[0], evals[-1]
    lines = [
        "| group | layers | mean a (first eval -> last) | mean b (first eval -> last) "
        "| min a/b (last) | layers with a or b < 1% of its group's largest |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    groups: dict[str, list[str]] = {}
    for layer in last["dirac_a"]:
        groups.setdefault(metrics.layer_group(layer), []).append(layer)
    for group, layers in groups.items():
        a0 = sum(first["dirac_a"][k] for k in layers) / len(layers)
        b0 = sum(first["dirac_b"][k] for k in layers) / len(layers)
        a = [last["dirac_a"][k] for k in layers]
        b = [last["dirac_b"][k] for k in layers]
        ratio = min(x / y if y else math.inf for x, y in zip(a, b, strict=True))
        degraded = sum(
            abs(x) < 0.01 * max(map(abs, a)) or abs(y) < 0.01 * max(map(abs, b))
            for x, y in zip(a, b, strict=True)
        )
        lines.append(
            f"| {group} | {len(layers)} | {a0:.3f} -> {sum(a) / len(a):.3f} "
            f"| {b0:.3f} -> {sum(b) / len(b):.3f} | {ratio:.2f} | {degraded} |"
        )
    return "\n".join(lines)

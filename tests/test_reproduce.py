"""`dirac_jax.reproduce`: every experiment end to end at the smoke preset, on real data.

Each smoke plan trains a few tiny cells for two steps on Fashion-MNIST through
`train.train_and_evaluate`; the tests check the grid's folders, the report files
and their table structure, the medians, and that a rerun trains nothing again.
"""

import json
import pathlib
import subprocess
import sys

import pytest

from dirac_jax import config_schema, metrics, reproduce, workdir

ROOT = pathlib.Path(__file__).resolve().parents[1]
FASHION_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(
    not FASHION_DIR.is_dir(), reason="needs Debian's dataset-fashion-mnist"
)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    for name in reproduce.EXPERIMENTS:
        assert reproduce.run(name, "smoke", out) is not None
    return out


@pytest.mark.parametrize("name", sorted(reproduce.EXPERIMENTS))
def test_smoke_writes_table_json_plot_and_one_workdir_per_run(out, name):
    plan = reproduce.EXPERIMENTS[name].plan("smoke")
    report = json.loads((out / f"{name}.json").read_text())
    assert [r["key"] for r in report["rows"]] == [c.key for c in plan.cells]
    for cell, row in zip(plan.cells, report["rows"], strict=True):
        seeds = plan.cell_seeds(cell)
        assert row["seeds"] == list(seeds)
        for seed in seeds:
            summary = json.loads(
                (out / name / cell.key / f"seed{seed}" / "summary.json").read_text()
            )
            assert summary["step"] == 2
        assert 0.0 <= row["test_top1"] <= 1.0 and row["num_params"] > 0
    # The markdown table: a header, a separator, one line per cell, equal column counts.
    text = (out / f"{name}.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table) >= len(plan.cells) + 1
    widths = {line.count(" | ") for line in table[: len(plan.cells) + 1]}
    assert len(widths) == 1, table
    assert "paper" in table[0] and f"![{name}]({name}.png)" in text
    assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_depth_medians_are_over_the_seeds(out):
    report = json.loads((out / "depth.json").read_text())
    for row in report["rows"]:
        accs = [
            json.loads((out / "depth" / row["key"] / f"seed{s}" / "summary.json").read_text())[
                "test_top1"
            ]
            for s in row["seeds"]
        ]
        assert len(accs) == 2 and row["test_top1"] == pytest.approx(sum(accs) / 2)
        assert row["test_top1_min"] == min(accs) and row["test_top1_max"] == max(accs)


def test_rerun_skips_finished_runs_and_finishes_interrupted_ones(out):
    plan = reproduce.EXPERIMENTS["init"].plan("smoke")
    done = out / "init" / plan.cells[0].key / "seed0"
    unfinished = out / "init" / plan.cells[1].key / "seed0"
    # An interrupted run: its checkpoint is there, its summary is not.
    (unfinished / "summary.json").unlink()
    before = {p: (p / workdir.METRICS_FILE).stat().st_mtime_ns for p in (done, unfinished)}
    trains_before = len([r for r in metrics.read_metrics(unfinished) if r["kind"] == "train"])
    reproduce.run("init", "smoke", out)
    assert (done / workdir.METRICS_FILE).stat().st_mtime_ns == before[done]  # not rerun
    summary = json.loads((unfinished / "summary.json").read_text())
    assert summary["step"] == 2
    # Resumed from its last checkpoint: no step was trained twice.
    trains = [r for r in metrics.read_metrics(unfinished) if r["kind"] == "train"]
    assert len(trains) == trains_before


def test_report_only_trains_nothing_and_says_what_is_missing(tmp_path):
    for name in reproduce.EXPERIMENTS:
        report = reproduce.run(name, "smoke", tmp_path, report_only=True)
        assert not report["complete"] and not (tmp_path / name).exists()
        assert all(r["seeds"] == [] and r["test_top1"] is None for r in report["rows"])
        text = (tmp_path / f"{name}.md").read_text()
        assert "Not every planned run has finished" in text and "| 0/" in text


def test_diverged_runs_count_at_chance():
    cell = reproduce.Cell("c", "fashion_mnist_dirac.py", {}, {"model": "m"})
    plan = reproduce.Plan("x", "smoke", [cell], (0, 1, 2))
    ok = {"diverged": False, "test_top1": 0.8, "train_top1": 0.9, "num_params": 5}
    results = {"c": {0: ok, 1: {"diverged": True}, 2: {**ok, "test_top1": 0.6}}}
    (row,) = reproduce.summarize(plan, results, chance=0.1)
    assert row["diverged"] == 1 and row["test_top1_seeds"] == [0.8, 0.1, 0.6]
    assert row["test_top1"] == 0.6 and row["test_top1_min"] == 0.1


def test_cli_rejects_unknown_experiment_and_preset(tmp_path):
    for args, word in ((["nope"], "experiment"), (["depth", "--preset=huge"], "preset")):
        proc = subprocess.run(
            [sys.executable, "-m", "dirac_jax.reproduce", *args, f"--out={tmp_path}"],
            capture_output=True, text=True, cwd=ROOT, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown " + word)


def test_every_plan_builds_valid_configs():

    for name, experiment in reproduce.EXPERIMENTS.items():
        for preset in reproduce.PRESETS:
            plan = experiment.plan(preset)
            assert plan.cells and plan.seeds, (name, preset)
            for cell in plan.cells:
                config = reproduce.cell_config(cell, seed=0)
                config_schema.validate_config(config)


def test_load_config_reads_any_folder_without_touching_sys_path(tmp_path):
    # A user's variant outside the package imports its base from the shipped configs.
    variant = tmp_path / "my_plain.py"
    variant.write_text(
        "from dirac_jax.configs import cifar_plain\n"
        "def get_config():\n    c = cifar_plain.get_config()\n    c.model.depth = 10\n"
        "    return c\n"
    )
    path = list(sys.path)
    shipped = reproduce.load_config(ROOT / "configs" / "cifar_plain.py")
    theirs = reproduce.load_config(variant)
    assert (shipped.model.name, shipped.model.depth) == ("plain", 28)
    assert (theirs.model.name, theirs.model.depth) == ("plain", 10)
    assert sys.path == path and "configs" not in sys.modules
    with pytest.raises(FileNotFoundError, match="nope.py"):
        reproduce.load_config(tmp_path / "nope.py")


def test_symmetric_reports_params_at_test_and_the_projected_soft_net(out):
    rows = {r["symmetry"]: r for r in json.loads((out / "symmetric.json").read_text())["rows"]}
    soft, tri, none = rows["soft"], rows["triangular"], rows["none"]
    # A soft run is trained in full and deployed projected: fewer parameters at test.
    assert soft["test_params"] < soft["num_params"] and soft["test_top1_symmetrized"] > 0
    assert tri["test_params"] == tri["num_params"] and none["test_params"] == none["num_params"]
    assert none["test_top1_symmetrized"] is None
    assert "symmetrized" in (out / "symmetric.md").read_text()


def test_symmetric_paper_cells_have_the_slides_parameter_counts():
    """The slides' WRN-16-1-bottleneck table, CIFAR-10: params trained / at test, per row."""
    import jax
    import jax.numpy as jnp

    from dirac_jax.reproduce._experiments import test_time_params

    slides = {  # thousands, as the slides round them
        "none": (219, 219),
        "soft": (219, 172),
        "triangular": (172, 172),
        "average": (219, 172),
        "ldl": (172, 172),
        "average-spatial": (219, 187),
        "average-both": (219, 156),
    }
    cells = {c.key: c for c in reproduce.EXPERIMENTS["symmetric"].plan("paper").cells}
    x = jnp.zeros((1, 32, 32, 3))
    for name, (trained, at_test) in slides.items():
        cell = cells[f"bottleneck-{name}"]
        model = config_schema.create_model(reproduce.cell_config(cell, seed=0), num_classes=10)
        shapes = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), x))["params"]
        count = sum(leaf.size for leaf in jax.tree.leaves(shapes))
        assert round(count / 1000) == trained, name
        assert round(test_time_params(cell.overrides, 10, 3) / 1000) == at_test, name
    assert test_time_params(cells["bottleneck-none"].overrides, 10, 3) == 219_482


def test_runs_written_with_earlier_metric_names_still_report(tmp_path):
    cell = reproduce.Cell("c", "fashion_mnist_dirac.py", {}, {"model": "m"})
    plan = reproduce.Plan("x", "smoke", [cell], (0,))
    run = tmp_path / "x" / "c" / "seed0"
    run.mkdir(parents=True)
    old = {"test_accuracy": 0.7, "train_accuracy": 0.8, "test_top5_accuracy": 0.9, "num_params": 5}
    (run / "summary.json").write_text(json.dumps(old))
    from dirac_jax.reproduce import _grid  # how a report reads its finished runs

    (row,) = reproduce.summarize(plan, _grid.collect(plan, tmp_path), chance=0.1)
    assert (row["test_top1"], row["train_top1"], row["test_top5"]) == (0.7, 0.8, 0.9)
    assert row["seeds"] == [0] and row["diverged"] == 0

"""launch/device_check.sh: the smoke run writes every section; the host set-up plans wheels."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

from benchmarks import _host_deps, device_check, device_sections

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _smoke_device_check(out, site, *, timeout):
    """`launch/device_check.sh --smoke` with this Python, its wheels installed into `site`."""
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE_CHECK_SITE": str(site)}
    return subprocess.run(
        ["bash", "launch/device_check.sh", "--smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
@pytest.mark.timeout(1500)  # the suite's 600 s is less than a loaded 2-core CPU may need
def test_smoke_run_writes_every_section(tmp_path):
    out = tmp_path / "report"
    done = _smoke_device_check(out, tmp_path / "site", timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["smoke"] and list(report["sections"]) == [s.name for s in device_check.SECTIONS]
    markdown = (out / "report.md").read_text()
    for section in device_check.SECTIONS:
        entry = report["sections"][section.name]
        assert entry["status"] == "ok", (section.name, entry.get("output_tail"))
        assert entry["markdown"] and entry["summary"] and entry["wall_s"] > 0
        assert f"## {section.title}" in markdown
    s = report["sections"]
    env = s["environment"]["data"]["environment"]
    assert env["backend"] == "cpu" and env["device_count"] == 1  # not the test process's 8
    assert s["environment"]["data"]["untested"] is None  # the suite's stack is a tested one
    tests = s["correctness"]["data"]["tests"]
    assert tests and all(t["outcome"] == "passed" for t in tests)
    assert any("tensorfloat32" in t["test"] for t in tests)
    # Throughput: the JAX pair and the PyTorch variants of the smoke run, one paired ratio.
    train = s["train_bfloat16"]["data"]
    assert "DiracNet / plain (step time)" in train["ratios"]
    assert "augmentation on / off (step time)" in train["ratios"]
    assert set(s["imagenet"]["data"]["candidates"]) == {"DiracNet-18-0.25 (JAX, bf16)"}
    assert set(s["deploy"]["data"]) == {"batch 1", "batch 8"}
    with tarfile.open(out / s["profile"]["data"]["file"]) as tar:
        assert any(n.endswith(".xplane.pb") for n in tar.getnames())
    # Four files, flat: quick to copy back from a remote host.
    assert sorted(p.name for p in out.iterdir()) == [
        "device_check.log",
        "profile.tar.gz",
        "report.json",
        "report.md",
    ]


def test_sections_import_without_the_streamed_input_stack():
    # A GPU host may lack Grain, TFDS and ArrayRecord: nothing the sections import needs them.
    blocked = "grain", "tensorflow_datasets", "array_record"
    program = (
        "import sys\n"
        + "".join(f"sys.modules[{m!r}] = None\n" for m in blocked)
        + "import benchmarks.train, benchmarks.fold_latency\n"
        + "import dirac_jax.main, dirac_jax.export\n"
        + "import benchmarks.device_check\n"
        + "print('imported')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and "imported" in done.stdout, done.stderr[-2000:]


def test_device_resident_training_resumes_without_the_streamed_input_stack(tmp_path, monkeypatch):
    # The resume check on an accelerator host, which lacks Grain: a device-resident run is
    # placed by its step alone, so neither its checkpoints nor its resume may import Grain.
    import _multihost_worker

    from dirac_jax import checkpoint, train, workdir

    for name in ("grain", "tensorflow_datasets", "array_record"):
        monkeypatch.setitem(sys.modules, name, None)  # `import grain` now raises

    def config(num_steps):
        c = _multihost_worker.tiny_config(num_steps)
        c.checkpoint_every_steps, c.lr_boundaries = 2, ()
        return c

    train.train_and_evaluate(config(4), tmp_path)
    # Back to the checkpoint of step 2, as if stopped there: the same config resumes.
    mngr = checkpoint.create_manager(tmp_path)
    steps = mngr.all_steps()
    mngr.close()
    assert 2 in steps and steps[-1] == 4
    shutil.rmtree(pathlib.Path(checkpoint.checkpoint_dir(tmp_path)) / "4")
    (tmp_path / workdir.SUMMARY_FILE).unlink()
    summary = train.train_and_evaluate(config(4), tmp_path)
    assert summary["step"] == 4


def _wheel(folder, name, version, requires=(), tag="py3-none-any"):
    path = folder / f"{name}-{version}-{tag}.whl"
    meta = "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(
            f"{name}-{version}.dist-info/METADATA", f"Name: {name}\nVersion: {version}\n{meta}"
        )
    return path


def test_host_deps_plans_the_missing_wheels_and_their_missing_requirements(tmp_path):
    top = _wheel(tmp_path, "dj_fake_top", "1.0", ["dj-fake-sub>=2", 'dj-fake-extra; extra == "x"'])
    _wheel(tmp_path, "dj_fake_sub", "1.5")
    sub = _wheel(tmp_path, "dj_fake_sub", "2.1", ["pip"])  # pip: installed, so not planned
    _wheel(tmp_path, "dj_fake_sub", "3.0", tag="cp27-cp27m-win32")  # not for this interpreter
    plan = _host_deps.plan(["dj-fake-top", "pip"], tmp_path)
    assert plan.wheels == [top, sub] and plan.unmet == [] and plan.outdated == []
    # The extra's requirement counts only when the extra is asked for.
    plan = _host_deps.plan(["dj-fake-top[x]"], tmp_path)
    assert plan.unmet == ['dj-fake-extra; extra == "x"']
    # Nothing in range: absent is unmet, installed out of range is kept with a warning.
    plan = _host_deps.plan(["dj-fake-sub>=4", "pip<1"], tmp_path)
    assert plan.wheels == [] and plan.unmet == ["dj-fake-sub>=4"]
    assert plan.outdated and plan.outdated[0].startswith("pip<1 (installed: ")


def test_host_deps_leaves_out_the_streamed_input_stack():
    names = [r.split(">")[0].split("[")[0] for r in _host_deps.project_requirements()]
    assert "ml-collections" in names and "pytest" in names and "onnxruntime" in names
    assert not set(names) & {"grain", "tensorflow-datasets", "array-record"}


def test_report_keeps_a_cut_off_section_and_its_output():
    report = {
        "command": "python -m benchmarks device_check --smoke",
        "started_utc": "2026-01-01 00:00:00",
        "smoke": True,
        "budget_s": 100.0,
        "wall_s": 42.0,
        "sections": {
            "environment": {
                "title": "1. Environment",
                "status": "ok",
                "wall_s": 3.0,
                "summary": "1 x cpu",
                "markdown": "| a | b |",
            },
            "correctness": {
                "title": "2. Correctness",
                "status": "timed out after 39 s",
                "wall_s": 39.0,
                "output_tail": "tests/test_x.py::test_y PASSED",
            },
        },
    }
    text = device_check.render(report)
    assert "| 2. Correctness | timed out after 39 s | 39.0 |" in text
    assert "tests/test_x.py::test_y PASSED" in text and "| a | b |" in text
    assert "## 1. Environment" in text and "Last output:" in text
    lines = ["tests/test_x.py::test_y[1] PASSED [ 50%]", "noise", "tests/a.py::b FAILED"]
    assert [(t["test"], t["outcome"]) for t in device_sections._verbose_results(lines)] == [
        ("test_x::test_y[1]", "passed"),
        ("a::b", "failed"),
    ]


def test_bad_arguments_fail_clearly(capsys):
    with pytest.raises(SystemExit):
        device_check.main(["--budget", "0"])
    assert "--budget must be > 0" in capsys.readouterr().err
    for box, message in [
        ("train=10", "the section is one of environment,"),
        ("profile=soon", "--box wants SECTION=SECONDS, got 'profile=soon'"),
        ("profile=-1", "seconds > 0"),
    ]:
        with pytest.raises(SystemExit):
            device_check.main(["--box", box])
        assert message in capsys.readouterr().err
    done = subprocess.run(
        ["bash", "launch/device_check.sh", "--wheels", "/nonexistent/wheels"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "is not a folder" in done.stderr


FLOOR = {"jax": "0.10.2", "flax": "0.12.8", "orbax-checkpoint": "0.12.8"}
THROUGH = {"jax": "0.12", "flax": "0.12.12", "orbax-checkpoint": "0.12.8"}


@pytest.mark.parametrize(
    "versions",
    [
        FLOOR,
        {"jax": "0.11.2", "flax": "0.12.10", "orbax-checkpoint": "0.12.8"},  # the GPU image's jax
        {"jax": "0.12.99", "flax": "0.12.12", "orbax-checkpoint": "0.12.8"},  # "0.12": any 0.12.x
        {"jax": "0.12.1.dev20260101", "flax": "0.12.12", "orbax-checkpoint": "0.12.8"},
    ],
)
def test_a_stack_inside_the_tested_range_passes(versions):
    assert _host_deps.outside_tested_range(versions, FLOOR, THROUGH) is None


@pytest.mark.parametrize(
    ("changed", "named"),
    [
        ({"jax": "0.10.1"}, "jax 0.10.1"),  # under the pinned floor
        ({"jax": "0.13.0"}, "jax 0.13.0"),  # past 0.12.x
        ({"flax": "0.12.13"}, "flax 0.12.13"),  # past 0.12.12
        ({"flax": "0.11.9"}, "flax 0.11.9"),
        ({"orbax-checkpoint": "0.12.9"}, "orbax-checkpoint 0.12.9"),
        ({"orbax-checkpoint": None}, "orbax-checkpoint not installed"),
        ({"flax": "not-a-version"}, "flax not-a-version"),
        ({"jax": "0.13.0", "flax": "0.12.13"}, "jax 0.13.0, flax 0.12.13"),
    ],
)
def test_a_stack_outside_the_tested_range_is_named_in_one_line(changed, named):
    line = _host_deps.outside_tested_range(FLOOR | changed, FLOOR, THROUGH)
    assert line is not None and "\n" not in line
    assert line.startswith(f"untested JAX stack: {named} (tested: jax 0.10.2 to 0.12.x, ")
    assert line.endswith("orbax-checkpoint 0.12.8 to 0.12.8)")


def test_the_floor_is_the_pinned_stack(tmp_path):
    pins = (ROOT / "launch" / "constraints.txt").read_text().splitlines()
    for name, version in _host_deps.pinned_floor().items():
        assert any(line.lower().replace("_", "-") == f"{name}=={version}" for line in pins), (
            f"{name}=={version} is not pinned in launch/constraints.txt"
        )
    names = set(_host_deps.TESTED)
    assert set(_host_deps.pinned_floor()) == names == set(_host_deps.TESTED_THROUGH)
    partial = tmp_path / "constraints.txt"
    partial.write_text("# header\njax==0.10.2\nFlax==0.12.8  # a comment\n")
    with pytest.raises(ValueError, match="pins no version of orbax-checkpoint"):
        _host_deps.pinned_floor(partial)
    partial.write_text(partial.read_text() + "orbax_checkpoint==0.12.8\n")
    assert _host_deps.pinned_floor(partial) == FLOOR


def test_the_tests_run_on_a_tested_stack():
    # CI runs the suite on the pinned floor and on the newest stack: both must be inside the
    # range the device check accepts, or TESTED_THROUGH lags what CI has passed on.
    untested = _host_deps.outside_tested_range(_host_deps.installed_versions())
    assert untested is None, f"{untested}: raise TESTED_THROUGH in benchmarks/_host_deps.py"


def test_an_untested_stack_stops_the_check_before_any_section(tmp_path, capsys, monkeypatch):
    ran = []

    def run_sections(*args, **kwargs):
        ran.append(args)
        return {"sections": {}}

    monkeypatch.setattr(device_check, "run_sections", run_sections)
    monkeypatch.setattr(_host_deps, "installed_versions", lambda: FLOOR | {"jax": "0.13.0"})
    out = tmp_path / "report"
    assert device_check.main(["--smoke", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: untested JAX stack: jax 0.13.0 ") and "--allow_untested" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not ran and not out.exists()
    # --allow_untested runs the sections anyway and says so.
    assert device_check.main(["--smoke", "--out", str(out), "--allow_untested"]) == 0
    assert len(ran) == 1 and "running anyway" in capsys.readouterr().out


def test_the_launch_script_stops_on_an_untested_stack(tmp_path):
    # End to end: a Flax past the tested range, put first on the path as the script puts the
    # wheels it installs, stops launch/device_check.sh before any section, in one line.
    site = tmp_path / "site"
    meta = site / "flax-0.13.0.dist-info" / "METADATA"
    meta.parent.mkdir(parents=True)
    meta.write_text("Metadata-Version: 2.1\nName: flax\nVersion: 0.13.0\n")
    out = tmp_path / "report"
    done = _smoke_device_check(out, site, timeout=300)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert done.stderr.startswith("error: untested JAX stack: flax 0.13.0 "), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not out.exists()

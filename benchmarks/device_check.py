"""Everything measured and checked on a fresh accelerator host, in one time-boxed run.

`bash launch/device_check.sh [--out DIR] [--wheels DIR] [--smoke]` sets up the
host's Python (launch/device_check.sh) and runs `python -m benchmarks
device_check`, which runs these sections in order, each in its own process
with its own time box:

1. environment: device kind and count, JAX/jaxlib/CUDA/cuDNN/PyTorch
   versions, the peak FLOP/s the MFU figures are taken against;
2. correctness: the tests marked `accelerator` (`pytest -m accelerator`) on
   the device, float32 at full precision, with the tolerances below;
3. training throughput, float32 and bf16 (`benchmarks train`): DiracNet-28-10,
   CIFAR shape, batch 128; JAX DiracNet, its plain twin and PyTorch eager /
   `channels_last` / `channels_last` + `torch.compile`; img/s, ratios, MFU,
   and (bf16) the share of the step spent in the device-resident input;
4. an ImageNet-shaped step: DiracNet-18 and -34 at 224 px, bf16, batch 256,
   synthetic images; img/s and MFU;
5. deploy (`benchmarks fold_latency`): folded against unfolded DiracNet-28-10 and against
   its plain twin, at batch 1 and 256;
6. a `jax.profiler` trace of a few bf16 DiracNet-28-10 steps, packed into
   DIR/profile.tar.gz (open with TensorBoard's profile plugin or Perfetto).

After every section DIR/report.json and DIR/report.md are rewritten, so a run
cut off at any point leaves a report of what finished; a section past its box
is stopped (its whole process group) and reported as timed out, and the next
one starts. Every section's output goes to DIR/device_check.log. Sections share
a JAX compilation cache, so the profile reuses the bf16 step compiled in 3.

Before the first section, the host's JAX, Flax and Orbax are checked against
the range the test suite has passed on (`_host_deps.outside_tested_range`): out
of it, the run stops with one line and exit status 2, unless `--allow_untested`.

`--smoke` runs every section at tiny sizes (a few quick accelerator tests, no
`torch.compile`) on the CPU; `tests/test_device_check.py` runs it. This module
is the driver (time boxes, child processes, the report); the sections' code is
in `device_sections`.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time

from absl import flags

from benchmarks import _flags, _host_deps
from benchmarks.device_sections import ROOT, SECTION_FNS, stop_group

__all__ = ["SECTIONS", "Section", "main", "render", "run_sections"]


@dataclasses.dataclass(frozen=True)
class Section:
    name: str
    title: str
    box_s: float  # time box on an accelerator (full sizes)
    smoke_box_s: float  # time box of the `--smoke` run on CPU


# The accelerator boxes add up to about the default budget, under 8 minutes on one H100 with
# every first compile included (most of it: a WRN-28-10 train step compiles per candidate);
# the section that overruns its box is cut, never the run. The smoke boxes are loose: a
# shared 2-core CPU compiles slowly.
SECTIONS = (
    Section("environment", "1. Environment", 20, 90),
    Section("correctness", "2. Correctness on the accelerator", 100, 240),
    Section("train_float32", "3a. Training throughput, float32", 115, 240),
    Section("train_bfloat16", "3b. Training throughput, bf16", 135, 240),
    Section("imagenet", "4. ImageNet-shaped step", 55, 150),
    Section("deploy", "5. Deploy: folded, unfolded, plain", 45, 150),
    Section("profile", "6. Profile", 25, 120),
)
_BY_NAME = {s.name: s for s in SECTIONS}
DEFAULT_BUDGET_S = 470.0  # 7 min 50 s
SMOKE_BUDGET_S = 1200.0

# ---------------------------------------------------------------------------
# The driver: one child process per section, the report rewritten after each.


def _section_env(section: Section, smoke: bool, cache_dir: str, box: float) -> dict:
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", cache_dir)
    env["PYTHONUNBUFFERED"] = "1"
    env["DEVICE_CHECK_BOX_S"] = f"{box:.0f}"
    if smoke:
        # One CPU device, as a user's machine has (a test process may have asked for more).
        env["JAX_PLATFORMS"] = "cpu"
        flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", env.get("XLA_FLAGS", ""))
        env["XLA_FLAGS"] = " ".join(flags.split())
    if section.name.startswith("train"):
        # PyTorch shares the device with JAX in these two: XLA takes less up front.
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
    if section.name == "correctness":
        # The tests run on the accelerator (tests/conftest.py defaults to the CPU only where
        # JAX_PLATFORMS is unset), float32 at full precision; the resume test runs two
        # trainers at once, so neither may take the device's memory up front.
        env.setdefault("JAX_PLATFORMS", "")
        env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        if not smoke:
            flags = env.get("XLA_FLAGS", "")
            if "deterministic_ops" not in flags:
                env["XLA_FLAGS"] = f"{flags} --xla_gpu_deterministic_ops=true".strip()
    return env


def _run_child(section, smoke, out, env, timeout, log) -> tuple[str, float, dict | None, str]:
    """Runs one section in a child process; `(status, seconds, results, output tail)`."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path = pathlib.Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.device_check",
            "--run_section",
            section.name,
            "--result",
            str(result_path),
            "--out",
            str(out),
        ]
        if smoke:
            cmd.append("--smoke")
        tail = collections.deque(maxlen=40)
        log.write(f"\n===== {section.title} =====\n$ {shlex.join(cmd)}\n")
        log.flush()
        start = time.monotonic()
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )

        def pump():
            for line in proc.stdout:
                log.write(line)
                tail.append(line.rstrip("\n"))
            log.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            stop_group(proc)
            status = f"timed out after {timeout:.0f} s"
        reader.join(timeout=10)
        seconds = time.monotonic() - start
        results = json.loads(result_path.read_text()) if result_path.is_file() else None
    if results is not None and status == "ok" and results.get("ok", True) is False:
        status = "failed (checks)"
    return status, seconds, results, "\n".join(tail)


def render(report: dict) -> str:
    """report.md from report.json's content."""
    lines = [
        "# Device check",
        "",
        f"`{report['command']}`, started {report['started_utc']}"
        + (" (smoke: tiny sizes)" if report["smoke"] else "")
        + f"; {report['wall_s']:.0f} s so far of a {report['budget_s']:.0f} s budget.",
        "",
    ]
    rows = [
        [s["title"], s["status"], f"{s.get('wall_s', 0):.1f}", s.get("summary", "")]
        for s in report["sections"].values()
    ]
    lines += [_table(["section", "status", "wall s", "headline"], rows), ""]
    for s in report["sections"].values():
        lines += [f"## {s['title']}", "", f"{s['status']}, {s.get('wall_s', 0):.1f} s.", ""]
        if s.get("markdown"):
            lines += [s["markdown"], ""]
        if s["status"] != "ok" and s.get("output_tail"):
            lines += ["Last output:", "", "```", s["output_tail"], "```", ""]
    return "\n".join(lines)


def _table(header, rows) -> str:
    """A markdown table (the driver imports no JAX, so not `_timing.markdown_table`)."""
    out = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    out += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(out)


def _write(out: pathlib.Path, report: dict) -> None:
    for name, text in (
        ("report.json", json.dumps(report, indent=2, default=str)),
        ("report.md", render(report)),
    ):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def run_sections(
    out: pathlib.Path, smoke: bool, budget: float, names, command: str, boxes=None
) -> dict:
    """Runs the sections `names` in order within `budget` seconds; returns the report.

    `boxes` maps section names to seconds that replace their default time boxes.
    """
    boxes = boxes or {}
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "command": command,
        "started_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "smoke": smoke,
        "budget_s": budget,
        "wall_s": 0.0,
        "sections": {},
    }
    begin = time.monotonic()
    with tempfile.TemporaryDirectory() as cache, open(out / "device_check.log", "a") as log:
        for section in (_BY_NAME[n] for n in names):
            left = budget - (time.monotonic() - begin)
            default = section.smoke_box_s if smoke else section.box_s
            box = min(boxes.get(section.name, default), left)
            entry = {"title": section.title}
            if box < 5:
                entry.update(status="skipped: the budget is spent", wall_s=0.0)
            else:
                print(f"[device_check] {section.title} (box {box:.0f} s)", flush=True)
                env = _section_env(section, smoke, cache, box)
                status, seconds, results, tail = _run_child(section, smoke, out, env, box, log)
                entry.update(status=status, wall_s=seconds, timeout_s=box)
                if results:
                    entry.update(results)
                if status != "ok":
                    entry["output_tail"] = tail
                print(f"[device_check] {section.title}: {status} in {seconds:.1f} s", flush=True)
            report["sections"][section.name] = entry
            report["wall_s"] = time.monotonic() - begin
            _write(out, report)
    return report


FLAGS = flags.FlagValues()  # this suite's own (`benchmarks._flags`)
flags.DEFINE_string("out", "device_check", "Report folder.", flag_values=FLAGS)
flags.DEFINE_bool("smoke", False, "Tiny sizes, on the CPU.", flag_values=FLAGS)
flags.DEFINE_float(
    "budget",
    None,
    f"Seconds for all sections together (default {DEFAULT_BUDGET_S:.0f}; "
    f"{SMOKE_BUDGET_S:.0f} with --smoke).",
    flag_values=FLAGS,
)
flags.DEFINE_list(
    "sections",
    list(_BY_NAME),
    "Run only these sections, comma-separated (in the fixed order).",
    flag_values=FLAGS,
)
flags.register_validator(
    "sections",
    lambda v: set(v) <= set(_BY_NAME),
    f"--sections takes some of {','.join(_BY_NAME)}.",
    flag_values=FLAGS,
)
flags.DEFINE_multi_string(
    "box",
    [],
    "SECTION=SECONDS: replace a section's time box (repeatable), e.g. --box=train_bfloat16=200.",
    flag_values=FLAGS,
)
flags.DEFINE_bool(
    "allow_untested",
    False,
    "Run on a JAX, Flax or Orbax outside the tested range (by default the check stops there).",
    flag_values=FLAGS,
)
flags.DEFINE_enum(
    "run_section", None, list(_BY_NAME), "Internal: run this one section.", flag_values=FLAGS
)
flags.DEFINE_string("result", None, "Internal: where --run_section writes.", flag_values=FLAGS)


def _parse(argv):
    args = _flags.parse(FLAGS, argv, "device_check", __doc__)
    prog = "python -m benchmarks device_check"
    boxes = {}
    for item in args.box:
        name, _, seconds = item.partition("=")
        try:
            boxes[name] = float(seconds)
        except ValueError:
            _flags.usage_error(prog, f"--box wants SECTION=SECONDS, got {item!r}.")
        if name not in _BY_NAME or boxes[name] <= 0:
            _flags.usage_error(
                prog, f"--box {item!r}: the section is one of {', '.join(_BY_NAME)}, seconds > 0."
            )
    args.box = boxes
    if args.budget is None:
        args.budget = SMOKE_BUDGET_S if args.smoke else DEFAULT_BUDGET_S
    if args.budget <= 0:
        _flags.usage_error(prog, f"--budget must be > 0, got {args.budget}.")
    return args


def main(argv=None) -> int:
    """Runs the sections (or, with the internal `--run_section`, one of them)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse(argv)
    out = pathlib.Path(args.out).resolve()
    if args.run_section:
        from dirac_jax import xla_cpu

        xla_cpu.apply()
        results = SECTION_FNS[args.run_section](args.smoke, out)
        print(results["markdown"])
        pathlib.Path(args.result).write_text(json.dumps(results, default=str))
        return 0
    untested = _host_deps.outside_tested_range(_host_deps.installed_versions())
    if untested:
        if not args.allow_untested:
            print(
                f"error: {untested}; install a tested version, or pass --allow_untested",
                file=sys.stderr,
            )
            return 2
        print(f"[device_check] warning: {untested}; running anyway (--allow_untested)")
    names = [n for n in _BY_NAME if n in args.sections]
    command = "python -m benchmarks device_check " + shlex.join(argv)
    report = run_sections(out, args.smoke, args.budget, names, command.strip(), args.box)
    print(f"[device_check] report: {out / 'report.md'} and {out / 'report.json'}")
    return 0 if all(s["status"] == "ok" for s in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

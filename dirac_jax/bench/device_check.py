"""Everything measured and checked on a fresh accelerator host, in one time-boxed run.

`bash launch/device_check.sh [--out DIR] [--wheels DIR] [--smoke]` sets up the
host's Python (launch/device_check.sh) and runs `python -m dirac_jax.bench
device_check`, which runs these sections in order, each in its own process
with its own time box:

1. environment: device kind and count, JAX/jaxlib/CUDA/cuDNN/PyTorch
   versions, the peak FLOP/s the MFU figures are taken against;
2. correctness: the tests marked `accelerator` (`pytest -m accelerator`) on
   the device, float32 at full precision, with the tolerances below;
3. training throughput, float32 and bf16 (`bench train`): DiracNet-28-10,
   CIFAR shape, batch 128; JAX DiracNet, its plain twin and PyTorch eager /
   `channels_last` / `channels_last` + `torch.compile`; img/s, ratios, MFU,
   and (bf16) the share of the step spent in the device-resident input;
4. an ImageNet-shaped step: DiracNet-18 and -34 at 224 px, bf16, batch 256,
   synthetic images; img/s and MFU;
5. deploy (`bench fold_latency`): folded against unfolded DiracNet-28-10 and against
   its plain twin, at batch 1 and 256;
6. a `jax.profiler` trace of a few bf16 DiracNet-28-10 steps, packed into
   DIR/profile.tar.gz (open with TensorBoard's profile plugin or Perfetto).

After every section DIR/report.json and DIR/report.md are rewritten, so a run
cut off at any point leaves a report of what finished; a section past its box
is stopped (its whole process group) and reported as timed out, and the next
one starts. Every section's output goes to DIR/device_check.log. Sections share
a JAX compilation cache, so the profile reuses the bf16 step compiled in 3.

`--smoke` runs every section at tiny sizes (a few quick accelerator tests, no
`torch.compile`) on the CPU; `tests/test_device_check.py` runs it.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree as ET

from absl import flags

from dirac_jax.bench import _flags

__all__ = ["SECTIONS", "Section", "main", "render", "run_sections"]

ROOT = pathlib.Path(__file__).resolve().parents[2]


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

# The accelerator tests of `--smoke`: quick ones, so the run exercises the section's
# machinery (collection without a GPU-only dependency, result parsing) in seconds.
_SMOKE_TESTS = "delta_conv_is_exact_identity or keeps_the_w_term or tensorfloat32"

TOLERANCES = (
    "float32 runs at `jax_default_matmul_precision=highest` (no TF32), so the CPU "
    "tolerances hold: the Dirac kernel and its hand-written derivative equal eq. 5 under "
    "autodiff to 1e-6 (values) and 1e-5 (gradients) of the largest magnitude; fold = model "
    "to 1e-4 absolute on order-one logits; ONNX in onnxruntime = model to 1e-4. At TF32 "
    "(`tensorfloat32` precision, 10 mantissa bits, unit roundoff 2^-11) fold = model is "
    "checked to 1e-2 of the largest logit. bf16: the identity path is exact bit for bit, "
    "the bf16 Dirac conv within one bf16 rounding (2^-8 relative) of float32. Resume = "
    "uninterrupted run bit for bit, under `--xla_gpu_deterministic_ops=true` on GPUs."
)


# ---------------------------------------------------------------------------
# The sections. Each runs in its own process and returns
# {"summary": one line, "markdown": text, "data": json-able results}.


def _env_section(smoke: bool, out: pathlib.Path) -> dict:
    import importlib.metadata as md

    import jax

    from dirac_jax.bench import _timing
    from dirac_jax.bench import train as bench_train

    env = _timing.environment()
    device = jax.devices()[0]
    dists = (
        "jax",
        "jaxlib",
        "jax-cuda12-plugin",
        "jax-cuda12-pjrt",
        "jax-cuda13-plugin",
        "jax-cuda13-pjrt",
        "libtpu",
        "flax",
        "optax",
        "orbax-checkpoint",
        "ml-collections",
        "numpy",
        "torch",
        "onnx",
        "onnxruntime",
        "grain",
        "tensorflow-datasets",
    )
    versions = {}
    for d in dists:
        with contextlib.suppress(md.PackageNotFoundError):
            versions[d] = md.version(d)
    data = {
        "environment": env,
        "versions": versions,
        "platform_version": getattr(device.client, "platform_version", None),
        "cuda": _cuda_versions(),
        "torch": _torch_info(),
        "memory_bytes": (device.memory_stats() or {}).get("bytes_limit"),
        "peak_tflops_per_device": bench_train.PEAK_TFLOPS.get(env["device_kind"]),
        "nvidia_smi": _nvidia_smi(),
    }
    peak = data["peak_tflops_per_device"]
    rows = [
        ["devices", f"{env['device_count']} x {env['device_kind']} ({env['backend']})"],
        ["platform", str(data["platform_version"]).replace("\n", " ")],
        [
            "device memory",
            f"{data['memory_bytes'] / 2**30:.1f} GiB" if data["memory_bytes"] else "-",
        ],
        ["CUDA / cuDNN (jaxlib)", ", ".join(f"{k} {v}" for k, v in data["cuda"].items()) or "-"],
        ["PyTorch", ", ".join(f"{k} {v}" for k, v in data["torch"].items()) or "not installed"],
        ["Python packages", ", ".join(f"{k} {v}" for k, v in versions.items())],
        [
            "peak TFLOP/s for MFU",
            ", ".join(f"{k} {v}" for k, v in (peak or {}).items())
            or "none known for this device (bench.train.PEAK_TFLOPS)",
        ],
        ["nvidia-smi", data["nvidia_smi"] or "-"],
        ["host", _timing.describe(env)],
    ]
    markdown = _timing.markdown_table(["", ""], rows)
    if env["backend"] == "cpu" and not smoke:
        markdown += "\n\nNo accelerator found: the full-size sections will run on the CPU."
    summary = f"{env['device_count']} x {env['device_kind']}, jax {env['jax']}"
    return {"summary": summary, "markdown": markdown, "data": data}


def _cuda_versions() -> dict:
    """CUDA and cuDNN versions jaxlib loaded (empty without a CUDA backend)."""
    try:  # Not public API: best effort, the report only.
        from jax._src.lib import cuda_versions
    except ImportError:
        return {}
    if cuda_versions is None:
        return {}
    found = {}
    for name in (
        "cuda_runtime_get_version",
        "cuda_driver_get_version",
        "cudnn_get_version",
        "cublas_get_version",
    ):
        fn = getattr(cuda_versions, name, None)
        with contextlib.suppress(Exception):
            found[name.removesuffix("_get_version")] = fn()
    return found


def _torch_info() -> dict:
    try:
        import torch
    except ImportError:
        return {}
    info = {"version": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        info["cudnn"] = torch.backends.cudnn.version()
        info["device"] = torch.cuda.get_device_name()
    return info


def _nvidia_smi() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    query = "name,driver_version,clocks.max.sm,power.limit,memory.total"
    try:
        done = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().replace("\n", "; ") or None


def _correctness_section(smoke: bool, out: pathlib.Path) -> dict:
    # The resume test trains three runs: last, so a time-out keeps the quick checks.
    files = sorted(
        (
            str(p.relative_to(ROOT))
            for p in (ROOT / "tests").glob("test_*.py")
            if "mark.accelerator" in p.read_text()
        ),
        key=lambda f: (f.endswith("test_checkpoint.py"), f),
    )
    with tempfile.TemporaryDirectory() as tmp:
        junit = pathlib.Path(tmp) / "junit.xml"
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-m",
            "accelerator",
            "-p",
            "no:xdist",
            "-v",
            "-o",
            "addopts=-p no:cacheprovider --strict-markers",
            f"--junitxml={junit}",
            *files,
        ]
        if smoke:
            cmd += ["-k", _SMOKE_TESTS]
        # Leave the section's own process time to report what ran before a time-out.
        box = float(os.environ.get("DEVICE_CHECK_BOX_S", "600")) - 15
        lines: list[str] = []
        timed_out = _stream(cmd, max(box, 10), lines, cwd=ROOT)
        tests = _junit_results(junit) if junit.is_file() else _verbose_results(lines)
    counts = collections.Counter(t["outcome"] for t in tests)
    rows = [
        [
            t["test"],
            t["outcome"],
            f"{t['seconds']:.1f}" if t["seconds"] is not None else "-",
            t["message"][:160],
        ]
        for t in tests
    ]
    head = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no test ran"
    if timed_out:
        head += f" (pytest stopped after {box:.0f} s)"
    markdown = "\n".join(
        [
            f"`{shlex.join(cmd[1:])}`",
            "",
            f"Tolerances: {TOLERANCES}",
            "",
            head,
            "",
            _timing_table(["test", "outcome", "s", "message"], rows),
        ]
    )
    failed = counts.get("failed", 0) + counts.get("error", 0)
    data = {"command": cmd[1:], "tests": tests, "counts": dict(counts), "timed_out": timed_out}
    return {"summary": head, "markdown": markdown, "data": data, "ok": not failed and bool(tests)}


def _stream(cmd, timeout: float, lines: list, **kw) -> bool:
    """Runs `cmd`, echoing its output and keeping its lines; True if stopped at `timeout`."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kw,
    )

    def pump():
        for line in proc.stdout:
            sys.stdout.write(line)
            lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        _stop_group(proc)
        timed_out = True
    reader.join(timeout=10)
    return timed_out


def _junit_results(path: pathlib.Path) -> list[dict]:
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (node.get("message") or node.text or "").strip().splitlines()[0:1]
                message = message[0] if message else ""
                break
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        tests.append(
            {
                "test": name,
                "outcome": outcome,
                "seconds": float(case.get("time", 0)),
                "message": message,
            }
        )
    return tests


_VERBOSE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")


def _verbose_results(lines: list[str]) -> list[dict]:
    """Outcomes from `pytest -v` lines, for a run stopped before writing its junit file."""
    tests = []
    for line in lines:
        m = _VERBOSE.match(line)
        if m:
            tests.append(
                {
                    "test": m[1].split("/")[-1].replace(".py::", "::", 1),
                    "outcome": m[2].lower(),
                    "seconds": None,
                    "message": "",
                }
            )
    return tests


def _train_section(smoke: bool, out: pathlib.Path, half: bool) -> dict:
    from dirac_jax.bench import train as bench_train

    if smoke:  # torch.compile on the CPU takes minutes: eager and channels_last only.
        shape = dict(depth=10, width=0.25, batch=8, repeats=2, warmup=1)
        shape["torch_variants"] = ["eager", "channels_last"]
    else:
        shape = dict(depth=28, width=10.0, batch=128, repeats=20)
    # bf16 is the shortest step, so its input share bounds float32's.
    args = bench_train.options(**shape, half_precision=half, input_share=half)
    results = bench_train.run(args)
    dirac = next(k for k in results["stats"] if k.endswith("(JAX)") and k.startswith("DiracNet"))
    parts = [f"DiracNet {results['stats'][dirac]['images_per_s']:.0f} img/s"]
    if dirac in results["mfu"]:
        parts.append(f"MFU {results['mfu'][dirac]:.1%}")
    for key, r in results["ratios"].items():
        if "torch.compile" in key or key.startswith("DiracNet / plain"):
            parts.append(f"{key.removesuffix(' (step time)')} {r['ratio']:.2f}")
        if key.startswith("augmentation"):
            parts.append(f"input share {1 - 1 / r['ratio']:.1%}")
    return {"summary": "; ".join(parts), "markdown": bench_train.report(results), "data": results}


def _imagenet_section(smoke: bool, out: pathlib.Path) -> dict:
    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from dirac_jax import config_schema, optim, sharding, steps
    from dirac_jax.bench import _timing
    from dirac_jax.bench import train as bench_train

    depths, width, size, batch, repeats = (
        ([18], 0.25, 32, 4, 2) if smoke else ([18, 34], 1.0, 224, 256, 10)
    )
    mesh = sharding.make_mesh()
    rng = np.random.default_rng(0)
    sharded = NamedSharding(mesh, P("data"))
    images = jax.device_put(rng.standard_normal((batch, size, size, 3), np.float32), sharded)
    labels = jax.device_put(rng.integers(0, 1000, batch).astype(np.int32), sharded)
    candidates, flops, params = {}, {}, {}
    for depth in depths:
        config = bench_train.config_for("diracnet", depth, width, batch, half_precision=True)
        config.model.stem = "imagenet"
        config.dataset.name = "imagenet"
        lr_fn = optim.create_learning_rate_fn(config, steps_per_epoch=1000)
        model = config_schema.create_model(config, num_classes=1000)
        state = steps.create_train_state(
            config, model, jax.random.key(0), (size, size, 3), lr_fn, mesh=mesh
        )
        train_fn, _ = steps.compile_steps(config, mesh, lr_fn, "imagenet", in_memory=False)
        batch_ = {"image": images, "label": labels}
        name = f"DiracNet-{depth}{'' if width == 1 else f'-{width:g}'} (JAX, bf16)"
        flops[name] = bench_train.lowered_flops(train_fn.lower(state, batch_))
        params[name] = sum(x.size for x in jax.tree.leaves(state.params))
        candidates[name] = _closure_step(train_fn, state, batch_)
    compile_s = {k: _timing.warm_up(c, 2) for k, c in candidates.items()}
    times = _timing.interleaved_times(candidates, repeats)
    env = _timing.environment()
    peak = (bench_train.PEAK_TFLOPS.get(env["device_kind"]) or {}).get("bfloat16")
    rows, data = [], {"environment": env, "batch": batch, "size": size, "candidates": {}}
    for name, t in times.items():
        s = _timing.summarize(t)
        s["images_per_s"] = batch / (s["median_ms"] / 1e3)
        mfu = (
            flops[name] / (s["median_ms"] / 1e3) / 1e12 / (peak * env["device_count"])
            if (peak and flops[name])
            else None
        )
        data["candidates"][name] = {
            **s,
            "flops_per_step": flops[name],
            "mfu": mfu,
            "params": params[name],
            "compile_s": compile_s[name],
        }
        rows.append(
            [
                name,
                f"{params[name]:,}",
                s["median_ms"],
                s["images_per_s"],
                flops[name] or "-",
                mfu if mfu is not None else "-",
                compile_s[name],
            ]
        )
    markdown = "\n".join(
        [
            f"Machine: {_timing.describe(env)}.",
            f"Global batch {batch} of {size}x{size}x3 synthetic float images (the streamed step: "
            f"no augmentation), bf16 compute, {repeats} interleaved rounds, median per step; "
            f"MFU against {peak} TFLOP/s per device (bfloat16).",
            "",
            _timing.markdown_table(
                [
                    "candidate",
                    "params",
                    "median ms/step",
                    "images/s",
                    "FLOPs/step",
                    "MFU",
                    "first call s",
                ],
                rows,
            ),
        ]
    )
    summary = "; ".join(
        f"{k.split(' ')[0]} {v['images_per_s']:.0f} img/s"
        + (f", MFU {v['mfu']:.1%}" if v["mfu"] is not None else "")
        for k, v in data["candidates"].items()
    )
    return {"summary": summary, "markdown": markdown, "data": data}


def _closure_step(train_fn, state, batch):
    """`step()` runs one donated-state training step and returns its loss."""
    cell = {"state": state}

    def step():
        cell["state"], metrics = train_fn(cell["state"], batch)
        return metrics["loss"]

    return step


def _deploy_section(smoke: bool, out: pathlib.Path) -> dict:
    from dirac_jax.bench import fold_latency

    shape = dict(depth=10, width=0.25) if smoke else dict(depth=28, width=10.0)
    runs = [(1, 2, 2), (8, 2, 2)] if smoke else [(1, 30, 3), (256, 10, 2)]
    results, parts, markdown = {}, [], []
    for batch, repeats, warmup in runs:
        args = fold_latency.options(**shape, batch=batch, repeats=repeats, warmup=warmup)
        r = fold_latency.run(args)
        results[f"batch {batch}"] = r
        markdown += [f"Batch {batch}:", "", fold_latency.report(r), ""]
        for key in ("folded / unfolded DiracNet", "folded DiracNet / plain (BN at eval)"):
            parts.append(f"batch {batch} {key} {r['ratios'][key]['ratio']:.2f}")
    return {"summary": "; ".join(parts), "markdown": "\n".join(markdown), "data": results}


def _profile_section(smoke: bool, out: pathlib.Path) -> dict:

    from dirac_jax import data, sharding
    from dirac_jax.bench import _timing
    from dirac_jax.bench import train as bench_train

    shape = dict(depth=10, width=0.25, batch=8) if smoke else dict(depth=28, width=10.0, batch=128)
    steps = 2 if smoke else 5
    args = bench_train.options(**shape, half_precision=True, torch=False)
    mesh = sharding.make_mesh()
    ds = data.load("cifar10", source="synthetic", synthetic_size=max(args.batch, 512))
    arrays = sharding.put_replicated(mesh, data.prepare(ds))
    step = bench_train.jax_candidate("diracnet", args, mesh, arrays)[0]
    first_s = _timing.warm_up(step, 2)  # the compile, from the cache section 3 filled
    target = out / "profile.tar.gz"
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        bench_train.profile(step, tmp, steps)
        traced_s = time.perf_counter() - start
        files = sorted(str(p.relative_to(tmp)) for p in pathlib.Path(tmp).rglob("*") if p.is_file())
        with tarfile.open(target, "w:gz") as tar:
            tar.add(tmp, arcname="profile")
    size = target.stat().st_size
    label = f"DiracNet-{args.depth}-{args.width:g}"
    markdown = (
        f"{steps} bf16 {label} training steps (batch {args.batch}) traced in {traced_s:.2f} s "
        f"(first call {first_s:.1f} s) into `{target.name}` ({size / 2**20:.2f} MiB): "
        f"`tar xzf {target.name}` and open `profile/` with TensorBoard's profile plugin "
        f"(`tensorboard --logdir profile`) or the `.xplane.pb` in Perfetto/XProf. Files: "
        + ", ".join(f"`{f}`" for f in files)
    )
    if size > 15 * 2**20:  # remote runners often copy back only smaller files
        markdown += "\n\nThe trace is over 15 MiB: copy it off the host yourself."
    data_ = {
        "file": target.name,
        "bytes": size,
        "steps": steps,
        "traced_s": traced_s,
        "files": files,
        "first_call_s": first_s,
    }
    summary = f"{steps} steps, {target.name} {size / 2**20:.2f} MiB"
    return {"summary": summary, "markdown": markdown, "data": data_, "ok": bool(files)}


_SECTION_FNS = {
    "environment": _env_section,
    "correctness": _correctness_section,
    "train_float32": lambda smoke, out: _train_section(smoke, out, half=False),
    "train_bfloat16": lambda smoke, out: _train_section(smoke, out, half=True),
    "imagenet": _imagenet_section,
    "deploy": _deploy_section,
    "profile": _profile_section,
}


def _timing_table(header, rows) -> str:
    from dirac_jax.bench._timing import markdown_table

    return markdown_table(header, rows)


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


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group of `proc`, SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _run_child(section, smoke, out, env, timeout, log) -> tuple[str, float, dict | None, str]:
    """Runs one section in a child process; `(status, seconds, results, output tail)`."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path = pathlib.Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "dirac_jax.bench.device_check",
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
            _stop_group(proc)
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
        "started_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
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


FLAGS = flags.FlagValues()  # this suite's own (`bench._flags`)
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
flags.DEFINE_enum(
    "run_section", None, list(_BY_NAME), "Internal: run this one section.", flag_values=FLAGS
)
flags.DEFINE_string("result", None, "Internal: where --run_section writes.", flag_values=FLAGS)


def _parse(argv):
    args = _flags.parse(FLAGS, argv, "device_check", __doc__)
    prog = "python -m dirac_jax.bench device_check"
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
        results = _SECTION_FNS[args.run_section](args.smoke, out)
        print(results["markdown"])
        pathlib.Path(args.result).write_text(json.dumps(results, default=str))
        return 0
    names = [n for n in _BY_NAME if n in args.sections]
    command = "python -m dirac_jax.bench device_check " + shlex.join(argv)
    report = run_sections(out, args.smoke, args.budget, names, command.strip(), args.box)
    print(f"[device_check] report: {out / 'report.md'} and {out / 'report.json'}")
    return 0 if all(s["status"] == "ok" for s in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

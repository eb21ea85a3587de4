"""The device check's sections: what each one measures, in a process of its own.

`python -m benchmarks device_check` (the driver, `device_check`) runs each
section in a child process under a time box; `SECTION_FNS` maps a section's name
to its function, `fn(smoke, out) -> {"summary": one line, "markdown": text,
"data": json-able results}`. The sections: the environment, the accelerator
tests (correctness), training throughput in float32 and bf16 (`benchmarks train`),
an ImageNet-shaped step, the folded net's latency (`benchmarks fold_latency`) and a
profile of a few steps.
"""

from __future__ import annotations

import collections
import contextlib
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

__all__ = ["ROOT", "SECTION_FNS", "stop_group"]

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The accelerator tests of `--smoke`: quick ones, so the run exercises the section's
# machinery (collection without a GPU-only dependency, result parsing) in seconds.
_SMOKE_TESTS = "delta_conv_is_exact_identity or keeps_the_w_term or tensorfloat32"

# The accelerator tests hold themselves to their own tolerances (float32 at full precision,
# TF32, bf16); the report points to where they are written down with their reasons rather than
# restating numbers that would drift from the tests.
TOLERANCES = "BENCHMARKS.md, section device_check (each test asserts its own)."


# ---------------------------------------------------------------------------
# The sections. Each runs in its own process and returns
# {"summary": one line, "markdown": text, "data": json-able results}.


def _env_section(smoke: bool, out: pathlib.Path) -> dict:
    import importlib.metadata as md

    import jax

    from benchmarks import _host_deps, _timing
    from benchmarks import train as bench_train

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
        # None inside the tested range; the driver stops outside it unless --allow_untested.
        "untested": _host_deps.outside_tested_range(_host_deps.installed_versions()),
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
        ["tested stack", data["untested"] or "jax, flax, orbax-checkpoint in the tested range"],
        [
            "peak TFLOP/s for MFU",
            ", ".join(f"{k} {v}" for k, v in (peak or {}).items())
            or "none known for this device (benchmarks.train.PEAK_TFLOPS)",
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
        stop_group(proc)
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
    from benchmarks import train as bench_train

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

    from benchmarks import _timing
    from benchmarks import train as bench_train
    from dirac_jax import config_schema, models, optim, sharding, steps

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
        params[name] = models.count_params(state.params)
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
    from benchmarks import fold_latency

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

    from benchmarks import _timing
    from benchmarks import train as bench_train
    from dirac_jax import data, sharding

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


SECTION_FNS = {
    "environment": _env_section,
    "correctness": _correctness_section,
    "train_float32": lambda smoke, out: _train_section(smoke, out, half=False),
    "train_bfloat16": lambda smoke, out: _train_section(smoke, out, half=True),
    "imagenet": _imagenet_section,
    "deploy": _deploy_section,
    "profile": _profile_section,
}


def _timing_table(header, rows) -> str:
    from benchmarks._timing import markdown_table

    return markdown_table(header, rows)


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group of `proc`, SIGKILL after 10 s."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue

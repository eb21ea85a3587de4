"""Timing helpers shared by the benchmarks: warm-up, interleaved medians, environment.

Every benchmark reports ratios of candidates measured in one run, so the
candidates are timed round-robin: machine noise (other processes, frequency
scaling, thermal throttling) then hits all of them alike and cancels in the
ratio. Absolute times are printed for context only.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax


def _cpu_model() -> str:
    """The CPU's marketing name on Linux, else the architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The /proc/cpuinfo flags that decide how fast XLA's and onnxruntime's CPU kernels run.
SIMD_FEATURES = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu_features(wanted: Sequence[str] = SIMD_FEATURES) -> list[str]:
    """Those of `wanted` that the CPU reports in /proc/cpuinfo (Linux; else empty)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def environment() -> dict[str, Any]:
    """Describes the machine and software a measurement ran on.

    Examples:
      >>> env = environment()
      >>> sorted(env)[:3]
      ['backend', 'cpu_count', 'cpu_features']
    """
    device = jax.devices()[0]
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call.
        usable = os.cpu_count()
    return {
        "backend": jax.default_backend(),
        "cpu_count": usable,
        "device_count": jax.device_count(),
        "device_kind": device.device_kind,
        "jax": jax.__version__,
        "machine": platform.machine(),
        "cpu_model": _cpu_model(),
        "cpu_features": cpu_features(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "python": sys.version.split()[0],
        "system": platform.system(),
    }


def describe(env: Mapping[str, Any]) -> str:
    """One line for reports: jax version, backend, devices, cores, CPU, OS, Python."""
    return (
        f"jax {env['jax']}, {env['backend']} backend ({env['device_kind']}, "
        f"{env['device_count']} device(s)), {env['cpu_count']} core(s) of {env['cpu_model']}, "
        f"{env['machine']} {env['system']}, Python {env['python']}, "
        f"CPU features: {' '.join(env.get('cpu_features') or ['(none listed)'])}, "
        f"XLA_FLAGS: {env.get('xla_flags') or '(none)'}"
    )


def warm_up(fn: Callable[[], Any], times: int = 2) -> float:
    """Calls `fn` `times` times, waiting for its result; returns the first call's seconds.

    The first call of a `jit`-compiled function includes tracing and compilation,
    so it is never part of a measurement.

    Raises:
      ValueError: if `times < 1`.
    """
    if times < 1:
        raise ValueError(f"warm_up: times must be >= 1, got {times}.")
    first = None
    for _ in range(times):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        first = time.perf_counter() - start if first is None else first
    return first


def round_robin(names: Sequence[str], repeats: int) -> Iterator[str]:
    """`names`, `repeats` rounds of them, each round's order rotated by one.

    So no candidate always runs first (after an idle gap) or last.

    Examples:
      >>> list(round_robin(["a", "b", "c"], 2))
      ['a', 'b', 'c', 'b', 'c', 'a']
    """
    for r in range(repeats):
        for i in range(len(names)):
            yield names[(r + i) % len(names)]


def interleaved_times(
    candidates: Mapping[str, Callable[[], Any]], repeats: int
) -> dict[str, list[float]]:
    """Times every candidate `repeats` times, round-robin; returns seconds per call.

    Each round runs all candidates once, in an order rotated by one every round,
    so no candidate always runs first (after an idle gap) or last. Each call is
    waited for with `jax.block_until_ready`. Warm the candidates up first.

    Raises:
      ValueError: if there are no candidates or `repeats < 1`.

    Examples:
      >>> times = interleaved_times({"a": lambda: 1, "b": lambda: 2}, repeats=3)
      >>> sorted(times), len(times["a"])
      (['a', 'b'], 3)
    """
    if not candidates:
        raise ValueError("interleaved_times: no candidates to time.")
    if repeats < 1:
        raise ValueError(f"interleaved_times: repeats must be >= 1, got {repeats}.")
    times = {name: [] for name in candidates}
    for name in round_robin(list(candidates), repeats):
        start = time.perf_counter()
        jax.block_until_ready(candidates[name]())
        times[name].append(time.perf_counter() - start)
    return times


def summarize(times: Sequence[float]) -> dict[str, float]:
    """Median, min and max of a list of seconds, in milliseconds."""
    return {
        "median_ms": 1e3 * statistics.median(times),
        "min_ms": 1e3 * min(times),
        "max_ms": 1e3 * max(times),
    }


def paired_ratio(times: Mapping[str, Sequence[float]], num: str, den: str) -> dict[str, float]:
    """The ratio `num / den` of medians, and the quartiles of the per-round ratios.

    Rounds of `interleaved_times` run the candidates back to back, so a round's
    ratio cancels slow drifts of the machine; the spread of those ratios shows
    how far to trust the ratio of medians.

    Examples:
      >>> r = paired_ratio({"a": [1.0, 2.0, 3.0], "b": [2.0, 4.0, 6.0]}, "a", "b")
      >>> r["ratio"], r["round_q1"], r["round_q3"]
      (0.5, 0.5, 0.5)
    """
    per_round = [n / d for n, d in zip(times[num], times[den], strict=True)]
    q1, _, q3 = statistics.quantiles(per_round, n=4) if len(per_round) > 1 else per_round * 3
    return {
        "ratio": statistics.median(times[num]) / statistics.median(times[den]),
        "round_q1": q1,
        "round_q3": q3,
    }


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats are printed with 3 significant digits.

    Examples:
      >>> print(markdown_table(["x", "y"], [["a", 0.12345]]))
      | x | y |
      | --- | --- |
      | a | 0.123 |
    """

    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def cli(argv, parse, run, report) -> int:
    """A benchmark's `main`: parse flags, run, print the markdown report, maybe write JSON."""
    args = parse(sys.argv[1:] if argv is None else argv)
    results = run(args)
    print(report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return 0

"""XLA:CPU flag settings side by side: compile time, step time and the same numbers.

`python -m benchmarks cpu_flags` runs one worker process per setting of
`XLA_FLAGS` (flags are read once, when a process starts its CPU backend), each
holding the same jitted programs:

* the trainer's DiracNet training step (`benchmarks train`'s candidate: gather,
  augmentation, forward, backward, SGD) on synthetic CIFAR-sized data;
* one 3x3 convolution, forward and backward, batch 128, 32x32x64.

The parent starts the workers one after another (so each compile runs alone),
then asks them for one timed call at a time, round-robin, and reports medians
and per-round ratios against the jaxlib default, from one run. Every worker
trains from the same state on the same batch, so the losses of its steps must
agree across settings: the report gives the largest relative difference, a
check that a setting does not change the numbers (a miscompilation would).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import flags

from benchmarks import _flags

__all__ = ["SETTINGS", "main", "report", "run"]

# name -> flags added to XLA_FLAGS. The second is what `dirac_jax.xla_cpu` sets; the third
# is the oneDNN recipe Intel suggests for XLA:CPU (oneDNN custom calls, no YNNPACK/XNNPACK).
SETTINGS = {
    "jaxlib default": "",
    "YNNPACK fusions off": "--xla_cpu_experimental_ynn_fusion_type=",
    "oneDNN custom calls": (
        "--xla_cpu_experimental_onednn_custom_call=true --xla_cpu_use_onednn=false "
        "--xla_cpu_experimental_ynn_fusion_type=invalid --xla_cpu_use_xnnpack=false"
    ),
}
PROGRAMS = ("train", "conv")


FLAGS = flags.FlagValues()  # this suite's own (`_flags`)
flags.DEFINE_integer("depth", 16, "DiracNet depth, 6n+4.", flag_values=FLAGS)
flags.DEFINE_float("width", 1.0, "Width multiplier k.", flag_values=FLAGS)
flags.DEFINE_integer("batch", 64, "Training batch size.", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 10, "Timed rounds.", flag_values=FLAGS)
flags.DEFINE_list(
    "settings",
    list(SETTINGS),
    f"Settings to compare, comma-separated, of {list(SETTINGS)}.",
    flag_values=FLAGS,
)
flags.register_validator(
    "settings",
    lambda v: set(v) <= set(SETTINGS),
    "--settings takes names of SETTINGS.",
    flag_values=FLAGS,
)
flags.DEFINE_string("json", None, "Also write the results to this JSON file.", flag_values=FLAGS)
flags.DEFINE_bool(
    "worker", False, "Internal: serve one setting to the parent process.", flag_values=FLAGS
)


def _parse(argv):
    return _flags.parse(FLAGS, argv, "cpu_flags", __doc__)


# ---------------------------------------------------------------- worker side


def _conv_program():
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(0), (128, 32, 32, 64))
    w = jax.random.normal(jax.random.key(1), (3, 3, 64, 64)) * 0.05

    def loss(x, w):
        dims = ("NHWC", "HWIO", "NHWC")
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dims)
        return jnp.mean(y * y)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return lambda: grad(x, w)


def _worker(args) -> int:
    """Builds the programs, then answers one command per stdin line with JSON on stdout."""
    import jax

    from benchmarks import _timing
    from benchmarks.train import jax_candidate
    from dirac_jax import data, sharding

    out = sys.stdout
    args.half_precision = False
    mesh = sharding.make_mesh(jax.devices()[:1])
    ds = data.prepare(data.load("cifar10", source="synthetic", synthetic_size=512))
    arrays = sharding.put_replicated(mesh, ds)
    step, _, _, _ = jax_candidate("diracnet", args, mesh, arrays)
    programs = {"train": step, "conv": _conv_program()}
    compile_s = {name: _timing.warm_up(fn, 1) for name, fn in programs.items()}
    print(json.dumps({"compile_s": compile_s}), file=out, flush=True)
    for line in sys.stdin:
        name = line.strip()
        if name not in programs:
            break
        start = time.perf_counter()
        result = jax.block_until_ready(programs[name]())
        seconds = time.perf_counter() - start
        loss = float(result) if name == "train" else None
        print(json.dumps({"seconds": seconds, "loss": loss}), file=out, flush=True)
    return 0


# ---------------------------------------------------------------- parent side


def _start(name: str, args) -> subprocess.Popen:
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in (env.get("XLA_FLAGS", ""), SETTINGS[name]) if f)
    # The setting under test is the whole story: `xla_cpu.apply` adds nothing in a worker.
    env["DIRAC_JAX_XLA_CPU_FLAGS"] = "0"
    env.setdefault("JAX_PLATFORMS", "cpu")
    cmd = [
        sys.executable, "-m", "benchmarks.cpu_flags", "--worker",
        "--depth", str(args.depth), "--width", str(args.width), "--batch", str(args.batch),
    ]  # fmt: skip
    return subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _ask(proc: subprocess.Popen, command: str | None = None) -> dict:
    if command is not None:
        proc.stdin.write(command + "\n")
        proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"a cpu_flags worker exited with status {proc.wait()}")
    return json.loads(line)


def run(args) -> dict:
    from benchmarks import _timing

    workers, compile_s = {}, {}
    try:
        for name in args.settings:  # one at a time: each compile runs alone
            workers[name] = _start(name, args)
            compile_s[name] = _ask(workers[name])["compile_s"]
        times = {(s, p): [] for s in args.settings for p in PROGRAMS}
        losses = {s: [] for s in args.settings}
        for key in _timing.round_robin(list(times), args.repeats):
            answer = _ask(workers[key[0]], key[1])
            times[key].append(answer["seconds"])
            if answer["loss"] is not None:
                losses[key[0]].append(answer["loss"])
    finally:
        for proc in workers.values():
            if proc.poll() is None:
                proc.stdin.close()
                proc.wait(timeout=60)
    base = args.settings[0]
    ratios = {
        f"{s} / {base} ({p})": _timing.paired_ratio(
            {"n": times[s, p], "d": times[base, p]}, "n", "d"
        )
        for s in args.settings[1:]
        for p in PROGRAMS
    }
    loss_diff = {
        s: max(abs(a - b) / abs(b) for a, b in zip(losses[s], losses[base], strict=True))
        for s in args.settings[1:]
    }
    return {
        "environment": _timing.environment(),
        "args": vars(args),
        "flags": {s: SETTINGS[s] for s in args.settings},
        "compile_s": compile_s,
        "stats": {f"{s} ({p})": _timing.summarize(t) for (s, p), t in times.items()},
        "ratios": ratios,
        "loss_rel_diff": loss_diff,
    }


def report(results: dict) -> str:
    from benchmarks import _timing

    args = results["args"]
    rows = [
        [
            s,
            f"`{results['flags'][s]}`" if results["flags"][s] else "(none)",
            results["compile_s"][s]["train"],
            results["stats"][f"{s} (train)"]["median_ms"],
            results["stats"][f"{s} (conv)"]["median_ms"],
            results["loss_rel_diff"].get(s, "-"),
        ]
        for s in args["settings"]
    ]
    ratio_rows = [
        [k, r["ratio"], f"{r['round_q1']:.3g} - {r['round_q3']:.3g}"]
        for k, r in results["ratios"].items()
    ]
    return "\n".join(
        [
            f"Machine: {_timing.describe(results['environment'])}.",
            f"DiracNet-{args['depth']}-{args['width']:g} train step, batch {args['batch']}, one "
            f"device; one 3x3 conv fwd+bwd, batch 128, 32x32x64. {args['repeats']} interleaved "
            "rounds, one worker process per setting.",
            "",
            _timing.markdown_table(
                [
                    "setting",
                    "XLA_FLAGS added",
                    "train step compile s",
                    "train step median ms",
                    "conv fwd+bwd median ms",
                    "max rel. loss diff",
                ],
                rows,
            ),
            "",
            _timing.markdown_table(["ratio", "of medians", "per-round quartiles"], ratio_rows),
        ]
    )


def main(argv=None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    if args.worker:
        return _worker(args)
    from benchmarks import _timing

    return _timing.cli(argv, _parse, run, report)


if __name__ == "__main__":
    sys.exit(main())

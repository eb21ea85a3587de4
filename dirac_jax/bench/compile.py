"""Compile cost: what the Dirac parameterization adds to a compiled training program.

`python -m dirac_jax.bench compile` lowers and compiles the forward and backward
pass of DiracNet and of the plain net of the same shape (`get_model("diracnet")`
and `get_model("plain")`: the same model code, the same layers), as
`jax.jit(jax.grad(loss)).lower(params, batch_stats, images, labels)` with every
input an abstract argument, so nothing about the parameters can be baked into
the program. For each it reports

* the size of the lowered program's text (StableHLO) and the bytes of literal
  constants in it: a delta built on the host would be a constant the size of
  each kernel (DiracNet-28-10: about 146 MB, in every executable);
* the compile time (`Lowered.compile`, median of interleaved repeats, with the
  persistent compilation cache off);
* XLA's memory analysis of the executable: temporary, argument and output bytes;
* the number of fusions in the optimized program, the unit of XLA's code
  generation (on CPU each becomes an LLVM function), which drives compile time;

and the DiracNet / plain ratios, against the goals: program size <= 1.5x (the
Dirac ops themselves add a little), compile time and temporary memory <= 1.1x.
"""

from __future__ import annotations

import argparse
import math
import re
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from dirac_jax.bench import _timing
from dirac_jax.models import get_model

__all__ = ["CASES", "GOALS", "constant_bytes", "grad_step", "main", "measure", "report", "run"]

# The shapes of the goals: DiracNet-28-10 on CIFAR and DiracNet-34 on ImageNet.
CASES = {
    "cifar": {"depth": 28, "width": 10.0, "stem": "cifar", "num_classes": 10, "size": 32},
    "imagenet": {"depth": 34, "width": 1.0, "stem": "imagenet", "num_classes": 1000, "size": 224},
}
GOALS = {"program text": 1.5, "compile time": 1.1, "temp memory": 1.1}
_ITEM_BYTES = {"i1": 1, "i8": 1, "ui8": 1, "bf16": 2, "f16": 2, "i16": 2, "f64": 8, "i64": 8}
_CONSTANT = re.compile(r"stablehlo\.constant .*: tensor<([0-9x]*?)x?([a-z]+[0-9]*)>\s*$")


def constant_bytes(hlo_text: str) -> int:
    """Bytes of the literal constants (`stablehlo.constant`) in a lowered program's text.

    Examples:
      >>> constant_bytes('%c = stablehlo.constant dense<1.0> : tensor<f32>\\n'
      ...                '%d = stablehlo.constant dense<"0x00"> : tensor<3x3x16x16xbf16>')
      4612
    """
    total = 0
    for line in hlo_text.splitlines():
        if "stablehlo.constant" not in line:
            continue
        match = _CONSTANT.search(line)
        if match is None:  # pragma: no cover - a form this parser does not know.
            raise ValueError(f"constant_bytes: cannot read the type of {line[:200]!r}")
        dims, dtype = match.groups()
        count = math.prod(int(d) for d in dims.split("x") if d) if dims else 1
        total += count * _ITEM_BYTES.get(dtype, 4)
    return total


def grad_step(name: str, case: dict, batch: int, dtype) -> tuple[Callable, tuple]:
    """The loss-gradient function of model `name` and its abstract arguments.

    Returns:
      `(jax.jit(jax.grad(loss)), args)` with `args` the `ShapeDtypeStruct`s of
      `(params, batch_stats, images, labels)`.
    """
    model = get_model(
        name,
        depth=case["depth"],
        width=case["width"],
        stem=case["stem"],
        num_classes=case["num_classes"],
        dtype=dtype,
    )
    images = jax.ShapeDtypeStruct((batch, case["size"], case["size"], 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    variables = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, train=False),
        jax.ShapeDtypeStruct((1, *images.shape[1:]), jnp.float32),
    )

    def loss(params, batch_stats, x, y):
        logits, _ = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    args = (variables["params"], variables["batch_stats"], images, labels)
    return jax.jit(jax.grad(loss)), args


def measure(fn: Callable, args: tuple) -> dict:
    """Lowers and compiles `fn` once; returns sizes, seconds and XLA's memory analysis."""
    start = time.perf_counter()
    lowered = fn.lower(*args)
    lower_s = time.perf_counter() - start
    text = lowered.as_text()
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    return {
        "fusions": len(re.findall(r" fusion\(", compiled.as_text())),
        "text_bytes": len(text.encode()),
        "constant_bytes": constant_bytes(text),
        "lower_s": lower_s,
        "compile_s": compile_s,
        "temp_bytes": memory.temp_size_in_bytes,
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
    }


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m dirac_jax.bench compile", description=__doc__)
    p.add_argument(
        "--models",
        nargs="+",
        choices=sorted(CASES),
        default=sorted(CASES),
        help="cifar: DiracNet-28-10, 32x32; imagenet: DiracNet-34, 224x224.",
    )
    p.add_argument("--depth", type=int, help="override the depth (e.g. a smaller CIFAR net).")
    p.add_argument("--width", type=float, help="override the width multiplier.")
    p.add_argument("--batch", type=int, default=128, help="batch of the compiled step.")
    p.add_argument("--repeats", type=int, default=3, help="compiles per model, interleaved.")
    p.add_argument("--half-precision", action="store_true", help="bf16 compute, f32 params.")
    p.add_argument("--json", help="also write the results to this JSON file.")
    return p.parse_args(argv)


def _label(case: dict) -> str:
    return f"DiracNet-{case['depth']}-{case['width']:g} ({case['stem']})"


def run(args) -> dict:
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}.")
    if args.batch < 1:
        raise ValueError(f"--batch must be >= 1, got {args.batch}.")
    # Every compile must be a real one: a persistent cache hit would time a file read.
    cached = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        return _run(args)
    finally:
        jax.config.update("jax_enable_compilation_cache", cached)


def _run(args) -> dict:
    dtype = jnp.bfloat16 if args.half_precision else jnp.float32
    results = {}
    for key in args.models:
        case = dict(CASES[key])
        case.update({k: v for k, v in (("depth", args.depth), ("width", args.width)) if v})
        steps = {name: grad_step(name, case, args.batch, dtype) for name in ("diracnet", "plain")}
        runs = {name: [] for name in steps}
        for r in range(args.repeats):  # Interleaved, the order rotated, as `_timing` does.
            for name in list(steps)[r % 2 :] + list(steps)[: r % 2]:
                fn, fn_args = grad_step(name, case, args.batch, dtype)
                runs[name].append(measure(fn, fn_args))
        summary = {}
        for name, rs in runs.items():
            summary[name] = dict(rs[0])
            for k in ("lower_s", "compile_s"):
                summary[name][k] = sorted(r[k] for r in rs)[len(rs) // 2]
        compile_times = {n: [r["compile_s"] for r in rs] for n, rs in runs.items()}
        dirac, plain = summary["diracnet"], summary["plain"]
        compile_ratio = _timing.paired_ratio(compile_times, "diracnet", "plain")
        ratios = {
            "program text": dirac["text_bytes"] / plain["text_bytes"],
            "compile time": compile_ratio["ratio"],
            "XLA fusions": dirac["fusions"] / plain["fusions"],
            "temp memory": dirac["temp_bytes"] / plain["temp_bytes"],
            "argument memory": dirac["argument_bytes"] / plain["argument_bytes"],
            "output memory": dirac["output_bytes"] / plain["output_bytes"],
        }
        results[_label(case)] = {
            "case": case,
            "summary": summary,
            "ratios": ratios,
            "compile_round_quartiles": (compile_ratio["round_q1"], compile_ratio["round_q3"]),
        }
    return {"environment": _timing.environment(), "args": vars(args), "models": results}


def report(results: dict) -> str:
    args = results["args"]
    mb = 1e-6
    rows, ratio_rows = [], []
    for label, r in results["models"].items():
        for name, s in r["summary"].items():
            rows.append(
                [
                    label if name == "diracnet" else f"plain twin of {label}",
                    s["fusions"],
                    f"{s['text_bytes'] * mb:.3g}",
                    f"{s['constant_bytes'] * mb:.3g}",
                    s["lower_s"],
                    s["compile_s"],
                    f"{s['temp_bytes'] * mb:.4g}",
                    f"{s['argument_bytes'] * mb:.4g}",
                    f"{s['output_bytes'] * mb:.4g}",
                ]
            )
        for what, ratio in r["ratios"].items():
            goal = GOALS.get(what)
            met = "-" if goal is None else ("yes" if ratio <= goal else "NO")
            spread = "-"
            if what == "compile time":
                spread = "{:.3g} - {:.3g}".format(*r["compile_round_quartiles"])
            ratio_rows.append([label, what, ratio, spread, f"<= {goal}" if goal else "-", met])
    return "\n".join(
        [
            f"Machine: {_timing.describe(results['environment'])}.",
            f"jax.jit(jax.grad(loss)).lower(params, batch_stats, images, labels), batch "
            f"{args['batch']}, {'bf16' if args['half_precision'] else 'float32'} compute; "
            f"median of {args['repeats']} interleaved compiles, persistent cache off.",
            "",
            _timing.markdown_table(
                [
                    "program",
                    "XLA fusions",
                    "HLO text MB",
                    "constants MB",
                    "lower s",
                    "compile s",
                    "temp MB",
                    "argument MB",
                    "output MB",
                ],
                rows,
            ),
            "",
            _timing.markdown_table(
                ["model", "DiracNet / plain", "ratio", "per-round quartiles", "goal", "met"],
                ratio_rows,
            ),
        ]
    )


def main(argv=None) -> int:
    """Runs the benchmark, prints a markdown report; `--json PATH` also writes the results."""
    return _timing.cli(argv, _parse, run, report)

"""Compile cost: what the Dirac parameterization adds to a compiled training program.

`python -m benchmarks compile` lowers and compiles the forward and backward
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

The gradient program has a control besides (`--nocontrol` skips it): the plain
net whose conv kernels are computed in the step as `w * s`, one elementwise op
forward and one backward per conv. No kernel parameterization computed in the
step costs less, so the control / plain ratio is the floor of the compile-time
overhead on the machine at hand, and DiracNet / control what the Dirac
computation adds above that floor.

`--programs=grad,train` also measures the program users compile: the trainer's
own jitted step (`steps.compile_steps`: forward, backward, SGD with momentum and
weight decay, BN statistics, metrics), lowered with an abstract state and batch.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from absl import flags

from benchmarks import _flags, _timing
from benchmarks import train as bench_train
from dirac_jax import config_schema, optim, sharding, steps
from dirac_jax.models import get_model

__all__ = [
    "CASES",
    "CONTROL",
    "GOALS",
    "PROGRAMS",
    "constant_bytes",
    "grad_step",
    "main",
    "options",
    "measure",
    "report",
    "run",
    "train_step",
]

# The shapes of the goals: DiracNet-28-10 on CIFAR and DiracNet-34 on ImageNet.
CASES = {
    "cifar": {"depth": 28, "width": 10.0, "stem": "cifar", "num_classes": 10, "size": 32},
    "imagenet": {"depth": 34, "width": 1.0, "stem": "imagenet", "num_classes": 1000, "size": 224},
}
GOALS = {"program text": 1.5, "compile time": 1.1, "temp memory": 1.1}
# The control of the gradient program: the plain net with kernels `w * s` (`grad_step`).
CONTROL = "control"
# grad: `jax.jit(jax.grad(loss))`, the measure; train: the trainer's jitted step.
PROGRAMS = ("grad", "train")
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

    `name` is a model name, or `CONTROL`: the plain net whose conv kernels are
    computed in the step as `w * s`, with `s` a scalar argument (not
    differentiated). That is the least any in-step kernel parameterization
    adds, one elementwise op forward and one backward per conv, so it shows the
    share of the compile-time overhead that no parameterization computed in
    the step can avoid.

    Returns:
      `(jax.jit(jax.grad(loss)), args)` with `args` the `ShapeDtypeStruct`s of
      `(params, batch_stats, images, labels)`, and of the scale `s` for `CONTROL`.
    """
    control = name == CONTROL
    model = get_model(
        "plain" if control else name,
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

    def loss(params, batch_stats, x, y, *scale):
        if scale:  # CONTROL: every conv kernel (a `ParamConv`'s raw "w") becomes w * s.
            params = jax.tree_util.tree_map_with_path(
                lambda path, v: v * scale[0] if path[-1].key == "w" else v, params
            )
        logits, _ = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    args = (variables["params"], variables["batch_stats"], images, labels)
    if control:
        args += (jax.ShapeDtypeStruct((), jnp.float32),)
    return jax.jit(jax.grad(loss)), args


def train_step(name: str, case: dict, batch: int, dtype) -> tuple[Callable, tuple]:
    """The trainer's jitted train step of model `name` and its abstract arguments.

    The step of `steps.compile_steps` for a streamed batch: uint8 CIFAR images
    (augmented and normalized in the step) or float ImageNet crops, SGD with
    momentum 0.9 and weight decay 5e-4, a piecewise-constant learning rate.

    Returns:
      `(train_fn, (state, batch))` with `state` and `batch` as `ShapeDtypeStruct`s.
    """
    imagenet = case["stem"] == "imagenet"
    # The config `benchmarks train` times, with this case's stem and dataset.
    config = bench_train.config_for(
        name, case["depth"], case["width"], batch, half_precision=dtype == jnp.bfloat16
    )
    config.model.stem = case["stem"]
    config.dataset.name = "imagenet" if imagenet else "cifar10"
    mesh = sharding.make_mesh()
    lr_fn = optim.create_learning_rate_fn(config, steps_per_epoch=1000)
    model = config_schema.create_model(config, num_classes=case["num_classes"])
    image_shape = (case["size"], case["size"], 3)
    state = jax.eval_shape(
        lambda: steps.create_train_state(config, model, jax.random.key(0), image_shape, lr_fn)
    )
    train_fn, _ = steps.compile_steps(config, mesh, lr_fn, config.dataset.name, in_memory=False)
    images = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32 if imagenet else jnp.uint8)
    batch_ = {"image": images, "label": jax.ShapeDtypeStruct((batch,), jnp.int32)}
    return train_fn, (state, batch_)


_PROGRAM_FNS = {"grad": grad_step, "train": train_step}
_PROGRAM_TEXT = (
    "grad = jax.jit(jax.grad(loss)).lower(params, batch_stats, images, labels); "
    "train = the trainer's jitted step (steps.compile_steps) lowered on an abstract state "
    "and batch"
)


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


FLAGS = flags.FlagValues()  # this suite's own (`_flags`)
flags.DEFINE_list(
    "models",
    sorted(CASES),
    "Comma-separated; cifar: DiracNet-28-10, 32x32; imagenet: DiracNet-34, 224x224.",
    flag_values=FLAGS,
)
flags.register_validator(
    "models",
    lambda v: set(v) <= set(CASES),
    f"--models takes some of {','.join(CASES)}.",
    flag_values=FLAGS,
)
flags.DEFINE_integer(
    "depth", None, "Override the depth (e.g. a smaller CIFAR net).", flag_values=FLAGS
)
flags.DEFINE_float("width", None, "Override the width multiplier.", flag_values=FLAGS)
flags.DEFINE_integer("batch", 128, "Batch of the compiled step.", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 3, "Compiles per model, interleaved.", flag_values=FLAGS)
flags.DEFINE_bool("half_precision", False, "bf16 compute, f32 params.", flag_values=FLAGS)
flags.DEFINE_list(
    "programs",
    ["grad"],
    "Comma-separated; grad: jax.jit(jax.grad(loss)) of the model; train: the trainer's "
    "jitted step.",
    flag_values=FLAGS,
)
flags.register_validator(
    "programs",
    lambda v: set(v) <= set(PROGRAMS),
    f"--programs takes some of {','.join(PROGRAMS)}.",
    flag_values=FLAGS,
)
flags.DEFINE_bool(
    "control",
    True,
    "Compile the grad program's control, the plain net with kernels w * s computed in the "
    "step (the overhead any in-step parameterization pays); --nocontrol skips it.",
    flag_values=FLAGS,
)
flags.DEFINE_string("json", None, "Also write the results to this JSON file.", flag_values=FLAGS)


def _parse(argv):
    args = _flags.parse(FLAGS, argv, "compile", __doc__)
    return args


def options(**values):
    """This suite's options (`run`'s argument) at the flags' defaults, with `values` set."""
    return _flags.options(FLAGS, **values)


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
        for program in args.programs:
            make = _PROGRAM_FNS[program]
            names = ["diracnet", "plain"]
            if program == "grad" and args.control:
                names.append(CONTROL)
            results[f"{_label(case)} {program}"] = {
                "case": case,
                "program": program,
                **_compare(make, case, args.batch, dtype, args.repeats, names),
            }
    return {"environment": _timing.environment(), "args": vars(args), "models": results}


def _compare(make: Callable, case: dict, batch: int, dtype, repeats: int, names) -> dict:
    """DiracNet against the plain net (and `CONTROL`): interleaved compiles of `make`'s program."""
    runs = {name: [] for name in names}
    for name in _timing.round_robin(names, repeats):
        fn, fn_args = make(name, case, batch, dtype)
        runs[name].append(measure(fn, fn_args))
    summary = {}
    for name, rs in runs.items():
        summary[name] = dict(rs[0])
        for key in ("lower_s", "compile_s"):
            summary[name][key] = sorted(r[key] for r in rs)[len(rs) // 2]
    compile_times = {n: [r["compile_s"] for r in rs] for n, rs in runs.items()}
    dirac, plain = summary["diracnet"], summary["plain"]
    # (ratio, per-round quartiles or None) per measure; DiracNet / plain unless named.
    ratios = {
        "program text": (dirac["text_bytes"] / plain["text_bytes"], None),
        "compile time": _compile_ratio(compile_times, "diracnet", "plain"),
        "XLA fusions": (dirac["fusions"] / plain["fusions"], None),
        "temp memory": (dirac["temp_bytes"] / plain["temp_bytes"], None),
        "argument memory": (dirac["argument_bytes"] / plain["argument_bytes"], None),
        "output memory": (dirac["output_bytes"] / plain["output_bytes"], None),
    }
    if CONTROL in runs:
        ratios[f"compile time, {CONTROL} / plain"] = _compile_ratio(compile_times, CONTROL, "plain")
        ratios[f"compile time, DiracNet / {CONTROL}"] = _compile_ratio(
            compile_times, "diracnet", CONTROL
        )
    return {"summary": summary, "ratios": ratios}


def _compile_ratio(times: dict, num: str, den: str) -> tuple[float, tuple[float, float]]:
    r = _timing.paired_ratio(times, num, den)
    return r["ratio"], (r["round_q1"], r["round_q3"])


def _row_label(name: str, label: str) -> str:
    return {
        "diracnet": label,
        "plain": f"plain twin of {label}",
        CONTROL: f"control: plain twin of {label}, kernels w * s",
    }[name]


def report(results: dict) -> str:
    args = results["args"]
    mb = 1e-6
    rows, ratio_rows = [], []
    for label, r in results["models"].items():
        for name, s in r["summary"].items():
            rows.append(
                [
                    _row_label(name, label),
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
        for what, (ratio, quartiles) in r["ratios"].items():
            goal = GOALS.get(what)
            met = "-" if goal is None else ("yes" if ratio <= goal else "NO")
            spread = "-" if quartiles is None else "{:.3g} - {:.3g}".format(*quartiles)
            ratio_rows.append([label, what, ratio, spread, f"<= {goal}" if goal else "-", met])
    return "\n".join(
        [
            f"Machine: {_timing.describe(results['environment'])}.",
            f"Programs: {_PROGRAM_TEXT}. Batch {args['batch']}, "
            f"{'bf16' if args['half_precision'] else 'float32'} compute; "
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
                [
                    "model",
                    "measure (DiracNet / plain unless named)",
                    "ratio",
                    "per-round quartiles",
                    "goal",
                    "met",
                ],
                ratio_rows,
            ),
        ]
    )


def main(argv=None) -> int:
    """Runs the benchmark, prints a markdown report; `--json PATH` also writes the results."""
    return _timing.cli(argv, _parse, run, report)

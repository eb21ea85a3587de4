"""Inference latency of a folded DiracNet: `python -m benchmarks fold_latency [--flags]`.

DiracNets sec. 1/2: Dirac parameterization and BN fold into the filters, so the
net becomes a chain of conv-ReLU pairs, with "no cost at all at inference". This
benchmark measures that claim on synthetic data, in one process, with jit:

* DiracNet unfolded (`model.apply(train=False)`: computes `a`, `b`, `W_norm`
  and BN on every call),
* DiracNet folded (`fold.apply_folded`),
* the plain net of the same architecture (`get_model("plain")`, BN at eval) and
  that plain net folded,
* a ResNet with about the same parameter count (WRN of the same depth for the
  CIFAR stem, ResNet-18/34 for the ImageNet stem, width chosen to match).

Every candidate is a `jit`-compiled function of `(params, images)`: the
parameters are runtime arguments, never closed-over constants, so XLA cannot
fold the Dirac transform or BN at compile time for any of them. The candidates
are warmed up, then timed round-robin (`_timing.interleaved_times`); the report
is ratios of medians from this one run, plus absolute milliseconds for context.
"""

from __future__ import annotations

import functools
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from benchmarks import _flags, _timing
from dirac_jax.fold import apply_folded, fold, num_params
from dirac_jax.models import count_params, get_model

__all__ = [
    "main",
    "options",
    "matching_resnet",
    "param_count",
    "random_variables",
    "report",
    "run",
]

# Values of the variables that must be positive or that the Dirac transform reads.
_DRAWS = {
    "var": lambda rng, s: rng.uniform(0.5, 2.0, s),
    "scale": lambda rng, s: rng.uniform(0.5, 1.5, s),
    "a": lambda rng, s: rng.uniform(0.5, 1.5, s),
    "b": lambda rng, s: rng.uniform(0.05, 0.5, s),
}


# How far the folded net may be from the net it folds, relative to the logits: float32
# rounding on CPUs; elsewhere the convolutions' default precision rounds their inputs
# (TF32 on NVIDIA GPUs, 10 mantissa bits; one bfloat16 pass on TPUs), on both sides.
_FOLD_RTOL = {"cpu": 1e-3}


def random_variables(model, images, seed: int):
    """Trained-looking variables without running `model.init`.

    `init` would compile every random op (tens of seconds on CPU for deep
    nets); the timings do not depend on the values, as long as they are normal
    floats (no denormals) and BN variances are positive.
    """
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)

    def draw(path, leaf):
        name = path[-1].key
        if name in _DRAWS:
            value = _DRAWS[name](rng, leaf.shape)
        else:  # kernels, biases, means: scaled so activations stay of order one.
            fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
            value = rng.standard_normal(leaf.shape) * np.sqrt(1.0 / fan_in)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def param_count(model, images) -> int:
    """Trainable scalars of `model`, from shapes only."""
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)
    return count_params(shapes["params"])


def matching_resnet(stem: str, depth: int, target: int, images, num_classes: int):
    """The residual net of the same depth whose parameter count is nearest `target`.

    CIFAR: WRN-`depth`-k with `k = m / 16` (whole channel counts); ImageNet:
    ResNet-`depth` with `width = m / 64`. Parameters grow with `m`, so bisect.

    Returns:
      `(name, model, num_params)`.
    """
    name, base = ("wrn", 16) if stem == "cifar" else ("resnet", 64)

    def build(m):
        return get_model(name, depth=depth, width=m / base, num_classes=num_classes)

    lo, hi = 1, base
    while param_count(build(hi), images) < target:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if param_count(build(mid), images) < target else (lo, mid)
    m = min((lo, hi), key=lambda m: abs(param_count(build(m), images) - target))
    model = build(m)
    label = (
        f"WRN-{depth}-{m / base:g}" if stem == "cifar" else f"ResNet-{depth} (width {m / base:g})"
    )
    return label, model, param_count(model, images)


FLAGS = flags.FlagValues()  # this suite's own (`_flags`)
flags.DEFINE_integer("depth", 28, "DiracNet depth.", flag_values=FLAGS)
flags.DEFINE_float("width", 1.0, "Width multiplier k.", flag_values=FLAGS)
flags.DEFINE_enum("stem", "cifar", ("cifar", "imagenet"), "Network stem.", flag_values=FLAGS)
flags.DEFINE_integer(
    "image_size",
    None,
    "Image size (default 32 for cifar, 224 for imagenet).",
    lower_bound=1,
    flag_values=FLAGS,
)
flags.DEFINE_integer("batch", 64, "Batch size.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("num_classes", 10, "Classes.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("repeats", 50, "Timed rounds.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("warmup", 2, "Untimed calls per candidate.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("seed", 0, "Seed of the random weights and images.", flag_values=FLAGS)
flags.DEFINE_string("json", None, "Also write the results to this JSON file.", flag_values=FLAGS)


def _parse(argv):
    return _flags.parse(FLAGS, argv, "fold_latency", __doc__)


def options(**values):
    """This suite's options (`run`'s argument) at the flags' defaults, with `values` set."""
    return _flags.options(FLAGS, **values)


def _eval_fn(model):
    return jax.jit(lambda variables, x: model.apply(variables, x, train=False))


def run(args) -> dict:
    """Builds the candidates, checks the folds, times them; returns the results dict."""
    if args.image_size is None:  # the stem's own size
        size = 32 if args.stem == "cifar" else 224
        args = types.SimpleNamespace(**{**vars(args), "image_size": size})
    kw = dict(depth=args.depth, width=args.width, num_classes=args.num_classes, stem=args.stem)
    rng = np.random.default_rng(args.seed)
    shape = (args.batch, args.image_size, args.image_size, 3)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)

    dirac, plain = get_model("diracnet", **kw), get_model("plain", **kw)
    dirac_vars = random_variables(dirac, x, args.seed)
    plain_vars = random_variables(plain, x, args.seed + 1)
    dirac_count = count_params(dirac_vars["params"])
    res_label, res_model, res_count = matching_resnet(
        args.stem, args.depth, dirac_count, x, args.num_classes
    )
    res_vars = random_variables(res_model, x, args.seed + 2)
    fold_jit = jax.jit(fold, static_argnums=0)
    dirac_folded, plain_folded = fold_jit(dirac, dirac_vars), fold_jit(plain, plain_vars)
    folded_apply = jax.jit(apply_folded)

    name = f"DiracNet-{args.depth}-{args.width:g}"
    # (label, function, params, parameter count); params are always jit arguments.
    table = [
        (f"{name} unfolded", _eval_fn(dirac), dirac_vars, dirac_count),
        (f"{name} folded", folded_apply, dirac_folded, num_params(dirac_folded)),
        ("plain (BN at eval)", _eval_fn(plain), plain_vars, count_params(plain_vars["params"])),
        ("plain folded", folded_apply, plain_folded, num_params(plain_folded)),
        (res_label, _eval_fn(res_model), res_vars, res_count),
    ]
    candidates = {label: functools.partial(fn, p, x) for label, fn, p, _ in table}
    # What folding saves per call at most: the Dirac kernels and the BN fold, alone.
    fold_label = f"fold({name}) alone, no images"
    candidates[fold_label] = functools.partial(fold_jit, dirac, dirac_vars)
    compile_s = {label: _timing.warm_up(c, args.warmup) for label, c in candidates.items()}

    unfolded, folded, plain_bn, plain_f, resnet = (row[0] for row in table)
    # The benchmark must time the function the fold claims to equal.
    for got, want in ((folded, unfolded), (plain_f, plain_bn)):
        want_y = candidates[want]()
        err = float(jnp.max(jnp.abs(candidates[got]() - want_y)))
        scale = float(jnp.max(jnp.abs(want_y)))
        if not err <= _FOLD_RTOL.get(jax.default_backend(), 3e-2) * max(1.0, scale):
            raise AssertionError(f"{got} differs from {want} by {err:.3g} (logits ~{scale:.3g}).")

    times = _timing.interleaved_times(candidates, args.repeats)
    stats = {label: _timing.summarize(t) for label, t in times.items()}
    pairs = {
        "folded / unfolded DiracNet": (folded, unfolded),
        "folded DiracNet / plain (BN at eval)": (folded, plain_bn),
        "folded DiracNet / folded plain": (folded, plain_f),
        f"unfolded DiracNet / {resnet}": (unfolded, resnet),
        f"folded DiracNet / {resnet}": (folded, resnet),
        "fold alone / unfolded DiracNet": (fold_label, unfolded),
    }
    ratios = {k: _timing.paired_ratio(times, *pair) for k, pair in pairs.items()}
    return {
        "environment": _timing.environment(),
        "config": {**vars(args), "images": list(shape)},
        "candidates": {
            label: {"params": count, "compile_and_first_call_s": compile_s[label], **stats[label]}
            for label, count in [(row[0], row[3]) for row in table] + [(fold_label, None)]
        },
        "ratios": ratios,
    }


def report(results: dict) -> str:
    """The markdown printed by `main` (and pasted into BENCHMARKS.md)."""
    cfg = results["config"]
    first = next(iter(results["candidates"].values()))["median_ms"]
    rows = [
        [
            label,
            "-" if c["params"] is None else f"{c['params']:,}",
            c["median_ms"],
            c["min_ms"],
            c["median_ms"] / first,
        ]
        for label, c in results["candidates"].items()
    ]
    lines = [
        f"Machine: {_timing.describe(results['environment'])}.",
        f"Images {tuple(cfg['images'])} (NHWC, float32), {cfg['repeats']} interleaved rounds, "
        f"median per call, jit with params as arguments.",
        "",
        _timing.markdown_table(
            ["candidate", "params", "median ms", "min ms", "time / unfolded DiracNet"], rows
        ),
        "",
        _timing.markdown_table(
            ["ratio", "of medians", "per-round quartiles"],
            [
                [k, r["ratio"], f"{r['round_q1']:.3g} - {r['round_q3']:.3g}"]
                for k, r in results["ratios"].items()
            ],
        ),
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    """Runs the benchmark, prints a markdown report; `--json PATH` also writes the results."""
    return _timing.cli(argv, _parse, run, report)


if __name__ == "__main__":
    sys.exit(main())

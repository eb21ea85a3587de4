"""bfloat16 Dirac conv: how to keep the identity path exact, measured on one layer.

`python -m benchmarks bf16` compares, on a 3x3 stride-1 Dirac conv
(DiracNets v2 eq. 5) with bfloat16 activations, forward and backward:

* `float32`: the layer in float32, the reference for the errors;
* `cast`: the float32 kernel cast to bfloat16, then a bfloat16 conv (the
  centre diagonal taps `a + b * w_norm` round to bfloat16's `2^-7` grid);
* `split`: the library's choice, `a * conv(x, delta)` as an exact float32
  channel selection beside the bfloat16 conv of `diag(b) W_norm`
  (`layers.param_conv`);
* `split_f32conv`: the same split with the identity part as a float32 conv
  of the kernel `a * delta` (no knowledge of the delta's structure).

It reports the median step time of each (round-robin, `_timing`), and the
output error against float32: relative RMS, the relative RMS of the error on
the `W` term alone (`(y - a x)` against float32's), and the share of outputs
that are float32's output correctly rounded to bfloat16.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from benchmarks import _flags, _timing
from dirac_jax import layers, param

__all__ = ["main", "options", "report", "run"]

VARIANTS = ("float32", "cast", "split", "split_f32conv")


FLAGS = flags.FlagValues()  # this suite's own (`_flags`)
flags.DEFINE_integer("channels", 64, "In = out channels.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("size", 32, "Image height and width.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer("batch", 32, "Batch size.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_float("b", 0.1, "The value of b (a = 1).", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 20, "Timed rounds.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_string("json", None, "Also write the results to this JSON file.", flag_values=FLAGS)


def _parse(argv):
    return _flags.parse(FLAGS, argv, "bf16", __doc__)


def options(**values):
    """This suite's options (`run`'s argument) at the flags' defaults, with `values` set."""
    return _flags.options(FLAGS, **values)


def _forward(variant: str, t: param.Transform):
    if variant == "float32":
        return lambda x, raw: layers.param_conv(x.astype(jnp.float32), t, raw, dtype=jnp.float32)
    if variant in ("cast", "split"):
        exact = variant == "split"
        return lambda x, raw: layers.param_conv(x, t, raw, dtype=jnp.bfloat16, exact_identity=exact)
    delta = param.dirac_delta(t.kernel_shape)

    def split_f32conv(x, raw):
        rest = layers.conv(x, t.identity.rest(raw).astype(jnp.bfloat16))
        ident = layers.conv(x.astype(jnp.float32), raw["a"] * delta)
        return (rest.astype(jnp.float32) + ident).astype(jnp.bfloat16)

    return split_f32conv


def run(args) -> dict:
    c = args.channels
    t = param.dirac((3, 3, c, c))
    raw = {**t.init(jax.random.key(0)), "b": jnp.full((c,), args.b, jnp.float32)}
    x = jax.random.normal(jax.random.key(1), (args.batch, args.size, args.size, c))
    x = x.astype(jnp.bfloat16)
    g = jax.random.normal(jax.random.key(2), x.shape, jnp.float32)

    outputs, candidates = {}, {}
    for variant in VARIANTS:
        forward = _forward(variant, t)
        outputs[variant] = np.asarray(jax.jit(forward)(x, raw), np.float32)

        def loss(raw, x, forward=forward):
            return jnp.sum(forward(x, raw).astype(jnp.float32) * g)

        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        candidates[variant] = lambda step=step: step(raw, x)
    for fn in candidates.values():
        _timing.warm_up(fn)
    times = _timing.interleaved_times(candidates, args.repeats)

    ref = outputs["float32"]
    identity = np.asarray(raw["a"]) * np.asarray(x, np.float32)
    rounded = np.asarray(jnp.asarray(ref).astype(jnp.bfloat16), np.float32)
    rms = lambda v: float(np.sqrt(np.mean(np.square(v))))
    results = {"environment": _timing.environment(), "args": vars(args), "variants": {}}
    for variant in VARIANTS:
        y = outputs[variant]
        results["variants"][variant] = {
            "median_ms": _timing.summarize(times[variant])["median_ms"],
            "rel_rms_error": rms(y - ref) / rms(ref),
            "w_term_rel_rms_error": rms((y - identity) - (ref - identity)) / rms(ref - identity),
            "correctly_rounded": None if variant == "float32" else float(np.mean(y == rounded)),
        }
    return results


def report(results: dict) -> str:
    a = results["args"]
    rows = [
        (
            name,
            f"{v['median_ms']:.1f}",
            f"{v['rel_rms_error']:.2e}",
            f"{v['w_term_rel_rms_error']:.2e}",
            "-" if v["correctly_rounded"] is None else f"{100 * v['correctly_rounded']:.1f}%",
        )
        for name, v in results["variants"].items()
    ]
    head = (
        f"{_timing.describe(results['environment'])}\n"
        f"3x3 Dirac conv, {a['channels']} -> {a['channels']} channels, batch {a['batch']} of "
        f"{a['size']}x{a['size']}, a = 1, b = {a['b']}; forward + backward, median of "
        f"{a['repeats']} interleaved rounds.\n\n"
    )
    return head + _timing.markdown_table(
        ("variant", "ms/step", "output rel. RMS error", "W-term rel. RMS error", "= rounded f32"),
        rows,
    )


def main(argv=None) -> int:
    return _timing.cli(argv, _parse, run, report)

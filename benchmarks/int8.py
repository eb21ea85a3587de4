"""INT8 fidelity of trained runs: `python -m benchmarks int8 --workdirs=W[,W...]`.

For each training workdir (a chain: DiracNet, its plain twin, MobileNet; or a
residual net, WRN or ResNet, whose shortcut Adds are rounded like any
activation) this writes the float32 ONNX export and INT8 versions of it (onnxruntime
`quantize_static`, QDQ, uint8 activations calibrated on training images,
int8 weights) and runs them all in onnxruntime on the whole test split:

* `naive`: the float32 export as is, every Dirac kernel folded into one
  `s (a I + b W_norm)` (DiracNets eq. 5, `s` the BN scale);
* `apart, int8 stream` (DiracNets only): the identity kept apart, an INT8 conv
  of `s b W_norm` plus `s a x` in float32 (`fold.fold(...,
  identity_apart=True)`), but every block output rounded to int8 like any
  activation (`quantize.quantize_onnx(..., stream="int8")`);
* `apart, float stream` (DiracNets only): the same, with the identity, its
  join and the block outputs in float32, so only the convs' inputs and
  outputs are rounded (`stream="float"`; the default of
  `dirac_jax.export --quantize=int8`);

each with per-channel and per-tensor weight scales, with the setup of a plain
post-training quantization (uint8 activations, MinMax ranges) and with the
`dirac_jax.export` default (int8 activations, percentile ranges), and any
other calibrations asked for. A plain twin or a residual net has no identity
to keep apart, so its graphs are all its `naive` one, measured once. Reported: top-1, the share of
test predictions equal to the float32 model's, the relative logit error
`||L_int8 - L_f32|| / ||L_f32||`, the file size against float32, and per
Dirac layer the share of the `W` taps that int8 rounds to zero
(`quantize.zero_tap_shares`). Where a DiracNet's plain twin (same depth and
width) is among the workdirs, a last table holds the export default against
the bars of a faithful INT8 deploy: top-1 within 0.2 points of float32, 99%
of predictions kept and at most 2x the twin's logit error per channel; within
0.5 points and 98.5% kept per tensor.

`--reduce_range` adds the export default with 7-bit weights (`export
--reduce_range`). `--exact` also runs every INT8 file with onnxruntime's graph
optimizations off, so each QuantizeLinear/DequantizeLinear pair is computed as
written: the arithmetic a CPU with VNNI does exactly. With them on (the
default), onnxruntime fuses the pairs into int8 kernels, and on x86 without
VNNI those sum pairs of u8 x s8 products in 16 bits (AVX2 `vpmaddubsw`), which
saturate where large weights meet large activations; 7-bit weights cannot.
"""

from __future__ import annotations

import pathlib
import tempfile
import time

import jax.numpy as jnp
import numpy as np
from absl import flags

from benchmarks import _flags, _timing
from dirac_jax import config_schema, data, export, fold, quantize, workdir

__all__ = [
    "BARS",
    "DEFAULT",
    "GRAPHS",
    "SETUPS",
    "main",
    "measure_workdir",
    "options",
    "report",
    "run",
]

# (activations, calibration) of every candidate graph: plain post-training quantization,
# then the export default.
SETUPS = (("uint8", "minmax"), ("int8", "percentile"))
# The candidate graphs of a DiracNet: (name, identity kept apart, `quantize_onnx`'s stream).
GRAPHS = (
    ("naive", False, "float"),
    ("apart, int8 stream", True, "int8"),
    ("apart, float stream", True, "float"),
)
# A faithful INT8 deploy: (weights, |top-1 change| in points, agreement %); per channel,
# also at most 2x the plain twin's logit error.
BARS = (("per-channel", 0.2, 99.0), ("per-tensor", 0.5, 98.5))
# What `dirac_jax.export --quantize=int8` writes: (graph, activations, calibration).
DEFAULT = ("apart, float stream", "int8", "percentile")


def _session(path, exact=False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if exact:  # no fusion: each QuantizeLinear/DequantizeLinear pair computed as written
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _logits(path, images, batch_size=1000, exact=False):
    session = _session(path, exact)
    name = session.get_inputs()[0].name
    return np.concatenate(
        [
            session.run(None, {name: images[i : i + batch_size]})[0]
            for i in range(0, len(images), batch_size)
        ]
    )


def measure_workdir(
    path, *, calibrations, calibration_count, tmp, reduce_range=False, exact=False
) -> dict:
    """Every INT8 candidate of one run against its float32 export, on the test split.

    `reduce_range` adds the export default with 7-bit weights (`weights` ends in
    ", 7-bit"); `exact` also runs each INT8 file with onnxruntime's graph
    optimizations off (`exact_top1`, `exact_agree`, `exact_logit_error`).
    """
    model, variables, config = workdir.load(path)
    model = model.clone(dtype=jnp.float32)
    if config.model.name not in config_schema.FOLDABLE_MODELS:
        raise ValueError(
            "benchmarks int8 measures the nets that export to ONNX "
            f"{config_schema.FOLDABLE_MODELS}; "
            f"{path} holds a {config.model.name!r}."
        )
    source = config.dataset.get("source", "auto") or "auto"
    test = data.load(config.dataset.name, source=source, split="test")
    images, labels = np.asarray(test.images), np.asarray(test.labels)
    calib = export.calibration_images(config, calibration_count, seed=config.seed)
    tmp = pathlib.Path(tmp)
    chain = config.model.name in config_schema.CHAIN_MODELS
    split = fold.fold(model, variables, identity_apart=True) if chain else None
    dirac = chain and any(s.kind == "dirac_conv" for s in split.steps)
    protos = {
        apart: export.onnx_model(model, variables, config, identity_apart=apart)
        for apart in ((False, True) if dirac else (False,))
    }
    candidates = GRAPHS if dirac else GRAPHS[:1]  # other nets have no identity to keep apart
    graphs = [(name, protos[apart], stream) for name, apart, stream in candidates]
    float_path = tmp / "float.onnx"
    float_path.write_bytes(protos[False].SerializeToString())
    reference = _logits(float_path, images)
    result = {
        "workdir": str(path),
        "model": config.model.name,
        "depth": config.model.depth,
        "width": config.model.width,
        "float_top1": float(np.mean(reference.argmax(-1) == labels)),
        "float_bytes": float_path.stat().st_size,
        "rows": [],
        "zero_taps": {},
    }
    if dirac:
        result["zero_taps"] = {
            "per_channel": quantize.zero_tap_shares(split, per_channel=True),
            "per_tensor": quantize.zero_tap_shares(split, per_channel=False),
        }
    setups = [(a, c, False) for a, c in SETUPS]
    setups += [("int8", c, False) for c in calibrations if ("int8", c) not in SETUPS]
    if reduce_range:
        setups.append((*DEFAULT[1:], True))
    for number, (variant, graph, stream) in enumerate(graphs):
        for per_channel in (True, False):
            for activations, calibration, seven_bit in setups:
                out = tmp / f"{number}-{per_channel}-{activations}-{calibration}-{seven_bit}.onnx"
                start = time.perf_counter()
                quantize.quantize_onnx(
                    graph,
                    out,
                    calib,
                    per_channel=per_channel,
                    calibration=calibration,
                    activations=activations,
                    reduce_range=seven_bit,
                    stream=stream,
                )
                seconds = time.perf_counter() - start
                logits = _logits(out, images)
                weights = "per-channel" if per_channel else "per-tensor"
                result["rows"].append(
                    {
                        "variant": variant,
                        "weights": f"{weights}, 7-bit" if seven_bit else weights,
                        "activations": activations,
                        "calibration": calibration,
                        "top1": float(np.mean(logits.argmax(-1) == labels)),
                        "agree": quantize.agreement(logits, reference),
                        "logit_error": quantize.logit_error(logits, reference),
                        "size": out.stat().st_size / result["float_bytes"],
                        "quantize_s": seconds,
                    }
                )
                if exact:
                    exact_logits = _logits(out, images, exact=True)
                    result["rows"][-1].update(
                        exact_top1=float(np.mean(exact_logits.argmax(-1) == labels)),
                        exact_agree=quantize.agreement(exact_logits, reference),
                        exact_logit_error=quantize.logit_error(exact_logits, reference),
                    )
                print(result["model"], result["width"], result["rows"][-1], flush=True)
    return result


FLAGS = flags.FlagValues()  # this suite's own (`_flags`)
flags.DEFINE_list("workdirs", None, "Training workdirs, comma-separated.", flag_values=FLAGS)
flags.mark_flag_as_required("workdirs", flag_values=FLAGS)
flags.DEFINE_list(
    "calibrations",
    [],
    "More activation range rules to measure with int8 activations, comma-separated "
    f"(of {', '.join(quantize.CALIBRATIONS)}).",
    flag_values=FLAGS,
)
flags.register_validator(
    "calibrations",
    lambda v: set(v) <= set(quantize.CALIBRATIONS),
    f"--calibrations takes some of {','.join(quantize.CALIBRATIONS)}.",
    flag_values=FLAGS,
)
flags.DEFINE_integer(
    "calibration_images", 512, "Calibration images.", lower_bound=1, flag_values=FLAGS
)
flags.DEFINE_boolean(
    "reduce_range",
    False,
    "Also measure the export default with 7-bit weights (`export --reduce_range`).",
    flag_values=FLAGS,
)
flags.DEFINE_boolean(
    "exact",
    False,
    "Also run each INT8 file with onnxruntime's graph optimizations off: the QDQ arithmetic "
    "as written, which a CPU with VNNI computes too (slower).",
    flag_values=FLAGS,
)
flags.DEFINE_string("json", None, "Also write the results to this JSON file.", flag_values=FLAGS)


def _parse(argv):
    return _flags.parse(FLAGS, argv, "int8", __doc__)


def options(**values):
    """This suite's options (`run`'s argument) at the flags' defaults, with `values` set."""
    return _flags.options(FLAGS, **values)


def run(args) -> dict:
    """Measures every workdir; returns the results dict."""
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, path in enumerate(args.workdirs):
            sub = pathlib.Path(tmp) / str(i)
            sub.mkdir()
            runs.append(
                measure_workdir(
                    path,
                    calibrations=args.calibrations,
                    calibration_count=args.calibration_images,
                    tmp=sub,
                    reduce_range=args.reduce_range,
                    exact=args.exact,
                )
            )
    return {"environment": _timing.environment(), "runs": runs}


def _name(r) -> str:
    names = {"diracnet": "DiracNet", "plain": "plain twin", "wrn": "WRN", "resnet": "ResNet"}
    kind = names.get(r["model"], r["model"])
    return f"{kind}-{r['depth']}-{r['width']:g}"


def report(results) -> str:
    """Markdown: the INT8 table, then the per-layer shares of `W` taps rounded to zero."""
    rows = []
    exact = any("exact_agree" in q for r in results["runs"] for q in r["rows"])
    for r in results["runs"]:
        for q in r["rows"]:
            rows.append(
                [
                    _name(r),
                    f"{100 * r['float_top1']:.2f}",
                    q["variant"],
                    q["weights"],
                    q["activations"],
                    q["calibration"],
                    f"{100 * q['top1']:.2f}",
                    f"{100 * (q['top1'] - r['float_top1']):+.2f}",
                    f"{100 * q['agree']:.2f}",
                    f"{100 * q['logit_error']:.2f}",
                    f"{q['size']:.2f}",
                ]
            )
            if exact and "exact_agree" in q:
                rows[-1] += [
                    f"{100 * (q['exact_top1'] - r['float_top1']):+.2f}",
                    f"{100 * q['exact_agree']:.2f}",
                    f"{100 * q['exact_logit_error']:.2f}",
                ]
            elif exact:  # a run measured without --exact, beside ones with it
                rows[-1] += ["-"] * 3
    header = [
        "model",
        "float32 top-1 %",
        "graph",
        "weights",
        "activations",
        "calibration",
        "INT8 top-1 %",
        "points",
        "agree %",
        "logit error %",
        "size / float32",
    ]
    if exact:
        header += ["exact: points", "exact: agree %", "exact: logit error %"]
    lines = [_timing.describe(results["environment"]), "", _timing.markdown_table(header, rows)]
    taps = []
    for r in results["runs"]:
        shares = r["zero_taps"]
        for c, t in zip(shares.get("per_channel", []), shares.get("per_tensor", []), strict=True):
            taps.append(
                [
                    _name(r),
                    c["layer"],
                    "x".join(str(v) for v in c["shape"]),
                    f"{c['centre_ratio']:.0f}",
                    f"{100 * c['naive']:.1f}",
                    f"{100 * c['apart']:.1f}",
                    f"{100 * t['naive']:.1f}",
                    f"{100 * t['apart']:.1f}",
                ]
            )
    if taps:
        header = [
            "model",
            "step",
            "kernel",
            "centre / max W tap",
            "W taps to 0, naive per-channel %",
            "apart per-channel %",
            "naive per-tensor %",
            "apart per-tensor %",
        ]
        lines += ["", _timing.markdown_table(header, taps)]
    bars = _bars(results["runs"])
    if bars:
        header = [
            "model",
            "weights",
            "points (bar)",
            "agree % (bar)",
            "logit error / twin's (bar 2x)",
            "bars met",
        ]
        lines += ["", _timing.markdown_table(header, bars)]
    return "\n".join(lines)


def _default_row(run, weights):
    graph, activations, calibration = DEFAULT
    if not any(q["variant"] == graph for q in run["rows"]):  # no identity apart: one graph
        graph = GRAPHS[0][0]
    for q in run["rows"]:
        if (q["variant"], q["weights"], q["activations"], q["calibration"]) == (
            graph,
            weights,
            activations,
            calibration,
        ):
            return q
    return None


def _bars(runs) -> list[list]:
    """The export default of each DiracNet with a plain twin among `runs`, against the bars."""
    twins = {(r["depth"], r["width"]): r for r in runs if r["model"] == "plain"}
    rows = []
    for r in runs:
        twin = twins.get((r["depth"], r["width"]))
        if r["model"] != "diracnet" or twin is None:
            continue
        for weights, points_bar, agree_bar in BARS:
            q, t = _default_row(r, weights), _default_row(twin, weights)
            if q is None or t is None:
                continue
            points = 100 * (q["top1"] - r["float_top1"])
            ratio = q["logit_error"] / t["logit_error"]
            met = abs(points) <= points_bar + 1e-9 and 100 * q["agree"] >= agree_bar
            if weights == "per-channel":
                met = met and ratio <= 2
            rows.append(
                [
                    _name(r),
                    weights,
                    f"{points:+.2f} (±{points_bar})",
                    f"{100 * q['agree']:.2f} (>= {agree_bar})",
                    f"{ratio:.2f}" + ("" if weights == "per-channel" else " (no bar)"),
                    "yes" if met else "**no**",
                ]
            )
    return rows


def main(argv=None) -> int:
    return _timing.cli(argv, _parse, run, report)

"""Deploy latency, side by side: `python -m benchmarks deploy [--flags]`.

One DiracNet (CIFAR stem, 32x32x3 uint8 images, trained-looking random
variables as `benchmarks fold_latency`) as every deployable form, in one process, timed
round-robin at each batch size (`_timing.interleaved_times`):

* the unfolded JAX model (`model.apply`, BN at eval; jit, params as arguments);
* the folded JAX chain (`fold.apply_folded`);
* the float32 ONNX export in onnxruntime (`formats.onnx_graph.to_onnx`);
* the INT8 ONNX export in onnxruntime, as `dirac_jax.export --quantize=int8`
  writes it (identity apart, block outputs in float32, per-channel int8
  weights, QDQ; calibrated on random images, which changes no timing);
* the same with the block outputs rounded to int8 (`--stream=int8`);
* the same INT8 with the Dirac identity folded into the kernel (`naive`), so
  the cost of the identity's float32 Mul and Add shows;
* the PyTorch reference DiracNet (`torch_reference.reference_forward`, eval
  mode, no grad), when torch is installed.

Every candidate takes the uint8 NHWC images and computes the logits, the
input normalization included (PyTorch gets the normalized NCHW floats, as
the reference module expects). It prints the CPU's int8-relevant features:
INT8 convolutions in onnxruntime are fast on CPUs with VNNI (AVX512-VNNI or
AVX-VNNI) or AMX; without them an int8 dot product needs more instructions
than a float32 FMA.
"""

from __future__ import annotations

import functools
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from benchmarks import _flags, _timing
from benchmarks.fold_latency import random_variables
from dirac_jax import data, fold, quantize, torch_reference
from dirac_jax.formats import onnx_graph
from dirac_jax.models import get_model

__all__ = ["INT8_FEATURES", "cpu_int8_features", "main", "options", "report", "run"]

# /proc/cpuinfo flags that speed up int8 dot products on x86.
INT8_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile")
_DATASET = "cifar10"


def cpu_int8_features() -> dict[str, bool]:
    """Which of `INT8_FEATURES` the CPU has (Linux `/proc/cpuinfo`; all False elsewhere)."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {name: name in flags for name in INT8_FEATURES}


FLAGS = flags.FlagValues()  # this suite's own (`_flags`)
flags.DEFINE_integer("depth", 10, "DiracNet depth.", flag_values=FLAGS)
flags.DEFINE_float("width", 2.0, "Width multiplier k.", flag_values=FLAGS)
flags.DEFINE_list("batches", ["1", "64"], "Batch sizes, comma-separated.", flag_values=FLAGS)
flags.register_validator(
    "batches",
    lambda v: all(b.isdigit() and int(b) >= 1 for b in v),
    "--batches takes batch sizes >= 1, comma-separated.",
    flag_values=FLAGS,
)
flags.DEFINE_integer(
    "repeats", 30, "Timed rounds per batch size.", lower_bound=1, flag_values=FLAGS
)
flags.DEFINE_integer("warmup", 2, "Untimed calls per candidate.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer(
    "calibration_images", 64, "INT8 calibration images.", lower_bound=1, flag_values=FLAGS
)
flags.DEFINE_bool(
    "torch", True, "Time the PyTorch reference (--notorch leaves it out).", flag_values=FLAGS
)
flags.DEFINE_integer("seed", 0, "Seed of the random weights and images.", flag_values=FLAGS)
flags.DEFINE_string("json", None, "Also write the results to this JSON file.", flag_values=FLAGS)


def _parse(argv):
    return _flags.parse(FLAGS, argv, "deploy", __doc__)


def options(**values):
    """This suite's options (`run`'s argument) at the flags' defaults, with `values` set."""
    return _flags.options(FLAGS, **values)


def _session(path_or_bytes):
    import onnxruntime as ort

    return ort.InferenceSession(path_or_bytes, providers=["CPUExecutionProvider"])


def _torch_candidate(depth, width):
    """The reference net (its own random weights: timing only), or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    params = torch_reference.reference_params(depth, width)

    def call(x):
        return torch_reference.reference_forward(torch.from_numpy(x), params).numpy()

    return call


def run(args) -> dict:
    """Builds every deploy form of one net, checks they agree, times them round-robin."""
    model = get_model("diracnet", depth=args.depth, width=args.width, num_classes=10)
    rng = np.random.default_rng(args.seed)
    size = (32, 32, 3)
    x0 = jnp.zeros((1, *size), jnp.float32)
    variables = random_variables(model, x0, args.seed)
    folded = jax.jit(fold.fold, static_argnums=0)(model, variables)
    mean, std = data.MEAN_STD[_DATASET]
    side = {"input_shape": size, "mean": mean, "std": std}

    def normalize(images):
        return data.normalize(images, _DATASET)

    unfolded = jax.jit(lambda v, x: model.apply(v, normalize(x), train=False))
    folded_fn = jax.jit(lambda f, x: fold.apply_folded(f, normalize(x)))
    sessions = {"float32 ONNX": _session(onnx_graph.to_onnx(folded, **side).SerializeToString())}
    calib = rng.integers(0, 256, (args.calibration_images, *size), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        split = fold.fold(model, variables, identity_apart=True)
        for label, net, stream in (
            ("INT8 ONNX (identity apart)", split, "float"),
            ("INT8 ONNX (identity apart, int8 stream)", split, "int8"),
            ("INT8 ONNX (naive)", folded, "float"),
        ):
            out = f"{tmp}/{len(sessions)}.onnx"
            quantize.quantize_onnx(onnx_graph.to_onnx(net, **side), out, calib, stream=stream)
            sessions[label] = _session(out)
    torch_call = _torch_candidate(args.depth, args.width) if args.torch else None

    results = {"environment": _timing.environment(), "cpu_int8": cpu_int8_features()}
    results["config"] = vars(args)
    results["batches"] = {}
    for batch in map(int, args.batches):
        images = rng.integers(0, 256, (batch, *size), dtype=np.uint8)
        candidates = {
            "JAX unfolded": functools.partial(unfolded, variables, images),
            "JAX folded": functools.partial(folded_fn, folded, images),
        }
        for label, session in sessions.items():
            candidates[label] = functools.partial(
                session.run, None, {onnx_graph.INPUT_NAME: images}
            )
        if torch_call is not None:
            nchw = np.asarray(normalize(images)).transpose(0, 3, 1, 2).copy()
            candidates["PyTorch reference (unfolded)"] = functools.partial(torch_call, nchw)
        # The float32 forms compute the same logits (the PyTorch module has its own weights).
        want = np.asarray(candidates["JAX unfolded"]())
        got = candidates["float32 ONNX"]()[0]
        if not np.allclose(got, want, atol=1e-3 * max(1.0, float(np.abs(want).max()))):
            raise AssertionError("float32 ONNX differs from the unfolded JAX model.")
        for c in candidates.values():
            _timing.warm_up(c, args.warmup)
        times = _timing.interleaved_times(candidates, args.repeats)
        ref = "float32 ONNX"
        results["batches"][str(batch)] = {
            label: {
                **_timing.summarize(t),
                "vs_float32_onnx": _timing.paired_ratio(times, label, ref)["ratio"],
                "vs_jax_folded": _timing.paired_ratio(times, label, "JAX folded")["ratio"],
            }
            for label, t in times.items()
        }
    return results


def report(results: dict) -> str:
    """The markdown printed by `main` (and pasted into BENCHMARKS.md)."""
    cfg = results["config"]
    features = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in results["cpu_int8"].items())
    lines = [
        f"Machine: {_timing.describe(results['environment'])}.",
        f"CPU int8 features: {features}.",
        f"DiracNet-{cfg['depth']}-{cfg['width']:g}, 32x32x3 uint8 images in, logits out; "
        f"{cfg['repeats']} interleaved rounds, median per call.",
    ]
    for batch, cands in results["batches"].items():
        rows = [
            [label, c["median_ms"], c["min_ms"], c["vs_float32_onnx"], c["vs_jax_folded"]]
            for label, c in cands.items()
        ]
        lines += [
            "",
            f"Batch {batch}:",
            "",
            _timing.markdown_table(
                ["candidate", "median ms", "min ms", "/ float32 ONNX", "/ JAX folded"], rows
            ),
        ]
    return "\n".join(lines)


def main(argv=None) -> int:
    """Runs the benchmark, prints a markdown report; `--json PATH` also writes the results."""
    return _timing.cli(argv, _parse, run, report)


if __name__ == "__main__":
    sys.exit(main())

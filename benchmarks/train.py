"""Training throughput: DiracNet against its plain twin and against PyTorch at its best.

`python -m benchmarks train` times full training steps (forward, backward,
SGD with momentum and weight decay, BN statistics update) on synthetic CIFAR-sized
data, in one process, with the trainer's own jitted step (`steps.compile_steps`,
augmentation on the device, donated state) on a mesh of all local devices. It
reports, from one run:

* train images/s of DiracNet-d-k and of the plain net of the same shape, and their
  ratio: the cost of computing `diag(a) I + diag(b) W_norm` every step (the goal
  is <= 1.05);
* with torch installed, the same step of a PyTorch transcription of the reference
  model (`dirac_jax.torch_reference`), same shapes and batch, in the variants a PyTorch
  user would pick (`--torch_variants`): eager NCHW, `channels_last`, and
  `channels_last` + `torch.compile`; with `--half_precision` every PyTorch variant
  runs under `torch.autocast` bfloat16, as the JAX side computes in bfloat16;
* with `--input_share`, the DiracNet step without augmentation, so the share of
  the step spent in the device-resident input pipeline (gather, reflect-pad, crop,
  flip) is `1 - off / on`;
* the model FLOPs per step (XLA's cost analysis of the lowered step, before
  partitioning, so it is the global count) and, on a device whose peak is in
  `PEAK_TFLOPS`, the model-FLOPs utilization of every candidate of that model.

In float32 the MFU is taken against the peak of the math the convolutions may
use: at the default precision XLA (and cuDNN, for PyTorch) may run float32
convolutions on TF32 tensor cores, so the TF32 peak applies; with
`--fp32_precision=highest` (or `NVIDIA_TF32_OVERRIDE=0`) they run in full
float32, so the plain float32 peak applies.

The candidates are warmed up and then timed round-robin (`_timing`), so the ratios
are meaningful on a shared machine; absolute numbers are context only. `--profile
DIR` then writes a `jax.profiler` trace of a few DiracNet steps to DIR (open it
with TensorBoard's profile plugin or Perfetto).
"""

from __future__ import annotations

import os
import sys

import jax
import ml_collections
import numpy as np
from absl import flags

from benchmarks import _flags, _timing
from dirac_jax import config_schema, data, models, optim, sharding, steps

__all__ = [
    "PEAK_TFLOPS",
    "config_for",
    "jax_candidate",
    "lowered_flops",
    "main",
    "options",
    "profile",
    "report",
    "run",
]

# Dense peak of one chip in TFLOP/s by jax `device_kind`, per math mode (see `peak_mode`):
# NVIDIA datasheets (H100 SXM5 / PCIe / NVL, H200 SXM / NVL, A100); TPU v4 runs float32
# at the default precision as one bfloat16 pass.
PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": {"bfloat16": 989.0, "float32_default": 494.0, "float32_highest": 67.0},
    "NVIDIA H100 PCIe": {"bfloat16": 756.0, "float32_default": 378.0, "float32_highest": 51.0},
    "NVIDIA H100 NVL": {"bfloat16": 835.0, "float32_default": 418.0, "float32_highest": 60.0},
    "NVIDIA H200": {"bfloat16": 989.0, "float32_default": 494.0, "float32_highest": 67.0},
    "NVIDIA H200 NVL": {"bfloat16": 835.0, "float32_default": 418.0, "float32_highest": 60.0},
    "NVIDIA A100-SXM4-80GB": {"bfloat16": 312.0, "float32_default": 156.0, "float32_highest": 19.5},
    "NVIDIA A100-SXM4-40GB": {"bfloat16": 312.0, "float32_default": 156.0, "float32_highest": 19.5},
    "TPU v4": {"bfloat16": 275.0, "float32_default": 275.0},
}
TORCH_VARIANTS = ("eager", "channels_last", "compile")
_TORCH_LABELS = {
    "eager": "PyTorch eager NCHW",
    "channels_last": "PyTorch channels_last",
    "compile": "PyTorch channels_last + torch.compile",
}


def peak_mode(half_precision: bool, fp32_precision: str, environ=os.environ) -> str:
    """The math the convolutions run in, as a key of `PEAK_TFLOPS`.

    Examples:
      >>> peak_mode(True, "default"), peak_mode(False, "default"), peak_mode(False, "highest")
      ('bfloat16', 'float32_default', 'float32_highest')
      >>> peak_mode(False, "default", {"NVIDIA_TF32_OVERRIDE": "0"})
      'float32_highest'
    """
    if half_precision:
        return "bfloat16"
    if fp32_precision == "highest" or environ.get("NVIDIA_TF32_OVERRIDE") == "0":
        return "float32_highest"
    return "float32_default"


FLAGS = flags.FlagValues()  # this suite's own (`_flags`)
flags.DEFINE_integer("depth", 16, "DiracNet depth, 6n+4.", flag_values=FLAGS)
flags.DEFINE_float("width", 1.0, "Width multiplier k.", flag_values=FLAGS)
flags.DEFINE_integer("batch", 64, "Global batch size.", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 20, "Timed rounds.", flag_values=FLAGS)
flags.DEFINE_integer("warmup", 3, "Untimed calls per candidate.", flag_values=FLAGS)
flags.DEFINE_bool(
    "half_precision",
    False,
    "bf16 compute with f32 params (JAX), torch.autocast bf16 (PyTorch).",
    flag_values=FLAGS,
)
flags.DEFINE_enum(
    "fp32_precision",
    "default",
    ("default", "highest"),
    "float32 conv math: 'default' lets XLA and cuDNN use TF32 tensor cores; "
    "'highest' forces full float32 in both (and the float32 peak for MFU).",
    flag_values=FLAGS,
)
flags.DEFINE_bool(
    "torch", True, "Time the PyTorch candidates (--notorch skips them).", flag_values=FLAGS
)
flags.DEFINE_list(
    "torch_variants",
    list(TORCH_VARIANTS),
    "PyTorch candidates, comma-separated: eager (NCHW), channels_last, compile "
    "(channels_last + torch.compile).",
    flag_values=FLAGS,
)
flags.register_validator(
    "torch_variants",
    lambda v: set(v) <= set(TORCH_VARIANTS),
    f"--torch_variants takes some of {','.join(TORCH_VARIANTS)}.",
    flag_values=FLAGS,
)
flags.DEFINE_bool(
    "input_share",
    False,
    "Also time DiracNet without augmentation: the input pipeline's share of a step.",
    flag_values=FLAGS,
)
flags.DEFINE_string("profile", None, "Write a jax.profiler trace to this DIR.", flag_values=FLAGS)
flags.DEFINE_integer("profile_steps", 5, "DiracNet steps to trace.", flag_values=FLAGS)
flags.DEFINE_string("json", None, "Also write the results to this JSON file.", flag_values=FLAGS)


def options(**values):
    """This suite's options (`run`'s argument) at the flags' defaults, with `values` set."""
    return _flags.options(FLAGS, **values)


def config_for(
    name: str, depth: int, width: float, batch: int, half_precision: bool, augment: bool = True
) -> ml_collections.ConfigDict:
    """The training config of a timed model: synthetic CIFAR-10 and the paper's SGD recipe.

    The schema's defaults are filled in (`config_schema.with_defaults`), as
    `optim` and `steps` expect; the device checks of validation are left out.
    """
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict({"name": name, "depth": depth, "width": width})
    c.dataset = ml_collections.ConfigDict(
        {"name": "cifar10", "source": "synthetic", "data_dir": None}
    )
    c.batch_size = batch
    c.num_epochs = 1
    c.num_train_steps = 1000
    c.learning_rate = 0.1
    c.weight_decay = 5e-4
    c.momentum = 0.9
    c.lr_boundaries = (0.3, 0.6, 0.8)
    c.lr_decay = 0.2
    c.seed = 0
    c.half_precision = half_precision
    c.augment = augment
    return config_schema.with_defaults(c)  # what `optim` and `steps` read, without validation


def lowered_flops(lowered) -> float | None:
    """XLA's FLOP count of a lowered (unpartitioned, so global) program, if available."""
    try:
        cost = lowered.cost_analysis()
    except Exception:  # Cost analysis is best effort: some backends do not provide it.
        return None
    cost = cost[0] if isinstance(cost, list) else cost
    return float((cost or {}).get("flops", 0.0)) or None


def jax_candidate(name: str, args, mesh, arrays, augment: bool = True):
    """One real training step of `name` as a closure; its state lives in the closure.

    Returns:
      `(step, num_params, flops, lowered)`: `step()` runs a step and returns its
      loss (a device array); `lowered` is the step's `jax.stages.Lowered`.
    """
    config = config_for(name, args.depth, args.width, args.batch, args.half_precision, augment)
    lr_fn = optim.create_learning_rate_fn(config, steps_per_epoch=1000)
    model = config_schema.create_model(config, num_classes=10)
    state = steps.create_train_state(
        config, model, jax.random.key(0), (32, 32, 3), lr_fn, mesh=mesh
    )
    train_fn, _ = steps.compile_steps(config, mesh, lr_fn, "cifar10")
    rng = np.random.default_rng(0)
    idx = sharding.shard_batch(
        mesh, rng.integers(0, len(arrays.labels), args.batch).astype(np.int32)
    )
    lowered = train_fn.lower(state, arrays, idx)
    cell = {"state": state}

    def step():
        cell["state"], metrics = train_fn(cell["state"], arrays, idx)
        return metrics["loss"]

    num_params = models.count_params(state.params)
    return step, num_params, lowered_flops(lowered), lowered


def _torch_candidates(args) -> tuple[dict, dict, dict]:
    """The PyTorch candidates asked for: `({label: step}, {label: params}, info)`."""
    # OpenMP threads that spin after each PyTorch op would steal the cores from XLA's
    # steps in the interleaved timing; they must sleep instead (read when torch loads).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from dirac_jax.torch_reference import synthetic_train_step

    # PyTorch's own defaults are TF32 convolutions and full float32 matmuls; set both
    # as the JAX side runs (`--fp32_precision`). The bench owns its process.
    tf32 = args.fp32_precision == "default"
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    suffix = " + AMP bf16" if args.half_precision else ""
    steps, params = {}, {}
    for variant in args.torch_variants:
        label = f"DiracNet-{_label(args)} ({_TORCH_LABELS[variant]}{suffix})"
        steps[label], params[label] = synthetic_train_step(
            args.depth,
            args.width,
            args.batch,
            channels_last=variant in ("channels_last", "compile"),
            amp_bf16=args.half_precision,
            compile=variant == "compile",
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = {
        "torch": torch.__version__,
        "torch_device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch_threads": torch.get_num_threads(),
    }
    return steps, params, info


def _label(args) -> str:
    return f"{args.depth}-{args.width:g}"


def _warm_up_all(candidates: dict, warmup: int, optional: set) -> tuple[dict, dict]:
    """Warms every candidate up; an optional one that fails is dropped with a message."""
    compile_s, skipped = {}, {}
    for name in list(candidates):
        try:
            compile_s[name] = _timing.warm_up(candidates[name], warmup)
        except Exception as e:
            if name not in optional:
                raise
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e) else ''}"
            print(f"skipping {name}: its first steps failed ({reason})", file=sys.stderr)
            skipped[name] = reason
            del candidates[name]
    return compile_s, skipped


def profile(step, directory: str, steps: int) -> None:
    """A `jax.profiler` trace of `steps` calls of `step`, each annotated as a train step."""
    with jax.profiler.trace(directory):
        for i in range(steps):
            with jax.profiler.StepTraceAnnotation("train", step_num=i):
                jax.block_until_ready(step())


def run(args) -> dict:
    if args.batch % jax.device_count():
        raise ValueError(
            f"--batch={args.batch} must be divisible by the {jax.device_count()} devices."
        )
    if args.profile_steps < 1:
        raise ValueError(f"--profile_steps must be >= 1, got {args.profile_steps}.")
    # The precision is read when the steps are traced, inside `_run`.
    precision = "highest" if args.fp32_precision == "highest" else None
    with jax.default_matmul_precision(precision):
        return _run(args)


def _run(args) -> dict:
    mesh = sharding.make_mesh()
    ds = data.prepare(data.load("cifar10", source="synthetic", synthetic_size=max(args.batch, 512)))
    arrays = sharding.put_replicated(mesh, ds)
    label = _label(args)
    dirac_name, plain_name = f"DiracNet-{label} (JAX)", f"plain-{label} (JAX)"
    off_name = f"DiracNet-{label} (JAX, no augmentation)"
    candidates, params, flops = {}, {}, {}
    for name, model, augment in [
        (dirac_name, "diracnet", True),
        (plain_name, "plain", True),
        *([(off_name, "diracnet", False)] if args.input_share else []),
    ]:
        candidates[name], params[name], flops[name], _ = jax_candidate(
            model, args, mesh, arrays, augment
        )
    torch_info, torch_names = {}, []
    if args.torch:
        try:
            steps, counts, torch_info = _torch_candidates(args)
        except ImportError:
            print("torch is not installed: skipping the PyTorch candidates", file=sys.stderr)
        else:
            candidates.update(steps)
            params.update(counts)
            torch_names = list(steps)
            # The same model: its FLOPs are the JAX DiracNet step's.
            flops.update({k: flops[dirac_name] for k in steps})
    compile_s, skipped = _warm_up_all(candidates, args.warmup, optional=set(torch_names))
    times = _timing.interleaved_times(candidates, args.repeats)
    stats = {k: _timing.summarize(t) for k, t in times.items()}
    for s in stats.values():
        s["images_per_s"] = args.batch / (s["median_ms"] / 1e3)
    ratios = {"DiracNet / plain (step time)": _timing.paired_ratio(times, dirac_name, plain_name)}
    for name in torch_names:
        if name in times:
            short = name[name.index("(") + 1 : -1]
            ratios[f"JAX DiracNet / {short} (step time)"] = _timing.paired_ratio(
                times, dirac_name, name
            )
    if args.input_share:
        ratios["augmentation on / off (step time)"] = _timing.paired_ratio(
            times, dirac_name, off_name
        )
    env = _timing.environment()
    mode = peak_mode(args.half_precision, args.fp32_precision)
    peak = PEAK_TFLOPS.get(env["device_kind"], {}).get(mode)
    mfu = {}
    for k, f in flops.items():
        if f and peak and k in stats:
            achieved = f / (stats[k]["median_ms"] / 1e3) / 1e12
            mfu[k] = achieved / (peak * env["device_count"])
    if args.profile:
        profile(candidates[dirac_name], args.profile, args.profile_steps)
    return {
        "environment": env,
        "args": vars(args),
        "params": params,
        "compile_s": compile_s,
        "stats": stats,
        "ratios": ratios,
        "flops_per_step": flops,
        "peak": {"mode": mode, "tflops_per_device": peak},
        "mfu": mfu,
        "skipped": skipped,
        "torch": torch_info,
    }


def report(results: dict) -> str:
    args = results["args"]
    rows = [
        [
            k,
            f"{results['params'][k]:,}",
            s["median_ms"],
            s["images_per_s"],
            results["flops_per_step"].get(k) or "-",
            results["mfu"].get(k, "-"),
        ]
        for k, s in results["stats"].items()
    ]
    ratio_rows = [
        [k, r["ratio"], f"{r['round_q1']:.3g} - {r['round_q3']:.3g}"]
        for k, r in results["ratios"].items()
    ]
    share = results["ratios"].get("augmentation on / off (step time)")
    peak = results["peak"]
    torch_info = results["torch"]
    lines = [
        f"Machine: {_timing.describe(results['environment'])}.",
        f"Global batch {args['batch']} of 32x32x3 synthetic images, "
        f"{'bf16' if args['half_precision'] else 'float32'} compute "
        f"(float32 precision: {args['fp32_precision']}), {args['repeats']} interleaved rounds, "
        "median per training step"
        + (
            f"; PyTorch {torch_info['torch']} on {torch_info['torch_device']} "
            f"with {torch_info['torch_threads']} threads."
            if torch_info
            else "."
        ),
        f"MFU against {peak['tflops_per_device']} TFLOP/s per device ({peak['mode']})."
        if peak["tflops_per_device"]
        else f"MFU: no {peak['mode']} peak known for this device (see PEAK_TFLOPS).",
        "",
        _timing.markdown_table(
            ["candidate", "params", "median ms/step", "images/s", "FLOPs/step", "MFU"], rows
        ),
        "",
        _timing.markdown_table(["ratio", "of medians", "per-round quartiles"], ratio_rows),
    ]
    if share:
        lines += ["", f"Input pipeline share of the DiracNet step: {1 - 1 / share['ratio']:.1%}."]
    for name, reason in results["skipped"].items():
        lines += ["", f"Skipped {name}: {reason}"]
    if args["profile"]:
        lines += ["", f"Profile of {args['profile_steps']} DiracNet steps in {args['profile']}."]
    return "\n".join(lines)


def main(argv=None) -> int:
    """Runs the benchmark, prints a markdown report; `--json PATH` also writes the results."""
    return _timing.cli(argv, lambda a: _flags.parse(FLAGS, a, "train", __doc__), run, report)

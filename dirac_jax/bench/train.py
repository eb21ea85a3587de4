"""Training throughput: DiracNet against its plain twin, and against a PyTorch reference.

`python -m dirac_jax.bench train` times full training steps (forward, backward,
SGD with momentum and weight decay, BN statistics update) on synthetic CIFAR-sized
data, in one process, with the trainer's own jitted step (`train.compile_steps`)
on a mesh of all local devices. It reports, from one run:

* train images/s of DiracNet-d-k and of the plain net of the same shape, and their
  ratio: the cost of computing `diag(a) I + diag(b) W_norm` every step (the goal
  is <= 1.05);
* with torch installed, the same step of a PyTorch transcription of the reference
  model (`_torch_reference.py`), with the same shapes and batch;
* the compiled step's FLOPs (XLA's cost analysis) and, on a GPU or TPU whose peak
  is known, the model-FLOPs utilization.

The candidates are warmed up and then timed round-robin (`_timing`), so the ratios
are meaningful on a shared machine; absolute numbers are context only.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import ml_collections
import numpy as np

from dirac_jax import data, train
from dirac_jax.bench import _timing

__all__ = [
    "PEAK_TFLOPS",
    "main",
    "report",
    "run",
]

# Dense peak of one chip in TFLOP/s, by jax device_kind, for MFU (bf16 / fp32 tensor-core).
PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": {"bfloat16": 989.0, "float32": 494.0},
    "NVIDIA H200": {"bfloat16": 989.0, "float32": 494.0},
    "NVIDIA A100-SXM4-80GB": {"bfloat16": 312.0, "float32": 156.0},
    "TPU v4": {"bfloat16": 275.0, "float32": 275.0},
}


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m dirac_jax.bench train", description=__doc__)
    p.add_argument("--depth", type=int, default=16, help="DiracNet depth, 6n+4.")
    p.add_argument("--width", type=float, default=1.0, help="width multiplier k.")
    p.add_argument("--batch", type=int, default=64, help="global batch size.")
    p.add_argument("--repeats", type=int, default=20, help="timed rounds.")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per candidate.")
    p.add_argument("--half-precision", action="store_true", help="bf16 compute, f32 params.")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference.")
    p.add_argument("--json", help="also write the results to this JSON file.")
    return p.parse_args(argv)


def _config(name: str, args) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict({"name": name, "depth": args.depth, "width": args.width})
    c.dataset = ml_collections.ConfigDict(
        {"name": "cifar10", "source": "synthetic", "data_dir": None}
    )
    c.batch_size = args.batch
    c.num_epochs = 1
    c.num_train_steps = 1000
    c.learning_rate = 0.1
    c.weight_decay = 5e-4
    c.momentum = 0.9
    c.lr_boundaries = (0.3, 0.6, 0.8)
    c.lr_decay = 0.2
    c.seed = 0
    c.half_precision = args.half_precision
    return c


def _jax_candidate(name: str, args, mesh, arrays):
    """A closure running one real training step of `name`; its state lives in the closure."""
    config = _config(name, args)
    lr_fn = train.create_learning_rate_fn(config, steps_per_epoch=1000)
    model = train.create_model(config, num_classes=10)
    state = train.create_train_state(
        config, model, jax.random.key(0), (32, 32, 3), lr_fn, mesh=mesh
    )
    train_fn, _ = train.compile_steps(config, mesh, lr_fn, "cifar10")
    rng = np.random.default_rng(0)
    idx = train.shard_batch(mesh, rng.integers(0, len(arrays.labels), args.batch).astype(np.int32))
    flops = None
    try:
        cost = train_fn.lower(state, arrays, idx).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        flops = float(cost.get("flops", 0.0)) or None
    except Exception:  # Cost analysis is best effort: some backends do not provide it.
        flops = None
    cell = {"state": state}

    def step():
        cell["state"], metrics = train_fn(cell["state"], arrays, idx)
        return metrics["loss"]

    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    return step, num_params, flops


def _torch_candidate(args):
    # OpenMP threads that spin after each PyTorch op would steal the cores from XLA's
    # steps in the interleaved timing; they must sleep instead (read when torch loads).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    from dirac_jax.bench._torch_reference import ReferenceDiracNet, make_train_step

    torch.manual_seed(0)
    model = ReferenceDiracNet(args.depth, args.width)
    step_fn = make_train_step(model)
    images = torch.randn(args.batch, 3, 32, 32)
    labels = torch.randint(0, 10, (args.batch,))

    def step():
        return step_fn(images, labels).item()

    return step, sum(p.numel() for p in model.parameters()), torch.get_num_threads()


def run(args) -> dict:
    if args.batch % jax.device_count():
        raise ValueError(
            f"--batch {args.batch} must be divisible by the {jax.device_count()} devices."
        )
    mesh = train.make_mesh()
    ds = data.prepare(data.load("cifar10", source="synthetic", synthetic_size=max(args.batch, 512)))
    arrays = train.put_replicated(mesh, ds)
    label = f"{args.depth}-{args.width:g}"
    dirac, n_dirac, f_dirac = _jax_candidate("diracnet", args, mesh, arrays)
    plain, n_plain, f_plain = _jax_candidate("plain", args, mesh, arrays)
    candidates = {f"DiracNet-{label} (JAX)": dirac, f"plain-{label} (JAX)": plain}
    params = {f"DiracNet-{label} (JAX)": n_dirac, f"plain-{label} (JAX)": n_plain}
    torch_threads = None
    if not args.no_torch:
        try:
            ref, n_ref, torch_threads = _torch_candidate(args)
            candidates[f"DiracNet-{label} (PyTorch reference)"] = ref
            params[f"DiracNet-{label} (PyTorch reference)"] = n_ref
        except ImportError:
            print("torch is not installed: skipping the PyTorch reference", file=sys.stderr)
    compile_s = {k: _timing.warm_up(c, args.warmup) for k, c in candidates.items()}
    times = _timing.interleaved_times(candidates, args.repeats)
    stats = {k: _timing.summarize(t) for k, t in times.items()}
    for s in stats.values():
        s["images_per_s"] = args.batch / (s["median_ms"] / 1e3)
    names = list(candidates)
    ratios = {"DiracNet / plain (step time)": _timing.paired_ratio(times, names[0], names[1])}
    if len(names) > 2:
        ratios["JAX DiracNet / PyTorch reference (step time)"] = _timing.paired_ratio(
            times, names[0], names[2]
        )
    env = _timing.environment()
    dtype = "bfloat16" if args.half_precision else "float32"
    peak = PEAK_TFLOPS.get(env["device_kind"], {}).get(dtype)
    flops = {names[0]: f_dirac, names[1]: f_plain}
    mfu = {}
    for k, f in flops.items():
        if f and peak:
            achieved = f / (stats[k]["median_ms"] / 1e3) / 1e12
            mfu[k] = achieved / (peak * env["device_count"])
    return {
        "environment": env,
        "args": vars(args),
        "params": params,
        "compile_s": compile_s,
        "stats": stats,
        "ratios": ratios,
        "flops_per_step": flops,
        "mfu": mfu,
        "torch_threads": torch_threads,
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
    threads = results["torch_threads"]
    return "\n".join(
        [
            f"Machine: {_timing.describe(results['environment'])}.",
            f"Global batch {args['batch']} of 32x32x3 synthetic images, "
            f"{'bf16' if args['half_precision'] else 'float32'} compute, {args['repeats']} "
            "interleaved rounds, median per training step"
            + (f"; PyTorch with {threads} threads." if threads else "."),
            "",
            _timing.markdown_table(
                ["candidate", "params", "median ms/step", "images/s", "FLOPs/step", "MFU"], rows
            ),
            "",
            _timing.markdown_table(["ratio", "of medians", "per-round quartiles"], ratio_rows),
        ]
    )


def main(argv=None) -> int:
    """Runs the benchmark, prints a markdown report; `--json PATH` also writes the results."""
    return _timing.cli(argv, _parse, run, report)

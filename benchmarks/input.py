"""Input throughput: decode + augment of ImageNet-shaped JPEGs, per core and with Grain workers.

`python -m benchmarks input` measures the streamed input's host work
(`dirac_jax.input_pipeline`) on synthetic photographs of ImageNet's typical
size (500x375 JPEGs at quality 90, about ImageNet's mean file size):

* images/s of one thread (one core) for the training transform (decode,
  random-resized crop, flip; `train_image`) and the eval transform (resize to
  256, centre crop 224; `eval_image`), at `--size` (224);
* images/s of the whole Grain pipeline (`MapDataset -> mp_prefetch`, batches
  of this host's rows) with 0 (threads in the training process), 1, 2, ...
  worker processes, and its speed-up over one worker.

The per-core transforms are timed in one loop each. Grain candidates run one at
a time (their workers decode in the background, so they cannot be interleaved
call by call), each after a warm-up that starts its workers, in alternating
order over the rounds; the ratios are of per-round throughputs.
"""

from __future__ import annotations

import io
import os
import time

import numpy as np
from absl import flags

from benchmarks import _flags, _timing
from dirac_jax import data, input_pipeline

__all__ = ["main", "options", "report", "run", "synthetic_jpegs"]


FLAGS = flags.FlagValues()  # this suite's own (`_flags`)
flags.DEFINE_integer(
    "size", 224, "Crop size (dataset.image_size).", lower_bound=1, flag_values=FLAGS
)
flags.DEFINE_integer("images", 64, "Distinct synthetic JPEGs.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_integer(
    "batch", 32, "Host batch of the Grain pipeline.", lower_bound=1, flag_values=FLAGS
)
flags.DEFINE_integer(
    "batches", 24, "Batches per timed Grain run.", lower_bound=1, flag_values=FLAGS
)
flags.DEFINE_string("workers", "0,1,2", "Grain worker counts to compare.", flag_values=FLAGS)
flags.DEFINE_integer("repeats", 3, "Timed rounds.", lower_bound=1, flag_values=FLAGS)
flags.DEFINE_string("json", None, "Also write the results to this JSON file.", flag_values=FLAGS)


def _parse(argv):
    return _flags.parse(FLAGS, argv, "input", __doc__)


def options(**values):
    """This suite's options (`run`'s argument) at the flags' defaults, with `values` set."""
    return _flags.options(FLAGS, **values)


def synthetic_jpegs(count: int, width: int = 500, height: int = 375, seed: int = 0):
    """Photo-like JPEGs: smooth colour fields plus grain, so they compress like photos."""
    import PIL.Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        coarse = rng.uniform(0, 255, (height // 25 + 1, width // 25 + 1, 3)).astype(np.uint8)
        field = PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.BICUBIC)
        noisy = np.asarray(field, np.int16) + rng.normal(0, 12, (height, width, 3))
        buffer = io.BytesIO()
        PIL.Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(
            buffer, format="JPEG", quality=90
        )
        out.append({"image": buffer.getvalue(), "label": 0})
    return out


def run(args) -> dict:
    records = synthetic_jpegs(args.images)
    size = args.size
    per_core = {}
    for name, fn in (
        ("train transform", lambda r, i: data.train_image(
            r["image"], data.example_rng(0, 0, i), size)),
        ("eval transform", lambda r, i: data.eval_image(r["image"], size)),
    ):  # fmt: skip
        fn(records[0], 0)
        start = time.perf_counter()
        for _ in range(2):
            for i, r in enumerate(records):
                fn(r, i)
        per_core[name] = 2 * len(records) / (time.perf_counter() - start)

    workers = [int(w) for w in args.workers.split(",")]
    maker = input_pipeline.TrainBatchMaker(
        records, np.arange(args.batch), seed=0, batch_size=args.batch, image_size=size
    )
    # Worker processes decode in the background, so candidates cannot be interleaved call by
    # call (one would eat the batches another's workers prefetched). Each runs alone, for
    # `batches` batches after a warm-up that starts its workers; rounds alternate the order.
    times = {f"{w} workers": [] for w in workers}
    for r in range(args.repeats):
        for w in workers if r % 2 == 0 else workers[::-1]:
            iterator = input_pipeline.grain_iterator(maker, 0, 1 << 30, num_workers=w)
            for _ in range(2 + 2 * max(w, 1)):
                next(iterator)
            start = time.perf_counter()
            for _ in range(args.batches):
                next(iterator)
            times[f"{w} workers"].append(time.perf_counter() - start)
            input_pipeline.close_iterator(iterator)
    images = args.batch * args.batches
    stats = {}
    for name, t in times.items():
        stats[name] = _timing.summarize(t)
        stats[name]["images_per_s"] = images / (stats[name]["median_ms"] / 1e3)
    base = f"{workers[0]} workers"
    ratios = {
        f"{name} / {base}": _timing.paired_ratio(
            {k: [1 / x for x in v] for k, v in times.items()}, name, base
        )
        for name in times
        if name != base
    }
    return {
        "environment": _timing.environment(),
        "cores": os.cpu_count(),
        "args": vars(args),
        "per_core_images_per_s": per_core,
        "stats": stats,
        "ratios": ratios,
    }


def report(results: dict) -> str:
    args = results["args"]
    size = args["size"]
    core_rows = [[k, v, 1e3 / v] for k, v in results["per_core_images_per_s"].items()]
    rows = [[k, s["images_per_s"], s["median_ms"]] for k, s in results["stats"].items()]
    ratio_rows = [
        [k, r["ratio"], f"{r['round_q1']:.3g} - {r['round_q3']:.3g}"]
        for k, r in results["ratios"].items()
    ]
    return "\n".join(
        [
            f"Machine: {_timing.describe(results['environment'])}.",
            f"{args['images']} synthetic 500x375 JPEGs (quality 90), crops of {size}x{size}.",
            "",
            "One thread (one core):",
            "",
            _timing.markdown_table(["transform", "images/s", "ms/image"], core_rows),
            "",
            f"Grain pipeline, host batch {args['batch']}, {args['batches']} batches per run, "
            f"{args['repeats']} rounds (0 workers: "
            f"{input_pipeline.READ_THREADS} threads in the training process):",
            "",
            _timing.markdown_table(["candidate", "images/s", "median ms/run"], rows),
            "",
            _timing.markdown_table(
                ["throughput ratio", "of medians", "per-round quartiles"], ratio_rows
            ),  # fmt: skip
        ]
    )


def main(argv=None) -> int:
    """Runs the benchmark, prints a markdown report; `--json PATH` also writes the results."""
    return _timing.cli(argv, _parse, run, report)

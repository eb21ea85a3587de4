"""The benchmark commands at tiny sizes: they run, report what they claim, and fail clearly."""

import json
import math

import jax
import jax.numpy as jnp
import pytest

from benchmarks import compile as bench_compile
from benchmarks import train as bench_train


def test_constant_bytes_counts_literals_by_type():
    text = "\n".join(
        [
            "%0 = stablehlo.constant dense<2.0> : tensor<f32>",
            '%1 = stablehlo.constant dense<"0x0000"> : tensor<3x3x4x8xf32>',
            "%2 = stablehlo.constant dense<true> : tensor<2x5xi1>",
            "%3 = stablehlo.add %0, %0 : tensor<3x3x4x8xf32>",
        ]
    )
    assert bench_compile.constant_bytes(text) == 4 + 4 * 288 + 10


def test_bench_compile_reports_ratios_of_one_run(capsys, tmp_path):
    bench_compile.main(
        ["--models=cifar", "--depth", "10", "--width=0.25", "--batch", "8", "--repeats", "1"]
        + ["--programs=grad,train", "--json", str(tmp_path / "c.json")]
    )
    out = capsys.readouterr().out
    for program in ("grad", "train"):
        label = f"DiracNet-10-0.25 (cifar) {program}"
        assert f"| {label} | program text |" in out
        assert f"| {label} | temp memory |" in out
        assert f"plain twin of {label}" in out
    models = json.loads((tmp_path / "c.json").read_text())["models"]
    grad, step = (models[f"DiracNet-10-0.25 (cifar) {p}"]["summary"] for p in ("grad", "train"))
    for name in ("diracnet", "plain"):
        # The train step holds the gradient program and the update: more code, and the
        # whole new state out (parameters, momentum, BN statistics), not the gradient alone.
        assert step[name]["fusions"] > grad[name]["fusions"]
        assert step[name]["output_bytes"] > 2 * grad[name]["output_bytes"]
    # The control computes its kernels in the step: XLA kept those ops (more fusions than
    # the plain net's), and they are fewer than the Dirac kernels' own.
    control = models["DiracNet-10-0.25 (cifar) grad"]["summary"]["control"]
    assert grad["plain"]["fusions"] < control["fusions"] < grad["diracnet"]["fusions"]
    assert "control" not in models["DiracNet-10-0.25 (cifar) train"]["summary"]
    assert "| compile time, DiracNet / control |" in out
    # The Dirac kernels are computed in the program: no kernel-sized literal in either.
    assert all(m["summary"]["diracnet"]["constant_bytes"] < 10_000 for m in models.values())


@pytest.mark.parametrize(
    "half,precision,env,mode",
    [
        (True, "default", {}, "bfloat16"),
        (True, "highest", {}, "bfloat16"),
        (False, "default", {}, "float32_default"),
        (False, "highest", {}, "float32_highest"),
        (False, "default", {"NVIDIA_TF32_OVERRIDE": "0"}, "float32_highest"),
    ],
)
def test_peak_mode_follows_the_math_the_convs_run_in(half, precision, env, mode):
    assert bench_train.peak_mode(half, precision, env) == mode


def test_peak_table_is_dense_and_ordered():
    h100 = bench_train.PEAK_TFLOPS["NVIDIA H100 80GB HBM3"]
    assert (h100["bfloat16"], h100["float32_default"]) == (989.0, 494.0)
    assert bench_train.PEAK_TFLOPS["NVIDIA H200"] == h100  # the same GH100 tensor cores.
    for peaks in bench_train.PEAK_TFLOPS.values():
        ordered = [peaks.get(k) for k in ("bfloat16", "float32_default", "float32_highest")]
        known = [p for p in ordered if p is not None]
        assert known == sorted(known, reverse=True)


def test_torch_candidates_train_the_same_model():
    torch = pytest.importorskip("torch")
    from dirac_jax.torch_reference import synthetic_train_step

    torch.set_num_threads(1)
    losses = {}
    for name, kwargs in {
        "eager": {},
        "channels_last": {"channels_last": True},
        "amp": {"channels_last": True, "amp_bf16": True},
    }.items():
        step, num_params = synthetic_train_step(10, 0.25, 4, device="cpu", **kwargs)
        losses[name] = [step() for _ in range(2)]
        assert num_params == 5_118  # DiracNet-10-0.25, as the JAX model.
    # Same seed and data: the layout changes no loss beyond float rounding, bf16 a little.
    assert losses["eager"][1] != losses["eager"][0]  # the step trains.
    assert losses["channels_last"] == pytest.approx(losses["eager"], rel=1e-5)
    assert losses["amp"] == pytest.approx(losses["eager"], rel=2e-2)


def test_half_precision_makes_the_jax_model_bf16():
    from dirac_jax import config_schema

    for half, dtype in [(False, jnp.float32), (True, jnp.bfloat16)]:
        args = bench_train.options(depth=10, half_precision=half)
        config = bench_train.config_for(
            "diracnet", args.depth, args.width, args.batch, args.half_precision
        )
        assert config_schema.create_model(config, num_classes=10).dtype == dtype


def test_failing_optional_candidate_is_skipped_with_its_reason(capsys):
    def broken():
        raise RuntimeError("inductor needs a C++ compiler\nmore detail")

    candidates = {"jax": lambda: 1.0, "torch.compile": broken}
    compile_s, skipped = bench_train._warm_up_all(candidates, 1, optional={"torch.compile"})
    assert list(candidates) == ["jax"] and list(compile_s) == ["jax"]
    assert skipped == {"torch.compile": "RuntimeError: inductor needs a C++ compiler"}
    assert "skipping torch.compile" in capsys.readouterr().err
    with pytest.raises(RuntimeError):  # a required candidate that fails is an error.
        bench_train._warm_up_all({"jax": broken}, 1, optional=set())


def test_profile_writes_a_trace_of_the_steps(tmp_path):
    step = jax.jit(lambda: jnp.ones(3) * 2)
    bench_train.profile(step, str(tmp_path), steps=2)
    assert list(tmp_path.rglob("*.xplane.pb"))


def test_report_states_peak_share_and_skips():
    stats = {"median_ms": 10.0, "min_ms": 9.0, "max_ms": 11.0, "images_per_s": 800.0}
    ratio = {"ratio": 1.25, "round_q1": 1.2, "round_q3": 1.3}
    results = {
        "environment": _timing_env(),
        "args": {"batch": 8, "half_precision": True, "fp32_precision": "default", "repeats": 2}
        | {"profile": "/tmp/p", "profile_steps": 3},
        "params": {"a": 10},
        "stats": {"a": stats},
        "ratios": {"augmentation on / off (step time)": ratio},
        "flops_per_step": {"a": 4e12},
        "peak": {"mode": "bfloat16", "tflops_per_device": 989.0},
        "mfu": {"a": 0.4},
        "skipped": {"b": "RuntimeError: no compiler"},
        "torch": {},
    }
    out = bench_train.report(results)
    assert "MFU against 989.0 TFLOP/s per device (bfloat16)." in out
    assert "| a | 10 | 10 | 800 | 4e+12 | 0.4 |" in out
    assert "Input pipeline share of the DiracNet step: 20.0%." in out
    assert "Skipped b: RuntimeError: no compiler" in out
    assert "Profile of 3 DiracNet steps in /tmp/p." in out


def _timing_env():
    from benchmarks import _timing

    return _timing.environment()


def test_bench_train_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="divisible by the 8 devices"):
        bench_train.main(["--batch=6", "--notorch"])
    with pytest.raises(ValueError, match="--profile_steps"):
        bench_train.main(["--batch", "8", "--notorch", "--profile_steps=0"])
    with pytest.raises(ValueError, match="--repeats"):
        bench_compile.main(["--repeats", "0"])


SUITES = ("bf16", "compile", "cpu_flags", "deploy", "device_check", "fold_latency", "input")
SUITES += ("int8", "train")


@pytest.mark.parametrize("name", SUITES)
def test_every_suite_lists_its_absl_flags_under_help(name, capsys):
    import importlib

    suite = importlib.import_module(f"benchmarks.{name}")
    with pytest.raises(SystemExit) as exit_info:
        suite.main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and f"python -m benchmarks {name}" in out
    assert "--json" in out or name == "device_check"
    defined = list(suite.FLAGS)
    assert defined and all(f"--{flag}" in out or f"--[no]{flag}" in out for flag in defined)
    assert not [flag for flag in defined if "-" in flag]  # one spelling: underscores


def test_suite_flags_parse_absl_style_and_reject_the_old_spelling(capsys):
    from benchmarks import __main__ as bench_main
    from benchmarks import fold_latency

    with pytest.raises(SystemExit) as exit_info:
        bench_train.main(["--half-precision"])
    assert exit_info.value.code == 2 and "half-precision" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_train.main(["--torch_variants=eager,nope"])
    assert "--torch_variants takes some of" in capsys.readouterr().err
    # Plain values for a module that runs a suite; a misspelt name is an error.
    args = bench_train.options(depth=10, half_precision=True)
    assert (args.depth, args.width, args.half_precision, args.torch_variants[0]) == (
        10, 1.0, True, "eager"
    )  # fmt: skip
    assert fold_latency.options(batch=1).image_size is None  # run picks the stem's size
    with pytest.raises(TypeError, match="no flag --detph"):
        bench_train.options(detph=10)
    assert bench_main.main(["nope"]) == 2 and bench_main.main(["--help"]) == 0
    assert "SUITE --help lists a suite's flags" in capsys.readouterr().out


def test_compile_cases_are_the_goal_shapes():
    # The goals are stated for DiracNet-28-10 CIFAR and DiracNet-34 ImageNet.
    fn, args = bench_compile.grad_step("diracnet", bench_compile.CASES["imagenet"], 1, jnp.float32)
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(args[0]))
    assert params == 21_638_952  # DiracNet-34's reference count.
    assert (
        bench_compile.CASES["cifar"]["depth"] == 28 and bench_compile.CASES["cifar"]["width"] == 10
    )


def _int8_run(model, float_top1, rows, depth=10, width=1.0):
    return {
        "model": model,
        "depth": depth,
        "width": width,
        "float_top1": float_top1,
        "rows": rows,
        "zero_taps": {},
    }


def _int8_row(variant, weights, top1, agree, error):
    return {
        "variant": variant,
        "weights": weights,
        "activations": "int8",
        "calibration": "percentile",
        "top1": top1,
        "agree": agree,
        "logit_error": error,
        "size": 0.27,
    }


def test_bench_int8_report_holds_the_default_to_the_bars():
    from benchmarks import int8 as bench_int8

    graph = bench_int8.DEFAULT[0]
    dirac = _int8_run(
        "diracnet",
        0.86,
        [
            _int8_row("naive", "per-channel", 0.80, 0.90, 0.3),  # not the default: no bar row
            _int8_row(graph, "per-channel", 0.859, 0.991, 0.035),  # 1.75x the twin's error
            _int8_row(graph, "per-tensor", 0.855, 0.990, 0.5),  # no error bar per tensor
        ],
    )
    twin = _int8_run(
        "plain",
        0.84,
        [
            _int8_row("naive", "per-channel", 0.84, 0.99, 0.02),
            _int8_row("naive", "per-tensor", 0.84, 0.99, 0.02),
        ],
    )
    lonely = _int8_run("diracnet", 0.86, dirac["rows"], depth=28)  # no twin: no bar rows
    env = {
        "jax": "0",
        "backend": "cpu",
        "device_kind": "cpu",
        "device_count": 1,
        "cpu_count": 2,
        "cpu_model": "x",
        "machine": "x86_64",
        "system": "Linux",
        "python": "3",
    }
    text = bench_int8.report({"environment": env, "runs": [dirac, twin, lonely]})
    bars = [line for line in text.splitlines() if "(±" in line]
    assert len(bars) == 2
    channel, tensor = bars
    assert "per-channel" in channel and "| -0.10 (±0.2) |" in channel and "| 1.75 |" in channel
    assert channel.rstrip(" |").endswith("yes")
    # -0.50 points and 99.0% meet the per-tensor bars (0.5 points, 98.5%).
    assert "per-tensor" in tensor and tensor.rstrip(" |").endswith("yes")
    dirac["rows"][1]["agree"] = 0.989  # under 99%: the per-channel bar fails
    dirac["rows"][2]["top1"] = 0.8549  # 0.51 points: the per-tensor bar fails
    text = bench_int8.report({"environment": env, "runs": [dirac, twin]})
    assert [line.rstrip(" |").endswith("**no**") for line in text.splitlines() if "(±" in line] == [
        True,
        True,
    ]


def test_bench_int8_report_shows_exact_columns_and_keeps_7_bit_rows_out_of_the_bars():
    from benchmarks import int8 as bench_int8

    graph = bench_int8.DEFAULT[0]
    rows = [
        _int8_row(graph, "per-channel", 0.86, 0.995, 0.02),
        _int8_row(graph, "per-channel, 7-bit", 0.80, 0.90, 0.3),  # would fail every bar
    ]
    for row, exact in zip(rows, (0.996, 0.90), strict=True):
        row.update(exact_top1=0.861, exact_agree=exact, exact_logit_error=0.019)
    dirac = _int8_run("diracnet", 0.86, rows)
    twin = _int8_run("plain", 0.84, [_int8_row("naive", "per-channel", 0.84, 0.99, 0.02)])
    env = {
        "jax": "0", "backend": "cpu", "device_kind": "cpu", "device_count": 1, "cpu_count": 2,
        "cpu_model": "x", "machine": "x86_64", "system": "Linux", "python": "3",
    }  # fmt: skip
    text = bench_int8.report({"environment": env, "runs": [dirac, twin]})
    lines = text.splitlines()
    assert any("| exact: points | exact: agree % | exact: logit error % |" in x for x in lines)
    assert any("per-channel, 7-bit" in x and x.endswith("| +0.10 | 90.00 | 1.90 |") for x in lines)
    bars = [x for x in lines if "(±" in x]
    assert len(bars) == 1 and bars[0].rstrip(" |").endswith("yes")  # the 8-bit default's row

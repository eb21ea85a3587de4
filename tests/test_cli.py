"""The command lines as a user meets them: their own flags only, quiet runs, one-line errors.

Most mistakes run in this process (`_command`: parse, then the command's
`main`, as `python -m` does minus absl's one-time `app.run` set-up); a few go
through `python -m` to check the whole path, and the ones that train are slow.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap
from unittest import mock

import pytest

from dirac_jax import _cli, config_schema, evaluate, export, workdir
from dirac_jax import main as main_cli
from dirac_jax.configs import plainnet

ROOT = pathlib.Path(__file__).resolve().parents[1]
FASHION_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
QUICKSTART = "configs/fashion_mnist_dirac.py"
# Every flag a command line of ours defines, when it runs.
OUR_FLAGS = {
    "workdir", "verbose", "config", "multihost", "coordinator_address", "num_processes",
    "process_id", "batch_size", "onnx", "format", "out", "platforms", "quantize",
    "calibration_images", "per_tensor", "calibration", "activations", "stream", "reduce_range",
    "preset", "configs", "report_only",
}  # fmt: skip


def _python(*args, cwd=ROOT, env=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_importing_every_module_defines_no_flag():
    probe = textwrap.dedent(
        """
        import importlib, json, pkgutil
        from absl import flags
        import dirac_jax
        names = [m.name for m in pkgutil.walk_packages(dirac_jax.__path__, "dirac_jax.")
                 if not m.name.startswith("dirac_jax.configs")]
        for name in names:
            importlib.import_module(name)
        importlib.import_module("dirac_jax.reproduce.__main__")
        print(json.dumps(sorted(flags.FLAGS)))
        """
    )
    result = _python("-c", probe)
    assert result.returncode == 0, result.stderr[-3000:]
    defined = set(json.loads(result.stdout.splitlines()[-1]))
    assert not defined & OUR_FLAGS, sorted(defined & OUR_FLAGS)


def _skip_without_fashion_mnist():
    if not FASHION_DIR.is_dir():
        pytest.skip("dataset-fashion-mnist not installed")


@pytest.mark.slow
def test_a_program_with_flags_named_like_ours_calls_the_library(tmp_path):
    # The program owns --workdir, --out, --batch_size, --config, ... in absl's FLAGS; importing
    # and calling dirac_jax must neither redefine nor parse any of them.
    _skip_without_fashion_mnist()
    program = textwrap.dedent(
        """
        import json, sys
        import ml_collections
        from absl import app, flags
        from ml_collections import config_flags

        for name in ("workdir", "out", "format", "onnx", "quantize", "stream", "preset"):
            flags.DEFINE_string(name, None, "the program's own")
        for name in ("batch_size", "calibration_images"):
            flags.DEFINE_integer(name, 7, "the program's own")
        flags.DEFINE_bool("verbose", False, "the program's own")
        config_flags.DEFINE_config_dict("config", ml_collections.ConfigDict({"mine": 1}))
        FLAGS = flags.FLAGS

        def main(argv):
            import dirac_jax
            from dirac_jax import quantize, train
            from dirac_jax.configs import fashion_mnist_dirac

            config = fashion_mnist_dirac.get_config()
            config.model.width, config.num_train_steps = 0.25, 6
            config.eval_every_steps = config.log_every_steps = 6
            config.fold_check_images = 64
            train.train_and_evaluate(config, FLAGS.workdir)
            out = {}
            out["float"] = str(dirac_jax.export_workdir(FLAGS.workdir, "onnx", FLAGS.out))
            int8 = quantize.Int8Options(calibration_images=32)
            out["int8"] = str(dirac_jax.export_workdir(
                FLAGS.workdir, "onnx", FLAGS.out + ".int8", quantize=int8))
            result = dirac_jax.evaluate_workdir(FLAGS.workdir, batch_size=2000, onnx=FLAGS.out)
            model, variables, loaded = dirac_jax.load(FLAGS.workdir)
            out["agree"] = result["onnx"]["agree"]
            out["model"] = loaded.model.name
            out["flags"] = [FLAGS.format, FLAGS.batch_size, FLAGS.config.mine, FLAGS.verbose]
            print(json.dumps(out))

        app.run(main)
        """
    )
    run, onnx_file = tmp_path / "run", tmp_path / "m.onnx"
    args = [f"--workdir={run}", f"--out={onnx_file}", "--format=mine", "--batch_size=3"]
    result = _python("-c", program, *args, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["flags"] == ["mine", 3, 1, False]  # the program's flags, as it parsed them
    assert out["model"] == "diracnet" and out["agree"] > 0.99
    assert pathlib.Path(out["int8"]).stat().st_size > 0
    assert (run / workdir.EVAL_FILE).is_file()


# ---------------------------------------------------------------------------
# Everyday mistakes: one `error: ...` line that says what to do, exit status 1.


def _command(capsys, module, *args) -> tuple[int, str]:
    """`python -m MODULE ARGS` in this process; returns the exit status and stderr."""
    from absl import flags
    from absl.testing import flagsaver

    name = module.__name__
    argv = [name, *args]
    module._define_flags()
    parse = getattr(module, "parse_flags", None)
    # The config flag reads its `--config.FIELD` overrides from sys.argv.
    with flagsaver.flagsaver(), mock.patch.object(sys, "argv", argv):
        flags.FLAGS.unparse_flags()
        with pytest.raises(SystemExit) as exit_info:
            rest = parse(argv) if parse else _cli.parse_flags(name, argv)
            _cli.call_main(name, module.main, rest)
    return exit_info.value.code, capsys.readouterr().err


def _one_error_line(status, stderr, message):
    assert status == 1, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert message in lines[0], lines[0]


@pytest.fixture
def paths(tmp_path):
    """A file, an empty folder, and a foldless run's folder (a PlainNet's config.json)."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / workdir.CONFIG_FILE).write_text(config_schema.to_json(plainnet.get_config()))
    return {"file": a_file, "empty": empty, "plain": plain, "tmp": tmp_path}


_CONFIG = f"--config={ROOT / QUICKSTART}"
MAIN_MISTAKES = [
    (
        [_CONFIG, "--config.num_train_step=10"],
        "no field 'num_train_step'; did you mean --config.num_train_steps?",
    ),
    ([_CONFIG, "--config.model.widht=1"], "did you mean --config.model.width?"),
    ([_CONFIG, "--config.zzz=1"], "--config.zzz: the config has no field 'zzz'"),
    (["--config=configs/nope.py"], "no such file 'configs/nope.py'; give a config file"),
    (["--config=cifar_dirac:anything"], "this config has no variants; drop ':anything'"),
    (["--config=cifar_dirak"], "no shipped config 'cifar_dirak'; one of cifar100_dirac"),
    ([_CONFIG, "--config.num_train_steps=-5"], "step count >= 1, or -1 to train"),
    ([_CONFIG, "--config.num_train_steps=0"], "step count >= 1, or -1 to train"),
    ([_CONFIG, "--config.num_train_steps=ten"], "--config.num_train_steps=ten"),
    ([_CONFIG, "--workdir={file}"], "is a file, not a folder; give a new or existing run folder"),
    ([_CONFIG, "runs/x"], "unexpected arguments: runs/x; every setting is a flag"),
    ([_CONFIG, "--batchsize=8"], "Unknown command line flag 'batchsize'"),
    ([], "--config is required"),
]


@pytest.mark.parametrize(("args", "message"), MAIN_MISTAKES)
def test_main_mistakes_end_in_one_line(capsys, paths, args, message):
    args = [a.format(**paths) for a in args]
    if not any(a.startswith("--workdir") for a in args):
        args.append(f"--workdir={paths['tmp'] / 'run'}")
    status, stderr = _command(capsys, main_cli, *args)
    _one_error_line(status, stderr, message)
    assert paths["file"].read_text() == "keep me\n"  # nothing written over
    assert not (paths["tmp"] / "run").exists()


EXPORT_MISTAKES = [
    (["--workdir={empty}"], "--out is required: the file to write, e.g. --out=model.onnx"),
    (["--workdir={empty}", "--out={out}", "--format=tflite"], "should be one of <onnx|"),
    (["--workdir={plain}", "--out={out}", "--quantize=int8"], "'plainnet', which does not fold"),
    (["--workdir={plain}", "--out={out}"], "Evaluate it unfolded with python -m dirac_jax."),
    (["--workdir={empty}", "--out={out}"], "not a training workdir. Train first"),
    (["--workdir={empty}", "--out={out}", "--per_tensor"], "INT8 option; add --quantize=int8"),
    (
        ["--workdir={empty}", "--out={out}", "--format=stablehlo", "--quantize=int8"],
        "--quantize=int8 writes ONNX; use it with --format=onnx",
    ),
    (["--workdir={empty}", "--out={out}", "--platforms=cpu"], "for --format=stablehlo"),
    (
        ["--workdir={empty}", "--out={out}", "--format=stablehlo", "--platforms=gpu"],
        "name some of ('cpu', 'cuda', 'rocm', 'tpu')",
    ),
    (["--workdir={empty}", "--out={out}", "--calibration_images=0"], "--calibration_images=0"),
    (["--out={out}"], "--workdir is required"),
    (["--workdir={empty}", "--out={tmp}"], "is a folder; give the file to write, e.g. --out="),
]


@pytest.mark.parametrize(("args", "message"), EXPORT_MISTAKES)
def test_export_mistakes_end_in_one_line(capsys, paths, args, message):
    out = paths["tmp"] / "out" / "m.onnx"
    status, stderr = _command(capsys, export, *[a.format(out=out, **paths) for a in args])
    _one_error_line(status, stderr, message)
    assert not out.exists()


EVALUATE_MISTAKES = [
    ([], "--workdir is required"),
    (["--workdir={empty}"], "not a training workdir. Train first"),
    (["--workdir={file}"], "not a training workdir"),
    (["--workdir={empty}", "--batch_size=0"], "--batch_size=0"),
    (
        ["--workdir={empty}", "--onnx={tmp}/missing.onnx"],
        "write one with python -m dirac_jax.export",
    ),
    (["--workdir={empty}", "extra"], "unexpected arguments: extra"),
]


@pytest.mark.parametrize(("args", "message"), EVALUATE_MISTAKES)
def test_evaluate_mistakes_end_in_one_line(capsys, paths, args, message):
    status, stderr = _command(capsys, evaluate, *[a.format(**paths) for a in args])
    _one_error_line(status, stderr, message)
    assert not (paths["empty"] / workdir.EVAL_FILE).exists()


def test_a_missing_extra_names_the_install_command(capsys, paths):
    onnx_file = paths["tmp"] / "m.onnx"
    onnx_file.write_bytes(b"")
    args = (f"--workdir={paths['empty']}", f"--onnx={onnx_file}")
    with mock.patch.dict(sys.modules, {"onnxruntime": None}):
        status, stderr = _command(capsys, evaluate, *args)
    _one_error_line(status, stderr, "pip install 'dirac_jax[onnx]'")


def test_mistakes_through_python_m(tmp_path):
    # The whole path of `python -m`: absl's app.run, and no usage text before the error.
    runs = [
        ("dirac_jax.main", f"--config={QUICKSTART}", "--config.num_train_step=10"),
        ("dirac_jax.export", f"--workdir={tmp_path}"),
        ("dirac_jax.evaluate", f"--workdir={tmp_path}", "--batch_size=-1"),
    ]
    for module, *args in runs:
        result = _python("-m", module, *args, f"--workdir={tmp_path}")
        assert result.returncode == 1, (module, result.stderr[-2000:])
        assert "Traceback" not in result.stderr and result.stdout == ""
        (line,) = result.stderr.strip().splitlines()
        assert re.match(r"error: .*(did you mean|--out is required|--batch_size=-1)", line), line


def test_help_lists_each_commands_flags():
    result = _python("-m", "dirac_jax.export", "--help")
    listed = set(re.findall(r"^  --(?:\[no\])?(\w+):", result.stdout, re.MULTILINE))
    assert {"workdir", "out", "format", "quantize", "verbose", "per_tensor"} <= listed, listed
    assert "batch_size" not in listed  # evaluate's, not defined here


# ---------------------------------------------------------------------------
# Quiet by default.

# A line of this package's own: absl's prefix naming one of our files, or the final line.
_ABSL_PREFIX = re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ (\S+):\d+\]")


@pytest.mark.slow
def test_a_quickstart_run_is_quiet_even_from_a_checkout_named_dirac_jax(tmp_path):
    # A checkout named like the package with its venv inside: every library's path then
    # contains /dirac_jax/, which must not make their INFO lines ours.
    _skip_without_fashion_mnist()
    checkout = tmp_path / "dirac_jax"
    (checkout / ".venv").mkdir(parents=True)
    (checkout / "dirac_jax").symlink_to(ROOT / "dirac_jax")
    (checkout / "configs").symlink_to(ROOT / "configs")
    site = next(p for p in map(pathlib.Path, sys.path) if p.name == "site-packages")
    (checkout / ".venv" / "site-packages").symlink_to(site)
    pythonpath = os.pathsep.join([str(checkout), str(checkout / ".venv" / "site-packages")])
    flags = [
        f"--config={QUICKSTART}", "--config.num_train_steps=4", "--config.log_every_steps=2",
        "--config.eval_every_steps=4", "--config.model.width=0.25",
        "--config.fold_check_images=64", f"--workdir={tmp_path / 'run'}",
    ]  # fmt: skip
    probe = "import orbax.checkpoint as o; print(o.__file__)"
    where = _python("-c", probe, cwd=checkout, env={"PYTHONPATH": pythonpath})
    assert "/dirac_jax/.venv/" in where.stdout  # the layout of the report
    result = _python("-m", "dirac_jax.main", *flags, cwd=checkout, env={"PYTHONPATH": pythonpath})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    foreign = [
        line
        for line in lines
        if not (m := _ABSL_PREFIX.match(line)) or not (ROOT / "dirac_jax" / m.group(1)).exists()
    ]
    assert not foreign, foreign  # no orbax INFO, no "Unable to initialize backend 'tpu'"
    # The summary line, one line per log interval (2), the eval line and the final summary.
    assert len(lines) <= 6, lines
    assert result.stdout.startswith("done: step 4")
    # An INT8 export: one line, without onnxruntime's calibration progress and advice.
    out = tmp_path / "m.int8.onnx"
    args = [f"--workdir={tmp_path / 'run'}", "--quantize=int8", "--calibration_images=32"]
    env = {"PYTHONPATH": pythonpath}
    export_run = _python("-m", "dirac_jax.export", *args, f"--out={out}", cwd=checkout, env=env)
    assert export_run.returncode == 0, export_run.stderr[-3000:]
    assert export_run.stderr == "" and len(export_run.stdout.splitlines()) == 1, export_run
    assert out.stat().st_size > 0

"""Tests for the command line (dirac_jax.main) and the configs in configs/."""

import importlib
import os
import pathlib
import subprocess
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import pytest

from dirac_jax import config_schema, data

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if not p.stem.startswith("_"))
# Fields every config keeps, with these exact names (the contract).
REQUIRED = (
    "model.name", "model.depth", "model.width", "dataset.name", "dataset.source",
    "dataset.data_dir", "batch_size", "num_epochs", "num_train_steps", "learning_rate",
    "weight_decay", "seed", "checkpoint_every_steps", "half_precision",
)  # fmt: skip


def test_the_configs_are_all_there():
    assert set(CONFIGS) >= {
        "cifar_dirac", "cifar_plain", "cifar_wrn", "cifar100_dirac", "cifar_dirac_v1",
        "imagenet_dirac", "imagenet_resnet", "resnet_dirac_init", "plainnet",
        "fashion_mnist_dirac",
    }  # fmt: skip


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_validates_and_builds(name):
    config = importlib.import_module(f"dirac_jax.configs.{name}").get_config()
    for field in REQUIRED:
        section, _, leaf = field.rpartition(".")
        assert leaf in (config[section] if section else config), field
    config_schema.validate_config(config)  # 8 devices: every batch size divides
    imagenet = config.dataset.name in data.STREAMED_DATASETS
    channels = 1 if "mnist" in config.dataset.name else 3
    model = config_schema.create_model(config, 1000 if imagenet else 10)
    shape = (1, 224, 224, 3) if imagenet else (1, 32, 32, channels)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))
    logits = jax.eval_shape(lambda v: model.apply(v, jnp.zeros(shape)), variables)
    assert logits.shape == (1, 1000 if imagenet else 10)


def test_recipes_match_the_papers():
    from dirac_jax.configs import cifar_dirac, cifar_dirac_v1, imagenet_dirac, plainnet

    c = cifar_dirac.get_config()
    assert (c.model.name, c.model.depth, c.model.width) == ("diracnet", 28, 10)
    assert (c.batch_size, c.learning_rate, c.weight_decay, c.num_epochs) == (128, 0.1, 5e-4, 200)
    assert (tuple(c.lr_boundaries), c.lr_decay) == ((0.3, 0.6, 0.8), 0.2)
    assert c.weight_decay_on == "kernels" and cifar_dirac_v1.get_config().weight_decay_on == "all"
    assert c.lr_schedule == "reference"
    i = imagenet_dirac.get_config()
    assert (i.model.depth, i.batch_size, i.weight_decay, i.num_epochs) == (18, 256, 1e-4, 100)
    assert (tuple(i.lr_boundaries), i.lr_decay, i.model.stem) == ((0.3, 0.6, 0.9), 0.1, "imagenet")
    assert plainnet.get_config().max_norm > 0


def _run_main(*flags, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "dirac_jax.main", "--config=configs/cifar_dirac.py", *flags]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _main_in_process(capsys, *argv, config=None) -> tuple[int, str]:
    """`python -m dirac_jax.main --config=CONFIG ARGV` in this process.

    CONFIG is configs/cifar_dirac.py by default. Returns the exit status and
    stderr; the flags are restored afterwards.
    """
    from absl import flags
    from absl.testing import flagsaver

    from dirac_jax import main as cli

    argv = ["main", f"--config={config or ROOT / 'configs' / 'cifar_dirac.py'}", *argv]
    # The config flag reads its `--config.FIELD` overrides from sys.argv.
    with flagsaver.flagsaver(), mock.patch.object(sys, "argv", argv):
        flags.FLAGS.unparse_flags()
        with pytest.raises(SystemExit) as exit_info:
            cli.main(cli.parse_flags(argv))
    return exit_info.value.code, capsys.readouterr().err


def test_config_by_name_is_the_shipped_file(tmp_path, capsys):
    # A shipped config by name, with a preset, reaches the trainer (which rejects the depth).
    flags = (f"--workdir={tmp_path}", "--config.model.depth=31")
    status, stderr = _main_in_process(capsys, *flags, config="cifar_wrn_symmetric:soft")
    assert status == 1 and "depth 31" in stderr, stderr
    status, stderr = _main_in_process(capsys, config="cifar_dirak")
    assert status == 1 and len(stderr.strip().splitlines()) == 1
    assert "no shipped config 'cifar_dirak'; one of cifar100_dirac, cifar_dirac," in stderr


def test_config_is_required_without_marking_a_process_wide_flag(capsys):
    # main, evaluate and export share absl's FLAGS in one process (tests, the device check):
    # main asks for --config itself, so evaluate's flags parse after main's are defined.
    from absl import flags
    from absl.testing import flagsaver

    from dirac_jax import evaluate
    from dirac_jax import main as cli

    cli._define_flags()
    evaluate._define_flags()
    with flagsaver.flagsaver():
        flags.FLAGS.unparse_flags()
        flags.FLAGS(["evaluate", "--workdir=w"])
        assert flags.FLAGS.workdir == "w" and flags.FLAGS.batch_size is None
        with pytest.raises(SystemExit):
            cli.main(["main"])
    assert capsys.readouterr().err.startswith("error: --config is required")


def test_the_configs_ship_in_the_package_and_import_without_sys_path():
    from dirac_jax import configs
    from dirac_jax.configs import cifar_wrn_symmetric

    assert configs.names() == CONFIGS
    assert configs.path("cifar_wrn").parent == configs.FOLDER == ROOT / "configs"
    assert cifar_wrn_symmetric.get_config("soft").symmetry_penalty > 0
    assert "configs" not in sys.modules  # no top-level `configs` package was needed


def test_the_wheel_lists_every_package():
    # Every package under dirac_jax/ and the configs, and nothing from beside the library
    # (benchmarks/, tests/): tests/test_wheel.py checks the built wheel itself.
    import tomllib

    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    inits = (ROOT / "dirac_jax").rglob("__init__.py")
    in_tree = {".".join(p.parent.relative_to(ROOT).parts) for p in inits}
    assert set(packages["packages"]) == in_tree | {"dirac_jax.configs"}
    assert len(packages["packages"]) == len(set(packages["packages"]))
    assert (ROOT / "benchmarks" / "__init__.py").is_file()  # a package, and left out
    assert packages["package-dir"] == {"dirac_jax.configs": "configs"}


def test_an_installed_wheel_runs_a_config_by_name(tmp_path):
    # The package installed from a wheel, run from a folder without the source tree: a config
    # by name loads (its base too) and reaches the trainer.
    import shutil

    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ("dirac_jax", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "--target", str(site), str(src)], check=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(site)}
    cmd = [
        sys.executable, "-m", "dirac_jax.main", "--config=cifar_dirac_v1",
        "--config.model.depth=31", f"--workdir={tmp_path / 'run'}",
    ]  # fmt: skip
    run = tmp_path / "elsewhere"
    run.mkdir()
    result = subprocess.run(cmd, cwd=run, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "depth 31" in result.stderr, result.stderr
    probe = "import dirac_jax.configs.cifar_dirac_v1 as m; print(m.__file__)"
    where = subprocess.run(
        [sys.executable, "-c", probe], cwd=run, env=env, capture_output=True, text=True
    )
    assert where.stdout.strip() == str(site / "dirac_jax" / "configs" / "cifar_dirac_v1.py")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--config.model.depth=30"], "depth 30 is not valid for the CIFAR DiracNet"),
        (["--config.dataset.name=svhn"], "unknown dataset 'svhn'"),
        (["--config.batch_size=12"], "batch_size=12 is not divisible by the 8 devices"),
        (["--config.model.name=vgg"], "unknown model 'vgg'"),
        (
            ["--config.dataset.source=cifar_archive", "--config.dataset.data_dir=/nonexistent"],
            "Could not load cifar10",
        ),
    ],
)
def test_bad_config_exits_with_one_clear_error(tmp_path, capsys, flags, message):
    status, stderr = _main_in_process(capsys, f"--workdir={tmp_path / 'run'}", *flags)
    assert status == 1
    assert "Traceback" not in stderr
    assert stderr.startswith("error: "), stderr[-2000:]
    assert message in stderr
    if "Could not load" not in message:  # the missing-data message lists the ways to fix it
        assert len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_config_through_the_command_line(tmp_path):
    # The one subprocess smoke test of the error path: exit status, one line, no traceback.
    result = _run_main(f"--workdir={tmp_path / 'run'}", "--config.model.depth=30")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: "), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "depth 30 is not valid for the CIFAR DiracNet" in result.stderr


def test_default_workdir():
    from dirac_jax import configs
    from dirac_jax.main import default_workdir

    assert default_workdir("configs/fashion_mnist_dirac.py") == "runs/fashion_mnist_dirac"
    assert default_workdir(f"{configs.path('plainnet')}:x") == "runs/plainnet"


def test_imagenet_without_its_data_says_how_to_build_it(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable, "-m", "dirac_jax.main", "--config=configs/imagenet_dirac.py",
        f"--workdir={tmp_path / 'run'}", f"--config.dataset.data_dir={tmp_path / 'tfds'}",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert "imagenet2012 is not prepared" in result.stderr
    assert "tfds build imagenet2012 --file_format=array_record" in result.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--coordinator_address=127.0.0.1:1"], "also needs --num_processes, --process_id"),
        (
            ["--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=2"],
            "--process_id=2 must be in [0, --num_processes=2)",
        ),
    ],
)
def test_bad_multiprocess_flags_exit_with_one_clear_error(tmp_path, capsys, flags, message):
    status, stderr = _main_in_process(capsys, f"--workdir={tmp_path / 'run'}", *flags)
    assert status == 1 and "Traceback" not in stderr
    assert stderr.startswith("error: ") and message in stderr, stderr

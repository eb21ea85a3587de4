"""Test set-up: 8 fake CPU devices and the command lines' XLA:CPU flags, before JAX starts."""

import os
import tempfile

from dirac_jax import xla_cpu

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# The XLA:CPU flags the command lines set (YNNPACK fusions off on the affected jaxlib), so
# the tests run what users run; the subprocesses the tests start inherit them.
xla_cpu.apply()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# glibc writes the reason for an abort it raises itself (heap corruption, a failed assert) to
# the terminal, which CI has none of; this sends it to stderr beside faulthandler's stacks.
os.environ.setdefault("LIBC_FATAL_STDERR_", "1")
# A persistent compilation cache shared by the test processes and the subprocesses they
# start: they compile the same tiny programs many times (threefry-heavy inits take seconds).
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"dirac_jax_tests_jax_cache_{os.getuid()}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)


import pytest  # noqa: E402
from _image_data import FASHION_DIR, write_image_tree, write_tfds_imagenet  # noqa: E402


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory):
    """A small ImageNet-layout tree of real JPEGs: 4 classes, 6 train and 3 val each, 64 px."""
    if not FASHION_DIR.is_dir():
        pytest.skip("dataset-fashion-mnist not installed")
    return write_image_tree(tmp_path_factory.mktemp("image_tree"))


@pytest.fixture(scope="session")
def tfds_imagenet(tmp_path_factory, image_tree):
    """The images of `image_tree` as a TFDS imagenet2012 in ArrayRecord format."""
    return write_tfds_imagenet(tmp_path_factory.mktemp("tfds"), image_tree)


@pytest.fixture(scope="session")
def gcs():
    """A local GCS JSON API server (gcp-storage-emulator, the test extra) with one bucket.

    It is started once per test process and serves every `gs://` test (tests/_gcs.py).
    """
    import _gcs

    with _gcs.emulator() as bucket:
        yield bucket

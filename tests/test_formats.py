"""The export formats (`dirac_jax.formats`) apart from the command line: StableHLO, ONNX's import.

`formats.state_dict` is checked against the PyTorch module in
`test_torch_checkpoint.py`, the ONNX graphs against onnxruntime in
`test_export.py`, `test_symmetric.py` and `test_quantize.py`.
"""

import subprocess
import sys

import jax
import numpy as np
import pytest

from dirac_jax.fold import apply_folded
from dirac_jax.formats import stablehlo
from dirac_jax.torch_checkpoint import load_reference_folded

# ------------------------------------------------------------------ StableHLO


@pytest.fixture(scope="module")
def small_folded():
    """A random folded DiracNet-18 chain of width 1/8 (He-normal weights), made without torch."""
    rng = np.random.default_rng(9)
    sd = {}

    def conv(prefix, shape):
        std = np.sqrt(2.0 / np.prod(shape[1:]))
        sd[prefix + ".weight"] = (std * rng.standard_normal(shape)).astype(np.float32)
        sd[prefix + ".bias"] = (0.1 * rng.standard_normal(shape[0])).astype(np.float32)

    conv("features.conv", (8, 3, 7, 7))
    ni = 8
    for g, no in enumerate((8, 16, 32, 64)):
        for i in range(4):
            conv(f"features.group{g}.block{i}.conv", (no, ni if i == 0 else no, 3, 3))
        ni = no
    conv("fc", (10, 64))
    return load_reference_folded(sd)


def jax_images(batch, size=64, seed=0):
    return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


def test_stablehlo_round_trip_with_symbolic_batch(small_folded):
    pytest.importorskip("flatbuffers")
    blob = stablehlo.export_stablehlo(small_folded, (1, 64, 64, 3))
    assert isinstance(blob, bytes)
    call = stablehlo.load_stablehlo(blob)
    for batch in (1, 3):
        x = jax_images(batch, seed=batch)
        expected = apply_folded(small_folded, x)
        np.testing.assert_allclose(call(x), expected, rtol=1e-5, atol=1e-5)


def test_stablehlo_static_batch_rejects_other_batches(small_folded):
    pytest.importorskip("flatbuffers")
    call = stablehlo.load_stablehlo(
        stablehlo.export_stablehlo(small_folded, (2, 64, 64, 3), polymorphic_batch=False)
    )
    x = jax_images(2)
    np.testing.assert_allclose(call(x), apply_folded(small_folded, x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        call(x[:1])


@pytest.mark.parametrize("shape", [(64, 64, 3), (1, 0, 64, 3), (1, 64.0, 64, 3)])
def test_export_stablehlo_validates_the_shape(small_folded, shape):
    with pytest.raises(ValueError, match="example_shape"):
        stablehlo.export_stablehlo(small_folded, shape)


def test_import_onnx_says_how_to_install_it():
    code = (
        "import sys; sys.modules['onnx'] = None\n"
        "from dirac_jax.formats import onnx_graph\n"
        "try:\n"
        "    onnx_graph.import_onnx()\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'dirac_jax[onnx]'" in out.stdout, out.stdout

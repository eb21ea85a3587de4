"""dirac_jax: very deep plain convolutional networks through weight parameterization.

Subpackages, each one concept: `param` (weight parameterizations, jax and numpy
only), `models` (Flax networks), `fold` (trained net to a plain conv chain),
`interop` (reference PyTorch checkpoints), `data` (dataset readers), `input_pipeline`
(device-resident and Grain-streamed inputs), `train`, `checkpoint`.
Import them explicitly, e.g. `from dirac_jax import param`.
"""

__version__ = "0.1.0"

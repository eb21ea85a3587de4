"""The formats a trained net is exported to, side by side.

* `onnx_graph`: the whole classifier (uint8 images -> logits) as an ONNX graph,
  a folded chain (`to_onnx`) or a residual net with its shortcuts
  (`residual_to_onnx`);
* `stablehlo`: any pure `images -> logits` function as serialized StableHLO
  (`jax.export`), weights included;
* `state_dict`: a folded ImageNet DiracNet as the state dict of the authors'
  published PyTorch module.

Reading the authors' PyTorch checkpoints is import, not export:
`dirac_jax.torch_checkpoint`. The command line that writes these files from a
run is `python -m dirac_jax.export`.
"""

from dirac_jax.formats import onnx_graph, stablehlo, state_dict

__all__ = ["onnx_graph", "stablehlo", "state_dict"]

"""A folded net as an ONNX model, built with the `onnx` package's own helpers.

The folded net is a chain of Conv (grouped for MobileNet's depthwise convs),
ReLU and MaxPool, a global average pool and a linear layer (DiracNets v2
sec. 1: after training the Dirac parameterization and BN fold into the
filters), so the graph is written op by op with
`onnx.helper`, one node per `FoldedStep`. The preprocessing of the stored
images goes in front of it: uint8 NHWC input, cast, zero padding, per-channel
normalization and the NHWC-to-NCHW transpose, so a deployment feeds the images
as the dataset stores them and reads logits.

jax2onnx converts JAX functions in general, but its releases pin
orbax-checkpoint below the version this project trains with, and the chain
needs only seven ONNX op types; `onnx` itself is the smaller dependency.

Requires `pip install onnx` (and onnxruntime to run the model).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dirac_jax.fold import FoldedNet

__all__ = ["INPUT_NAME", "OPSET", "OUTPUT_NAME", "to_onnx"]

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
OPSET = 17


def _import_onnx():
    try:
        import onnx
    except ImportError as e:
        raise ImportError(
            f"the ONNX export needs the onnx package ({e}): pip install onnx onnxruntime."
        ) from e
    return onnx


def to_onnx(
    folded: FoldedNet,
    *,
    input_shape: Sequence[int],
    pad: Sequence[Sequence[int]] = ((0, 0), (0, 0)),
    mean: Sequence[float],
    std: Sequence[float],
    name: str = "dirac_jax",
):
    """The whole classifier `uint8 images -> logits` of a folded net, as an ONNX model.

    Computes `apply_folded(folded, (pad(images) / 255 - mean) / std)`, the
    float32 computation of `dirac_jax.fold.apply_folded`, with a symbolic batch.

    Args:
      folded: a float32 `FoldedNet` (`dirac_jax.fold.fold`).
      input_shape: `(H, W, C)` of the stored uint8 images.
      pad: `((top, bottom), (left, right))` zero padding of the uint8 images
        (as `data.prepare`), e.g. `((2, 2), (2, 2))` for 28x28 to 32x32.
      mean, std: per-channel statistics on the [0, 1] scale (`data.MEAN_STD`).
      name: the graph name.

    Returns:
      An `onnx.ModelProto` (opset 17) with input `"images"` uint8
      `(batch, H, W, C)` and output `"logits"` float32 `(batch, classes)`;
      checked by `onnx.checker`.

    Raises:
      ValueError: an unknown step kind, or channel counts of `mean`/`std` that
        differ from `input_shape`'s.
      ImportError: onnx is not installed.
    """
    onnx = _import_onnx()
    from onnx import TensorProto, helper, numpy_helper

    h, w, c = (int(s) for s in input_shape)
    if len(mean) != c or len(std) != c:
        raise ValueError(
            f"to_onnx: mean {tuple(mean)} and std {tuple(std)} need one entry per channel ({c})."
        )
    nodes, inits = [], []
    counter = iter(range(1_000_000))

    def const(array, dtype=np.float32) -> str:
        tensor_name = f"c{next(counter)}"
        inits.append(numpy_helper.from_array(np.asarray(array, dtype), tensor_name))
        return tensor_name

    def node(op, inputs, **attrs) -> str:
        out = f"t{next(counter)}"
        nodes.append(helper.make_node(op, list(inputs), [out], **attrs))
        return out

    x = node("Cast", [INPUT_NAME], to=TensorProto.FLOAT)
    (top, bottom), (left, right) = pad
    if top or bottom or left or right:
        pads = [0, top, left, 0, 0, bottom, right, 0]
        x = node("Pad", [x, const(pads, np.int64), const(0.0)], mode="constant")
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    x = node("Div", [x, const(255.0)])
    x = node("Div", [node("Sub", [x, const(mean)]), const(std)])
    x = node("Transpose", [x], perm=[0, 3, 1, 2])

    for step, p in zip(folded.steps, folded.params, strict=True):
        if step.kind == "conv":
            (sh, sw), ((pt, pb), (pl, pr)), *groups = step.args
            kernel = np.asarray(p["kernel"], np.float32).transpose(3, 2, 0, 1)  # HWIO -> OIHW
            x = node(
                "Conv",
                [x, const(kernel), const(p["bias"])],
                strides=[int(sh), int(sw)],
                pads=[int(pt), int(pl), int(pb), int(pr)],
                kernel_shape=list(kernel.shape[2:]),
                group=int(groups[0]) if groups else 1,
            )
        elif step.kind == "relu":
            x = node("Relu", [x])
        elif step.kind == "ncrelu":
            # [relu(x), min(x, 0)] along channels, DiracNets v1 eq. 9.
            negative = node("Neg", [node("Relu", [node("Neg", [x])])])
            x = node("Concat", [node("Relu", [x]), negative], axis=1)
        elif step.kind == "max_pool":
            window, stride, pool_pad = (int(v) for v in step.args)
            # ONNX MaxPool ignores padded cells, as Flax's -inf padding does.
            x = node(
                "MaxPool",
                [x],
                kernel_shape=[window, window],
                strides=[stride, stride],
                pads=[pool_pad] * 4,
            )
        elif step.kind == "avg_pool":
            x = node("Flatten", [node("GlobalAveragePool", [x])], axis=1)
        elif step.kind == "dense":
            x = node("Gemm", [x, const(p["kernel"]), const(p["bias"])])
        else:
            raise ValueError(f"to_onnx: unknown folded step kind {step.kind!r}.")
    nodes.append(helper.make_node("Identity", [x], [OUTPUT_NAME]))

    classes = int(np.shape(folded.params[-1]["bias"])[0])
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["batch", h, w, c])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", classes])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="dirac_jax"
    )
    onnx.checker.check_model(model, full_check=True)
    return model

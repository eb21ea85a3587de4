"""A folded net as an ONNX graph, built with the `onnx` package's own helpers.

The folded net is a chain of Conv (grouped for MobileNet's depthwise convs),
ReLU and MaxPool, a global average pool and a linear layer (DiracNets v2
sec. 1: after training the Dirac parameterization and BN fold into the
filters), so the graph is written op by op with
`onnx.helper`, one node per `FoldedStep`. The preprocessing of the stored
images goes in front of it: uint8 NHWC input, cast, zero padding, per-channel
normalization and the NHWC-to-NCHW transpose, so a deployment feeds the images
as the dataset stores them and reads logits.

A residual WRN or ResNet (`residual_to_onnx`) keeps its shortcuts: its kernels
are folded (`fold.fold_kernels`) and the graph follows the model's blocks,
with BatchNormalization and Add nodes beside the chain's ops.

jax2onnx converts JAX functions in general, but its releases pin
orbax-checkpoint below the version this project trains with, and these nets
need only a dozen ONNX op types; `onnx` itself is the smaller dependency.

Requires `pip install 'dirac_jax[onnx]'` (onnx, and onnxruntime to run the
model); `import_onnx` imports the package or says so.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dirac_jax import fold, models
from dirac_jax.folded import FoldedNet

__all__ = [
    "IDENTITY_PREFIX",
    "INPUT_NAME",
    "JOIN_PREFIX",
    "OPSET",
    "OUTPUT_NAME",
    "identity_nodes",
    "import_onnx",
    "join_nodes",
    "residual_to_onnx",
    "to_onnx",
]

#: Name of the ONNX graph's input, the uint8 NHWC images as the dataset stores them.
INPUT_NAME = "images"
#: Name of the ONNX graph's output, the logits.
OUTPUT_NAME = "logits"
#: The ONNX opset version the graphs are written for.
OPSET = 17
# Node names of the identity path of a `"dirac_conv"` step (its Gather and Mul), and of the
# Add that joins that path to the step's conv.
#: Name prefix of the nodes of a `"dirac_conv"` step's identity path; `quantize` finds them by it.
IDENTITY_PREFIX = "dirac_identity"
#: Name prefix of the Add nodes that join a Dirac identity path to its conv.
JOIN_PREFIX = "dirac_join"


def import_onnx():
    """The `onnx` package.

    Raises:
      ImportError: onnx is not installed; the message says how to install it.
    """
    try:
        import onnx
    except ImportError as e:
        raise ImportError(
            f"the ONNX export needs the onnx package ({e}): pip install 'dirac_jax[onnx]'."
        ) from e
    return onnx


class _Builder:
    """An ONNX graph under construction, from the uint8 NHWC input to NCHW float features.

    The input side of every exported classifier: Cast, zero Pad (as
    `data.prepare`), scaling to [0, 1], per-channel normalization and the
    NHWC-to-NCHW transpose. `x` is the name of the normalized NCHW tensor.
    """

    def __init__(self, input_shape, pad, mean, std):
        self.onnx = import_onnx()
        from onnx import TensorProto, helper, numpy_helper

        self._helper, self._numpy_helper, self._tensor = helper, numpy_helper, TensorProto
        self.h, self.w, self.c = (int(v) for v in input_shape)
        if len(mean) != self.c or len(std) != self.c:
            raise ValueError(
                f"to_onnx: mean {tuple(mean)} and std {tuple(std)} need one entry per channel "
                f"({self.c})."
            )
        self.nodes, self.inits = [], []
        self._counter = iter(range(1_000_000))
        x = self.node("Cast", [INPUT_NAME], to=TensorProto.FLOAT)
        (top, bottom), (left, right) = pad
        if top or bottom or left or right:
            pads = [0, top, left, 0, 0, bottom, right, 0]
            x = self.node("Pad", [x, self.const(pads, np.int64), self.const(0.0)], mode="constant")
        mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
        x = self.node("Div", [x, self.const(255.0)])
        x = self.node("Div", [self.node("Sub", [x, self.const(mean)]), self.const(std)])
        self.x = self.node("Transpose", [x], perm=[0, 3, 1, 2])

    def const(self, array, dtype=np.float32) -> str:
        tensor_name = f"c{next(self._counter)}"
        self.inits.append(self._numpy_helper.from_array(np.asarray(array, dtype), tensor_name))
        return tensor_name

    def node(self, op, inputs, name=None, **attrs) -> str:
        index = next(self._counter)
        out, name = f"t{index}", f"{name or op}_{index}"
        self.nodes.append(self._helper.make_node(op, list(inputs), [out], name=name, **attrs))
        return out

    def conv(self, x, kernel_hwio, bias=None, strides=(1, 1), pads=((0, 0), (0, 0)), groups=1):
        kernel = np.asarray(kernel_hwio, np.float32).transpose(3, 2, 0, 1)  # HWIO -> OIHW
        inputs = [x, self.const(kernel)] + ([] if bias is None else [self.const(bias)])
        (pt, pb), (pl, pr) = pads
        return self.node(
            "Conv",
            inputs,
            strides=[int(v) for v in strides],
            pads=[int(pt), int(pl), int(pb), int(pr)],
            kernel_shape=list(kernel.shape[2:]),
            group=int(groups),
        )

    def finish(self, x, classes: int, name: str):
        helper, tensor = self._helper, self._tensor
        self.nodes.append(helper.make_node("Identity", [x], [OUTPUT_NAME]))
        graph = helper.make_graph(
            self.nodes,
            name,
            [
                helper.make_tensor_value_info(
                    INPUT_NAME, tensor.UINT8, ["batch", self.h, self.w, self.c]
                )
            ],
            [helper.make_tensor_value_info(OUTPUT_NAME, tensor.FLOAT, ["batch", classes])],
            initializer=self.inits,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="dirac_jax"
        )
        self.onnx.checker.check_model(model, full_check=True)
        return model


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
    b = _Builder(input_shape, pad, mean, std)
    node, const, x = b.node, b.const, b.x

    for step, p in zip(folded.steps, folded.params, strict=True):
        if step.kind == "conv":
            strides, pads, *groups = step.args
            x = b.conv(x, p["kernel"], p["bias"], strides, pads, groups[0] if groups else 1)
        elif step.kind == "dirac_conv":
            strides, pads, sources = step.args
            y = b.conv(x, p["kernel"], p["bias"], strides, pads)
            scale, n_in = np.asarray(p["scale"], np.float32), np.shape(p["kernel"])[2]
            x = node("Add", [y, _identity(b, x, n_in, scale, sources)], name=JOIN_PREFIX)
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
    return b.finish(x, int(np.shape(folded.params[-1]["bias"])[0]), name)


def residual_to_onnx(
    model,
    variables,
    *,
    input_shape: Sequence[int],
    pad: Sequence[Sequence[int]] = ((0, 0), (0, 0)),
    mean: Sequence[float],
    std: Sequence[float],
    name: str = "dirac_jax",
):
    """The whole classifier `uint8 images -> logits` of a WRN or ResNet, as an ONNX model.

    The net's symmetric and `I + W` kernels are folded first
    (`fold.fold_kernels`); the graph then follows the module structure of
    `models.WideResNet` (pre-activation blocks, basic or bottleneck) or
    `models.ResNet` (post-activation, max-pool stem) node by node: Conv,
    BatchNormalization with the running statistics, Relu, Add, MaxPool,
    GlobalAveragePool and Gemm, after the same uint8 input side as `to_onnx`.

    Args:
      model: a `WideResNet` or `ResNet`.
      variables: its `{"params", "batch_stats"}`.
      input_shape, pad, mean, std, name: as `to_onnx`.

    Returns:
      An `onnx.ModelProto`, as `to_onnx`'s.

    Raises:
      ValueError: another model, or variables of another model.
      ImportError: onnx is not installed.
    """
    if not isinstance(model, models.WideResNet | models.ResNet):
        raise ValueError(
            f"residual_to_onnx: expected a WideResNet or ResNet, got {type(model).__name__}; "
            "chains (DiracNet, MobileNet) go through fold() and to_onnx()."
        )
    plain, variables = fold.fold_kernels(model, variables)
    params, stats = variables["params"], variables["batch_stats"]
    b = _Builder(input_shape, pad, mean, std)

    def conv(x, path, strides=1, pad=None):
        kernel = np.asarray(_at(params, path)["w"])
        k = kernel.shape[0] if pad is None else 0
        same = ((k // 2, k // 2), (k // 2, k // 2)) if pad is None else pad
        return b.conv(x, kernel, None, (strides, strides), same)

    def bn(x, path):
        p, s = _at(params, path), _at(stats, path)
        inputs = [b.const(p["scale"]), b.const(p["bias"]), b.const(s["mean"]), b.const(s["var"])]
        return b.node("BatchNormalization", [x, *inputs], epsilon=float(models.BN_EPSILON))

    def relu(x):
        return b.node("Relu", [x])

    valid = ((0, 0), (0, 0))
    x = b.x
    if isinstance(plain, models.WideResNet):
        n, _ = plain.plan()
        x = conv(x, ("conv",))
        for g in range(3):
            for i in range(n):
                blk, stride = f"group{g}_block{i}", (2 if g and i == 0 else 1)
                o = relu(bn(x, (blk, "bn0")))
                shortcut = x
                if "shortcut" in params[blk]:
                    shortcut = conv(o, (blk, "shortcut"), stride, valid)
                if plain.block == "basic":
                    y = relu(bn(conv(o, (blk, "conv0"), stride), (blk, "bn1")))
                    y = conv(y, (blk, "conv1"))
                else:
                    y = relu(bn(conv(o, (blk, "conv0"), 1, valid), (blk, "bn1")))
                    y = relu(bn(conv(y, (blk, "conv1"), stride), (blk, "bn2")))
                    y = conv(y, (blk, "conv2"), 1, valid)
                x = b.node("Add", [y, shortcut])
        x = relu(bn(x, ("bn",)))
    else:
        kind, blocks, _ = plain.plan()
        x = relu(bn(conv(x, ("conv",), 2), ("bn",)))
        x = b.node("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
        for g, count in enumerate(blocks):
            for i in range(count):
                blk, stride = f"group{g}_block{i}", (2 if g and i == 0 else 1)
                shortcut = x
                if "shortcut" in params[blk]:
                    shortcut = bn(conv(x, (blk, "shortcut"), stride, valid), (blk, "shortcut_bn"))
                if kind == "basic":
                    y = relu(bn(conv(x, (blk, "conv0"), stride), (blk, "bn0")))
                    y = bn(conv(y, (blk, "conv1")), (blk, "bn1"))
                else:
                    y = relu(bn(conv(x, (blk, "conv0"), 1, valid), (blk, "bn0")))
                    y = relu(bn(conv(y, (blk, "conv1"), stride), (blk, "bn1")))
                    y = bn(conv(y, (blk, "conv2"), 1, valid), (blk, "bn2"))
                x = relu(b.node("Add", [y, shortcut]))
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
    fc = params["fc"]
    x = b.node("Gemm", [x, b.const(fc["kernel"]), b.const(fc["bias"])])
    return b.finish(x, int(np.shape(fc["bias"])[0]), name)


def _identity(b: _Builder, x: str, n_in: int, scale: np.ndarray, sources) -> str:
    """`fold.folded_identity` on NCHW `x`: Gather of the source channels, Mul by the scale."""
    src = np.asarray(sources, np.int64).reshape(len(sources), -1)
    name = IDENTITY_PREFIX
    total = None
    for k in range(src.shape[1]):
        column = src[:, k]
        factor = np.where(column >= 0, scale, 0.0).reshape(1, -1, 1, 1)
        picked = x
        if not (len(column) == n_in and (column == np.arange(n_in)).all()):
            indices = b.const(np.maximum(column, 0), np.int64)
            picked = b.node("Gather", [x, indices], name=name, axis=1)
        term = b.node("Mul", [picked, b.const(factor)], name=name)
        total = term if total is None else b.node("Add", [total, term], name=name)
    return total


def identity_nodes(model) -> list[str]:
    """Names of the nodes of `model`'s Dirac identity paths (`IDENTITY_PREFIX`)."""
    return [n.name for n in model.graph.node if n.name.startswith(IDENTITY_PREFIX)]


def join_nodes(model) -> list[str]:
    """Names of the Adds that join each Dirac identity path to its conv (`JOIN_PREFIX`)."""
    return [n.name for n in model.graph.node if n.name.startswith(JOIN_PREFIX)]


def _at(tree, path):
    for key in path:
        tree = tree[key]
    return tree

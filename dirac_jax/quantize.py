"""INT8 deployment of an exported classifier, with onnxruntime's static quantization.

A folded Dirac kernel is `s (a I + b W_norm)` (DiracNets eq. 5, `s` the BN
scale). Its centre diagonal tap carries `s a`, of order one; every other tap
`s b W_norm`, of order `0.1 / sqrt(fan_in)`. Symmetric int8 gives each output
filter (per channel) or each tensor (per tensor) one step, `max |w| / 127`, and
the centre tap sets it, so in a wide layer most of the learned `W` taps round
to zero (`zero_tap_shares`). A plain net of the same shape has no such outlier.

The deploy path here keeps the identity apart (`fold.fold(...,
identity_apart=True)`): each Dirac block is an INT8 conv of `s b W_norm`, which
gets a step of its own, plus the exact per-channel scaled input `s a x`, plus
the bias. By default (`stream="float"`) the identity and the Add that joins it
to the conv stay in float32 and read the block input before it is quantized,
so the stream of activations that runs from block to block through the
identities is never rounded: only each conv's input and output are, as in a
plain net. Everything else (convs, the classifier, pools) is quantized by
onnxruntime's `quantize_static` in QDQ format: int8 symmetric weights, int8
activations with percentile ranges calibrated on training images. The choices
(summed kernel or identity apart; rounded or float stream; the calibration)
were made by measurement (RESULTS.md; `python -m benchmarks int8` from a checkout).

No int8 kernels are written here: onnxruntime computes, calibrates and inserts
the QuantizeLinear/DequantizeLinear pairs.
"""

from __future__ import annotations

import dataclasses
import pathlib
import tempfile
from collections.abc import Iterator

import numpy as np

from dirac_jax.folded import FoldedNet
from dirac_jax.formats import onnx_graph

__all__ = [
    "ACTIVATIONS",
    "CALIBRATIONS",
    "STREAMS",
    "Int8Options",
    "agreement",
    "logit_error",
    "quantize_onnx",
    "zero_tap_shares",
]

#: The activation range rules `Int8Options.calibration` may name (`export --calibration`).
CALIBRATIONS = ("minmax", "entropy", "percentile")
#: The integer types `Int8Options.activations` may name for INT8 activations.
ACTIVATIONS = ("int8", "uint8")
#: How the identity stream between blocks is kept (`Int8Options.stream`), float32 or int8.
STREAMS = ("float", "int8")


@dataclasses.dataclass(frozen=True)
class Int8Options:
    """How an exported classifier is quantized to INT8 (`quantize_onnx`), checked when built.

    `dirac_jax.export.export_workdir(..., quantize=Int8Options())` writes the
    INT8 model; the defaults are the ones RESULTS.md chose for DiracNets.

    Attributes:
      calibration_images: training images that calibrate the activations' ranges.
      per_channel: one int8 weight scale per output channel (else one per tensor).
      calibration: the activation range rule, one of `CALIBRATIONS`.
      activations: the activations' integer type, one of `ACTIVATIONS`.
      stream: a DiracNet's block outputs, which its identities carry from
        block to block: kept float32 or rounded to int8; one of `STREAMS`.
      reduce_range: 7-bit weights, for a deploy CPU without VNNI.

    Examples:
      >>> Int8Options(calibration="entropy").stream
      'float'
      >>> Int8Options(calibration_images=0)
      Traceback (most recent call last):
      ValueError: calibration_images must be >= 1, got 0.
    """

    calibration_images: int = 512
    per_channel: bool = True
    calibration: str = "percentile"
    activations: str = "int8"
    stream: str = "float"
    reduce_range: bool = False

    def __post_init__(self):
        if not (isinstance(self.calibration_images, int) and self.calibration_images >= 1):
            raise ValueError(f"calibration_images must be >= 1, got {self.calibration_images!r}.")
        for name, allowed in (
            ("calibration", CALIBRATIONS),
            ("activations", ACTIVATIONS),
            ("stream", STREAMS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}.")

    def quantize_kwargs(self) -> dict:
        """The keyword arguments of `quantize_onnx` these options set."""
        kwargs = dataclasses.asdict(self)
        del kwargs["calibration_images"]
        return kwargs


def _import_quantization():
    try:
        from onnxruntime import quantization
    except ImportError as e:
        raise ImportError(
            f"INT8 export needs onnxruntime's quantization tools ({e}): pip install onnxruntime."
        ) from e
    return quantization


def _batches(images: np.ndarray, batch_size: int) -> Iterator[dict]:
    for start in range(0, len(images), batch_size):
        yield {onnx_graph.INPUT_NAME: images[start : start + batch_size]}


def quantize_onnx(
    model,
    out: str | pathlib.Path,
    calibration_images: np.ndarray,
    *,
    per_channel: bool = True,
    calibration: str = "percentile",
    activations: str = "int8",
    reduce_range: bool = False,
    stream: str = "float",
    batch_size: int = 64,
) -> pathlib.Path:
    """Writes the INT8 (QDQ) version of an exported float32 classifier to `out`.

    onnxruntime's `quantize_static`: weights int8 symmetric (per output channel,
    or one scale per tensor), activations int8 (or uint8) with ranges
    calibrated by running `calibration_images` through the float model. The
    uint8 image input and the float32 logits stay as they are.

    The defaults are the ones RESULTS.md chose for DiracNets: the percentile
    range, since the identity path carries a few large activations from block
    to block, and int8 activations, because onnxruntime's x86 kernels without
    VNNI (AVX2 `vpmaddubsw`) sum pairs of u8 x s8 products in 16 bits, which
    saturate where large weights meet large activations. `reduce_range=True`
    (7-bit weights) cannot saturate there but costs precision elsewhere
    (RESULTS.md, "Residual nets", has the measurements).

    Args:
      model: an `onnx.ModelProto` from `onnx_graph.to_onnx` (or
        `residual_to_onnx`).
      out: the file to write.
      calibration_images: uint8 `(N, H, W, C)` images at the model's input size,
        e.g. drawn from the training split.
      per_channel: one weight scale per output channel (else per tensor).
      calibration: one of `CALIBRATIONS`: the activation range is the min and
        max seen, the one that minimizes the KL divergence of the quantized
        histogram (`entropy`), or the 0.001th to 99.999th percentile.
      activations: one of `ACTIVATIONS`, the activations' integer type.
      reduce_range: 7-bit weights, for x86 CPUs without VNNI (either activation type).
      stream: one of `STREAMS`, for nets folded with `identity_apart=True`
        (`onnx_graph.IDENTITY_PREFIX` and `JOIN_PREFIX` nodes; other nets have
        none and are quantized the same either way). `float`: the identity
        (Gather, Mul) and its join (Add, and a ReLU or pool after it) stay
        float32 and read the unrounded block input, so `s a x` is added
        exactly; only the convs' inputs and outputs are rounded. `int8`: every
        block output is rounded, like any activation, and the identity's Mul
        runs in float32 between a DequantizeLinear and a QuantizeLinear.
      batch_size: images per calibration batch.

    Returns:
      `out` (a path; local, or in a bucket with an `epath.Path`).

    Raises:
      ValueError: an unknown calibration, or no calibration images.
      ImportError: onnxruntime is not installed.
    """
    if calibration not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {calibration!r}; expected one of {CALIBRATIONS}.")
    if activations not in ACTIVATIONS:
        raise ValueError(f"unknown activations {activations!r}; expected one of {ACTIVATIONS}.")
    if stream not in STREAMS:
        raise ValueError(f"unknown stream {stream!r}; expected one of {STREAMS}.")
    images = np.asarray(calibration_images)
    if images.ndim != 4 or len(images) == 0 or images.dtype != np.uint8:
        raise ValueError(
            "quantize_onnx: calibration_images must be a non-empty uint8 (N, H, W, C) array, "
            f"got {images.dtype} {images.shape}."
        )
    q = _import_quantization()

    class Reader(q.CalibrationDataReader):
        def __init__(self):
            self._it = _batches(images, batch_size)

        def get_next(self):
            return next(self._it, None)

    method = {
        "minmax": q.CalibrationMethod.MinMax,
        "entropy": q.CalibrationMethod.Entropy,
        "percentile": q.CalibrationMethod.Percentile,
    }[calibration]
    out = out if hasattr(out, "write_bytes") else pathlib.Path(out)  # a local or bucket path
    excluded = onnx_graph.identity_nodes(model)
    relu_fed: set[str] = set()
    if stream == "float":
        excluded += onnx_graph.join_nodes(model)
        relu_fed = _relu_fed_identities(model)
    with tempfile.TemporaryDirectory() as tmp:
        # quantize_static writes its shape-inferred copy and calibration model next to the input.
        src, dst = pathlib.Path(tmp) / "float.onnx", pathlib.Path(tmp) / "int8.onnx"
        src.write_bytes(model.SerializeToString())
        q.quantize_static(
            str(src),
            str(dst),
            Reader(),
            quant_format=q.QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=q.QuantType.QInt8 if activations == "int8" else q.QuantType.QUInt8,
            reduce_range=reduce_range,
            weight_type=q.QuantType.QInt8,
            calibrate_method=method,
            nodes_to_exclude=excluded,
            calibration_providers=["CPUExecutionProvider"],
        )
        quantized = onnx_graph.import_onnx().load(str(dst))
    if stream == "float":
        _read_unrounded(quantized, relu_fed)
    _compact(quantized)
    out.write_bytes(quantized.SerializeToString())
    return out


def _producers(model) -> dict:
    """Each tensor name of `model`'s graph -> the node that writes it."""
    return {o: n for n in model.graph.node for o in n.output}


def _relu_fed_identities(model) -> set[str]:
    """The identity nodes whose input is a ReLU's output, in the float graph."""
    producers = _producers(model)
    return {
        n.name
        for n in model.graph.node
        if n.name.startswith(onnx_graph.IDENTITY_PREFIX)
        and n.input[0] in producers
        and producers[n.input[0]].op_type == "Relu"
    }


def _read_unrounded(model, relu_fed: set[str]) -> None:
    """Points each identity node that reads a QuantizeLinear-DequantizeLinear pair at its input.

    The quantizer gives a tensor one pair and hands its DequantizeLinear to every
    reader, excluded nodes too, so the identity would add the rounded `x`.
    Where the quantizer removed the ReLU before the pair (its asymmetric range
    clips at zero instead), the float tensor is the conv's output before the
    ReLU; the identity then gets a float ReLU of its own.
    """
    helper = onnx_graph.import_onnx().helper
    producers = _producers(model)
    relus: dict[str, str] = {}  # float source -> its ReLU's output, one per source
    for node in list(model.graph.node):
        if not node.name.startswith(onnx_graph.IDENTITY_PREFIX):
            continue
        dq = producers.get(node.input[0])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = producers.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue
        source = q.input[0]
        if node.name in relu_fed and producers[source].op_type != "Relu":
            if source not in relus:
                relu = helper.make_node("Relu", [source], [f"{source}_float_relu"])
                model.graph.node.insert(list(model.graph.node).index(node), relu)
                relus[source] = relu.output[0]
            source = relus[source]
        node.input[0] = source


def _compact(model) -> None:
    """Drops what a small INT8 file need not carry: shape annotations, long names.

    The quantizer names every tensor it adds after its source
    (`..._DequantizeLinear_Output`) and keeps the inferred shapes; in a net of
    a few hundred thousand weights that is a tenth of the file. Tensors get
    short names (the graph's input and output keep theirs), nodes none.
    """
    graph = model.graph
    del graph.value_info[:]
    keep = {v.name for v in graph.input} | {v.name for v in graph.output} | {""}
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if name in keep:
            return name
        return names.setdefault(name, f"{len(names):x}")

    for tensor in graph.initializer:
        tensor.name = short(tensor.name)
    for node in graph.node:
        node.name = ""
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]


def zero_tap_shares(folded: FoldedNet, *, per_channel: bool = True) -> list[dict]:
    """Per Dirac block conv, the share of its `W` taps that symmetric int8 rounds to zero.

    `folded` must come from `fold.fold(..., identity_apart=True)`, so each
    `"dirac_conv"` step holds the identity scale `s a` and the rest
    `s b W_norm` apart. A tap of the rest rounds to zero when it is below half
    a step, `max |w| / 254`, where the max runs over the output filter
    (`per_channel`) or the whole kernel, of:

    * `naive`: the summed kernel `s (a I + b W_norm)`, as a plain export
      quantizes it;
    * `apart`: the rest alone, as the identity-apart export quantizes it.

    Returns:
      One `{"layer", "shape", "naive", "apart", "centre_ratio"}` per Dirac
      conv; `centre_ratio` is the median over filters of `|s a|` over the
      largest `|s b W_norm|` tap.
    """
    rows = []
    for index, (step, p) in enumerate(zip(folded.steps, folded.params, strict=True)):
        if step.kind != "dirac_conv":
            continue
        rest = np.asarray(p["kernel"], np.float64)
        scale = np.asarray(p["scale"], np.float64)
        sources = step.args[2]
        total = rest.copy()
        k_h, k_w = rest.shape[0] // 2, rest.shape[1] // 2
        for j, row in enumerate(sources):
            for i in row:
                if i >= 0:
                    total[k_h, k_w, i, j] += scale[j]
        rest_max = np.abs(rest).max(axis=(0, 1, 2))
        ratio = np.abs(scale) / np.maximum(rest_max, 1e-30)
        rows.append(
            {
                "layer": index,
                "shape": tuple(int(v) for v in rest.shape),
                "naive": _rounded_to_zero(rest, total, per_channel),
                "apart": _rounded_to_zero(rest, rest, per_channel),
                "centre_ratio": float(np.median(ratio)),
            }
        )
    return rows


def _rounded_to_zero(taps: np.ndarray, kernel: np.ndarray, per_channel: bool) -> float:
    """The share of `taps` below half the int8 step of `kernel` (symmetric, max / 127)."""
    axes = (0, 1, 2) if per_channel else (0, 1, 2, 3)
    half_step = np.abs(kernel).max(axis=axes, keepdims=True) / 254.0
    return float(np.mean(np.abs(taps) < half_step))


def agreement(logits: np.ndarray, reference: np.ndarray) -> float:
    """The share of examples whose top-1 class is the reference's."""
    return float(np.mean(np.argmax(logits, -1) == np.argmax(reference, -1)))


def logit_error(logits: np.ndarray, reference: np.ndarray) -> float:
    """Relative logit error `||logits - reference||_F / ||reference||_F`."""
    reference = np.asarray(reference, np.float64)
    return float(np.linalg.norm(logits - reference) / np.linalg.norm(reference))

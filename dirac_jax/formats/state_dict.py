"""The published folded DiracNet's PyTorch state dict: its layout, and a folded net written to it.

The reference code (szagoruyko/diracnets on GitHub, master) publishes ImageNet
DiracNet-18 and -34 as a folded `nn.Module`: the chain `conv7x7/2 -> max-pool
3/2 -> [ReLU -> conv3x3] x blocks (2x2 max-pool between groups) -> ReLU ->
average pool -> linear` (DiracNets arXiv:1706.00388 v2 sec. 1: the Dirac
parameterization and BN folded into the convs), its `state_dict` OIHW tensors
keyed `features.conv.weight`, `features.group{g}.block{i}.conv.weight`, ...,
`fc.weight`.

This module holds that layout (`published_table`, the chain's step arguments,
`imagenet_depth`) and `export_reference_folded`, which writes a
`dirac_jax.folded.FoldedNet` as that state dict. Reading one back is checkpoint
import: `dirac_jax.torch_checkpoint.load_reference_folded`.

Example:
  >>> from dirac_jax.formats import state_dict
  >>> table = state_dict.published_table((2, 2), (8, 16), in_channels=3, num_classes=10)
  >>> table["features.conv.weight"], table["features.group1.block0.conv.weight"]
  ((8, 3, 7, 7), (16, 8, 3, 3))
  >>> state_dict.imagenet_depth((6, 8, 12, 6), "checkpoint")
  34
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dirac_jax.folded import BLOCK_CONV_ARGS, FoldedNet, FoldedStep
from dirac_jax.models import IMAGENET_BLOCKS

__all__ = [
    "GROUP_POOL",
    "STEM_CONV_ARGS",
    "STEM_POOL",
    "export_reference_folded",
    "imagenet_depth",
    "published_table",
]

# `FoldedStep` args of the published chain (the `dirac_jax.folded` contract): the
# stem conv's (strides, padding), and the (window, stride, padding) of its pools.
#: The `(strides, padding)` of the published chain's stem conv (a `FoldedStep` arg).
STEM_CONV_ARGS = ((2, 2), ((3, 3), (3, 3)))
#: The `(window, stride, padding)` of the max pool after the published chain's stem.
STEM_POOL = (3, 2, 1)
#: The `(window, stride, padding)` of the max pool between the published chain's groups.
GROUP_POOL = (2, 2, 0)


def imagenet_depth(counts: tuple[int, ...], what: str) -> int:
    """The ImageNet DiracNet depth (18 or 34) of `counts` blocks per group.

    Raises:
      ValueError: the counts are those of no depth; the message starts with `what`.
    """
    by_counts = {tuple(2 * b for b in v): d for d, v in IMAGENET_BLOCKS.items()}
    if counts not in by_counts:
        raise ValueError(
            f"{what}: ImageNet block counts per group {counts} match no DiracNet depth; expected "
            f"one of {by_counts} (block counts: depth)."
        )
    return by_counts[counts]


def published_table(
    counts: Sequence[int], widths: Sequence[int], in_channels: int, num_classes: int
) -> dict[str, tuple[int, ...]]:
    """The published folded `DiracNet` state_dict: key -> OIHW / (out, in) shape, in its order.

    Args:
      counts: blocks per group (`(4, 4, 4, 4)` for depth 18).
      widths: output channels per group (`(64, 128, 256, 512)` published).
      in_channels: image channels.
      num_classes: outputs of `fc`.
    """
    table = {
        "features.conv.weight": (widths[0], in_channels, 7, 7),
        "features.conv.bias": (widths[0],),
    }
    ni = widths[0]
    for g, (no, count) in enumerate(zip(widths, counts, strict=True)):
        for i in range(count):
            table[f"features.group{g}.block{i}.conv.weight"] = (no, ni if i == 0 else no, 3, 3)
            table[f"features.group{g}.block{i}.conv.bias"] = (no,)
        ni = no
    table["fc.weight"] = (num_classes, ni)
    table["fc.bias"] = (num_classes,)
    return table


def _normalized_args(step: FoldedStep) -> tuple:
    """Step args as nested tuples of ints, so lists and numpy ints compare equal."""

    def norm(a):
        return tuple(norm(b) for b in a) if isinstance(a, Sequence) else int(a)

    return norm(step.args)


def _parse_published_chain(folded: FoldedNet) -> tuple[int, list[list[int]], int]:
    """Checks `folded` is the published module's chain; returns (stem, block step indices, fc)."""
    steps = list(folded.steps)
    pos = 0

    def fail(why):
        kinds = [s.kind for s in steps]
        return ValueError(
            f"export_reference_folded: {why} (at step {pos}). The published folded DiracNet is "
            "conv7x7/2, max_pool(3, 2, 1), [relu, conv3x3] x blocks with max_pool(2, 2, 0) "
            "between 4 groups, relu, avg_pool, dense: fold a v2 or plain DiracNet with the "
            f"ImageNet stem. Got kinds {kinds}."
        )

    def expect(kind, args=None):
        nonlocal pos
        if pos >= len(steps) or steps[pos].kind != kind:
            got = steps[pos] if pos < len(steps) else "the end"
            raise fail(f"expected a {kind!r} step, got {got}")
        if args is not None and _normalized_args(steps[pos]) != args:
            raise fail(f"expected {kind} args {args}, got {steps[pos].args}")
        pos += 1
        return pos - 1

    if len(folded.params) != len(steps):
        raise fail(f"{len(folded.params)} param entries for {len(steps)} steps")
    stem = expect("conv", STEM_CONV_ARGS)
    expect("max_pool", STEM_POOL)
    groups: list[list[int]] = []
    for g in range(4):
        if g:
            expect("max_pool", GROUP_POOL)
        blocks = []
        while pos + 1 < len(steps) and steps[pos].kind == "relu" and steps[pos + 1].kind == "conv":
            expect("relu")
            blocks.append(expect("conv", BLOCK_CONV_ARGS))
        if not blocks:
            raise fail(f"group {g} has no [relu, conv] blocks")
        groups.append(blocks)
    expect("relu")
    expect("avg_pool")
    fc = expect("dense")
    if pos != len(steps):
        raise fail(f"{len(steps) - pos} steps after the dense layer")
    return stem, groups, fc


def export_reference_folded(folded: FoldedNet) -> dict[str, np.ndarray]:
    """The published folded `DiracNet` state_dict of an ImageNet-stem folded net.

    The inverse of `dirac_jax.torch_checkpoint.load_reference_folded`: HWIO
    kernels become OIHW float32, the dense kernel `(in, out)` becomes
    `fc.weight` `(out, in)`, keys in the module's order, so
    `DiracNet(depth).load_state_dict({k: torch.from_numpy(v) for k, v in
    sd.items()})` loads it (for widths 64..512, the published ones).

    Args:
      folded: `fold(model, variables)` of a v2 or plain `DiracNet` with the
        ImageNet stem, depth 18 or 34, or `load_reference_folded`'s result.

    Returns:
      `{key: float32 numpy array}` with exactly the published keys.

    Raises:
      ValueError: `folded` is not that chain (CIFAR stem, v1 NCReLU blocks, other
        step args or block counts), or a parameter has a shape that breaks it.
    """
    stem, groups, fc = _parse_published_chain(folded)
    imagenet_depth(tuple(len(b) for b in groups), "export_reference_folded")
    p = folded.params
    sd: dict[str, np.ndarray] = {}

    def conv(prefix, index):
        kernel = np.asarray(p[index]["kernel"], np.float32)
        sd[prefix + ".weight"] = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))
        sd[prefix + ".bias"] = np.array(p[index]["bias"], np.float32)

    conv("features.conv", stem)
    for g, blocks in enumerate(groups):
        for i, index in enumerate(blocks):
            conv(f"features.group{g}.block{i}.conv", index)
    sd["fc.weight"] = np.ascontiguousarray(np.asarray(p[fc]["kernel"], np.float32).T)
    sd["fc.bias"] = np.array(p[fc]["bias"], np.float32)
    widths = [sd[f"features.group{g}.block0.conv.weight"].shape[0] for g in range(4)]
    table = published_table(
        tuple(len(b) for b in groups),
        widths,
        sd["features.conv.weight"].shape[1],
        sd["fc.bias"].shape[0],
    )
    bad = [f"{k}: {sd[k].shape} != {shape}" for k, shape in table.items() if sd[k].shape != shape]
    if bad:
        raise ValueError(
            "export_reference_folded: the parameters do not form a chain, shape(s) "
            + "; ".join(bad)
        )
    return sd

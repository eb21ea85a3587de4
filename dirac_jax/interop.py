"""Reference PyTorch checkpoints in and out, and portable StableHLO export.

The reference code (szagoruyko/diracnets on GitHub, v2 on master, v1 on branch v1)
publishes two kinds of checkpoint, both OIHW tensors keyed by name:

* unfolded: the functional net's flat dict (`conv`, `bn.weight`, ...,
  `group0.block0.conv`, `.alpha`, `.beta`, `.bn.running_mean`, ...,
  `fc.weight`, and the deltas `eye{o}_{i}_3_3`), or the export notebook's
  `{"params": ..., "stats": ...}` split of the same entries. `load_reference`
  turns it into a `DiracNet` and its Flax variables.
* folded: the `state_dict` of the published `DiracNet` `nn.Module`, a chain of
  conv-ReLU pairs (DiracNets sec. 1/2). `load_reference_folded` and
  `export_reference_folded` convert it to and from a `dirac_jax.fold.FoldedNet`.

`export_stablehlo` serializes a folded net, weights included, with `jax.export`.

PyTorch is optional: it is imported only to read a checkpoint file. Tensor
values may be numpy arrays or torch tensors.

Example:
  >>> import numpy as np
  >>> from dirac_jax import interop
  >>> from dirac_jax.fold import apply_folded
  >>> rng = np.random.default_rng(0)
  >>> sd = {"features.conv.weight": rng.normal(size=(64, 3, 7, 7)).astype(np.float32),
  ...       "features.conv.bias": np.zeros(64, np.float32)}
  >>> widths, counts = (64, 128, 256, 512), (4, 4, 4, 4)
  >>> ni = 64
  >>> for g, (no, count) in enumerate(zip(widths, counts)):
  ...     for i in range(count):
  ...         w = rng.normal(size=(no, ni if i == 0 else no, 3, 3)) * 0.05
  ...         sd[f"features.group{g}.block{i}.conv.weight"] = w.astype(np.float32)
  ...         sd[f"features.group{g}.block{i}.conv.bias"] = np.zeros(no, np.float32)
  ...     ni = no
  >>> sd["fc.weight"] = np.zeros((1000, 512), np.float32)
  >>> sd["fc.bias"] = np.arange(1000, dtype=np.float32)
  >>> folded = interop.load_reference_folded(sd)
  >>> [s.kind for s in folded.steps][:4]
  ['conv', 'max_pool', 'relu', 'conv']
  >>> back = interop.export_reference_folded(folded)
  >>> list(back) == list(sd) and all(np.array_equal(back[k], sd[k]) for k in sd)
  True
  >>> apply_folded(folded, np.zeros((1, 64, 64, 3), np.float32))[0, :3].tolist()
  [0.0, 1.0, 2.0]
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dirac_jax import models, param
from dirac_jax.fold import BLOCK_CONV_ARGS, FoldedNet, FoldedStep, apply_folded
from dirac_jax.models import GROUP_BASES, IMAGENET_BLOCKS

__all__ = [
    "export_reference_folded",
    "export_stablehlo",
    "load_reference",
    "load_reference_folded",
    "load_stablehlo",
]

_TORCH_HINT = "install PyTorch with `pip install 'dirac_jax[torch]'`"
_STEM_KERNEL = {3: "cifar", 7: "imagenet"}
# Any entry of a block counts it, so a block missing only its conv is reported as such.
_BLOCK_KEY = re.compile(r"group(\d+)\.block(\d+)\..+")
_FOLDED_BLOCK_KEY = re.compile(r"features\.group(\d+)\.block(\d+)\..+")
_EYE = re.compile(r"eye(\d+(?:_\d+)*)")
_BN_ENTRIES = (
    ("weight", "params", "scale"),
    ("bias", "params", "bias"),
    ("running_mean", "batch_stats", "mean"),
    ("running_var", "batch_stats", "var"),
)

# Folded-chain steps of the published module (the fold.py contract).
_STEM_CONV_ARGS = ((2, 2), ((3, 3), (3, 3)))
_STEM_POOL = (3, 2, 1)
_GROUP_POOL = (2, 2, 0)


# ------------------------------------------------------------------ reading


def _to_numpy(value: Any) -> np.ndarray:
    """A numpy array of a numpy array or torch tensor (bfloat16 tensors via float32)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        try:
            return np.asarray(value)
        except TypeError:  # numpy has no bfloat16.
            return np.asarray(value.float())
    return np.asarray(value)


def _torch_load(path) -> Any:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading the PyTorch checkpoint {path!r} needs torch: {_TORCH_HINT}."
        ) from e
    return torch.load(path, map_location="cpu", weights_only=True)


def _read(checkpoint) -> Mapping:
    if isinstance(checkpoint, str | os.PathLike):
        checkpoint = _torch_load(checkpoint)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(
            f"a checkpoint must be a path or a mapping of names to tensors, got "
            f"{type(checkpoint).__name__}."
        )
    return checkpoint


def _flat_entries(checkpoint) -> dict[str, np.ndarray]:
    """One flat `{name: array}` dict from either reference layout."""
    checkpoint = _read(checkpoint)
    if isinstance(checkpoint.get("params"), Mapping):
        # The export notebook's layout; other top-level entries (epoch, optimizer) are metadata.
        params, stats = checkpoint["params"], checkpoint.get("stats") or {}
        if not isinstance(stats, Mapping):
            raise ValueError(f"checkpoint['stats'] must be a mapping, got {type(stats).__name__}.")
        both = sorted(set(params) & set(stats))
        if both:
            raise ValueError(f"checkpoint keys {both} are in both 'params' and 'stats'.")
        checkpoint = {**params, **stats}
    return {str(k): _to_numpy(v) for k, v in checkpoint.items()}


# ------------------------------------------------- unfolded reference -> DiracNet


def _block_counts(keys, pattern: re.Pattern, what: str) -> tuple[int, ...]:
    """Blocks per group, from the highest block index among each group's keys."""
    last: dict[int, int] = {}
    for k in keys:
        m = pattern.fullmatch(k)
        if m:
            g, i = int(m.group(1)), int(m.group(2))
            last[g] = max(last.get(g, -1), i)
    if sorted(last) != list(range(len(last))) or not last:
        raise ValueError(
            f"{what}: block convs are found for groups {sorted(last)}; expected groups "
            "0, 1, 2 (CIFAR) or 0, 1, 2, 3 (ImageNet)."
        )
    return tuple(last[g] + 1 for g in range(len(last)))


def _first_block_conv(flat, g: int, count: int) -> np.ndarray:
    keys = [f"group{g}.block{i}.conv" for i in range(count)]
    present = [flat[k] for k in keys if k in flat]
    if not present:
        raise ValueError(f"reference checkpoint: missing key(s) {keys}.")
    return present[0]


def _infer_width(stem: str, channels: Sequence[int]) -> float:
    """The smallest width `k` with `int(base * k) == channels` for every group.

    `int(base * k) >= c` needs `k >= c / base`, so the largest ratio is the only
    candidate; the bases are powers of two, so the ratios are exact floats.
    """
    bases = GROUP_BASES[stem]
    width = max(c / b for c, b in zip(channels, bases, strict=True))
    if [int(b * width) for b in bases] != list(channels):
        raise ValueError(
            f"the group widths {list(channels)} are not int(k * {list(bases)}) for any width k; "
            "this is not a reference DiracNet checkpoint."
        )
    return width


def _imagenet_depth(counts: tuple[int, ...], what: str) -> int:
    by_counts = {tuple(2 * b for b in v): d for d, v in IMAGENET_BLOCKS.items()}
    if counts not in by_counts:
        raise ValueError(
            f"{what}: ImageNet block counts per group {counts} match no DiracNet depth; expected "
            f"one of {by_counts} (block counts: depth)."
        )
    return by_counts[counts]


def _infer_config(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """DiracNet constructor arguments read from the tensor shapes of a reference checkpoint."""
    missing = [k for k in ("conv", "fc.weight") if k not in flat]
    if missing:
        raise ValueError(f"reference checkpoint: missing key(s) {missing}; found {sorted(flat)}.")
    stem_w = flat["conv"]
    if (
        stem_w.ndim != 4
        or stem_w.shape[2] != stem_w.shape[3]
        or stem_w.shape[2] not in _STEM_KERNEL
    ):
        raise ValueError(
            f"reference checkpoint: 'conv' has shape {stem_w.shape}; expected (out, in, 3, 3) "
            "(CIFAR stem) or (out, in, 7, 7) (ImageNet stem)."
        )
    stem = _STEM_KERNEL[stem_w.shape[2]]
    counts = _block_counts(flat, _BLOCK_KEY, "reference checkpoint")
    num_groups = len(GROUP_BASES[stem])
    if len(counts) != num_groups:
        raise ValueError(
            f"reference checkpoint: a {stem} stem ('conv' {stem_w.shape}) needs {num_groups} "
            f"groups, found {len(counts)} (block counts {counts})."
        )
    if stem == "cifar":
        if len(set(counts)) != 1 or counts[0] % 2:
            raise ValueError(
                f"reference checkpoint: CIFAR groups must have the same even number 2n of "
                f"blocks, found {counts}."
            )
        depth = 3 * counts[0] + 4  # 6n + 4
    else:
        depth = _imagenet_depth(counts, "reference checkpoint")
    c0 = stem_w.shape[0]
    first = [_first_block_conv(flat, g, n) for g, n in enumerate(counts)]
    width = _infer_width(stem, [w.shape[0] for w in first])
    if int(GROUP_BASES[stem][0] * width) != c0:
        raise ValueError(
            f"reference checkpoint: the stem has {c0} channels but group0 has "
            f"{first[0].shape[0]}; they must be equal."
        )
    # NCReLU doubles a v1 block's input channels (DiracNets v1 eq. 9).
    variant = "v1" if first[0].ndim == 4 and first[0].shape[1] == 2 * c0 else "v2"
    return {
        "depth": depth,
        "width": width,
        "num_classes": int(flat["fc.weight"].shape[0]),
        "stem": stem,
        "variant": variant,
    }


def _reference_table(model, in_channels: int) -> dict[str, tuple[tuple[int, ...], tuple, Callable]]:
    """Every reference key of `model`: (its OIHW shape, its path in the variables, converter)."""
    oihw_to_hwio = lambda a: a.transpose(2, 3, 1, 0)
    same = lambda a: a
    table = {}
    channels = in_channels  # the input channels of the next layer.

    def bn(prefix, path, c):
        for ref, collection, name in _BN_ENTRIES:
            table[f"{prefix}.{ref}"] = ((c,), (collection, *path, name), same)

    for step in model.plan():
        if step.kind == "conv":
            features, k, _, _ = step.args
            table[step.name] = (
                (features, channels, k, k),
                ("params", step.name, "w"),
                oihw_to_hwio,
            )
            channels = features
        elif step.kind == "bn":
            bn(step.name, (step.name,), channels)
        elif step.kind == "group":
            act, ni, no, count = step.args
            per_channel = model.variant == "v2"
            scalar = (no,) if per_channel else (1,)
            to_a = same if per_channel else lambda a: a.reshape(())
            for i in range(count):
                base, path = f"{step.name}.block{i}", (step.name, f"block{i}")
                cin = (2 if act == "ncrelu" else 1) * (ni if i == 0 else no)
                table[f"{base}.conv"] = (
                    (no, cin, 3, 3),
                    ("params", *path, "conv", "w"),
                    oihw_to_hwio,
                )
                table[f"{base}.alpha"] = (scalar, ("params", *path, "conv", "a"), to_a)
                table[f"{base}.beta"] = (scalar, ("params", *path, "conv", "b"), to_a)
                bn(f"{base}.bn", (*path, "bn"), no)
            channels = no
        elif step.kind == "dense":
            table["fc.weight"] = (
                (step.args[0], channels),
                ("params", "fc", "kernel"),
                lambda a: a.T,
            )
            table["fc.bias"] = ((step.args[0],), ("params", "fc", "bias"), same)
    return table


def _eye_errors(flat, table, variant: str) -> list[str]:
    """Checks every `eye*` entry: a delta the reference would build for one of the block convs."""
    block_shapes = {shape for key, (shape, _, _) in table.items() if key.endswith(".conv")}
    mode = "repeat" if variant == "v1" else "truncate"
    errors = []
    for key, value in flat.items():
        m = _EYE.fullmatch(key)
        if not m:
            continue
        shape = tuple(int(s) for s in m.group(1).split("_"))
        if shape not in block_shapes or value.shape != shape:
            errors.append(
                f"{key!r} (shape {value.shape}) is no delta of a block conv; block conv shapes "
                f"are {sorted(block_shapes)}"
            )
            continue
        no, ni, kh, kw = shape
        expected = np.asarray(param.dirac_delta((kh, kw, ni, no), mode=mode)).transpose(3, 2, 0, 1)
        if not np.array_equal(value, expected):
            errors.append(
                f"{key!r} is not the {variant} Dirac delta (mode={mode!r}) of its shape; the "
                "reference would compute a different net than DiracNets eq. 5"
            )
    return errors


def _set(tree: dict, path: tuple, value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def load_reference(checkpoint) -> tuple[models.DiracNet, dict]:
    """Loads a reference (szagoruyko/diracnets) unfolded checkpoint as a `DiracNet`.

    Depth, width, stem, number of classes and variant are read from the tensor
    shapes: the stem kernel size (3: CIFAR, 7: ImageNet), the blocks per group
    (`2n` per CIFAR group gives depth `6n + 4`; ImageNet `2 x [2, 2, 2, 2]` is 18,
    `2 x [3, 4, 6, 3]` is 34), the group widths (the width is the smallest `k`
    with `int(base * k)` equal to every group width, so it may differ from the
    trained value but builds the same channel counts), `fc.weight` and the first
    block's input channels (doubled by NCReLU in v1). OIHW kernels become HWIO
    `w`, `alpha`/`beta` become `a`/`b` (DiracNets eq. 5; scalars in v1 eq. 4),
    BN `weight`/`bias` become `scale`/`bias`, running statistics become
    `batch_stats`, and `fc.weight` is transposed. The model's kernel
    `a * delta + b * normalize(w)` normalizes each filter over `(kh, kw, in)`,
    the reference over the flattened `(in, kh, kw)`: the same norm. All values
    become float32.

    Args:
      checkpoint: a path to a `torch.save`d file (read with
        `torch.load(weights_only=True)`), or a mapping: the reference trainer's
        flat dict of tensors, or the export notebook's `{"params": ..., "stats":
        ...}` (other top-level entries, e.g. `epoch`, are ignored). Values are
        numpy arrays or torch tensors.

    Returns:
      `(model, variables)`: a `DiracNet` from `models.get_model` and its
      `{"params", "batch_stats"}`, ready for `model.apply(variables, x)` on NHWC
      images (transpose NCHW inputs with `x.transpose(0, 2, 3, 1)`).

    Raises:
      ImportError: `checkpoint` is a path and torch is not installed.
      ValueError: the shapes fit no reference DiracNet, keys are missing or
        unexpected or have the wrong shape (all listed in one message), or an
        `eye*` entry is not the Dirac delta of its shape.
    """
    flat = _flat_entries(checkpoint)
    config = _infer_config(flat)
    model = models.get_model(
        "diracnet_v1" if config["variant"] == "v1" else "diracnet",
        **{k: v for k, v in config.items() if k != "variant"},
    )
    in_channels = int(flat["conv"].shape[1])
    table = _reference_table(model, in_channels)
    errors = [f"missing {k!r} (shape {table[k][0]})" for k in table if k not in flat]
    errors += [
        f"{k!r} has shape {flat[k].shape}, expected {table[k][0]}"
        for k in table
        if k in flat and flat[k].shape != table[k][0]
    ]
    errors += [f"unexpected {k!r}" for k in flat if k not in table and not _EYE.fullmatch(k)]
    errors += _eye_errors(flat, table, config["variant"])
    if errors:
        raise ValueError(
            f"reference checkpoint does not fit the inferred {config}:\n  " + "\n  ".join(errors)
        )
    variables: dict = {}
    for key, (_, path, convert) in table.items():
        _set(variables, path, jnp.asarray(convert(flat[key]), jnp.float32))
    _check_against_init(model, variables, in_channels)
    return model, variables


def _check_against_init(model, variables, in_channels: int) -> None:
    size = 32 if model.stem == "cifar" else 224
    x = jax.ShapeDtypeStruct((1, size, size, in_channels), jnp.float32)
    init = functools.partial(model.init, train=False)
    expected = jax.eval_shape(init, jax.random.key(0), x)
    shapes = lambda tree: jax.tree.map(lambda a: tuple(a.shape), tree)
    if jax.tree.structure(expected) != jax.tree.structure(variables) or shapes(expected) != shapes(
        variables
    ):
        raise ValueError(  # pragma: no cover - the table above is built from the same plan.
            "load_reference built variables that do not match model.init: "
            f"{shapes(variables)} vs {shapes(expected)}."
        )


# ------------------------------------------------- published folded module


def _folded_table(counts, widths, in_channels, num_classes) -> dict[str, tuple[int, ...]]:
    """The published folded `DiracNet` state_dict: key -> OIHW / (out, in) shape."""
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


def load_reference_folded(state_dict) -> FoldedNet:
    """Loads the published folded ImageNet `DiracNet` (18 or 34) as a `FoldedNet`.

    The module is the chain `conv7x7/2 -> max-pool 3/2 -> [ReLU -> conv3x3] x
    blocks (2x2 max-pool between groups) -> ReLU -> average pool -> linear`
    (DiracNets sec. 1/2: Dirac parameterization and BN folded into the convs).
    Its `AvgPool2d(7)` is the global pool of 224x224 inputs; the `FoldedNet`
    pools globally at any input size. Depth comes from the block counts; group
    widths are read from the shapes (the published module has 64..512, other
    widths are accepted so that width-`k` chains round-trip as well).

    Args:
      state_dict: the module's `state_dict()` (numpy arrays or torch tensors), or
        a path to a `torch.save`d one.

    Returns:
      A `FoldedNet` for `dirac_jax.fold.apply_folded` (NHWC images).

    Raises:
      ImportError: `state_dict` is a path and torch is not installed.
      ValueError: keys are missing, unexpected or of the wrong shape (listed in
        one message), or the block counts are not those of depth 18 or 34.
    """
    sd = {str(k): _to_numpy(v) for k, v in _read(state_dict).items()}
    missing = [k for k in ("features.conv.weight", "fc.weight") if k not in sd]
    if missing:
        raise ValueError(f"folded DiracNet state_dict: missing key(s) {missing}.")
    counts = _block_counts(sd, _FOLDED_BLOCK_KEY, "folded DiracNet state_dict")
    depth = _imagenet_depth(counts, "folded DiracNet state_dict")
    widths = []
    for g, count in enumerate(counts):
        # Any conv tensor of the group gives its width (dim 0 of weight and bias).
        keys = [
            f"features.group{g}.block{i}.conv.{t}" for i in range(count) for t in ("weight", "bias")
        ]
        present = [sd[k] for k in keys if k in sd and sd[k].ndim]
        if not present:
            raise ValueError(f"folded DiracNet state_dict: group {g} has no conv tensors.")
        widths.append(present[0].shape[0])
    stem_w, fc_w = sd["features.conv.weight"], sd["fc.weight"]
    table = _folded_table(counts, widths, stem_w.shape[1], fc_w.shape[0])
    errors = [f"missing {k!r} (shape {shape})" for k, shape in table.items() if k not in sd]
    errors += [
        f"{k!r} has shape {sd[k].shape}, expected {shape}"
        for k, shape in table.items()
        if k in sd and sd[k].shape != shape
    ]
    errors += [f"unexpected {k!r}" for k in sd if k not in table]
    if errors:
        raise ValueError(
            f"folded DiracNet-{depth} state_dict (group widths {widths}) is not the published "
            "module's:\n  " + "\n  ".join(errors)
        )

    def conv(prefix):
        kernel = sd[prefix + ".weight"].transpose(2, 3, 1, 0)
        return {
            "kernel": jnp.asarray(kernel, jnp.float32),
            "bias": jnp.asarray(sd[prefix + ".bias"], jnp.float32),
        }

    steps = [FoldedStep("conv", _STEM_CONV_ARGS), FoldedStep("max_pool", _STEM_POOL)]
    params = [conv("features.conv"), {}]
    for g, count in enumerate(counts):
        if g:
            steps.append(FoldedStep("max_pool", _GROUP_POOL))
            params.append({})
        for i in range(count):
            steps += [FoldedStep("relu"), FoldedStep("conv", BLOCK_CONV_ARGS)]
            params += [{}, conv(f"features.group{g}.block{i}.conv")]
    steps += [FoldedStep("relu"), FoldedStep("avg_pool"), FoldedStep("dense")]
    dense = {
        "kernel": jnp.asarray(fc_w.T, jnp.float32),
        "bias": jnp.asarray(sd["fc.bias"], jnp.float32),
    }
    params += [{}, {}, dense]
    return FoldedNet(params=tuple(params), steps=tuple(steps))


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
    stem = expect("conv", _STEM_CONV_ARGS)
    expect("max_pool", _STEM_POOL)
    groups: list[list[int]] = []
    for g in range(4):
        if g:
            expect("max_pool", _GROUP_POOL)
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

    The inverse of `load_reference_folded`: HWIO kernels become OIHW float32,
    the dense kernel `(in, out)` becomes `fc.weight` `(out, in)`, keys in the
    module's order, so `DiracNet(depth).load_state_dict({k: torch.from_numpy(v)
    for k, v in sd.items()})` loads it (for widths 64..512, the published ones).

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
    _imagenet_depth(tuple(len(b) for b in groups), "export_reference_folded")
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
    table = _folded_table(
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


# ------------------------------------------------------------------ StableHLO


def _serialization_hint(e: ImportError) -> ImportError:
    return ImportError(
        f"jax.export serialization needs the flatbuffers package ({e}); install it with "
        "`pip install flatbuffers`."
    )


def export_stablehlo(
    folded: FoldedNet | Callable[[jax.Array], jax.Array],
    example_shape: Sequence[int],
    *,
    dtype=jnp.float32,
    polymorphic_batch: bool = True,
    platforms: Sequence[str] | None = None,
    preprocess: Callable[[jax.Array], jax.Array] | None = None,
) -> bytes:
    """Serializes `apply_folded(folded, images)` with `jax.export`, weights included.

    The artifact is StableHLO with the folded parameters as constants, so it runs
    without the Python model code: `load_stablehlo` in JAX, or any StableHLO
    runtime. Serialization needs the `flatbuffers` package.

    Example (not a doctest, since flatbuffers is optional)::

      blob = export_stablehlo(fold(model, variables), (1, 224, 224, 3))
      logits = load_stablehlo(blob)(images)  # any batch size

    Args:
      folded: a `FoldedNet`, or any pure function `images -> logits` (e.g. a
        WRN with its kernels folded by `fold.fold_kernels`, its variables
        closed over).
      example_shape: NHWC input shape `(batch, height, width, channels)`; height,
        width and channels are fixed in the artifact.
      dtype: input dtype.
      polymorphic_batch: export the batch dimension as a symbolic `b`, so one
        artifact serves every batch size; else the batch is `example_shape[0]`.
      platforms: e.g. `("cpu", "cuda")` to run on several backends; default:
        the current backend.
      preprocess: a pure JAX function run on the input first, e.g. the uint8
        padding and normalization of `dirac_jax.workdir.preprocess`, so the
        artifact is the whole classifier (then pass `dtype=jnp.uint8`).

    Returns:
      The serialized `jax.export.Exported`.

    Raises:
      ValueError: `example_shape` is not four positive ints.
      ImportError: flatbuffers is not installed.
    """
    shape = tuple(example_shape)
    if len(shape) != 4 or not all(isinstance(d, int | np.integer) and d > 0 for d in shape):
        raise ValueError(
            f"export_stablehlo: example_shape must be NHWC (batch, height, width, channels) "
            f"positive ints, got {example_shape!r}."
        )
    if polymorphic_batch:
        spec = jax.export.symbolic_shape("b, " + ", ".join(str(int(d)) for d in shape[1:]))
    else:
        spec = tuple(int(d) for d in shape)
    prepare = preprocess if preprocess is not None else (lambda images: images)
    net = folded if callable(folded) else functools.partial(apply_folded, folded)
    fn = jax.jit(lambda images: net(prepare(images)))
    exported = jax.export.export(fn, platforms=platforms)(jax.ShapeDtypeStruct(spec, dtype))
    try:
        return bytes(exported.serialize())
    except ImportError as e:
        raise _serialization_hint(e) from e


def load_stablehlo(blob: bytes) -> Callable[[jax.Array], jax.Array]:
    """The callable `images -> logits` of an `export_stablehlo` artifact.

    Raises:
      ImportError: flatbuffers is not installed.
    """
    try:
        exported = jax.export.deserialize(bytearray(blob))
    except ImportError as e:
        raise _serialization_hint(e) from e
    return exported.call

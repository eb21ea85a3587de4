"""The authors' PyTorch checkpoints imported: reference DiracNets as Flax variables or folded nets.

The reference code (szagoruyko/diracnets on GitHub, v2 on master, v1 on branch v1)
publishes two kinds of checkpoint, both OIHW tensors keyed by name:

* unfolded: the functional net's flat dict (`conv`, `bn.weight`, ...,
  `group0.block0.conv`, `.alpha`, `.beta`, `.bn.running_mean`, ...,
  `fc.weight`, and the deltas `eye{o}_{i}_3_3`), or the export notebook's
  `{"params": ..., "stats": ...}` split of the same entries. `load_reference`
  turns it into a `DiracNet` and its Flax variables.
* folded: the `state_dict` of the published `DiracNet` `nn.Module`, a chain of
  conv-ReLU pairs (DiracNets arXiv:1706.00388 sec. 1/2; its layout is
  `dirac_jax.formats.state_dict`'s). `load_reference_folded` converts it to a
  `dirac_jax.folded.FoldedNet`, and `formats.state_dict.export_reference_folded`
  writes one back.

PyTorch is optional: it is imported only to read a checkpoint file. Tensor
values may be numpy arrays or torch tensors.

Example:
  >>> import numpy as np
  >>> from dirac_jax import torch_checkpoint
  >>> from dirac_jax.fold import apply_folded
  >>> from dirac_jax.formats.state_dict import export_reference_folded
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
  >>> folded = torch_checkpoint.load_reference_folded(sd)
  >>> [s.kind for s in folded.steps][:4]
  ['conv', 'max_pool', 'relu', 'conv']
  >>> back = export_reference_folded(folded)
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
from dirac_jax.folded import BLOCK_CONV_ARGS, FoldedNet, FoldedStep
from dirac_jax.formats.state_dict import (
    GROUP_POOL,
    STEM_CONV_ARGS,
    STEM_POOL,
    imagenet_depth,
    published_table,
)
from dirac_jax.models import GROUP_BASES

__all__ = ["load_reference", "load_reference_folded"]

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
        depth = imagenet_depth(counts, "reference checkpoint")
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
    depth = imagenet_depth(counts, "folded DiracNet state_dict")
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
    table = published_table(counts, widths, stem_w.shape[1], fc_w.shape[0])
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

    steps = [FoldedStep("conv", STEM_CONV_ARGS), FoldedStep("max_pool", STEM_POOL)]
    params = [conv("features.conv"), {}]
    for g, count in enumerate(counts):
        if g:
            steps.append(FoldedStep("max_pool", GROUP_POOL))
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

"""The reference DiracNets (szagoruyko/diracnets) in PyTorch: the tests' oracle and benchmark rival.

Written from the reference code (master is v2, branch v1 is v1) and DiracNets
(arXiv:1706.00388), in the reference's own layout: NCHW activations, OIHW
kernels, a flat dict of tensors keyed like `group0.block0.conv`. The tests
check the JAX models, the checkpoint import and the optimizer against it; the
benchmarks time it beside the JAX nets.

* `reference_params` / `reference_forward`: the functional (unfolded) net of
  the reference trainer, CIFAR or ImageNet stem, v2 (per-channel `alpha`,
  `beta`, DiracNets v2 eq. 5) and v1 (scalar `alpha`, `beta`, NCReLU,
  DiracNets v1 eqs. 4, 9); `split_params_stats`: the export notebook's layout.
* `reference_optimizer`: the reference trainer's `create_optimizer`;
  `make_train_step`: one of its SGD steps on the cross-entropy (optionally
  under bfloat16 autocast); `synthetic_train_step`: that step on fixed
  synthetic CIFAR data, as `python -m benchmarks train` times it.
* `folded_module`: the published folded ImageNet `nn.Module`, a chain of
  conv-ReLU pairs with the published `state_dict` keys. The one change: its
  `AvgPool2d(7)` is a global average pool, the same function on 224x224
  inputs (7x7 final maps), so tests can run it on small images.
* `randomize_`: He-normal weights for such a module.

PyTorch is optional: it is imported when a function runs, and without it the
function says how to install it.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

__all__ = [
    "BN_EPS",
    "IMAGENET_BLOCKS",
    "delta",
    "eye_key",
    "folded_module",
    "is_buffer",
    "make_train_step",
    "randomize_",
    "reference_forward",
    "reference_optimizer",
    "reference_params",
    "split_params_stats",
    "synthetic_train_step",
]

# Residual-block pairs per group of the ImageNet nets (the reference's `definitions`).
#: Residual-block pairs per group of the reference's ImageNet nets, by depth.
IMAGENET_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
#: The BatchNorm epsilon of the PyTorch reference (`F.batch_norm`'s default).
BN_EPS = 1e-5  # F.batch_norm's default, which the reference uses.


def _torch():
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"the PyTorch reference DiracNet needs torch ({e}): pip install 'dirac_jax[torch]'."
        ) from e
    return torch


def _plan(depth: int, width: float, dataset: str):
    """(stem out channels, stem kernel, [(group width, block count)]) of the reference."""
    if dataset == "cifar":
        n = (depth - 4) // 6
        if depth != 6 * n + 4 or n < 1:
            raise ValueError(f"a CIFAR DiracNet has depth 6n + 4 with n >= 1, got {depth}.")
        widths = [int(v * width) for v in (16, 32, 64)]
        return widths[0], 3, [(w, 2 * n) for w in widths]
    if dataset != "imagenet" or depth not in IMAGENET_BLOCKS:
        raise ValueError(
            f"expected dataset 'cifar', or 'imagenet' with depth in {sorted(IMAGENET_BLOCKS)}; "
            f"got {dataset!r}, depth {depth}."
        )
    widths = [int(v * width) for v in (64, 128, 256, 512)]
    return widths[0], 7, [(w, 2 * b) for w, b in zip(widths, IMAGENET_BLOCKS[depth], strict=True)]


def eye_key(shape) -> str:
    """The reference's key of the delta of a conv of `shape` (its `size2name`)."""
    return "eye" + "_".join(map(str, shape))


def is_buffer(key: str) -> bool:
    """Whether a reference entry is a running statistic or a delta, not trained."""
    return key.endswith((".running_mean", ".running_var")) or key.startswith("eye")


def delta(shape, variant: str = "v2"):
    """The reference deltas: `torch.nn.init.dirac_` (v2) or a repeated square one (v1)."""
    torch = _torch()
    no, ni = shape[:2]
    if variant == "v2":
        return torch.nn.init.dirac_(torch.empty(shape))
    n = min(no, ni)
    square = torch.nn.init.dirac_(torch.empty((n, n, *shape[2:])))
    return square.repeat(max(no // ni, 1), max(ni // no, 1), 1, 1)


def reference_params(
    depth: int,
    width: float,
    dataset: str = "cifar",
    num_classes: int = 10,
    seed: int = 0,
    variant: str = "v2",
) -> dict:
    """A flat dict of random reference params, running stats and `eye*` deltas.

    Everything a trained net has is non-trivial: `alpha`, `beta`, BN affine
    parameters and running statistics are random, so a conversion that drops or
    swaps any of them changes the logits.

    Raises:
      ValueError: a depth the reference does not build for `dataset`.
    """
    torch = _torch()
    g = torch.Generator().manual_seed(seed)
    p = {}

    def uniform(shape, lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=g)

    def bn(base, c):
        p[base + ".weight"] = uniform((c,), 0.5, 1.5)
        p[base + ".bias"] = 0.1 * torch.randn((c,), generator=g)
        p[base + ".running_mean"] = 0.1 * torch.randn((c,), generator=g)
        p[base + ".running_var"] = uniform((c,), 0.5, 2.0)

    c0, k, groups = _plan(depth, width, dataset)
    p["conv"] = torch.randn((c0, 3, k, k), generator=g) * (2.0 / (3 * k * k)) ** 0.5
    bn("bn", c0)
    ni = c0
    for gi, (no, count) in enumerate(groups):
        for i in range(count):
            base = f"group{gi}.block{i}"
            cin = ni if i == 0 else no
            cin = 2 * cin if variant == "v1" else cin
            shape = (no, cin, 3, 3)
            p[base + ".conv"] = torch.randn(shape, generator=g)
            scale_shape = (no,) if variant == "v2" else (1,)
            p[base + ".alpha"] = uniform(scale_shape, 0.5, 1.5)
            p[base + ".beta"] = uniform(scale_shape, 0.1, 0.6)
            bn(base + ".bn", no)
            p[eye_key(shape)] = delta(shape, variant)
        ni = no
    p["fc.weight"] = torch.randn((num_classes, ni), generator=g) * (2.0 / ni) ** 0.5
    p["fc.bias"] = 0.1 * torch.randn((num_classes,), generator=g)
    return p


def split_params_stats(flat) -> dict:
    """The `{"params", "stats"}` layout of the export notebook."""
    return {
        "params": {k: v for k, v in flat.items() if not is_buffer(k)},
        "stats": {k: v for k, v in flat.items() if is_buffer(k)},
    }


def reference_forward(inputs, params: dict, train: bool = False):
    """The reference functional forward `f(inputs, params, mode)`, NCHW inputs.

    The stem (CIFAR or ImageNet) is read from the stem kernel size and the variant
    from the first block's input channels (doubled by NCReLU in v1). `train=True`
    is the reference's training mode: BN normalizes with batch statistics (and
    updates the running ones in place), and autograd records the graph.
    """
    torch = _torch()
    F = torch.nn.functional
    v1 = params["group0.block0.conv"].shape[1] == 2 * params["conv"].shape[0]
    imagenet = params["conv"].shape[-1] == 7
    num_groups = 4 if imagenet else 3

    def batch_norm(o, base):
        return F.batch_norm(
            o,
            params[base + ".running_mean"],
            params[base + ".running_var"],
            params[base + ".weight"],
            params[base + ".bias"],
            training=train,
            eps=BN_EPS,
        )

    def block(o, base):
        w = params[base + ".conv"]
        no = w.shape[0]
        alpha = params[base + ".alpha"].view(-1, 1, 1, 1)
        beta = params[base + ".beta"].view(-1, 1, 1, 1)
        d = params[eye_key(w.shape)]
        # reshape where the reference has view: the same values, and a channels_last
        # kernel (the benchmark's) is not contiguous in OIHW order.
        w = beta * F.normalize(w.reshape(no, -1)).view_as(w) + alpha * d
        o = F.conv2d(torch.cat([F.relu(o), -F.relu(-o)], 1) if v1 else F.relu(o), w, padding=1)
        return batch_norm(o, base + ".bn")

    with torch.set_grad_enabled(train):
        if imagenet:
            o = F.conv2d(inputs, params["conv"], padding=3, stride=2)
            o = batch_norm(o, "bn")
            o = F.max_pool2d(o, 3, 2, 1)
        else:
            o = F.conv2d(inputs, params["conv"], padding=1)
            o = F.relu(batch_norm(o, "bn"))
        for gi in range(num_groups):
            if gi:
                o = F.max_pool2d(o, 2)
            i = 0
            while f"group{gi}.block{i}.conv" in params:
                o = block(o, f"group{gi}.block{i}")
                i += 1
        # The reference pools with avg_pool2d(o, 8) (CIFAR, 32x32 inputs) or
        # avg_pool2d(o, o.size(-1)): both are global pools on their input sizes.
        o = F.avg_pool2d(o if v1 else F.relu(o), o.size(-1))
        return F.linear(o.reshape(o.size(0), -1), params["fc.weight"], params["fc.bias"])


def reference_optimizer(params: dict, lr: float, weight_decay: float, variant: str = "v2"):
    """The reference trainer's `create_optimizer` over the trained tensors `params`.

    v2 (master): two groups, weight decay on the tensors with `dim() != 1`, none on
    the rest; v1 (branch v1): one group, every parameter decayed. SGD momentum 0.9.
    """
    torch = _torch()
    if variant == "v1":
        return torch.optim.SGD(list(params.values()), lr, 0.9, weight_decay=weight_decay)
    wd = [v for v in params.values() if v.dim() != 1]
    rest = [v for v in params.values() if v.dim() == 1]
    groups = [{"params": wd, "weight_decay": weight_decay}, {"params": rest}]
    return torch.optim.SGD(groups, lr, momentum=0.9)


def make_train_step(
    params: dict,
    lr: float = 0.1,
    weight_decay: float = 5e-4,
    *,
    variant: str = "v2",
    amp_bf16: bool = False,
    forward: Callable | None = None,
) -> Callable:
    """One reference training step `step(images, labels) -> loss` on `params`, in place.

    The trained tensors (all but `is_buffer` ones) get `requires_grad` and the
    `reference_optimizer`; the loss is the cross-entropy of `forward(images,
    params, True)` (default `reference_forward`; pass a `torch.compile`d one).
    With `amp_bf16`, the forward pass and loss run under `torch.autocast` in
    bfloat16 (weights and optimizer stay float32), PyTorch's mixed precision.
    """
    torch = _torch()
    forward = forward or reference_forward
    trained = {k: v.requires_grad_(True) for k, v in params.items() if not is_buffer(k)}
    opt = reference_optimizer(trained, lr, weight_decay, variant)
    device_type = params["conv"].device.type

    def step(images, labels):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp_bf16):
            loss = torch.nn.functional.cross_entropy(forward(images, params, True), labels)
        loss.backward()
        opt.step()
        return loss

    return step


def synthetic_train_step(
    depth: int,
    width: float,
    batch: int,
    *,
    channels_last: bool = False,
    amp_bf16: bool = False,
    compile: bool = False,
    device: str | None = None,
) -> tuple[Callable[[], float], int]:
    """A closure running one reference training step of a CIFAR DiracNet on synthetic data.

    Args:
      depth, width: the DiracNet-depth-width (v2, `reference_params(seed=0)`).
      batch: images per step (32x32x3, 10 classes).
      channels_last: NHWC memory format for the kernels and the images, the
        layout cuDNN's tensor-core convolutions prefer.
      amp_bf16: `torch.autocast` bfloat16 (see `make_train_step`).
      compile: `torch.compile` the forward pass (and, through AOTAutograd, the
        backward); the compilation happens on the first call.
      device: `"cuda"` when available, else `"cpu"`, unless given.

    Returns:
      `(step, num_params)`: `step()` runs one step and returns the loss as a
      float, which waits for the device; `num_params` counts the trained tensors.
    """
    torch = _torch()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    params = {
        k: v.to(device=device, memory_format=fmt if v.dim() == 4 else torch.contiguous_format)
        for k, v in reference_params(depth, width, "cifar", num_classes=10, seed=0).items()
    }
    num_params = sum(v.numel() for k, v in params.items() if not is_buffer(k))
    forward = torch.compile(reference_forward) if compile else reference_forward
    step_fn = make_train_step(params, amp_bf16=amp_bf16, forward=forward)
    torch.manual_seed(0)
    images = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    labels = torch.randint(0, 10, (batch,), device=device)

    def step():
        return step_fn(images, labels).item()

    return step, num_params


def folded_module(depth: int, width: float = 1.0, num_classes: int = 1000):
    """The published folded ImageNet DiracNet: conv-ReLU chain, state_dict keys as published.

    `width` and `num_classes` default to the published 1 and 1000; tests pass
    smaller values for speed. The final pool is global (see the module docstring).

    Returns:
      An `nn.Sequential` of `features` (the chain), a flatten and `fc`: the
      published module's `features.*` and `fc.*` parameters, and its function.
    """
    nn = _torch().nn
    widths = [int(v * width) for v in (64, 128, 256, 512)]
    layers = [
        ("conv", nn.Conv2d(3, widths[0], 7, 2, 3)),
        ("max_pool0", nn.MaxPool2d(3, 2, 1)),
    ]
    ni = widths[0]
    for g, (no, count) in enumerate(zip(widths, IMAGENET_BLOCKS[depth], strict=True)):
        blocks = collections.OrderedDict()
        for i in range(2 * count):
            blocks[f"block{i}"] = nn.Sequential(
                collections.OrderedDict(
                    relu=nn.ReLU(), conv=nn.Conv2d(ni if i == 0 else no, no, 3, padding=1)
                )
            )
        layers.append((f"group{g}", nn.Sequential(blocks)))
        layers.append((f"max_pool{g + 1}", nn.MaxPool2d(2)) if g < 3 else ("last_relu", nn.ReLU()))
        ni = no
    layers.append(("avg_pool", nn.AdaptiveAvgPool2d(1)))
    return nn.Sequential(
        collections.OrderedDict(
            features=nn.Sequential(collections.OrderedDict(layers)),
            flatten=nn.Flatten(),
            fc=nn.Linear(ni, num_classes),
        )
    )


def randomize_(module, seed: int = 0):
    """He-normal weights and small random biases, so activations stay O(1) through depth.

    PyTorch's default init shrinks activations layer by layer, which would make
    every deep chain's logits tiny and any comparison trivially pass.
    """
    torch = _torch()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return module

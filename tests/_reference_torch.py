"""A PyTorch transcription of the reference DiracNets (szagoruyko/diracnets), for tests only.

Written from the reference code (szagoruyko/diracnets) and DiracNets v2, in
the reference's own layout (NCHW activations, OIHW kernels, a flat dict of
tensors keyed like `group0.block0.conv`). Tests `pytest.importorskip("torch")`
before importing this module.

* `reference_params` / `reference_forward`: the functional (unfolded) net of the
  reference trainer, v2 (per-channel `alpha`, `beta`, DiracNets eq. 5) and v1
  (scalar `alpha`, `beta`, NCReLU, DiracNets v1 eqs. 4, 9).
* `FoldedDiracNet`: the published folded ImageNet `nn.Module`, a chain of
  conv-ReLU pairs. The one change: `AvgPool2d(7)` becomes a global average pool,
  which is the same function on 224x224 inputs (7x7 final maps) and lets the
  tests run on 64x64 inputs.
"""

from __future__ import annotations

import collections

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
BN_EPS = 1e-5


def _plan(depth: int, width: float, dataset: str):
    """(stem out channels, stem kernel, [(group width, block count)]) of the reference."""
    if dataset == "cifar":
        n = (depth - 4) // 6
        assert depth == 6 * n + 4 and n >= 1, depth
        widths = [int(v * width) for v in (16, 32, 64)]
        return widths[0], 3, [(w, 2 * n) for w in widths]
    assert dataset == "imagenet", dataset
    widths = [int(v * width) for v in (64, 128, 256, 512)]
    return widths[0], 7, [(w, 2 * b) for w, b in zip(widths, IMAGENET_BLOCKS[depth], strict=True)]


def eye_key(shape) -> str:
    return "eye" + "_".join(map(str, shape))


def delta(shape, variant: str = "v2") -> torch.Tensor:
    """The reference deltas: `torch.nn.init.dirac_` (v2) or a repeated square one (v1)."""
    no, ni = shape[:2]
    if variant == "v2":
        return nn.init.dirac_(torch.empty(shape))
    n = min(no, ni)
    square = nn.init.dirac_(torch.empty((n, n, *shape[2:])))
    return square.repeat(max(no // ni, 1), max(ni // no, 1), 1, 1)


def reference_params(
    depth: int,
    width: float,
    dataset: str = "cifar",
    num_classes: int = 10,
    seed: int = 0,
    variant: str = "v2",
) -> dict[str, torch.Tensor]:
    """A flat dict of random reference params, running stats and `eye*` deltas.

    Everything a trained net has is non-trivial: `alpha`, `beta`, BN affine
    parameters and running statistics are random, so a conversion that drops or
    swaps any of them changes the logits.
    """
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


def split_params_stats(flat):
    """The `{"params", "stats"}` layout of the export notebook."""
    is_stat = lambda k: k.endswith((".running_mean", ".running_var")) or k.startswith("eye")
    return {
        "params": {k: v for k, v in flat.items() if not is_stat(k)},
        "stats": {k: v for k, v in flat.items() if is_stat(k)},
    }


def _batch_norm(o, params, base, training=False):
    return F.batch_norm(
        o,
        params[base + ".running_mean"],
        params[base + ".running_var"],
        params[base + ".weight"],
        params[base + ".bias"],
        training=training,
        eps=BN_EPS,
    )


def _ncrelu(x):
    return torch.cat([F.relu(x), -F.relu(-x)], 1)


def reference_forward(inputs: torch.Tensor, params: dict, train: bool = False) -> torch.Tensor:
    """The reference functional forward `f(inputs, params, mode)`, NCHW inputs.

    The stem (CIFAR or ImageNet) is read from the stem kernel size and the variant
    from the first block's input channels (doubled by NCReLU in v1). `train=True`
    is the reference's training mode: BN normalizes with batch statistics (and
    updates the running ones in place), and autograd records the graph.
    """
    v1 = params["group0.block0.conv"].shape[1] == 2 * params["conv"].shape[0]
    imagenet = params["conv"].shape[-1] == 7
    num_groups = 4 if imagenet else 3

    def block(o, base):
        w = params[base + ".conv"]
        no = w.shape[0]
        alpha = params[base + ".alpha"].view(-1, 1, 1, 1)
        beta = params[base + ".beta"].view(-1, 1, 1, 1)
        d = params[eye_key(w.shape)]
        w = beta * F.normalize(w.view(no, -1)).view_as(w) + alpha * d
        o = F.conv2d(_ncrelu(o) if v1 else F.relu(o), w, padding=1)
        return _batch_norm(o, params, base + ".bn", train)

    with torch.set_grad_enabled(train):
        if imagenet:
            o = F.conv2d(inputs, params["conv"], padding=3, stride=2)
            o = _batch_norm(o, params, "bn", train)
            o = F.max_pool2d(o, 3, 2, 1)
        else:
            o = F.conv2d(inputs, params["conv"], padding=1)
            o = F.relu(_batch_norm(o, params, "bn", train))
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
        return F.linear(o.view(o.size(0), -1), params["fc.weight"], params["fc.bias"])


class FoldedDiracNet(nn.Module):
    """The published folded ImageNet DiracNet: conv-ReLU chain, state_dict keys as published.

    `width` and `num_classes` default to the published 1 and 1000; tests pass
    smaller values for speed. The final pool is global (see the module docstring).
    """

    def __init__(self, depth: int, width: float = 1.0, num_classes: int = 1000):
        super().__init__()
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
            layers.append(
                (f"max_pool{g + 1}", nn.MaxPool2d(2)) if g < 3 else ("last_relu", nn.ReLU())
            )
            ni = no
        layers.append(("avg_pool", nn.AdaptiveAvgPool2d(1)))
        self.features = nn.Sequential(collections.OrderedDict(layers))
        self.fc = nn.Linear(ni, num_classes)

    def forward(self, x):
        o = self.features(x)
        return self.fc(o.view(o.size(0), -1))


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    """He-normal weights and small random biases, so activations stay O(1) through depth.

    PyTorch's default init shrinks activations layer by layer, which would make
    every deep chain's logits tiny and any comparison trivially pass.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return module


def reference_optimizer(params: dict, lr: float, weight_decay: float, variant: str = "v2"):
    """The reference trainer's `create_optimizer`.

    v2 (master): two groups, weight decay on the tensors with `dim() != 1`, none on
    the rest; v1 (branch v1): one group, every parameter decayed. SGD momentum 0.9.
    """
    if variant == "v1":
        return torch.optim.SGD(list(params.values()), lr, 0.9, weight_decay=weight_decay)
    wd = [v for v in params.values() if v.dim() != 1]
    rest = [v for v in params.values() if v.dim() == 1]
    groups = [{"params": wd, "weight_decay": weight_decay}, {"params": rest}]
    return torch.optim.SGD(groups, lr, momentum=0.9)

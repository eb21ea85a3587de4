"""A PyTorch transcription of the reference DiracNet v2 (CIFAR stem), for speed comparisons.

It follows the reference code (szagoruyko/diracnets): block `ReLU -> conv(W_hat) -> BN`
with `W_hat = alpha * delta + beta * normalize(W)` per output channel (DiracNets eq. 5),
stem `conv -> BN -> ReLU`, 2x2 max-pool between groups, head `ReLU -> avg-pool -> linear`.
Only the benchmark imports it; torch is an optional dependency.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Block(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in, 3, 3))
        self.alpha = nn.Parameter(torch.ones(n_out))
        self.beta = nn.Parameter(torch.full((n_out,), 0.1))
        self.register_buffer("delta", nn.init.dirac_(torch.empty(n_out, n_in, 3, 3)))
        self.bn = nn.BatchNorm2d(n_out)

    def forward(self, x):
        w = self.weight
        w_norm = F.normalize(w.view(w.shape[0], -1)).view_as(w)
        w_hat = self.beta.view(-1, 1, 1, 1) * w_norm + self.alpha.view(-1, 1, 1, 1) * self.delta
        return self.bn(F.conv2d(F.relu(x), w_hat, padding=1))


class ReferenceDiracNet(nn.Module):
    """DiracNet-depth-width for 32x32 inputs, NCHW, as the reference trains it."""

    def __init__(self, depth: int, width: float, num_classes: int = 10, plain: bool = False):
        super().__init__()
        n = (depth - 4) // 6
        widths = [int(v * width) for v in (16, 32, 64)]
        self.conv = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        groups, n_in = [], widths[0]
        for w in widths:
            blocks = []
            for _ in range(2 * n):
                blocks.append(_PlainBlock(n_in, w) if plain else _Block(n_in, w))
                n_in = w
            groups.append(nn.Sequential(*blocks))
        self.groups = nn.ModuleList(groups)
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        o = F.relu(self.bn(self.conv(x)))
        for i, group in enumerate(self.groups):
            if i:
                o = F.max_pool2d(o, 2)
            o = group(o)
        o = F.relu(o).mean(dim=(2, 3))
        return self.fc(o)


class _PlainBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.conv = nn.Conv2d(n_in, n_out, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(n_out)

    def forward(self, x):
        return self.bn(self.conv(F.relu(x)))


def make_train_step(model: nn.Module, lr: float = 0.1, weight_decay: float = 5e-4):
    """SGD with momentum 0.9 and decay on tensors of more than one dimension, as the reference."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=lr,
        momentum=0.9,
    )

    def step(images, labels):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
        return loss

    return step

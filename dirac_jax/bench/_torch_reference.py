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
        # reshape, not view: a channels_last weight is not contiguous in OIHW order.
        w_norm = F.normalize(w.reshape(w.shape[0], -1)).reshape(w.shape)
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


def make_train_step(
    model: nn.Module, lr: float = 0.1, weight_decay: float = 5e-4, *, amp_bf16: bool = False
):
    """SGD with momentum 0.9 and decay on tensors of more than one dimension, as the reference.

    With `amp_bf16`, the forward pass and loss run under `torch.autocast` in
    bfloat16 (weights and optimizer stay float32), PyTorch's mixed precision.
    """
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=lr,
        momentum=0.9,
    )
    device_type = next(model.parameters()).device.type

    def step(images, labels):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp_bf16):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        opt.step()
        return loss

    return step


def make_candidate(
    depth: int,
    width: float,
    batch: int,
    *,
    channels_last: bool = False,
    amp_bf16: bool = False,
    compile: bool = False,
    device: str | None = None,
):
    """A closure running one training step of the reference model on synthetic data.

    Args:
      depth, width: the DiracNet-depth-width of `ReferenceDiracNet`.
      batch: images per step (32x32x3, 10 classes).
      channels_last: NHWC memory format for the model and the images, the
        layout cuDNN's tensor-core convolutions prefer.
      amp_bf16: `torch.autocast` bfloat16 (see `make_train_step`).
      compile: `torch.compile` the model (forward and, through AOTAutograd,
        backward); the compilation happens on the first call.
      device: `"cuda"` when available, else `"cpu"`, unless given.

    Returns:
      `(step, num_params)`; `step()` runs one step and returns the loss as a float,
      which waits for the device.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    model = ReferenceDiracNet(depth, width).to(device=device, memory_format=fmt)
    num_params = sum(p.numel() for p in model.parameters())
    runner = torch.compile(model) if compile else model
    step_fn = make_train_step(runner, amp_bf16=amp_bf16)
    images = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    labels = torch.randint(0, 10, (batch,), device=device)

    def step():
        return step_fn(images, labels).item()

    return step, num_params

"""The experiments of the papers as grids of training runs, at three presets.

Presets:
  smoke: two tiny cells, two steps each on real Fashion-MNIST (for tests; only
    `depth` repeats its cells over two seeds, to exercise the medians).
  cpu: real Fashion-MNIST, narrow nets and a few hundred steps, sized for about
    an hour or less on 2 CPU cores; the claims are checked at this scale.
  paper: the papers' own settings on CIFAR-10 (the configs in `configs/`, their
    200-epoch schedule, 5 seeds), for a GPU or TPU.

The paper column holds the figures the papers state in their text and tables
(CIFAR-10, or USPS for Oyedotun et al.); a dash where they only plot.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from dirac_jax.reproduce._grid import Cell, Plan

PRESETS = ("smoke", "cpu", "paper")
DEPTHS = (10, 16, 28, 52, 100)
SIGMAS = (1e-8, 1e-6, 1e-4, 1e-2, 1.0)


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A named experiment: what it checks, and its plan at each preset."""

    name: str
    claim: str
    source: str
    plan: Callable[[str], Plan]
    metric: str = "test_accuracy"


def _small(preset: str, steps: int, **extra) -> dict:
    """Overrides that turn the Fashion-MNIST quickstart config into a grid cell.

    The cpu preset trains for `steps` steps of batch 64 at the papers' lr 0.1
    (x0.2 at 50% and 75%), the same for every model: nothing is tuned per cell.
    """
    tiny = preset == "smoke"
    return {
        "num_train_steps": 2 if tiny else steps,
        "batch_size": 64,
        "learning_rate": 0.1,
        "lr_boundaries": (0.5, 0.75),
        "eval_every_steps": 100_000,  # once, at the end
        "log_every_steps": 1 if tiny else 50,
        "checkpoint_every_steps": 0 if tiny else 100,
        "eval_batch_size": 1000,
        "fold_check_images": 16 if tiny else 256,
        **extra,
    }


# ---------------------------------------------------------------------------
# depth: DiracNets v2 fig. 1 and sec. 3.1.

_DEPTH_PAPER = {
    ("plain", 52): "88",
    ("plain", 100): "40 (no convergence)",
    ("diracnet", 100): "92.4",
}
_DEPTH_CONFIGS = {"diracnet": "cifar_dirac.py", "plain": "cifar_plain.py", "wrn": "cifar_wrn.py"}


def _depth_plan(preset: str) -> Plan:
    if preset == "smoke":
        models, depths, seeds = ("diracnet", "plain"), (10,), (0, 1)
    elif preset == "cpu":
        models, depths, seeds = ("diracnet", "plain", "wrn"), DEPTHS, (0, 1, 2)
    else:
        models, depths, seeds = ("diracnet", "plain", "wrn"), DEPTHS, (0, 1, 2, 3, 4)
    # On the CPU the WRN curve, the residual reference, gets one seed: the claim is about
    # plain against Dirac, and a 100-layer run costs minutes there.
    wrn_seeds = seeds[:1] if preset == "cpu" else None
    cells = []
    for model in models:
        for depth in depths:
            if preset == "paper":
                config = _DEPTH_CONFIGS[model]
                overrides = {"model.depth": depth, "model.width": 1.0}
            else:
                config = "fashion_mnist_dirac.py"
                overrides = _small(
                    preset, 300, **{"model.name": model, "model.depth": depth, "model.width": 0.25}
                )
            cells.append(
                Cell(
                    f"{model}-d{depth}",
                    config,
                    overrides,
                    {"model": model, "depth": depth},
                    _DEPTH_PAPER.get((model, depth)),
                    wrn_seeds if model == "wrn" else None,
                )
            )
    return Plan("depth", preset, cells, seeds)


# ---------------------------------------------------------------------------
# scales: DiracNets v2 fig. 2 and sec. 3.3.


def _scales_plan(preset: str) -> Plan:
    if preset == "paper":
        cell = Cell("diracnet-d34", "cifar_dirac.py", {"model.depth": 34, "model.width": 1.0}, {})
        return Plan("scales", preset, [cell], (0,))
    tiny = preset == "smoke"
    overrides = _small(
        preset,
        600,
        **{
            "model.depth": 10 if tiny else 34,
            "model.width": 0.25 if tiny else 0.5,
            "eval_every_steps": 1 if tiny else 50,
        },
    )
    depth = overrides["model.depth"]
    cells = [Cell(f"diracnet-d{depth}", "fashion_mnist_dirac.py", overrides, {"depth": depth})]
    return Plan("scales", preset, cells, (0,))


# ---------------------------------------------------------------------------
# init: DiracNets v2 sec. 3.4 (I + W as ResNet initialization).


def _init_plan(preset: str) -> Plan:
    sigmas = (None, 1e-8) if preset == "smoke" else (None, *SIGMAS)
    cells = []
    for sigma in sigmas:
        name = "he" if sigma is None else f"sigma{sigma:g}"
        label = "He normal (no I + W)" if sigma is None else f"I + W, sigma={sigma:g}"
        if sigma is None:
            paper = "baseline"
        else:
            paper = "slightly worse" if sigma >= 1 else "same as He"
        if preset == "paper":
            overrides = {"model.depth": 28, "model.width": 10.0, "model.dirac_init_sigma": sigma}
            cells.append(Cell(name, "cifar_wrn.py", overrides, {"init": label}, paper))
            continue
        overrides = _small(
            preset,
            300,
            **{
                "model.name": "wrn",
                "model.depth": 10 if preset == "smoke" else 16,
                "model.width": 0.25,
                "model.dirac_init_sigma": sigma,
            },
        )
        cells.append(Cell(name, "fashion_mnist_dirac.py", overrides, {"init": label}, paper))
    seeds = {"smoke": (0,), "cpu": (0, 1, 2), "paper": (0, 1, 2, 3, 4)}[preset]
    return Plan("init", preset, cells, seeds)


# ---------------------------------------------------------------------------
# plainnet: Oyedotun et al. Table 1, the 100-layer ablation (USPS).

# (name, BN, Leaky ReLU, max-norm, init, paper train error %, paper test error %)
_ABLATION = (
    ("bn", True, False, False, "uniform", "84.56", "83.21"),
    ("lrelu", False, True, False, "uniform", "92.37", "92.03"),
    ("maxnorm", False, False, True, "uniform", "86.22", "86.85"),
    ("bn-lrelu", True, True, False, "uniform", "78.38", "79.52"),
    ("bn-maxnorm", True, False, True, "uniform", "82.90", "81.86"),
    ("lrelu-maxnorm", False, True, True, "uniform", "83.62", "82.11"),
    ("bn-lrelu-maxnorm", True, True, True, "uniform", "0.11", "5.48"),
    ("bn-lrelu-maxnorm-he", True, True, True, "he_normal", None, None),
)


def _plainnet_plan(preset: str) -> Plan:
    rows = _ABLATION[-3:-1] if preset == "smoke" else _ABLATION
    cells = []
    for name, bn, lrelu, maxnorm, init, train_err, test_err in rows:
        model = {
            "model.name": "plainnet",
            "model.depth": 5 if preset == "smoke" else 100,
            "model.width": 0.25,
            "model.batch_norm": bn,
            "model.leaky_slope": 0.1 if lrelu else 0.0,
            "model.kernel_init": init,
            "max_norm": 4.0 if maxnorm else 0.0,
        }
        labels = {
            "BN": "yes" if bn else "-",
            "Leaky ReLU": "yes" if lrelu else "-",
            "max-norm": "yes" if maxnorm else "-",
            "init": init,
        }
        paper = None if train_err is None else f"{train_err} / {test_err}"
        if preset == "paper":
            overrides = {k: v for k, v in model.items() if k != "model.width"}
            cells.append(Cell(name, "plainnet.py", overrides, labels, paper))
        else:
            overrides = _small(preset, 300, **model)
            cells.append(Cell(name, "fashion_mnist_dirac.py", overrides, labels, paper))
    seeds = {"smoke": (0,), "cpu": (0,), "paper": (0, 1, 2, 3, 4)}[preset]
    return Plan("plainnet", preset, cells, seeds)


EXPERIMENTS = {
    e.name: e
    for e in (
        Experiment(
            "depth",
            "Plain nets lose accuracy with depth and DiracNets do not: plain-100 does not "
            "converge (40%), Dirac-100 reaches 92.4%, close to Dirac-28/34.",
            "DiracNets v2 (arXiv:1706.00388v2) sec. 3.1, fig. 1",
            _depth_plan,
        ),
        Experiment(
            "scales",
            "The per-layer mean a and b evolve differently from lower to higher groups, and "
            "no layer ends with a degraded a to b ratio: every layer is used.",
            "DiracNets v2 sec. 3.3, fig. 2 (DiracNet-34 on CIFAR-10)",
            _scales_plan,
        ),
        Experiment(
            "init",
            "With W_hat = I + W and all weights from N(0, sigma^2), a ResNet converges to the "
            "same accuracy as with He init for sigma down to 1e-8, slightly worse near 1.",
            "DiracNets v2 sec. 3.4 (ResNet-28 on CIFAR-10)",
            _init_plan,
        ),
        Experiment(
            "plainnet",
            "A 100-layer plain net trains only with all three of BN, Leaky ReLU and max-norm "
            "(train/test error 0.11/5.48%); any two of them leave it near chance.",
            "Oyedotun et al., Table 1 (100 layers, USPS); errors in %",
            _plainnet_plan,
            metric="test_error",
        ),
    )
}

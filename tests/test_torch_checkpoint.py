"""Reference checkpoints in and out: `dirac_jax.torch_checkpoint` and `formats.state_dict`.

The reference nets are the PyTorch transcription `dirac_jax.torch_reference`;
every comparison is float32 logits, max abs error <= 1e-4 * max(1, max |logit|),
with random non-trivial parameters so that a dropped or swapped tensor fails.
"""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dirac_jax import torch_checkpoint
from dirac_jax import torch_reference as ref
from dirac_jax.fold import apply_folded, fold
from dirac_jax.folded import FoldedNet, FoldedStep
from dirac_jax.formats.state_dict import export_reference_folded

try:  # PyTorch is optional: the tests that compare with the reference need it.
    import torch
except ImportError:
    torch = None

# A module-level `pytest.importorskip("torch")` would also skip the torch-free tests below.
needs_torch = pytest.mark.skipif(
    torch is None, reason="needs torch: pip install 'dirac_jax[torch]'"
)
RTOL = 1e-4


def images(batch, size, seed=0):
    """NCHW torch images and the same NHWC JAX array."""
    x = torch.randn((batch, 3, size, size), generator=torch.Generator().manual_seed(seed))
    return x, jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def assert_logits_close(out, expected):
    out, expected = np.asarray(out), np.asarray(expected)
    assert out.shape == expected.shape
    scale = float(np.abs(expected).max())
    assert scale > 0.1, "degenerate logits would make the comparison vacuous"
    err = float(np.abs(out - expected).max())
    assert err <= RTOL * max(1.0, scale), (err, scale)


def as_numpy(tree):
    return jax.tree.map(np.asarray, tree)


def assert_same_variables(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------- load_reference

CONFIGS = {
    "cifar10-v2": dict(depth=10, width=0.5, dataset="cifar", num_classes=10, variant="v2"),
    "imagenet18-v2": dict(depth=18, width=0.125, dataset="imagenet", num_classes=7, variant="v2"),
    "cifar10-v1": dict(depth=10, width=0.5, dataset="cifar", num_classes=10, variant="v1"),
}


@needs_torch
@pytest.mark.parametrize(
    "name, layout",
    [
        ("cifar10-v2", "flat"),
        ("cifar10-v2", "split"),
        ("imagenet18-v2", "flat"),
        ("imagenet18-v2", "split"),
        ("cifar10-v1", "flat"),
    ],
)
def test_load_reference_matches_reference_forward(name, layout):
    cfg = CONFIGS[name]
    flat = ref.reference_params(seed=1, **cfg)
    model, variables = torch_checkpoint.load_reference(
        flat if layout == "flat" else ref.split_params_stats(flat)
    )
    size = 32 if cfg["dataset"] == "cifar" else 64
    x_torch, x = images(2, size)
    assert_logits_close(
        model.apply(variables, x, train=False), ref.reference_forward(x_torch, flat)
    )


@needs_torch
def test_layouts_and_value_types_give_identical_variables():
    flat = ref.reference_params(10, 0.5, "cifar", seed=2)
    _, from_flat = torch_checkpoint.load_reference(flat)
    _, from_split = torch_checkpoint.load_reference(ref.split_params_stats(flat))
    _, from_numpy = torch_checkpoint.load_reference({k: v.numpy() for k, v in flat.items()})
    assert_same_variables(from_flat, from_split)
    assert_same_variables(from_flat, from_numpy)
    # The mapping, spelled out for one block: OIHW -> HWIO, alpha -> a, running stats.
    block = from_flat["params"]["group1"]["block0"]
    np.testing.assert_array_equal(
        block["conv"]["w"], flat["group1.block0.conv"].numpy().transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(block["conv"]["a"], flat["group1.block0.alpha"].numpy())
    np.testing.assert_array_equal(
        from_flat["batch_stats"]["group1"]["block0"]["bn"]["var"],
        flat["group1.block0.bn.running_var"].numpy(),
    )
    np.testing.assert_array_equal(from_flat["params"]["fc"]["kernel"], flat["fc.weight"].numpy().T)


@needs_torch
@pytest.mark.parametrize(
    "cfg, expected",
    [
        (dict(depth=16, width=2, dataset="cifar", num_classes=100), (16, "cifar", 100, "v2")),
        (dict(depth=34, width=0.125, dataset="imagenet", num_classes=5), (34, "imagenet", 5, "v2")),
        (
            dict(depth=22, width=1, dataset="cifar", num_classes=10, variant="v1"),
            (22, "cifar", 10, "v1"),
        ),
        # A width with no exact float ratio: only the channel counts must come out equal.
        (dict(depth=10, width=0.3, dataset="cifar", num_classes=10), (10, "cifar", 10, "v2")),
    ],
)
def test_infers_architecture_from_shapes(cfg, expected):
    flat = ref.reference_params(**cfg)
    model, variables = torch_checkpoint.load_reference(flat)
    assert (model.depth, model.stem, model.num_classes, model.variant) == expected
    bases = (16, 32, 64) if cfg["dataset"] == "cifar" else (64, 128, 256, 512)
    assert [int(b * model.width) for b in bases] == [int(b * cfg["width"]) for b in bases]
    num = sum(v.numel() for k, v in flat.items() if not k.startswith("eye"))
    assert sum(x.size for x in jax.tree.leaves(variables)) == num


def _checkpoint():
    return ref.reference_params(10, 0.5, "cifar", seed=3)


@needs_torch
@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda p: p.pop("group1.block0.alpha"), "missing 'group1.block0.alpha'"),
        (lambda p: p.pop("bn.running_var"), "missing 'bn.running_var'"),
        (
            lambda p: p.__setitem__("group0.block1.bn.weight", torch.ones(3)),
            "'group0.block1.bn.weight' has shape (3,), expected (8,)",
        ),
        (
            lambda p: p.__setitem__("group2.block0.extra", torch.ones(3)),
            "unexpected 'group2.block0.extra'",
        ),
        (
            lambda p: p.__setitem__("eye16_16_3_3", 2 * p["eye16_16_3_3"]),
            "'eye16_16_3_3' is not the v2 Dirac delta",
        ),
        (lambda p: p.__setitem__("eye5_5_3_3", torch.zeros(5, 5, 3, 3)), "'eye5_5_3_3'"),
        (lambda p: p.pop("fc.weight"), "missing key(s) ['fc.weight']"),
        (lambda p: p.pop("group2.block1.conv"), "'group2.block1.conv'"),
        (lambda p: p.__setitem__("conv", torch.zeros(8, 3, 5, 5)), "'conv' has shape"),
    ],
)
def test_bad_checkpoint_raises_naming_the_key(corrupt, message):
    p = _checkpoint()
    corrupt(p)
    with pytest.raises(ValueError) as info:
        torch_checkpoint.load_reference(p)
    assert message in str(info.value)


@needs_torch
def test_all_problems_are_listed_in_one_error():
    p = _checkpoint()
    del p["group0.block0.beta"], p["group2.block1.bn.bias"]
    p["group1.block1.conv"] = torch.zeros(16, 16, 1, 1)
    with pytest.raises(ValueError) as info:
        torch_checkpoint.load_reference(p)
    for key in ("group0.block0.beta", "group2.block1.bn.bias", "group1.block1.conv"):
        assert key in str(info.value)


@needs_torch
def test_eye_entries_are_optional():
    flat = _checkpoint()
    _, with_eyes = torch_checkpoint.load_reference(flat)
    _, without = torch_checkpoint.load_reference(
        {k: v for k, v in flat.items() if not k.startswith("eye")}
    )
    assert_same_variables(with_eyes, without)


@needs_torch
def test_load_reference_from_a_torch_file(tmp_path):
    flat = _checkpoint()
    torch.save(flat, tmp_path / "flat.pt")
    torch.save({**ref.split_params_stats(flat), "epoch": 200}, tmp_path / "split.pt")
    _, expected = torch_checkpoint.load_reference(flat)
    for name in ("flat.pt", "split.pt"):
        model, variables = torch_checkpoint.load_reference(str(tmp_path / name))
        assert (model.depth, model.width) == (10, 0.5)
        assert_same_variables(variables, expected)


def test_modules_import_and_fail_clearly_without_torch(tmp_path):
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from dirac_jax import torch_checkpoint, torch_reference\n"
        "calls = [\n"
        f"    lambda: torch_checkpoint.load_reference({str(tmp_path / 'x.pt')!r}),\n"
        "    lambda: torch_reference.reference_params(10, 1),\n"
        "    lambda: torch_reference.synthetic_train_step(10, 1, 2),\n"
        "]\n"
        "for call in calls:\n"
        "    try:\n"
        "        call()\n"
        "    except ImportError as e:\n"
        "        print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.count("pip install 'dirac_jax[torch]'") == 3, out.stdout


# ----------------------------------------------------- published folded module


@pytest.fixture(scope="module")
def published():
    """A random published folded DiracNet-18 (full widths) and its load."""
    module = ref.randomize_(ref.folded_module(18), seed=4).eval()
    sd = module.state_dict()
    return module, sd, torch_checkpoint.load_reference_folded(sd)


@needs_torch
def test_load_reference_folded_matches_the_torch_module(published):
    module, _, folded = published
    x_torch, x = images(2, 64, seed=5)
    with torch.no_grad():
        expected = module(x_torch).numpy()
    assert_logits_close(jax.jit(apply_folded)(folded, x), expected)


@needs_torch
def test_export_reference_folded_round_trip_is_exact(published):
    module, sd, folded = published
    back = export_reference_folded(folded)
    assert list(back) == list(sd)
    for k, v in sd.items():
        assert back[k].dtype == np.float32 and back[k].shape == tuple(v.shape)
        np.testing.assert_array_equal(back[k], v.numpy())
    fresh = ref.folded_module(18)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    x_torch, _ = images(1, 64, seed=6)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x_torch), module(x_torch))


@needs_torch
def test_load_reference_folded_rejects_bad_state_dicts(published):
    _, sd, _ = published
    broken = dict(sd)
    del broken["features.group2.block3.conv.bias"]
    broken["features.group0.block0.conv.weight"] = torch.zeros(64, 64, 1, 1)
    broken["features.bn.weight"] = torch.ones(64)
    with pytest.raises(ValueError) as info:
        torch_checkpoint.load_reference_folded(broken)
    for key in ("group2.block3.conv.bias", "group0.block0.conv.weight", "features.bn.weight"):
        assert key in str(info.value)
    shallow = {k: v for k, v in sd.items() if "group3.block3" not in k}
    with pytest.raises(ValueError, match="block counts"):
        torch_checkpoint.load_reference_folded(shallow)


@needs_torch
def test_reference_to_jax_fold_to_torch_folded_module():
    """Train in the reference -> load_reference -> fold -> export -> the published module."""
    flat = ref.reference_params(18, 0.125, "imagenet", num_classes=10, seed=7)
    model, variables = torch_checkpoint.load_reference(flat)
    sd = export_reference_folded(fold(model, variables))
    module = ref.folded_module(18, width=0.125, num_classes=10)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    x_torch, _ = images(2, 64, seed=8)
    with torch.no_grad():
        assert_logits_close(module.eval()(x_torch), ref.reference_forward(x_torch, flat))


@needs_torch
def test_export_reference_folded_rejects_other_chains(published):
    _, _, folded = published
    cifar_model, cifar_vars = torch_checkpoint.load_reference(_checkpoint())
    with pytest.raises(ValueError, match="ImageNet stem"):
        export_reference_folded(fold(cifar_model, cifar_vars))
    # v1 blocks: NCReLU instead of ReLU is another function, not the published module.
    steps = tuple(FoldedStep("ncrelu") if s.kind == "relu" else s for s in folded.steps)
    with pytest.raises(ValueError, match=r"group 0 has no \[relu, conv\] blocks"):
        export_reference_folded(FoldedNet(params=folded.params, steps=steps))
    # A stride-1 stem would change every spatial size.
    steps = (FoldedStep("conv", ((1, 1), ((3, 3), (3, 3)))), *folded.steps[1:])
    with pytest.raises(ValueError, match="expected conv args"):
        export_reference_folded(FoldedNet(params=folded.params, steps=steps))

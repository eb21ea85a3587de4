"""Properties of `dirac_jax.fold`: the folded chain computes the model's eval function."""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _bn import random_bn_stats

from dirac_jax import config_schema, folded, models
from dirac_jax import fold as fold_lib
from dirac_jax.fold import apply_folded, fold, num_params
from dirac_jax.folded import KINDS, FoldedNet
from dirac_jax.models import MODEL_NAMES, count_params, get_model

# name, kwargs, image size: tiny widths keep CPU convs fast; the ImageNet stem on 32x32
# still ends on a 1x1 map (32 -> 16 -> 8 -> 4 -> 2 -> 1).
CONFIGS = {
    "v2-cifar-10": ("diracnet", dict(depth=10, width=0.25), 32),
    "v2-cifar-16": ("diracnet", dict(depth=16, width=0.25), 16),
    "v2-imagenet-18": ("diracnet", dict(depth=18, width=0.125, stem="imagenet"), 32),
    "plain-cifar-10": ("plain", dict(depth=10, width=0.25), 32),
    "plain-imagenet-18": ("plain", dict(depth=18, width=0.125, stem="imagenet"), 32),
    "v1-cifar-10": ("diracnet_v1", dict(depth=10, width=0.25), 32),
    "v1-imagenet-18": ("diracnet_v1", dict(depth=18, width=0.125, stem="imagenet"), 32),
}


def random_variables(model, x, seed):
    """Random variables for `model`, with every term of the fold non-trivial.

    At init BN is nearly the identity and `a = 1`, so a fold that dropped the
    mean, the variance or `a` would still pass; here BN statistics, BN affine
    terms and Dirac `a`, `b` are random. Drawn with NumPy from `eval_shape`
    structures: `model.init` would compile every random op eagerly (seconds).
    """
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
    draws = {
        "mean": lambda s: 0.5 * rng.standard_normal(s),
        "var": lambda s: rng.uniform(0.5, 2.0, s),
        "scale": lambda s: rng.uniform(0.5, 1.5, s),
        "bias": lambda s: 0.2 * rng.standard_normal(s),
        "a": lambda s: rng.uniform(0.5, 1.5, s),
        "b": lambda s: rng.uniform(0.05, 0.5, s),
        # He-normal convs and a fan-in-scaled classifier keep activations of order one.
        "w": lambda s: rng.standard_normal(s) * np.sqrt(2.0 / np.prod(s[:-1])),
        "kernel": lambda s: rng.standard_normal(s) / np.sqrt(s[0]),
    }
    return jax.tree_util.tree_map_with_path(
        lambda path, a: jnp.asarray(draws[path[-1].key](a.shape), jnp.float32), shapes
    )


@functools.cache
def setup(config):
    name, kwargs, size = CONFIGS[config]
    model = get_model(name, num_classes=5, **kwargs)
    x = jax.random.normal(jax.random.key(1), (2, size, size, 3))
    return model, random_variables(model, x, seed=2), x


def fold_shapes(model, variables):
    """`fold` traced without running: the steps and parameter shapes, no compiles."""
    return jax.eval_shape(lambda v: fold(model, v), variables)


def max_abs(a, b):
    return float(jnp.max(jnp.abs(jnp.asarray(a) - jnp.asarray(b))))


@pytest.mark.accelerator
@pytest.mark.parametrize("config", list(CONFIGS))
def test_folded_equals_model_float32(config):
    model, variables, x = setup(config)
    want = jax.jit(functools.partial(model.apply, train=False))(variables, x)
    # One compiled program: eager fold compiles every op separately (the purity test runs it).
    got = jax.jit(lambda v, x: apply_folded(fold(model, v), x))(variables, x)
    assert got.dtype == jnp.float32 and got.shape == want.shape
    # Logits of order one, so an absolute bound of 1e-4 is a real test.
    assert float(jnp.std(want)) > 0.1
    assert max_abs(got, want) < 1e-4


@pytest.mark.accelerator
def test_folded_equals_model_at_tensorfloat32():
    # TF32 (NVIDIA GPUs' default float32 conv math) rounds the conv inputs to 10 mantissa
    # bits (unit roundoff 2^-11), differently on the two sides; a wrong fold is off by O(1).
    # The CPU ignores the precision: float32 there, and the float32 bound.
    model, variables, x = setup("v2-cifar-16")
    with jax.default_matmul_precision("tensorfloat32"):
        want = jax.jit(functools.partial(model.apply, train=False))(variables, x)
        got = jax.jit(lambda v, x: apply_folded(fold(model, v), x))(variables, x)
    assert float(jnp.std(want)) > 0.1
    scale = float(jnp.max(jnp.abs(want)))
    assert max_abs(got, want) < (1e-4 if jax.default_backend() == "cpu" else 1e-2 * scale)


@pytest.mark.parametrize("config", ["v2-cifar-10", "v2-imagenet-18", "v1-cifar-10"])
def test_folded_equals_model_float64(config):
    name, kwargs, _ = CONFIGS[config]
    _, variables, x = setup(config)
    with jax.enable_x64(True):
        model = get_model(name, num_classes=5, dtype=jnp.float64, **kwargs)
        v64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
        x64 = jnp.asarray(x, jnp.float64)

        # DiracNet.__call__ casts its logits to float32, so read the fc output instead.
        def reference(v, x):
            _, state = model.apply(
                v, x, train=False, capture_intermediates=True, mutable=["intermediates"]
            )
            return state["intermediates"]["fc"]["__call__"][0]

        want = jax.jit(reference)(v64, x64)
        got = jax.jit(lambda v, x: apply_folded(fold(model, v, dtype=jnp.float64), x))(v64, x64)
        assert want.dtype == got.dtype == jnp.float64
        assert float(jnp.std(want)) > 0.1
        assert max_abs(got, want) < 1e-10


def expected_kinds(stem, variant, blocks_per_group):
    act = "ncrelu" if variant == "v1" else "relu"
    kinds = ["conv", "relu"] if stem == "cifar" else ["conv", "max_pool"]
    for g, count in enumerate(blocks_per_group):
        kinds += ["max_pool"] * (g > 0) + [act, "conv"] * count
    return kinds + ["relu"] * (variant != "v1") + ["avg_pool", "dense"]


@pytest.mark.parametrize(
    "config, blocks",
    [
        ("v2-cifar-10", (2, 2, 2)),
        ("v2-cifar-16", (4, 4, 4)),
        ("v2-imagenet-18", (4, 4, 4, 4)),
        ("plain-imagenet-18", (4, 4, 4, 4)),
        ("v1-cifar-10", (2, 2, 2)),
        ("v1-imagenet-18", (4, 4, 4, 4)),
    ],
)
def test_step_kinds_are_the_published_chain(config, blocks):
    model, variables, _ = setup(config)
    folded = fold_shapes(model, variables)
    kinds = [s.kind for s in folded.steps]
    assert kinds == expected_kinds(model.stem, model.variant, blocks)
    assert "bn" not in kinds and set(kinds) <= set(KINDS)
    # One folded conv per conv of the model, each with a bias.
    num_convs = sum(
        1 for p, _ in jax.tree_util.tree_leaves_with_path(variables["params"]) if p[-1].key == "w"
    )
    assert kinds.count("conv") == num_convs
    if model.stem == "imagenet":
        assert kinds.count("conv") + kinds.count("dense") == model.depth
    for step, p in zip(folded.steps, folded.params, strict=True):
        if step.kind in ("conv", "dense"):
            assert sorted(p) == ["bias", "kernel"] and p["bias"].shape == p["kernel"].shape[-1:]
        else:
            assert p == {}


def test_imagenet_stem_and_pool_args():
    model, variables, _ = setup("v2-imagenet-18")
    folded = fold_shapes(model, variables)
    stem, pool0 = folded.steps[:2]
    assert stem.args == ((2, 2), ((3, 3), (3, 3)))
    assert folded.params[0]["kernel"].shape == (7, 7, 3, 8)
    assert pool0.args == (3, 2, 1)
    group_pools = [s.args for s in folded.steps[2:] if s.kind == "max_pool"]
    assert group_pools == [(2, 2, 0)] * 3
    block_convs = [s.args for s in folded.steps[1:] if s.kind == "conv"]
    assert set(block_convs) == {((1, 1), ((1, 1), (1, 1)))}


def test_v1_ncrelu_doubles_the_conv_inputs():
    model, variables, _ = setup("v1-cifar-10")
    folded = fold_shapes(model, variables)
    outs = None
    for step, p in zip(folded.steps, folded.params, strict=True):
        if step.kind == "conv":
            if outs is not None:  # every conv after the stem follows an NCReLU.
                assert p["kernel"].shape[2] == 2 * outs
            outs = p["kernel"].shape[3]
    assert num_params(folded) < count_params(variables["params"])


def test_v2_with_b_zero_folds_to_a_scaled_delta():
    model, variables, _ = setup("v2-cifar-10")
    variables = jax.tree_util.tree_map_with_path(
        lambda p, a: jnp.zeros_like(a) if p[-1].key == "b" else a, variables
    )
    folded = fold(model, variables)
    conv = folded.params[3]  # group0.block0: conv, relu, relu, conv.
    block = variables["params"]["group0"]["block0"]
    stats = variables["batch_stats"]["group0"]["block0"]["bn"]
    s = block["bn"]["scale"] / jnp.sqrt(stats["var"] + 1e-5)
    want = np.zeros(conv["kernel"].shape, np.float32)
    want[1, 1] = np.diag(np.asarray(block["conv"]["a"] * s))
    np.testing.assert_allclose(conv["kernel"], want, rtol=1e-6, atol=0)
    np.testing.assert_allclose(
        conv["bias"], block["bn"]["bias"] - stats["mean"] * s, rtol=1e-6, atol=1e-7
    )


def test_fold_is_pure_and_jittable():
    model, variables, _ = setup("v2-cifar-10")
    before = copy.deepcopy(jax.tree.map(np.asarray, variables))
    a, b = fold(model, variables), fold(model, variables)
    assert a.steps == b.steps
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, variables))
    jitted = jax.jit(lambda v: fold(model, v))(variables)
    assert isinstance(jitted, FoldedNet) and jitted.steps == a.steps
    jax.tree.map(
        functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7), jitted.params, a.params
    )


def test_apply_folded_jit_equals_eager():
    model, variables, x = setup("v2-imagenet-18")
    folded = jax.jit(lambda v: fold(model, v))(variables)
    eager = apply_folded(folded, x)
    jitted = jax.jit(apply_folded)(folded, x)
    assert max_abs(eager, jitted) < 1e-5


@pytest.mark.parametrize(
    "name, kwargs, why",
    [
        ("wrn", dict(depth=10, width=1), "fold_kernels folds their kernels"),
        ("resnet", dict(depth=18), "fold_kernels folds their kernels"),
        ("plainnet", {}, "PlainNet: it has no fold"),
    ],
)
def test_fold_rejects_non_chains(name, kwargs, why):
    with pytest.raises(ValueError, match=f"DiracNet variants .*MobileNet.*ChainFoldable.*{why}"):
        fold(get_model(name, **kwargs), {"params": {}, "batch_stats": {}})
    if name == "plainnet":
        with pytest.raises(ValueError, match="it has no fold"):
            fold_lib.deployable(get_model(name, **kwargs), {"params": {}, "batch_stats": {}})


def test_each_model_says_how_it_folds_and_the_trainer_groups_agree():
    folds = {name: get_model(name).folds for name in MODEL_NAMES}
    assert set(folds.values()) == {"chain", "kernels", None}
    chains = tuple(n for n, how in folds.items() if how == "chain")
    foldable = tuple(n for n, how in folds.items() if how is not None)
    assert set(config_schema.CHAIN_MODELS) == set(chains)
    assert set(config_schema.FOLDABLE_MODELS) == set(foldable)
    for name, how in folds.items():  # each model satisfies the contract of its kind of fold
        model = get_model(name)
        assert isinstance(model, folded.ChainFoldable) == (how == "chain")
        assert isinstance(model, folded.KernelFoldable) == (how == "kernels")
        assert callable(getattr(model, "fold_chain", None)) == (how == "chain")
        assert callable(getattr(model, "plain_twin", None)) == (how == "kernels")


def test_one_bn_epsilon_for_the_models_and_the_fold():
    # With zero running variances the BN divides by sqrt(eps) alone: any other eps in the
    # fold than in the model's BatchNorm changes the logits by orders of magnitude.
    assert models.BN_EPSILON is folded.BN_EPSILON
    model, variables, x = setup("v2-cifar-10")
    stats = jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.zeros_like(v) if path[-1].key == "var" else v,
        variables["batch_stats"],
    )
    variables = {**variables, "batch_stats": stats}
    want = model.apply(variables, x, train=False)
    got = apply_folded(fold(model, variables), x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))


def test_renamed_names_raise_an_error_that_names_the_new_one():
    import dirac_jax
    from dirac_jax import evaluate

    renamed = [
        (fold_lib, "folded_apply", r"renamed: use dirac_jax\.fold\.deployable"),
        (dirac_jax, "fold_net", r"removed: use dirac_jax\.fold\.fold"),
        (evaluate, "metrics_of", r"removed: use dirac_jax\.steps\.classification_metrics"),
    ]
    for module, old, new in renamed:
        with pytest.raises(AttributeError, match=f"{old} was {new}"):
            getattr(module, old)
        assert old not in module.__all__ and not hasattr(module, old)
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        fold_lib.nope  # noqa: B018


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("wrn", dict(depth=10, width=0.25, symmetry="triangular", symmetry_axis="both")),
        ("wrn", dict(depth=11, width=0.25, block="bottleneck", symmetry="eigen")),
        ("wrn", dict(depth=10, width=0.25, dirac_init_sigma=1e-2)),
        ("resnet", dict(depth=18, width=0.125, symmetry="ldl")),
        ("resnet", dict(depth=50, width=0.0625, dirac_init_sigma=0.1)),
    ],
)
@pytest.mark.accelerator
def test_fold_kernels_gives_a_plain_residual_net_with_the_same_logits(name, kwargs):
    model = get_model(name, num_classes=5, **kwargs)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)
    variables["batch_stats"] = random_bn_stats(variables["batch_stats"])
    plain, plain_variables = fold_lib.fold_kernels(model, variables)
    assert plain.symmetry is None and plain.dirac_init_sigma is None
    convs = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(plain_variables["params"])
        if path[-1].key == "w"
    ]
    assert convs and all(c.ndim == 4 for c in convs)
    got = jax.jit(lambda v: plain.apply(v, x, train=False))(plain_variables)
    want = jax.jit(lambda v: model.apply(v, x, train=False))(variables)
    assert max_abs(got, want) < 1e-5 * max(1.0, float(jnp.abs(want).max()))


def test_fold_kernels_rejects_chains_and_other_models_variables():
    model, variables, _ = setup("v2-cifar-10")
    with pytest.raises(ValueError, match=r"WideResNet or ResNet.*fold\(\)"):
        fold_lib.fold_kernels(model, variables)
    wrn = get_model("wrn", depth=10, width=0.25, num_classes=5, symmetry="triangular")
    x = jnp.zeros((1, 32, 32, 3))
    free = get_model("wrn", depth=10, width=0.25, num_classes=5)
    other = jax.eval_shape(lambda: free.init(jax.random.key(0), x, train=False))
    with pytest.raises(ValueError, match="same variant, width and symmetry"):
        jax.eval_shape(lambda v: fold_lib.fold_kernels(wrn, v), other)


def test_fold_rejects_bad_variables():
    model, variables, _ = setup("v2-cifar-10")
    with pytest.raises(ValueError, match="batch_stats"):
        fold(model, {"params": variables["params"]})
    with pytest.raises(ValueError, match="params"):
        fold(model, variables["params"]["conv"])
    wider = get_model("diracnet", depth=10, width=0.5, num_classes=5)
    with pytest.raises(ValueError, match="belong to this model"):
        fold(wider, variables)
    with pytest.raises(ValueError, match="same variant"):
        fold(get_model("diracnet", depth=10, width=0.25, num_classes=5), setup("plain-cifar-10")[1])
    with pytest.raises(ValueError, match="no entry 'block2'"):
        fold(get_model("diracnet", depth=16, width=0.25, num_classes=5), variables)
    with pytest.raises(ValueError, match="floating"):
        fold(model, variables, dtype=jnp.int32)


def test_bench_matching_resnet_is_nearest_in_params():
    from benchmarks.fold_latency import matching_resnet, param_count

    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    target = param_count(get_model("diracnet", depth=10, width=0.5), x)
    label, model, count = matching_resnet("cifar", 10, target, x, num_classes=10)
    m = round(model.width * 16)
    assert label == f"WRN-10-{m / 16:g}" and count == param_count(model, x)
    for other in (m - 1, m + 1):  # whole channel counts on either side are farther.
        neighbour = param_count(get_model("wrn", depth=10, width=other / 16), x)
        assert abs(neighbour - target) >= abs(count - target)


def test_bench_timing_is_round_robin_and_rotated():
    from benchmarks import _timing

    calls = []
    candidates = {name: functools.partial(calls.append, name) for name in "abc"}
    times = _timing.interleaved_times(candidates, repeats=3)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert calls == list("abcbcacab")  # each round runs all, starting one later.

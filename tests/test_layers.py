"""Tests for dirac_jax.layers: Linen, NNX and plain-JAX param convs, exact bf16, conv+BN fold."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dirac_jax import param
from dirac_jax.folded import fold_conv_bn
from dirac_jax.layers import NNXParamConv, ParamConv, conv, identity_term, param_conv

_LAYOUTS = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}

# (spatial axes, input size, kernel, in, out, groups, strides, dilation, padding)
CASES = [
    (1, (11,), (3,), 4, 6, 2, 1, 1, "SAME"),
    (1, (12,), (5,), 6, 6, 3, 2, 2, "VALID"),
    (2, (9, 8), (3, 3), 8, 4, 4, (2, 1), 1, "SAME"),
    (2, (7, 7), (3, 1), 4, 8, 1, 1, (2, 1), ((1, 2), (0, 1))),
    (3, (5, 4, 6), (3, 3, 3), 4, 4, 2, 1, 1, "SAME"),
    (3, (6, 5, 5), (1, 3, 3), 6, 3, 3, (1, 2, 2), 1, 1),
]


def _reference(x, kernel, strides, dilation, padding, groups):
    """`jax.lax.conv_general_dilated` itself, with padding spelled as lax takes it."""
    n = kernel.ndim - 2
    tup = lambda v: (v,) * n if isinstance(v, int) else tuple(v)
    if isinstance(padding, int):
        padding = ((padding, padding),) * n
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=tup(strides),
        padding=padding,
        rhs_dilation=tup(dilation),
        dimension_numbers=_LAYOUTS[n],
        feature_group_count=groups,
        precision=jax.lax.Precision.HIGHEST,
    )


def _x(spatial, c, seed=1):
    return jax.random.normal(jax.random.key(seed), (2, *spatial, c))


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}d-g{c[5]}")
def test_linen_param_conv_equals_lax_conv_on_the_transform_kernel(case):
    n, spatial, window, cin, cout, groups, strides, dilation, padding = case
    factory = functools.partial(param.dirac, groups=groups)
    layer = ParamConv(
        cout,
        window,
        factory,
        strides,
        padding,
        kernel_dilation=dilation,
        feature_group_count=groups,
        use_bias=True,
        precision=jax.lax.Precision.HIGHEST,
    )
    x = _x(spatial, cin)
    variables = layer.init(jax.random.key(0), x)
    p = variables["params"]
    assert p["w"].shape == (*window, cin // groups, cout)
    p = {**p, "bias": jnp.arange(cout, dtype=jnp.float32)}
    kernel = factory(p["w"].shape).apply({k: p[k] for k in ("w", "a", "b")})
    expected = _reference(x, kernel, strides, dilation, padding, groups) + p["bias"]
    got = layer.apply({"params": p}, x)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}d-g{c[5]}")
def test_nnx_param_conv_equals_lax_conv_on_the_transform_kernel(case):
    n, spatial, window, cin, cout, groups, strides, dilation, padding = case
    factory = functools.partial(param.dirac, groups=groups)
    layer = NNXParamConv(
        cin,
        cout,
        window,
        factory,
        strides=strides,
        padding=padding,
        kernel_dilation=dilation,
        feature_group_count=groups,
        precision=jax.lax.Precision.HIGHEST,
        rngs=nnx.Rngs(0),
    )
    x = _x(spatial, cin)
    kernel = factory((*window, cin // groups, cout)).apply(layer.raw)
    expected = _reference(x, kernel, strides, dilation, padding, groups)
    np.testing.assert_allclose(layer(x), expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(layer.kernel(), kernel)
    # Trainable like any NNX module: gradients reach every raw parameter.
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
    assert sorted(nnx.state(grads, nnx.Param)) == ["a", "b", "w"]


def test_linen_and_nnx_hold_the_transform_raw_tree():
    t = param.dirac((3, 3, 4, 8))
    shapes = jax.tree.map(jnp.shape, t.init(jax.random.key(0)))
    linen = ParamConv(8, (3, 3)).init(jax.random.key(0), jnp.zeros((1, 5, 5, 4)))
    nnx_layer = NNXParamConv(4, 8, 3, rngs=nnx.Rngs(0))
    assert jax.tree.map(jnp.shape, linen["params"]) == shapes
    assert jax.tree.map(jnp.shape, nnx_layer.raw) == shapes
    for raw in (linen["params"], nnx_layer.raw):
        np.testing.assert_array_equal(raw["a"], 1.0)
        np.testing.assert_array_equal(raw["b"], np.float32(0.1))


def test_param_dtype_stores_params_and_dtype_sets_the_output():
    layer = ParamConv(4, (3,), param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    variables = layer.init(jax.random.key(0), jnp.zeros((1, 6, 4)))
    assert {v.dtype for v in jax.tree.leaves(variables)} == {jnp.dtype(jnp.bfloat16)}
    assert layer.apply(variables, jnp.ones((1, 6, 4))).dtype == jnp.bfloat16
    nnx_layer = NNXParamConv(4, 4, 3, ndim=1, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert {v.dtype for v in jax.tree.leaves(nnx.state(nnx_layer, nnx.Param))} == {
        jnp.dtype(jnp.bfloat16)
    }


_GEOMETRIES = [
    ((3, 3), 1, "SAME", 1),
    ((3, 5), (2, 1), "VALID", (1, 2)),
    ((4, 2), 2, ((2, 0), (1, 1)), 1),
]
_IDENTITY_CASES = [
    (param.dirac, 6, 6, 1),
    (param.dirac, 4, 7, 1),  # truncated: out > in, the extra filters have no delta
    (param.dirac, 8, 5, 1),  # truncated: in > out
    (functools.partial(param.dirac, groups=2), 6, 4, 2),
    (param.dirac, 6, 6, 3),  # delta groups 1 in a grouped conv: only group 0 passes x
    (param.dirac_v1, 8, 4, 1),  # v1: in = 2 out, the delta sums two input blocks
    (param.dirac_v1, 3, 6, 1),  # v1: out = 2 in, the delta tiles the input
    (functools.partial(param.dirac_residual, sigma=0.1), 5, 5, 1),
]


# The geometries cycle over the kernel cases (9 tests, not 24); the first case meets two.
@pytest.mark.accelerator
@pytest.mark.parametrize(
    "factory, cin, cout, groups, window, strides, padding, dilation",
    [(*c, *_GEOMETRIES[i % 3]) for i, c in enumerate(_IDENTITY_CASES + _IDENTITY_CASES[:1])],
)
def test_identity_split_equals_the_whole_kernel_conv(
    factory, cin, cout, groups, window, strides, padding, dilation
):
    t = factory((*window, cin // groups, cout))
    raw = t.init(jax.random.key(0))
    raw = {k: v + 0.3 if k in ("a", "b") else v for k, v in raw.items()}
    x = _x((9, 10), cin)
    kw = dict(strides=strides, padding=padding, dilation=dilation, groups=groups)
    whole = _reference(x, t.apply(raw), strides, dilation, padding, groups)
    split = param_conv(x, t, raw, exact_identity=True, precision=jax.lax.Precision.HIGHEST, **kw)
    np.testing.assert_allclose(split, whole, atol=1e-5, rtol=1e-5)
    # identity_term is the delta conv exactly, and the delta is the kernel's identity part.
    delta = param.dirac_delta(
        t.kernel_shape,
        mode="repeat" if factory is param.dirac_v1 else "truncate",
        groups=getattr(factory, "keywords", {}).get("groups", 1),
    )
    np.testing.assert_array_equal(
        identity_term(x, t.identity, t.kernel_shape, **kw),
        _reference(x, delta, strides, dilation, padding, groups),
    )
    np.testing.assert_allclose(
        t.identity.scale(raw) * delta + t.identity.rest(raw), t.apply(raw), atol=1e-6
    )


def _centre_only_dirac(channels, b):
    """A Dirac conv whose W is non-zero only at the centre diagonal taps: W_norm = I there.

    Its kernel's centre diagonal is `a + b`: with `a = 1` and `b` just below
    bfloat16's half spacing at 1 (2^-8), a bfloat16 cast rounds it to exactly 1.
    """
    t = param.dirac((3, 3, channels, channels))
    w = np.zeros((3, 3, channels, channels), np.float32)
    w[1, 1] = np.eye(channels)
    raw = {"w": jnp.asarray(w), "a": jnp.ones(channels), "b": jnp.full(channels, b)}
    return t, raw


@pytest.mark.accelerator
def test_bf16_dirac_conv_keeps_the_w_term_at_the_centre_taps():
    b = 0.0038
    t, raw = _centre_only_dirac(16, b)
    t0, raw0 = _centre_only_dirac(16, 0.0)
    x = _x((12, 12), 16).astype(jnp.bfloat16)  # a bf16 net's activations
    y32 = param_conv(x.astype(jnp.float32), t, raw, dtype=jnp.float32)
    y16 = param_conv(x, t, raw, dtype=jnp.bfloat16)
    y16_no_w = param_conv(x, t0, raw0, dtype=jnp.bfloat16)
    assert y16.dtype == jnp.bfloat16
    y16, y16_no_w = np.asarray(y16, np.float32), np.asarray(y16_no_w, np.float32)
    # Elementwise within bf16 rounding of the output (unit roundoff 2^-8).
    np.testing.assert_allclose(y16, y32, rtol=2.0**-8, atol=0)
    # Correctly rounded: the float32 result rounded to bf16, but for rare ties of the
    # conv's own rounding; so the W term at the centre taps reaches the output.
    rounded = np.asarray(jnp.asarray(y32).astype(jnp.bfloat16), np.float32)
    assert np.mean(y16 == rounded) > 0.97
    assert np.mean(y16 != y16_no_w) > 0.9
    # The cast-then-conv this replaces rounds the tap 1 + b to 1: the W term vanishes,
    # and the outputs are mostly one bf16 step off the rounded float32 ones.
    cast = np.asarray(param_conv(x, t, raw, dtype=jnp.bfloat16, exact_identity=False), np.float32)
    cast_no_w = np.asarray(
        param_conv(x, t0, raw0, dtype=jnp.bfloat16, exact_identity=False), np.float32
    )
    assert np.array_equal(cast, cast_no_w)
    assert np.mean(cast == rounded) < 0.2


@pytest.mark.accelerator
def test_bf16_dirac_conv_matches_float32_for_trained_like_weights():
    # A random W: the bf16 conv differs from float32 by bf16 rounding only, and less than
    # the cast-then-conv on the identity-dominated outputs.
    t = param.dirac((3, 3, 32, 32))
    raw = t.init(jax.random.key(0))
    x = _x((10, 10), 32).astype(jnp.bfloat16)
    y32 = np.asarray(param_conv(x.astype(jnp.float32), t, raw, dtype=jnp.float32))
    y16 = np.asarray(param_conv(x, t, raw, dtype=jnp.bfloat16), np.float32)
    cast = np.asarray(param_conv(x, t, raw, dtype=jnp.bfloat16, exact_identity=False), np.float32)
    scale = np.abs(y32).mean()
    assert np.abs(y16 - y32).max() < 2.0**-7 * np.abs(y32).max()
    assert np.abs(y16 - y32).mean() < np.abs(cast - y32).mean()
    assert np.abs(y16 - y32).mean() < 2.0**-9 * scale


def test_fold_conv_bn_of_a_linen_layer_and_batch_norm():
    class ConvBN(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = ParamConv(6, (3,), use_bias=True, name="conv")(x)
            return nn.BatchNorm(use_running_average=True, name="bn")(x)

    x = _x((9,), 6)
    model = ConvBN()
    variables = model.init(jax.random.key(0), x)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda v: v + rng.normal(size=v.shape).astype(np.float32) * 0.1,
                          variables["params"])  # fmt: skip
    stats = {"bn": {"mean": jnp.asarray(rng.normal(size=6), jnp.float32),
                    "var": jnp.asarray(rng.uniform(0.5, 2, size=6), jnp.float32)}}  # fmt: skip
    conv_p, bn_p = params["conv"], params["bn"]
    kernel = param.dirac((3, 6, 6)).apply({k: conv_p[k] for k in ("w", "a", "b")})
    folded = fold_conv_bn(
        kernel,
        mean=stats["bn"]["mean"],
        var=stats["bn"]["var"],
        scale=bn_p["scale"],
        bn_bias=bn_p["bias"],
        conv_bias=conv_p["bias"],
    )
    expected = model.apply({"params": params, "batch_stats": stats}, x)
    got = conv(x, folded["kernel"]) + folded["bias"]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_fold_conv_bn_of_an_nnx_layer_and_batch_norm():
    rngs = nnx.Rngs(0)
    layer = NNXParamConv(4, 4, (3, 3, 3), rngs=rngs)
    bn = nnx.BatchNorm(4, use_running_average=True, rngs=rngs)
    bn.mean[...] = jnp.array([0.1, -0.2, 0.3, 0.0])
    bn.var[...] = jnp.array([1.5, 0.7, 1.0, 2.0])
    bn.scale[...] = jnp.array([1.0, 2.0, 0.5, 1.0])
    x = _x((4, 5, 4), 4)
    folded = fold_conv_bn(
        layer.kernel(), mean=bn.mean[...], var=bn.var[...], scale=bn.scale[...],
        bn_bias=bn.bias[...], epsilon=bn.epsilon,
    )  # fmt: skip
    np.testing.assert_allclose(conv(x, folded["kernel"]) + folded["bias"], bn(layer(x)), atol=1e-5)


def test_bad_arguments_raise_one_clear_error():
    with pytest.raises(ValueError, match="feature_group_count=3 must divide"):
        ParamConv(4, (3, 3), feature_group_count=3).init(jax.random.key(0), jnp.zeros((1, 5, 5, 6)))
    with pytest.raises(ValueError, match="add a batch axis"):
        ParamConv(4, (3, 3)).init(jax.random.key(0), jnp.zeros((5, 5, 4)))
    with pytest.raises(ValueError, match="strides must be"):
        conv(jnp.zeros((1, 5, 5, 4)), jnp.zeros((3, 3, 4, 4)), strides=(1, 1, 1))
    with pytest.raises(ValueError, match="padding 'CIRCULAR' is not supported"):
        conv(jnp.zeros((1, 5, 4)), jnp.zeros((3, 4, 4)), padding="CIRCULAR")
    with pytest.raises(ValueError, match="needs a transform with a Dirac identity part"):
        t = param.plain((3, 4, 4))
        param_conv(jnp.zeros((1, 5, 4)), t, t.init(jax.random.key(0)), exact_identity=True)
    with pytest.raises(ValueError, match="kernel shape .* does not fit"):
        conv(jnp.zeros((1, 5, 6)), jnp.zeros((3, 4, 4)))
    with pytest.raises(ValueError, match="fold_conv_bn: the kernel has 4 output channels"):
        fold_conv_bn(jnp.zeros((3, 4, 4)), mean=jnp.zeros(3), var=jnp.ones(4))


def test_bf16_bench_finds_the_split_more_exact_than_the_cast():
    from benchmarks import bf16

    args = bf16.options(channels=8, size=8, batch=4, repeats=1)
    results = bf16.run(args)
    variants = results["variants"]
    split, cast = variants["split"], variants["cast"]
    assert split["rel_rms_error"] < cast["rel_rms_error"]
    assert split["correctly_rounded"] > cast["correctly_rounded"]
    assert variants["split_f32conv"]["rel_rms_error"] == pytest.approx(split["rel_rms_error"])
    assert "| split |" in bf16.report(results)

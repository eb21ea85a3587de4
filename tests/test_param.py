"""Properties of `dirac_jax.param`: identities, equivalences, exact counts."""

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dirac_jax import param


def conv(x, kernel, groups=1):
    """SAME-padded stride-1 conv of NH..C inputs with a Flax-layout kernel."""
    nd = kernel.ndim - 2
    spatial = "DHW"[-nd:] if nd > 1 else "W"
    dn = jax.lax.conv_dimension_numbers(
        x.shape, kernel.shape, (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
    )
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        (1,) * nd,
        "SAME",
        dimension_numbers=dn,
        feature_group_count=groups,
        precision=jax.lax.Precision.HIGHEST,
    )


# ---------------------------------------------------------------- dirac_delta


@pytest.mark.accelerator
@pytest.mark.parametrize("nd", [1, 2, 3])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_delta_conv_is_exact_identity(nd, k):
    c = 6
    x = jax.random.normal(jax.random.key(nd * 10 + k), (2, *([7] * nd), c))
    y = conv(x, param.dirac_delta((k,) * nd + (c, c)))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


def torch_dirac_rule(shape_oi_k, groups):
    """A transcription of `torch.nn.init.dirac_` in OIHW layout (numpy)."""
    out, inp, *ks = shape_oi_k
    t = np.zeros(shape_oi_k, np.float32)
    per = out // groups
    for g in range(groups):
        for d in range(min(per, inp)):
            t[(g * per + d, d, *[k // 2 for k in ks])] = 1
    return t


def to_flax(oik):
    """OI(spatial) -> (spatial)IO."""
    return np.transpose(oik, (*range(2, oik.ndim), 1, 0))


TRUNCATE_SHAPES = [  # (out, in, *spatial), groups
    ((4, 4, 3, 3), 1),
    ((8, 4, 3, 3), 1),
    ((4, 8, 3, 3), 1),
    ((6, 6, 2, 2), 1),
    ((6, 3, 4, 4), 3),
    ((8, 2, 3, 3), 4),
    ((8, 4, 3), 2),
    ((5, 5, 5), 1),
    ((4, 2, 3, 3, 3), 2),
    ((3, 7, 2, 4, 3), 1),
    ((12, 5, 1, 1), 3),
    ((9, 9, 2), 3),
]


@pytest.mark.parametrize("shape,groups", TRUNCATE_SHAPES)
def test_truncate_matches_torch_rule(shape, groups):
    expected = to_flax(torch_dirac_rule(shape, groups))
    got = param.dirac_delta(expected.shape, groups=groups)
    np.testing.assert_array_equal(np.asarray(got), expected)


@pytest.mark.parametrize("shape,groups", TRUNCATE_SHAPES)
def test_truncate_matches_torch_itself(shape, groups):
    torch = pytest.importorskip("torch")
    t = torch.nn.init.dirac_(torch.empty(shape), groups=groups).numpy()
    np.testing.assert_array_equal(
        np.asarray(param.dirac_delta(to_flax(t).shape, groups=groups)), to_flax(t)
    )


def test_truncate_groups_conv_is_groupwise_identity():
    # Grouped conv with per-group in == out/groups is the identity.
    x = jax.random.normal(jax.random.key(0), (1, 5, 5, 6))
    y = conv(x, param.dirac_delta((3, 3, 2, 6), groups=3), groups=3)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


def test_repeat_in_multiple_of_out_sums_blocks():
    m, out = 3, 4
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, m * out))
    y = conv(x, param.dirac_delta((3, 3, m * out, out), mode="repeat"))
    blocks = sum(x[..., i * out : (i + 1) * out] for i in range(m))  # v1 eq. 7 with W = 0.
    np.testing.assert_allclose(np.asarray(y), np.asarray(blocks), rtol=0, atol=1e-6)


def test_repeat_out_multiple_of_in_tiles_output():
    x = jax.random.normal(jax.random.key(2), (2, 6, 6, 3))
    y = conv(x, param.dirac_delta((3, 3, 3, 6), mode="repeat"))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(jnp.concatenate([x, x], -1)))


def test_ncrelu_repeat_zero_w_is_a_times_x():
    # v1 eq. 11: with W = 0, conv(ncrelu(x), a * delta_repeat) == a * x exactly.
    out, a = 5, 2.5
    x = jax.random.normal(jax.random.key(3), (2, 6, 6, out))
    t = param.dirac((3, 3, 2 * out, out), a_init=a, b_init=0.0, per_channel=False, mode="repeat")
    raw = t.init(jax.random.key(0))
    raw["w"] = jnp.zeros_like(raw["w"])
    y = conv(param.ncrelu(x), t.apply(raw))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(a * x))


def host_delta(shape, mode="truncate", groups=1):
    """The delta as built on the host before it was traced (numpy; truncate and repeat)."""
    *spatial, n_in, n_out = shape
    if mode == "repeat":
        n = min(n_in, n_out)
        square = host_delta((*spatial, n, n))
        return np.tile(square, (1,) * len(spatial) + (n_in // n, n_out // n))
    delta = np.zeros(shape, np.float32)
    per = n_out // groups
    for g in range(groups):
        for d in range(min(per, n_in)):
            delta[(*[k // 2 for k in spatial], d, g * per + d)] = 1.0
    return delta


REPEAT_SHAPES = [(3, 3, 12, 4), (3, 3, 4, 12), (3, 3, 5, 5), (1, 8, 2), (5, 6, 3), (3, 1, 3, 2, 4)]


@pytest.mark.parametrize("shape", REPEAT_SHAPES)
def test_repeat_is_the_tiled_square_delta(shape):
    got = param.dirac_delta(shape, mode="repeat")
    np.testing.assert_array_equal(np.asarray(got), host_delta(shape, "repeat"))
    jitted = jax.jit(lambda: param.dirac_delta(shape, mode="repeat", dtype=jnp.bfloat16))()
    assert jitted.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(jitted, np.float32), host_delta(shape, "repeat"))


def test_deltas_under_x64():
    with jax.enable_x64(True):
        for shape, kwargs in [((3, 3, 12, 4), {"mode": "repeat"}), ((3, 3, 2, 6), {"groups": 3})]:
            got = jax.jit(lambda s=shape, k=kwargs: param.dirac_delta(s, dtype=jnp.float64, **k))()
            assert got.dtype == jnp.float64
            np.testing.assert_array_equal(np.asarray(got), host_delta(shape, **kwargs))


def host_dirac_apply(raw, delta, weight_norm=True):
    """DiracNets eq. 5 as written: a host delta, `w / max(||w||, eps)`, plain autodiff."""
    w = raw["w"]
    if weight_norm:
        norm = jnp.sqrt(jnp.sum(jnp.square(w), axis=tuple(range(w.ndim - 1)), keepdims=True))
        w = w / jnp.maximum(norm, 1e-12)
    return raw["a"] * jnp.asarray(delta) + raw["b"] * w


DIRAC_CASES = [
    ((3, 3, 8, 8), {}),
    ((3, 3, 4, 12), {"groups": 3}),
    ((3, 3, 6, 4), {}),
    ((3, 3, 4, 6), {}),
    ((1, 5, 5, 5), {}),
    ((3, 3, 16, 8), {"mode": "repeat", "per_channel": False}),
    ((1, 3, 4, 12), {"mode": "repeat", "weight_norm": False}),
]


def _dirac_case(shape, kwargs):
    """The transform, raw params with varied `a`, `b`, and the eq. 5 kernel as written."""
    t = param.dirac(shape, **kwargs)
    raw = t.init(jax.random.key(1))
    scale = jnp.linspace(-2.0, 3.0, shape[-1]) if raw["a"].ndim else jnp.float32(-1.5)
    raw = {"w": raw["w"], "a": scale, "b": 0.3 * scale + 0.1}
    delta = host_delta(shape, kwargs.get("mode", "truncate"), kwargs.get("groups", 1))

    def host(r):
        return host_dirac_apply(r, delta, kwargs.get("weight_norm", True))

    return t, raw, host


def _close(got, want, rtol, name=""):
    """`got == want` within `rtol` of the largest magnitude of `want` (float32 rounding)."""
    got, want = np.asarray(got), np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * np.abs(want).max(), err_msg=name)


@pytest.mark.accelerator
@pytest.mark.parametrize("shape,kwargs", DIRAC_CASES)
def test_dirac_apply_and_grads_equal_eq5_autodiff(shape, kwargs):
    # The kernel and its gradient equal DiracNets eq. 5 with a host delta, differentiated
    # by autodiff, to float32 rounding; the identity taps are exact.
    t, raw, host = _dirac_case(shape, kwargs)
    probe = jax.random.normal(jax.random.key(2), shape)
    delta = host_delta(shape, kwargs.get("mode", "truncate"), kwargs.get("groups", 1))
    for f, g in [(t.apply, host), (jax.jit(t.apply), jax.jit(host))]:
        _close(f(raw), g(raw), 1e-6)
        # With b = 0 the kernel is exactly diag(a) delta, bit for bit.
        zero_b = {**raw, "b": jnp.zeros_like(raw["b"])}
        np.testing.assert_array_equal(np.asarray(f(zero_b)), np.asarray(g(zero_b)))
        ga = jax.grad(lambda r, f=f: jnp.sum(probe * f(r)))(raw)
        gb = jax.grad(lambda r, g=g: jnp.sum(probe * g(r)))(raw)
        for name in raw:
            _close(ga[name], gb[name], 1e-5, name)
    # The gradient of `a` is the probe at the delta's ones, summed per filter, exactly.
    ga = jax.grad(lambda r: jnp.sum(probe * t.apply(r)))(raw)["a"]
    want = np.sum(np.asarray(probe) * delta, axis=tuple(range(len(shape) - 1)))
    if not kwargs.get("per_channel", True):
        want = want.sum()
    np.testing.assert_allclose(np.asarray(ga), want, rtol=1e-6, atol=1e-6)


@pytest.mark.accelerator
@pytest.mark.parametrize("shape,kwargs", DIRAC_CASES[:1] + DIRAC_CASES[-2:-1])
def test_dirac_forward_mode_and_second_order_equal_eq5(shape, kwargs):
    # The hand-written derivative serves forward mode and Hessian-vector products too.
    t, raw, host = _dirac_case(shape, kwargs)
    tangent = jax.tree.map(lambda x: jax.random.normal(jax.random.key(3), x.shape), raw)
    _, jt = jax.jvp(t.apply, (raw,), (tangent,))
    _, jh = jax.jvp(host, (raw,), (tangent,))
    _close(jt, jh, 1e-5)
    probe = jax.random.normal(jax.random.key(2), shape)

    def hvp(f):
        def loss(r):
            return jnp.sum(jnp.sin(probe * f(r)))

        return jax.jvp(jax.grad(loss), (raw,), (tangent,))[1]

    got, want = hvp(t.apply), hvp(host)
    for name in raw:
        _close(got[name], want[name], 1e-4, name)


def test_dirac_zero_filter_has_finite_gradient():
    # A filter at the norm's floor scales by 1 / eps, so its gradient is b / eps times the
    # incoming one, with no term through the (constant) floor: finite, never NaN.
    t = param.dirac((3, 3, 2, 2))
    raw = t.init(jax.random.key(0))
    raw["w"] = raw["w"].at[..., 1].set(0.0)
    kernel = t.apply(raw)
    np.testing.assert_array_equal(
        np.asarray(kernel[..., 1]), np.asarray(param.dirac_delta((3, 3, 2, 2))[..., 1])
    )
    probe = jnp.ones((3, 3, 2, 2)) * 1e-13
    g = jax.grad(lambda r: jnp.sum(probe * t.apply(r)))(raw)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in g.values())
    np.testing.assert_allclose(np.asarray(g["w"][..., 1]), 0.1 * 1e-13 / 1e-12, rtol=1e-5)
    assert float(g["b"][1]) == 0.0


def test_normalize_zero_filter_has_finite_gradient():
    # Autodiff through sqrt(0) would give NaN; a filter at the floor is w / eps instead.
    w = jax.random.normal(jax.random.key(1), (3, 3, 4, 3)).at[..., 2].set(0.0)
    probe = jax.random.normal(jax.random.key(2), w.shape)
    g = jax.grad(lambda v: jnp.sum(probe * param.normalize(v, eps=1e-6)))(w)
    np.testing.assert_allclose(np.asarray(g[..., 2]), np.asarray(probe[..., 2]) / 1e-6, rtol=1e-6)
    # The other filters' gradient is the projection of the probe off the unit filter.
    u = w[..., :2] / jnp.linalg.norm(w[..., :2].reshape(-1, 2), axis=0)
    p = probe[..., :2]
    want = (p - u * jnp.sum(p * u, axis=(0, 1, 2))) / jnp.linalg.norm(
        w[..., :2].reshape(-1, 2), axis=0
    )
    np.testing.assert_allclose(np.asarray(g[..., :2]), np.asarray(want), rtol=1e-4, atol=1e-6)


def test_dirac_kernels_compile_without_constants():
    # The delta is computed in the program: no literal larger than a scalar in the HLO.
    for t in [
        param.dirac((3, 3, 32, 64), groups=2),
        param.dirac_v1((3, 3, 64, 32)),
        param.dirac_residual((3, 3, 32, 32), 0.1),
    ]:
        raw = jax.eval_shape(t.init, jax.random.key(0))
        text = jax.jit(jax.grad(lambda r, t=t: jnp.sum(t.apply(r) ** 2))).lower(raw).as_text()
        shapes = re.findall(r"stablehlo\.constant .*: tensor<([^>]*)>", text)
        assert shapes and all("x" not in s for s in shapes), shapes


@pytest.mark.parametrize(
    "shape,kwargs,match",
    [
        ((3, 3, 6, 4), {"mode": "repeat"}, "in = m\\*out"),
        ((3, 3, 4, 6), {"groups": 4}, "divisible by groups"),
        ((3, 3, 4, 4), {"mode": "mirror"}, "unknown mode"),
        ((4, 4), {}, "3 to 5 dims"),
        ((3, 0, 4, 4), {}, "non-positive"),
        ((3, 3, 4, 8), {"mode": "repeat", "groups": 2}, "groups=1"),
    ],
)
def test_delta_bad_shapes_raise(shape, kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        param.dirac_delta(shape, **kwargs)
    if len(shape) > 2:
        assert str(shape) in str(e.value) or "mode" in str(e.value)


# ---------------------------------------------------------------- dirac


def test_normalize_gives_unit_filters():
    w = jax.random.normal(jax.random.key(0), (3, 3, 5, 7))
    norms = jnp.sqrt(jnp.sum(param.normalize(w) ** 2, axis=(0, 1, 2)))
    np.testing.assert_allclose(np.asarray(norms), 1.0, rtol=1e-6)
    assert float(jnp.abs(param.normalize(jnp.zeros((3, 2)))).max()) == 0.0


def test_dirac_apply_is_eq5():
    t = param.dirac((3, 3, 4, 6))
    raw = t.init(jax.random.key(0))
    raw["a"] = jnp.arange(6.0)
    raw["b"] = jnp.arange(6.0) + 0.5
    w = np.asarray(raw["w"])
    w_norm = w / np.linalg.norm(w.reshape(-1, 6), axis=0)
    expected = np.asarray(param.dirac_delta((3, 3, 4, 6))) * np.arange(6.0) + w_norm * (
        np.arange(6.0) + 0.5
    )
    np.testing.assert_allclose(np.asarray(t.apply(raw)), expected, rtol=1e-5, atol=1e-6)


def test_dirac_init_and_counts():
    t = param.dirac((3, 3, 16, 32))
    raw = t.init(jax.random.key(0))
    assert raw["a"].shape == raw["b"].shape == (32,)
    assert np.all(np.asarray(raw["a"]) == 1.0) and np.allclose(np.asarray(raw["b"]), 0.1)
    assert t.num_params == sum(v.size for v in raw.values()) == 9 * 16 * 32 + 64
    w = np.asarray(raw["w"])
    # The reference v2 code's kaiming_normal_: std sqrt(2 / fan_in), fan_in = 3 * 3 * 16.
    std = (2 / 144) ** 0.5
    assert abs(w.mean()) < 0.05 * std and abs(w.std() / std - 1) < 0.05


@pytest.mark.parametrize(
    "w_init, std", [("he_normal", (2 / 576) ** 0.5), ("unit_normal", 1.0), (0.1, 0.1)]
)
def test_dirac_w_init_scales(w_init, std):
    w = np.asarray(param.dirac((3, 3, 64, 64), w_init=w_init).init(jax.random.key(1))["w"])
    assert abs(w.std() / std - 1) < 0.02
    assert param.dirac_v1((3, 3, 64, 32)).init(jax.random.key(0))["w"].std() == pytest.approx(
        0.1, rel=0.02
    )


def test_dirac_default_w_init_matches_torch_kaiming_normal():
    torch = pytest.importorskip("torch")
    # The reference draws conv weights with kaiming_normal_ on an OIHW tensor.
    ref = torch.nn.init.kaiming_normal_(torch.empty(64, 32, 3, 3)).numpy()
    ours = np.asarray(param.dirac((3, 3, 32, 64)).init(jax.random.key(2))["w"])
    assert ours.std() == pytest.approx(float(ref.std()), rel=0.03)


@pytest.mark.parametrize("w_init", ["xavier", -1.0, 0])
def test_dirac_bad_w_init(w_init):
    with pytest.raises(ValueError, match="w_init"):
        param.dirac((3, 3, 4, 4), w_init=w_init)
    scalar = param.dirac((3, 3, 16, 16), per_channel=False)
    assert scalar.init(jax.random.key(0))["a"].shape == ()
    assert scalar.num_params == 9 * 256 + 2


def test_dirac_v1_defaults():
    t = param.dirac_v1((3, 3, 32, 16))
    raw = t.init(jax.random.key(0))
    assert float(raw["a"]) == 5.0 and np.isclose(float(raw["b"]), 1e-3) and raw["a"].shape == ()
    with pytest.raises(ValueError, match="repeat"):
        param.dirac_v1((3, 3, 32, 24))


def test_dirac_gradient_matches_finite_differences():
    with jax.enable_x64(True):
        t = param.dirac((3, 3, 3, 4))
        raw = jax.tree.map(lambda v: v.astype(jnp.float64), t.init(jax.random.key(0)))
        raw["a"] = raw["a"] * jnp.arange(1.0, 5.0)
        probe = jax.random.normal(jax.random.key(1), t.kernel_shape, jnp.float64)
        loss = lambda r: jnp.sum(jnp.sin(t.apply(r)) * probe)
        grads = jax.grad(loss)(raw)
        rng = np.random.default_rng(0)
        eps = 1e-6
        for name in ("w", "a", "b"):
            for _ in range(5):
                idx = tuple(rng.integers(0, s) for s in raw[name].shape)
                plus = dict(raw, **{name: raw[name].at[idx].add(eps)})
                minus = dict(raw, **{name: raw[name].at[idx].add(-eps)})
                fd = (loss(plus) - loss(minus)) / (2 * eps)
                np.testing.assert_allclose(float(grads[name][idx]), float(fd), rtol=1e-6, atol=1e-9)


def test_apply_traces_once_under_jit():
    t = param.dirac((3, 3, 8, 8))
    traces = []

    @jax.jit
    def f(raw):
        traces.append(1)
        return t.apply(raw)

    for seed in range(3):
        f(t.init(jax.random.key(seed)))
    assert len(traces) == 1


@pytest.mark.parametrize(
    "make",
    [
        lambda s: param.dirac(s),
        lambda s: param.dirac_residual(s, 0.1),
        lambda s: param.symmetric(s, kind="triangular"),
        lambda s: param.plain(s),
    ],
)
def test_bf16_in_bf16_out(make):
    t = make((3, 3, 8, 8))
    raw = jax.tree.map(lambda v: v.astype(jnp.bfloat16), t.init(jax.random.key(0)))
    assert t.apply(raw).dtype == jnp.bfloat16


def test_dirac_residual_init_statistics():
    sigma = 0.05
    t = param.dirac_residual((3, 3, 64, 64), sigma)
    raw = t.init(jax.random.key(0))
    np.testing.assert_allclose(float(raw["w"].std()), sigma, rtol=0.02)
    np.testing.assert_allclose(
        np.asarray(t.apply(raw) - raw["w"]),
        np.asarray(param.dirac_delta((3, 3, 64, 64))),
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="sigma"):
        param.dirac_residual((3, 3, 4, 4), -1.0)


def test_ncrelu_halves_sum_to_input():
    x = jax.random.normal(jax.random.key(0), (4, 3, 5))
    y = param.ncrelu(x, axis=1)
    assert y.shape == (4, 6, 5)
    np.testing.assert_array_equal(np.asarray(y[:, :3] + y[:, 3:]), np.asarray(x))
    assert float(y[:, :3].min()) >= 0 and float(y[:, 3:].max()) <= 0


# ---------------------------------------------------------------- symmetric


def is_sym(k, axis):
    k = np.asarray(k)
    ok = True
    if axis in ("channel", "both"):
        ok &= np.allclose(k, np.swapaxes(k, -1, -2), atol=1e-6)
    if axis in ("spatial", "both"):
        ok &= np.allclose(k, np.swapaxes(k, 0, 1), atol=1e-6)
    return ok


def tri(n):
    return n * (n + 1) // 2


@pytest.mark.parametrize("kind", ["triangular", "average", "eigen", "ldl"])
@pytest.mark.parametrize("axis", ["channel", "spatial", "both"])
def test_symmetric_kernels_are_symmetric_with_closed_form_counts(kind, axis):
    shape = (3, 3, 6, 6)
    t = param.symmetric(shape, kind=kind, axis=axis)
    raw = t.init(jax.random.key(0))
    k = t.apply(raw)
    assert k.shape == shape
    assert is_sym(k, axis)
    if axis == "channel":
        assert not is_sym(k, "spatial")  # Only the stated axis is constrained.
    if axis == "spatial":
        assert not is_sym(k, "channel")
    assert t.num_params == sum(v.size for v in jax.tree.leaves(raw))
    expected = {
        ("average", "channel"): 324,
        ("average", "spatial"): 324,
        ("average", "both"): 324,
        ("triangular", "channel"): 9 * tri(6),
        ("triangular", "spatial"): 36 * tri(3),
        ("triangular", "both"): tri(3) * tri(6),
    }.get(
        (kind, axis), {"channel": 9 * tri(6), "spatial": 36 * tri(3), "both": tri(3) * tri(6)}[axis]
    )
    assert t.num_params == expected


@pytest.mark.parametrize("kind", ["triangular", "ldl", "triangulize4"])
def test_spatial_symmetry_counts_non_square_channels(kind):
    # A depthwise kernel (3, 3, 1, C): one spatial square per (in, out) pair.
    t = param.symmetric((3, 3, 1, 8), kind=kind, axis="spatial")
    raw = t.init(jax.random.key(0))
    assert t.num_params == sum(v.size for v in jax.tree.leaves(raw))
    assert is_sym(t.apply(raw), "spatial")


def test_triangular_is_diag_plus_triu_plus_transpose():
    n = 5
    t = param.symmetric((1, n, n), kind="triangular")
    raw = t.init(jax.random.key(0))
    v, w = np.asarray(raw["v"][0]), np.asarray(raw["w"][0])
    upper = np.zeros((n, n))
    upper[np.triu_indices(n, 1)] = w
    np.testing.assert_allclose(np.asarray(t.apply(raw)[0]), np.diag(v) + upper + upper.T, rtol=1e-6)


def test_eigen_has_the_chosen_eigenvalues():
    t = param.symmetric((1, 1, 5, 5), kind="eigen")
    raw = t.init(jax.random.key(0))
    got = np.linalg.eigvalsh(np.asarray(t.apply(raw)[0, 0], np.float64))
    np.testing.assert_allclose(np.sort(got), np.sort(np.asarray(raw["lambda"][0, 0])), atol=1e-4)


def test_ldl_matches_definition():
    t = param.symmetric((1, 4, 4), kind="ldl")
    raw = t.init(jax.random.key(0))
    lower = np.eye(4)
    lower[np.tril_indices(4, -1)[0], np.tril_indices(4, -1)[1]] = 0  # placeholder, rebuilt below
    rows, cols = np.triu_indices(4, 1)
    lower = np.eye(4)
    lower[cols, rows] = np.asarray(raw["l"][0])
    expected = lower @ np.diag(np.asarray(raw["d"][0])) @ lower.T
    np.testing.assert_allclose(np.asarray(t.apply(raw)[0]), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kind,n,count,check",
    [
        ("chunk4", 8, 16, lambda m: np.array_equal(m, np.tile(m[:2], (4, 1)))),
        ("block4", 8, 16, lambda m: np.array_equal(m, m[::-1]) and np.array_equal(m, m[:, ::-1])),
        (
            "triangulize4",
            8,
            20,
            lambda m: np.array_equal(m, m.T) and np.array_equal(m, m[::-1, ::-1].T),
        ),
        (
            "triangulize8",
            8,
            10,
            lambda m: (
                np.array_equal(m, m.T)
                and np.array_equal(m, m[::-1])
                and np.array_equal(m, m[:, ::-1])
            ),
        ),
    ],
)
def test_nway_structures(kind, n, count, check):
    t = param.symmetric((3, 3, n, n), kind=kind)
    k = np.asarray(t.apply(t.init(jax.random.key(0))))
    assert t.num_params == 9 * count
    for pos in itertools.product(range(3), range(3)):
        m = k[pos]
        assert check(m)
        assert len(np.unique(m)) == count  # Exactly one free number per orbit.


@pytest.mark.parametrize(
    "shape,kwargs,match",
    [
        ((3, 3, 4, 6), {"kind": "triangular", "axis": "channel"}, "in=4 != out=6"),
        ((3, 5, 4, 4), {"kind": "triangular", "axis": "spatial"}, "kh == kw"),
        ((3, 3, 3, 4, 4), {"kind": "average", "axis": "both"}, "2-D kernel"),
        ((3, 3, 4, 4), {"kind": "cholesky"}, "unknown kind"),
        ((3, 3, 4, 4), {"kind": "average", "axis": "depth"}, "unknown axis"),
        ((3, 3, 6, 6), {"kind": "chunk4"}, "divisible by 4"),
    ],
)
def test_symmetric_bad_shapes_raise(shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        param.symmetric(shape, **kwargs)


@pytest.mark.parametrize("axis", ["channel", "spatial", "both"])
def test_penalty_zero_iff_symmetric_and_symmetrize_projects(axis):
    k = jax.random.normal(jax.random.key(0), (3, 3, 4, 4))
    assert float(param.symmetry_penalty(k, axis=axis)) > 0
    s = param.symmetrize(k, axis)
    assert is_sym(s, axis)
    assert float(param.symmetry_penalty(s, axis=axis)) == 0.0
    np.testing.assert_array_equal(
        np.asarray(param.symmetrize(s, axis)), np.asarray(s)
    )  # Idempotent.
    if axis == "channel":  # The upper triangle (with the diagonal) is kept as is.
        iu = np.triu_indices(4)
        np.testing.assert_array_equal(
            np.asarray(s)[:, :, iu[0], iu[1]], np.asarray(k)[:, :, iu[0], iu[1]]
        )


def test_penalty_p_norms():
    k = jnp.zeros((1, 2, 2)).at[0, 0, 1].set(3.0)  # diff = [[0, 3], [-3, 0]]
    assert float(param.symmetry_penalty(k, p=1)) == 6.0
    np.testing.assert_allclose(float(param.symmetry_penalty(k, p=2)), np.sqrt(18.0), rtol=1e-6)


# ---------------------------------------------------------------- PlainNet recipe


def test_max_norm_gives_exact_norms():
    k = jax.random.normal(jax.random.key(0), (3, 3, 8, 16)) * jnp.linspace(0.01, 1.0, 16)
    c = 1.5
    before = np.linalg.norm(np.asarray(k).reshape(-1, 16), axis=0)
    out = np.asarray(param.max_norm(k, c))
    after = np.linalg.norm(out.reshape(-1, 16), axis=0)
    assert (before > c).any() and (before < c).any()
    np.testing.assert_allclose(after, np.minimum(before, c), rtol=1e-6)
    keep = before <= c
    np.testing.assert_array_equal(
        out.reshape(-1, 16)[:, keep], np.asarray(k).reshape(-1, 16)[:, keep]
    )
    with pytest.raises(ValueError, match="c must be"):
        param.max_norm(k, 0.0)


def test_uniform_init_bounds_and_variance():
    shape = (3, 3, 64, 64)
    w = np.asarray(param.uniform_init(jax.random.key(0), shape))
    limit = np.sqrt(6 / (9 * 64))
    assert w.min() >= -limit and w.max() <= limit
    np.testing.assert_allclose(w.var(), limit**2 / 3, rtol=0.03)  # Var of U[-l, l] is l^2 / 3.


# ---------------------------------------------------------------- trees


def test_tree_helpers_under_jit_grad_vmap():
    ts = {
        "block": {"conv": param.dirac((3, 3, 4, 4))},
        "sym": param.symmetric((3, 3, 4, 4), kind="triangular"),
        "plain": param.plain((1, 1, 4, 2)),
    }
    raw = param.init_tree(jax.random.key(0), ts)
    kernels = param.apply_tree(ts, raw)
    assert kernels["block"]["conv"].shape == (3, 3, 4, 4)
    jitted = jax.jit(lambda r: param.apply_tree(ts, r))(raw)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), kernels, jitted
    )
    grads = jax.grad(
        lambda r: sum(jnp.sum(k**2) for k in jax.tree.leaves(param.apply_tree(ts, r)))
    )(raw)
    assert jax.tree.structure(grads) == jax.tree.structure(raw)
    batched = jax.tree.map(lambda v: jnp.stack([v, 2 * v]), raw)
    out = jax.vmap(lambda r: param.apply_tree(ts, r))(batched)
    assert out["block"]["conv"].shape == (2, 3, 3, 4, 4)
    np.testing.assert_allclose(np.asarray(out["plain"][1]), 2 * np.asarray(kernels["plain"]))
    assert param.num_params_tree(ts) == sum(v.size for v in jax.tree.leaves(raw))
    # Each transform gets its own key: two transforms of one shape draw different kernels.
    twins = param.init_tree(jax.random.key(0), [param.dirac((3, 3, 4, 4))] * 2)
    assert not np.allclose(np.asarray(twins[0]["w"]), np.asarray(twins[1]["w"]))


def test_public_api_names():
    for name in [
        "dirac_delta",
        "normalize",
        "dirac",
        "dirac_v1",
        "dirac_residual",
        "ncrelu",
        "symmetric",
        "symmetry_penalty",
        "symmetrize",
        "max_norm",
        "uniform_init",
        "init_tree",
        "apply_tree",
    ]:
        assert callable(getattr(param, name))
    assert set(param.__all__) == {n for n in dir(param) if not n.startswith("_")} - {"annotations"}

"""A new model folds by satisfying `folded.ChainFoldable`, and nothing else.

The model below is not one of the library's: a plain stem conv, one Dirac
block conv and a classifier, written with the public layers. It declares
`folds = "chain"` and builds its chain with `folded.ChainBuilder`; `fold.fold`,
`fold.deployable` and the identity-apart fold then work on it unchanged.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dirac_jax import fold, folded, param
from dirac_jax.layers import ParamConv

SAME = ((1, 1), (1, 1))


def _bn(train: bool, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, epsilon=folded.BN_EPSILON, name=name)


class TinyDirac(nn.Module):
    """`conv3x3 -> BN -> ReLU -> Dirac conv3x3 -> BN -> ReLU -> pool -> dense`."""

    features: int = 6
    num_classes: int = 3
    dtype: Any = jnp.float32

    folds = "chain"

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = ParamConv(self.features, (3, 3), param.plain, padding=SAME, name="stem")(x)
        x = nn.relu(_bn(train, "stem_bn")(x))
        x = ParamConv(self.features, (3, 3), param.dirac, padding=SAME, name="block")(x)
        x = nn.relu(_bn(train, "block_bn")(x))
        return nn.Dense(self.num_classes, name="fc")(jnp.mean(x, axis=(1, 2)))

    def fold_chain(self, params, batch_stats, *, dtype, identity_apart=False):
        chain = folded.ChainBuilder(params, batch_stats, dtype=dtype)
        channels = params["stem"]["w"].shape[-2]
        stem = (3, 3, channels, self.features)
        chain.conv_bn(param.plain, ("stem",), ("stem_bn",), stem, ((1, 1), SAME), what="plain")
        chain.add("relu")
        shape = (3, 3, self.features, self.features)
        chain.conv_bn(
            param.dirac,
            ("block",),
            ("block_bn",),
            shape,
            ((1, 1), SAME),
            what="dirac",
            identity_apart=identity_apart,
        )
        chain.add("relu")
        chain.add("avg_pool")
        chain.dense(("fc",))
        return chain.build()


class Claims(nn.Module):
    """Says it folds into a chain but has no `fold_chain`: not a `ChainFoldable`."""

    folds = "chain"

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(2)(x)


def _random_variables(model, x, seed):
    """Init, then every BN statistic and affine term and the Dirac `a`, `b` made random."""
    variables = model.init(jax.random.key(seed), x, train=False)
    rng = np.random.default_rng(seed)
    draws = {
        "mean": lambda s: 0.5 * rng.standard_normal(s),
        "var": lambda s: rng.uniform(0.5, 2.0, s),
        "scale": lambda s: rng.uniform(0.5, 1.5, s),
        "a": lambda s: rng.uniform(0.5, 1.5, s),
        "b": lambda s: rng.uniform(0.05, 0.5, s),
    }

    def draw(path, v):
        name = path[-1].key
        if name == "bias" and path[-2].key != "fc":
            return jnp.asarray(0.2 * rng.standard_normal(v.shape), v.dtype)
        return jnp.asarray(draws[name](v.shape), v.dtype) if name in draws else v

    return jax.tree_util.tree_map_with_path(draw, variables)


def test_the_test_model_satisfies_the_contract_and_the_other_does_not():
    assert isinstance(TinyDirac(), folded.ChainFoldable)
    assert not isinstance(TinyDirac(), folded.KernelFoldable)
    assert not isinstance(Claims(), folded.ChainFoldable)
    with pytest.raises(ValueError, match="ChainFoldable"):
        fold.fold(Claims(), {"params": {}, "batch_stats": {}})


@pytest.mark.parametrize("identity_apart", [False, True])
def test_a_new_model_folds_through_the_protocol_and_equals_the_unfolded_net(identity_apart):
    model = TinyDirac()
    x = jax.random.normal(jax.random.key(1), (4, 8, 8, 2))
    variables = _random_variables(model, x, seed=3)
    net = fold.fold(model, variables, identity_apart=identity_apart)
    kinds = [s.kind for s in net.steps]
    block = "dirac_conv" if identity_apart else "conv"
    assert kinds == ["conv", "relu", block, "relu", "avg_pool", "dense"]
    want = model.apply(variables, x, train=False)
    got = fold.apply_folded(net, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # BN and a, b are gone: the folded net holds two biased convs and the classifier.
    assert fold.num_params(net) == (
        (3 * 3 * 2 * 6 + 6) + (3 * 3 * 6 * 6 + 6) + (6 * 3 + 3) + (6 if identity_apart else 0)
    )


def test_deployable_folds_the_new_model_too():
    model = TinyDirac()
    x = jax.random.normal(jax.random.key(2), (2, 8, 8, 2))
    variables = _random_variables(model, x, seed=4)
    apply, params = fold.deployable(model, variables)
    assert apply is fold.apply_folded and isinstance(params, folded.FoldedNet)
    np.testing.assert_allclose(
        apply(params, x), model.apply(variables, x, train=False), rtol=1e-5, atol=1e-5
    )


def test_a_folded_layer_of_another_model_is_a_clear_error():
    model = TinyDirac()
    x = jnp.zeros((1, 8, 8, 2))
    variables = model.init(jax.random.key(0), x, train=False)
    wrong = TinyDirac(features=4).init(jax.random.key(0), x, train=False)
    mixed = {**variables, "params": {**variables["params"], "block": wrong["params"]["block"]}}
    with pytest.raises(ValueError, match="belong to this model"):
        fold.fold(model, mixed)

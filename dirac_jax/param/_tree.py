"""Whole-model helpers: init, apply and count a pytree of transforms at once."""

from __future__ import annotations

import jax

from dirac_jax.param._core import Params, Transform


def _is_transform(x) -> bool:
    return isinstance(x, Transform)


def init_tree(key: jax.Array, transforms) -> Params:
    """Initializes every `Transform` in a pytree, each with its own key.

    Args:
      key: a PRNG key; leaf `i` (in pytree order) gets `fold_in(key, i)`.
      transforms: a pytree (e.g. nested dict) whose leaves are `Transform`s.

    Returns:
      The raw parameters: the same tree structure, each leaf replaced by its
      transform's `init` output.

    Examples:
      >>> import jax
      >>> from dirac_jax.param import dirac, init_tree, apply_tree
      >>> ts = {"conv1": dirac((3, 3, 4, 4)), "conv2": dirac((3, 3, 4, 8))}
      >>> raw = init_tree(jax.random.key(0), ts)
      >>> jax.tree.map(lambda k: k.shape, apply_tree(ts, raw))
      {'conv1': (3, 3, 4, 4), 'conv2': (3, 3, 4, 8)}
    """
    leaves, treedef = jax.tree.flatten(transforms, is_leaf=_is_transform)
    raws = [t.init(jax.random.fold_in(key, i)) for i, t in enumerate(leaves)]
    return jax.tree.unflatten(treedef, raws)


def apply_tree(transforms, raw: Params) -> Params:
    """Maps every transform's `apply` over the matching raw subtree.

    Pure in `raw`, so it composes with `jit`, `grad` and `vmap` over `raw`.
    """
    return jax.tree.map(lambda t, r: t.apply(r), transforms, raw, is_leaf=_is_transform)


def num_params_tree(transforms) -> int:
    """Total trainable parameters of a pytree of transforms.

    Examples:
      >>> from dirac_jax.param import dirac, num_params_tree
      >>> num_params_tree({"a": dirac((3, 3, 4, 4)), "b": dirac((1, 4, 4))})
      176
    """
    leaves = jax.tree.leaves(transforms, is_leaf=_is_transform)
    return sum(t.num_params for t in leaves)

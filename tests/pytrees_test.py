"""Tests of sdft_jax/pytrees.py: the pytree of a dataclass, rebuilt without its `__init__`."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdft_jax.pytrees import pytree_dataclass, static_field


@pytree_dataclass
@dataclasses.dataclass(frozen=True)
class Pair:
    a: jax.Array
    b: jax.Array | None

    def __post_init__(self):
        if not isinstance(self.a, jax.Array):  # stands in for a shape checker on the fields
            raise TypeError(f"a must be an array, got {type(self.a).__name__}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class JaxPair:
    a: jax.Array
    b: jax.Array | None


def test_same_pytree_as_register_dataclass():
    pair = Pair(a=jnp.ones(2), b=jnp.zeros(3))
    paths = lambda tree: [jax.tree_util.keystr(path) for path, _ in jax.tree.flatten_with_path(tree)[0]]  # noqa: E731
    assert paths(pair) == paths(JaxPair(a=pair.a, b=pair.b)) == [".a", ".b"]
    assert len(jax.tree.leaves(Pair(a=jnp.ones(2), b=None))) == 1  # None: no leaf
    doubled = jax.jit(lambda p: jax.tree.map(lambda x: 2 * x, p))(pair)
    assert isinstance(doubled, Pair)
    np.testing.assert_array_equal(doubled.a, [2, 2])
    assert jax.tree.structure(doubled) == jax.tree.structure(pair)


def test_jax_rebuilds_without_init_code_constructs_with_it():
    pair = Pair(a=jnp.ones(2), b=None)
    shapes = jax.eval_shape(lambda p: p, pair)  # leaves that are not arrays
    assert isinstance(shapes, Pair) and shapes.a.shape == (2,)
    jax.jit(lambda p: p.a).lower(pair)  # argument infos rebuilt into the tree
    with pytest.raises(TypeError, match="a must be an array"):
        Pair(a=np.ones(2), b=None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        shapes.a = None


@pytree_dataclass
@dataclasses.dataclass(frozen=True)
class Flagged:
    a: jax.Array
    flip: bool = static_field(default=False)


def test_a_static_field_is_structure_not_a_leaf():
    on, off = Flagged(a=jnp.ones(2), flip=True), Flagged(a=jnp.ones(2))
    assert len(jax.tree.leaves(on)) == 1
    assert jax.tree.structure(on) != jax.tree.structure(off)
    traced = []

    @jax.jit
    def apply(f: Flagged) -> Flagged:
        traced.append(f.flip)
        return Flagged(a=-f.a if f.flip else f.a, flip=f.flip)

    out = apply(on)
    assert isinstance(out, Flagged) and out.flip is True
    np.testing.assert_array_equal(out.a, [-1, -1])
    np.testing.assert_array_equal(apply(off).a, [1, 1])
    apply(on)
    assert traced == [True, False]  # a Python bool under jit, one trace per value
    assert jax.eval_shape(lambda f: f, on).flip is True

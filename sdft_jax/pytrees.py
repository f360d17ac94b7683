"""Dataclasses as JAX pytrees whose rebuilding does not run `__init__`.

`jax.tree_util.register_dataclass` rebuilds an instance by calling the class, so whatever checks
`__init__` makes (a runtime shape checker on the field annotations, in the test suite) also run when
JAX itself rebuilds the pytree with leaves that are not arrays: shape structs in `jax.eval_shape`,
argument descriptions in `jax.jit(...).lower`, shardings in a tree of them. `pytree_dataclass`
registers the same pytree (every field a child, in field order, keyed by attribute name) but rebuilds
instances without calling the class: what code constructs is checked, what JAX reassembles is not.

A field declared with `static_field()` is not a child but part of the tree's structure (hashable
metadata, such as a layout flag): two instances that differ in it are different pytrees, and `jit`
traces each once.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import jax

T = TypeVar("T")


_STATIC = "sdft_jax.static"


def static_field(**kwargs):
    """A dataclass field that `pytree_dataclass` keeps in the tree's structure instead of its leaves."""
    return dataclasses.field(metadata={_STATIC: True}, **kwargs)


def pytree_dataclass(cls: type[T]) -> type[T]:
    """Registers dataclass `cls` as a pytree whose children are its fields, in order, but the
    `static_field()` ones, which are its structure; returns `cls`."""
    fields = dataclasses.fields(cls)
    names = tuple(field.name for field in fields if not field.metadata.get(_STATIC))
    static = tuple(field.name for field in fields if field.metadata.get(_STATIC))
    keys = tuple(jax.tree_util.GetAttrKey(name) for name in names)

    def flatten_with_keys(obj: T):
        return (tuple(zip(keys, (getattr(obj, name) for name in names), strict=True)),
                tuple(getattr(obj, name) for name in static))

    def flatten(obj: T):
        return tuple(getattr(obj, name) for name in names), tuple(getattr(obj, name) for name in static)

    def unflatten(aux, children) -> T:
        obj = object.__new__(cls)
        for name, value in zip(static + names, tuple(aux) + tuple(children), strict=True):
            object.__setattr__(obj, name, value)  # frozen dataclasses too
        return obj

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    return cls

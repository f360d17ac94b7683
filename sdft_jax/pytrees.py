"""Dataclasses as JAX pytrees whose rebuilding does not run `__init__`.

`jax.tree_util.register_dataclass` rebuilds an instance by calling the class, so whatever checks
`__init__` makes (a runtime shape checker on the field annotations, in the test suite) also run when
JAX itself rebuilds the pytree with leaves that are not arrays: shape structs in `jax.eval_shape`,
argument descriptions in `jax.jit(...).lower`, shardings in a tree of them. `pytree_dataclass`
registers the same pytree (every field a child, in field order, keyed by attribute name) but rebuilds
instances without calling the class: what code constructs is checked, what JAX reassembles is not.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import jax

T = TypeVar("T")


def pytree_dataclass(cls: type[T]) -> type[T]:
    """Registers dataclass `cls` as a pytree with all its fields as children; returns `cls`."""
    names = tuple(field.name for field in dataclasses.fields(cls))
    keys = tuple(jax.tree_util.GetAttrKey(name) for name in names)

    def flatten_with_keys(obj: T):
        return tuple(zip(keys, (getattr(obj, name) for name in names), strict=True)), None

    def flatten(obj: T):
        return tuple(getattr(obj, name) for name in names), None

    def unflatten(_, children) -> T:
        obj = object.__new__(cls)
        for name, child in zip(names, children, strict=True):
            object.__setattr__(obj, name, child)  # frozen dataclasses too
        return obj

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten, flatten)
    return cls

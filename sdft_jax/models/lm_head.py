"""The LM head in the layout the model stores it, applied without a transposed copy of its weight.

A head tied to the embedding is the embedding itself, `[V, D]`; an untied head is stored `[D, V]`.
Computing logits as `hidden @ embed.T` is free when the transpose sits next to the dot (the compiler
folds it into the dot's dimension numbers), but the losses apply the head inside loops over token
chunks and vocab blocks, and a head transposed outside such a loop may be materialised: XLA:CPU made a
V x D copy (113 MB at SmolLM2's 49,152 x 576 in fp32), alive through the train step beside the embedding
(the TPU compiler did not; docs/benchmarks.md, "Micro-batched steps"). `LMHead` carries the weight as
stored with its layout (`vocab_major`, static) and puts the transposition into every dot it takes part
in: the logits, the gradient of the hidden states, and the weight's own gradient, which comes back in
the weight's layout. No compiler has a copy to make.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike
from jaxtyping import Array, Float, Int

from sdft_jax.pytrees import pytree_dataclass, static_field


@pytree_dataclass
@dataclasses.dataclass(frozen=True)
class LMHead:
    """An LM head's weight and its layout.

    Attributes:
      weight: `[V, D]` when `vocab_major` (a tied embedding), else `[D, V]`.
      vocab_major: the layout (part of the pytree's structure, not a leaf).
    """

    weight: Float[Array, "_ _"]
    vocab_major: bool = static_field(default=False)

    @classmethod
    def of(cls, head: LMHead | Float[Array, "D V"]) -> LMHead:
        """`head` itself, or a plain `[D, V]` array as a head."""
        return head if isinstance(head, LMHead) else cls(weight=head)

    @property
    def vocab_axis(self) -> int:
        return 0 if self.vocab_major else 1

    @property
    def vocab(self) -> int:
        return self.weight.shape[self.vocab_axis]

    @property
    def hidden(self) -> int:
        return self.weight.shape[1 - self.vocab_axis]

    def _subscripts(self) -> str:
        return "vd" if self.vocab_major else "dv"

    def astype(self, dtype: DTypeLike) -> LMHead:
        return dataclasses.replace(self, weight=self.weight.astype(dtype))

    def stop_gradient(self) -> LMHead:
        return dataclasses.replace(self, weight=jax.lax.stop_gradient(self.weight))

    def as_dv(self) -> Float[Array, "D V"]:
        """The weight as `[D, V]` (a transposed copy when vocab-major: for tests and small heads)."""
        return self.weight.T if self.vocab_major else self.weight

    def logits(
        self, hidden: Float[Array, "*N D"], preferred_element_type: DTypeLike | None = None
    ) -> Float[Array, "*N V"]:
        """`hidden @ W` for `W` the `[D, V]` head (default precision; dtypes as `jnp.einsum` promotes)."""
        return jnp.einsum(f"...d,{self._subscripts()}->...v", hidden, self.weight,
                          preferred_element_type=preferred_element_type)

    def hidden_grad(
        self, logits_grad: Float[Array, "*N V"], preferred_element_type: DTypeLike | None = None
    ) -> Float[Array, "*N D"]:
        """The gradient of the hidden states of `logits` from that of the logits: `g @ W.T`."""
        return jnp.einsum(f"...v,{self._subscripts()}->...d", logits_grad, self.weight,
                          preferred_element_type=preferred_element_type)

    def weight_grad(
        self, hidden: Float[Array, "*N D"], logits_grad: Float[Array, "*N V"],
        preferred_element_type: DTypeLike | None = None,
    ) -> Float[Array, "_ _"]:
        """The weight's gradient from positions' hidden states and logit gradients, in the weight's layout."""
        return jnp.einsum(f"...d,...v->{self._subscripts()}", hidden, logits_grad,
                          preferred_element_type=preferred_element_type)

    def columns(self, start: Int[Array, ""] | int, size: int) -> LMHead:
        """The head of vocab ids `start .. start + size` (a dynamic slice)."""
        return dataclasses.replace(
            self, weight=jax.lax.dynamic_slice_in_dim(self.weight, start, size, axis=self.vocab_axis))

    def with_columns(self, block: Float[Array, "_ _"], start: Int[Array, ""] | int) -> LMHead:
        """This head with the weight `block` (in this head's layout) written at vocab id `start`."""
        return dataclasses.replace(
            self, weight=jax.lax.dynamic_update_slice_in_dim(self.weight, block, start, axis=self.vocab_axis))

"""Low-rank adapters over the decoder's projection matrices.

An adapted projection computes `x @ W + scale * (x @ A) @ B` with `A: [*in, r]`, `B: [r, *out]` and
`scale = alpha / rank`. Adapters are `nnx.LoRAParam` Variables, so `nnx.Param` filters that exclude
`nnx.LoRAParam` select the frozen base and `nnx.LoRAParam` selects what trains. `B` starts at zero,
so an adapted model starts equal to its base.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from sdft_jax.validation import check_choice, check_int, check_number

# Projection name -> number of input dimensions of its weight, per layer (after the expert axis of
# the routed experts' weights, `EXPERT_PROJECTIONS`, whose adapters are per expert: A [E, *in, r],
# B [E, r, *out]). A model adapts the targets it has: the dense MLP's in a dense layer, the experts'
# and the shared expert's in a MoE layer, Gated DeltaNet's (`linear_*`) in a linear-attention layer.
PROJECTIONS: dict[str, int] = {
    "q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 2, "gate_proj": 1, "up_proj": 1, "down_proj": 1,
    "q_gate_proj": 1, "experts_gate_proj": 1, "experts_up_proj": 1, "experts_down_proj": 1,
    "shared_expert_gate_proj": 1, "shared_expert_up_proj": 1, "shared_expert_down_proj": 1,
    "linear_q_proj": 1, "linear_k_proj": 1, "linear_v_proj": 1, "linear_z_proj": 1, "linear_b_proj": 1,
    "linear_a_proj": 1, "linear_out_proj": 2,
}
EXPERT_PROJECTIONS = frozenset({"experts_gate_proj", "experts_up_proj", "experts_down_proj"})


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """Which projections get adapters, and their size.

    Attributes:
      rank: the adapters' inner dimension `r` (>= 1).
      alpha: the low-rank update is multiplied by `alpha / rank` (> 0).
      targets: names of the adapted projections (keys of `PROJECTIONS`), at least one; a model
        adapts those it has (the router is never adapted: it stays frozen under LoRA).
    """

    rank: int = 128
    alpha: float = 32.0
    targets: tuple[str, ...] = tuple(PROJECTIONS)

    def __post_init__(self):
        check_int("LoraConfig.rank", self.rank, minimum=1)
        check_number("LoraConfig.alpha", self.alpha, low=0.0, low_open=True)
        if not self.targets:
            raise ValueError(f"LoraConfig.targets must name at least one of {list(PROJECTIONS)}")
        for target in self.targets:
            check_choice("LoraConfig.targets", target, PROJECTIONS)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def adapter_shapes(name: str, shape: tuple[int, ...], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of A and B for projection `name` of one layer's weight `shape` (`[E, *in, *out]` for
    the routed experts, else `[*in, *out]`)."""
    lead = 1 if name in EXPERT_PROJECTIONS else 0
    n_in = PROJECTIONS[name]
    return (*shape[:lead + n_in], rank), (*shape[:lead], rank, *shape[lead + n_in:])


def lora_a_init(key: jax.Array, shape: tuple[int, ...], n_in: int, dtype) -> jax.Array:
    """A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)); `shape` is `[..., *in, r]` with `n_in` input dims (the
    fan-in of one adapter: leading layer and expert axes do not count)."""
    fan_in = 1
    for d in shape[len(shape) - 1 - n_in: -1]:
        fan_in *= d
    bound = fan_in**-0.5
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def project(
    x: Float[Array, "B T *in"],
    w: Float[Array, "*in *out"],
    n_in: int,
    lora: tuple[Float[Array, "*in r"], Float[Array, "r *out"]] | None = None,
    scale: float = 1.0,
) -> Float[Array, "B T *out"]:
    """`x @ w` over the last `n_in` dims of x, plus the low-rank update when adapters are given."""
    y = jnp.tensordot(x, w, axes=n_in)
    if lora is not None:
        a, b = lora
        y = y + jnp.tensordot(jnp.tensordot(x, a, axes=n_in), b, axes=1) * jnp.asarray(scale, y.dtype)
    return y


def merged_weight(w: jax.Array, a: jax.Array, b: jax.Array, scale: float, name: str = "") -> jax.Array:
    """`w + scale * a @ b` for stacked `[L, ...]` weights of projection `name` (export with adapters
    folded in; the routed experts' per expert)."""
    product = lambda a_, b_: jnp.tensordot(a_, b_, axes=1)  # noqa: E731
    if name in EXPERT_PROJECTIONS:
        product = jax.vmap(product)
    delta = jax.vmap(product)(a.astype(jnp.float32), b.astype(jnp.float32))
    return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)


def project_named(x: Float[Array, "B T *in"], w: Mapping[str, Array], name: str,
                  lora: LoraConfig | None) -> Float[Array, "B T *out"]:
    """Projection `name` of `x` by one layer's weights `w`, with its low-rank update when `w` holds
    adapters for it (`{name}_lora_a`, `{name}_lora_b`)."""
    adapters = (w[f"{name}_lora_a"], w[f"{name}_lora_b"]) if f"{name}_lora_a" in w else None
    return project(x, w[name], PROJECTIONS[name], adapters, lora.scale if adapters else 1.0)

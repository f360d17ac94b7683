"""Sparse mixture-of-experts channel mixer (the MLP of a MoE decoder layer), Qwen3-MoE / Qwen2-MoE style.

Pure functions over one layer's weights, a `Mapping[str, Array]` like `decoder_layer`'s. Every token
is routed to `top_k` of `num_experts` SwiGLU experts; an optional shared expert, scaled by a sigmoid
gate, runs on every token (Qwen2-MoE, Qwen3.5). Matches HF `transformers` (`Qwen3MoeSparseMoeBlock`,
`Qwen2MoeSparseMoeBlock`): router logits in the activations' dtype, softmax in fp32, top-k,
renormalised to sum 1 when `norm_topk_prob`, weights cast back to the logits' dtype.

Weight layout (names are the keys of one layer's mapping; D hidden, E experts, F expert hidden, Fs
shared-expert hidden; every matrix is stored `[in, out]`, the transpose of HF's `nn.Linear`):

| name | shape | HF tensor |
|---|---|---|
| `router` | [D, E] | `mlp.gate.weight` [E, D] |
| `experts_gate_proj`, `experts_up_proj` | [E, D, F] each | `mlp.experts.gate_up_proj` [E, 2F, D], gate rows first (*) |
| `experts_down_proj` | [E, F, D] | `mlp.experts.down_proj` [E, D, F] |
| `shared_expert_gate_proj`, `shared_expert_up_proj` | [D, Fs] each | `mlp.shared_expert.{gate,up}_proj.weight` |
| `shared_expert_down_proj` | [Fs, D] | `mlp.shared_expert.down_proj.weight` |
| `shared_expert_gate` | [D, 1] | `mlp.shared_expert_gate.weight` [1, D] |

(*) `transformers`' in-memory layout; files (what `save_pretrained` writes and vLLM loads) usually hold
per-expert `mlp.experts.{e}.gate_proj.weight` / `up_proj.weight` [F, D] (`checkpoints/hf_names.py`).

Gate and up are kept apart (not fused `[E, D, 2F]`) so each has its own per-expert LoRA adapters,
`{name}_lora_a` [E, in, r] and `{name}_lora_b` [E, r, out] for the three `experts_*` projections
(the decoder's `{name}_lora_{a,b}` convention, with an expert axis in front).

Two paths compute the routed experts, with one signature (`ExpertsFn`):
- `grouped_experts`, the dropless path: the T*k (token, expert) assignments sorted by expert, the
  tokens gathered in that order, one grouped matmul per projection (`grouped_matmul`), the results
  weighted and scatter-added back to their tokens. It spends the active FLOPs only.
- `reference_experts`, the plain reference: every expert on every token (dense einsums over E),
  combined with the routing weights as a [T, E] mask; E/k times the active FLOPs.

Under an `activation_sharding` mesh whose `expert` axis is > 1, the decoder runs the grouped path split
over that axis instead (`expert_parallel.expert_parallel_experts`: each device `local_experts`, its own).

The grouped matmul is the platform's (`grouped_matmul.py`: `jax.lax.ragged_dot` on TPU, a tiled loop
on CPU and GPU, where `ragged_dot` multiplies every group).

Router statistics (`RouterStats`) are sums over tokens, so the decoder can add them over layers;
`balance_loss` of the sum is then exactly `transformers`' `load_balancing_loss_func` over those
layers (E * sum_e f_e * P_e, with f_e the assignments of expert e per token, summing to k).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from sdft_jax.models import lora as lora_lib
from sdft_jax.models import top_k as top_k_lib
from sdft_jax.models.grouped_matmul import grouped_matmul
from sdft_jax.pytrees import pytree_dataclass
from sdft_jax.validation import check_bool, check_int, check_number

# Projections of the routed experts, in the order an expert applies them.
EXPERT_PROJECTIONS = ("experts_gate_proj", "experts_up_proj", "experts_down_proj")
SHARED_PROJECTIONS = ("shared_expert_gate_proj", "shared_expert_up_proj", "shared_expert_down_proj")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoeConfig:
    """One sparse MoE channel mixer.

    Attributes:
      num_experts: routed experts E (>= 1).
      top_k: experts each token is sent to, in [1, num_experts] (HF `num_experts_per_tok`).
      expert_hidden: each routed expert's hidden size F (HF `moe_intermediate_size`).
      norm_topk_prob: renormalise the k chosen probabilities to sum 1 (HF `norm_topk_prob`).
      shared_expert_hidden: the shared expert's hidden size Fs; 0 = no shared expert
        (HF `shared_expert_intermediate_size`).
      load_balance_coef: weight of the load-balancing loss in `MoeOutput.aux_loss`; 0 = off, the
        default for fine-tuning (HF `router_aux_loss_coef`, applied there only when
        `output_router_logits`).
    """

    num_experts: int
    top_k: int
    expert_hidden: int
    norm_topk_prob: bool = True
    shared_expert_hidden: int = 0
    load_balance_coef: float = 0.0

    def __post_init__(self):
        check_int("MoeConfig.num_experts", self.num_experts, minimum=1)
        check_int("MoeConfig.top_k", self.top_k, minimum=1, maximum=self.num_experts,
                  hint="at most num_experts")
        check_int("MoeConfig.expert_hidden", self.expert_hidden, minimum=1)
        check_bool("MoeConfig.norm_topk_prob", self.norm_topk_prob)
        check_int("MoeConfig.shared_expert_hidden", self.shared_expert_hidden, minimum=0, hint="0 = none")
        check_number("MoeConfig.load_balance_coef", self.load_balance_coef, low=0.0, hint="0 = off")


def param_shapes(hidden_size: int, cfg: MoeConfig) -> dict[str, tuple[tuple[int, ...], tuple[str | None, ...]]]:
    """One layer's MoE weight name -> (shape, logical axes), as the decoder lists its per-layer weights.

    `expert` is the logical axis of the experts (`sharding.DEFAULT_RULES` maps it to the mesh axis
    `expert`: expert parallelism, `expert_parallel.py`); the router and the shared expert's gate are
    small and replicated along their output.
    """
    D, E, F, Fs = hidden_size, cfg.num_experts, cfg.expert_hidden, cfg.shared_expert_hidden
    shapes = {
        "router": ((D, E), ("embed", None)),
        "experts_gate_proj": ((E, D, F), ("expert", "embed", "mlp")),
        "experts_up_proj": ((E, D, F), ("expert", "embed", "mlp")),
        "experts_down_proj": ((E, F, D), ("expert", "mlp", "embed")),
    }
    if Fs:
        shapes["shared_expert_gate_proj"] = ((D, Fs), ("embed", "mlp"))
        shapes["shared_expert_up_proj"] = ((D, Fs), ("embed", "mlp"))
        shapes["shared_expert_down_proj"] = ((Fs, D), ("mlp", "embed"))
        shapes["shared_expert_gate"] = ((D, 1), ("embed", None))
    return shapes


@pytree_dataclass
@dataclasses.dataclass(frozen=True)
class Routing:
    """Where each of T tokens goes: its k experts and their weights, and the router's distribution."""

    expert_ids: Int[Array, "T k"]
    weights: Float[Array, "T k"]  # in the logits' dtype; sum 1 per token when norm_topk_prob
    probs: Float[Array, "T E"]  # softmax of the logits, fp32
    logits: Float[Array, "T E"]  # in the activations' dtype


@pytree_dataclass
@dataclasses.dataclass(frozen=True)
class RouterStats:
    """Sums over the routed tokens (fp32), additive over layers and batches.

    `assignments[e]` counts the (token, expert) assignments to e (k per token), `prob_sum[e]` sums the
    router's probability of e, `tokens` counts the tokens; padding tokens excluded when a mask is given.
    """

    assignments: Float[Array, "E"]
    prob_sum: Float[Array, "E"]
    tokens: Float[Array, ""]

    def load(self) -> Float[Array, "E"]:
        """Each expert's fraction of the assignments (sums to 1)."""
        return self.assignments / jnp.maximum(jnp.sum(self.assignments), 1.0)

    def max_over_mean_load(self) -> Float[Array, ""]:
        """The busiest expert's load over the mean load 1/E: 1 when balanced, at most E/k."""
        return jnp.max(self.load()) * self.assignments.shape[0]



@pytree_dataclass
@dataclasses.dataclass(frozen=True)
class MoeOutput:
    """What the channel mixer returns: its output, the router statistics, the weighted auxiliary loss.

    `aux_loss` is this layer's loss alone. For a model, `transformers` applies the loss once to the
    statistics summed over the layers (not the sum of per-layer losses): add the layers' `stats`, then
    `load_balance_coef * balance_loss(summed)`.
    """

    hidden: Float[Array, "*B D"]
    stats: RouterStats
    aux_loss: Float[Array, ""]  # load_balance_coef * balance_loss(stats); 0 when off


@pytree_dataclass
@dataclasses.dataclass(frozen=True)
class Experts:
    """The routed experts' weights, and their per-expert LoRA adapters `(A, B)` when adapted."""

    gate: Float[Array, "E D F"]
    up: Float[Array, "E D F"]
    down: Float[Array, "E F D"]
    gate_lora: tuple[Float[Array, "E D r"], Float[Array, "E r F"]] | None = None
    up_lora: tuple[Float[Array, "E D r"], Float[Array, "E r F"]] | None = None
    down_lora: tuple[Float[Array, "E F r"], Float[Array, "E r D"]] | None = None

    @classmethod
    def from_weights(cls, w: Mapping[str, Array]) -> Experts:
        """The `experts_*` entries of one layer's weights (with `_lora_a` / `_lora_b` when present)."""
        def adapters(name):
            return (w[f"{name}_lora_a"], w[f"{name}_lora_b"]) if f"{name}_lora_a" in w else None

        gate, up, down = EXPERT_PROJECTIONS
        return cls(gate=w[gate], up=w[up], down=w[down],
                   gate_lora=adapters(gate), up_lora=adapters(up), down_lora=adapters(down))


ExpertsFn = Callable[[Array, Routing, Experts, float], Array]


def route(x: Float[Array, "T D"], router: Float[Array, "D E"], cfg: MoeConfig) -> Routing:
    """The top-k routing of tokens `x` by router weights `router`, as `Qwen3MoeTopKRouter` computes it."""
    logits = jnp.dot(x, router.astype(x.dtype))
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top, ids = top_k_lib.top_k(probs, cfg.top_k)  # jax.lax.top_k's result; on GPU split along the tokens
    if cfg.norm_topk_prob:
        top = top / jnp.sum(top, axis=-1, keepdims=True)
    return Routing(expert_ids=ids.astype(jnp.int32), weights=top.astype(logits.dtype), probs=probs, logits=logits)


def router_stats(routing: Routing, mask: Bool[Array, "T"] | None = None) -> RouterStats:
    """The routing's `RouterStats`, counting only tokens where `mask` (all when None)."""
    num_experts = routing.probs.shape[-1]
    counted = jnp.ones(routing.probs.shape[:1], jnp.float32) if mask is None else mask.astype(jnp.float32)
    hits = jax.nn.one_hot(routing.expert_ids, num_experts, dtype=jnp.float32)  # [T, k, E]
    return RouterStats(
        assignments=jnp.einsum("tke,t->e", hits, counted),
        prob_sum=jnp.einsum("te,t->e", routing.probs, counted),
        tokens=jnp.sum(counted),
    )


def balance_loss(stats: RouterStats) -> Float[Array, ""]:
    """The Switch / Qwen load-balancing loss E * sum_e f_e * P_e of (possibly layer-summed) `stats`,
    f_e = assignments_e / tokens, P_e = prob_sum_e / tokens; 1 * k when perfectly balanced.

    Only P carries a gradient (to the router), as in `transformers`' `load_balancing_loss_func`.
    """
    tokens = jnp.maximum(stats.tokens, 1.0)
    f = jax.lax.stop_gradient(stats.assignments) / tokens
    return stats.assignments.shape[0] * jnp.sum(f * (stats.prob_sum / tokens))


def reference_experts(x: Float[Array, "T D"], routing: Routing, experts: Experts,
                      lora_scale: float = 1.0) -> Float[Array, "T D"]:
    """The routed experts' output, computing every expert on every token and masking by the routing."""
    num_experts = experts.gate.shape[0]
    combine = jnp.einsum("tk,tke->te", routing.weights,
                         jax.nn.one_hot(routing.expert_ids, num_experts, dtype=routing.weights.dtype))

    scale = jnp.asarray(lora_scale, x.dtype)

    def up_projection(w, lora):  # [T, E, F]: every expert's gate or up projection of every token
        y = jnp.einsum("td,edf->tef", x, w.astype(x.dtype))
        if lora is not None:
            low = jnp.einsum("td,edr->ter", x, lora[0].astype(x.dtype))
            y = y + jnp.einsum("ter,erf->tef", low, lora[1].astype(x.dtype)) * scale
        return y

    hidden = jax.nn.silu(up_projection(experts.gate, experts.gate_lora)) * up_projection(experts.up, experts.up_lora)
    # The combine weights scale each expert's hidden units: the down projection is linear, so this is
    # HF's weighting of each expert's output, without a [T, E, D] intermediate.
    hidden = hidden * combine.astype(hidden.dtype)[:, :, None]
    y = jnp.einsum("tef,efd->td", hidden, experts.down.astype(x.dtype))
    if experts.down_lora is not None:
        low = jnp.einsum("tef,efr->ter", hidden, experts.down_lora[0].astype(x.dtype))
        y = y + jnp.einsum("ter,erd->td", low, experts.down_lora[1].astype(x.dtype)) * scale
    return y


def grouped_experts(x: Float[Array, "T D"], routing: Routing, experts: Experts,
                    lora_scale: float = 1.0) -> Float[Array, "T D"]:
    """The routed experts' output from the T*k assignments sorted by expert (dropless, active FLOPs only)."""
    return local_experts(x, routing.expert_ids, routing.weights, experts, jnp.zeros((), jnp.int32), lora_scale)


def local_experts(x: Float[Array, "T D"], expert_ids: Int[Array, "T k"], weights: Float[Array, "T k"],
                  experts: Experts, first_expert: Int[Array, ""], lora_scale: float = 1.0) -> Float[Array, "T D"]:
    """The contribution of experts `first_expert .. first_expert + E_local - 1` (`experts` holds their
    weights, E_local of them) to each token; all of them when `experts` holds every expert and
    `first_expert` is 0 (`grouped_experts`). The shard of one device under expert parallelism.

    The T*k assignments are sorted by expert, the tokens gathered in that order, one grouped matmul per
    projection, the results weighted and scatter-added back to their tokens. Assignments to other
    experts sort last and belong to no group (the grouped matmul leaves such rows zero); their weight
    is zeroed as well.
    """
    T, k = expert_ids.shape
    num_local = experts.gate.shape[0]
    local_id = expert_ids.reshape(T * k) - first_expert
    mine = (local_id >= 0) & (local_id < num_local)
    key = jnp.where(mine, local_id, num_local)  # the other experts' assignments last
    order = jnp.argsort(key, stable=True)  # assignment a = t * k + slot
    token = order // k
    group_sizes = jnp.bincount(key, length=num_local + 1)[:num_local].astype(jnp.int32)
    xs = x[token]

    def project(h, w, lora):
        y = grouped_matmul(h, w.astype(h.dtype), group_sizes)
        if lora is not None:
            a, b = lora
            low = grouped_matmul(h, a.astype(h.dtype), group_sizes)
            y = y + grouped_matmul(low, b.astype(h.dtype), group_sizes) * jnp.asarray(lora_scale, h.dtype)
        return y

    hidden = jax.nn.silu(project(xs, experts.gate, experts.gate_lora)) * project(xs, experts.up, experts.up_lora)
    out = project(hidden, experts.down, experts.down_lora)
    weight = jnp.where(mine, weights.reshape(T * k), 0)[order]
    out = jnp.where(mine[order][:, None], out * weight[:, None].astype(out.dtype), 0)
    return jnp.zeros_like(x).at[token].add(out.astype(x.dtype))


def shared_expert(x: Float[Array, "T D"], w: Mapping[str, Array], lora_scale: float = 1.0) -> Float[Array, "T D"]:
    """The shared expert's SwiGLU MLP of `x` (with its adapters when `w` has them), scaled per token by
    sigmoid(x @ shared_expert_gate)."""
    def proj(h, name):
        adapters = (w[f"{name}_lora_a"].astype(h.dtype), w[f"{name}_lora_b"].astype(h.dtype)) \
            if f"{name}_lora_a" in w else None
        return lora_lib.project(h[None], w[name].astype(h.dtype), 1, adapters, lora_scale)[0]

    gate, up, down = SHARED_PROJECTIONS
    mlp = proj(jax.nn.silu(proj(x, gate)) * proj(x, up), down)
    return jax.nn.sigmoid(jnp.dot(x, w["shared_expert_gate"].astype(x.dtype))) * mlp


def _moe(x: Float[Array, "*B D"], w: Mapping[str, Array], cfg: MoeConfig, token_mask: Bool[Array, "*B"] | None,
         lora_scale: float, experts_fn: ExpertsFn) -> MoeOutput:
    """Routing, routed experts by `experts_fn`, shared expert, statistics: what both paths share."""
    flat = x.reshape(-1, x.shape[-1])
    routing = route(flat, w["router"], cfg)
    y = experts_fn(flat, routing, Experts.from_weights(w), lora_scale)
    if cfg.shared_expert_hidden:
        y = y + shared_expert(flat, w, lora_scale)
    stats = router_stats(routing, None if token_mask is None else token_mask.reshape(-1))
    aux = cfg.load_balance_coef * balance_loss(stats) if cfg.load_balance_coef else jnp.zeros((), jnp.float32)
    return MoeOutput(hidden=y.reshape(x.shape), stats=stats, aux_loss=aux)


def sparse_moe(x: Float[Array, "*B D"], w: Mapping[str, Array], cfg: MoeConfig, *,
               token_mask: Bool[Array, "*B"] | None = None, lora_scale: float = 1.0,
               experts_fn: ExpertsFn = grouped_experts) -> MoeOutput:
    """The MoE channel mixer on (normed) activations `x` with one layer's weights `w`, grouped path
    (`experts_fn`: the decoder passes `expert_parallel.expert_parallel_experts` when tracing under an
    `activation_sharding` mesh whose `expert` axis splits the experts).

    `token_mask` marks the real tokens for the router statistics and the auxiliary loss (padding is
    computed but not counted); `lora_scale` multiplies the experts' low-rank updates when `w` has them.
    """
    return _moe(x, w, cfg, token_mask, lora_scale, experts_fn)


def reference_moe(x: Float[Array, "*B D"], w: Mapping[str, Array], cfg: MoeConfig, *,
                  token_mask: Bool[Array, "*B"] | None = None, lora_scale: float = 1.0) -> MoeOutput:
    """`sparse_moe` with every expert run on every token (`reference_experts`): the plain reference."""
    return _moe(x, w, cfg, token_mask, lora_scale, reference_experts)


def active_flops(tokens: int, hidden_size: int, cfg: MoeConfig) -> int:
    """Forward matmul FLOPs of the routed experts the routing asks for (2 per multiply-add): 3 projections
    of k experts per token."""
    return 2 * 3 * tokens * cfg.top_k * hidden_size * cfg.expert_hidden


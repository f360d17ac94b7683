"""Gated DeltaNet token mixer (the linear-attention layers of Qwen3.5 / Qwen3.5-MoE).

Pure functions over one layer's weights, a `Mapping[str, Array]` like `decoder_layer`'s. Each value
head keeps a state `S` [Dk, Dv] that every token decays and corrects by the gated delta rule,

    S <- exp(g_t) S;   S <- S + k_t (beta_t (v_t - S^T k_t))^T;   o_t = S^T q_t / sqrt(Dk),

with q, k, v from a causal depthwise convolution (kernel K, SiLU) of input projections, q and k
L2-normalised, beta = sigmoid(x W_b) and log-decay g = -exp(A_log) * softplus(x W_a + dt_bias); the
output goes through an RMSNorm gated by SiLU(x W_z), then the output projection. Matches HF
`transformers` (`Qwen3_5GatedDeltaNet`, identical in `Qwen3_5MoeGatedDeltaNet`): the delta rule in fp32,
the gated norm's weight applied as is (not 1 + weight, unlike the layer norms of the family).
Key heads serve `num_value_heads // num_key_heads` consecutive value heads each (HF `repeat_interleave`).

Two forms of the delta rule, one signature:
- `chunked_gated_delta_rule`: chunks of C tokens; within a chunk the C updates are condensed by the
  UT transform (one unit-lower-triangular solve) into matmuls, then a `lax.scan` carries the state
  from chunk to chunk. For training, scoring and prefill.
- `recurrent_gated_delta_rule`: the per-token recurrence, the plain reference and the decoding step
  (one token against the fixed-size state).

Weight layout (names are the keys of one layer's mapping; D hidden, Hk key heads, Hv value heads, Dk /
Dv their dims, K the conv kernel; matrices stored `[in, out]`, the transpose of HF's `nn.Linear`, with
the head axes split so that heads can be sharded; HF names under `linear_attn.`):

| name | shape | HF tensor |
|---|---|---|
| `linear_q_proj`, `linear_k_proj` | [D, Hk, Dk] each | `in_proj_qkv.weight` [2 Hk Dk + Hv Dv, D]: rows q, then k |
| `linear_v_proj` | [D, Hv, Dv] | `in_proj_qkv.weight`: the last Hv Dv rows |
| `linear_z_proj` | [D, Hv, Dv] | `in_proj_z.weight` [Hv Dv, D] |
| `linear_b_proj`, `linear_a_proj` | [D, Hv] each | `in_proj_b.weight`, `in_proj_a.weight` [Hv, D] |
| `linear_q_conv`, `linear_k_conv` | [K, Hk, Dk] each | `conv1d.weight` [2 Hk Dk + Hv Dv, 1, K], as `in_proj_qkv` |
| `linear_v_conv` | [K, Hv, Dv] | `conv1d.weight`: the last Hv Dv channels |
| `linear_dt_bias` | [Hv] | `dt_bias` |
| `linear_a_log` | [Hv] | `A_log` |
| `linear_norm` | [Dv] | `norm.weight` |
| `linear_out_proj` | [Hv, Dv, D] | `out_proj.weight` [D, Hv Dv] |

q / k / v are kept apart (HF fuses them into one projection and one convolution) so that each is
split over its own heads and has its own adapters (`LINEAR_PROJECTIONS`). The convolution has no
bias in Qwen3.5 and its activation is the config's `hidden_act`, SiLU in every released model.

Padding (`mask` False): the token's input is zeroed before the projections (HF
`apply_mask_to_padding_states`), and its log-decay g and its beta are set to 0 (no decay, no write),
so the recurrent state passes through it unchanged; the conv tail kept in `DeltaNetState` is the last
K-1 real inputs. A left- or right-padded row therefore gives its real tokens' outputs and final state
exactly as the row alone (HF agrees for left padding from an empty state, where its padded tokens
decay a zero state).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from sdft_jax.models import lora as lora_lib
from sdft_jax.models.norm import rms_norm
from sdft_jax.pytrees import pytree_dataclass
from sdft_jax.validation import check_int, check_number

Shapes = dict[str, tuple[tuple[int, ...], tuple[str | None, ...]]]

# The projections that take low-rank adapters (`lora.PROJECTIONS` gives their input dims).
LINEAR_PROJECTIONS = ("linear_q_proj", "linear_k_proj", "linear_v_proj", "linear_z_proj", "linear_b_proj",
                      "linear_a_proj", "linear_out_proj")
L2NORM_EPS = 1e-6  # HF `l2norm` (FLA's value): x * rsqrt(sum x^2 + eps)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DeltaNetConfig:
    """One Gated DeltaNet token mixer.

    Attributes:
      num_key_heads: query / key heads Hk (HF `linear_num_key_heads`).
      num_value_heads: value heads Hv, a multiple of Hk (HF `linear_num_value_heads`).
      key_head_dim: Dk (HF `linear_key_head_dim`).
      value_head_dim: Dv (HF `linear_value_head_dim`).
      conv_kernel: the causal depthwise convolution's width K (HF `linear_conv_kernel_dim`).
      norm_eps: epsilon of the gated RMSNorm (HF `rms_norm_eps`).
    """

    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int = 4
    norm_eps: float = 1e-6

    def __post_init__(self):
        check_int("DeltaNetConfig.num_key_heads", self.num_key_heads, minimum=1)
        check_int("DeltaNetConfig.num_value_heads", self.num_value_heads, minimum=1)
        if self.num_value_heads % self.num_key_heads:
            raise ValueError(f"DeltaNetConfig.num_value_heads must be a multiple of num_key_heads "
                             f"({self.num_key_heads}), got {self.num_value_heads}")
        check_int("DeltaNetConfig.key_head_dim", self.key_head_dim, minimum=1)
        check_int("DeltaNetConfig.value_head_dim", self.value_head_dim, minimum=1)
        check_int("DeltaNetConfig.conv_kernel", self.conv_kernel, minimum=1)
        check_number("DeltaNetConfig.norm_eps", self.norm_eps, low=0.0, low_open=True)


def param_shapes(hidden_size: int, cfg: DeltaNetConfig) -> Shapes:
    """One layer's Gated DeltaNet weight name -> (shape, logical axes).

    Key heads carry the logical axis `kv_heads`, value heads `q_heads` (the more numerous, as the query
    heads of grouped attention); both map to the mesh axis `tensor` in `sharding.DEFAULT_RULES`, and
    a device holding value heads [i Hv/n, (i+1) Hv/n) holds exactly the key heads they read.
    """
    D, Hk, Hv, Dk, Dv, K = (hidden_size, cfg.num_key_heads, cfg.num_value_heads, cfg.key_head_dim,
                            cfg.value_head_dim, cfg.conv_kernel)
    return {
        "linear_q_proj": ((D, Hk, Dk), ("embed", "kv_heads", "head_dim")),
        "linear_k_proj": ((D, Hk, Dk), ("embed", "kv_heads", "head_dim")),
        "linear_v_proj": ((D, Hv, Dv), ("embed", "q_heads", "head_dim")),
        "linear_z_proj": ((D, Hv, Dv), ("embed", "q_heads", "head_dim")),
        "linear_b_proj": ((D, Hv), ("embed", "q_heads")),
        "linear_a_proj": ((D, Hv), ("embed", "q_heads")),
        "linear_q_conv": ((K, Hk, Dk), (None, "kv_heads", "head_dim")),
        "linear_k_conv": ((K, Hk, Dk), (None, "kv_heads", "head_dim")),
        "linear_v_conv": ((K, Hv, Dv), (None, "q_heads", "head_dim")),
        "linear_dt_bias": ((Hv,), ("q_heads",)),
        "linear_a_log": ((Hv,), ("q_heads",)),
        "linear_norm": ((Dv,), ("head_dim",)),
        "linear_out_proj": ((Hv, Dv, D), ("q_heads", "head_dim", "embed")),
    }


@pytree_dataclass
@dataclasses.dataclass(frozen=True)
class DeltaNetState:
    """What decoding carries from one call to the next, per layer: the delta rule's state (fp32) and
    the last K-1 inputs of each convolution (the projections before it, in the activations' dtype)."""

    recurrent: Float[Array, "B Hv Dk Dv"]
    q_tail: Float[Array, "B Km1 Hk Dk"]
    k_tail: Float[Array, "B Km1 Hk Dk"]
    v_tail: Float[Array, "B Km1 Hv Dv"]

    @classmethod
    def zeros(cls, batch: int, cfg: DeltaNetConfig, dtype=jnp.float32) -> DeltaNetState:
        """The state before any token (what HF starts from without a cache)."""
        Hk, Hv, Dk, Dv = cfg.num_key_heads, cfg.num_value_heads, cfg.key_head_dim, cfg.value_head_dim
        K = cfg.conv_kernel
        return cls(recurrent=jnp.zeros((batch, Hv, Dk, Dv), jnp.float32),
                   q_tail=jnp.zeros((batch, K - 1, Hk, Dk), dtype), k_tail=jnp.zeros((batch, K - 1, Hk, Dk), dtype),
                   v_tail=jnp.zeros((batch, K - 1, Hv, Dv), dtype))


# ---------------------------------------------------------------- the delta rule


DeltaRuleFn = Callable[..., tuple[Array, Array]]


def _prepared(q, k, v, g, beta):
    """fp32 inputs, key heads repeated over their value heads, q scaled by 1/sqrt(Dk) (as HF)."""
    group = v.shape[2] // k.shape[2]
    q, k = (jnp.repeat(t.astype(jnp.float32), group, axis=2) for t in (q, k))
    q = q * q.shape[-1] ** -0.5
    return q, k, v.astype(jnp.float32), g.astype(jnp.float32), beta.astype(jnp.float32)


def recurrent_gated_delta_rule(
    q: Float[Array, "B T Hk Dk"], k: Float[Array, "B T Hk Dk"], v: Float[Array, "B T Hv Dv"],
    g: Float[Array, "B T Hv"], beta: Float[Array, "B T Hv"], *,
    initial_state: Float[Array, "B Hv Dk Dv"] | None = None,
) -> tuple[Float[Array, "B T Hv Dv"], Float[Array, "B Hv Dk Dv"]]:
    """The gated delta rule token by token: (outputs in q's dtype, final state fp32).

    HF `torch_recurrent_gated_delta_rule` (without its in-kernel L2 norm: q and k come normalised).
    """
    B, _, _, Dk = q.shape
    Hv, Dv = v.shape[2:]
    qf, kf, vf, gf, bf = _prepared(q, k, v, g, beta)
    state = jnp.zeros((B, Hv, Dk, Dv), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)

    def step(s, token):
        q_t, k_t, v_t, g_t, b_t = token
        s = s * jnp.exp(g_t)[:, :, None, None]
        delta = (v_t - jnp.einsum("bhk,bhkv->bhv", k_t, s)) * b_t[:, :, None]
        s = s + k_t[:, :, :, None] * delta[:, :, None, :]
        return s, jnp.einsum("bhk,bhkv->bhv", q_t, s)

    time_major = tuple(jnp.moveaxis(t, 1, 0) for t in (qf, kf, vf, gf, bf))
    state, out = jax.lax.scan(step, state, time_major)
    return jnp.moveaxis(out, 0, 1).astype(q.dtype), state


DEFAULT_CHUNK = 64  # tokens per chunk of `chunked_gated_delta_rule`
SUBSTITUTION_BLOCK = 16  # `unit_lower_inverse` inverts diagonal blocks of this size row by row


def _diagonal_blocks(x, size: int):
    """[..., n, n] -> [..., n / size, size, size]: the blocks on the diagonal."""
    nb = x.shape[-1] // size
    return jnp.einsum("...iaib->...iab", x.reshape(*x.shape[:-2], nb, size, nb, size))


def unit_lower_inverse(strict: Float[Array, "*B C C"]) -> Float[Array, "*B C C"]:
    """(I + strict)^-1 for `strict` strictly lower triangular, by matmuls only.

    Zero-padded to `SUBSTITUTION_BLOCK` x 2^m rows; all diagonal blocks of `SUBSTITUTION_BLOCK` rows
    are inverted at once by forward substitution, then neighbouring blocks merged level by level,
    [[A, 0], [L, D]]^-1 = [[A^-1, 0], [-D^-1 L A^-1, D^-1]]. (With `lax.linalg.triangular_solve`
    instead, the gradient of a chunked step of 1,024 tokens x 16 heads x 128 hung on XLA:CPU, jax
    0.10.2: no progress, every thread waiting.)
    """
    n, b = strict.shape[-1], SUBSTITUTION_BLOCK
    padded = b
    while padded < n:
        padded *= 2
    m = jnp.pad(strict, [(0, 0)] * (strict.ndim - 2) + [(0, padded - n), (0, padded - n)])
    leaves = _diagonal_blocks(m, b)  # [..., nb, b, b]
    inverse = jnp.broadcast_to(jnp.eye(b, dtype=m.dtype), leaves.shape)
    for i in range(1, b):  # row i = e_i - strict[i, :i] @ rows :i (rows >= i are still e_j)
        row = inverse[..., i, :] - jnp.einsum("...j,...jk->...k", leaves[..., i, :i], inverse[..., :i, :])
        inverse = inverse.at[..., i, :].set(row)
    size = b
    while size < padded:
        pairs = _diagonal_blocks(m, 2 * size)  # [..., nb / 2, 2 size, 2 size]
        top, bottom = inverse[..., 0::2, :, :], inverse[..., 1::2, :, :]
        lower = -jnp.einsum("...ij,...jk,...kl->...il", bottom, pairs[..., size:, :size], top)
        upper = jnp.concatenate([top, jnp.zeros_like(top)], -1)
        inverse = jnp.concatenate([upper, jnp.concatenate([lower, bottom], -1)], -2)
        size *= 2
    return inverse[..., 0, :n, :n]


def chunked_gated_delta_rule(
    q: Float[Array, "B T Hk Dk"], k: Float[Array, "B T Hk Dk"], v: Float[Array, "B T Hv Dv"],
    g: Float[Array, "B T Hv"], beta: Float[Array, "B T Hv"], *, chunk_size: int = DEFAULT_CHUNK,
    initial_state: Float[Array, "B Hv Dk Dv"] | None = None,
) -> tuple[Float[Array, "B T Hv Dv"], Float[Array, "B Hv Dk Dv"]]:
    """The gated delta rule in chunks of `chunk_size` tokens: (outputs in q's dtype, final state fp32).

    Equals `recurrent_gated_delta_rule` (HF `torch_chunk_gated_delta_rule`'s algorithm). Within a
    chunk, with G the cumulative log-decay and L[i, j] = exp(G_i - G_j) for j <= i: the C updates are
    condensed by the inverse of I + strictly_lower(beta_i k_i.k_j L_ij) (`unit_lower_inverse`), which
    maps beta v to the values u to write and beta k exp(G) to the keys w that read the chunk's initial
    state S; then v' = u - w S, the outputs (q exp(G)) S + (q k^T * L) v', and
    S <- exp(G_C) S + (k exp(G_C - G))^T v'. All but the last two steps run for all chunks at once;
    a `lax.scan` carries S. The tail is padded with g = beta = 0 tokens, which change nothing.
    """
    B, T, _, Dk = q.shape
    Hv, Dv = v.shape[2:]
    C = chunk_size
    qf, kf, vf, gf, bf = _prepared(q, k, v, g, beta)
    pad = -T % C
    N = (T + pad) // C

    def chunks(t):  # [B, T, H, ...] -> [N, B, H, C, ...]
        t = jnp.pad(t, [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2))
        t = t.reshape(B, N, C, *t.shape[2:])
        return jnp.moveaxis(jnp.moveaxis(t, 1, 0), 2, 3)

    qc, kc, vc, gc, bc = (chunks(t) for t in (qf, kf, vf, gf, bf))
    cum = jnp.cumsum(gc, axis=-1)  # [N, B, H, C]
    causal = jnp.tril(jnp.ones((C, C), bool))
    # exp of the masked differences only: above the diagonal they are positive and may overflow.
    decay = jnp.exp(jnp.where(causal, cum[..., :, None] - cum[..., None, :], -jnp.inf))  # [N, B, H, C, C]

    k_beta = kc * bc[..., None]
    strict = jnp.einsum("...ik,...jk->...ij", k_beta, kc) * decay * ~jnp.eye(C, dtype=bool)
    inverse = unit_lower_inverse(strict)
    new_values = jnp.einsum("...ij,...jv->...iv", inverse, vc * bc[..., None])
    read_keys = jnp.einsum("...ij,...jk->...ik", inverse, k_beta * jnp.exp(cum)[..., None])
    intra = jnp.einsum("...ik,...jk->...ij", qc, kc) * decay
    q_decayed = qc * jnp.exp(cum)[..., None]
    k_decayed = kc * jnp.exp(cum[..., -1:] - cum)[..., None]
    chunk_decay = jnp.exp(cum[..., -1])[..., None, None]  # [N, B, H, 1, 1]

    def step(s, chunk):
        u, w_read, q_dec, attn, k_dec, d = chunk
        v_new = u - jnp.einsum("bhck,bhkv->bhcv", w_read, s)
        out = jnp.einsum("bhck,bhkv->bhcv", q_dec, s) + jnp.einsum("bhcj,bhjv->bhcv", attn, v_new)
        s = s * d + jnp.einsum("bhck,bhcv->bhkv", k_dec, v_new)
        return s, out

    state = jnp.zeros((B, Hv, Dk, Dv), jnp.float32) if initial_state is None else initial_state.astype(jnp.float32)
    state, out = jax.lax.scan(step, state, (new_values, read_keys, q_decayed, intra, k_decayed, chunk_decay))
    out = jnp.moveaxis(out, 0, 1)  # [B, N, H, C, Dv]
    out = jnp.moveaxis(out, 2, 3).reshape(B, N * C, Hv, Dv)[:, :T]
    return out.astype(q.dtype), state


# ---------------------------------------------------------------- the mixer


def l2norm(x: Float[Array, "*B D"]) -> Float[Array, "*B D"]:
    """x / sqrt(sum x^2 + eps) over the last axis, in fp32 (HF `l2norm`)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + L2NORM_EPS)


def causal_conv(x: Float[Array, "B T H E"], tail: Float[Array, "B Km1 H E"], weight: Float[Array, "K H E"],
                real: Bool[Array, "B T"]) -> tuple[Float[Array, "B T H E"], Float[Array, "B Km1 H E"]]:
    """SiLU of the causal depthwise convolution of `tail ++ x` (HF `causal_conv1d_fn`, which
    correlates: weight[K-1] multiplies the current token), and the new tail: the last K-1 inputs among
    the old tail and the `real` tokens of `x`."""
    K, T = weight.shape[0], x.shape[1]
    full = jnp.concatenate([tail.astype(x.dtype), x], axis=1)  # [B, K-1+T, H, E]
    w = weight.astype(x.dtype)
    out = sum(full[:, j:j + T] * w[j] for j in range(K))
    kept = jnp.concatenate([jnp.ones(tail.shape[:2], bool), real], axis=1)
    # Real inputs last, in order (a stable sort on "is real"); the old tail counts as real.
    order = jnp.argsort(kept, axis=1, stable=True)[:, full.shape[1] - (K - 1):]
    new_tail = jnp.take_along_axis(full, order[:, :, None, None], axis=1)
    return jax.nn.silu(out), new_tail


def gated_rms_norm(x: Float[Array, "*B E"], gate: Float[Array, "*B E"], weight: Float[Array, "E"],
                   eps: float) -> Float[Array, "*B E"]:
    """HF `Qwen3_5RMSNormGated`: RMSNorm (fp32, cast back, times the weight) times SiLU(gate) in fp32,
    cast to x's dtype."""
    normed = rms_norm(x, weight, eps)
    return (normed.astype(jnp.float32) * jax.nn.silu(gate.astype(jnp.float32))).astype(x.dtype)


def _mixer(x, w, cfg: DeltaNetConfig, mask, state, lora, rule: DeltaRuleFn):
    B, T, _ = x.shape
    real = jnp.ones((B, T), bool) if mask is None else mask
    if mask is not None:
        x = jnp.where(mask[:, :, None], x, jnp.zeros((), x.dtype))
    if state is None:
        state = DeltaNetState.zeros(B, cfg, x.dtype)
    convolved, tails = [], []
    for name, tail in (("q", state.q_tail), ("k", state.k_tail), ("v", state.v_tail)):
        projected = lora_lib.project_named(x, w, f"linear_{name}_proj", lora)
        out, new_tail = causal_conv(projected, tail, w[f"linear_{name}_conv"], real)
        convolved.append(out)
        tails.append(new_tail)
    q, k, v = convolved
    z = lora_lib.project_named(x, w, "linear_z_proj", lora)
    beta = jax.nn.sigmoid(lora_lib.project_named(x, w, "linear_b_proj", lora))
    a = lora_lib.project_named(x, w, "linear_a_proj", lora).astype(jnp.float32)
    g = -jnp.exp(w["linear_a_log"].astype(jnp.float32)) * jax.nn.softplus(a + w["linear_dt_bias"].astype(jnp.float32))
    # Padding: no decay (g = 0) and no write (beta = 0), so the state passes through unchanged.
    g = jnp.where(real[:, :, None], g, 0.0)
    beta = jnp.where(real[:, :, None], beta, jnp.zeros((), beta.dtype))
    core, recurrent = rule(l2norm(q), l2norm(k), v, g, beta, initial_state=state.recurrent)
    core = gated_rms_norm(core.astype(x.dtype), z, w["linear_norm"], cfg.norm_eps)
    out = lora_lib.project_named(core, w, "linear_out_proj", lora)
    return out, DeltaNetState(recurrent=recurrent, q_tail=tails[0], k_tail=tails[1], v_tail=tails[2])


def gated_deltanet(
    x: Float[Array, "B T D"], w: Mapping[str, Array], cfg: DeltaNetConfig, *,
    mask: Bool[Array, "B T"] | None = None, state: DeltaNetState | None = None,
    lora: lora_lib.LoraConfig | None = None, chunk_size: int = DEFAULT_CHUNK,
) -> tuple[Float[Array, "B T D"], DeltaNetState]:
    """The Gated DeltaNet mixer of (normed) activations `x` by one layer's weights `w`: (output, the
    state after these tokens).

    `mask` marks the real tokens (None: all); `state` continues from earlier tokens (None: from the
    start); `lora` gives the adapters' scale when `w` holds `{name}_lora_{a,b}` for names of
    `LINEAR_PROJECTIONS`. Several tokens go through `chunked_gated_delta_rule`, a single token
    through the recurrence (the decode step).
    """
    if x.shape[1] == 1:
        rule = recurrent_gated_delta_rule
    else:
        def rule(*args, **kwargs):
            return chunked_gated_delta_rule(*args, chunk_size=chunk_size, **kwargs)
    return _mixer(x, w, cfg, mask, state, lora, rule)


def reference_gated_deltanet(
    x: Float[Array, "B T D"], w: Mapping[str, Array], cfg: DeltaNetConfig, *,
    mask: Bool[Array, "B T"] | None = None, state: DeltaNetState | None = None,
    lora: lora_lib.LoraConfig | None = None,
) -> tuple[Float[Array, "B T D"], DeltaNetState]:
    """`gated_deltanet` with the per-token recurrence at every length: the plain reference."""
    return _mixer(x, w, cfg, mask, state, lora, recurrent_gated_delta_rule)

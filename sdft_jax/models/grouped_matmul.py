"""Grouped matmul: rows of `lhs` in contiguous groups, group g multiplied by `rhs[g]` (MoE experts).

One interface, `grouped_matmul`, with the platform's implementation behind it:
- `ragged_grouped_matmul`: `jax.lax.ragged_dot`, on TPU, where XLA has a ragged dot;
- `tiled_grouped_matmul`, on CPU, where `ragged_dot` expands its input to [G, M, K] and multiplies
  every group (G times the FLOPs and the memory), and on GPU, where XLA:GPU (JAX 0.11.2) expanded it
  likewise at Qwen3.5-35B-A3B's size (a bf16[98304, 256, 2048] operand, 96 GiB: the step did not
  compile on an H200, docs/benchmarks.md): a loop over the groups and, within each, over windows
  of `tile` rows, one dense [tile, K] @ [K, N] matmul per window, with its backward written out as the
  same loop. tests/models/grouped_matmul_test.py checks it against `ragged_dot` (values, gradients).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from sdft_jax.models.sharding import target_platform

DEFAULT_TILE = 128  # rows per window of `tiled_grouped_matmul`


def ragged_grouped_matmul(lhs: Float[Array, "M K"], rhs: Float[Array, "G K N"],
                          group_sizes: Int[Array, "G"]) -> Float[Array, "M N"]:
    """Rows `[start_g, start_g + group_sizes[g])` of `lhs` times `rhs[g]`, by `jax.lax.ragged_dot`."""
    return jax.lax.ragged_dot(lhs, rhs, group_sizes)


def tiled_grouped_matmul(lhs: Float[Array, "M K"], rhs: Float[Array, "G K N"], group_sizes: Int[Array, "G"],
                         tile: int = DEFAULT_TILE) -> Float[Array, "M N"]:
    """`ragged_grouped_matmul` as a loop over groups and, within group g, over windows of `tile` rows
    starting at the group's first row: one dense [tile, K] @ [K, N] matmul per window, with rhs[g]
    sliced once per group. A window's rows past the group's end are computed and dropped, so the
    FLOPs spent are those of the group sizes rounded up to whole tiles; an empty group costs nothing.
    Its backward is the same loop (`_tiled_bwd`).
    """
    return _tiled(lhs, rhs, group_sizes.astype(jnp.int32), tile)


def _group_bounds(group_sizes: Int[Array, "G"], tile: int) -> tuple[Int[Array, "G"], Int[Array, "G"], Int[Array, "G"]]:
    """(first row, end row, number of windows) of each group."""
    ends = jnp.cumsum(group_sizes)
    return ends - group_sizes, ends, (group_sizes + tile - 1) // tile


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tiled(lhs: Float[Array, "M K"], rhs: Float[Array, "G K N"], group_sizes: Int[Array, "G"],
           tile: int) -> Float[Array, "M N"]:
    m, n = lhs.shape[0], rhs.shape[2]
    starts, ends, windows = _group_bounds(group_sizes, tile)
    lhs = jnp.pad(lhs, ((0, tile), (0, 0)))  # a window starting at any row stays in bounds
    in_window = jnp.arange(tile)

    def group(g: Int[Array, ""], out: Float[Array, "P N"]) -> Float[Array, "P N"]:
        w = jax.lax.dynamic_index_in_dim(rhs, g, keepdims=False)

        def window(j: Int[Array, ""], out: Float[Array, "P N"]) -> Float[Array, "P N"]:
            first = starts[g] + j * tile
            y = jnp.dot(jax.lax.dynamic_slice_in_dim(lhs, first, tile), w)
            mine = (first + in_window < ends[g])[:, None]  # the rows of group g (later groups' rows follow)
            kept = jnp.where(mine, y, jax.lax.dynamic_slice_in_dim(out, first, tile))
            return jax.lax.dynamic_update_slice_in_dim(out, kept, first, 0)

        return jax.lax.fori_loop(0, windows[g], window, out)

    out = jax.lax.fori_loop(0, rhs.shape[0], group, jnp.zeros((m + tile, n), lhs.dtype))
    return out[:m]


def _tiled_fwd(lhs: Float[Array, "M K"], rhs: Float[Array, "G K N"], group_sizes: Int[Array, "G"],
               tile: int) -> tuple[Float[Array, "M N"], tuple[Array, Array, Array]]:
    return _tiled(lhs, rhs, group_sizes, tile), (lhs, rhs, group_sizes)


def _tiled_bwd(tile: int, saved: tuple[Array, Array, Array],
               d_out: Float[Array, "M N"]) -> tuple[Float[Array, "M K"], Float[Array, "G K N"], None]:
    """Per window of group g, its rows' gradient masked to the group: d lhs rows += d_out rows @ rhs[g].T,
    d rhs[g] += lhs rows.T @ d_out rows (summed over the group's windows, then written once)."""
    lhs, rhs, group_sizes = saved
    m, k = lhs.shape
    starts, ends, windows = _group_bounds(group_sizes, tile)
    lhs = jnp.pad(lhs, ((0, tile), (0, 0)))
    d_out = jnp.pad(d_out, ((0, tile), (0, 0)))
    in_window = jnp.arange(tile)

    def group(g: Int[Array, ""], carry: tuple[Float[Array, "P K"], Float[Array, "G K N"]]):
        d_lhs, d_rhs = carry
        w = jax.lax.dynamic_index_in_dim(rhs, g, keepdims=False)

        def window(j: Int[Array, ""], carry: tuple[Float[Array, "P K"], Float[Array, "K N"]]):
            d_lhs, d_w = carry
            first = starts[g] + j * tile
            mine = (first + in_window < ends[g])[:, None]
            dy = jnp.where(mine, jax.lax.dynamic_slice_in_dim(d_out, first, tile), 0)
            dx = jax.lax.dot_general(dy, w, (((1,), (1,)), ((), ())))  # zero outside the group's rows
            d_lhs = jax.lax.dynamic_update_slice_in_dim(
                d_lhs, jax.lax.dynamic_slice_in_dim(d_lhs, first, tile) + dx, first, 0)
            x = jax.lax.dynamic_slice_in_dim(lhs, first, tile)
            return d_lhs, d_w + jax.lax.dot_general(x, dy, (((0,), (0,)), ((), ())))

        d_lhs, d_w = jax.lax.fori_loop(0, windows[g], window, (d_lhs, jnp.zeros(w.shape, w.dtype)))
        return d_lhs, jax.lax.dynamic_update_index_in_dim(d_rhs, d_w, g, 0)

    zeros = (jnp.zeros((m + tile, k), lhs.dtype), jnp.zeros_like(rhs))
    d_lhs, d_rhs = jax.lax.fori_loop(0, rhs.shape[0], group, zeros)
    return d_lhs[:m], d_rhs, None


_tiled.defvjp(_tiled_fwd, _tiled_bwd)


def grouped_matmul(lhs: Float[Array, "M K"], rhs: Float[Array, "G K N"],
                   group_sizes: Int[Array, "G"]) -> Float[Array, "M N"]:
    """Rows of group g of `lhs` (groups contiguous, in order) times `rhs[g]`: the platform's grouped matmul
    (`jax.lax.ragged_dot` on TPU, `tiled_grouped_matmul` on CPU and GPU; the platform traced for,
    `sharding.target_platform`)."""
    if target_platform() == "tpu":
        return ragged_grouped_matmul(lhs, rhs, group_sizes)
    return tiled_grouped_matmul(lhs, rhs, group_sizes)

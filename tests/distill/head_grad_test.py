"""The blocked backward of the chunked loss against the dense reference, and its memory."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdft_jax.distill.head_grad import BLOCKED_LOSSES, blocked_terms
from sdft_jax.distill.losses import LossConfig, chunked_loss, dense_loss
from sdft_jax.distill.token_terms import TokenStreams
from sdft_jax.models.lm_head import LMHead
from tests.distill.losses_test import REDUCTIONS, assert_close, compiled, parity_config, random_inputs

# V = 13: blocks of 5 are columns 0-4, 5-9 and (moved back to end at V) 8-12, sharing 8-9 with the
# second; 13 is one block; 64 is more than the vocabulary.
BLOCKS = (5, 13, 64)


def _importance_weight_scale(inputs):
    """max |r * A| over the positions (float64): the size of importance_sampling's per-position terms."""
    x = {k: np.asarray(v, np.float64) for k, v in inputs.items() if k != "targets"}
    y = np.asarray(inputs["targets"])[..., None]

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp_s = np.take_along_axis(log_softmax(x["student_hidden"] @ x["student_head"]), y, -1)[..., 0]
    lp_t = np.take_along_axis(log_softmax(x["teacher_hidden"] @ x["teacher_head"]), y, -1)[..., 0]
    old = x["sampler_logprobs"]
    return float(np.max(np.abs(np.exp(lp_s - old) * (lp_t - old)) * x["mask"]))


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("name", sorted(BLOCKED_LOSSES))
def test_blocked_backward_matches_dense(name, block):
    inputs = random_inputs()
    dense = compiled(dense_loss, parity_config(name))(inputs)
    blocked = compiled(chunked_loss, dataclasses.replace(parity_config(name), vocab_chunk_size=block))(inputs)
    # The blocked backward sums the same fp32 terms in another order. importance_sampling's gradient at
    # a position is r*A*(p_S - onehot) with r*A up to ~20 here, and the hidden gradient cancels terms of
    # that size, so its rounding is 1e-6 of r*A, not of the result (checked against float64: the dense
    # reference itself is 1.8e-5 relative away from it on these inputs).
    atol = 1e-6 * max(1.0, _importance_weight_scale(inputs)) if name == "importance_sampling" else 1e-6
    for reduction in REDUCTIONS:
        (d_loss, d_metrics), d_grads = dense[reduction]
        (b_loss, b_metrics), b_grads = blocked[reduction]
        assert abs(float(b_loss)) > 1e-3
        np.testing.assert_allclose(b_loss, d_loss, rtol=1e-5)
        assert_close(b_metrics, d_metrics, rtol=1e-5, atol=1e-7)
        assert_close(b_grads, d_grads, rtol=1e-5, atol=atol)
        assert np.all(np.asarray(b_grads["student_hidden"][2]) == 0.0)  # the fully masked row
        assert np.abs(np.asarray(b_grads["student_head"])).max() > 1e-4
        for teacher in ("teacher_hidden", "teacher_head"):
            assert not np.any(np.asarray(b_grads[teacher]))


@pytest.mark.parametrize(("name", "block"), [("topk", 5), ("full_kl", 5), ("topk", 0), ("jsd", 0)],
                         ids=["topk-blocked", "full_kl-blocked", "topk-autodiff", "jsd-autodiff"])
def test_a_vocab_major_head_gives_the_same_loss_and_gradients(name, block):
    """A tied head passed as the `[V, D]` embedding it is (no transposed copy) computes what its `[D, V]`
    transpose computes, on the blocked and the autodiff backward; its gradient comes back `[V, D]`."""
    inputs = random_inputs()
    vocab_major = {**inputs, **{k: LMHead(weight=inputs[k].T, vocab_major=True)
                                for k in ("student_head", "teacher_head")}}
    cfg = dataclasses.replace(parity_config(name), vocab_chunk_size=block)
    want, got = compiled(chunked_loss, cfg)(inputs), compiled(chunked_loss, cfg)(vocab_major)
    for reduction in REDUCTIONS:
        (w_loss, w_metrics), w_grads = want[reduction]
        (g_loss, g_metrics), g_grads = got[reduction]
        # The dots contract the same terms in another order (the weight gradient's sum over positions
        # differs by up to 6e-7 in a column that cancels): the tolerances of the dense parity above.
        np.testing.assert_allclose(g_loss, w_loss, rtol=1e-5)
        assert_close(g_metrics, w_metrics, rtol=1e-5, atol=1e-7)
        assert g_grads["student_head"].weight.shape == vocab_major["student_head"].weight.shape
        assert_close(g_grads["student_head"].weight.T, w_grads["student_head"], rtol=1e-5, atol=1e-6)
        assert_close(g_grads["student_hidden"], w_grads["student_hidden"], rtol=1e-5, atol=1e-6)
        assert not np.any(np.asarray(g_grads["teacher_head"].weight))


def test_bf16_inputs_get_fp32_accumulated_gradients():
    inputs = random_inputs(jnp.bfloat16)
    f32 = {k: (v.astype(jnp.float32) if k in ("student_hidden", "student_head") else v) for k, v in inputs.items()}
    cfg = dataclasses.replace(parity_config("topk"), vocab_chunk_size=5)
    (_, grads_bf16) = compiled(chunked_loss, cfg, ("sum",))(inputs)["sum"]
    (_, grads_f32) = compiled(dense_loss, parity_config("topk"), ("sum",))(f32)["sum"]
    # Gradients come back in their inputs' dtype: within one bf16 rounding step (2^-7 relative) of the
    # fp32 result, which holds only if the sums themselves ran in fp32.
    for name in ("student_hidden", "student_head"):
        assert grads_bf16[name].dtype == jnp.bfloat16
        assert_close(grads_bf16[name], grads_f32[name], rtol=2**-7, atol=1e-6)


def test_jsd_keeps_the_autodiff_path():
    inputs = random_inputs()
    cfg = parity_config("jsd")
    plain = compiled(chunked_loss, cfg, ("sum",))(inputs)["sum"]
    blocked = compiled(chunked_loss, dataclasses.replace(cfg, vocab_chunk_size=5), ("sum",))(inputs)["sum"]
    assert_close(blocked, plain, rtol=0, atol=0)


def test_jsd_has_no_blocked_backward():
    inputs = random_inputs()
    streams = TokenStreams(student_hidden=inputs["student_hidden"][None],  # one chunk of every position
                           teacher_hidden=inputs["teacher_hidden"][None], targets=None, sampler_logprobs=None)
    with pytest.raises(ValueError, match="no blocked backward"):
        heads = (LMHead(weight=inputs["student_head"]), LMHead(weight=inputs["teacher_head"]))
        blocked_terms(parity_config("jsd"), *heads, streams)


@pytest.mark.parametrize("name", ["topk", "full_kl"])
def test_no_second_head_sized_buffer(name):
    """XLA's temporary memory of loss + gradients: the autodiff path holds a [D, V] accumulator, the
    blocked one does not (the gradient is written into the output buffer block by block)."""
    d, v, b, c = 1024, 32768, 2, 64  # [D, V] fp32 = 128 MiB; a chunk's [64, V] logits 8 MiB
    args = (jax.ShapeDtypeStruct((b, c, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32))
    teacher = dict(teacher_hidden=jax.ShapeDtypeStruct((b, c, d), jnp.float32),
                   teacher_head=jax.ShapeDtypeStruct((d, v), jnp.float32))

    def temp_bytes(cfg):
        def loss(h, w, th, tw):
            return chunked_loss(h, w, jnp.ones((b, c), bool), cfg, teacher_hidden=th, teacher_head=tw)[0]

        grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
        return grad.lower(*args, teacher["teacher_hidden"], teacher["teacher_head"]).compile().memory_analysis(
        ).temp_size_in_bytes

    head = d * v * 4
    base = LossConfig(name=name, chunk_size=64, skip_first_tokens=0, vocab_chunk_size=0)
    autodiff = temp_bytes(base)
    blocked = temp_bytes(dataclasses.replace(base, vocab_chunk_size=4096))
    assert autodiff >= head  # the accumulator (the measurement this test relies on still shows it)
    assert blocked < head, (blocked, autodiff)  # all of the blocked path's temporaries are smaller than one


def test_sharded_vocab_gives_the_same_gradients():
    """With the head split over a mesh axis (GSPMD gathers each block) the result does not change."""
    from jax.sharding import NamedSharding, PartitionSpec

    from sdft_jax.models.sharding import make_mesh

    inputs = random_inputs()
    cfg = dataclasses.replace(parity_config("full_kl"), vocab_chunk_size=5, reduction="sum")
    mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 4})

    def grads(args):
        def f(h, w):
            rest = {k: v for k, v in args.items() if k not in ("student_hidden", "student_head", "mask")}
            return chunked_loss(h, w, args["mask"], cfg, **rest)[0]

        return jax.jit(jax.grad(f, argnums=(0, 1)))(args["student_hidden"], args["student_head"])

    # V = 13 padded to 16 columns so the vocabulary splits over the 4 `tensor` devices.
    padded = dict(inputs, **{k: jnp.pad(inputs[k], ((0, 0), (0, 3))) for k in ("student_head", "teacher_head")})
    heads = NamedSharding(mesh, PartitionSpec(None, "tensor"))
    sharded = dict(padded, **{k: jax.device_put(padded[k], heads) for k in ("student_head", "teacher_head")})
    expected, got = grads(padded), grads(sharded)
    assert got[1].shape == (6, 16)
    assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(got[1])).max() > 1e-4

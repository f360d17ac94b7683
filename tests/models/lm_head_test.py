"""Tests of sdft_jax/models/lm_head.py: one head, two layouts, the same numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdft_jax.models.lm_head import LMHead

D, V = 6, 11
LAYOUTS = pytest.mark.parametrize("vocab_major", [False, True], ids=["dv", "vd"])


def _head(vocab_major: bool) -> tuple[LMHead, np.ndarray]:
    """A head in the given layout and its weight as a float64 `[D, V]` array."""
    w = jax.random.normal(jax.random.key(0), (D, V))
    return LMHead(weight=w.T if vocab_major else w, vocab_major=vocab_major), np.asarray(w, np.float64)


@LAYOUTS
def test_sizes_and_logits_are_those_of_the_dv_weight(vocab_major):
    head, w = _head(vocab_major)
    assert (head.vocab, head.hidden) == (V, D)
    hidden = jax.random.normal(jax.random.key(1), (2, 3, D))
    np.testing.assert_allclose(head.logits(hidden), np.asarray(hidden, np.float64) @ w, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(head.as_dv(), w.astype(np.float32))
    out = head.astype(jnp.bfloat16).logits(hidden.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    assert out.dtype == jnp.float32


@LAYOUTS
def test_hand_gradients_equal_autodiff_of_the_logits(vocab_major):
    head, _ = _head(vocab_major)
    hidden = jax.random.normal(jax.random.key(1), (2, 3, D))
    g = jax.random.normal(jax.random.key(2), (2, 3, V))
    _, vjp = jax.vjp(lambda h, w: LMHead(weight=w, vocab_major=vocab_major).logits(h), hidden, head.weight)
    d_hidden, d_weight = vjp(g)
    assert head.weight_grad(hidden, g).shape == head.weight.shape  # the weight's own layout
    np.testing.assert_allclose(head.hidden_grad(g), d_hidden, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(head.weight_grad(hidden, g), d_weight, rtol=1e-5, atol=1e-6)


@LAYOUTS
def test_columns_slice_and_write_along_the_vocab(vocab_major):
    head, w = _head(vocab_major)
    block = head.columns(jnp.int32(4), 3)
    assert (block.vocab, block.hidden, block.vocab_major) == (3, D, vocab_major)
    np.testing.assert_array_equal(block.as_dv(), w[:, 4:7].astype(np.float32))
    zeros = LMHead(weight=jnp.zeros_like(head.weight), vocab_major=vocab_major)
    written = np.asarray(zeros.with_columns(block.weight, jnp.int32(4)).as_dv())
    np.testing.assert_array_equal(written[:, 4:7], w[:, 4:7].astype(np.float32))
    assert not written[:, :4].any() and not written[:, 7:].any()


def test_a_plain_array_is_a_dv_head_and_the_layout_is_static():
    w = jnp.ones((D, V))
    head = LMHead.of(w)
    assert not head.vocab_major and head.weight is w and LMHead.of(head) is head
    assert len(jax.tree.leaves(LMHead(weight=w.T, vocab_major=True))) == 1
    vocab = jax.jit(lambda h: jnp.zeros(h.vocab))  # the layout, hence the vocabulary, is known when tracing
    assert vocab(LMHead(weight=w.T, vocab_major=True)).shape == (V,) == vocab(head).shape

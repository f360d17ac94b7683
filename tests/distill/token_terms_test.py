"""Tests for sdft_jax/distill/token_terms.py: what each loss computes at a position, and what it hands on.

The losses' values against the spec's formulas, for every reduction and both paths, are in
losses_test.py; here are the per-position fields the blocked backward and the metrics read.
"""

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sdft_jax.distill.loss_config import LossConfig
from sdft_jax.distill.token_terms import SAVED_TEACHER_VALUES, student_logits, teacher_logits, token_terms
from sdft_jax.models.lm_head import LMHead

LN2 = math.log(2.0)
# Two positions of a uniform student over 4 tokens and a teacher with exact binary probabilities;
# position 0 targets token 0 (sampled with prob 1/4), position 1 token 2 (sampled with prob 1/2).
STUDENT = jnp.zeros((1, 2, 4), jnp.float32)
TEACHER = jnp.log(jnp.array([[[0.5, 0.25, 0.125, 0.125]] * 2], jnp.float32))
TARGETS = jnp.array([[0, 2]], jnp.int32)
SAMPLER_LOGPROBS = jnp.log(jnp.array([[0.25, 0.5]], jnp.float32))

DISTRIBUTION_METRICS = {"kl", "teacher_entropy"}
# name -> (the TokenTerms fields it fills besides loss and metrics, the metrics it computes)
FILLED = {
    "topk": ({"teacher_topk_ids", "teacher_topk_logw"}, DISTRIBUTION_METRICS | {"topk_mass"}),
    "full_kl": (set(), DISTRIBUTION_METRICS),
    "reverse_topk": ({"teacher_topk_ids", "teacher_topk_logw", "student_topk_logq"}, DISTRIBUTION_METRICS),
    "importance_sampling": ({"ratio_advantage"}, DISTRIBUTION_METRICS),
    "jsd": (set(), DISTRIBUTION_METRICS),
    "sft": (set(), set()),
}


def terms_of(name, student=STUDENT, teacher=TEACHER, **cfg):
    cfg = LossConfig(name=name, top_k=2, **cfg)
    return token_terms(cfg, student, None if name == "sft" else teacher, TARGETS, SAMPLER_LOGPROBS)


@pytest.mark.parametrize("name", sorted(FILLED))
def test_each_loss_fills_its_own_fields(name):
    terms = terms_of(name)
    fields, metrics = FILLED[name]
    optional = {f.name for f in dataclasses.fields(terms)} - {"loss", "metrics"}
    assert {f for f in optional if getattr(terms, f) is not None} == fields
    assert set(terms.metrics.named()) == metrics
    assert terms.loss.shape == (1, 2)
    assert all(v.shape == (1, 2) for v in terms.metrics.named().values())


def test_topk_values():
    terms = terms_of("topk")
    np.testing.assert_array_equal(terms.teacher_topk_ids, [[[0, 1], [0, 1]]])
    np.testing.assert_allclose(terms.teacher_topk_logw, np.log([[[2 / 3, 1 / 3]] * 2]), rtol=1e-6)
    # -(2/3 ln 1/4 + 1/3 ln 1/4): the student is not renormalised over the K ids.
    np.testing.assert_allclose(terms.loss, [[math.log(4.0)] * 2], rtol=1e-6)
    np.testing.assert_allclose(terms.metrics.topk_mass, [[0.75, 0.75]], rtol=1e-6)
    np.testing.assert_allclose(terms.metrics.kl, [[0.25 * LN2] * 2], rtol=1e-6)
    np.testing.assert_allclose(terms.metrics.teacher_entropy, [[1.75 * LN2] * 2], rtol=1e-6)


def test_reverse_topk_values():
    terms = terms_of("reverse_topk")
    # q = (1/2, 1/2) on the top-2 ids, w = (2/3, 1/3): 0.5 ln(0.75) + 0.5 ln(1.5) = 0.5 ln 1.125
    np.testing.assert_allclose(terms.student_topk_logq, np.log([[[0.5, 0.5]] * 2]), rtol=1e-6)
    np.testing.assert_allclose(terms.loss, [[0.5 * math.log(1.125)] * 2], rtol=1e-6)


def test_importance_sampling_values():
    terms = terms_of("importance_sampling")
    # Position 0: ratio 1, advantage ln(1/2) - ln(1/4) = ln 2. Position 1: ratio (1/4) / (1/2) = 1/2,
    # advantage ln(1/8) - ln(1/2) = -2 ln 2.
    np.testing.assert_allclose(terms.ratio_advantage, [[LN2, -LN2]], rtol=1e-6)
    np.testing.assert_allclose(terms.loss, [[-LN2, LN2]], rtol=1e-6)


def test_metrics_and_teacher_get_no_gradient():
    k = jax.random.split(jax.random.key(0))
    student, teacher = jax.random.normal(k[0], (1, 2, 4)), jax.random.normal(k[1], (1, 2, 4))

    def total(s, t, part):
        terms = terms_of("topk", s, t)
        return jnp.sum(terms.loss) if part == "loss" else sum(jnp.sum(v) for v in terms.metrics.named().values())

    d_student, d_teacher = jax.grad(total, argnums=(0, 1))(student, teacher, "metrics")
    assert not np.any(np.asarray(d_student)) and not np.any(np.asarray(d_teacher))
    d_student, d_teacher = jax.grad(total, argnums=(0, 1))(student, teacher, "loss")
    assert np.abs(np.asarray(d_student)).max() > 1e-3 and not np.any(np.asarray(d_teacher))


@pytest.mark.parametrize(
    "name,saved",
    [
        ("topk", {"teacher_topk_ids", "teacher_topk_logw"}),
        ("reverse_topk", {"teacher_topk_ids", "teacher_topk_logw"}),
        ("importance_sampling", {"teacher_target_logprob"}),
        ("full_kl", set()),
    ],
)
def test_teacher_values_carry_the_names_the_chunked_scan_saves(name, saved):
    jaxpr = str(jax.make_jaxpr(lambda s, t: terms_of(name, s, t).loss)(STUDENT, TEACHER))
    assert set(re.findall(r"\bname\[name=(\w+)\]", jaxpr)) == saved
    assert saved <= set(SAVED_TEACHER_VALUES)


def test_top_k_larger_than_the_vocabulary_raises():
    with pytest.raises(ValueError, match="top_k=5 exceeds the vocabulary size 4"):
        token_terms(LossConfig(name="topk", top_k=5), STUDENT, TEACHER, None, None)


@pytest.mark.parametrize("vocab_major", [False, True], ids=["dv", "vd"])
def test_teacher_logits_of_bf16_weights_are_the_fp32_logits_without_gradient(vocab_major):
    k = jax.random.split(jax.random.key(1))
    hidden = jax.random.normal(k[0], (2, 3, 16)).astype(jnp.bfloat16)
    weight = jax.random.normal(k[1], (16, 5)).astype(jnp.bfloat16)
    head = LMHead(weight=weight.T if vocab_major else weight, vocab_major=vocab_major)
    logits = teacher_logits(hidden, head)
    assert logits.dtype == jnp.float32
    want = np.einsum("bpd,dv->bpv", np.asarray(hidden, np.float64), np.asarray(weight, np.float64))
    np.testing.assert_allclose(logits, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(student_logits(hidden, head), want, rtol=1e-6, atol=1e-6)
    assert not np.any(np.asarray(jax.grad(lambda h: jnp.sum(teacher_logits(h, head)))(hidden)))


@pytest.mark.parametrize("vocab_major", [False, True], ids=["dv", "vd"])
def test_an_fp32_head_with_bf16_hidden_states_is_rounded_for_the_matmul_and_gets_its_gradient_in_fp32(vocab_major):
    """The train step's case: fp32 master weights, bf16 compute. The logits are those of the head rounded
    to bf16 (as every weight of the model is for its matmuls), exactly; the head's gradient is the fp32
    product of the hidden states and the logits' gradient, not rounded to the matmul's bf16."""
    k = jax.random.split(jax.random.key(2), 3)
    hidden = jax.random.normal(k[0], (2, 3, 16)).astype(jnp.bfloat16)
    weight = jax.random.normal(k[1], (16, 5))
    coeffs = jax.random.normal(k[2], (2, 3, 5))
    head = LMHead(weight=weight.T if vocab_major else weight, vocab_major=vocab_major)
    h64 = np.asarray(hidden, np.float64)
    rounded = np.asarray(weight.astype(jnp.bfloat16), np.float64)
    np.testing.assert_allclose(student_logits(hidden, head), np.einsum("bpd,dv->bpv", h64, rounded), rtol=1e-6, atol=1e-6)

    d_hidden, d_head = jax.grad(lambda h, w: jnp.sum(coeffs * student_logits(h, w)), argnums=(0, 1))(hidden, head)
    assert d_hidden.dtype == jnp.bfloat16 and d_head.weight.dtype == jnp.float32
    want = np.einsum("bpd,bpv->dv", h64, np.asarray(coeffs, np.float64))
    np.testing.assert_allclose(d_head.weight.T if vocab_major else d_head.weight, want, rtol=1e-6, atol=1e-6)
    want_hidden = np.einsum("bpv,dv->bpd", np.asarray(coeffs, np.float64), rounded)
    np.testing.assert_allclose(np.asarray(d_hidden, np.float32), want_hidden, rtol=2**-8, atol=1e-6)

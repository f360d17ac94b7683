"""Tests for sdft_jax/distill/losses.py: known values, closed-form gradients, chunked-vs-dense parity."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

from sdft_jax.distill.losses import LossConfig, chunked_loss, dense_loss, reduction_totals
from sdft_jax.models.lm_head import LMHead

PATHS = {"dense": dense_loss, "chunked": chunked_loss}
DISTILL = ("topk", "full_kl", "reverse_topk", "jsd")
ALL_LOSSES = ("topk", "full_kl", "reverse_topk", "importance_sampling", "jsd", "sft")
REDUCTIONS = ("sequence_mean", "token_mean", "sum")
LN2 = math.log(2.0)


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# Jitted whole with LLVM's optimisation level 0: compiling dominates these tests, and level 0 halves it
# (the HLO under test is unchanged). Eagerly, every op of the chunked path's scan compiles separately.
_jit = functools.partial(jax.jit, static_argnums=(0, 1), compiler_options={"xla_backend_optimization_level": 0})


def _call_on_logits(fn, cfg, student, teacher, mask, targets, lp_old):
    eye = jnp.eye(student.shape[-1], dtype=jnp.float32)
    teacher_kw = {} if teacher is None else dict(teacher_hidden=teacher, teacher_head=eye)
    return fn(student, eye, mask, cfg, targets=targets, sampler_logprobs=lp_old, **teacher_kw)


_on_logits = _jit(_call_on_logits)


@_jit
def _grad_on_logits(fn, cfg, student, teacher, mask, targets, lp_old):
    return jax.grad(lambda s: _call_on_logits(fn, cfg, s, teacher, mask, targets, lp_old)[0])(student)


def _logits_args(student, teacher, mask, targets, lp_old):
    student = jnp.asarray(student, jnp.float32)
    return (
        student,
        None if teacher is None else jnp.asarray(teacher, jnp.float32),
        jnp.ones(student.shape[:2], bool) if mask is None else jnp.asarray(mask),
        None if targets is None else jnp.asarray(targets, jnp.int32),
        None if lp_old is None else jnp.asarray(lp_old, jnp.float32),
    )


def on_logits(fn, cfg, student, teacher=None, *, mask=None, targets=None, lp_old=None):
    """Calls a loss with hidden states equal to the logits and an identity head ([B, C, V] inputs)."""
    # The dense path runs eagerly: its few ops are compiled once per shape and shared between tests.
    call = _call_on_logits if fn is dense_loss else _on_logits
    return call(fn, cfg, *_logits_args(student, teacher, mask, targets, lp_old))


def grad_on_logits(fn, cfg, student, teacher=None, *, mask=None, targets=None, lp_old=None):
    """d loss / d student logits (the identity head makes them the student hidden states)."""
    return _grad_on_logits(fn, cfg, *_logits_args(student, teacher, mask, targets, lp_old))


# Probabilities that are exact in binary, so the expected values below are worked out by hand.
P_TEACHER = np.array([0.5, 0.25, 0.125, 0.125])
TEACHER = np.log(P_TEACHER)[None, None]  # [1, 1, 4]
UNIFORM = np.zeros((1, 1, 4))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "name,expected",
    [
        # -(2/3 ln 1/4 + 1/3 ln 1/4): the student is not renormalised over the K ids.
        ("topk", math.log(4.0)),
        # 0.5 ln(0.5/0.25) + 0.25 ln 1 + 2 * 0.125 ln(0.125/0.25) = 0.25 ln 2
        ("full_kl", 0.25 * LN2),
        # q = (1/2, 1/2) on the top-2 ids, w = (2/3, 1/3): 0.5 ln(0.75) + 0.5 ln(1.5) = 0.5 ln 1.125
        ("reverse_topk", 0.5 * math.log(1.125)),
    ],
)
def test_known_values_on_exact_distribution(path, name, expected):
    cfg = LossConfig(name=name, top_k=2, skip_first_tokens=0)
    loss, metrics = on_logits(PATHS[path], cfg, UNIFORM, TEACHER)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-6)
    np.testing.assert_allclose(metrics["kl"], 0.25 * LN2, rtol=1e-6)
    np.testing.assert_allclose(metrics["teacher_entropy"], 1.75 * LN2, rtol=1e-6)  # 0.5*1 + 0.25*2 + 0.25*3 bits
    assert float(metrics["scored_tokens"]) == 1.0
    if name == "topk":
        np.testing.assert_allclose(metrics["topk_mass"], 0.75, rtol=1e-6)
    else:
        assert "topk_mass" not in metrics


@pytest.mark.parametrize("path", PATHS)
def test_importance_sampling_known_values(path):
    # Position 0: y=0, lp_S = ln 1/4, lp_old = ln 1/4 (ratio 1), A = ln(1/2) - ln(1/4) = ln 2  -> -ln 2.
    # Position 1: y=2, lp_S = ln 1/4, lp_old = ln 1/2 (ratio 1/2), A = ln(1/8) - ln(1/2) = -2 ln 2 -> +ln 2.
    student = np.zeros((1, 2, 4))
    teacher = np.repeat(TEACHER, 2, axis=1)
    lp_old = np.log([[0.25, 0.5]])
    cfg = LossConfig(name="importance_sampling", reduction="sum", skip_first_tokens=3)  # no skip for IS
    loss, metrics = on_logits(PATHS[path], cfg, student, teacher, targets=[[0, 2]], lp_old=lp_old)
    np.testing.assert_allclose(loss, -LN2 + LN2, atol=1e-7)
    assert float(metrics["scored_tokens"]) == 2.0
    cfg = dataclasses.replace(cfg, reduction="token_mean")
    loss, _ = on_logits(PATHS[path], cfg, student[:, :1], teacher[:, :1], targets=[[0]], lp_old=lp_old[:, :1])
    np.testing.assert_allclose(loss, -LN2, rtol=1e-6)
    loss, _ = on_logits(PATHS[path], cfg, student[:, 1:], teacher[:, 1:], targets=[[2]], lp_old=lp_old[:, 1:])
    np.testing.assert_allclose(loss, LN2, rtol=1e-6)


RNG = np.random.default_rng(0)
S_LOGITS = RNG.normal(size=(2, 3, 5)) * 2.0
T_LOGITS = RNG.normal(size=(2, 3, 5)) * 2.0


def np_token_losses(name, s, t, *, k=2, beta=0.5, targets=None, lp_old=None):
    """Per-position losses written directly from the spec's formulas, in float64 numpy."""
    ls, lt = np_log_softmax(s), np_log_softmax(t)
    ps, pt = np.exp(ls), np.exp(lt)
    if name == "full_kl":
        return (pt * (lt - ls)).sum(-1)
    if name == "jsd":
        m = beta * pt + (1 - beta) * ps
        return beta * (pt * np.log(pt / m)).sum(-1) + (1 - beta) * (ps * np.log(ps / m)).sum(-1)
    if name == "sft":
        return -np.take_along_axis(ls, targets[..., None], -1)[..., 0]
    if name == "importance_sampling":
        lps = np.take_along_axis(ls, targets[..., None], -1)[..., 0]
        lpt = np.take_along_axis(lt, targets[..., None], -1)[..., 0]
        return -np.exp(lps - lp_old) * (lpt - lp_old)
    ids = np.argsort(-t, axis=-1)[..., :k]
    w = np.take_along_axis(pt, ids, -1)
    w = w / w.sum(-1, keepdims=True)
    if name == "topk":
        return -(w * np.take_along_axis(ls, ids, -1)).sum(-1)
    q = np.take_along_axis(ps, ids, -1)
    q = q / q.sum(-1, keepdims=True)
    return (q * np.log(q / w)).sum(-1)


def np_reduce(per_token, scored, reduction):
    if reduction == "sum":
        return (per_token * scored).sum()
    if reduction == "token_mean":
        return (per_token * scored).sum() / scored.sum()
    rows = [(per_token[i] * scored[i]).sum() / scored[i].sum() for i in range(len(scored)) if scored[i].any()]
    return np.mean(rows)


# From here on, the tests against formulas check the dense reference only: test_chunked_matches_dense
# holds the chunked path to it for every loss and reduction, values and gradients (compiling the
# chunked path once per case here too would double this file's runtime).
@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_values_match_numpy_formulas_for_every_reduction(name, reduction):
    # Rows of different lengths make sequence_mean differ from token_mean.
    mask = np.array([[True, True, True], [True, False, False]])
    targets = np.array([[1, 4, 0], [2, 3, 3]])
    lp_old = np.array([[-1.0, -2.5, -0.3], [-1.7, -0.1, -4.0]])
    cfg = LossConfig(name=name, reduction=reduction, top_k=2, skip_first_tokens=0)
    loss, metrics = on_logits(dense_loss, cfg, S_LOGITS, T_LOGITS, mask=mask, targets=targets, lp_old=lp_old)
    per_token = np_token_losses(name, S_LOGITS, T_LOGITS, targets=targets, lp_old=lp_old)
    np.testing.assert_allclose(loss, np_reduce(per_token, mask, reduction), rtol=1e-5)
    assert float(metrics["scored_tokens"]) == 4.0
    if name != "sft":
        kl = np_token_losses("full_kl", S_LOGITS, T_LOGITS)
        np.testing.assert_allclose(metrics["kl"], np_reduce(kl, mask, "token_mean"), rtol=1e-5)
    else:
        assert set(metrics) == {"loss", "scored_tokens"}


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_skip_first_tokens_applies_to_distillation_losses_only(name):  # dense only (see above)
    targets = np.array([[1, 4, 0], [2, 3, 3]])
    lp_old = np.full((2, 3), -1.0)
    cfg = LossConfig(name=name, reduction="token_mean", top_k=2, skip_first_tokens=2)
    loss, metrics = on_logits(dense_loss, cfg, S_LOGITS, T_LOGITS, targets=targets, lp_old=lp_old)
    per_token = np_token_losses(name, S_LOGITS, T_LOGITS, targets=targets, lp_old=lp_old)
    scored = np.ones((2, 3), bool)
    if name in DISTILL:
        scored[:, :2] = False
    np.testing.assert_allclose(loss, np_reduce(per_token, scored, "token_mean"), rtol=1e-5)
    assert float(metrics["scored_tokens"]) == scored.sum()


def test_jsd_endpoints_are_forward_and_reverse_kl():  # dense only (see above)
    kw = dict(skip_first_tokens=0, reduction="sum")
    jsd0, _ = on_logits(dense_loss, LossConfig(name="jsd", jsd_beta=0.0, **kw), S_LOGITS, T_LOGITS)
    full, _ = on_logits(dense_loss, LossConfig(name="full_kl", **kw), S_LOGITS, T_LOGITS)
    np.testing.assert_allclose(jsd0, full, rtol=1e-6)
    g0 = grad_on_logits(dense_loss, LossConfig(name="jsd", jsd_beta=0.0, **kw), S_LOGITS, T_LOGITS)
    gf = grad_on_logits(dense_loss, LossConfig(name="full_kl", **kw), S_LOGITS, T_LOGITS)
    np.testing.assert_allclose(g0, gf, rtol=1e-6, atol=1e-7)
    jsd1, _ = on_logits(dense_loss, LossConfig(name="jsd", jsd_beta=1.0, **kw), S_LOGITS, T_LOGITS)
    reverse = np_token_losses("full_kl", T_LOGITS, S_LOGITS).sum()  # KL(S||T)
    np.testing.assert_allclose(jsd1, reverse, rtol=1e-5)


@pytest.mark.parametrize("beta", [0.3, 0.5, 0.9])
def test_jsd_matches_numpy_formula(beta):  # asymmetric betas catch swapped mixture weights
    cfg = LossConfig(name="jsd", jsd_beta=beta, skip_first_tokens=0, reduction="sum")
    loss, _ = on_logits(dense_loss, cfg, S_LOGITS, T_LOGITS)
    np.testing.assert_allclose(loss, np_token_losses("jsd", S_LOGITS, T_LOGITS, beta=beta).sum(), rtol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_topk_gradient_is_student_probs_minus_renormalised_teacher(path):
    s, t = S_LOGITS[:1, :1], T_LOGITS[:1, :1]  # one position
    cfg = LossConfig(name="topk", top_k=3, skip_first_tokens=0, reduction="sum")
    grad = grad_on_logits(PATHS[path], cfg, s, t)
    p_s = np.exp(np_log_softmax(s))
    ids = np.argsort(-t[0, 0])[:3]
    w = np.zeros(5)
    w[ids] = np.exp(t[0, 0, ids]) / np.exp(t[0, 0, ids]).sum()
    np.testing.assert_allclose(grad[0, 0], p_s[0, 0] - w, rtol=1e-5, atol=1e-7)


def test_topk_with_k_equal_vocab_is_full_kl():  # dense only (see above)
    kw = dict(skip_first_tokens=0, reduction="sequence_mean")
    topk = LossConfig(name="topk", top_k=5, **kw)
    full = LossConfig(name="full_kl", **kw)
    entropy = -(np.exp(np_log_softmax(T_LOGITS)) * np_log_softmax(T_LOGITS)).sum(-1).mean()
    # Cross-entropy H(T, S) = KL(T||S) + H(T); the gradients are equal (both p_S - p_T).
    np.testing.assert_allclose(
        on_logits(dense_loss, topk, S_LOGITS, T_LOGITS)[0],
        on_logits(dense_loss, full, S_LOGITS, T_LOGITS)[0] + entropy,
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        grad_on_logits(dense_loss, topk, S_LOGITS, T_LOGITS),
        grad_on_logits(dense_loss, full, S_LOGITS, T_LOGITS),
        rtol=1e-5,
        atol=1e-7,
    )


def test_importance_sampling_gradient_closed_form():  # dense only (see above)
    targets = np.array([[1, 4, 0], [2, 3, 3]])
    lp_old = np.array([[-1.0, -2.5, -0.3], [-1.7, -0.1, -4.0]])
    cfg = LossConfig(name="importance_sampling", reduction="sum")
    grad = grad_on_logits(dense_loss, cfg, S_LOGITS, T_LOGITS, targets=targets, lp_old=lp_old)
    ls, lt = np_log_softmax(S_LOGITS), np_log_softmax(T_LOGITS)
    lps = np.take_along_axis(ls, targets[..., None], -1)
    advantage = np.take_along_axis(lt, targets[..., None], -1) - lp_old[..., None]
    ratio = np.exp(lps - lp_old[..., None])
    onehot = np.eye(5)[targets]
    # d/ds of -r*A with r = exp(lp_S(y) - lp_old) and d lp_S(y)/ds = onehot(y) - p_S; A is constant.
    expected = -advantage * ratio * (onehot - np.exp(ls))
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------
# Chunked vs dense on random hidden states and heads.

B, C, D, V = 3, 7, 6, 13
# 9 tokens per chunk over 3 rows = 3 positions per chunk: chunks of positions 0-2, 3-5, 6 (ragged).
PARITY_CHUNK = 9


def random_inputs(dtype=jnp.float32, seed=0):
    k = jax.random.split(jax.random.key(seed), 6)
    mask = np.ones((B, C), bool)
    mask[1, 5:] = False  # a shorter sequence
    mask[2, :] = False  # a fully masked row
    return dict(
        student_hidden=jax.random.normal(k[0], (B, C, D)).astype(dtype),
        student_head=jax.random.normal(k[1], (D, V)).astype(dtype),
        mask=jnp.asarray(mask),
        teacher_hidden=jax.random.normal(k[2], (B, C, D)).astype(dtype),
        teacher_head=jax.random.normal(k[3], (D, V)).astype(dtype),
        targets=jax.random.randint(k[4], (B, C), 0, V),
        sampler_logprobs=-jax.random.uniform(k[5], (B, C), minval=0.1, maxval=4.0),
    )


WRT = ("student_hidden", "student_head", "teacher_hidden", "teacher_head")


@functools.lru_cache(maxsize=None)
def compiled(fn, cfg, reductions=REDUCTIONS):
    """A jitted `inputs -> {reduction: ((loss, metrics), grads wrt WRT)}`, built once per arguments.

    Cached because compiling dominates these tests: the tests below share programs by using equal
    configs and changing only the inputs (jit recompiles only for new shapes or dtypes).
    """

    @functools.partial(jax.jit, compiler_options=_jit.keywords["compiler_options"])
    def run(inputs):
        out = {}
        for reduction in reductions:
            c = dataclasses.replace(cfg, reduction=reduction)

            def f(diff):
                args = {**inputs, **diff}
                return fn(args.pop("student_hidden"), args.pop("student_head"), args.pop("mask"), c, **args)

            out[reduction] = jax.value_and_grad(f, has_aux=True)({k: inputs[k] for k in WRT})
        return out

    return run


def parity_config(name):
    # The autodiff backward; the blocked one (the default) is checked in head_grad_test.py.
    return LossConfig(name=name, top_k=4, skip_first_tokens=2, chunk_size=PARITY_CHUNK, vocab_chunk_size=0)


def assert_close(a, b, **tol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x, np.float32), np.asarray(y, np.float32), **tol),
                 a, b)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_chunked_matches_dense(name):
    inputs = random_inputs()
    dense = compiled(dense_loss, parity_config(name))(inputs)
    chunked = compiled(chunked_loss, parity_config(name))(inputs)
    for reduction in REDUCTIONS:
        (d_loss, d_metrics), d_grads = dense[reduction]
        (c_loss, c_metrics), c_grads = chunked[reduction]
        assert np.isfinite(c_loss) and abs(float(c_loss)) > 1e-3
        np.testing.assert_allclose(c_loss, d_loss, rtol=1e-5)
        assert_close(c_metrics, d_metrics, rtol=1e-5, atol=1e-7)
        assert_close(c_grads, d_grads, rtol=1e-5, atol=1e-6)
        # The fully masked row gets exactly zero gradient; scored rows get a real one.
        assert np.all(np.asarray(c_grads["student_hidden"][2]) == 0.0)
        assert np.abs(np.asarray(c_grads["student_hidden"][0])).max() > 1e-4
        assert np.abs(np.asarray(c_grads["student_head"])).max() > 1e-4


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", [n for n in ALL_LOSSES if n != "sft"])
def test_teacher_gets_no_gradient(path, name):
    (_, _), grads = compiled(PATHS[path], parity_config(name))(random_inputs())["sum"]
    assert np.abs(np.asarray(grads["student_hidden"])).max() > 1e-4
    assert np.all(np.asarray(grads["teacher_hidden"]) == 0.0)
    assert np.all(np.asarray(grads["teacher_head"]) == 0.0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ALL_LOSSES)
def test_all_masked_batch_gives_zero_loss_and_zero_grads(path, name):
    inputs = random_inputs()
    inputs["mask"] = jnp.zeros((B, C), bool)
    # Garbage in unscored positions (as padding may hold) must not leak into the loss or gradients.
    inputs["student_hidden"] = inputs["student_hidden"].at[:, 0].set(jnp.nan)
    inputs["sampler_logprobs"] = jnp.full_like(inputs["sampler_logprobs"], -jnp.inf)
    for reduction, ((loss, metrics), grads) in compiled(PATHS[path], parity_config(name))(inputs).items():
        assert float(loss) == 0.0, reduction
        assert all(float(v) == 0.0 for v in metrics.values()), (reduction, metrics)
        for g in jax.tree.leaves(grads):
            assert np.all(np.asarray(g) == 0.0), reduction


@pytest.mark.parametrize("path", PATHS)
def test_unscored_garbage_does_not_change_anything(path):
    run = compiled(PATHS[path], parity_config("importance_sampling"))
    inputs = random_inputs()
    unscored = ~np.asarray(inputs["mask"])
    dirty = dict(inputs)
    dirty["student_hidden"] = jnp.where(unscored[..., None], jnp.nan, inputs["student_hidden"])
    dirty["teacher_hidden"] = jnp.where(unscored[..., None], jnp.inf, inputs["teacher_hidden"])
    dirty["sampler_logprobs"] = jnp.where(unscored, -jnp.inf, inputs["sampler_logprobs"])
    assert_close(run(dirty), run(inputs), rtol=0, atol=0)


# The fp32 casts live in code every loss shares; these three cover a teacher read through top-K, a
# teacher read at the targets, and no teacher.
@pytest.mark.parametrize("name", ["topk", "importance_sampling", "sft"])
def test_bf16_inputs_are_computed_in_fp32(name):
    bf16 = random_inputs(jnp.bfloat16, seed=1)
    upcast = jax.tree.map(lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x, bf16)
    # One reduction: the dtype handling does not depend on it, and each bf16 program costs a compile.
    chunked = compiled(chunked_loss, parity_config(name), ("sequence_mean",))(bf16)
    reference = compiled(dense_loss, parity_config(name))(upcast)  # the same numbers, fp32 all the way
    for reduction in chunked:
        (c_loss, c_metrics), c_grads = chunked[reduction]
        (r_loss, r_metrics), r_grads = reference[reduction]
        assert c_loss.dtype == jnp.float32
        np.testing.assert_allclose(c_loss, r_loss, rtol=1e-5)
        assert_close(c_metrics, r_metrics, rtol=1e-5, atol=1e-7)
        for key in c_grads:
            assert c_grads[key].dtype == jnp.bfloat16
            # Gradients are returned in the inputs' dtype: the fp32 result rounded once to bf16, so
            # they equal the reference rounded to bf16 (up to one ulp where a value sits near a tie).
            expected = np.asarray(r_grads[key].astype(jnp.bfloat16), np.float32)
            np.testing.assert_allclose(np.asarray(c_grads[key], np.float32), expected, rtol=2**-8, atol=1e-6)


def test_chunk_size_does_not_change_the_result():
    inputs = random_inputs()
    ragged = compiled(chunked_loss, parity_config("topk"))(inputs)["sum"]  # three positions per chunk
    for n in (1, 1000):  # one position per chunk (tokens per chunk = B > n), everything in one chunk
        other = compiled(chunked_loss, dataclasses.replace(parity_config("topk"), chunk_size=n), ("sum",))(inputs)
        assert_close(other["sum"], ragged, rtol=1e-5, atol=1e-6)



@pytest.mark.parametrize("name", ["topk", "importance_sampling", "sft"])
def test_the_parts_of_a_batch_reduced_by_its_totals_add_up_to_it(name):
    """Micro-batches: rows [0] and [1, 2] (a short row and an unscored one) reduced by the whole batch's
    `reduction_totals` give shares whose losses, metrics and gradients add up to the whole batch's, for
    every reduction (the skipping losses skip in the parts too)."""
    inputs, cfg = random_inputs(), parity_config(name)
    whole = compiled(chunked_loss, cfg)(inputs)
    totals = reduction_totals(inputs["mask"], cfg)
    heads = ("student_head", "teacher_head")
    parts = [compiled(chunked_loss, cfg)({**{k: v if k in heads else v[rows] for k, v in inputs.items()},
                                          "totals": totals}) for rows in (slice(0, 1), slice(1, 3))]
    for reduction in REDUCTIONS:
        (loss, metrics), grads = whole[reduction]
        (loss_0, metrics_0), grads_0 = parts[0][reduction]
        (loss_1, metrics_1), grads_1 = parts[1][reduction]
        assert abs(float(loss_0)) > 1e-3 and abs(float(loss_1)) > 1e-3  # both parts have a share
        np.testing.assert_allclose(loss_0 + loss_1, loss, rtol=1e-5)
        assert_close(jax.tree.map(jnp.add, metrics_0, metrics_1), metrics, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.concatenate([grads_0["student_hidden"], grads_1["student_hidden"]]),
                                   grads["student_hidden"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(grads_0["student_head"] + grads_1["student_head"], grads["student_head"],
                                   rtol=1e-5, atol=1e-6)

# ---------------------------------------------------------------------------------------------------
# Argument checking (the config's own checks are in loss_config_test.py).


def test_missing_or_misshaped_arguments_raise(monkeypatch):
    # The loss's own checks, as users run it: without the suite's annotation checker, which would refuse
    # a misshaped argument first.
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)
    inputs = random_inputs()
    h, w, m = inputs["student_hidden"], inputs["student_head"], inputs["mask"]
    with pytest.raises(ValueError, match="teacher_hidden"):
        chunked_loss(h, w, m, LossConfig(name="topk"))
    with pytest.raises(ValueError, match="targets"):
        chunked_loss(h, w, m, LossConfig(name="sft"))
    with pytest.raises(ValueError, match="sampler_logprobs"):
        chunked_loss(h, w, m, LossConfig(name="importance_sampling"), teacher_hidden=h, teacher_head=w,
                     targets=inputs["targets"])
    with pytest.raises(ValueError, match="mask"):
        dense_loss(h, w, m[:, 1:], LossConfig(name="sft"), targets=inputs["targets"])
    with pytest.raises(ValueError, match="top_k"):
        chunked_loss(h, w, m, LossConfig(name="topk", top_k=V + 1), teacher_hidden=h, teacher_head=w)
    d = h.shape[-1]
    with pytest.raises(ValueError, match=rf"student_head must be \[D={d}, V\], got shape \({V}, {d}\)"):
        chunked_loss(h, w.T, m, LossConfig(name="sft"), targets=inputs["targets"])
    with pytest.raises(ValueError, match=rf"student_head must be \[V, D={d}\] \(vocab-major\), got shape \({d}, {V}\)"):
        chunked_loss(h, LMHead(weight=w, vocab_major=True), m, LossConfig(name="sft"), targets=inputs["targets"])
    with pytest.raises(ValueError, match=rf"teacher_head must be \[V={V}, D={d}\] \(vocab-major\)"):
        chunked_loss(h, w, m, LossConfig(name="topk"), teacher_hidden=h,
                     teacher_head=LMHead(weight=w[:, 1:].T, vocab_major=True))


@pytest.mark.parametrize("vocab_chunk_size", [0, V], ids=["autodiff", "blocked"])
def test_bf16_hidden_states_take_bf16_logit_matmuls_with_fp32_heads(vocab_chunk_size):
    """The train step's case (fp32 master heads, bf16 hidden states): every matmul that makes logits,
    forward or recomputed in the backward, is bf16 x bf16 (the rate an accelerator runs at; its products
    are exact in fp32); only the two gradient matmuls take the fp32 logit gradients. Counted on the
    traced program: per matmul 2 x (27 positions: 3 chunks of 3 rows x 3 positions) x D x V FLOPs."""
    from sdft_jax.bench.matmul_flops import matmul_flops

    inputs = random_inputs(jnp.bfloat16)
    heads = {k: inputs[k].astype(jnp.float32) for k in ("student_head", "teacher_head")}
    cfg = dataclasses.replace(parity_config("topk"), vocab_chunk_size=vocab_chunk_size)

    def loss(hidden, head):
        return chunked_loss(hidden, head, inputs["mask"], cfg, teacher_hidden=inputs["teacher_hidden"],
                            teacher_head=heads["teacher_head"])[0]

    traced = jax.jit(jax.grad(loss, argnums=(0, 1))).trace(inputs["student_hidden"], heads["student_head"])
    one = 2 * 27 * D * V
    # bf16: the student's and the teacher's logits, and the student's again in the backward.
    assert matmul_flops(traced.jaxpr)["matmul_flops"] == {"bf16": 3 * one, "bf16*f32": one, "f32*bf16": one}


def _sharded_loss_program(cfg, mesh, *, rows, length, d, v, seed, heads_split):
    """The compiled value and gradient of `chunked_loss` with the rows split over `mesh`'s one axis (and the
    heads' hidden dimension too when `heads_split`), traced under `activation_sharding`; and its inputs."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from sdft_jax.models.sharding import activation_sharding

    (axis,) = mesh.axis_names
    by_row = NamedSharding(mesh, P(axis))
    by_head = NamedSharding(mesh, P(axis, None) if heads_split else P())
    keys = jax.random.split(jax.random.key(seed), 4)
    inputs = dict(student_hidden=jax.device_put(jax.random.normal(keys[0], (rows, length, d)), by_row),
                  student_head=jax.device_put(jax.random.normal(keys[1], (d, v)), by_head),
                  teacher_hidden=jax.device_put(jax.random.normal(keys[2], (rows, length, d)), by_row),
                  teacher_head=jax.device_put(jax.random.normal(keys[3], (d, v)), by_head))
    mask = jax.device_put(jnp.ones((rows, length), bool), by_row)

    def loss(inputs):
        args = dict(inputs)
        return chunked_loss(args.pop("student_hidden"), args.pop("student_head"), mask, cfg, **args)[0]

    with activation_sharding(mesh):
        program = jax.jit(jax.value_and_grad(loss), compiler_options=_jit.keywords["compiler_options"])
        return program.lower(inputs).compile(), inputs


@pytest.mark.parametrize("name", ["topk", "reverse_topk"])
def test_a_gpu_programs_teacher_top_k_gives_the_same_loss_and_gathers_no_logits_of_a_sharded_batch(name, monkeypatch):
    """A GPU program takes the teacher's top-K from `models.top_k.top_k`'s sorts (`jax.lax.top_k` is a sort
    of each whole row there): with the rows sharded over 8 devices it gives the CPU program's loss and
    gradients, and the compiled program gathers no vocabulary-sized array across the devices (XLA's
    partitioner all-gathers a top-K's rows; tests/models/top_k_test.py)."""
    from jax.sharding import Mesh

    from sdft_jax.models import top_k

    v = 4096  # long enough rows for the grouped top-K
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    cfg = LossConfig(name=name, top_k=4, chunk_size=16, vocab_chunk_size=0)
    results = {}
    for platform in ("cpu", "gpu"):
        monkeypatch.setattr(top_k, "target_platform", lambda platform=platform: platform)
        program, inputs = _sharded_loss_program(cfg, mesh, rows=8, length=4, d=8, v=v, seed=7, heads_split=False)
        results[platform] = program(inputs)
    assert_close(results["gpu"], results["cpu"], rtol=1e-6, atol=1e-7)
    assert float(results["gpu"][0]) > 0
    # (The head's gradient, [D, V], is summed over the rows' devices: an all-reduce, as it must be.)
    gathered = [line.strip()[:120] for line in program.as_text().splitlines()
                if any(f" {kind}(" in line or f" {kind}-start(" in line for kind in ("all-gather", "all-to-all"))
                and f",{v}]" in line]
    assert gathered == [], "\n".join(gathered)


@pytest.mark.parametrize("vocab_chunk_size", [0, 64])
def test_gathering_the_heads_once_gives_the_same_loss_with_far_fewer_collectives(vocab_chunk_size, monkeypatch):
    """`LossConfig.gather_head` on an fsdp mesh (8 fake devices, the heads' hidden dimension split): the same
    loss and gradients as the heads left split, each head gathered once, outside the loops; without it the
    blocked backward (`vocab_chunk_size` > 0) gathers its vocabulary blocks inside the loops, and far more
    bytes (the autodiff path's per-shard copies of the student head gather it once either way). The GPU
    program's top-K, which gathers nothing (on CPU `lax.top_k` gathers each chunk's logits)."""
    import re

    from jax.sharding import Mesh

    from sdft_jax.bench.hlo_collectives import collectives
    from sdft_jax.models import top_k

    monkeypatch.setattr(top_k, "target_platform", lambda: "gpu")
    d = 32
    mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",))

    def program(gather_head):
        cfg = LossConfig(name="topk", top_k=4, chunk_size=16, vocab_chunk_size=vocab_chunk_size,
                         gather_head=gather_head)  # 8 chunks of 16 tokens
        return _sharded_loss_program(cfg, mesh, rows=8, length=16, d=d, v=256, seed=8, heads_split=True)

    (gathered, inputs), (split, _) = program(True), program(False)
    assert_close(gathered(inputs), split(inputs), rtol=1e-6, atol=1e-7)

    def head_gathers(compiled) -> dict[str, int]:
        """All-gathers of a head (or of a vocabulary block of it: [D, *]), inside the loops and outside."""
        found = {"in_loops": 0, "outside": 0}
        for line in compiled.as_text().splitlines():
            if re.search(rf"= f32\[{d},\d+\]\S* all-gather(-start)?\(", line):
                found["in_loops" if "while/body" in line else "outside"] += 1
        return found

    assert head_gathers(gathered) == {"in_loops": 0, "outside": 2}  # each head once
    executed = {name: collectives(p.as_text())["all-gather"]["executed_bytes"]
                for name, p in (("gathered", gathered), ("split", split))}
    assert executed["gathered"] == 2 * d * 256 * 4, executed
    if vocab_chunk_size:
        assert head_gathers(split)["in_loops"] >= 2
        assert executed["gathered"] < executed["split"], executed


@pytest.mark.parametrize("name, vocab_chunk_size", [("topk", 64), ("full_kl", 64), ("reverse_topk", 64),
                                                    ("topk", 0), ("jsd", 0)])
def test_a_sharded_batchs_head_gradient_is_reduced_once_after_the_loops(name, vocab_chunk_size, monkeypatch):
    """The rows split over 8 fake devices (`fsdp`, the heads' hidden dimension split too): the loss and
    gradients equal one device's, and the program's all-reduces move the head's gradient once, with the
    scalars: each device accumulates its rows' share through the chunk and vocabulary loops, where XLA's
    CPU / GPU partitioner would all-reduce every chunk's (and vocabulary block's) share inside them: 8 chunks
    here, 8 times the bytes (blocked backward and autodiff path)."""
    from jax.sharding import Mesh

    from sdft_jax.bench.hlo_collectives import collectives
    from sdft_jax.models import top_k

    monkeypatch.setattr(top_k, "target_platform", lambda: "gpu")  # a GPU program's top-K: no gathered logits
    d, v = 32, 256
    mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",))
    cfg = LossConfig(name=name, top_k=4, chunk_size=16, vocab_chunk_size=vocab_chunk_size)  # 8 chunks of 16
    program, inputs = _sharded_loss_program(cfg, mesh, rows=8, length=16, d=d, v=v, seed=9, heads_split=True)
    sharded = program(inputs)

    def loss(inputs):
        args = dict(inputs)
        mask = jnp.ones(args["student_hidden"].shape[:2], bool)
        return chunked_loss(args.pop("student_hidden"), args.pop("student_head"), mask, cfg, **args)[0]

    one_device = jax.jit(jax.value_and_grad(loss))(jax.device_get(inputs))
    assert_close(sharded, one_device, rtol=1e-5, atol=1e-6)
    assert float(sharded[0]) > 0

    reduced = collectives(program.as_text())["all-reduce"]
    head_bytes = d * v * 4
    assert head_bytes <= reduced["executed_bytes"] < head_bytes + 64, reduced

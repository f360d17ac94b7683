"""Temperature / top-k / top-p against a float64 numpy reference, and token frequencies of the sampler."""

import functools

import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

from sdft_jax.sampling import processors

N_DRAWS = 20_000
# A frequency f of a token with probability p over N independent draws has standard error
# sqrt(p (1 - p) / N). Every check allows 5 standard errors: with ~100 checks in this file a false
# alarm would have probability ~1e-4 even for an unlucky seed (the seed is fixed, so it is stable).
SIGMAS = 5.0

LOGITS8 = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], np.float32)
SETTINGS = [
    dict(temperature=1.0),
    dict(temperature=0.5),
    dict(temperature=1.5, top_k=3),
    dict(temperature=1.0, top_p=0.8),
    dict(temperature=0.8, top_k=5, top_p=0.9),
]


def softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x[np.isfinite(x)].max())
    return e / e.sum()


def reference_probs(logits, *, temperature, top_p=1.0, top_k=0):
    """The sampling distribution, written the slow obvious way (float64, explicit sort)."""
    x = np.asarray(logits, np.float64) / temperature
    if 0 < top_k < len(x):
        kth = np.sort(x)[::-1][top_k - 1]
        x = np.where(x >= kth, x, -np.inf)
    if top_p < 1:
        p = softmax(x)
        desc = np.sort(p)[::-1]
        mass_before = np.cumsum(desc) - desc
        n_keep = max(1, int((mass_before < top_p).sum()))
        x = np.where(p >= desc[n_keep - 1], x, -np.inf)
    return softmax(x)


def draw_many(logits, n=N_DRAWS, seed=0, **settings):
    noise = processors.noise_for(jax.random.split(jax.random.key(seed), n))
    batch = jnp.broadcast_to(jnp.asarray(logits), (n, len(logits)))
    fn = jax.jit(lambda u, x: processors.sample_tokens(u, x, **settings))
    return [np.asarray(a) for a in fn(noise, batch)]


def assert_frequencies_match(tokens, expected):
    freq = np.bincount(tokens, minlength=len(expected)) / len(tokens)
    bound = SIGMAS * np.sqrt(expected * (1 - expected) / len(tokens))
    assert np.all(freq[expected == 0] == 0), "a token outside the sampling distribution was drawn"
    bad = np.abs(freq - expected) > bound
    assert not bad.any(), f"frequencies {freq[bad]} vs probabilities {expected[bad]} (bound {bound[bad]})"


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_token_frequencies_match_distribution(settings):
    expected = reference_probs(LOGITS8, **settings)
    tokens, sampling_lp, model_lp = draw_many(LOGITS8, **settings)
    assert_frequencies_match(tokens, expected)
    # The returned log-probs are those of the drawn tokens under each distribution.
    np.testing.assert_allclose(sampling_lp, np.log(expected[tokens]), atol=1e-5)
    np.testing.assert_allclose(model_lp, np.log(softmax(LOGITS8)[tokens]), atol=1e-5)


def test_frequencies_over_a_vocabulary_of_several_blocks():
    # 1000 tokens: several 256-token blocks and a padded last one; mass spread over all of them.
    logits = (2.0 * np.random.default_rng(0).normal(size=1000)).astype(np.float32)
    expected = softmax(logits)
    tokens, _, model_lp = draw_many(logits, seed=1, temperature=1.0)
    top = np.argsort(-expected)[:10]
    freq = np.bincount(tokens, minlength=1000) / N_DRAWS
    bins = np.arange(1000) // 50  # 20 bins that straddle the block edges
    grouped = (np.bincount(bins, weights=freq), np.bincount(bins, weights=expected))
    for f, p in [(freq[top], expected[top]), grouped]:
        assert np.all(np.abs(f - p) <= SIGMAS * np.sqrt(p * (1 - p) / N_DRAWS)), (f, p)
    np.testing.assert_allclose(model_lp, np.log(expected[tokens]), atol=1e-5)


@pytest.mark.parametrize("settings", SETTINGS[1:] + [dict(temperature=1.0, top_k=1), dict(temperature=0.7, top_p=0.05)],
                         ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_sampling_logits_match_reference(settings):
    logits = np.random.default_rng(2).normal(size=(4, 300)).astype(np.float32) * 3
    got = np.asarray(jax.jit(functools.partial(processors.sampling_logits, **settings))(logits))
    for row, ref_logits in zip(got, logits, strict=True):
        expected = reference_probs(ref_logits, **settings)
        np.testing.assert_array_equal(np.isfinite(row), expected > 0)
        np.testing.assert_allclose(softmax(row), expected, atol=1e-6)


def test_ties_at_the_cut_are_kept():
    logits = jnp.asarray([[3.0, 1.0, 1.0, 1.0, 0.0]])
    top_k = jax.jit(functools.partial(processors.sampling_logits, temperature=1.0, top_k=2))(logits)
    np.testing.assert_array_equal(np.isfinite(top_k[0]), [True, True, True, True, False])
    # Mass of token 0 is ~0.79: top_p 0.85 needs one of the tied tokens, so all three stay.
    top_p = jax.jit(functools.partial(processors.sampling_logits, temperature=1.0, top_p=0.85))(logits)
    np.testing.assert_array_equal(np.isfinite(top_p[0]), [True, True, True, True, False])


def test_greedy_takes_first_maximum_with_zero_sampling_logprob():
    logits = jnp.asarray([[1.0, 3.0, 3.0, 0.0], [0.0, -1.0, 5.0, 5.0]])
    greedy = jax.jit(functools.partial(processors.sample_tokens, None, temperature=0.0, top_k=2))
    tokens, sampling_lp, model_lp = greedy(logits)
    np.testing.assert_array_equal(tokens, [1, 2])
    np.testing.assert_array_equal(sampling_lp, [0.0, 0.0])
    np.testing.assert_allclose(model_lp, np.log([softmax(logits[0])[1], softmax(logits[1])[2]]), rtol=1e-6)


@pytest.mark.parametrize("settings, message", [
    (dict(temperature=-0.1), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=1.0, top_p=0.0), "top_p"),
    (dict(temperature=1.0, top_p=1.5), "top_p"),
    (dict(temperature=1.0, top_k=-1), "top_k"),
    (dict(temperature=1.0, top_k=2.5), "top_k"),
])
def test_bad_settings_raise(settings, message, monkeypatch):
    # The suite's shape checker rejects a float top_k before the function's own check does.
    with pytest.raises((ValueError, jaxtyping.TypeCheckError), match=message):
        processors.sampling_logits(jnp.zeros((1, 4)), **{"top_p": 1.0, "top_k": 0, **settings})
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)  # as users run it: the function's own check
    with pytest.raises(ValueError, match=message):
        processors.sampling_logits(jnp.zeros((1, 4)), **{"top_p": 1.0, "top_k": 0, **settings})

"""Tests for sdft_jax/distill/loss_config.py: every field is validated, and the error names it."""

import jaxtyping
import pytest

from sdft_jax.distill.loss_config import LossConfig


@pytest.mark.parametrize(
    "field,value",
    [
        ("name", "kl"),
        ("top_k", 0),
        ("top_k", 2.0),
        ("jsd_beta", 1.5),
        ("jsd_beta", float("nan")),
        ("reduction", "mean"),
        ("skip_first_tokens", -1),
        ("chunk_size", 0),
        ("chunk_size", True),
        ("vocab_chunk_size", -1),
    ],
)
def test_invalid_config_names_the_field(field, value, monkeypatch):
    # The config's own check, as users run it: without the suite's annotation checker, which would refuse
    # a value of the wrong type first.
    monkeypatch.setattr(jaxtyping.config, "jaxtyping_disable", True)
    with pytest.raises(ValueError, match=f"LossConfig.{field} must be"):
        LossConfig(**{field: value})


def test_vocab_chunk_size_is_validated():
    with pytest.raises(ValueError, match="LossConfig.vocab_chunk_size must be an integer >= 0"):
        LossConfig(vocab_chunk_size=-1)


def test_the_defaults_and_the_endpoints_are_valid():
    LossConfig()
    LossConfig(name="jsd", jsd_beta=0.0, skip_first_tokens=0, vocab_chunk_size=0)
    LossConfig(name="jsd", jsd_beta=1.0, top_k=1, chunk_size=1)


"""The low-rank projection against its merged-weight form."""

import jax
import numpy as np
import pytest

from sdft_jax.models import lora


def test_project_equals_merged_weight():
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (2, 3, 4, 5))  # input dims (4, 5), like o_proj's (heads, head_dim)
    w = jax.random.normal(k[1], (4, 5, 6))
    a = jax.random.normal(k[2], (4, 5, 2))
    b = jax.random.normal(k[3], (2, 6))
    y = lora.project(x, w, 2, (a, b), scale=0.5)
    merged = lora.merged_weight(w[None], a[None], b[None], 0.5)[0]
    np.testing.assert_allclose(y, lora.project(x, merged, 2), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, np.einsum("btij,ijo->bto", x, w + 0.5 * np.einsum("ijr,ro->ijo", a, b)), rtol=1e-5, atol=1e-4)


def test_config_validation():
    assert lora.LoraConfig(rank=8, alpha=16.0).scale == 2.0
    with pytest.raises(ValueError, match="LoraConfig.targets must be one of"):
        lora.LoraConfig(targets=("qkv",))
    with pytest.raises(ValueError, match="LoraConfig.rank must be an integer >= 1"):
        lora.LoraConfig(rank=0)

"""Model names and paths resolve to HF directories; unknown names fail clearly."""

import os

import pytest

from sdft_jax.checkpoints import registry


def test_registered_name_builds_once_into_the_cache(smollm2_dir):
    assert os.path.exists(os.path.join(smollm2_dir, "config.json"))
    assert os.path.exists(os.path.join(smollm2_dir, "tokenizer.json"))
    mtime = os.path.getmtime(os.path.join(smollm2_dir, "model.safetensors"))
    assert registry.resolve_model("smollm2-135m") == smollm2_dir
    assert os.path.getmtime(os.path.join(smollm2_dir, "model.safetensors")) == mtime


def test_cache_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SDFT_JAX_CACHE", str(tmp_path))
    from sdft_jax import cache

    assert cache.cache_root() == str(tmp_path)


def test_directory_passes_through(tiny_model_dir):
    path = tiny_model_dir("llama")
    assert registry.resolve_model(path) == path


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(FileNotFoundError, match="not a registered name .*smollm2-135m"):
        registry.resolve_model("gpt-17")

"""A trainer config for tiny models: a few steps of everything (rollout, step, eval, checkpoint) in seconds."""

from __future__ import annotations

import ml_collections

from sdft_jax.config import base_config


def tiny_config(model_dir: str, run_dir, **overrides) -> ml_collections.ConfigDict:
    """3 steps of 2 prompts on the offline capitals task; `overrides` are dotted keys (`"optim.learning_rate"`)."""
    c = base_config()
    c.run_dir = str(run_dir)
    c.model.name = model_dir
    c.model.remat = "none"
    c.data.task = "capitals"
    c.data.offline_num_train = 8
    c.prompts.max_prompt_tokens = 512
    c.rollout.max_new_tokens = 8
    c.loss.chunk_size = 16
    c.loss.vocab_chunk_size = 0  # the vocabulary is split over the tensor axis below
    c.optim.learning_rate = 1e-3
    c.optim.schedule = "constant"
    c.optim.warmup_ratio = 0.0
    c.train.steps = 3
    c.train.prompts_per_step = 2
    c.eval.tasks = "capitals"
    c.eval.limit = 2
    c.eval.max_new_tokens = 4
    c.checkpoint.every = 1
    c.checkpoint.async_save = False
    c.mesh.data, c.mesh.tensor = 2, -1  # the 8 fake devices of the test process: 2 x 4
    return with_overrides(c, overrides)


def with_overrides(config, overrides: dict):
    """`config` (a ConfigDict, or the plain dict `to_dict()` gives) with each dotted key of `overrides` set."""
    for key, value in overrides.items():
        node = config
        *path, last = key.split(".")
        for name in path:
            node = node[name]
        node[last] = value
    return config

"""SDFT on science (SciKnowEval Chemistry L3, the paper's `science_data`).

    python -m sdft_jax.train --config=configs/sdft_science.py --config.data.data_dir=/path/to/data \\
        --config.model.name=/path/to/model

Variant `:thinking` converts demonstrations for thinking models (spec section 6).
"""

from sdft_jax.config import base_config


def get_config(variant: str = ""):
    c = base_config()
    c.method = "sdft"
    c.run_dir = "runs/sdft_science"
    c.model.name = "smollm2-135m"  # set to a real instruct model directory
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"
    c.data.task = "science"
    c.data.data_dir = ""  # required: the folder holding science_data/
    c.data.keep_system = False  # the recipe drops the system turn; the official code keeps it
    c.prompts.max_prompt_tokens = 2048
    c.rollout.max_new_tokens = 2048
    c.loss.name = "topk"
    c.loss.chunk_size = 1024
    c.teacher.mode = "ema"
    c.optim.learning_rate = 2e-5
    c.train.steps = 200
    c.train.prompts_per_step = 32
    c.eval.tasks = "science,tooluse"
    c.eval.every = 50
    c.checkpoint.every = 50
    # FSDP over every device: weights, fp32 masters, Adam moments and the teacher sharded, never
    # replicated (a 7B full fine-tune holds ~140 GB of state: docs/reproducing.md)
    c.mesh.data = 1
    c.mesh.fsdp = -1
    if variant == "thinking":
        c.data.thinking_format = True
        c.prompts.thinking_prefill = "<think>\n"
    elif variant:
        raise ValueError(f"unknown variant {variant!r} (thinking)")
    return c

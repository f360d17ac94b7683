"""The SFT baseline: cross-entropy on the golden demonstrations (spec section 3, `sft`).

    python -m sdft_jax.train --config=configs/sft.py:tooluse --config.data.data_dir=/path/to/data
    python -m sdft_jax.train --config=configs/sft.py:science --config.data.data_dir=/path/to/data
"""

from sdft_jax.config import base_config

_OTHER_TASK = {"tooluse": "science", "science": "tooluse"}


def get_config(task: str = "tooluse"):
    if task not in _OTHER_TASK:
        raise ValueError(f"unknown variant {task!r} (tooluse, science)")
    c = base_config()
    c.method = "sft"
    c.run_dir = f"runs/sft_{task}"
    c.model.name = "smollm2-135m"  # set to a real instruct model directory
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"
    c.data.task = task
    c.data.data_dir = ""  # required: the folder holding tooluse_data/ and science_data/
    c.prompts.max_prompt_tokens = 2048
    c.prompts.max_target_tokens = 2048
    c.loss.name = "sft"
    c.loss.chunk_size = 1024
    c.optim.learning_rate = 2e-5
    c.train.steps = 200
    c.train.prompts_per_step = 32
    c.eval.tasks = f"{task},{_OTHER_TASK[task]}"  # the new skill, then the prior one
    c.eval.every = 50
    c.checkpoint.every = 50
    # FSDP over every device: weights, fp32 masters, Adam moments and the teacher sharded, never
    # replicated (a 7B full fine-tune holds ~140 GB of state: docs/reproducing.md)
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c

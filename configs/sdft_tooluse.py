"""SDFT on tool use (ToolAlpaca, the paper's `tooluse_data`), the official recipe's settings.

    python -m sdft_jax.train --config=configs/sdft_tooluse.py --config.data.data_dir=/path/to/data \\
        --config.model.name=/path/to/Qwen2.5-7B-Instruct

`data_dir` holds `tooluse_data/{train_data,eval_data}` (the upstream Self-Distillation layout). Variants:
`configs/sdft_tooluse.py:full_kl` (full-vocabulary forward KL) and `:lora` (LoRA rank 128, lr 5e-4).
"""

from sdft_jax.config import base_config


def get_config(variant: str = ""):
    c = base_config()
    c.method = "sdft"
    c.run_dir = "runs/sdft_tooluse"
    c.model.name = "smollm2-135m"  # set to a real instruct model directory
    c.model.dtype = "bfloat16"  # compute in bf16 on accelerators; trainable weights stay fp32 masters
    c.model.param_dtype = "bfloat16"
    c.data.task = "tooluse"
    c.data.data_dir = ""  # required: the folder holding tooluse_data/
    c.prompts.max_prompt_tokens = 2048
    c.rollout.max_new_tokens = 1024  # paper 1024; recipe 2048
    c.loss.name = "topk"
    c.loss.top_k = 20
    c.loss.chunk_size = 1024
    c.teacher.mode = "ema"
    c.teacher.ema_alpha = 0.01
    c.optim.learning_rate = 2e-5  # full fine-tuning
    c.optim.schedule = "cosine"
    c.optim.warmup_ratio = 0.1
    c.train.steps = 200
    c.train.prompts_per_step = 32  # paper 32
    c.eval.tasks = "tooluse,science"  # the new skill and a prior one
    c.eval.every = 50
    c.eval.max_new_tokens = 1024
    c.checkpoint.every = 50
    # FSDP over every device: weights, fp32 masters, Adam moments and the teacher sharded, never
    # replicated (a 7B full fine-tune holds ~140 GB of state: docs/reproducing.md)
    c.mesh.data = 1
    c.mesh.fsdp = -1
    if variant == "full_kl":
        c.loss.name = "full_kl"
    elif variant == "lora":
        c.model.lora.rank = 128
        c.model.lora.alpha = 32.0
        c.optim.learning_rate = 5e-4
    elif variant:
        raise ValueError(f"unknown variant {variant!r} (full_kl, lora)")
    return c

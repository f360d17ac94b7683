"""Qwen3-8B SDFT on a TPU pod slice (v5p-16: 8 chips x 95 GB HBM), full fine-tuning or LoRA.

    launch/tpu.sh train --config configs/qwen3_8b_tpu.py --run-name qwen3-8b-tooluse \\
        --model-src gs://BUCKET/models/qwen3-8b --data-src gs://BUCKET/data

Memory (by hand; launch/README.md's `bench plan` table measures it): Qwen3-8B has 8.19B parameters. Full fine-tuning keeps
bf16 weights, fp32 masters, AdamW's two fp32 moments and the fp32 EMA teacher: 20 bytes/parameter,
164 GB, sharded FSDP over the 8 chips (~20 GB each) plus activations (remat: only layer inputs,
~14.5 GB for 32 x 1536 tokens, split over the batch) and the rollout KV cache (147 KB/token, 7.2 GB):
~26 GB per chip of 95. Variant `:lora` (rank 128 on q/k/v/o/gate/up/down, 349M adapter parameters):
frozen bf16 base 16.4 GB + 20 x 0.35B = 23.4 GB of state, which fits a v5litepod-8 (8 x 16 GB) too.
Batch: 32 prompts per step (the paper's), 1 sample each, split 8 ways (4 rows per chip); the loss
chunk of 1024 tokens holds 1024 x 151936 fp32 logits (0.6 GB) per model at a time.
"""

from sdft_jax.config import base_config


def get_config(variant: str = ""):
    c = base_config()
    c.method = "sdft"
    c.run_dir = "gs://BUCKET/runs/qwen3-8b-tooluse"  # replaced by launch/tpu.sh (--run-name)
    c.model.name = "/mnt/models/qwen3-8b"  # an HF directory on every worker (launch/tpu.sh --model-src)
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"
    c.model.remat = "full"
    c.data.task = "tooluse"
    c.data.data_dir = "/mnt/data/self-distillation"  # launch/tpu.sh --data-src
    c.prompts.max_prompt_tokens = 512
    # Qwen3's chat template thinks unless told not to; off here (completions within 1024 tokens): the
    # template then closes an empty <think></think> block after the assistant header.
    c.prompts.enable_thinking = False
    c.prompts.thinking_prefill = ""
    c.rollout.max_new_tokens = 1024
    c.loss.name = "topk"
    c.loss.top_k = 20
    c.loss.chunk_size = 1024
    c.teacher.mode = "ema"
    c.teacher.ema_alpha = 0.01
    c.optim.learning_rate = 2e-5
    c.optim.schedule = "cosine"
    c.optim.warmup_ratio = 0.1
    c.train.steps = 200
    c.train.prompts_per_step = 32
    c.eval.tasks = "tooluse,science"
    c.eval.every = 50
    c.eval.batch_size = 32
    c.checkpoint.every = 25
    c.checkpoint.keep = 3
    c.mesh.data = 1
    c.mesh.fsdp = -1  # all chips: parameters, optimizer state and teacher sharded 8 ways
    c.mesh.tensor = 1
    if variant == "lora":
        c.model.lora.rank = 128
        c.model.lora.alpha = 32.0
        c.optim.learning_rate = 5e-4
    elif variant:
        raise ValueError(f"unknown variant {variant!r} (lora)")
    return c

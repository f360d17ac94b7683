"""Qwen3-30B-A3B SDFT with LoRA rank 64 on a TPU pod slice with expert parallelism (v5p-64: 32 chips).

    launch/tpu.sh train --config configs/qwen3_30b_a3b.py --run-name qwen3-30b-a3b-tooluse \\
        --model-src gs://BUCKET/models/qwen3-30b-a3b --data-src gs://BUCKET/data

Qwen/Qwen3-30B-A3B: 48 layers, all sparse; D=2048; 32 query / 4 KV heads of 128; 128 experts of
F=768, top-8, norm_topk_prob; V=151936, untied. 30.5B parameters, 29.0B of them in the experts;
3.35B active per token. LoRA rank 64 (the recipe's for large MoE), alpha 32, on q/k/v/o and on every
expert's gate/up/down (per-expert adapters): 3.38B adapter parameters, 53M of them on attention.

Mesh `fsdp=4 x expert=8`: each chip holds 16 of each layer's 128 experts (the `expert` axis) with
their `embed` dimension split 4 ways (`fsdp`); the batch of 128 rows is split over all 32 chips.
Per chip (by hand; launch/README.md's `bench plan` table measures it): frozen bf16 base 2.6 GB, adapters' trained state
4.5 GB, layer inputs 1.6 GB, a MoE layer's dispatch buffers ~4.6 GB; ~13 GB of 95 during the step,
the rollout KV cache (0.8 GB) before it. Variant `:attention` puts the adapters on q/k/v/o only.
"""

from sdft_jax.config import base_config

ATTENTION = "q_proj,k_proj,v_proj,o_proj"
EXPERTS = "experts_gate_proj,experts_up_proj,experts_down_proj"


def get_config(variant: str = ""):
    c = base_config()
    c.method = "sdft"
    c.run_dir = "gs://BUCKET/runs/qwen3-30b-a3b-tooluse"  # replaced by launch/tpu.sh (--run-name)
    c.model.name = "/mnt/models/qwen3-30b-a3b"  # an HF directory on every worker (launch/tpu.sh --model-src)
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"
    c.model.remat = "full"
    c.model.lora.rank = 64
    c.model.lora.alpha = 32.0
    c.model.lora.targets = f"{ATTENTION},{EXPERTS}"
    c.data.task = "tooluse"
    c.data.data_dir = "/mnt/data/self-distillation"  # launch/tpu.sh --data-src
    c.prompts.max_prompt_tokens = 512
    c.prompts.thinking_prefill = ""  # Qwen3's thinking mode off: the chat template's default prefill
    c.rollout.max_new_tokens = 1536  # 2048 tokens per row with the prompt
    c.loss.name = "topk"
    c.loss.top_k = 20
    c.loss.chunk_size = 1024
    c.teacher.mode = "ema"
    c.teacher.ema_alpha = 0.01
    c.optim.learning_rate = 5e-4
    c.optim.b2 = 0.95  # the recipe's
    c.optim.schedule = "cosine"
    c.optim.warmup_ratio = 0.1
    c.train.steps = 200
    c.train.prompts_per_step = 128
    c.eval.tasks = "tooluse,science"
    c.eval.every = 50
    c.eval.batch_size = 64
    c.checkpoint.every = 25
    c.checkpoint.keep = 3
    c.mesh.data = 1
    c.mesh.fsdp = 4
    c.mesh.expert = 8  # must divide the 128 experts
    c.mesh.tensor = 1
    if variant == "attention":
        c.model.lora.targets = ATTENTION
    elif variant:
        raise ValueError(f"unknown variant {variant!r} (attention)")
    return c

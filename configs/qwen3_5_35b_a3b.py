"""The recipe's own run: Qwen3.5-35B-A3B SDFT with LoRA rank 64 on a TPU pod slice (v5p-64: 32 chips).

    launch/tpu.sh train --config configs/qwen3_5_35b_a3b.py --run-name qwen3.5-35b-a3b-tooluse \\
        --model-src gs://BUCKET/models/qwen3.5-35b-a3b --data-src gs://BUCKET/data

The recipe's settings (../shared/seed/sdft-recipe-readme.txt): LoRA 64, lr 5e-4, 128 prompts per step,
completions up to 2048 tokens, top-K 20, static teacher. Qwen/Qwen3.5-35B-A3B: 40 layers in a period of
3 Gated DeltaNet layers (16 key / 32 value heads of 128, conv 4) and 1 gated full-attention layer (16
query / 2 KV heads of 256, partial RoPE 0.25); every layer a MoE of 256 experts (top-8, F=512) plus a
shared expert (512); D=2048; V=248,320. 34.7B parameters in the text model, 32.2B of them in the routed
experts; 3.46B active per token (computed from the model code: launch/README.md).

Adapters on every projection the model has, as Tinker's LoRA: attention (and its output gate), the
linear-attention projections, the shared expert, and each routed expert (5.12B adapter parameters, 86M
of them outside the routed experts). Variant `:dense_only` leaves the routed experts without adapters.

Mesh `fsdp=4 x expert=8`: each chip holds 32 of each layer's 256 experts, their `embed` dimension split
4 ways; the batch of 128 rows is split over all 32 chips, in micro-batches of 32 rows (one per chip):
all 128 at once need 85.8 GiB per chip (mostly MoE dispatch buffers; more than v5p's 95 less 15%), 4
micro-batches 40.9 GiB, as the TPU compiler plans them
(`python -m sdft_jax.bench plan --config=configs/qwen3_5_35b_a3b.py --devices 32 --chip v5p --compiler tpu`,
launch/README.md).
"""

from sdft_jax.config import base_config

ATTENTION = "q_proj,k_proj,v_proj,o_proj,q_gate_proj"
LINEAR = "linear_q_proj,linear_k_proj,linear_v_proj,linear_z_proj,linear_out_proj"
SHARED = "shared_expert_gate_proj,shared_expert_up_proj,shared_expert_down_proj"
EXPERTS = "experts_gate_proj,experts_up_proj,experts_down_proj"


def get_config(variant: str = ""):
    c = base_config()
    c.method = "sdft"
    c.run_dir = "gs://BUCKET/runs/qwen3.5-35b-a3b-tooluse"  # replaced by launch/tpu.sh (--run-name)
    c.model.name = "/mnt/models/qwen3.5-35b-a3b"  # an HF directory on every worker (launch/tpu.sh --model-src)
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"
    c.model.remat = "full"
    c.model.lora.rank = 64
    c.model.lora.alpha = 32.0
    c.model.lora.targets = f"{ATTENTION},{LINEAR},{SHARED},{EXPERTS}"
    c.data.task = "tooluse"
    c.data.data_dir = "/mnt/data/self-distillation"  # launch/tpu.sh --data-src
    c.prompts.max_prompt_tokens = 1024
    c.rollout.max_new_tokens = 2048
    c.loss.name = "topk"
    c.loss.top_k = 20
    c.loss.chunk_size = 1024
    c.teacher.mode = "static"
    c.optim.learning_rate = 5e-4
    c.optim.schedule = "constant"
    c.optim.warmup_ratio = 0.0
    c.train.steps = 200
    c.train.prompts_per_step = 128
    c.train.micro_batch_size = 32  # the whole batch at once does not fit (see above)
    c.eval.tasks = "tooluse,science"
    c.eval.every = 50
    c.eval.batch_size = 64
    c.checkpoint.every = 25
    c.checkpoint.keep = 3
    c.mesh.data = 1
    c.mesh.fsdp = 4
    c.mesh.expert = 8  # must divide the 256 experts
    c.mesh.tensor = 1
    if variant == "dense_only":
        c.model.lora.targets = f"{ATTENTION},{LINEAR},{SHARED}"
    elif variant:
        raise ValueError(f"unknown variant {variant!r} (dense_only)")
    return c

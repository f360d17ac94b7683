"""The recipe's debug command: 3 steps of SDFT on science, 4 problems each, 256-token completions.

    python -m tinker_cookbook.recipes.sdft.train model_name=Qwen/Qwen3.5-35B-A3B dataset=sciknoweval \\
        groups_per_batch=4 max_tokens=256 max_steps=3 topk=20 lora_rank=64
becomes
    launch/tpu.sh train --config configs/recipe/debug.py --run-name recipe-debug \\
        --model-src gs://BUCKET/models/qwen3.5-35b-a3b --data-src gs://BUCKET/data

Hardware: a v5p-8 slice (4 chips), mesh fsdp=2 x expert=2, so that the 4 rows of a step split over the 4
chips. Memory by hand (not measured): the frozen bf16 base ~18.6 GB per chip (routed experts split 4
ways, the rest 2), the adapters' fp32 values and two Adam moments 5.12B x 12 bytes / 4 = 15.4 GB, the
static teacher shares the base: ~35 GB of 95 before activations.
"""

from sdft_jax.config import base_config

ATTENTION = "q_proj,k_proj,v_proj,o_proj,q_gate_proj"
LINEAR = "linear_q_proj,linear_k_proj,linear_v_proj,linear_z_proj,linear_out_proj"
SHARED = "shared_expert_gate_proj,shared_expert_up_proj,shared_expert_down_proj"
EXPERTS = "experts_gate_proj,experts_up_proj,experts_down_proj"


def get_config():
    c = base_config()
    c.method = "sdft"
    c.run_dir = "gs://BUCKET/runs/recipe-debug"  # replaced by launch/tpu.sh (--run-name)
    c.model.name = "/mnt/models/qwen3.5-35b-a3b"  # README: model_name=Qwen/Qwen3.5-35B-A3B
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"
    c.model.remat = "full"
    c.model.lora.rank = 64  # README: lora_rank=64
    c.model.lora.alpha = 32.0  # spec section 5: LoRA alpha 32
    c.model.lora.targets = f"{ATTENTION},{LINEAR},{SHARED},{EXPERTS}"  # Tinker's LoRA: every linear layer
    c.data.task = "science"  # README: dataset=sciknoweval
    c.data.data_dir = "/mnt/data/self-distillation"
    c.data.keep_system = False  # spec section 6: the recipe drops the science system turn for SDFT
    c.prompts.max_prompt_tokens = 2048
    c.rollout.max_new_tokens = 256  # README: max_tokens=256
    c.loss.name = "topk"
    c.loss.top_k = 20  # README: topk=20
    c.loss.reduction = "sum"  # spec section 3: the hosted recipe sums
    c.loss.chunk_size = 1024
    c.teacher.mode = "static"  # README: static teacher
    c.optim.learning_rate = 2e-5  # README: learning_rate default 2e-5 (not passed to this command)
    c.optim.b2 = 0.95  # spec section 5: the recipe's Adam beta2
    c.optim.schedule = "constant"
    c.optim.warmup_ratio = 0.0
    c.train.steps = 3  # README: max_steps=3
    c.train.prompts_per_step = 4  # README: groups_per_batch=4
    c.eval.tasks = ""  # a debug run: no evaluation
    c.eval.at_start = False
    c.checkpoint.every = 3
    c.checkpoint.keep = 1
    c.mesh.data = 1
    c.mesh.fsdp = 2
    c.mesh.expert = 2
    c.mesh.tensor = 1
    return c
